"""EfficientDM walkthrough on digits, step 6.

+ data-free distillation from the float model (the full EfficientDM recipe).

Steps share state through --out (run them in order; a step runs the earlier steps it needs)::

    python examples/efficientdm/step6_knowledge_distillation.py --out efficientdm-walkthrough --quick
"""

from diffquant.bench.efficientdm_walkthrough import step_main

if __name__ == "__main__":
    step_main("distill")
