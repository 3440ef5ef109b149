"""Straight-through estimators for training through quantization.

Forward values are bit-identical to :func:`diffquant.quant.affine.fake_quantize`: the gradient tricks
below add exact zeros (``y - y.detach()``) in the forward pass. Gradients follow LSQ's clip-then-round:
the clipping mask is taken on the unrounded value ``x / scale + zero_point``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` forward, identity gradient (straight-through estimator, Bengio et al. 2013)."""
    return torch.round(x).detach() + (x - x.detach())


def _scale_grad(x: Tensor, factor: float) -> Tensor:
    """Value ``x`` exactly, gradient multiplied by ``factor``."""
    scaled = x * factor
    return x.detach() + (scaled - scaled.detach())


def _codes_ste(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Codes ``clamp(round(x / scale) + zero_point, qmin, qmax)`` (float), with the gradient of
    ``clamp(x / scale + zero_point, qmin, qmax)``: LSQ's clip-then-round, whose mask is taken on the
    unrounded value. (Rounding first, as ``torch.fake_quantize_per_tensor_affine`` does, would also pass
    gradient within half a step outside the range.)
    """
    v = x / scale
    codes = torch.clamp(torch.round(v) + zero_point, qmin, qmax).detach()
    clipped = torch.clamp(v + zero_point, qmin, qmax)
    return codes + (clipped - clipped.detach())


def fake_quantize_ste(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Quantize-dequantize with a straight-through gradient for ``x``.

    The gradient w.r.t. ``x`` is 1 where ``qmin <= x / scale + zero_point <= qmax`` and 0 where the value
    is clipped; ``scale`` and ``zero_point`` get no gradient (use :func:`lsq_fake_quantize` to learn them).
    Result in ``x``'s dtype.
    """
    scale = scale.detach()
    zero_point = zero_point.detach()
    q = _codes_ste(x, scale, zero_point, qmin, qmax)
    return ((q - zero_point) * scale).to(x.dtype)


def lsq_fake_quantize(
    x: Tensor,
    step: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    grad_scale: float | None = None,
) -> Tensor:
    """Fake quantization with a learnable step size (LSQ; Esser et al., ICLR 2020).

    ``x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) * s``. With ``v = x / s``, the gradients are:

    - ``d x_hat / d x = 1`` where ``qmin <= v + z <= qmax``, 0 outside (straight-through);
    - ``d x_hat / d s = round(v) - v`` inside, ``qmin - z`` below, ``qmax - z`` above (LSQ eq. 3 for
      ``z = 0``), multiplied by ``grad_scale``;
    - a floating-point ``zero_point`` is rounded with a straight-through estimator and, like the offset of
      LSQ+ (Bhalgat et al. 2020), receives ``-s`` outside the clamp range and 0 inside, also multiplied by
      ``grad_scale``. An integer ``zero_point`` is used as is.

    Args:
        x: input of any shape.
        step: step size ``s`` broadcastable to ``x`` (learnable).
        zero_point: ``z`` broadcastable to ``x``; float (learnable or not) or integer.
        qmin, qmax: integer code range (``qmax > 0``).
        grad_scale: gradient multiplier for ``step`` and ``zero_point``; defaults to LSQ's
            ``1 / sqrt(x.numel() * qmax)``.

    Returns:
        ``x_hat`` in ``x``'s dtype.
    """
    if qmax <= 0:
        raise ValueError(f"qmax must be positive for LSQ's gradient scale, got {qmax}")
    if grad_scale is None:
        grad_scale = 1.0 / math.sqrt(x.numel() * qmax)
    s = _scale_grad(step, grad_scale)
    z = _scale_grad(round_ste(zero_point), grad_scale) if zero_point.is_floating_point() else zero_point
    q = _codes_ste(x, s, z, qmin, qmax)
    return ((q - z) * s).to(x.dtype)
