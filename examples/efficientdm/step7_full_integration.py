"""EfficientDM walkthrough on digits, step 7.

The comparison table of every step run so far (efficientdm.md, efficientdm_results.json).

Steps share state through --out (run them in order; a step runs the earlier steps it needs)::

    python examples/efficientdm/step7_full_integration.py --out efficientdm-walkthrough --quick
"""

from diffquant.bench.efficientdm_walkthrough import step_main

if __name__ == "__main__":
    step_main("report")
