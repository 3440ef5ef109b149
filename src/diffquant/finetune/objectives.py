"""The training objective of a denoiser, read from its noise scheduler.

The scheduler says what the model predicts:

| scheduler | model input ``x_t`` | model timestep | target |
|---|---|---|---|
| ``prediction_type="epsilon"`` (DDPM, SD 1.x) | ``√ᾱ_t x₀ + √(1−ᾱ_t) ε`` | ``t`` | ``ε`` |
| ``prediction_type="v_prediction"`` (SD 2.x) | same | ``t`` | ``v = √ᾱ_t ε − √(1−ᾱ_t) x₀`` (as ``get_velocity``) |
| ``prediction_type="sample"`` | same | ``t`` | ``x₀`` |
| ``FlowMatch*Scheduler`` (SD3, Flux) | ``(1−σ) x₀ + σ ε`` | ``σ · T`` | ``ε − x₀`` (rectified flow) |

``x_t`` and ``v`` are computed from the scheduler's ``alphas_cumprod`` with diffusers' ``DDPMScheduler``
arithmetic (identical results), so any scheduler of the family trains the same: an
``EulerDiscreteScheduler``'s own ``add_noise`` would give the unscaled ``x₀ + σ ε`` instead.

Training timesteps are integers ``t ∈ [0, T)`` for every kind. A flow-matching timestep ``t`` has
``σ = shift(( t + 1) / T)`` with ``shift(s) = k·s / (1 + (k−1)·s)``, ``k = scheduler.config.shift``: the
sigmas a ``FlowMatchEulerDiscreteScheduler`` holds before ``set_timesteps`` (diffusers' SD3 / Flux
training scripts draw from those; dynamic shifting is a sampling-time option and is not applied).

Example:
    >>> from diffusers import DDPMScheduler
    >>> batch = noisy_batch(DDPMScheduler(prediction_type="v_prediction"), torch.zeros(2, 1, 4, 4))
    >>> tuple(batch.target.shape), prediction_type(DDPMScheduler())
    ((2, 1, 4, 4), 'epsilon')
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FLOW_MATCHING = "flow_matching"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", FLOW_MATCHING)
"""The objectives :func:`prediction_type` recognises."""


def is_flow_matching(scheduler) -> bool:
    """True for diffusers' flow-matching schedulers (``FlowMatchEulerDiscreteScheduler`` and kin)."""
    return type(scheduler).__name__.startswith("FlowMatch")


def prediction_type(scheduler) -> str:
    """What a model trained with ``scheduler`` predicts: one of :data:`PREDICTION_TYPES`.

    Raises:
        ValueError: a ``prediction_type`` diffquant does not train (e.g. ``"flow_prediction"`` of
            UniPC's flow sigmas), or a scheduler without one.
    """
    if is_flow_matching(scheduler):
        return FLOW_MATCHING
    kind = getattr(getattr(scheduler, "config", None), "prediction_type", None)
    if kind not in PREDICTION_TYPES:
        raise ValueError(
            f"cannot train with {type(scheduler).__name__} (prediction_type={kind!r}): diffquant trains "
            "'epsilon', 'v_prediction' and 'sample' models with a DDPM-style scheduler and flow-matching "
            "models with FlowMatchEulerDiscreteScheduler. Pass the model's training scheduler."
        )
    return kind


def num_train_timesteps(scheduler) -> int:
    """``T``: the scheduler's number of training timesteps."""
    return int(scheduler.config.num_train_timesteps)


def flow_sigmas(scheduler, timesteps: Tensor) -> Tensor:
    """σ of each integer training timestep of a flow-matching scheduler (float32, timesteps' shape)."""
    total = num_train_timesteps(scheduler)
    shift = float(getattr(scheduler.config, "shift", 1.0))
    sigma = (timesteps.to(torch.float64) + 1.0) / total
    return (shift * sigma / (1.0 + (shift - 1.0) * sigma)).float()


@dataclass(frozen=True)
class NoisyBatch:
    """One training batch of the denoising objective.

    Attributes:
        x_t: the noisy model input, the clean batch's shape and dtype.
        timestep: the model's timestep argument, ``(B,)`` (int64 ``t``; float32 ``σ·T`` for flow).
        target: what the model's output is regressed on (the clean batch's shape).
    """

    x_t: Tensor
    timestep: Tensor
    target: Tensor


def noisy_batch(
    scheduler,
    x0: Tensor,
    *,
    generator: torch.Generator | None = None,
    timesteps: Tensor | None = None,
) -> NoisyBatch:
    """Noise ``x0`` at random (or given) training timesteps and build the regression target.

    Draws ``timesteps`` (uniform in ``[0, T)``, one per sample) then the noise, both from
    ``generator`` on the CPU.

    Args:
        scheduler: the model's training scheduler (see the module table).
        x0: clean samples ``(B, C, H, W)``.
        generator: CPU generator (reproducible runs).
        timesteps: ``int64 (B,)`` training timesteps to use instead of random ones.

    Raises:
        ValueError: timesteps outside ``[0, T)`` or an unknown prediction type.
    """
    kind = prediction_type(scheduler)
    total = num_train_timesteps(scheduler)
    if timesteps is None:
        timesteps = torch.randint(0, total, (x0.shape[0],), generator=generator)
    elif bool(((timesteps < 0) | (timesteps >= total)).any()):
        raise ValueError(f"timesteps must lie in [0, {total - 1}] (the scheduler's range).")
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    t = timesteps.to(x0.device)
    if kind == FLOW_MATCHING:
        sigma = flow_sigmas(scheduler, timesteps).to(x0.device)  # (B,)
        s = sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)  # (B, 1, 1, 1)
        return NoisyBatch((1 - s) * x0 + s * noise, sigma * total, noise - x0)
    sqrt_alpha, sqrt_one_minus_alpha = _noise_coefficients(scheduler, x0, t)
    x_t = sqrt_alpha * x0 + sqrt_one_minus_alpha * noise
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = sqrt_alpha * noise - sqrt_one_minus_alpha * x0
    else:
        target = x0
    return NoisyBatch(x_t, t, target)


def _noise_coefficients(scheduler, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``√ᾱ_t`` and ``√(1−ᾱ_t)`` shaped ``(B, 1, 1, 1)``, in ``x0``'s dtype (diffusers' arithmetic)."""
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise ValueError(
            f"{type(scheduler).__name__} has no alphas_cumprod; pass a DDPM-family training scheduler "
            "(e.g. DDPMScheduler with the model's prediction_type and betas)."
        )
    alpha_bar = alphas_cumprod.to(x0.device, x0.dtype)[t].flatten()
    shape = (-1, *([1] * (x0.ndim - 1)))  # (B, 1, 1, 1)
    return (alpha_bar**0.5).reshape(shape), ((1 - alpha_bar) ** 0.5).reshape(shape)


def min_snr_weight(alpha_bar: float, gamma: float, kind: str) -> float:
    """Min-SNR-γ loss weight (Hang et al., ICCV 2023) of one timestep, for a loss on ``kind``'s output.

    With ``SNR = ᾱ / (1 − ᾱ)`` the weight that turns each parameterisation's MSE into the same
    ``min(SNR, γ)``-weighted x₀ error is ``min(SNR, γ) / SNR`` (ε), ``min(SNR, γ) / (SNR + 1)`` (v) and
    ``min(SNR, γ)`` (x₀).

    Raises:
        ValueError: flow matching (σ-parameterised; min-SNR is not defined here) or an unknown kind.
    """
    if kind == FLOW_MATCHING:
        raise ValueError(
            "min-SNR-γ weighting is defined for epsilon, v_prediction and sample models; a flow-matching "
            "model has no ᾱ_t table. Use snr_gamma=None."
        )
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = min(snr, gamma)
    if kind == "epsilon":
        return clipped / snr
    if kind == "v_prediction":
        return clipped / (snr + 1.0)
    if kind == "sample":
        return clipped
    raise ValueError(f"unknown prediction type {kind!r}; expected one of {PREDICTION_TYPES}.")
