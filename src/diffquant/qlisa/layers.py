"""QLISA layers: a Linear / Conv2d whose weight is NF4 while frozen and a float parameter while sampled.

QLISA (seed 000) stores every frozen layer as in QLoRA (Dettmers et al., NeurIPS 2023): NF4 codes in
blocks of 64 with double-quantized absmax, dequantized to bfloat16 on the fly in the forward pass. When
layerwise importance sampling (LISA; Pan et al., NeurIPS 2024) picks a layer, :meth:`QLISALayer.activate`
dequantizes its weight once into a trainable fp32 :class:`~torch.nn.Parameter` (fp32 so that small
optimizer updates are not lost to bf16 rounding); :meth:`QLISALayer.freeze` re-quantizes the trained
weight to NF4 and drops the float parameter.

Re-quantization rounds each weight to the NF4 grid again, so an update smaller than half a grid step
(≈ 4 % of the block absmax near zero) is lost when the layer is frozen; train with a learning rate and
``interval`` large enough for updates to cross grid points, as in the paper's setting of hundreds of
steps per layer over a run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffquant.config import WeightQuantConfig
from diffquant.nn.packed import NF4PackedWeight
from diffquant.nn.qmodules import QuantConv2d, QuantLinear

NF4_CONFIG = WeightQuantConfig(format="nf4", bits=4, block_size=64, double_quant=True)
"""How QLISA stores frozen weights: NF4, blocks of 64, double quantization (the QLoRA defaults)."""


class QLISALayer(nn.Module):
    """Shared parts of :class:`QLISALinear` and :class:`QLISAConv2d`.

    Exactly one weight form exists at a time:

    - frozen: ``qweight`` (:class:`~diffquant.nn.packed.NF4PackedWeight`), ``trainable_weight`` is None;
      the forward dequantizes it to ``compute_dtype`` (bfloat16) and computes in that dtype;
    - active: ``trainable_weight`` (fp32 :class:`~torch.nn.Parameter`, requires grad), ``qweight`` is None;
      the forward computes in the input's dtype.

    ``bias`` stays a float parameter in its original dtype, trainable only while the layer is active.
    Every forward returns the input's dtype.
    """

    def __init__(
        self,
        module: nn.Linear | nn.Conv2d,
        config: WeightQuantConfig = NF4_CONFIG,
        compute_dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        if config.format != "nf4":
            raise ValueError(
                f"QLISA stores frozen weights in NF4, got format={config.format!r}; use NF4_CONFIG."
            )
        self.config = config
        self.compute_dtype = compute_dtype
        self.qweight: NF4PackedWeight | None = NF4PackedWeight.from_float(module.weight, config)
        self.register_parameter("trainable_weight", None)
        self.bias = (
            nn.Parameter(module.bias.detach().clone(), requires_grad=False)
            if module.bias is not None
            else None
        )

    @property
    def active(self) -> bool:
        """Whether the layer currently trains (holds a float weight)."""
        return self.trainable_weight is not None

    @property
    def weight(self) -> Tensor:
        """The trainable parameter while active; a fresh fp32 dequantization of the NF4 codes while frozen."""
        if self.trainable_weight is not None:
            return self.trainable_weight
        return self.qweight.dequantize(torch.float32)

    def activate(self) -> None:
        """Dequantize the NF4 weight into a trainable fp32 parameter; the bias trains too (no-op if active)."""
        if self.active:
            return
        self.trainable_weight = nn.Parameter(self.qweight.dequantize(torch.float32))
        self.qweight = None
        if self.bias is not None:
            self.bias.requires_grad_(True)

    def freeze(self) -> None:
        """Re-quantize the trained weight to NF4 and drop the float parameter (no-op if frozen)."""
        if not self.active:
            return
        self.qweight = NF4PackedWeight.from_float(self.trainable_weight.detach(), self.config)
        self.trainable_weight = None
        if self.bias is not None:
            self.bias.requires_grad_(False)
            self.bias.grad = None

    def _weight_and_bias(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(input, weight, bias)`` in the dtype the layer computes in."""
        dtype = x.dtype if self.active else self.compute_dtype
        weight = self.trainable_weight.to(dtype) if self.active else self.qweight.dequantize(dtype)
        bias = self.bias.to(dtype) if self.bias is not None else None
        return x.to(dtype), weight, bias

    def to_quant_layer(self) -> QuantLinear | QuantConv2d:
        """The frozen layer as a plain :class:`QuantLinear` / :class:`QuantConv2d` (for inference and
        :func:`diffquant.save_quantized`), sharing this layer's NF4 weight.

        Raises:
            RuntimeError: if the layer is active (freeze it first).
        """
        if self.active:
            raise RuntimeError(
                "freeze the layer (QLISALayer.freeze) before converting it to a quantized layer."
            )
        return self._quant_layer()

    def _quant_layer(self) -> QuantLinear | QuantConv2d:
        raise NotImplementedError


class QLISALinear(QLISALayer):
    """QLISA drop-in for :class:`torch.nn.Linear` (NF4 while frozen, fp32 parameter while sampled).

    Example:
        >>> layer = QLISALinear(torch.nn.Linear(64, 32))
        >>> layer.activate()
        >>> layer(torch.randn(2, 64)).shape
        torch.Size([2, 32])
    """

    def __init__(
        self,
        module: nn.Linear,
        config: WeightQuantConfig = NF4_CONFIG,
        compute_dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__(module, config, compute_dtype)
        self.in_features, self.out_features = module.in_features, module.out_features

    def forward(self, x: Tensor) -> Tensor:
        x_c, weight, bias = self._weight_and_bias(x)
        return F.linear(x_c, weight, bias).to(x.dtype)

    def _quant_layer(self) -> QuantLinear:
        return QuantLinear(self.qweight, self.bias, None, self.in_features, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, active={self.active}"


class QLISAConv2d(QLISALayer):
    """QLISA drop-in for :class:`torch.nn.Conv2d` (NF4 kernel, flattened blockwise, while frozen).

    Raises:
        ValueError: for a ``padding_mode`` other than ``"zeros"`` (exclude that layer).
    """

    def __init__(
        self,
        module: nn.Conv2d,
        config: WeightQuantConfig = NF4_CONFIG,
        compute_dtype: torch.dtype = torch.bfloat16,
    ):
        if module.padding_mode != "zeros":
            raise ValueError(
                f"QLISA supports Conv2d with padding_mode='zeros' only, got {module.padding_mode!r}; "
                "exclude this layer (QLISADiffusion(exclude=[...])) to keep it frozen in full precision."
            )
        super().__init__(module, config, compute_dtype)
        self.stride, self.dilation, self.groups = module.stride, module.dilation, module.groups
        self.padding = module.padding

    def forward(self, x: Tensor) -> Tensor:
        x_c, weight, bias = self._weight_and_bias(x)
        out = F.conv2d(x_c, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return out.to(x.dtype)

    def _quant_layer(self) -> QuantConv2d:
        args: dict[str, Any] = {
            "stride": self.stride,
            "padding": self.padding,
            "dilation": self.dilation,
            "groups": self.groups,
        }
        return QuantConv2d(self.qweight, self.bias, None, **args)

    def extra_repr(self) -> str:
        shape = tuple(self.weight.shape) if self.active else self.qweight.shape
        return f"weight={shape}, stride={self.stride}, padding={self.padding}, active={self.active}"


def qlisa_layer_for(
    module: nn.Module, config: WeightQuantConfig = NF4_CONFIG, compute_dtype: torch.dtype = torch.bfloat16
) -> QLISALayer:
    """Wrap an ``nn.Linear`` / ``nn.Conv2d`` (subclasses included) as a frozen QLISA layer.

    Raises:
        TypeError: for any other module.
    """
    if isinstance(module, nn.Linear):
        return QLISALinear(module, config, compute_dtype)
    if isinstance(module, nn.Conv2d):
        return QLISAConv2d(module, config, compute_dtype)
    raise TypeError(f"QLISA wraps nn.Linear and nn.Conv2d layers, got {type(module).__name__}.")
