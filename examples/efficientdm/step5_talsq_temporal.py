"""EfficientDM walkthrough on digits, step 5.

+ TALSQ (trainable per-timestep activation step sizes, indexed by the real timestep).

Steps share state through --out (run them in order; a step runs the earlier steps it needs)::

    python examples/efficientdm/step5_talsq_temporal.py --out efficientdm-walkthrough --quick
"""

from diffquant.bench.efficientdm_walkthrough import step_main

if __name__ == "__main__":
    step_main("talsq")
