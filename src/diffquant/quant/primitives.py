"""Elementwise affine INT primitives: code range, parameters from a range, quantize, dequantize.

``q = clamp(round(x / s) + z, qmin, qmax)`` and ``x_hat = (q - z) * s`` (Jacob et al. 2018). The bottom of
:mod:`diffquant.quant`: :mod:`~diffquant.quant.ranges` searches ranges with these functions and
:mod:`~diffquant.quant.affine` builds the weight forms on both (re-exporting these names), so neither
imports the other's dependants.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Scales below the smallest normal float32 only occur for (near-)zero ranges: replacing them by 1.0
# maps every value of the group to the zero point, with a reconstruction error below 1e-37.
_MIN_SCALE = torch.finfo(torch.float32).tiny


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range ``(qmin, qmax)``.

    Symmetric: signed ``(-2**(bits-1), 2**(bits-1) - 1)``; asymmetric: unsigned ``(0, 2**bits - 1)``.

    Raises:
        ValueError: ``bits`` is not an integer in 2..8.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(
            f"INT quantization supports 2..8 bits, got {bits!r}; use an integer in 2..8 "
            "(or NF4 for 4-bit normal-float weights)"
        )
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _on_device(value: float, like: Tensor) -> Tensor:
    """``value`` as a 0-d tensor on ``like``'s device.

    CUDA divides by a Python number as a multiplication by its reciprocal (CPU divides exactly), which
    moves a scale by one ulp and flips codes that sit on a rounding boundary; dividing by a device
    tensor rounds the same on every device, so CPU and CUDA choose identical scales and codes.
    """
    return torch.tensor(float(value), dtype=like.dtype, device=like.device)


def qparams_from_range(lo: Tensor, hi: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point covering ``[lo, hi]`` (elementwise over any shape).

    Symmetric (PyTorch observer convention): ``scale = max(|lo|, |hi|) / ((qmax - qmin) / 2)``, zero point
    0; ``+absmax`` maps to ``qmax + 0.5`` and is clamped to ``qmax``, so every value within the range is
    reconstructed to within ``scale / 2``. Asymmetric: the range is widened to contain 0,
    ``scale = (hi - lo) / (qmax - qmin)``, ``zero_point = clamp(round(qmin - lo / scale), qmin, qmax)``, so
    0 is exactly representable. A zero range gets ``scale = 1`` (see ``_MIN_SCALE``).

    Returns:
        ``(scale float32, zero_point int32)``, both with the shape of ``lo``.
    """
    qmin, qmax = int_range(bits, symmetric)
    lo = lo.float()
    hi = hi.float()
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / _on_device((qmax - qmin) / 2, lo)
    else:
        lo = lo.clamp(max=0.0)
        hi = hi.clamp(min=0.0)
        scale = (hi - lo) / _on_device(qmax - qmin, lo)
    scale = torch.where(scale >= _MIN_SCALE, scale, torch.ones_like(scale))
    if symmetric:
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """``clamp(round(x / scale) + zero_point, qmin, qmax)`` as ``int32`` codes (broadcasting)."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax).to(torch.int32)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """``(q - zero_point) * scale`` (broadcasting); float32 for a float32 scale."""
    return (q - zero_point) * scale


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Quantize-dequantize in one step, returned in ``x``'s dtype.

    Computed in the promoted dtype of ``x`` and ``scale``; bit-identical to
    ``dequantize(quantize(x, ...), ...)``. No special gradient (``round`` has zero gradient); use
    :func:`diffquant.quant.ste.fake_quantize_ste` for training.
    """
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return ((q - zero_point) * scale).to(x.dtype)
