"""``mode="tdq"`` and ``mode="logsnr"``: an MLP maps the noise level to the activation range.

TDQ (So et al., "Temporal Dynamic Quantization for Diffusion Models", NeurIPS 2023): a small MLP
over a Fourier encoding of the timestep outputs the activation step size through a softplus,
initialised to the static calibrated value. Log-SNR TDQ (seed 003) feeds it
``log SNR(t) = log(ᾱ_t / (1 − ᾱ_t))`` instead, which is continuous and independent of the sampler and
its step count.

What the MLP predicts (our choice, for asymmetric as well as symmetric quantization): the two
extents of the zero-including input range, ``neg = -lo >= 0`` and ``pos = hi >= 0`` (symmetric: one
extent ``absmax``), each ``range_unit · softplus(output)`` where ``range_unit`` is the static span.
``(scale, zero_point) = qparams_from_range(-neg, pos)``, so the step size is ``(neg + pos) /
(qmax - qmin)`` — a sum of softplus outputs — and the zero point follows from the same range,
exactly like a calibrated range. Measuring outputs in units of the static span keeps the fit
independent of the layer's activation magnitude.

Post-training fitting (TDQ's PTQ variant): calibration gathers per-condition ranges exactly like the
step table; the last layer starts at weights 0 and bias ``softplus⁻¹(static extent / range_unit)``
(the static quantizer's range at every noise level), then :attr:`TDQActivationQuantizer.fit_steps`
full-batch Adam steps (cosine learning rate, fixed initial weights: deterministic) minimise the
squared extent error relative to each condition's span, at the calibrated conditions and on a
uniform grid where the targets interpolate linearly between calibrated neighbours (so wide gaps, such
as log-SNR's between ``t = 0`` and the next step, are bridged smoothly). The condition is mapped
affinely from its calibrated interval to ``[-1, 1]`` and clamped there, so noise levels beyond the
calibrated ones get the nearest calibrated end's range.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffquant.config import ActivationQuantConfig
from diffquant.nn.act_timestep import ConditionRanges, TimestepActivationQuantizer
from diffquant.noise import NoiseLevel
from diffquant.quant import affine

_MIN_EXTENT = 1e-4  # smallest initial extent, in units of the static span (softplus⁻¹ stays finite)


def inverse_softplus(y: Tensor) -> Tensor:
    """``x`` with ``softplus(x) = y`` for ``y > 0``: ``y + log(1 - exp(-y))``."""
    return y + torch.log(-torch.expm1(-y))


def _interpolate(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation ``(M, C)`` of ``fp (K, C)`` given at increasing ``xp (K,)``, K >= 2,
    at ``x (M,)`` (constant beyond the ends)."""
    i = torch.searchsorted(xp, x).clamp(1, xp.numel() - 1)  # (M,) right neighbour
    x0, x1 = xp[i - 1], xp[i]
    w = ((x - x0) / (x1 - x0).clamp(min=torch.finfo(torch.float32).tiny)).clamp(0.0, 1.0)
    return torch.lerp(fp[i - 1], fp[i], w[:, None])


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run tiny CPU work on one intra-op thread (restored afterwards): the fit's tensors are a few
    kilobytes, so extra threads only add synchronisation, which costs 100x on a busy machine."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class FourierMLP(nn.Module):
    """``u (K,) -> [u, sin(π f_j u), cos(π f_j u)] -> Linear -> SiLU -> Linear -> (K, out)``, in float32.

    Frequencies ``f_j = 2**j / 2`` for ``j < num_frequencies`` (periods 4, 2, 1, 0.5, ... on
    ``u ∈ [-1, 1]``). Raw parameters rather than ``nn.Linear`` children, so passes that look for
    Linear layers (targeting, adapters, bit counts) never pick up this MLP.

    Parameters:
        w1: ``(hidden, 1 + 2 * num_frequencies)``; b1: ``(hidden,)``; w2: ``(out, hidden)``; b2: ``(out,)``.
    """

    def __init__(self, num_frequencies: int, hidden: int, out_features: int):
        super().__init__()
        self.num_frequencies = num_frequencies
        self.w1 = nn.Parameter(torch.zeros(hidden, 1 + 2 * num_frequencies), requires_grad=False)
        self.b1 = nn.Parameter(torch.zeros(hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.zeros(out_features, hidden), requires_grad=False)
        self.b2 = nn.Parameter(torch.zeros(out_features), requires_grad=False)

    def features(self, u: Tensor) -> Tensor:
        """Fourier features ``(K, 1 + 2 * num_frequencies)`` of ``u (K,)``."""
        freqs = math.pi * 2.0 ** torch.arange(self.num_frequencies, device=u.device) / 2  # (F,)
        angles = u[:, None] * freqs  # (K, F)
        return torch.cat([u[:, None], angles.sin(), angles.cos()], dim=1)

    def head(self, features: Tensor) -> Tensor:
        """The two layers on precomputed :meth:`features` ``(K, in)`` -> ``(K, out)``."""
        h = F.silu(F.linear(features, self.w1.float(), self.b1.float()))  # (K, hidden)
        return F.linear(h, self.w2.float(), self.b2.float())

    def forward(self, u: Tensor) -> Tensor:
        return self.head(self.features(u.float()))

    @torch.no_grad()
    def reset(self, out_bias: Tensor, seed: int = 0) -> None:
        """First layer ``N(0, 1/fan_in)`` from a fixed seed, last layer weights 0 and bias ``out_bias``."""
        gen = torch.Generator().manual_seed(seed)
        w1 = torch.randn(self.w1.shape, generator=gen) / math.sqrt(self.w1.shape[1])
        self.w1.copy_(w1)
        self.b1.zero_()
        self.w2.zero_()
        self.b2.copy_(out_bias)


class TDQActivationQuantizer(TimestepActivationQuantizer):
    """Activation range predicted per sample by a Fourier-feature MLP of the timestep (TDQ).

    Evaluated once per denoiser call on the distinct noise levels of the batch and cached (see
    :class:`~diffquant.nn.act_timestep.TimestepActivationQuantizer`).

    Args:
        config: the activation config (``mode="tdq"`` or ``"logsnr"``).
        channel_dim: feature axis of the input.
        hidden: MLP width (default :attr:`hidden_default`).
        num_frequencies: Fourier frequencies (default :attr:`num_frequencies_default`).

    Buffers:
        cond_lo, cond_hi: ``float32 ()``, the calibrated condition interval (mapped to ``[-1, 1]``);
        range_unit: ``float32 ()``, the static span the MLP's extents are measured in;
        calibrated: ``bool ()``.

    Attributes:
        mlp: :class:`FourierMLP` with 1 output (symmetric) or 2 (asymmetric); frozen unless
            :meth:`make_learnable` is called.
        fit_steps: Adam steps of the post-calibration fit (0: keep the static initialisation).
        fit_lr: initial Adam learning rate of that fit.
        fit_grid: grid points in ``[-1, 1]`` where the fit also matches the linear interpolation of
            the calibrated ranges (log-SNR spacing is uneven: ``t = 0`` lies far from the rest).
        fit_loss: final fitting loss (mean squared extent error relative to each condition's span),
            or None before fitting.
    """

    mode = "tdq"
    hidden_default: ClassVar[int] = 32
    num_frequencies_default: ClassVar[int] = 4
    fit_steps: int = 400
    fit_lr: float = 0.02
    fit_grid: int = 64

    def __init__(
        self,
        config: ActivationQuantConfig,
        channel_dim: int,
        hidden: int | None = None,
        num_frequencies: int | None = None,
    ):
        super().__init__(config, channel_dim)
        hidden = self.hidden_default if hidden is None else hidden
        num_frequencies = self.num_frequencies_default if num_frequencies is None else num_frequencies
        self.mlp = FourierMLP(num_frequencies, hidden, 1 if config.symmetric else 2)
        self.register_buffer("cond_lo", torch.tensor(0.0))
        self.register_buffer("cond_hi", torch.tensor(0.0))
        self.register_buffer("range_unit", torch.tensor(1.0))
        self.fit_loss: float | None = None

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "hidden": self.mlp.w1.shape[0], "num_frequencies": self.mlp.num_frequencies}

    @classmethod
    def _allocate(
        cls, config: ActivationQuantConfig, channel_dim: int, meta: dict[str, Any]
    ) -> TDQActivationQuantizer:
        return cls(
            config, channel_dim, hidden=int(meta["hidden"]), num_frequencies=int(meta["num_frequencies"])
        )

    def normalized(self, conditions: Tensor) -> Tensor:
        """Conditions mapped from the calibrated interval to ``[-1, 1]`` (clamped), float32."""
        lo, hi = self.cond_lo.float(), self.cond_hi.float()
        half = ((hi - lo) / 2).clamp(min=torch.finfo(torch.float32).tiny)
        return ((conditions.float() - (lo + hi) / 2) / half).clamp(-1.0, 1.0)

    def extents(self, conditions: Tensor) -> Tensor:
        """Predicted range extents ``(K, 1)`` (symmetric: absmax) or ``(K, 2)`` (``-lo``, ``hi``)."""
        return self.range_unit.float() * F.softplus(self.mlp(self.normalized(conditions)))

    def qparams_for(self, conditions: Tensor) -> tuple[Tensor, Tensor]:
        """Scale and zero point for condition values ``(B,)``; the MLP runs on the distinct values only."""
        unique, inverse = torch.unique(
            conditions.to(self.range_unit.device, torch.float32), return_inverse=True
        )
        ext = self.extents(unique)  # (U, 1 | 2)
        neg, pos = ext[:, 0], ext[:, -1]
        scale, zero_point = affine.qparams_from_range(-neg, pos, self.config.bits, self.config.symmetric)
        return scale[inverse], zero_point[inverse].float()

    def calibrate_from(self, ranges: ConditionRanges) -> None:
        device = self.range_unit.device
        conditions = ranges.conditions.to(device)
        neg, pos = (-ranges.lo).clamp(min=0).to(device), ranges.hi.clamp(min=0).to(device)  # (K,) each
        static_neg, static_pos = (-ranges.pooled_lo).clamp(min=0), ranges.pooled_hi.clamp(min=0)
        if self.config.symmetric:
            targets = torch.maximum(neg, pos)[:, None]  # (K, 1)
            static = torch.maximum(static_neg, static_pos).reshape(1)
        else:
            targets = torch.stack([neg, pos], dim=1)  # (K, 2)
            static = torch.stack([static_neg, static_pos])
        unit = static.sum() if static.sum() > 0 else torch.tensor(1.0)
        self.cond_lo.fill_(conditions.min())
        self.cond_hi.fill_(conditions.max())
        self.range_unit.fill_(unit)
        self.mlp.reset(inverse_softplus((static / unit).clamp(min=_MIN_EXTENT)))
        self.fit_loss = None
        if conditions.numel() >= 2 and self.fit_steps > 0:  # one condition: the static range is exact
            self._fit(conditions, targets / unit)

    def _fit(self, conditions: Tensor, targets: Tensor) -> None:
        """Full-batch Adam on the extents (in units of ``range_unit``), relative to each span, at the
        calibrated conditions and on a uniform grid of :attr:`fit_grid` points where the targets are
        linearly interpolated between the two neighbouring calibrated conditions."""
        u = self.normalized(conditions)  # (K,) increasing
        grid = torch.linspace(-1.0, 1.0, self.fit_grid, device=u.device)  # (G,)
        u = torch.cat([u, grid])  # (K + G,)
        targets = torch.cat([targets, _interpolate(grid, u[: conditions.numel()], targets)])  # (K + G, out)
        features = self.mlp.features(u)  # (K + G, in), fixed during the fit
        span = targets.sum(dim=1, keepdim=True)  # (K + G, 1)
        span = torch.where(span > 0, span, torch.ones_like(span))

        def loss_fn() -> Tensor:
            return ((F.softplus(self.mlp.head(features)) - targets) / span).pow(2).sum(dim=1).mean()

        params = list(self.mlp.parameters())
        trainable = [p.requires_grad for p in params]
        with torch.enable_grad(), _one_cpu_thread(features.device):
            for p in params:
                p.requires_grad_(True)
            fused = features.device.type in ("cpu", "cuda")  # one kernel per step instead of a dozen
            optimizer = torch.optim.Adam(params, lr=self.fit_lr, fused=fused)
            for step in range(self.fit_steps):
                for group in optimizer.param_groups:
                    group["lr"] = self.fit_lr * 0.5 * (1 + math.cos(math.pi * step / self.fit_steps))
                optimizer.zero_grad(set_to_none=True)
                loss_fn().backward()
                optimizer.step()
            for p, flag in zip(params, trainable, strict=True):
                p.requires_grad_(flag)
                p.grad = None
        with torch.no_grad():
            self.fit_loss = loss_fn().item()

    def make_learnable(self) -> TDQActivationQuantizer:
        """Let the MLP train (TDQ's QAT variant: gradients reach it through LSQ's step gradient)."""
        self.learnable = True
        self.mlp.requires_grad_(True)
        return self

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, hidden={self.mlp.w1.shape[0]}, frequencies={self.mlp.num_frequencies}"
        )


class LogSnrTDQActivationQuantizer(TDQActivationQuantizer):
    """TDQ conditioned on each sample's log-SNR (seed 003); needs a schedule in the noise context
    (``attach_noise_context(model, scheduler)`` or ``quantize_(..., schedule=scheduler)``)."""

    mode = "logsnr"
    uses_log_snr = True

    def condition(self, level: NoiseLevel) -> Tensor:
        """The log-SNR ``(B,)`` of each sample."""
        return level.log_snr
