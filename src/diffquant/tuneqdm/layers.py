"""`TQLinear` and `TQConv2d`: frozen packed INT weights with trainable, timestep-aware scales.

TuneQDM (Ryu, Lim, Shim, "Memory-Efficient Fine-Tuning for Quantized Diffusion Model", ECCV 2024)
quantizes each weight per output channel with min-max ranges, freezes the integer codes ``W_int`` and
zero points ``z``, and trains only the scales. The effective weight of expert ``e`` is

    W_e = (W_int − z) · delta_out[e][:, None] · delta_in[e][None, :]

(conv: ``delta_in`` has one entry per input channel of a group and broadcasts over the kernel).

The forward never builds ``W_e``. Scaling columns of ``W`` is scaling the input channels and scaling
its rows is scaling the output channels, so each sample ``b`` with expert ``e_b`` computes

    y_b = op(x_b · delta_in[e_b], W_int − z) · delta_out[e_b] + bias

with one shared integer-valued weight, which lets one batch mix timesteps. The integer-valued weight
is unpacked in the input's dtype (exact: ``|W_int − z| ≤ 255``) and unpacked again in backward instead
of being saved, so training keeps no float copy of any frozen weight.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from diffquant.config import WeightQuantConfig
from diffquant.nn.packed import IntPackedWeight
from diffquant.noise import current_noise_level
from diffquant.tuneqdm.config import TuneQDMConfig
from diffquant.tuneqdm.experts import Experts, experts_for_noise_level, resolve_experts

__all__ = ["TQConv2d", "TQLinear", "is_tuneqdm_layer"]


class _FrozenIntegerOp(torch.autograd.Function):
    """``op(x, W_int − z)``; backward re-unpacks the integer weight instead of saving a float copy."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: _TQLayer) -> Tensor:
        ctx.layer, ctx.input_shape, ctx.input_dtype = layer, x.shape, x.dtype
        return layer._op(x, layer.integer_weight(x.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        layer: _TQLayer = ctx.layer
        grad_x = layer._input_grad(grad, layer.integer_weight(grad.dtype), ctx.input_shape)
        return grad_x.to(ctx.input_dtype), None


def _channel_view(scale: Tensor, like: Tensor, channel_dim: int) -> Tensor:
    """View a ``(C,)`` scale, or ``(B, C)`` per-sample scales, to broadcast along ``like``'s channel dim."""
    shape = [1] * like.ndim
    if scale.ndim == 2:
        shape[0] = scale.shape[0]
    shape[channel_dim] = scale.shape[-1]
    return scale.reshape(shape)  # (1 | B, ..., C, ...)


class _TQLayer(nn.Module):
    """Shared parts of `TQLinear` and `TQConv2d`.

    Attributes:
        config: The `TuneQDMConfig` the layer was built with.
        qweight: `IntPackedWeight` (frozen buffers): codes packed ``8 // n_bits`` per byte, the min-max
            ``scale (C_out, 1)`` (``delta_out``'s initial value) and, asymmetric, ``zero_point (C_out, 1)``.
        bias: ``(C_out,)`` float buffer (frozen), or None.
        delta_out: ``(num_experts, C_out)`` trainable output scales, or None when ``train_delta_out`` is
            False (the frozen min-max scale is used).
        delta_in: ``(num_experts, C_in)`` trainable input scales (conv: ``C_in = in_channels // groups``),
            or None when ``train_delta_in`` is False.
        timestep_experts: The expert selection set by `set_timestep` (overrides the noise context).

    The deltas and the bias have the float weight's dtype (keep the model in float32 to train, as with
    any optimizer's master weights; autocast is fine).
    """

    kind: ClassVar[str]
    channel_dim: ClassVar[int]

    def __init__(
        self, qweight: IntPackedWeight, bias: Tensor | None, config: TuneQDMConfig, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.config = config
        self.qweight = qweight
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        n, (c_out, c_in) = config.num_experts, qweight.shape[:2]
        scale = qweight.scale[:, 0]  # (C_out,)
        self.delta_out = (
            nn.Parameter(scale.to(dtype).expand(n, c_out).clone()) if config.train_delta_out else None
        )
        self.delta_in = (
            nn.Parameter(torch.ones(n, c_in, dtype=dtype, device=scale.device))
            if config.train_delta_in
            else None
        )
        self.timestep_experts: Experts | None = None

    @staticmethod
    def _quantize(weight: Tensor, config: TuneQDMConfig) -> IntPackedWeight:
        """Per-output-channel min-max round-to-nearest codes of ``weight``, packed."""
        wcfg = WeightQuantConfig(bits=config.bits, granularity="channel", symmetric=config.symmetric)
        return IntPackedWeight.from_float(weight, wcfg)

    def integer_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``W_int − z`` in the weight's shape as ``dtype`` (integer-valued; exact in fp16/bf16)."""
        q = self.qweight.int_codes()  # (C_out, K) int32
        if not self.qweight.symmetric:
            q = q - self.qweight.zero_point.to(torch.int32)  # (C_out, 1) broadcasts over K
        return q.to(dtype).reshape(self.qweight.shape)

    def _out_scale(self, experts: Experts) -> Tensor:
        """``delta_out[experts]``: ``(C_out,)`` or ``(B, C_out)``; the frozen min-max scale without it."""
        return self.delta_out[experts] if self.delta_out is not None else self.qweight.scale[:, 0]

    def _in_scales(self) -> Tensor | None:
        """``(num_experts, C_in)`` over the op's input channels (all groups), or None."""
        return self.delta_in

    def effective_weight(self, expert: int = 0) -> Tensor:
        """The weight ``W_e = (W_int − z) · delta_out[e] · delta_in[e]`` of one expert, differentiable.

        Running the float op with this weight is the per-batch form of the layer (the reference code's);
        the forward computes the same values per sample without building it.
        """
        if not 0 <= expert < self.config.num_experts:
            raise IndexError(f"expert must be in [0, {self.config.num_experts}), got {expert}.")
        out = self._out_scale(expert)  # (C_out,)
        w = self.integer_weight(out.dtype)  # (C_out, C_in, *kernel)
        w = w * out.reshape(-1, *[1] * (w.ndim - 1))  # (C_out, 1, ...)
        if self.delta_in is not None:
            w = w * self.delta_in[expert].reshape(1, -1, *[1] * (w.ndim - 2))  # (1, C_in, 1, ...)
        return w

    def set_timestep(self, timestep: Any) -> None:
        """Fix the timestep (scalar or ``(B,)``) of the next calls; None returns to the noise context.

        Raises:
            ValueError: a timestep outside ``[0, total_denoising_steps)``.
        """
        cfg = self.config
        self.timestep_experts = (
            None
            if timestep is None
            else resolve_experts(timestep, cfg.num_experts, cfg.total_denoising_steps)
        )

    def _experts(self, x: Tensor) -> Experts:
        cfg = self.config
        if cfg.num_experts == 1:
            return 0
        experts = self.timestep_experts
        if experts is None:
            level = current_noise_level()
            if level is None:
                raise RuntimeError(
                    f"This {type(self).__name__} has {cfg.num_experts} timestep-aware experts but no timestep "
                    "is known. Call diffquant.tuneqdm.set_timestep(model, t) before the forward, or "
                    "diffquant.tuneqdm.register_tas_pre_hook(model, num_experts) once so every forward uses "
                    "its own timestep argument (gradient checkpointing re-runs blocks in backward, outside the "
                    "forward: use set_timestep there)."
                )
            experts = experts_for_noise_level(level, cfg.num_experts, cfg.total_denoising_steps)
        if isinstance(experts, int):
            return experts
        if x.ndim < 2 or x.shape[0] != experts.shape[0]:
            raise ValueError(
                f"{type(self).__name__} got {experts.shape[0]} per-sample timesteps but an input of shape "
                f"{tuple(x.shape)}, whose dim 0 is not that batch. Pass one timestep per sample of the "
                "denoiser's batch, or a single timestep for all."
            )
        return experts.to(x.device, non_blocking=True)

    def forward(self, x: Tensor) -> Tensor:
        """``op(x · delta_in[e], W_int − z) · delta_out[e] + bias``, with expert ``e`` per sample."""
        experts = self._experts(x)
        in_scales = self._in_scales()
        if in_scales is not None:
            x = x * _channel_view(in_scales[experts].to(x.dtype), x, self.channel_dim)
        y = _FrozenIntegerOp.apply(x, self)
        out = _channel_view(self._out_scale(experts).to(y.dtype), y, self.channel_dim)
        if self.bias is None:
            return y * out
        return torch.addcmul(_channel_view(self.bias.to(y.dtype), y, self.channel_dim), y, out)

    def _op(self, x: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def _input_grad(self, grad: Tensor, weight: Tensor, input_shape: torch.Size) -> Tensor:
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """JSON facts that a checkpoint of this layer's scales depends on: kind and weight shape."""
        return {"kind": self.kind, "weight_shape": list(self.qweight.shape)}


class TQLinear(_TQLayer):
    """TuneQDM drop-in for :class:`torch.nn.Linear`; input ``(B, ..., C_in)``, output ``(B, ..., C_out)``.

    Example:
        >>> layer = TQLinear.from_float(torch.nn.Linear(16, 8), TuneQDMConfig(num_experts=4))
        >>> layer.set_timestep(torch.tensor([10, 990]))  # samples use experts 0 and 3
        >>> layer(torch.randn(2, 16)).shape
        torch.Size([2, 8])
    """

    kind = "linear"
    channel_dim = -1

    def __init__(
        self,
        qweight: IntPackedWeight,
        bias: Tensor | None,
        config: TuneQDMConfig,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(qweight, bias, config, dtype)
        self.out_features, self.in_features = qweight.shape

    @classmethod
    def from_float(cls, module: nn.Linear, config: TuneQDMConfig) -> TQLinear:
        """Quantize ``module``'s weight (per output channel, min-max) and initialise the scales."""
        return cls(cls._quantize(module.weight, config), module.bias, config, module.weight.dtype)

    def _op(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight)

    def _input_grad(self, grad: Tensor, weight: Tensor, input_shape: torch.Size) -> Tensor:
        return grad @ weight  # (..., C_out) @ (C_out, C_in) -> (..., C_in)

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={cfg.bits}, "
            f"num_experts={cfg.num_experts}, train_delta_in={cfg.train_delta_in}"
        )


def _int_padding(padding: str | tuple[int, ...], kernel_size: tuple[int, ...], dilation: tuple[int, ...]):
    """Conv padding as ints (the input-gradient op takes no strings)."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel_size, strict=True)]
        if any(t % 2 for t in total):
            raise ValueError(
                f"padding='same' with kernel {kernel_size} and dilation {dilation} pads unevenly, which "
                "TQConv2d does not support; exclude this layer (TuneQDMConfig.exclude)."
            )
        return tuple(t // 2 for t in total)
    return tuple(padding)


class TQConv2d(_TQLayer):
    """TuneQDM drop-in for :class:`torch.nn.Conv2d`; input ``(B, C_in, H, W)``, output ``(B, C_out, H', W')``.

    ``delta_in`` has ``in_channels // groups`` entries (one per column of the kernel), shared by the
    groups and broadcast over ``kh × kw``. Only ``padding_mode="zeros"`` is supported.
    """

    kind = "conv2d"
    channel_dim = 1

    def __init__(
        self,
        qweight: IntPackedWeight,
        bias: Tensor | None,
        config: TuneQDMConfig,
        stride: tuple[int, int],
        padding: str | tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(qweight, bias, config, dtype)
        self.out_channels, self.groups = qweight.shape[0], int(groups)
        self.in_channels, self.kernel_size = qweight.shape[1] * self.groups, tuple(qweight.shape[2:])
        self.stride, self.dilation = tuple(stride), tuple(dilation)
        self.padding = _int_padding(padding, self.kernel_size, self.dilation)

    @classmethod
    def from_float(cls, module: nn.Conv2d, config: TuneQDMConfig) -> TQConv2d:
        """Quantize ``module``'s kernel (per output channel, min-max) and initialise the scales.

        Raises:
            ValueError: ``padding_mode`` other than ``"zeros"``, or uneven ``padding="same"``.
        """
        if module.padding_mode != "zeros":
            raise ValueError(
                f"TQConv2d supports padding_mode='zeros' only, got {module.padding_mode!r}; exclude this "
                "layer (TuneQDMConfig.exclude) to keep it in float."
            )
        qweight = cls._quantize(module.weight, config)
        args = (module.stride, module.padding, module.dilation, module.groups, module.weight.dtype)
        return cls(qweight, module.bias, config, *args)

    def _in_scales(self) -> Tensor | None:
        if self.delta_in is None or self.groups == 1:
            return self.delta_in
        return self.delta_in.repeat(1, self.groups)  # (N, C_in / groups) -> (N, C_in)

    def _op(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def _input_grad(self, grad: Tensor, weight: Tensor, input_shape: torch.Size) -> Tensor:
        return torch.nn.grad.conv2d_input(
            input_shape, weight, grad, self.stride, self.padding, self.dilation, self.groups
        )

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"bits={cfg.bits}, num_experts={cfg.num_experts}, train_delta_in={cfg.train_delta_in}"
        )


def is_tuneqdm_layer(module: nn.Module) -> bool:
    """True for `TQLinear` / `TQConv2d`."""
    return isinstance(module, _TQLayer)
