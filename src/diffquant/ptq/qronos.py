"""Qronos: sequential rounding that corrects the past and shapes the future.

Zhang, Zhang, Colbert, Saab, "Qronos: Correcting the Past by Shaping the Future in Post-Training
Quantization", 2025 (reference implementation: Brevitas ``brevitas.graph.qronos``). It solves the
*mismatched* layer problem ``min_Q ‖W X − Q X̃‖²``: ``X`` are the layer's inputs in the float network,
``X̃`` those produced by the already-quantized preceding layers. With ``H = 2/n Σ x̃ x̃ᵀ``,
``G = 2/n Σ x x̃ᵀ`` (:class:`~diffquant.ptq.hessian.InputStatistics`), ``λ = α · σ_max(H)``, ``W`` the float
weights and ``V`` the current ones (after act-order, applied to ``H``, ``G`` and the columns alike):

1. correct the past: ``q̃₀ = (W·G[:,0] − V[:,1:]·H[1:,0]) / H₀₀``, ``q₀ = Q(q̃₀)``;
2. shape the future: ``W[:,1:] = (W·(G + λI)[:,1:] − q₀·H[0:1,1:]) · A`` with ``A = (H + λI)[1:,1:]⁻¹``,
   the Schur complement ``H_λ⁻¹[1:,1:] − b bᵀ / c`` (``c = H_λ⁻¹[0,0]``, ``b = H_λ⁻¹[1:,0]``);
3. columns ``1..``: GPTQ's error diffusion on the corrected weights with the Cholesky factor of ``A``.

With ``X̃ = X`` (``G = H``) step 1 leaves column 0 unchanged and step 2 is GPTQ's first OBS update, so
Qronos reduces to GPTQ with damping ``λ``.

Where we deviate from Brevitas (same result in exact arithmetic, documented here):

- The Cholesky factor of ``A`` is not recomputed: if ``H_λ⁻¹ = Uᵀ U`` with ``U`` upper, then
  ``A = U[1:,1:]ᵀ U[1:,1:]``, so step 3 uses the trailing block of ``U`` (one factorisation fewer and no
  Brevitas ``beta`` rescaling needed).
- Steps 1 and 2 are evaluated in residual form, ``V + R·A`` with ``R = W·G − V·H`` formed from ``G − H``,
  instead of ``W·G·A``: the latter loses about ``cond(H)·eps`` to float32 rounding (with ``cond(H) = 1e4``
  it raised an 8-bit layer's output error by 40 % in our tests), while ``R`` is exactly 0 when ``X̃ = X``.
- Dead inputs (``H_ii = 0``) get ``H_ii = 1`` and a zero column as in GPTQ; the ``λ I`` part of
  ``G + λI`` multiplies the weights with those columns zeroed, so dead columns come out exactly 0
  (Brevitas multiplies the original weights there, leaving ``λ/(1+λ)·w``).
- A failed factorisation raises the damping ×10 and retries, then raises
  :class:`~diffquant.ptq.hessian.NotPositiveDefiniteError`; Brevitas warns and leaves the layer
  unquantized.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffquant.ptq.gptq import (
    ColumnGrid,
    QuantResult,
    act_order_permutation,
    check_problem,
    diffuse_errors,
)
from diffquant.ptq.hessian import damped_cholesky_inverse, fix_dead_inputs, spectral_norm
from diffquant.quant.affine import dequantize_weight


def qronos_quantize(
    W: Tensor,
    H: Tensor,
    G: Tensor,
    *,
    bits: int,
    symmetric: bool = True,
    granularity: str = "channel",
    group_size: int | None = None,
    block_size: int = 128,
    alpha: float = 1e-6,
    percdamp: float = 0.0,
    act_order: bool = False,
    static_groups: bool = False,
    range_method: str = "minmax",
    max_retries: int = 5,
) -> QuantResult:
    """Quantize one layer's weight with Qronos against float-network targets.

    Args:
        W: float weight ``(out, in)`` (a conv kernel viewed as ``(out, in*kh*kw)``).
        H: ``(in, in)`` second moment of the quantized-path inputs, :attr:`InputStatistics.H`.
        G: ``(in, in)`` cross moment ``2/n Σ x x̃ᵀ`` (row: float feature), :attr:`InputStatistics.G`,
            with the same normalisation as ``H``.
        bits, symmetric, granularity, group_size, static_groups, range_method, act_order, block_size,
            max_retries: as in :func:`~diffquant.ptq.gptq.gptq_quantize`. Dynamic groups are chosen from the
            current weights when reached; group 0 from ``[q̃₀, V[:, 1:gs]]`` just before ``q₀`` is rounded.
        alpha: damping relative to the largest eigenvalue, ``λ = α · σ_max(H)`` (power iteration).
        percdamp: extra damping relative to ``mean(diag H)`` added to ``λ`` (0 by default, as in the paper).

    Returns:
        :class:`~diffquant.ptq.gptq.QuantResult`; ``loss`` is ``½ Σ_rows (ŵ − w*) H_λ (ŵ − w*)ᵀ`` with
        ``w* = W (G + λI) H_λ⁻¹`` the unconstrained optimum, i.e. the increase of ``(1/n) ‖W X − Ŵ X̃‖²``
        over the best float weights (plus the small damping term).

    Raises:
        ValueError: bad shapes, non-finite inputs, bad grid arguments, or act-order with dynamic groups.
        NotPositiveDefiniteError: ``H`` stays non-factorisable after ``max_retries`` damping increases.
    """
    dtype = check_problem(W, H, block_size)
    if G.shape != H.shape:
        raise ValueError(f"G shape {tuple(G.shape)} != H shape {tuple(H.shape)}; both are (in, in)")
    if not G.is_floating_point() or not torch.isfinite(G).all():
        raise ValueError("G must be a finite floating-point matrix; recollect the calibration statistics")
    if alpha < 0 or percdamp < 0:
        raise ValueError(f"damping must be >= 0, got alpha={alpha}, percdamp={percdamp}")
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
    W_orig = W.to(dtype)
    G = G.to(device=W.device, dtype=dtype)
    H, V, _ = fix_dead_inputs(H.to(device=W.device, dtype=dtype), W_orig)
    if perm is not None:
        H, G = H[perm][:, perm], G[perm][:, perm]
        W_orig, V = W_orig[:, perm], V[:, perm]
    lam = alpha * spectral_norm(H) + percdamp * float(torch.diagonal(H).mean())
    U, lam, retries = damped_cholesky_inverse(H, damping=lam, max_retries=max_retries)
    # R = W·G − V·H: the float targets the current weights miss (0 when X̃ = X). Formed from G − H so the
    # common part cancels exactly; recomputing W·G·A directly loses ~cond(H)·eps to float rounding.
    R = W_orig @ (G - H) + (W_orig - V) @ H  # (out, in)
    w0 = V[:, 0].clone()  # (out,)

    # Step 1, correct the past: q̃₀ = (W·G[:,0] − V[:,1:]·H[1:,0]) / H₀₀ = w₀ + R[:,0] / H₀₀ (undamped H).
    V[:, 0] = w0 + R[:, 0] / H[0, 0]
    if grid.starts_group(0):
        grid.choose_group(0, V[:, : grid.group_size])
    codes = torch.empty(W.shape, dtype=torch.int32, device=W.device)
    codes[:, 0], q0 = grid.quantize_column(0, V[:, 0])

    # Step 1b, shape the future: W[:,1:] = (W·(G + λI)[:,1:] − q₀·H[0:1,1:])·A
    #   = V[:,1:] + R[:,1:]·A + (w₀ − q₀)·H[0:1,1:]·A,  with A = U[1:,1:]ᵀ U[1:,1:]
    #   and H[0:1,1:]·A = −U[0:1,1:] / U₀₀ (block inverse), the GPTQ update of column 0's error.
    U1 = U[1:, 1:]
    V[:, 1:] += (R[:, 1:] @ U1.T) @ U1 - ((w0 - q0) / U[0, 0])[:, None] * U[0:1, 1:]
    V[:, 0] = q0

    # Loss of column 0 against the best float weights w* = W·(G + λI)·H_λ⁻¹ = V_before + R·H_λ⁻¹,
    # with H_λ⁻¹[:, 0] = U₀₀·U[0, :].
    w_star0 = w0 + R @ (U[0, 0] * U[0, :])  # (out,)
    loss0 = (q0 - w_star0).square().sum() / (2 * U[0, 0] ** 2)

    # Step 2.., GPTQ error diffusion on the corrected weights (rows/columns 1.. of U).
    loss = loss0 + diffuse_errors(V, U, grid, codes, start=1, block_size=block_size)
    if inv_perm is not None:
        codes = codes[:, inv_perm]
    return QuantResult(
        q=codes,
        scale=grid.scale,
        zero_point=grid.zero_point,
        weight=dequantize_weight(codes, grid.scale, grid.zero_point),
        loss=float(loss),
        damping=lam,
        retries=retries,
    )
