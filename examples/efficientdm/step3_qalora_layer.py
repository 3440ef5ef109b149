"""EfficientDM walkthrough on digits, step 3.

QALoRA fine-tuning (LoRA inside the weight quantizer) with the denoising loss on the digits.

Steps share state through --out (run them in order; a step runs the earlier steps it needs)::

    python examples/efficientdm/step3_qalora_layer.py --out efficientdm-walkthrough --quick
"""

from diffquant.bench.efficientdm_walkthrough import step_main

if __name__ == "__main__":
    step_main("qalora")
