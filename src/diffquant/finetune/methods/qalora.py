"""``qalora``: EfficientDM's QALoRA on a round-to-nearest weight-only model, merged after training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from diffquant.api import quantize_
from diffquant.config import QuantConfig, WeightQuantConfig
from diffquant.efficientdm import apply_qalora, merge_qalora, scale_aware_param_groups
from diffquant.finetune.registry import (
    FinetuneConfig,
    FinetuneContext,
    FinetuneSetup,
    register_finetune_method,
)


@dataclass(frozen=True, kw_only=True)
class QALoRAFinetuneConfig(FinetuneConfig):
    """RTN INT weights (the architecture's default float layers kept), QALoRA adapters, scale-aware
    AdamW groups; ``finalize`` merges the adapters into plain quantized layers. For the full EfficientDM
    recipe (calibrated activations, TALSQ, W8A8 edges) use :class:`~diffquant.efficientdm.EfficientDMConfig`.

    Args:
        bits: weight bit width (2..8).
        rank: adapter rank; alpha: LoRA scaling numerator (default ``rank``).
        lr: LoRA learning rate of a layer with the average weight step.
        step_lr: weight-step learning rate relative to each layer's mean step.
        scale_aware: per-layer LoRA learning rates proportional to the weight step.

    Raises:
        ValueError: bits outside 2..8, or a non-positive rank, alpha or learning rate.

    Example:
        >>> QALoRAFinetuneConfig(bits=4, rank=8).bits
        4
    """

    method: ClassVar[str] = "qalora"
    bits: int = 4
    rank: int = 8
    alpha: float | None = None
    lr: float = 1e-3
    step_lr: float = 1e-3
    scale_aware: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.bits, bool) or self.bits not in range(2, 9):
            raise ValueError(f"QALoRAFinetuneConfig.bits must be an integer in 2..8, got {self.bits!r}.")
        self._require_positive("rank", "lr", "step_lr", *(("alpha",) if self.alpha is not None else ()))


@register_finetune_method("qalora", QALoRAFinetuneConfig)
def prepare_qalora(model: nn.Module, config: QALoRAFinetuneConfig, context: FinetuneContext) -> FinetuneSetup:
    """Quantize (RTN, in place), wrap the quantized layers with QALoRA, AdamW on the scale-aware groups."""
    quantize_(model, QuantConfig(weights=WeightQuantConfig(bits=config.bits)), progress=False)
    apply_qalora(model, rank=config.rank, alpha=config.alpha)
    groups = scale_aware_param_groups(
        model, config.lr, scale_aware=config.scale_aware, step_lr=config.step_lr
    )
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=0.0)
    return FinetuneSetup(model, optimizer, finalize=lambda: merge_qalora(model))
