"""Quantized ``Linear`` and ``Conv2d``: a packed weight, the float bias, an optional input quantizer.

The reference forward is the readable path: fake-quantize the input, dequantize the packed weight
to the input's dtype, call the float op. At inference, :func:`diffquant.nn.kernel_dispatch.fast_forward`
runs an integer kernel instead where one is exact and measured faster (it agrees with this path up
to float rounding).
A deployed layer holds no calibration state: while quantizing, :mod:`diffquant.ptq.paths` keeps the
float weights and calibration switches in a side table.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffquant.config import ActivationQuantConfig, WeightQuantConfig
from diffquant.nn.act_quant import ActivationQuantizer, build_activation_quantizer, quantizer_from_meta
from diffquant.nn.kernel_dispatch import fast_forward
from diffquant.nn.packed import PackedWeight


class _QuantLayer(nn.Module):
    """Shared parts of :class:`QuantLinear` and :class:`QuantConv2d`."""

    channel_dim: int
    kind: str

    def __init__(self, qweight: PackedWeight, bias: Tensor | None, input_quant: ActivationQuantizer | None):
        super().__init__()
        self.qweight = qweight
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.input_quant = input_quant

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (a fresh float tensor; the stored form is ``qweight``)."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        return self.qweight.dequantize(dtype)

    def _quantize_input(self, x: Tensor) -> Tensor:
        return self.input_quant(x) if self.input_quant is not None else x

    def _weight_for(self, x: Tensor) -> Tensor:
        return self.qweight.dequantize(x.dtype)

    def meta(self) -> dict[str, Any]:
        """JSON description: enough to rebuild an empty layer and load its state dict."""
        return {
            "kind": self.kind,
            "layer": self._layer_args(),
            "has_bias": self.bias is not None,
            "weight": self.qweight.meta(),
            "input_quant": self.input_quant.meta() if self.input_quant is not None else None,
        }

    def _layer_args(self) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def from_meta(meta: dict[str, Any]) -> _QuantLayer:
        """Allocate an empty layer described by :meth:`meta` (weights are loaded afterwards)."""
        cls = {"linear": QuantLinear, "conv2d": QuantConv2d}.get(meta.get("kind"))
        if cls is None:
            raise ValueError(
                f"unknown quantized layer kind {meta.get('kind')!r}; expected 'linear' or 'conv2d'."
            )
        qweight = PackedWeight.from_meta(meta["weight"])
        out_channels = qweight.shape[0]
        bias = torch.zeros(out_channels) if meta["has_bias"] else None
        input_quant = quantizer_from_meta(meta["input_quant"]) if meta["input_quant"] else None
        return cls(qweight, bias, input_quant, **meta["layer"])


class QuantLinear(_QuantLayer):
    """Quantized drop-in for :class:`torch.nn.Linear`.

    Example:
        >>> lin = torch.nn.Linear(64, 32)
        >>> q = QuantLinear.from_float(lin, WeightQuantConfig(bits=8))
        >>> q(torch.randn(2, 64)).shape
        torch.Size([2, 32])
    """

    channel_dim = -1
    kind = "linear"

    def __init__(self, qweight, bias, input_quant, in_features: int, out_features: int):
        super().__init__(qweight, bias, input_quant)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_float(
        cls,
        module: nn.Linear,
        weights: WeightQuantConfig,
        activations: ActivationQuantConfig | None = None,
        qweight: PackedWeight | None = None,
    ) -> QuantLinear:
        """Quantize ``module`` (round-to-nearest unless a precomputed ``qweight`` is given)."""
        qweight = (
            qweight
            if qweight is not None
            else PackedWeight.from_float(module.weight, weights.for_layer(module.weight[0].numel()))
        )
        quant = build_activation_quantizer(activations, cls.channel_dim) if activations is not None else None
        return cls(qweight, module.bias, quant, module.in_features, module.out_features)

    def _layer_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features}

    def forward(self, x: Tensor) -> Tensor:
        return fast_forward(self, x, self._reference_forward)

    def _reference_forward(self, x: Tensor) -> Tensor:
        x = self._quantize_input(x)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self._weight_for(x), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, weight={self.qweight.meta()}"
        )


class QuantConv2d(_QuantLayer):
    """Quantized drop-in for :class:`torch.nn.Conv2d` (kernel flattened to ``(out, in*kh*kw)``)."""

    channel_dim = 1
    kind = "conv2d"

    def __init__(
        self, qweight, bias, input_quant, stride, padding, dilation, groups, padding_mode: str = "zeros"
    ):
        super().__init__(qweight, bias, input_quant)
        if padding_mode != "zeros":
            raise ValueError(
                f"QuantConv2d supports padding_mode='zeros' only, got {padding_mode!r}; "
                "exclude this layer (QuantConfig.exclude) to keep it in full precision."
            )
        self.stride, self.padding = tuple(stride), padding if isinstance(padding, str) else tuple(padding)
        self.dilation, self.groups = tuple(dilation), int(groups)
        self.out_channels = qweight.shape[0]
        self.in_channels = qweight.shape[1] * self.groups
        self.kernel_size = tuple(qweight.shape[2:])

    @classmethod
    def from_float(
        cls,
        module: nn.Conv2d,
        weights: WeightQuantConfig,
        activations: ActivationQuantConfig | None = None,
        qweight: PackedWeight | None = None,
    ) -> QuantConv2d:
        """Quantize ``module`` (round-to-nearest unless a precomputed ``qweight`` is given)."""
        qweight = (
            qweight
            if qweight is not None
            else PackedWeight.from_float(module.weight, weights.for_layer(module.weight[0].numel()))
        )
        quant = build_activation_quantizer(activations, cls.channel_dim) if activations is not None else None
        return cls(
            qweight,
            module.bias,
            quant,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.padding_mode,
        )

    def _layer_args(self) -> dict[str, Any]:
        padding = self.padding if isinstance(self.padding, str) else list(self.padding)
        return {
            "stride": list(self.stride),
            "padding": padding,
            "dilation": list(self.dilation),
            "groups": self.groups,
        }

    def forward(self, x: Tensor) -> Tensor:
        return fast_forward(self, x, self._reference_forward)

    def _reference_forward(self, x: Tensor) -> Tensor:
        x = self._quantize_input(x)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.conv2d(x, self._weight_for(x), bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"weight={self.qweight.meta()}"
        )


QUANT_LAYER_FOR: dict[type[nn.Module], type[_QuantLayer]] = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}


def quant_layer_class(module: nn.Module) -> type[_QuantLayer] | None:
    """The quantized class that replaces ``module`` (subclasses of Linear/Conv2d included), or None."""
    for base, qcls in QUANT_LAYER_FOR.items():
        if isinstance(module, base):
            return qcls
    return None


def is_quantized_layer(module: nn.Module) -> bool:
    """True for :class:`QuantLinear` / :class:`QuantConv2d`."""
    return isinstance(module, _QuantLayer)
