"""GPTQ: column-by-column quantization with second-order error compensation.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023. For a weight ``W (out, in)`` and the input second moment
``H = 2/n Σ x xᵀ`` (see :class:`diffquant.ptq.hessian.InputStatistics`) it greedily minimises
``‖W X − Ŵ X‖²``: with ``U`` the upper Cholesky factor of the damped ``H⁻¹`` (``H⁻¹ = Uᵀ U``), column
``i`` is rounded to the grid, ``q_i = Q(w_i)``, and its error is spread over the columns not yet quantized,

    ``e = (w_i − q_i) / U_ii``,    ``W[:, i:] −= e ⊗ U[i, i:]``,

which is the optimal (OBS) update of the remaining weights. Columns are processed in lazy blocks: the
update is applied inside the block at once and to the rest of the matrix as one ``E · U[block, rest]``
product after the block.

The column loop (:func:`diffuse_errors`) and the per-column grid (:class:`ColumnGrid`) are shared with
:mod:`diffquant.ptq.qronos`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffquant.ptq.hessian import damped_cholesky_inverse, fix_dead_inputs
from diffquant.quant.affine import choose_qparams, dequantize, dequantize_weight, int_range, quantize


@dataclass
class QuantResult:
    """Output of :func:`gptq_quantize` / :func:`~diffquant.ptq.qronos.qronos_quantize`.

    Attributes:
        q: int32 codes ``(out, in)`` in ``int_range(bits, symmetric)``, original column order.
        scale: float32 ``(1, 1)`` | ``(out, 1)`` | ``(out, in // group_size)``, the layout of
            :func:`diffquant.quant.affine.choose_qparams`.
        zero_point: int32, same shape as ``scale``.
        weight: float32 ``(out, in)``, exactly ``dequantize_weight(q, scale, zero_point)``.
        loss: the proxy objective ``½ Σ_rows (ŵ − w*) H_λ (ŵ − w*)ᵀ`` accumulated column by column as
            GPTQ's ``Losses`` (``½ Σ e²``, ``e = (w_i − q_i) / U_ii``); ``H_λ`` is the damped Hessian and
            ``w*`` the unconstrained optimum (``W`` itself for GPTQ). For GPTQ with ``H = 2/n Σ x xᵀ`` it
            equals ``(1/n) ‖(W − Ŵ) X‖² + (λ/2) ‖W − Ŵ‖²``: the per-sample squared output error summed
            over output channels, plus the damping term.
        damping: absolute damping ``λ`` added to ``diag(H)``.
        retries: Cholesky retries needed (each multiplied ``λ`` by the growth factor).
    """

    q: Tensor
    scale: Tensor
    zero_point: Tensor
    weight: Tensor
    loss: float
    damping: float
    retries: int


class ColumnGrid:
    """The quantization grid of every column, in processing (possibly act-order permuted) order.

    Per-tensor and per-channel parameters, and static groups, are chosen from the original ``W`` up
    front. Dynamic groups (``granularity="group"`` without ``static_groups``) are chosen by
    :meth:`choose_group` from the current, error-updated weights when the loop reaches the group's first
    column, as in GPTQ's reference code; they need the identity order.

    Attributes:
        scale, zero_point: ``(out|1, n_groups)`` in the original group order (the result's layout).
        col_scale, col_zero_point: ``(in, out|1)``, row ``j``: the parameters of processing position ``j``
            (transposed so that a column's parameters are contiguous).
        dynamic: group parameters are chosen during the loop.
        group_size: columns per parameter group (``in`` unless ``granularity="group"``).
    """

    def __init__(
        self,
        W: Tensor,
        *,
        bits: int,
        symmetric: bool,
        granularity: str,
        group_size: int | None,
        static_groups: bool,
        range_method: str,
        perm: Tensor | None,
    ) -> None:
        self.bits, self.symmetric, self.range_method = bits, symmetric, range_method
        self.qmin, self.qmax = int_range(bits, symmetric)
        self.scale, self.zero_point = choose_qparams(
            W, bits, symmetric, granularity, group_size, method=range_method
        )  # (out|1, n_groups) each
        n_in = W.shape[1]
        self.group_size = group_size if granularity == "group" else n_in
        self.dynamic = granularity == "group" and not static_groups
        if self.dynamic and perm is not None:
            raise ValueError(
                "act_order with granularity='group' needs static_groups=True: the packed weight stores "
                "groups of consecutive input columns (no g_idx permutation), so group parameters must be "
                "fixed from the original weight before the reordered loop"
            )
        order = torch.arange(n_in, device=W.device) if perm is None else perm
        group_of = order // self.group_size  # (in,) group index of processing position j
        self.col_scale = self.scale[:, group_of].T.contiguous()  # (in, out|1)
        self.col_zero_point = self.zero_point[:, group_of].T.contiguous()  # (in, out|1)

    def starts_group(self, j: int) -> bool:
        """Whether dynamic parameters must be chosen before quantizing processing position ``j``."""
        return self.dynamic and j % self.group_size == 0

    def choose_group(self, j: int, w_group: Tensor) -> None:
        """Set the parameters of the group starting at column ``j`` from its current weights ``(out, gs)``."""
        s, z = choose_qparams(
            w_group.float(), self.bits, self.symmetric, "channel", method=self.range_method
        )  # (out, 1) each
        g = j // self.group_size
        self.scale[:, g : g + 1] = s
        self.zero_point[:, g : g + 1] = z
        self.col_scale[j : j + self.group_size] = s.T
        self.col_zero_point[j : j + self.group_size] = z.T

    def quantize_column(self, j: int, w: Tensor) -> tuple[Tensor, Tensor]:
        """Codes ``(out,)`` int32 and dequantized values ``(out,)`` (``w``'s dtype) of column ``j``."""
        s, z = self.col_scale[j], self.col_zero_point[j]  # (out|1,) each
        q = quantize(w, s, z, self.qmin, self.qmax)
        return q, dequantize(q, s, z).to(w.dtype)


def diffuse_errors(
    W: Tensor, U: Tensor, grid: ColumnGrid, codes: Tensor, start: int, block_size: int
) -> Tensor:
    """GPTQ's lazy-block loop over columns ``start..in-1``; returns the summed proxy loss (0-d tensor).

    ``W (out, in)`` is the working weight, updated in place (quantized columns end as their dequantized
    values); ``U (in, in)`` is the upper Cholesky factor of the damped ``H⁻¹``, of which only
    ``U[start:, start:]`` is read (the factor of the inverse of ``H[start:, start:]``, which is what the
    free columns need once columns ``..start-1`` are fixed); ``codes (out, in)`` int32 receives the codes
    of columns ``start..``. The loop runs on the transpose so that every column is contiguous.
    """
    n_in = W.shape[1]
    Wt = W.T.contiguous()  # (in, out): row j is column j of W
    codes_t = torch.empty_like(Wt, dtype=torch.int32)  # (in, out)
    loss = W.new_zeros(())
    for i1 in range(start, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = Wt[i1:i2]  # (count, out) view: updated in place
        U1 = U[i1:i2, i1:i2]  # (count, count)
        err1 = torch.zeros_like(W1)  # (count, out) scaled errors of this block
        for i in range(i2 - i1):
            j = i1 + i
            if grid.starts_group(j):
                grid.choose_group(j, _current_group(Wt, U, err1, i1, i2, j, grid.group_size).T)
            w = W1[i]
            q, w_hat = grid.quantize_column(j, w)
            e = (w - w_hat) / U1[i, i]  # (out,)
            codes_t[j] = q
            W1[i + 1 :] -= U1[i, i + 1 :, None] * e[None, :]
            W1[i] = w_hat
            err1[i] = e
        loss += err1.square().sum()
        Wt[i2:] -= U[i1:i2, i2:].T @ err1
    W.copy_(Wt.T)
    codes[:, start:] = codes_t[start:].T
    return loss / 2


def _current_group(Wt: Tensor, U: Tensor, err1: Tensor, i1: int, i2: int, j: int, group_size: int) -> Tensor:
    """The group starting at ``j`` as it stands now, transposed ``(gs, out)``: inside the block ``Wt`` is
    up to date; past it, rows still lack this block's pending ``U[i1:j, i2:]ᵀ · err1[:j-i1]``."""
    end = min(j + group_size, Wt.shape[0])
    inside = Wt[j : min(end, i2)]
    if end <= i2:
        return inside
    outside = Wt[i2:end] - U[i1:j, i2:end].T @ err1[: j - i1]  # (end - i2, out)
    return torch.cat([inside, outside], dim=0)


def check_problem(W: Tensor, H: Tensor, block_size: int) -> torch.dtype:
    """Validate ``W (out, in)``, ``H (in, in)``, ``block_size``; return the compute dtype (f32 or f64)."""
    if W.dim() != 2:
        raise ValueError(
            f"expected a 2-D weight (out, in), got shape {tuple(W.shape)}; view a conv kernel as "
            "w.reshape(w.shape[0], -1)"
        )
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(
            f"H of shape {tuple(H.shape)} does not match a weight with {W.shape[1]} input features; "
            "collect the statistics on this layer's (unfolded) inputs"
        )
    if not H.is_floating_point() or not torch.isfinite(H).all():
        raise ValueError("H must be a finite floating-point matrix; recollect the calibration statistics")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    return torch.float64 if torch.float64 in (W.dtype, H.dtype) else torch.float32


def act_order_permutation(H: Tensor) -> tuple[Tensor, Tensor]:
    """``(perm, inverse perm)``: columns by descending ``diag H`` (stable, so ties keep their order).

    Taken before the dead-input fix, so never-active inputs go last (GPTQ's reference sorts after setting
    their diagonal to 1; their columns are zero either way).
    """
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    return perm, torch.argsort(perm)


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    *,
    bits: int,
    symmetric: bool = True,
    granularity: str = "channel",
    group_size: int | None = None,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    range_method: str = "minmax",
    max_retries: int = 5,
) -> QuantResult:
    """Quantize one layer's weight with GPTQ.

    Steps: dead inputs (``H_ii = 0``: ``H_ii = 1``, column zeroed); optional act-order (columns by
    descending ``diag H``); ``λ = percdamp · mean(diag H)`` added to the diagonal, raised ×10 on Cholesky
    failure (:func:`~diffquant.ptq.hessian.damped_cholesky_inverse`); ``U = chol(H_λ⁻¹)`` upper; the
    lazy-block column loop; the permutation undone. Computed in float32 (float64 if ``W`` or ``H`` is).

    Args:
        W: float weight ``(out, in)`` (a conv kernel viewed as ``(out, in*kh*kw)``).
        H: ``(in, in)`` input second moment, e.g. :attr:`InputStatistics.H`.
        bits, symmetric, granularity, group_size, range_method: the grid, as in
            :func:`diffquant.quant.affine.choose_qparams`. Per-tensor/per-channel parameters come from the
            original ``W``; groups from the current error-updated weights when the loop reaches them,
            or from the original ``W`` with ``static_groups=True`` (no effect for other granularities).
        block_size: columns per lazy block (the result does not depend on it up to float rounding).
        percdamp: relative damping.
        act_order: process columns by descending ``diag H`` (needs ``static_groups`` with groups).
        max_retries: Cholesky retries before :class:`~diffquant.ptq.hessian.NotPositiveDefiniteError`.

    Returns:
        :class:`QuantResult`, in the original column order.

    Raises:
        ValueError: bad shapes, non-finite ``W``/``H``, bad grid arguments, or act-order with dynamic groups.
        NotPositiveDefiniteError: ``H`` stays non-factorisable after ``max_retries`` damping increases.

    Example:
        >>> x = torch.randn(512, 64)
        >>> w = torch.randn(32, 64)
        >>> res = gptq_quantize(w, 2 * x.T @ x / 512, bits=4, granularity="group", group_size=16)
        >>> res.weight.shape, res.q.dtype
        (torch.Size([32, 64]), torch.int32)
    """
    dtype = check_problem(W, H, block_size)
    perm, inv_perm = act_order_permutation(H) if act_order else (None, None)
    grid = ColumnGrid(
        W,
        bits=bits,
        symmetric=symmetric,
        granularity=granularity,
        group_size=group_size,
        static_groups=static_groups,
        range_method=range_method,
        perm=perm,
    )
    H, W_work, _ = fix_dead_inputs(H.to(device=W.device, dtype=dtype), W.to(dtype))
    if perm is not None:
        H = H[perm][:, perm]
        W_work = W_work[:, perm]
    U, damping, retries = damped_cholesky_inverse(H, percdamp, max_retries=max_retries)
    codes = torch.empty(W.shape, dtype=torch.int32, device=W.device)
    loss = diffuse_errors(W_work, U, grid, codes, start=0, block_size=block_size)
    if inv_perm is not None:
        codes = codes[:, inv_perm]
    return QuantResult(
        q=codes,
        scale=grid.scale,
        zero_point=grid.zero_point,
        weight=dequantize_weight(codes, grid.scale, grid.zero_point),
        loss=float(loss),
        damping=damping,
        retries=retries,
    )
