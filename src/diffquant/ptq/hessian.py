"""Second-order statistics for GPTQ / Qronos: input moments, conv unfolding, damped Cholesky inverse.

A linear layer ``y = W x`` with ``W (out, in)`` sees calibration inputs ``x`` (rows of ``(N, in)``). GPTQ
(Frantar et al., ICLR 2023) minimises ``‖W X − Ŵ X‖²`` whose Hessian is ``H = 2/n Σ x xᵀ``; Qronos
(Zhang, Zhang, Colbert, Saab 2025) minimises the mismatched ``‖W X − Ŵ X̃‖²`` and also needs the cross
moment ``G = 2/n Σ x x̃ᵀ`` between the float inputs ``x`` and the inputs ``x̃`` the already-quantized
network produces. A Conv2d is the same problem on unfolded patches (:func:`unfold_conv_input`).

Everything here is a pure tensor function (or the small accumulator :class:`InputStatistics`); the
calibration pipeline that runs the model and calls them lives elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


class NotPositiveDefiniteError(ValueError):
    """The damped Hessian could not be Cholesky-factorised even after raising the damping."""


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_padding(conv: nn.Conv2d, kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, ...]:
    """``(left, right, top, bottom)`` padding of ``conv``, as :func:`torch.nn.functional.pad` takes it."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":  # PyTorch puts the odd pixel of an even total padding on the far side
        total = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        return (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)
    ph, pw = _pair(conv.padding)
    return (pw, pw, ph, ph)


def unfold_conv_input(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """Unfold a Conv2d input into the patch matrix its flattened kernel multiplies.

    ``conv(x)`` equals ``unfold_conv_input(x, conv) @ conv.weight.reshape(out, -1).T`` (plus bias),
    reshaped to ``(N, H_out, W_out, out)``: the patch columns are ordered ``(C, kh, kw)`` like the weight
    view ``(out, in*kh*kw)`` used throughout :mod:`diffquant.quant`. Only the attributes ``kernel_size``,
    ``stride``, ``padding`` (ints, tuples, ``"same"`` or ``"valid"``), ``dilation``, ``groups`` and
    ``padding_mode`` of ``conv`` are read.

    Args:
        x: input ``(N, C, H, W)``.
        conv: a Conv2d (or any object with those attributes).

    Returns:
        ``(N * H_out * W_out, C * kh * kw)`` in ``x``'s dtype.

    Raises:
        ValueError: ``x`` is not 4-D, its channels do not match ``conv``, or ``conv.groups != 1``
            (grouped/depthwise convs have one Hessian per group, which the flattened-weight view of
            GPTQ/Qronos does not express: keep such layers in higher precision or quantize them with RTN).
    """
    if x.dim() != 4:
        raise ValueError(f"expected a Conv2d input (N, C, H, W), got shape {tuple(x.shape)}")
    if conv.groups != 1:
        raise ValueError(
            f"grouped convolutions (groups={conv.groups}) are not supported by GPTQ/Qronos statistics; "
            "exclude the layer from second-order calibration (e.g. quantize it with RTN)"
        )
    in_channels = getattr(conv, "in_channels", x.shape[1])
    if x.shape[1] != in_channels:
        raise ValueError(f"input has {x.shape[1]} channels but the conv expects {in_channels}")
    kernel, stride, dilation = _pair(conv.kernel_size), _pair(conv.stride), _pair(conv.dilation)
    padding_mode = getattr(conv, "padding_mode", "zeros")
    if padding_mode not in _PAD_MODES:
        raise ValueError(f"unknown padding_mode {padding_mode!r}; expected one of {sorted(_PAD_MODES)}")
    pad = _conv_padding(conv, kernel, dilation)
    if any(pad):
        x = F.pad(x, pad, mode=_PAD_MODES[padding_mode])
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (N, C*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (N*L, C*kh*kw)


def _check_inputs(x: Tensor, name: str) -> Tensor:
    if x.dim() < 2:
        raise ValueError(f"{name} must be (N, in) (or (..., in)), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(
            f"calibration inputs ({name}) contain NaN/Inf; check the model's forward in float and the "
            "activation quantizers upstream of this layer"
        )
    return x.reshape(-1, x.shape[-1])  # (N, in)


class InputStatistics:
    """Streaming ``H = 2/n Σ x̃ x̃ᵀ`` and, optionally, ``G = 2/n Σ x x̃ᵀ`` over calibration rows.

    The running-mean update of GPTQ's reference code keeps the values O(1) whatever the sample count:
    for a batch of ``m`` rows after ``n`` rows, ``H ← n/(n+m) · H + 2/(n+m) · X̃ᵀX̃`` (likewise ``G`` with
    ``XᵀX̃``). ``G`` (rows: float features, columns: quantized-path features) is kept when the first
    :meth:`add` passes ``x_float``; every later call must then pass it too.

    Args:
        in_features: expected feature count; inferred from the first batch when ``None``.
        dtype: accumulation dtype, ``torch.float32`` (default) or ``torch.float64``.
        device: accumulation device; the first batch's device when ``None``.

    Example:
        >>> stats = InputStatistics()
        >>> stats.add(torch.randn(256, 64))
        >>> stats.H.shape, stats.count
        (torch.Size([64, 64]), 256)
    """

    def __init__(
        self,
        in_features: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"statistics are kept in float32 or float64, got {dtype}")
        self.in_features = in_features
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self._count = 0
        self._h: Tensor | None = None
        self._g: Tensor | None = None

    def add(self, x_tilde: Tensor, x_float: Tensor | None = None) -> None:
        """Accumulate one batch.

        Args:
            x_tilde: inputs of the layer on the quantized path (or the only inputs, for GPTQ),
                ``(N, in)``; leading dims beyond one are flattened.
            x_float: the float-path inputs for the same samples, same shape, for the cross term ``G``.

        Raises:
            ValueError: NaN/Inf inputs, wrong feature count, ``x_float`` shape differing from
                ``x_tilde``, or ``x_float`` given in some calls and not in others.
        """
        xt = _check_inputs(x_tilde, "x_tilde")  # (N, in)
        if self.in_features is None:
            self.in_features = xt.shape[1]
        if xt.shape[1] != self.in_features:
            raise ValueError(f"x_tilde has {xt.shape[1]} features, expected {self.in_features}")
        if x_float is not None and x_float.shape != x_tilde.shape:
            raise ValueError(
                f"x_float shape {tuple(x_float.shape)} != x_tilde shape {tuple(x_tilde.shape)}; both must "
                "come from the same calibration batch"
            )
        if self._count and (x_float is None) != (self._g is None):
            raise ValueError(
                "x_float must be given in every add() call or in none (G needs float and quantized-path "
                "inputs of the same samples)"
            )
        xf = None if x_float is None else _check_inputs(x_float, "x_float")  # (N, in)
        m = xt.shape[0]
        if m == 0:
            return
        if self.device is None:
            self.device = xt.device
        if self._h is None:
            n_in = self.in_features
            self._h = torch.zeros(n_in, n_in, dtype=self.dtype, device=self.device)
            if xf is not None:
                self._g = torch.zeros(n_in, n_in, dtype=self.dtype, device=self.device)
        n = self._count
        xt = xt.to(device=self.device, dtype=self.dtype)
        self._h.mul_(n / (n + m)).addmm_(xt.T, xt, alpha=2.0 / (n + m))
        if xf is not None:
            xf = xf.to(device=self.device, dtype=self.dtype)
            self._g.mul_(n / (n + m)).addmm_(xf.T, xt, alpha=2.0 / (n + m))
        self._count = n + m

    @property
    def count(self) -> int:
        """Number of input rows accumulated so far."""
        return self._count

    @property
    def H(self) -> Tensor:
        """``(in, in)`` second moment of the quantized-path inputs, ``2/n Σ x̃ x̃ᵀ``."""
        if self._h is None:
            raise ValueError("no calibration data was added; call add() with at least one input batch")
        return self._h

    @property
    def G(self) -> Tensor:
        """``(in, in)`` cross moment ``2/n Σ x x̃ᵀ`` (row ``i``: float feature ``i``)."""
        if self._h is None:
            raise ValueError("no calibration data was added; call add() with at least one input batch")
        if self._g is None:
            raise ValueError("G needs float-path inputs: pass x_float to add() (Qronos statistics)")
        return self._g


def dead_inputs(H: Tensor) -> Tensor:
    """Bool ``(in,)``: the inputs that were always zero in calibration (``H_ii == 0``)."""
    return torch.diagonal(H) == 0


def fix_dead_inputs(H: Tensor, W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ's dead-input fix: ``H_ii = 0 → H_ii = 1`` and weight column ``i`` zeroed (copies).

    A column whose input never fires does not affect the calibration loss; zeroing it makes it quantize
    exactly to 0 and the unit diagonal keeps ``H`` invertible.

    Returns:
        ``(H_fixed (in, in), W_fixed (out, in), dead (in,) bool)``.
    """
    dead = dead_inputs(H)
    H = H.clone()
    W = W.clone()
    if dead.any():
        idx = dead.nonzero().squeeze(1)
        H[idx, idx] = 1.0
        W[:, dead] = 0.0
    return H, W, dead


def spectral_norm(H: Tensor, iters: int = 30) -> float:
    """Largest eigenvalue magnitude of a symmetric ``H`` by power iteration (a lower estimate).

    Starts from a fixed pseudo-random vector (seed 0) so results are reproducible; ``iters`` matrix-vector
    products cost ``O(iters · in²)``.
    """
    gen = torch.Generator(device=H.device).manual_seed(0)
    v = torch.randn(H.shape[0], generator=gen, device=H.device, dtype=H.dtype)
    v = v / v.norm()
    lam = H.new_zeros(())
    for _ in range(iters):
        hv = H @ v
        lam = hv.norm()
        if lam == 0:
            return 0.0
        v = hv / lam
    return float(lam)


def condition_number(H: Tensor, iters: int = 30) -> float:
    """Estimate ``λ_max / λ_min`` of a symmetric ``H`` (``inf`` when ``H`` is not positive definite).

    ``λ_max`` by power iteration on ``H``, ``λ_min`` by power iteration on ``H⁻¹`` through one float64
    Cholesky factorisation (about the cost of the algorithm's own), so the estimate is a slight
    underestimate when eigenvalues cluster. Meant for adaptive damping (raise ``percdamp`` for layers
    whose estimate is large), not as an exact value.
    """
    h64 = H.double()
    L, info = torch.linalg.cholesky_ex(h64)
    if info.item() != 0:
        return float("inf")
    lam_max = spectral_norm(h64, iters)
    gen = torch.Generator(device=H.device).manual_seed(0)
    v = torch.randn(H.shape[0], 1, generator=gen, device=H.device, dtype=torch.float64)
    inv_max = 0.0
    for _ in range(iters):
        v = torch.cholesky_solve(v / v.norm(), L)  # H⁻¹ v, (in, 1)
        inv_max = float(v.norm())
    return lam_max * inv_max


def damped_cholesky_inverse(
    H: Tensor,
    percdamp: float = 0.01,
    *,
    damping: float | None = None,
    max_retries: int = 5,
    growth: float = 10.0,
) -> tuple[Tensor, float, int]:
    """Upper Cholesky factor ``U`` of ``(H + λ I)⁻¹`` (``(H + λI)⁻¹ = Uᵀ U``), as GPTQ uses it.

    ``λ = percdamp · mean(diag H)`` unless an absolute ``damping`` is given. If either factorisation
    fails (``torch.linalg.cholesky_ex`` reports a non-positive pivot) or produces non-finite values, ``λ``
    is multiplied by ``growth`` and the factorisation retried, at most ``max_retries`` times (a zero
    ``λ`` first becomes ``1e-6 · mean(|diag H|)``). There is no silent fallback to round-to-nearest.

    Returns:
        ``(U (in, in) upper triangular in H's dtype, λ used, number of retries)``.

    Raises:
        NotPositiveDefiniteError: still not factorisable after ``max_retries`` retries.
        ValueError: ``H`` not square or not finite, negative ``percdamp``/``damping``/``max_retries``,
            or ``growth <= 1``.
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square (in, in) matrix, got shape {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise ValueError("H contains NaN/Inf; the calibration statistics are corrupt, recollect them")
    if percdamp < 0 or (damping is not None and damping < 0):
        raise ValueError(f"damping must be >= 0, got percdamp={percdamp}, damping={damping}")
    if max_retries < 0 or growth <= 1:
        raise ValueError(f"need max_retries >= 0 and growth > 1, got {max_retries} and {growth}")
    diag = torch.diagonal(H)
    lam = float(percdamp * diag.mean()) if damping is None else float(damping)
    lam = max(lam, 0.0)
    floor = 1e-6 * max(float(diag.abs().mean()), torch.finfo(H.dtype).tiny)
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    first = lam
    for attempt in range(max_retries + 1):
        if attempt:
            lam = lam * growth if lam > 0 else floor
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if info.item() == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                return U, lam, attempt
    raise NotPositiveDefiniteError(
        f"the {H.shape[0]}x{H.shape[0]} Hessian is not positive definite even with damping {lam:.3g} "
        f"(started at {first:.3g}, {max_retries} retries x{growth:g}; min diag {float(diag.min()):.3g}, "
        f"mean diag {float(diag.mean()):.3g}). H must be a symmetric PSD second moment of real inputs: "
        "check the calibration statistics, collect more calibration samples, or raise percdamp / max_retries"
    )
