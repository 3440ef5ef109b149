"""``lora``: LoRA (Hu et al., ICLR 2022) through ``peft`` on the float model, base weights frozen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from diffquant.finetune.common import require_trainable
from diffquant.finetune.registry import (
    FinetuneConfig,
    FinetuneContext,
    FinetuneSetup,
    register_finetune_method,
)


@dataclass(frozen=True, kw_only=True)
class LoRAFinetuneConfig(FinetuneConfig):
    """peft LoRA adapters, AdamW on the adapters only; the result stays a float model.

    Args:
        rank: adapter rank r.
        alpha: LoRA scaling numerator (default ``rank``: scale 1).
        lr: AdamW learning rate.
        target_modules: module names (peft's ``target_modules``); empty: every Linear / Conv2d.

    Raises:
        ValueError: a non-positive rank, alpha or lr.

    Example:
        >>> LoRAFinetuneConfig(rank=4).rank
        4
    """

    method: ClassVar[str] = "lora"
    rank: int = 8
    alpha: float | None = None
    lr: float = 1e-3
    target_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_positive("rank", "lr", *(("alpha",) if self.alpha is not None else ()))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))


@register_finetune_method("lora", LoRAFinetuneConfig)
def prepare_lora(model: nn.Module, config: LoRAFinetuneConfig, context: FinetuneContext) -> FinetuneSetup:
    """Inject the adapters (base weights frozen); AdamW over the adapters."""
    targets = list(config.target_modules) or [
        name for name, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)
    ]
    alpha = config.alpha if config.alpha is not None else config.rank
    model = inject_adapter_in_model(
        LoraConfig(r=config.rank, lora_alpha=alpha, target_modules=targets), model
    )
    optimizer = torch.optim.AdamW(require_trainable(model), lr=config.lr, weight_decay=0.0)
    return FinetuneSetup(model, optimizer)
