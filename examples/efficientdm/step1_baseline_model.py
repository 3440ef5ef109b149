"""EfficientDM walkthrough on digits, step 1.

Sample and score the float digits UNet (the FP32 baseline).

Steps share state through --out (run them in order; a step runs the earlier steps it needs)::

    python examples/efficientdm/step1_baseline_model.py --out efficientdm-walkthrough --quick
"""

from diffquant.bench.efficientdm_walkthrough import step_main

if __name__ == "__main__":
    step_main("fp32")
