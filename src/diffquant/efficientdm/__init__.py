"""EfficientDM (He et al., ICLR 2024): quantization-aware low-rank fine-tuning of low-bit diffusion models.

- :mod:`~diffquant.efficientdm.qalora`: QALoRA adapters inside the weight quantizer, merged after training.
- :mod:`~diffquant.efficientdm.scale_aware`: per-layer LoRA learning rates proportional to the weight step.
- :mod:`~diffquant.efficientdm.talsq`: trainable per-timestep activation step tables (by real timestep).
- :mod:`~diffquant.efficientdm.recipe`: PTQ start (first/last layers at W8A8) → QALoRA → scale-aware
  LR → TALSQ → data-free distillation (:mod:`diffquant.finetune.distill`) → merge.
- :mod:`~diffquant.bench.efficientdm_walkthrough`: the seed's step-by-step ablation on the digits benchmark.

Example::

    from diffquant.efficientdm import efficientdm_finetune
    q = efficientdm_finetune(fp_unet, scheduler=fp_scheduler(), calibrate=run_sampler, weight_bits=4, act_bits=4)
"""

from diffquant.efficientdm.qalora import QALoRALayer, apply_qalora, merge_qalora, qalora_layers
from diffquant.efficientdm.recipe import (
    EfficientDMConfig,
    EfficientDMReport,
    edge_layer_override,
    efficientdm_finetune,
    efficientdm_quantize_,
    finetune_ptq_model,
    first_last_layers,
    ptq_start,
)
from diffquant.efficientdm.scale_aware import scale_aware_param_groups
from diffquant.efficientdm.talsq import enable_talsq

__all__ = [
    "EfficientDMConfig",
    "EfficientDMReport",
    "QALoRALayer",
    "apply_qalora",
    "edge_layer_override",
    "efficientdm_finetune",
    "efficientdm_quantize_",
    "enable_talsq",
    "finetune_ptq_model",
    "first_last_layers",
    "merge_qalora",
    "ptq_start",
    "qalora_layers",
    "scale_aware_param_groups",
]
