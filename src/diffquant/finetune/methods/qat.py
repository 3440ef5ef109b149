"""``qat``: quantization-aware training (fake-quant layers, learned ranges), then conversion (seed 004)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from diffquant.config import ActivationQuantConfig, QuantConfig, WeightQuantConfig
from diffquant.finetune.common import require_trainable
from diffquant.finetune.registry import (
    FinetuneConfig,
    FinetuneContext,
    FinetuneSetup,
    register_finetune_method,
)
from diffquant.qat.modules import RANGE_MODES
from diffquant.qat.workflow import convert, prepare_qat


def _w8a8() -> QuantConfig:
    return QuantConfig(weights=WeightQuantConfig(bits=8), activations=ActivationQuantConfig(bits=8))


@dataclass(frozen=True, kw_only=True)
class QATFinetuneConfig(FinetuneConfig):
    """:func:`~diffquant.qat.prepare_qat` with ``quant``, AdamW on every parameter (weights, biases,
    norms, LSQ ranges); ``finalize`` is :func:`~diffquant.qat.convert` (packed quantized layers).

    Args:
        quant: weights (INT, ``bits``), activations and targets of the QAT layers.
        weight_range, act_range: ``"lsq"`` (learned) or ``"observer"`` (min-max) ranges.
        lr: peak AdamW learning rate.
        cosine_steps: decay the rate to 0 along a cosine over this many steps (``None``: constant).

    Raises:
        ValueError: an unknown range mode or a non-positive ``lr`` / ``cosine_steps``.

    Example:
        >>> QATFinetuneConfig(quant=QuantConfig(weights=WeightQuantConfig(bits=4)), cosine_steps=300).lr
        0.0001
    """

    method: ClassVar[str] = "qat"
    _nested: ClassVar[dict[str, type]] = {"quant": QuantConfig}
    quant: QuantConfig = field(default_factory=_w8a8)
    weight_range: str = "lsq"
    act_range: str = "lsq"
    lr: float = 1e-4
    cosine_steps: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.quant, QuantConfig):
            raise TypeError(f"QATFinetuneConfig.quant must be a diffquant.QuantConfig, got {self.quant!r}.")
        for name in ("weight_range", "act_range"):
            if getattr(self, name) not in RANGE_MODES:
                raise ValueError(
                    f"QATFinetuneConfig.{name} must be one of {RANGE_MODES}, got {getattr(self, name)!r}."
                )
        self._require_positive("lr", *(("cosine_steps",) if self.cosine_steps is not None else ()))


@register_finetune_method("qat", QATFinetuneConfig)
def prepare_qat_finetune(
    model: nn.Module, config: QATFinetuneConfig, context: FinetuneContext
) -> FinetuneSetup:
    """Swap in QAT layers (in place), AdamW (no weight decay) on every trainable parameter."""
    prepare_qat(model, config.quant, weight_range=config.weight_range, act_range=config.act_range)
    optimizer = torch.optim.AdamW(require_trainable(model, "the QAT model"), lr=config.lr, weight_decay=0.0)
    lr_scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.cosine_steps)
        if config.cosine_steps is not None
        else None
    )
    return FinetuneSetup(model, optimizer, lr_scheduler, finalize=lambda: convert(model))
