"""EfficientDM walkthrough on digits, step 2.

Post-training quantization (RTN weights, per-timestep activation tables, first/last layers W8A8);
saves the PTQ checkpoint the fine-tunes start from.

Steps share state through --out (run them in order; a step runs the earlier steps it needs)::

    python examples/efficientdm/step2_quantization_basics.py --out efficientdm-walkthrough --quick
"""

from diffquant.bench.efficientdm_walkthrough import step_main

if __name__ == "__main__":
    step_main("ptq")
