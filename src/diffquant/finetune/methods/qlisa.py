"""``qlisa``: NF4 frozen layers, layerwise importance sampling, optimizer in backward (seed 000)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from diffquant.finetune.registry import (
    FinetuneConfig,
    FinetuneContext,
    FinetuneSetup,
    optimizer_state_bytes,
    register_finetune_method,
)
from diffquant.qlisa import QLISADiffusion


@dataclass(frozen=True, kw_only=True)
class QLISAFinetuneConfig(FinetuneConfig):
    """:class:`~diffquant.qlisa.QLISADiffusion` settings; the setup has no optimizer (each parameter is
    stepped inside backward) and ``finalize`` returns NF4 ``QuantLinear`` / ``QuantConv2d`` layers.

    Args:
        gamma: middle layers trained per period besides the first and last.
        interval: steps between layer re-samplings.
        lr: AdamW learning rate of the sampled layers.
        seed: seeds the layer sampler.
        max_grad_norm: per-parameter gradient clipping (``None``: none).
        include, exclude: regexes of the layers to convert / keep in float.

    Raises:
        ValueError: a non-positive gamma, interval or lr.

    Example:
        >>> QLISAFinetuneConfig(gamma=1, interval=5).interval
        5
    """

    method: ClassVar[str] = "qlisa"
    gamma: int = 2
    interval: int = 20
    lr: float = 1e-4
    seed: int = 0
    max_grad_norm: float | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_positive("gamma", "interval", "lr")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))


@register_finetune_method("qlisa", QLISAFinetuneConfig)
def prepare_qlisa(model: nn.Module, config: QLISAFinetuneConfig, context: FinetuneContext) -> FinetuneSetup:
    """``QLISADiffusion(model, ...).register().insert_hook()``; the hooks count the steps and re-sample
    the layers (``after_step`` applies a due re-sampling right away); ``method_state`` is the QLISA
    object (its state goes into training checkpoints)."""
    qlisa = QLISADiffusion(
        model,
        gamma=config.gamma,
        interval=config.interval,
        lr=config.lr,
        seed=config.seed,
        max_grad_norm=config.max_grad_norm,
        include=config.include,
        exclude=config.exclude,
    )
    qlisa.register().insert_hook()
    return FinetuneSetup(
        model,
        None,
        after_step=qlisa.step,
        finalize=qlisa.finalize,
        state_bytes=lambda: sum(map(optimizer_state_bytes, qlisa.named_optimizers().values())),
        method_state=qlisa,
    )
