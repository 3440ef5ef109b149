"""Shared parts of the timestep-aware activation quantizers: per-sample parameters and calibration.

The activation range of a diffusion model's layers moves with the noise level (TDQ, So et al.,
NeurIPS 2023). The quantizers built on :class:`TimestepActivationQuantizer` read the noise level of
the current denoiser call from :func:`diffquant.noise.require_noise_level` — one timestep (and
log-SNR) per sample, never a call counter — and quantize **each sample** with its own
``(scale, zero_point)``. A batch may therefore mix noise levels: classifier-free guidance runs
cond/uncond as one doubled batch, multi-evaluation solvers call the model twice per step, training
batches draw a timestep per sample.

The batch is dim 0 of the input (``(N, C, H, W)`` for Conv2d, ``(B, ..., C)`` for Linear). An input
with ``k * B`` rows for a noise level of ``B`` samples is read batch-major, like diffusers'
``Attention.head_to_batch_dim`` ``(B, heads, ...) -> (B * heads, ...)``: rows ``i*k .. i*k + k - 1``
belong to sample ``i`` (see :func:`per_row`).

Calibration (:class:`ConditionRangeCollector`) groups the inputs of each sample by that sample's
condition value (timestep or log-SNR) and chooses one range per value with the config's range method
(min-max, percentile, MSE; as :class:`~diffquant.nn.act_quant.StaticActivationQuantizer` does for the
whole layer), plus the pooled (static) range over all of them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffquant.config import ActivationQuantConfig
from diffquant.nn.act_quant import ActivationQuantizer, _check_finite, sample_values
from diffquant.noise import NoiseLevel, require_noise_level
from diffquant.quant import affine, ste
from diffquant.quant.ranges import RANGE_METHODS


def per_row(values: Tensor, rows: int, where: str) -> Tensor:
    """Per-sample values ``(B,)`` repeated to the ``rows`` leading rows of an input, ``(rows,)``.

    ``rows == B`` returns ``values``; ``rows == k * B`` repeats each value ``k`` times in a row
    (``repeat_interleave``: the batch-major layout of diffusers' ``head_to_batch_dim``). A one-sample
    noise level (``noise_level(t)`` without ``batch_size``) therefore serves any batch.

    Raises:
        RuntimeError: when ``rows`` is not a multiple of ``B``.
    """
    batch = values.shape[0]
    if rows == batch:
        return values
    if batch > 0 and rows % batch == 0:
        return values.repeat_interleave(rows // batch)
    raise RuntimeError(
        f"{where}: the input has {rows} rows (dim 0) but the noise level has {batch} samples, and {rows} is "
        f"not a multiple of {batch}. Timestep-aware activation quantizers need the batch in dim 0 (or "
        "batch-major k*B rows, as diffusers' head_to_batch_dim produces); keep this layer out with "
        "QuantConfig.exclude, or use mode='static'."
    )


@dataclass(frozen=True, eq=False)
class ConditionRanges:
    """Calibrated input ranges, one per distinct condition value (timestep or log-SNR).

    Attributes:
        conditions: ``(K,)`` float32, sorted ascending.
        lo, hi: ``(K,)`` float32, the range the config's range method chose for the inputs of the
            samples at each condition.
        pooled_lo, pooled_hi: ``()`` float32, the same over all inputs (the static layer range).
    """

    conditions: Tensor
    lo: Tensor
    hi: Tensor
    pooled_lo: Tensor
    pooled_hi: Tensor


class ConditionRangeCollector:
    """Observes a layer's inputs per sample, grouped by each sample's condition value.

    Keeps a running min / max per value and, for the percentile and MSE range methods, a
    deterministic random subsample of up to :attr:`max_samples_per_condition` values per condition
    (on the CPU).

    Args:
        config: the activation config (bits, symmetric, range method, percentile).
        name: the layer name used in error messages.
    """

    max_samples_per_condition: ClassVar[int] = 1 << 14
    samples_per_batch: ClassVar[int] = 1 << 12
    max_pooled_samples: ClassVar[int] = 1 << 18

    def __init__(self, config: ActivationQuantConfig, name: str):
        self.config = config
        self.name = name
        self._lo: dict[float, float] = {}
        self._hi: dict[float, float] = {}
        self._samples: dict[float, list[Tensor]] = {}

    @property
    def _keeps_samples(self) -> bool:
        return self.config.range_method != "minmax"

    @torch.no_grad()
    def observe(self, x: Tensor, conditions: Tensor) -> None:
        """Record ``x`` (``(N, ...)``), whose row ``i`` belongs to condition value ``conditions[i]``.

        Raises:
            ValueError: if ``x`` contains NaN/Inf.
        """
        _check_finite(x, self.name)
        rows = x.detach().reshape(x.shape[0], -1).float()  # (N, D): one row per sample
        row_lo, row_hi = torch.aminmax(rows, dim=1)  # (N,) each
        keys, inverse = torch.unique(conditions.to(rows.device), return_inverse=True)
        for i, key in enumerate(keys.tolist()):
            mask = inverse == i
            lo, hi = row_lo[mask].min().item(), row_hi[mask].max().item()
            self._lo[key] = min(lo, self._lo.get(key, lo))
            self._hi[key] = max(hi, self._hi.get(key, hi))
            if not self._keeps_samples:
                continue
            kept = self._samples.setdefault(key, [])
            if sum(s.numel() for s in kept) >= self.max_samples_per_condition:
                continue
            flat = rows[mask].reshape(-1)
            kept.append(sample_values(flat, self.samples_per_batch, seed=len(kept)))

    def _range(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """The config's range method on a 1-D sample, as two 0-d tensors."""
        kwargs = {"percentile": self.config.percentile} if self.config.range_method == "percentile" else {}
        lo, hi = RANGE_METHODS[self.config.range_method](
            values.reshape(1, 1, -1), bits=self.config.bits, symmetric=self.config.symmetric, **kwargs
        )  # (1, 1) each
        return lo.reshape(()), hi.reshape(())

    def finish(self) -> ConditionRanges:
        """Choose the ranges from what was observed.

        Raises:
            ValueError: if no data reached the layer.
        """
        if not self._lo:
            raise ValueError(
                f"calibration ran no data through {self.name}; the calibrate function must run the "
                "model on at least one representative batch (empty calibration data?)."
            )
        keys = sorted(self._lo)
        lo = torch.tensor([self._lo[k] for k in keys], dtype=torch.float32)  # (K,) observed minima
        hi = torch.tensor([self._hi[k] for k in keys], dtype=torch.float32)  # (K,) observed maxima
        if not self._keeps_samples:
            return ConditionRanges(torch.tensor(keys, dtype=torch.float32), lo, hi, lo.min(), hi.max())
        # Each condition's sample plus its true extremes, as the static quantizer does for the layer.
        values = [torch.cat([*self._samples[k], lo[i : i + 1], hi[i : i + 1]]) for i, k in enumerate(keys)]
        per_condition = [self._range(v) for v in values]
        pooled = torch.cat(values)
        if pooled.numel() > self.max_pooled_samples:
            gen = torch.Generator().manual_seed(0)
            idx = torch.randperm(pooled.numel(), generator=gen)[: self.max_pooled_samples]
            pooled = torch.cat([pooled[idx], lo.min().reshape(1), hi.max().reshape(1)])
        pooled_lo, pooled_hi = self._range(pooled)
        return ConditionRanges(
            torch.tensor(keys, dtype=torch.float32),
            torch.stack([r[0] for r in per_condition]),
            torch.stack([r[1] for r in per_condition]),
            pooled_lo,
            pooled_hi,
        )


class TimestepActivationQuantizer(ActivationQuantizer):
    """Base of the quantizers whose ``(scale, zero_point)`` depend on each sample's noise level.

    Subclasses define :meth:`calibrate_from` (fix the parameters from :class:`ConditionRanges`),
    :meth:`qparams_for` (per-sample parameters for condition values) and :meth:`make_learnable`.
    The parameters of a denoiser call are computed once per :class:`~diffquant.noise.NoiseLevel`
    object (identity) and cached, so the layer calls of one denoiser call pay only a lookup.

    Calibration protocol, as for the static quantizer: :meth:`start_calibration`, run the model
    under a noise-level context on representative inputs at the timesteps the sampler uses (inputs
    pass through unchanged and are observed per sample), then :meth:`finish_calibration`.

    Buffers:
        calibrated: ``bool ()``.

    Attributes:
        learnable: whether the parameters are trainable (:meth:`make_learnable`); the forward then
            uses LSQ's straight-through gradients (:func:`diffquant.quant.ste.lsq_fake_quantize`).
    """

    needs_calibration = True
    uses_log_snr: ClassVar[bool] = False

    def __init__(self, config: ActivationQuantConfig, channel_dim: int):
        super().__init__(config, channel_dim)
        self.register_buffer("calibrated", torch.tensor(False))
        self.learnable = False
        self.name = "activation quantizer"
        self._observing = False
        self._collector: ConditionRangeCollector | None = None
        # (noise level, version counters of the tensors, scale (B,), zero point (B,)) of the last call.
        self._cache: tuple[NoiseLevel, tuple[int, ...], Tensor, Tensor] | None = None

    def condition(self, level: NoiseLevel) -> Tensor:
        """The per-sample value this quantizer is conditioned on: the timestep ``(B,)``."""
        return level.timestep

    def calibrate_from(self, ranges: ConditionRanges) -> None:
        """Fix the parameters from calibrated per-condition ranges."""
        raise NotImplementedError

    def qparams_for(self, conditions: Tensor) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)``, each ``(B,)`` float32, for condition values ``(B,)``."""
        raise NotImplementedError

    def make_learnable(self) -> TimestepActivationQuantizer:
        """Make the parameters trainable (TALSQ / TDQ training); returns ``self``."""
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "learnable": self.learnable}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> TimestepActivationQuantizer:
        quantizer = cls._allocate(ActivationQuantConfig.from_dict(meta["config"]), meta["channel_dim"], meta)
        return quantizer.make_learnable() if meta.get("learnable") else quantizer

    @classmethod
    def _allocate(
        cls, config: ActivationQuantConfig, channel_dim: int, meta: dict[str, Any]
    ) -> TimestepActivationQuantizer:
        """An uncalibrated quantizer with the tensor shapes recorded in ``meta``."""
        return cls(config, channel_dim)

    def start_calibration(self, name: str = "activation quantizer") -> None:
        """Enter observation mode (inputs pass through unquantized and are recorded per sample)."""
        self.name = name
        self._observing = True
        self._collector = ConditionRangeCollector(self.config, name)

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Fix the parameters from what was observed.

        Raises:
            ValueError: if no data reached this layer during calibration.
        """
        self._observing = False
        collector, self._collector = self._collector, None
        if collector is None:
            raise ValueError(f"{self.name}: call start_calibration() and run calibration data first.")
        self.calibrate_from(collector.finish())
        self.calibrated.fill_(True)
        self._cache = None

    def _cached_qparams(self, level: NoiseLevel) -> tuple[Tensor, Tensor]:
        versions = tuple(t._version for t in itertools.chain(self.parameters(), self.buffers()))
        cache = self._cache
        if cache is None or cache[0] is not level or cache[1] != versions:
            if not bool(self.calibrated):
                raise RuntimeError(
                    f"{self.name} uses per-timestep activation ranges (mode={self.mode!r}) but was never "
                    "calibrated; pass calibrate=fn to diffquant.quantize_ (fn runs the model on "
                    "representative inputs at the timesteps the sampler uses)."
                )
            scale, zero_point = self.qparams_for(self.condition(level))
            cache = self._cache = (level, versions, scale, zero_point)
        return cache[2], cache[3]

    def _apply(self, fn: Any, recurse: bool = True) -> TimestepActivationQuantizer:
        self._cache = None  # .to() / .half() replace the tensors the cached values came from
        return super()._apply(fn, recurse)

    def _row_qparams(self, x: Tensor, level: NoiseLevel) -> tuple[Tensor, Tensor]:
        """Each row's ``(scale, zero_point)``, ``(N, 1, ..., 1)`` in ``x``'s dtype."""
        rows = x.shape[0]
        scale, zero_point = self._cached_qparams(level)  # (B,) each
        shape = (rows,) + (1,) * (x.ndim - 1)
        scale = per_row(scale, rows, self.name).reshape(shape).to(x.dtype)  # (N, 1, ..., 1)
        zero_point = per_row(zero_point, rows, self.name).reshape(shape).to(x.dtype)
        return scale, zero_point

    def integer_qparams(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        if self._observing or x.ndim < 2:
            return None
        return self._row_qparams(x, require_noise_level(need_log_snr=self.uses_log_snr))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim < 2:
            raise RuntimeError(
                f"{self.name}: timestep-aware activation quantizers need a batch dimension (dim 0), got an "
                f"input of shape {tuple(x.shape)}; add one with x[None]."
            )
        level = require_noise_level(need_log_snr=self.uses_log_snr)
        rows = x.shape[0]
        if self._observing:
            self._collector.observe(x, per_row(self.condition(level), rows, self.name))
            return x
        scale, zero_point = self._row_qparams(x, level)
        if scale.requires_grad or zero_point.requires_grad:
            return ste.lsq_fake_quantize(x, scale, zero_point, self.qmin, self.qmax)
        return affine.fake_quantize(x, scale, zero_point, self.qmin, self.qmax)
