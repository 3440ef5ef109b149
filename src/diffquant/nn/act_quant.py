"""Input-activation quantizers for quantized layers.

A quantizer is a module applied to a layer's input. In the reference path it *fake-quantizes*
(quantize → dequantize) so the layer computes with exactly the values an integer kernel would see.
Quantizers register themselves by ``mode`` name; :func:`build_activation_quantizer` builds one from
an :class:`~diffquant.config.ActivationQuantConfig`, so adding a mode never edits a central switch.

- ``static``: one range per layer (per tensor), chosen from calibration data by min-max,
  percentile or MSE search (PyTorch static PTQ; Q-Diffusion).
- ``dynamic``: per-token ranges computed on the fly (a token is one row of a Linear input, one pixel
  across channels of a Conv2d input).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from diffquant.config import ActivationQuantConfig
from diffquant.quant import affine


class ActivationQuantizer(nn.Module):
    """Base class. ``channel_dim`` is the feature axis of the input (-1 for Linear, 1 for Conv2d)."""

    mode: ClassVar[str]
    registry: ClassVar[dict[str, type[ActivationQuantizer]]] = {}
    needs_calibration: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "mode" in cls.__dict__:  # shared bases without a mode of their own are not registered
            ActivationQuantizer.registry[cls.mode] = cls

    def __init__(self, config: ActivationQuantConfig, channel_dim: int):
        super().__init__()
        self.config = config
        self.channel_dim = channel_dim
        self.qmin, self.qmax = affine.int_range(config.bits, config.symmetric)

    _observing = False  # calibrating quantizers observe their inputs and pass them through

    def stop_observing(self) -> None:
        """Leave observation mode without fixing any range (used when calibration fails)."""
        self._observing = False

    def integer_qparams(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """The ``(scale, zero_point)`` this call's forward would fake-quantize ``x`` with, broadcastable
        against ``x`` and in ``x``'s dtype — what an integer kernel needs to quantize ``x`` itself —
        or None when the quantizer cannot serve one now (observing, uncalibrated, no such form).
        """
        return None

    def meta(self) -> dict[str, Any]:
        """JSON description used to rebuild the quantizer before loading a checkpoint."""
        return {"config": self.config.to_dict(), "channel_dim": self.channel_dim}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> ActivationQuantizer:
        """Allocate an uncalibrated quantizer described by :meth:`meta`, with buffers shaped for
        ``load_state_dict`` (subclasses with data-dependent sizes override this)."""
        return cls(ActivationQuantConfig.from_dict(meta["config"]), meta["channel_dim"])

    def extra_repr(self) -> str:
        return f"mode={self.mode}, bits={self.config.bits}, symmetric={self.config.symmetric}"


def _quantizer_class(mode: str) -> type[ActivationQuantizer]:
    cls = ActivationQuantizer.registry.get(mode)
    if cls is None:
        raise ValueError(
            f"unknown activation mode {mode!r}; registered modes: {sorted(ActivationQuantizer.registry)}."
        )
    return cls


def build_activation_quantizer(config: ActivationQuantConfig, channel_dim: int) -> ActivationQuantizer:
    """Instantiate the registered quantizer for ``config.mode``.

    Raises:
        ValueError: when no quantizer is registered under ``config.mode``.
    """
    return _quantizer_class(config.mode)(config, channel_dim)


def quantizer_from_meta(meta: dict[str, Any]) -> ActivationQuantizer:
    """Rebuild an (uncalibrated) quantizer from :meth:`ActivationQuantizer.meta`."""
    return _quantizer_class(ActivationQuantConfig.from_dict(meta["config"]).mode).from_meta(meta)


def sample_values(flat: Tensor, n: int, seed: int) -> Tensor:
    """``n`` values of the 1-D ``flat`` drawn with replacement, on the CPU.

    The indices come from a CPU generator, so calibration picks the same values on every device.
    """
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(flat.numel(), (min(flat.numel(), n),), generator=gen)
    return flat[idx.to(flat.device)].cpu()


def _check_finite(x: Tensor, where: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(
            f"calibration inputs reaching {where} contain NaN/Inf; check the calibration data "
            "and the float model (it must produce finite activations)."
        )


class StaticActivationQuantizer(ActivationQuantizer):
    """One (scale, zero point) per layer, fixed after calibration.

    Calibration protocol: :meth:`start_calibration`, run representative inputs (the float values
    pass through unchanged and are observed), then :meth:`finish_calibration`.

    Buffers:
        scale: ``float32 (1,)``; zero_point: ``float32 (1,)``; calibrated: ``bool ()``.
    """

    mode = "static"
    needs_calibration = True
    max_samples: ClassVar[int] = 1 << 18  # values kept for percentile / MSE range search
    samples_per_batch: ClassVar[int] = 1 << 14

    def __init__(self, config: ActivationQuantConfig, channel_dim: int):
        super().__init__(config, channel_dim)
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1))
        self.register_buffer("calibrated", torch.tensor(False))
        self._observing = False
        self._lo: Tensor | None = None
        self._hi: Tensor | None = None
        self._samples: list[Tensor] = []
        self.name = "activation quantizer"

    def start_calibration(self, name: str = "activation quantizer") -> None:
        """Enter observation mode (inputs pass through unquantized and are recorded)."""
        self._observing, self._lo, self._hi, self._samples, self.name = True, None, None, [], name

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        _check_finite(x, self.name)
        flat = x.detach().reshape(-1).float()
        lo, hi = flat.min(), flat.max()
        self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)
        if self.config.range_method != "minmax" and sum(s.numel() for s in self._samples) < self.max_samples:
            self._samples.append(sample_values(flat, self.samples_per_batch, seed=len(self._samples)))

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Fix scale / zero point from what was observed.

        Raises:
            ValueError: if no data reached this layer during calibration.
        """
        if self._lo is None:
            raise ValueError(
                f"calibration ran no data through {self.name}; the calibrate function must run the "
                "model on at least one representative batch (empty calibration data?)."
            )
        if self.config.range_method == "minmax":
            values = torch.stack([self._lo, self._hi]).reshape(
                1, 2
            )  # (1, 2): min-max of these = observed range
        else:
            values = torch.cat([*self._samples, self._lo.reshape(1).cpu(), self._hi.reshape(1).cpu()])
            values = values.reshape(1, -1)  # (1, n) one "channel" of samples
        kwargs = {"percentile": self.config.percentile} if self.config.range_method == "percentile" else {}
        scale, zero_point = affine.choose_qparams(
            values.float(),
            self.config.bits,
            self.config.symmetric,
            "tensor",
            None,
            self.config.range_method,
            **kwargs,
        )
        self.scale.copy_(scale.reshape(1))
        self.zero_point.copy_(zero_point.reshape(1).float())
        self.calibrated.fill_(True)
        self._observing, self._lo, self._hi, self._samples = False, None, None, []

    def integer_qparams(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        if self._observing or not bool(self.calibrated):
            return None
        return self.scale.to(x.dtype), self.zero_point.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self._observing:
            self._observe(x)
            return x
        if not torch.compiler.is_compiling() and not bool(self.calibrated):  # no graph break when compiled
            raise RuntimeError(
                f"{self.name} uses static activation ranges but was never calibrated; pass "
                "calibrate=fn to diffquant.quantize_ (fn runs the model on representative inputs)."
            )
        return affine.fake_quantize(
            x, self.scale.to(x.dtype), self.zero_point.to(x.dtype), self.qmin, self.qmax
        )


class DynamicActivationQuantizer(ActivationQuantizer):
    """Per-token min-max ranges computed from each input on the fly (no calibration)."""

    mode = "dynamic"

    def integer_qparams(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dim = self.channel_dim % x.ndim
        lo = x.detach().amin(dim=dim, keepdim=True)  # one range per token
        hi = x.detach().amax(dim=dim, keepdim=True)
        scale, zero_point = affine.qparams_from_range(lo, hi, self.config.bits, self.config.symmetric)
        return scale.to(x.dtype), zero_point.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        scale, zero_point = self.integer_qparams(x)
        return affine.fake_quantize(x, scale, zero_point, self.qmin, self.qmax)
