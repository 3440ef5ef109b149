"""``tuneqdm``: frozen packed INT weights, trainable timestep-aware scales (Ryu et al., ECCV 2024)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from diffquant.finetune.objectives import is_flow_matching
from diffquant.finetune.registry import (
    FinetuneConfig,
    FinetuneContext,
    FinetuneSetup,
    register_finetune_method,
)
from diffquant.models import get_arch_spec
from diffquant.tuneqdm import TuneQDMConfig, apply_tuneqdm, delta_param_groups, register_tas_pre_hook


@dataclass(frozen=True, kw_only=True)
class TuneQDMFinetuneConfig(FinetuneConfig):
    """TuneQDM layers as ``tuneqdm`` says, AdamW with rates relative to each layer's scale.

    Args:
        tuneqdm: the layers' config (bit width ``bits``, TAS experts, which scales train, targets).
        lr: learning rate relative to each scale (:func:`~diffquant.tuneqdm.delta_param_groups`): one
            Adam update changes every scale by about the same fraction at any bit width.
        keep_arch_fp: also leave the architecture's default full-precision layers (first / last,
            embeddings; :func:`diffquant.models.get_arch_spec`) in float.

    Raises:
        ValueError: a non-positive ``lr``.

    Example:
        >>> cfg = TuneQDMFinetuneConfig(tuneqdm=TuneQDMConfig(bits=4, num_experts=4), lr=1e-2)
        >>> TuneQDMFinetuneConfig.from_json(cfg.to_json()) == cfg
        True
    """

    method: ClassVar[str] = "tuneqdm"
    _nested: ClassVar[dict[str, type]] = {"tuneqdm": TuneQDMConfig}
    tuneqdm: TuneQDMConfig = field(default_factory=lambda: TuneQDMConfig(num_experts=4, train_delta_in=True))
    lr: float = 3e-2
    keep_arch_fp: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.tuneqdm, TuneQDMConfig):
            raise TypeError(f"TuneQDMFinetuneConfig.tuneqdm must be a TuneQDMConfig, got {self.tuneqdm!r}.")
        self._require_positive("lr")


@register_finetune_method("tuneqdm", TuneQDMFinetuneConfig)
def prepare_tuneqdm(
    model: nn.Module, config: TuneQDMFinetuneConfig, context: FinetuneContext
) -> FinetuneSetup:
    """Swap in TuneQDM layers, route each call's timestep to the experts, AdamW on the scales.

    ``context.scheduler`` (optional) feeds the noise context its log-SNR (DDPM-style schedulers). A
    flow-matching model's timesteps ``σ·T`` lie in ``(0, T]``: ``T`` (σ = 1) is read as ``T − 1``, which
    selects the same (last) expert.
    """
    layers = config.tuneqdm
    if config.keep_arch_fp:
        layers = replace(layers, exclude=(*layers.exclude, *get_arch_spec(model).keep_fp))
    apply_tuneqdm(model, layers)
    if layers.num_experts > 1:
        scheduler = context.scheduler
        if scheduler is not None and is_flow_matching(scheduler):
            rule = _flow_timestep_rule(model, layers.total_denoising_steps)
            register_tas_pre_hook(model, layers.num_experts, timestep_arg=rule)
        else:
            register_tas_pre_hook(model, layers.num_experts, schedule=scheduler)
    optimizer = torch.optim.AdamW(delta_param_groups(model, config.lr), weight_decay=0.0)
    return FinetuneSetup(model, optimizer)


def _flow_timestep_rule(model: nn.Module, total: int):
    """``rule(args, kwargs)``: the call's ``timestep`` argument with ``T`` clamped to ``T − 1``."""
    signature = inspect.signature(model.forward)
    name = get_arch_spec(model).timestep_arg or "timestep"
    if name not in signature.parameters:
        raise ValueError(
            f"{type(model).__name__}.forward has no {name!r} argument; TuneQDM's experts need the timestep. "
            "Register an ArchSpec naming it (diffquant.models.register_arch)."
        )

    def rule(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        timestep = signature.bind_partial(*args, **kwargs).arguments[name]
        return torch.as_tensor(timestep).clamp(max=total - 1)

    return rule
