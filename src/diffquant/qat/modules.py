"""Quantization-aware training layers: :class:`QATLinear` and :class:`QATConv2d`.

A QAT layer keeps a float, trainable weight and bias and *fake-quantizes* in its forward pass
(Jacob et al., CVPR 2018; PyTorch eager-mode QAT):

- the **weight** per output channel (or per group / per tensor, as the :class:`WeightQuantConfig`
  says), affine, with either min-max *observer* ranges recomputed from the current weight at every
  forward (straight-through gradient for the weight) or *LSQ* step sizes and zero points learned by
  gradient descent (Esser et al., ICLR 2020; LSQ+, Bhalgat et al. 2020), initialised from the
  configured range choice;
- the **input activations** per tensor, affine, with either an *observer* (an exponential moving
  average of the batch min / max, updated in training mode and frozen in eval mode; Krishnamoorthi
  2018, §3) or an *LSQ* scale and zero point initialised from the min / max of the first training batch.

:meth:`to_quantized` turns a trained layer into a :class:`~diffquant.nn.qmodules.QuantLinear` /
:class:`~diffquant.nn.qmodules.QuantConv2d` whose packed codes and static activation range are exactly
the ones the eval-mode forward uses, so both compute identical outputs.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from diffquant.config import ActivationQuantConfig, WeightQuantConfig
from diffquant.nn.act_quant import StaticActivationQuantizer
from diffquant.nn.packed import IntPackedWeight
from diffquant.nn.qmodules import QuantConv2d, QuantLinear, _QuantLayer
from diffquant.quant import affine
from diffquant.quant.ste import fake_quantize_ste, lsq_fake_quantize

__all__ = [
    "RANGE_MODES",
    "ActivationFakeQuantizer",
    "LSQActivationFakeQuantizer",
    "LSQWeightFakeQuantizer",
    "ObserverActivationFakeQuantizer",
    "ObserverWeightFakeQuantizer",
    "QATConv2d",
    "QATLinear",
    "WeightFakeQuantizer",
    "is_qat_layer",
]

_MIN_STEP = 1e-8  # learned step sizes are used as |s|, floored here so a step that crosses 0 stays usable


def _range_class(registry: dict[str, type], what: str, mode: str) -> type:
    cls = registry.get(mode)
    if cls is None:
        raise ValueError(f"{what}={mode!r} is not supported; choose one of {', '.join(map(repr, registry))}.")
    return cls


def _positive(step: Tensor) -> Tensor:
    return step.abs().clamp_min(_MIN_STEP)


class WeightFakeQuantizer(nn.Module):
    """Affine fake quantization of one weight, viewed as ``(out, in*kh*kw)``.

    One subclass per range mode — :class:`ObserverWeightFakeQuantizer` (``"observer"``: ranges from
    the current weight at every forward) and :class:`LSQWeightFakeQuantizer` (``"lsq"``: learned) —
    picked once by :meth:`create`.

    Args:
        weight: the layer's initial float weight (LSQ initialises its step sizes from it).
        config: INT format, bits, symmetry, granularity and range choice (``config.for_layer`` applied).

    Raises:
        ValueError: for a non-INT format, an unknown range mode, or a group size that does not divide
            the layer's inputs.
    """

    range_mode: ClassVar[str]
    registry: ClassVar[dict[str, type[WeightFakeQuantizer]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        WeightFakeQuantizer.registry[cls.range_mode] = cls

    @staticmethod
    def create(
        weight: Tensor, config: WeightQuantConfig, range_mode: str = "observer"
    ) -> WeightFakeQuantizer:
        """The fake quantizer of ``range_mode`` (a key of :attr:`registry`) for ``weight``."""
        return _range_class(WeightFakeQuantizer.registry, "weight_range", range_mode)(weight, config)

    def __init__(self, weight: Tensor, config: WeightQuantConfig):
        super().__init__()
        if config.format != "int":
            raise ValueError(
                f"QAT fake-quantizes affine INT weights, got format={config.format!r}; use "
                "WeightQuantConfig(format='int', bits=2..8)."
            )
        self.config = config.for_layer(weight[0].numel())
        self.qmin, self.qmax = affine.int_range(self.config.bits, self.config.symmetric)

    def _observe(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        w2d = weight.detach().reshape(weight.shape[0], -1).float()  # (out, in*kh*kw)
        c = self.config
        return affine.choose_qparams(w2d, c.bits, c.symmetric, c.granularity, c.group_size, c.range_method)

    @torch.no_grad()
    def init_range(self, weight: Tensor) -> None:
        """Re-initialise learned step sizes / zero points from ``weight`` (no-op for observers)."""

    def qparams(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """``(scale float32, zero_point int32)``, each ``(out|1, n_groups)``: what the forward uses."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        c = self.config
        return f"range={self.range_mode}, bits={c.bits}, symmetric={c.symmetric}, granularity={c.granularity}"


class ObserverWeightFakeQuantizer(WeightFakeQuantizer):
    """Min-max (or the configured range choice) of the current weight at every forward;
    straight-through gradient for the weight."""

    range_mode = "observer"

    def __init__(self, weight: Tensor, config: WeightQuantConfig):
        super().__init__(weight, config)
        self._observe(weight)  # validates granularity / group size now

    @torch.no_grad()
    def qparams(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return self._observe(weight)

    def forward(self, weight: Tensor) -> Tensor:
        w2d = weight.reshape(weight.shape[0], -1)  # (out, in*kh*kw)
        scale, zero_point = self.qparams(weight)
        wg = affine.reshape_groups(w2d, scale.shape[1])  # (out, n_groups, group_size)
        out = fake_quantize_ste(wg, scale[..., None], zero_point.float()[..., None], self.qmin, self.qmax)
        return out.reshape(weight.shape)


class LSQWeightFakeQuantizer(WeightFakeQuantizer):
    """Step sizes and zero points learned by gradient descent (LSQ, Esser et al., ICLR 2020; LSQ+),
    initialised from the configured range choice.

    Parameters:
        step: ``float32 (out|1, n_groups)``, used as ``|step|``.
        zero_point: ``float32 (out|1, n_groups)``, learned when asymmetric (rounded and clamped to the
            code range in the forward); a zero buffer when symmetric.
    """

    range_mode = "lsq"

    def __init__(self, weight: Tensor, config: WeightQuantConfig):
        super().__init__(weight, config)
        scale, zero_point = self._observe(weight)  # validates granularity / group size now
        self.step = nn.Parameter(scale)
        if self.config.symmetric:
            self.register_buffer("zero_point", torch.zeros_like(scale))
        else:
            self.zero_point = nn.Parameter(zero_point.float())

    @torch.no_grad()
    def init_range(self, weight: Tensor) -> None:
        scale, zero_point = self._observe(weight)
        self.step.copy_(scale)
        self.zero_point.copy_(zero_point.float())

    @torch.no_grad()
    def qparams(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        zero_point = torch.round(self.zero_point.clamp(self.qmin, self.qmax)).to(torch.int32)
        return _positive(self.step).detach().clone(), zero_point

    def forward(self, weight: Tensor) -> Tensor:
        w2d = weight.reshape(weight.shape[0], -1)  # (out, in*kh*kw)
        wg = affine.reshape_groups(w2d, self.step.shape[1])  # (out, n_groups, group_size)
        step = _positive(self.step)[..., None]  # (out|1, n_groups, 1)
        zero_point = self.zero_point.clamp(self.qmin, self.qmax)[..., None]
        return lsq_fake_quantize(wg, step, zero_point, self.qmin, self.qmax).reshape(weight.shape)


class ActivationFakeQuantizer(nn.Module):
    """Per-tensor affine fake quantization of a layer's input.

    One subclass per range mode, picked once by :meth:`create`: :class:`ObserverActivationFakeQuantizer`
    (``"observer"``) and :class:`LSQActivationFakeQuantizer` (``"lsq"``).

    Args:
        config: bits and symmetry (``mode="static"``, ``range_method="minmax"``).
        averaging_constant: weight of each new batch in the observer's moving average (PyTorch's
            ``MovingAverageMinMaxObserver`` default 0.01).

    Buffers:
        initialized: ``bool ()``.

    Raises:
        ValueError: for a non-static mode, a range method other than min-max, an unknown range mode,
            or an averaging constant outside (0, 1].
    """

    range_mode: ClassVar[str]
    registry: ClassVar[dict[str, type[ActivationFakeQuantizer]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        ActivationFakeQuantizer.registry[cls.range_mode] = cls

    @staticmethod
    def create(
        config: ActivationQuantConfig, range_mode: str = "observer", averaging_constant: float = 0.01
    ) -> ActivationFakeQuantizer:
        """The fake quantizer of ``range_mode`` (a key of :attr:`registry`)."""
        cls = _range_class(ActivationFakeQuantizer.registry, "act_range", range_mode)
        return cls(config, averaging_constant)

    def __init__(self, config: ActivationQuantConfig, averaging_constant: float = 0.01):
        super().__init__()
        if config.mode != "static" or config.range_method != "minmax":
            raise ValueError(
                f"QAT learns one static min-max activation range per layer, got mode={config.mode!r}, "
                f"range_method={config.range_method!r}; use ActivationQuantConfig(mode='static', "
                "range_method='minmax') or activations=None (weight-only QAT)."
            )
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}.")
        self.config = config
        self.averaging_constant = float(averaging_constant)
        self.qmin, self.qmax = affine.int_range(config.bits, config.symmetric)
        self.register_buffer("initialized", torch.tensor(False))

    def _observes(self) -> bool:
        """Whether a training batch updates the range now."""
        raise NotImplementedError

    def _update_range(self, lo: Tensor, hi: Tensor) -> None:
        raise NotImplementedError

    def _fake_quantize(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        lo, hi = x.detach().min().float().reshape(1), x.detach().max().float().reshape(1)
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            raise ValueError(
                "inputs of a QAT layer contain NaN/Inf; lower the learning rate or check the data."
            )
        self._update_range(lo, hi)
        self.initialized.fill_(True)

    def _require_initialized(self) -> None:
        if not bool(self.initialized):
            raise RuntimeError(
                "a QAT activation quantizer has seen no data yet: run at least one forward pass in "
                "training mode (model.train()) before evaluating or converting the model."
            )

    def qparams(self) -> tuple[Tensor, Tensor]:
        """``(scale float32 (1,), zero_point float32 (1,) integer-valued)``: what the forward uses."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self._observes():
            self._observe(x)
        self._require_initialized()
        return self._fake_quantize(x)

    def to_static(self, channel_dim: int) -> StaticActivationQuantizer:
        """A calibrated :class:`~diffquant.nn.act_quant.StaticActivationQuantizer` with this range."""
        scale, zero_point = self.qparams()
        static = StaticActivationQuantizer(self.config, channel_dim).to(scale.device)
        static.scale.copy_(scale)
        static.zero_point.copy_(zero_point)
        static.calibrated.fill_(True)
        return static

    def extra_repr(self) -> str:
        return f"range={self.range_mode}, bits={self.config.bits}, symmetric={self.config.symmetric}"


class ObserverActivationFakeQuantizer(ActivationFakeQuantizer):
    """In training mode each batch's min / max update an exponential moving average (the first batch
    sets it); in eval mode the range is frozen (Krishnamoorthi 2018, §3).

    Buffers:
        min_val, max_val: ``float32 (1,)``.
    """

    range_mode = "observer"

    def __init__(self, config: ActivationQuantConfig, averaging_constant: float = 0.01):
        super().__init__(config, averaging_constant)
        self.register_buffer("min_val", torch.zeros(1))
        self.register_buffer("max_val", torch.zeros(1))

    def _observes(self) -> bool:
        return True

    def _update_range(self, lo: Tensor, hi: Tensor) -> None:
        if bool(self.initialized):
            self.min_val.add_(self.averaging_constant * (lo - self.min_val))
            self.max_val.add_(self.averaging_constant * (hi - self.max_val))
        else:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)

    @torch.no_grad()
    def qparams(self) -> tuple[Tensor, Tensor]:
        self._require_initialized()
        scale, zero_point = affine.qparams_from_range(
            self.min_val, self.max_val, self.config.bits, self.config.symmetric
        )
        return scale, zero_point.float()

    def _fake_quantize(self, x: Tensor) -> Tensor:
        scale, zero_point = self.qparams()
        return fake_quantize_ste(x, scale.to(x.dtype), zero_point.to(x.dtype), self.qmin, self.qmax)


class LSQActivationFakeQuantizer(ActivationFakeQuantizer):
    """Scale and zero point are parameters, set from the first training batch's min / max and then
    learned (LSQ / LSQ+).

    Parameters:
        step: ``float32 (1,)`` used as ``|step|``; zero_point: ``float32 (1,)`` learned when
            asymmetric (a zero buffer when symmetric).
    """

    range_mode = "lsq"

    def __init__(self, config: ActivationQuantConfig, averaging_constant: float = 0.01):
        super().__init__(config, averaging_constant)
        self.step = nn.Parameter(torch.ones(1))
        if config.symmetric:
            self.register_buffer("zero_point", torch.zeros(1))
        else:
            self.zero_point = nn.Parameter(torch.zeros(1))

    def _observes(self) -> bool:
        return not bool(self.initialized)  # the first batch initialises the learned range

    def _update_range(self, lo: Tensor, hi: Tensor) -> None:
        scale, zero_point = affine.qparams_from_range(lo, hi, self.config.bits, self.config.symmetric)
        self.step.copy_(scale)
        self.zero_point.copy_(zero_point.float())

    @torch.no_grad()
    def qparams(self) -> tuple[Tensor, Tensor]:
        self._require_initialized()
        return _positive(self.step).detach().clone(), torch.round(self.zero_point.clamp(self.qmin, self.qmax))

    def _fake_quantize(self, x: Tensor) -> Tensor:
        step = _positive(self.step).to(x.dtype)
        zero_point = self.zero_point.clamp(self.qmin, self.qmax).to(x.dtype)
        return lsq_fake_quantize(x, step, zero_point, self.qmin, self.qmax)


RANGE_MODES = tuple(WeightFakeQuantizer.registry)
"""``observer``: ranges measured from the data (min-max), ``lsq``: ranges learned (LSQ / LSQ+)."""


class _QATLayer:
    """Shared parts of :class:`QATLinear` and :class:`QATConv2d` (mixed into the float layer class)."""

    quant_class: ClassVar[type[_QuantLayer]]
    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_fake_quant(
        self,
        weights: WeightQuantConfig,
        activations: ActivationQuantConfig | None,
        weight_range: str,
        act_range: str,
        averaging_constant: float,
    ) -> None:
        if not isinstance(weights, WeightQuantConfig):
            raise TypeError(f"weights must be a WeightQuantConfig, got {type(weights).__name__}.")
        if activations is not None and not isinstance(activations, ActivationQuantConfig):
            raise TypeError(
                f"activations must be an ActivationQuantConfig or None, got {type(activations).__name__}."
            )
        self.weight_fake_quant = WeightFakeQuantizer.create(self.weight, weights, weight_range)
        self.input_fake_quant = (
            ActivationFakeQuantizer.create(activations, act_range, averaging_constant).to(self.weight.device)
            if activations is not None
            else None
        )

    @classmethod
    def _from_float(cls, module: nn.Module, layer: _QATLayer) -> _QATLayer:
        with torch.no_grad():
            layer.weight.copy_(module.weight)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
        layer.weight_fake_quant.init_range(layer.weight)
        return layer.train(module.training)

    def _fake_quant_input_and_weight(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.input_fake_quant is not None:
            x = self.input_fake_quant(x)
        return x, self.weight_fake_quant(self.weight)

    @property
    def is_initialized(self) -> bool:
        """False while the input quantizer has seen no training batch (the layer cannot convert yet)."""
        return self.input_fake_quant is None or bool(self.input_fake_quant.initialized)

    @torch.no_grad()
    def to_quantized(self) -> _QuantLayer:
        """The equivalent :class:`QuantLinear` / :class:`QuantConv2d`: weight codes from the current
        fake-quantization parameters, the input range as a calibrated static quantizer.

        Raises:
            RuntimeError: if the input quantizer has seen no training batch.
        """
        wq = self.weight_fake_quant
        c = wq.config
        scale, zero_point = wq.qparams(self.weight)
        w2d = self.weight.detach().reshape(self.weight.shape[0], -1).float()  # (out, in*kh*kw)
        codes = affine.quantize_weight(w2d, scale, zero_point, c.bits, c.symmetric)
        qweight = IntPackedWeight.from_codes(
            tuple(self.weight.shape), codes, scale, zero_point, c.bits, c.symmetric
        )
        input_quant = (
            self.input_fake_quant.to_static(self.quant_class.channel_dim)
            if self.input_fake_quant is not None
            else None
        )
        layer = self.quant_class.from_float(self, c, None, qweight=qweight)
        layer.input_quant = input_quant
        return layer


class QATLinear(_QATLayer, nn.Linear):
    """:class:`torch.nn.Linear` trained through fake quantization; :meth:`to_quantized` gives a
    :class:`QuantLinear`.

    Args:
        in_features, out_features, bias: as for ``nn.Linear``.
        weights: weight quantization (INT, 2..8 bits).
        activations: input quantization (static per tensor), or ``None`` for weight-only QAT.
        weight_range, act_range: ``"observer"`` or ``"lsq"`` (see :data:`RANGE_MODES`).
        averaging_constant: the activation observer's moving-average weight.

    Example:
        >>> acts = ActivationQuantConfig(bits=8)
        >>> lin = QATLinear.from_float(nn.Linear(16, 8), WeightQuantConfig(bits=4), acts)
        >>> y = lin(torch.randn(4, 16))  # training mode: observes, fake-quantizes
        >>> q = lin.eval().to_quantized()
        >>> torch.equal(q(torch.ones(2, 16)), lin(torch.ones(2, 16)))
        True
    """

    quant_class = QuantLinear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weights: WeightQuantConfig,
        activations: ActivationQuantConfig | None = None,
        weight_range: str = "observer",
        act_range: str = "observer",
        averaging_constant: float = 0.01,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_fake_quant(weights, activations, weight_range, act_range, averaging_constant)

    @classmethod
    def from_float(
        cls,
        module: nn.Linear,
        weights: WeightQuantConfig,
        activations: ActivationQuantConfig | None = None,
        *,
        weight_range: str = "observer",
        act_range: str = "observer",
        averaging_constant: float = 0.01,
    ) -> QATLinear:
        """A QAT copy of ``module`` (same weights, device and dtype)."""
        layer = cls(
            module.in_features,
            module.out_features,
            module.bias is not None,
            weights=weights,
            activations=activations,
            weight_range=weight_range,
            act_range=act_range,
            averaging_constant=averaging_constant,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        return cls._from_float(module, layer)

    def forward(self, x: Tensor) -> Tensor:
        x, weight = self._fake_quant_input_and_weight(x)
        return F.linear(x, weight, self.bias)


class QATConv2d(_QATLayer, nn.Conv2d):
    """:class:`torch.nn.Conv2d` trained through fake quantization; :meth:`to_quantized` gives a
    :class:`QuantConv2d`. Arguments as for ``nn.Conv2d`` (``padding_mode="zeros"`` only) plus those of
    :class:`QATLinear`. Fold a following BatchNorm first (:func:`diffquant.qat.fuse_conv_bn`).
    """

    quant_class = QuantConv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        weights: WeightQuantConfig,
        activations: ActivationQuantConfig | None = None,
        weight_range: str = "observer",
        act_range: str = "observer",
        averaging_constant: float = 0.01,
        device=None,
        dtype=None,
    ):
        if padding_mode != "zeros":
            raise ValueError(
                f"QAT convolutions support padding_mode='zeros' only (like QuantConv2d), "
                f"got {padding_mode!r}; "
                "exclude this layer (QuantConfig.exclude) to keep it in full precision."
            )
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self._init_fake_quant(weights, activations, weight_range, act_range, averaging_constant)

    @classmethod
    def from_float(
        cls,
        module: nn.Conv2d,
        weights: WeightQuantConfig,
        activations: ActivationQuantConfig | None = None,
        *,
        weight_range: str = "observer",
        act_range: str = "observer",
        averaging_constant: float = 0.01,
    ) -> QATConv2d:
        """A QAT copy of ``module`` (same weights, geometry, device and dtype)."""
        layer = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            module.padding_mode,
            weights=weights,
            activations=activations,
            weight_range=weight_range,
            act_range=act_range,
            averaging_constant=averaging_constant,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        return cls._from_float(module, layer)

    def forward(self, x: Tensor) -> Tensor:
        x, weight = self._fake_quant_input_and_weight(x)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


QAT_LAYER_FOR: dict[type[nn.Module], type[_QATLayer]] = {nn.Linear: QATLinear, nn.Conv2d: QATConv2d}


def qat_layer_class(module: nn.Module) -> type[_QATLayer] | None:
    """The QAT class that replaces ``module`` (subclasses of Linear/Conv2d included), or None."""
    for base, cls in QAT_LAYER_FOR.items():
        if isinstance(module, base):
            return cls
    return None


def is_qat_layer(module: nn.Module) -> bool:
    """True for :class:`QATLinear` / :class:`QATConv2d`."""
    return isinstance(module, _QATLayer)
