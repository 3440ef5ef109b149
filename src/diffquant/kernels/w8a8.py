"""W8A8 integer kernels: int8 weights (symmetric, per output channel) × 8-bit activation codes.

Every function here computes exactly ``Σ_k (q_x - z_x) q_w`` in integers and rescales it once:
``y = acc * s_x * s_w + bias`` (float32). The reference path computes the same products on
dequantized floats, so the two agree up to the float rounding of that reference sum and of the
final rescale.

Conventions (diffquant → kernels):
    activations: codes ``q = clamp(round(x / s) + z, qmin, qmax)`` (the reference's own formula) are
        shifted by ``-qmin`` to uint8 ``u = q - qmin`` with zero point ``z - qmin``; symmetric codes
        (``qmin = -128``) become ``u = q + 128``, zero point 128 — the same integers.
    weights: symmetric codes are int8 as stored (zero point 0); the scale ``(out, 1)`` or ``(1, 1)``
        becomes one float per output channel. Asymmetric or group-wise weights have no kernel here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def activation_codes(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, *, signed: bool = False
) -> Tensor:
    """Activation codes ``clamp(round(x / scale) + zero_point, qmin, qmax) - qmin`` as uint8 (broadcasting),
    or, with ``signed``, those minus 128 as int8 (what ``_int_mm`` multiplies).

    The float operations are those of :func:`diffquant.quant.affine.fake_quantize` (the shift is
    folded into the zero point and the bounds: integer-valued floats below 2**24 add exactly, and
    larger values clamp alike), so the codes are the ones the reference path dequantizes. Computed
    in place on one buffer: on CPU each pass over a large fresh tensor costs about as much as the pass.
    """
    shift = qmin + (128 if signed else 0)
    q = torch.div(x, scale)
    q.round_()
    q.add_(zero_point - shift)
    q.clamp_(qmin - shift, qmax - shift)
    return q.to(torch.int8 if signed else torch.uint8)


def channel_scales(scale: Tensor, out_features: int) -> Tensor:
    """A weight scale ``(out, 1)`` or ``(1, 1)`` as float32 ``(out,)``."""
    return scale.reshape(-1).float().expand(out_features).contiguous()


# --- oneDNN (x86: VNNI / AMX / AVX-512 / AVX2) ---------------------------------------------------


def onednn_pack_linear(codes: Tensor) -> Tensor:
    """Prepack int8 weight codes ``(out, in)`` for :func:`onednn_linear` (an opaque oneDNN tensor)."""
    return torch.ops.onednn.qlinear_prepack(codes.contiguous(), None)


def onednn_linear(
    codes: Tensor, x_scale: Tensor, x_zero: Tensor, packed: Tensor, w_scale: Tensor, bias: Tensor | None
) -> Tensor:
    """``(codes - x_zero) @ W_q^T * x_scale * w_scale + bias`` for uint8 ``codes (M, in)``; float32 ``(M, out)``.

    ``x_scale`` float32 and ``x_zero`` int32 are 0-d tensors (runtime values, never baked in).
    """
    w_zero = torch.zeros(w_scale.shape, dtype=torch.int32)
    return torch.ops.onednn.qlinear_pointwise.tensor(
        codes, x_scale, x_zero, packed, w_scale, w_zero, bias, 1.0, 0, torch.float32, "none", [], ""
    )


def onednn_linear_rows(
    codes: Tensor, x_scale: Tensor, x_zero: Tensor, packed: Tensor, w_scale: Tensor, col_sums: Tensor, bias
) -> Tensor:
    """:func:`onednn_linear` with one scale and zero point per row (``(M, 1)`` each).

    oneDNN takes one activation zero point, so the kernel computes ``Σ (u - 128) w`` with unit
    scales (an exact int32 sum, rounded once to float32) and the rows' own zero points come back
    through the column sums: ``Σ (u - z) w = Σ (u - 128) w + (128 - z) Σ w``.
    """
    ones = torch.ones(w_scale.shape)
    w_zero = torch.zeros(w_scale.shape, dtype=torch.int32)
    out = torch.ops.onednn.qlinear_pointwise(
        codes, 1.0, 128, packed, ones, w_zero, None, 1.0, 0, torch.float32, "none", [], ""
    )  # (M, out)
    out.addr_((128 - x_zero).reshape(-1).float(), col_sums.float())
    out.mul_(x_scale).mul_(w_scale)
    return out.add_(bias) if bias is not None else out


def onednn_pack_conv(codes: Tensor, w_scale: Tensor, stride, padding, dilation, groups: int) -> Tensor:
    """Prepack int8 conv codes ``(out, in/groups, kh, kw)`` for :func:`onednn_conv2d`.

    The packed layout does not depend on the activation scale (checked in the tests), so one pack
    serves every scale a timestep-aware quantizer produces.
    """
    return torch.ops.onednn.qconv_prepack(
        codes, w_scale, 1.0, 0, list(stride), list(padding), list(dilation), groups, None
    )


def onednn_conv2d(
    codes: Tensor,
    x_scale: Tensor,
    x_zero: Tensor,
    packed: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    stride,
    padding,
    dilation,
    groups: int,
) -> Tensor:
    """Integer conv of uint8 ``codes (N, C, H, W)`` (padding holds the zero point, i.e. 0.0); float32 out."""
    w_zero = torch.zeros(w_scale.shape, dtype=torch.int32)
    return torch.ops.onednn.qconv2d_pointwise.tensor(
        codes.contiguous(memory_format=torch.channels_last),
        x_scale,
        x_zero,
        packed,
        w_scale,
        w_zero,
        bias,
        list(stride),
        list(padding),
        list(dilation),
        groups,
        1.0,
        0,
        torch.float32,
        "none",
        [],
        "",
    )


# --- torch._int_mm (int32 accumulators; CUDA, and CPUs where oneDNN makes it fast) ----------------


def int_mm_pack(codes: Tensor) -> tuple[Tensor, Tensor]:
    """``(W_q^T (in, out) int8, column sums (out,) int32)`` for :func:`int_mm_linear`."""
    return codes.t().contiguous(), codes.to(torch.int32).sum(dim=1, dtype=torch.int32)


def int_mm_accumulators(codes: Tensor, x_zero: Tensor, weight_t: Tensor, col_sums: Tensor) -> Tensor:
    """Exact int32 ``Σ_k (u - x_zero) q_w``, ``(M, out)``, from int8 ``codes = u - 128`` ``(M, in)``.

    ``x_zero`` (the zero point of the uint8 codes ``u``) is int32, 0-d or ``(M, 1)``. ``_int_mm``
    multiplies int8 by int8, so the shift is added back through the column sums:
    ``Σ (u - z) w = Σ (u - 128) w + (128 - z) Σ w``.
    """
    acc = torch._int_mm(codes, weight_t)  # (M, out) int32
    shift = 128 - x_zero
    if shift.numel() == 1:
        return acc.add_(shift * col_sums)
    return acc.addr_(shift.reshape(-1), col_sums)  # (M, 1) zero points: an outer product


def int_mm_linear(
    codes: Tensor,
    x_scale: Tensor,
    x_zero: Tensor,
    weight_t: Tensor,
    col_sums: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
) -> Tensor:
    """``acc * x_scale * w_scale + bias``, float32 ``(M, out)``, for int8 ``codes = u - 128`` ``(M, in)``;
    ``x_scale``/``x_zero`` 0-d or per row ``(M, 1)``."""
    out = int_mm_accumulators(codes, x_zero, weight_t, col_sums).float()
    if x_scale.numel() == 1:
        out.mul_(x_scale * w_scale)
    else:
        out.mul_(x_scale).mul_(w_scale)
    return out.add_(bias) if bias is not None else out


# --- saturation guard for CPUs without VNNI -------------------------------------------------------


def int16_pairs_safe(codes: Tensor) -> bool:
    """True when no ``vpmaddubsw`` pair can saturate: ``255 * (|w_k| + |w_{k+1}|) <= 32767`` for every
    pair of neighbouring input channels (for a conv, within each kernel tap) of every output channel.
    """
    w = codes.to(torch.int32).abs()
    w = w.movedim(1, -1) if w.ndim == 4 else w  # (out, kh, kw, in): pairs run along the input channels
    if w.shape[-1] % 2:
        w = torch.nn.functional.pad(w, (0, 1))
    pairs = w.reshape(*w.shape[:-1], -1, 2).sum(-1)  # (..., in/2)
    return bool(pairs.max() * 255 <= 32767)
