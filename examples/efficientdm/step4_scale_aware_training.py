"""EfficientDM walkthrough on digits, step 4.

+ scale-aware optimization (per-layer LoRA learning rates proportional to the weight step).

Steps share state through --out (run them in order; a step runs the earlier steps it needs)::

    python examples/efficientdm/step4_scale_aware_training.py --out efficientdm-walkthrough --quick
"""

from diffquant.bench.efficientdm_walkthrough import step_main

if __name__ == "__main__":
    step_main("scale_aware")
