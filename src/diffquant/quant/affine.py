"""Affine (uniform) INT quantization, 2..8 bits: quantization parameters, quantize, dequantize.

``q = clamp(round(x / s) + z, qmin, qmax)`` and ``x_hat = (q - z) * s`` (Jacob et al. 2018, "Quantization
and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference"). Rounding is
``torch.round`` (half to even) everywhere, so the elementwise forms, the weight forms and the
straight-through forms in :mod:`diffquant.quant.ste` produce bit-identical values.

Weights are 2-D ``(out, in)`` matrices (a Conv2d kernel is viewed as ``(out, in*kh*kw)`` by the caller)
and their parameters broadcast against the grouped view ``(out, n_groups, group_size)``:

=============  =====================================
granularity    ``scale`` / ``zero_point`` shape
=============  =====================================
``"tensor"``   ``(1, 1)``
``"channel"``  ``(out, 1)``
``"group"``    ``(out, in // group_size)``
=============  =====================================
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffquant.quant.primitives import dequantize, fake_quantize, int_range, qparams_from_range, quantize
from diffquant.quant.ranges import RANGE_METHODS

__all__ = [
    "GRANULARITIES",
    "choose_qparams",
    "dequantize",
    "dequantize_weight",
    "fake_quantize",
    "int_range",
    "qparams_from_range",
    "quantize",
    "quantize_weight",
    "reshape_groups",
]

GRANULARITIES = ("tensor", "channel", "group")


def reshape_groups(w: Tensor, n_groups: int) -> Tensor:
    """View a 2-D weight ``(out, in)`` as ``(out, n_groups, in // n_groups)`` (a view if ``w`` is contiguous).

    Raises:
        ValueError: ``w`` is not 2-D or ``n_groups`` does not divide ``in``.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}; flatten it first")
    out_features, in_features = w.shape
    if n_groups <= 0 or in_features % n_groups:
        raise ValueError(f"{n_groups} groups do not divide in_features {in_features}")
    return w.reshape(out_features, n_groups, in_features // n_groups)  # (out, n_groups, group_size)


def _check_weight(w: Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(
            f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}; view a conv kernel as "
            "w.reshape(w.shape[0], -1)"
        )
    if not w.is_floating_point():
        raise TypeError(f"expected a floating-point weight, got {w.dtype}")
    if not torch.isfinite(w).all():
        raise ValueError(
            "weights contain NaN/Inf; fix the checkpoint or exclude this layer from quantization"
        )


def _suggest_divisors(n: int, limit: int = 5) -> str:
    divisors = [d for d in range(n - 1, 0, -1) if n % d == 0][:limit]
    return ", ".join(map(str, divisors))


def _n_groups(in_features: int, granularity: str, group_size: int | None) -> int:
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of {GRANULARITIES}")
    if granularity != "group":
        if group_size is not None:
            raise ValueError(
                f"group_size is only used with granularity='group', got group_size={group_size} with "
                f"granularity={granularity!r}; drop group_size or use granularity='group'"
            )
        return 1
    if group_size is None:
        raise ValueError("granularity='group' needs a group_size, e.g. group_size=128")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if in_features % group_size:
        raise ValueError(
            f"group_size {group_size} does not divide in_features {in_features}; choose a divisor such as "
            f"{_suggest_divisors(in_features)}, or use granularity='channel'"
        )
    return in_features // group_size


def choose_qparams(
    w: Tensor,
    bits: int,
    symmetric: bool,
    granularity: str = "channel",
    group_size: int | None = None,
    method: str = "minmax",
    **method_kwargs,
) -> tuple[Tensor, Tensor]:
    """Choose affine quantization parameters for a 2-D weight.

    Args:
        w: floating-point weight ``(out, in)``.
        bits: 2..8.
        symmetric: signed codes with zero point 0, or unsigned codes with a zero point.
        granularity: ``"tensor"``, ``"channel"`` (per output row) or ``"group"`` (``group_size``
            consecutive inputs of one output row).
        group_size: required for ``"group"``; must divide ``in``.
        method: range choice, a key of :data:`diffquant.quant.ranges.RANGE_METHODS` (``"minmax"``,
            ``"percentile"``, ``"mse"``); ``method_kwargs`` go to it (e.g. ``percentile=99.9``).

    Returns:
        ``(scale float32, zero_point int32)``, each ``(1, 1)``, ``(out, 1)`` or ``(out, in // group_size)``
        (see :func:`qparams_from_range` for the formulas).

    Raises:
        ValueError: ``w`` not 2-D or not finite; bad ``bits``, ``granularity``, ``group_size`` or ``method``.

    Example:
        >>> w = torch.randn(16, 64)
        >>> scale, zp = choose_qparams(w, bits=4, symmetric=False, granularity="group", group_size=32)
        >>> w_hat = dequantize_weight(quantize_weight(w, scale, zp, 4, False), scale, zp)
    """
    int_range(bits, symmetric)
    _check_weight(w)
    n_groups = _n_groups(w.shape[1], granularity, group_size)
    if method not in RANGE_METHODS:
        raise ValueError(f"unknown range method {method!r}; choose one of {sorted(RANGE_METHODS)}")
    w = w.float()
    # (1, 1, out*in) per tensor, else (out, n_groups, group_size)
    wg = w.reshape(1, 1, -1) if granularity == "tensor" else reshape_groups(w, n_groups)
    lo, hi = RANGE_METHODS[method](wg, bits=bits, symmetric=symmetric, **method_kwargs)  # (G0, G1) each
    return qparams_from_range(lo, hi, bits, symmetric)


def _grouped_params(w: Tensor, scale: Tensor, zero_point: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Grouped weight ``(out, n_groups, group_size)`` and parameters ``(out|1, n_groups, 1)``."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    if scale.dim() != 2 or scale.shape[0] not in (1, w.shape[0]) or w.shape[1] % scale.shape[1]:
        raise ValueError(
            f"scale of shape {tuple(scale.shape)} does not fit a weight of shape {tuple(w.shape)}; expected "
            "(1, 1), (out, 1) or (out, in // group_size) as returned by choose_qparams"
        )
    if zero_point.shape != scale.shape:
        raise ValueError(f"zero_point shape {tuple(zero_point.shape)} != scale shape {tuple(scale.shape)}")
    wg = reshape_groups(w, scale.shape[1])  # (out, n_groups, group_size)
    return wg, scale[..., None], zero_point[..., None]  # params: (out|1, n_groups, 1)


def quantize_weight(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, symmetric: bool) -> Tensor:
    """Integer codes of a 2-D weight, ``int32`` with ``w``'s shape (group size from ``scale.shape[1]``).

    Codes lie in :func:`int_range` ``(bits, symmetric)``: signed for symmetric, unsigned otherwise.
    """
    qmin, qmax = int_range(bits, symmetric)
    wg, s, z = _grouped_params(w, scale, zero_point)
    return quantize(wg, s, z, qmin, qmax).reshape(w.shape)


def dequantize_weight(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Float32 weight ``(out, in)`` from the integer codes of :func:`quantize_weight`."""
    qg, s, z = _grouped_params(q, scale, zero_point)
    return dequantize(qg, s, z).float().reshape(q.shape)
