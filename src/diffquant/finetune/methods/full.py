"""``fp-full``: full fine-tuning of the float model (DreamBooth; Ruiz et al., CVPR 2023), AdamW."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from diffquant.finetune.common import require_trainable
from diffquant.finetune.registry import (
    FinetuneConfig,
    FinetuneContext,
    FinetuneSetup,
    register_finetune_method,
)


@dataclass(frozen=True, kw_only=True)
class FullFinetuneConfig(FinetuneConfig):
    """Every parameter trains with AdamW; the result stays a float model (the baseline).

    Args:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.

    Raises:
        ValueError: a non-positive ``lr`` or a negative ``weight_decay``.

    Example:
        >>> FullFinetuneConfig(lr=1e-4).to_dict()["lr"]
        0.0001
    """

    method: ClassVar[str] = "fp-full"
    lr: float = 2e-4
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_positive("lr")
        if self.weight_decay < 0:
            raise ValueError(f"FullFinetuneConfig.weight_decay must be >= 0, got {self.weight_decay}.")


@register_finetune_method("fp-full", FullFinetuneConfig)
def prepare_full(model: nn.Module, config: FullFinetuneConfig, context: FinetuneContext) -> FinetuneSetup:
    """Unfreeze every parameter; AdamW over all of them."""
    model.requires_grad_(True)
    params = require_trainable(model)
    return FinetuneSetup(model, torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay))
