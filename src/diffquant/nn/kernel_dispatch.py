"""Route a quantized layer's forward to an integer kernel (:mod:`diffquant.kernels`) when it is exact and faster.

A layer takes a fast path only when all of these hold, and otherwise runs its fake-quant reference
path (which stays the oracle):

- the kernel mode is not ``"reference"`` and torch is not compiling (compiled models trace the
  reference path, which has no graph breaks);
- no gradient is to be recorded: ``torch.is_grad_enabled()`` is False, or neither the input nor any
  parameter of the layer (quantizer included) requires grad — training and QAT stay on the reference;
- the activation quantizer is calibrated and not observing (while ``quantize_`` calibrates, layers run
  :mod:`diffquant.ptq.paths`' calibration forward instead of this one);
- the input is float32, the weight is INT ≤ 8 bits, symmetric, per channel or per tensor, and the
  layer has an activation quantizer (weight-only layers have no faster path on CPU: see README);
- a kernel for this problem measured faster than the reference path (:mod:`diffquant.kernels.select`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from diffquant.kernels import get_kernel_mode
from diffquant.kernels.w8a8_layer import ConvArgs, W8A8Kernels
from diffquant.nn.act_quant import ActivationQuantizer
from diffquant.nn.packed import IntPackedWeight

# layer → (weight identity key, kernels); weak, so nothing is copied, pickled or saved with the layer
_KERNELS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, W8A8Kernels]] = weakref.WeakKeyDictionary()


def ineligible_reason(layer: nn.Module) -> str | None:
    """Why ``layer`` can never take an integer path (None when it can)."""
    qweight = layer.qweight
    if not isinstance(qweight, IntPackedWeight):
        return f"{qweight.format} weights (no integer kernel; runs dequantize + float op)"
    if not qweight.symmetric:
        return "asymmetric weights (kernels take symmetric int8 weights)"
    if qweight.scale.shape[1] != 1:
        return "group-wise weight scales (kernels take one scale per output channel)"
    if layer.input_quant is None:
        return "weight-only (no faster CPU kernel than dequantize + float op)"
    if type(layer.input_quant).integer_qparams is ActivationQuantizer.integer_qparams:
        return f"activation mode {layer.input_quant.mode!r} has no integer form"
    if getattr(layer, "kind", None) == "conv2d":
        if isinstance(layer.padding, str) or layer.groups != 1:
            return "conv with string padding or groups > 1"
        if layer.input_quant.mode == "dynamic" and layer.kernel_size != (1, 1):
            return "per-pixel dynamic scales vary inside a k×k window (no integer form)"
    return None


def _records_grad(layer: nn.Module, x: Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters()))


def _kernels(layer: nn.Module) -> W8A8Kernels:
    qweight = layer.qweight
    key = (qweight.qdata.data_ptr(), qweight.qdata._version, qweight.scale.data_ptr(), qweight.scale._version)
    cached = _KERNELS.get(layer)
    if cached is not None and cached[0] == key:
        return cached[1]

    def codes() -> Tensor:
        return qweight.int_codes().to(torch.int8).reshape(qweight.shape)  # (out, in) or (out, in, kh, kw)

    w_scale = qweight.scale.reshape(-1).float().expand(qweight.shape[0]).contiguous()  # (out,)
    conv = None
    if layer.kind == "conv2d":
        conv = ConvArgs(tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation), layer.groups)
    kernels = W8A8Kernels(codes, qweight.shape, w_scale, conv)
    _KERNELS[layer] = (key, kernels)
    return kernels


def fast_forward(layer: nn.Module, x: Tensor, reference: Callable[[Tensor], Tensor]) -> Tensor:
    """``layer(x)`` by the fastest exact path; ``reference(x)`` is the layer's fake-quant forward."""
    if (
        get_kernel_mode() == "reference"
        or torch.compiler.is_compiling()
        or x.dtype != torch.float32
        or _records_grad(layer, x)
        or ineligible_reason(layer) is not None
    ):
        return reference(x)
    quant = layer.input_quant
    qparams = quant.integer_qparams(x)
    if qparams is None:
        return reference(x)
    scale, zero_point = qparams
    bias = layer.bias.detach() if layer.bias is not None else None
    with torch.no_grad():
        return _kernels(layer).run(x, scale, zero_point, quant.qmin, quant.qmax, bias, lambda: reference(x))


@torch.no_grad()
def integer_path_outputs(layer: nn.Module, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Every integer path's output of ``layer`` for ``x`` and the tolerance to the reference path.

    For tests and diagnostics: nothing is chosen or cached as a choice.

    Raises:
        ValueError: when ``layer`` has no integer path (the message says why).
    """
    reason = ineligible_reason(layer)
    qparams = layer.input_quant.integer_qparams(x) if reason is None else None
    if qparams is None:
        raise ValueError(f"{type(layer).__name__} has no integer path: {reason or 'quantizer not ready'}.")
    quant = layer.input_quant
    bias = layer.bias.detach() if layer.bias is not None else None
    kernels = _kernels(layer)
    args = (x, *qparams, quant.qmin, quant.qmax, bias)
    return kernels.outputs_by_path(*args), kernels.rounding_bound(*args)


def kernel_cache_bytes(model: nn.Module) -> int:
    """Bytes of the prepacked integer weights the kernels hold for ``model``'s layers (beside the
    packed weights in its state dict)."""
    return sum(_KERNELS[m][1].pack_bytes() for m in model.modules() if m in _KERNELS)
