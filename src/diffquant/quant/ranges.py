"""Range choice for affine quantization: min-max, percentile clipping, Lp-error search.

Every function takes the grouped weight ``wg`` of shape ``(G0, G1, group_size)`` (see
:func:`diffquant.quant.affine.reshape_groups`) and returns ``(lo, hi)``, each ``(G0, G1)`` float32: the
range one group of ``group_size`` values is quantized over. They share the keyword interface
``fn(wg, bits=..., symmetric=..., **options)`` through :data:`RANGE_METHODS`, so
:func:`diffquant.quant.affine.choose_qparams` dispatches without an if/elif chain.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffquant.quant.primitives import fake_quantize, int_range, qparams_from_range


def minmax_range(
    wg: Tensor, *, bits: int | None = None, symmetric: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Smallest and largest value of each group (``bits``/``symmetric`` are accepted and unused)."""
    lo, hi = torch.aminmax(wg.float(), dim=-1)  # (G0, G1) each
    return lo, hi


def _kth_quantile(wg: Tensor, q: float) -> Tensor:
    """Linearly interpolated quantile along the last dim, as ``torch.quantile`` but without its size limit."""
    n = wg.shape[-1]
    pos = q * (n - 1)
    k = int(pos)  # 0-based index of the lower neighbour
    below = torch.kthvalue(wg, k + 1, dim=-1).values  # (G0, G1)
    if k + 1 >= n or pos == k:
        return below
    above = torch.kthvalue(wg, k + 2, dim=-1).values  # (G0, G1)
    return below + (pos - k) * (above - below)


def percentile_range(
    wg: Tensor, percentile: float = 99.99, *, bits: int | None = None, symmetric: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Clip each group to its ``[100 - percentile, percentile]`` percentiles (linear interpolation).

    Uses ``torch.kthvalue`` so per-tensor ranges of large weights work (``torch.quantile`` refuses inputs
    of more than 2**24 elements). ``bits``/``symmetric`` are accepted and unused.

    Raises:
        ValueError: ``percentile`` not in (50, 100].
    """
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}; e.g. percentile=99.99")
    wg = wg.float()
    return _kth_quantile(wg, 1.0 - percentile / 100.0), _kth_quantile(wg, percentile / 100.0)


def mse_range(
    wg: Tensor, bits: int, symmetric: bool, num_candidates: int = 80, p: float = 2.4
) -> tuple[Tensor, Tensor]:
    """Shrink the min-max range to minimise the Lp quantization error of each group.

    Q-Diffusion (Li et al., ICCV 2023), following BRECQ/QDrop's ``mse`` scale search: candidates
    ``[alpha * lo, alpha * hi]`` with ``alpha = 1 - 0.8 * i / num_candidates``, ``i = 0 .. num_candidates-1``
    (the default 80 candidates give ``alpha = 1.00, 0.99, ..., 0.21``); each group keeps the candidate
    with the least ``sum |w - fake_quant(w)|**p`` (``p = 2.4`` as in Q-Diffusion). ``alpha = 1`` (min-max)
    is a candidate and ties keep the wider range, so the error never exceeds min-max's. Vectorised over
    groups; one pass over ``wg`` per candidate.

    Raises:
        ValueError: ``num_candidates < 1`` or ``p <= 0``.
    """
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    if p <= 0:
        raise ValueError(f"p must be positive, got {p}")
    qmin, qmax = int_range(bits, symmetric)
    wg = wg.float()
    lo, hi = minmax_range(wg)  # (G0, G1) each
    best_err = torch.full_like(lo, float("inf"))
    best_alpha = torch.ones_like(lo)
    for i in range(num_candidates):
        alpha = 1.0 - 0.8 * i / num_candidates
        scale, zero_point = qparams_from_range(alpha * lo, alpha * hi, bits, symmetric)  # (G0, G1) each
        w_hat = fake_quantize(wg, scale[..., None], zero_point[..., None], qmin, qmax)  # (G0, G1, gs)
        err = (wg - w_hat).abs().pow(p).sum(dim=-1)  # (G0, G1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_alpha = torch.where(better, torch.full_like(best_alpha, alpha), best_alpha)
    return best_alpha * lo, best_alpha * hi


RangeFn = Callable[..., tuple[Tensor, Tensor]]

RANGE_METHODS: dict[str, RangeFn] = {
    "minmax": minmax_range,
    "percentile": percentile_range,
    "mse": mse_range,
}
"""Range methods by name; each is called as ``fn(wg, bits=bits, symmetric=symmetric, **options)``."""
