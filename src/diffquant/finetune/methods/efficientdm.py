"""``efficientdm``: EfficientDM (He et al., ICLR 2024): calibrated PTQ start, QALoRA, scale-aware LR,
TALSQ; train with :func:`~diffquant.finetune.distill.distill` from the float model (or on data), then
``finalize`` merges. The config is :class:`~diffquant.efficientdm.EfficientDMConfig`."""

from __future__ import annotations

from torch import nn

from diffquant.config import CalibrationConfig
from diffquant.efficientdm.recipe import EfficientDMConfig, efficientdm_quantize_, qalora_setup
from diffquant.finetune.objectives import is_flow_matching
from diffquant.finetune.registry import FinetuneContext, FinetuneSetup, register_finetune_method


@register_finetune_method("efficientdm", EfficientDMConfig)
def prepare_efficientdm(
    model: nn.Module, config: EfficientDMConfig, context: FinetuneContext
) -> FinetuneSetup:
    """PTQ the float ``model`` in place (first / last layers W8A8, per-timestep activation tables
    calibrated with ``context.calibrate`` on ``context.scheduler``'s noise levels), then the QALoRA setup.
    Keep a copy of the float model first: it is the distillation teacher.

    Raises:
        ValueError: no ``scheduler`` or no ``calibrate`` in the context (the activation tables need both).
    """
    if context.scheduler is None or context.calibrate is None:
        raise ValueError(
            "the efficientdm method calibrates per-timestep activation tables: pass "
            "prepare_finetune(..., scheduler=training_scheduler, calibrate=fn_running_the_float_sampler)."
        )
    model.eval()
    efficientdm_quantize_(
        model,
        config.quant_config(),
        calibrate=context.calibrate,
        schedule=None if is_flow_matching(context.scheduler) else context.scheduler,  # flow: no ᾱ table
        calibration=CalibrationConfig(num_steps=config.calibration_steps),
    )
    return qalora_setup(model, config)
