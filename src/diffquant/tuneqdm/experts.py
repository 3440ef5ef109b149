"""Timestep-aware scales (TAS): which expert copy of the scales each sample uses.

TuneQDM (Ryu et al., ECCV 2024) keeps ``N`` copies ("experts") of every trainable scale and picks copy
``i = floor(t · N / T)`` for a sample at training timestep ``t`` of ``T``, clamped to ``N − 1``. The
reference code picks one expert per batch; here every sample gets its own, so a batch may mix
timesteps (training batches draw ``t`` per sample).

An expert selection is either an ``int`` (every sample uses that expert) or an ``int64 (B,)`` tensor
(one expert per sample).
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import Tensor

from diffquant.noise import NoiseLevel

Experts = int | Tensor
"""An expert index shared by the whole batch, or ``int64 (B,)`` indices, one per sample."""


def expert_index(timestep: Any, num_experts: int, total_denoising_steps: int) -> Tensor:
    """``floor(t · N / T)`` clamped to ``N − 1``, for each timestep.

    Computed in float64 on the CPU, so integer timesteps hit the boundaries exactly
    (``t = k·T/N`` starts expert ``k``).

    Args:
        timestep: An int, a float or a tensor of training timesteps in ``[0, T)`` (fractional values
            allowed).
        num_experts: N.
        total_denoising_steps: T.

    Returns:
        ``int64`` CPU tensor with the shape of ``timestep``.

    Raises:
        ValueError: a timestep outside ``[0, T)`` or NaN.
        TypeError: a bool or complex timestep.

    Example:
        >>> expert_index(torch.tensor([0, 249, 250, 999]), num_experts=4, total_denoising_steps=1000)
        tensor([0, 0, 1, 3])
    """
    if isinstance(timestep, bool) or (isinstance(timestep, Tensor) and timestep.dtype == torch.bool):
        raise TypeError("timesteps must be integers or real numbers, got a bool.")
    t = torch.as_tensor(timestep).detach()
    if t.is_complex():
        raise TypeError(f"timesteps must be integers or real numbers, got dtype {t.dtype}.")
    t = t.to("cpu", torch.float64)
    if t.numel() and not bool(((t >= 0) & (t < total_denoising_steps)).all()):  # also catches NaN
        raise ValueError(
            f"timesteps must lie in [0, {total_denoising_steps}) (TuneQDM's total_denoising_steps), got "
            f"{t.reshape(-1).tolist()[:8]}. Pass training timesteps (scheduler.timesteps entries, not step "
            "indices or sigmas), or set total_denoising_steps to the scheduler's num_train_timesteps."
        )
    return torch.floor(t * num_experts / total_denoising_steps).long().clamp_(max=num_experts - 1)


def resolve_experts(timestep: Any, num_experts: int, total_denoising_steps: int) -> Experts:
    """The expert selection for a scalar or ``(B,)`` timestep: an ``int`` when all samples agree.

    Raises:
        ValueError: a timestep out of range (see `expert_index`) or with more than one dimension.
    """
    index = expert_index(timestep, num_experts, total_denoising_steps)
    if index.ndim > 1 or index.numel() == 0:
        raise ValueError(
            f"the timestep must be a scalar or a (B,) tensor with one value per sample, got shape "
            f"{tuple(index.shape)}."
        )
    index = index.reshape(-1)  # (B,)
    return int(index[0]) if bool((index == index[0]).all()) else index


# One resolution per denoiser call, shared by all layers: the noise context creates a new NoiseLevel
# for every call, and an entry disappears with it.
_RESOLVED: WeakKeyDictionary[NoiseLevel, dict[tuple[int, int], Experts]] = WeakKeyDictionary()


def experts_for_noise_level(level: NoiseLevel, num_experts: int, total_denoising_steps: int) -> Experts:
    """`resolve_experts` of ``level.timestep``, computed once per `NoiseLevel` (one device sync per call)."""
    per_level = _RESOLVED.setdefault(level, {})
    key = (num_experts, total_denoising_steps)
    if key not in per_level:
        per_level[key] = resolve_experts(level.timestep, num_experts, total_denoising_steps)
    return per_level[key]
