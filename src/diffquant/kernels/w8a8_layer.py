"""One W8A8 layer's integer execution: its prepacked weights, its candidate paths, the choice.

:class:`W8A8Kernels` is built from a layer's int8 weight codes and per-channel scales and holds the
prepacked forms (packed lazily, the first time a path is tried). :meth:`W8A8Kernels.run` quantizes
the input with the scale of *this call* (a runtime argument: static, per-token or per-timestep),
picks the path measured fastest for the problem (:mod:`diffquant.kernels.select`) and runs it.

Activation scale granularities:

============  ==========================================  ==================================
granularity   scale / zero point shape                    integer paths
============  ==========================================  ==================================
``tensor``    one value (or all values equal)             oneDNN linear/conv, ``_int_mm``
``row``       Linear: one per row ``(..., 1)``            ``_int_mm``, oneDNN (row zero points
                                                          added back via column sums)
``sample``    Conv2d: one per sample ``(N, 1, 1, 1)``     oneDNN conv per sample group
``pixel``     Conv2d: one per pixel ``(N, 1, H, W)``      1×1 convs only, as a row-wise GEMM
============  ==========================================  ==================================

A 3×3 conv with per-pixel scales has no integer form (the scale varies inside the window sum):
it runs the reference path.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from diffquant.kernels import w8a8
from diffquant.kernels.isa import cpu_isa
from diffquant.kernels.mode import get_kernel_mode
from diffquant.kernels.select import REFERENCE, agrees_within_rounding, cached_choice, choose

_EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class ConvArgs:
    """Conv2d hyper-parameters (integer padding only)."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    @property
    def is_pointwise(self) -> bool:
        """A 1×1-style conv that is a GEMM over pixels (stride 1, no padding, one group)."""
        return self.stride == (1, 1) and self.padding == (0, 0) and self.groups == 1


class W8A8Kernels:
    """Integer paths of one layer.

    Args:
        codes: returns the int8 weight codes, ``(out, in)`` (Linear) or ``(out, in/groups, kh, kw)``
            (Conv2d); called only while packing or choosing, so no unpacked copy stays resident.
        shape: the shape of those codes.
        w_scale: float32 ``(out,)``.
        conv: the conv arguments, or None for a Linear layer.
    """

    def __init__(
        self, codes: Callable[[], Tensor], shape: tuple[int, ...], w_scale: Tensor, conv: ConvArgs | None
    ):
        self.codes = codes
        self.shape = tuple(shape)
        self.w_scale = w_scale
        self.conv = conv
        self.pointwise = conv is not None and conv.is_pointwise and self.shape[2:] == (1, 1)
        self._packs: dict[str, object] = {}
        self.paths_used: dict[tuple, str] = {}  # (input shape, granularity) → path, for kernel_report

    # --- prepacked weights (lazily; those no chosen path uses are released after each choice) ---

    def _pack(self, name: str, build: Callable[[], object]) -> object:
        if name not in self._packs:
            self._packs[name] = build()
        return self._packs[name]

    def _release_unused_packs(self) -> None:
        needed = {_PACK_OF[path] for path in self.paths_used.values() if path in _PACK_OF} | {"int16-safe"}
        if any(path.endswith("-rows") for path in self.paths_used.values()):
            needed.add("col-sums")
        for name in set(self._packs) - needed:
            del self._packs[name]

    def pack_bytes(self) -> int:
        """Bytes held by prepacked weights (oneDNN's opaque packs counted as one byte per weight)."""
        total = 0
        for name, pack in self._packs.items():
            if name == "int_mm":
                total += sum(t.nbytes for t in pack)
            elif name == "col-sums":
                total += pack.nbytes
            elif name.startswith("onednn"):
                total += math.prod(self.shape)
        return total

    def _gemm_codes(self) -> Tensor:
        return self.codes().reshape(self.shape[0], -1)  # (out, in) for Linear and 1×1 convs

    def _onednn_linear(self, codes: Tensor, x_scale: Tensor, x_zero: Tensor, bias: Tensor | None) -> Tensor:
        packed = self._pack("onednn-linear", lambda: w8a8.onednn_pack_linear(self._gemm_codes()))
        return w8a8.onednn_linear(codes, x_scale, x_zero, packed, self.w_scale, bias)

    def _onednn_linear_rows(
        self, codes: Tensor, x_scale: Tensor, x_zero: Tensor, bias: Tensor | None
    ) -> Tensor:
        packed = self._pack("onednn-linear", lambda: w8a8.onednn_pack_linear(self._gemm_codes()))
        col_sums = self._pack(
            "col-sums", lambda: self._gemm_codes().to(torch.int32).sum(dim=1, dtype=torch.int32)
        )
        return w8a8.onednn_linear_rows(codes, x_scale, x_zero, packed, self.w_scale, col_sums, bias)

    def _int_mm(self, codes: Tensor, x_scale: Tensor, x_zero: Tensor, bias: Tensor | None) -> Tensor:
        weight_t, col_sums = self._pack("int_mm", lambda: w8a8.int_mm_pack(self._gemm_codes()))
        return w8a8.int_mm_linear(codes, x_scale, x_zero, weight_t, col_sums, self.w_scale, bias)

    def _onednn_conv(self, codes: Tensor, x_scale: Tensor, x_zero: Tensor, bias: Tensor | None) -> Tensor:
        c = self.conv
        packed = self._pack(
            "onednn-conv",
            lambda: w8a8.onednn_pack_conv(
                self.codes(), self.w_scale, c.stride, c.padding, c.dilation, c.groups
            ),
        )
        return w8a8.onednn_conv2d(
            codes, x_scale, x_zero, packed, self.w_scale, bias, c.stride, c.padding, c.dilation, c.groups
        )

    # --- candidates per granularity ---

    def _onednn_allowed(self, device: torch.device) -> bool:
        return device.type == "cpu" and cpu_isa().onednn and self._exact_on_cpu()

    def _int_mm_allowed(self, device: torch.device, rows: int) -> bool:
        if device.type == "cuda":  # cuBLAS int8 GEMM shape rules
            out, inner = self._gemm_codes().shape
            return rows > 16 and inner % 8 == 0 and out % 8 == 0
        return device.type == "cpu" and self._exact_on_cpu()

    def _exact_on_cpu(self) -> bool:
        """oneDNN's u8·s8 GEMMs (``_int_mm`` included) are exact here, or the user accepts saturation."""
        if "int16-safe" not in self._packs:
            self._packs["int16-safe"] = w8a8.int16_pairs_safe(self.codes())
        return cpu_isa().exact_int8 or get_kernel_mode() == "saturating" or bool(self._packs["int16-safe"])

    def _candidates(self, x: Tensor, q: _Quantized, bias: Tensor | None) -> dict[str, Callable[[], Tensor]]:
        """name → output function (each quantizes ``x`` in the code format its kernel takes)."""
        found: dict[str, Callable[[], Tensor]] = {}
        device = x.device
        if self.conv is None:
            lead = x.shape[:-1]
            scale2d, zero2d = _per_row(q.scale, lead), _per_row(q.zero, lead)

            def shaped(y: Tensor) -> Tensor:
                return y.reshape(*lead, y.shape[-1])  # (..., out)

            def rows(signed: bool) -> Tensor:
                return q.codes(x, signed).reshape(-1, x.shape[-1])  # (M, in)

            if q.granularity == "tensor" and self._onednn_allowed(device):
                found["onednn-w8a8-linear"] = lambda: shaped(
                    self._onednn_linear(rows(False), q.scale, q.zero, bias)
                )
            if q.granularity == "row" and self._onednn_allowed(device):
                found["onednn-w8a8-linear-rows"] = lambda: shaped(
                    self._onednn_linear_rows(rows(False), scale2d, zero2d, bias)
                )
            if self._int_mm_allowed(device, math.prod(lead)):
                found["int_mm-w8a8-linear"] = lambda: shaped(self._int_mm(rows(True), scale2d, zero2d, bias))
            return found
        n, _, h, w = x.shape
        if q.granularity in ("tensor", "sample") and self._onednn_allowed(device):
            found["onednn-w8a8-conv"] = lambda: _by_sample(
                self._onednn_conv, q.codes(x, False), q.scale, q.zero, bias
            )
        if self.pointwise:
            pix_scale, pix_zero = _pixel_rows(q.scale, n, h, w), _pixel_rows(q.zero, n, h, w)

            def pixels(signed: bool) -> Tensor:  # (N*H*W, C), channels-last order
                return q.codes(x, signed).permute(0, 2, 3, 1).reshape(n * h * w, -1)

            def as_image(y: Tensor) -> Tensor:  # (N*H*W, out) -> (N, out, H, W), x's memory format
                y = y.reshape(n, h, w, -1).permute(0, 3, 1, 2)
                return y if x.is_contiguous(memory_format=torch.channels_last) else y.contiguous()

            if q.granularity == "tensor" and self._onednn_allowed(device):
                found["onednn-w8a8-conv1x1-gemm"] = lambda: as_image(
                    self._onednn_linear(pixels(False), q.scale, q.zero, bias)
                )
            if q.granularity != "tensor" and self._onednn_allowed(device):
                found["onednn-w8a8-conv1x1-gemm-rows"] = lambda: as_image(
                    self._onednn_linear_rows(pixels(False), pix_scale, pix_zero, bias)
                )
            if self._int_mm_allowed(device, n * h * w):
                found["int_mm-w8a8-conv1x1-gemm"] = lambda: as_image(
                    self._int_mm(pixels(True), pix_scale, pix_zero, bias)
                )
        return found

    # --- the forward ---

    def run(
        self,
        x: Tensor,
        scale: Tensor,
        zero_point: Tensor,
        qmin: int,
        qmax: int,
        bias: Tensor | None,
        reference: Callable[[], Tensor],
    ) -> Tensor:
        """The layer's output for float32 input ``x`` quantized with ``scale``/``zero_point`` (broadcast
        against ``x``, as the activation quantizer uses them), by the path chosen for this problem."""
        q = self._quantize(x, scale, zero_point, qmin, qmax)
        problem = (
            "conv2d" if self.conv else "linear",
            self.shape,
            self.conv,
            tuple(x.shape),
            q.granularity,
            x.device.type,
            get_kernel_mode(),  # "saturating" admits more candidates than "auto"
        )
        key = (tuple(x.shape), q.granularity)
        chosen = cached_choice(problem)
        if chosen == REFERENCE:
            self.paths_used[key] = chosen
            return reference()
        candidates = self._candidates(x, q, bias)
        if chosen is None or chosen not in candidates:
            chosen, out = choose(problem, candidates, reference, self._agreement(x, q, bias))
            self.paths_used[key] = chosen
            self._release_unused_packs()
            return out
        self.paths_used[key] = chosen
        return candidates[chosen]()

    def _agreement(self, x: Tensor, q: _Quantized, bias: Tensor | None) -> Callable[[Tensor, Tensor], bool]:
        """The check a candidate must pass: within float rounding of the reference; in ``"saturating"``
        mode within 2 % of the reference's largest magnitude (int16 saturation is accepted, garbage not)."""
        if get_kernel_mode() == "saturating":
            return lambda a, b: a.shape == b.shape and bool((a - b).abs().max() <= 0.02 * b.abs().max())
        return agrees_within_rounding(lambda: self._rounding_bound(q.codes(x, False), q.scale, q.zero, bias))

    def outputs_by_path(
        self, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, bias: Tensor | None
    ) -> dict[str, Tensor]:
        """Every integer path's output for this input (for tests and diagnostics; nothing is chosen)."""
        candidates = self._candidates(x, self._quantize(x, scale, zero_point, qmin, qmax), bias)
        return {name: fn() for name, fn in candidates.items()}

    def rounding_bound(
        self, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, bias: Tensor | None
    ) -> Tensor:
        """The elementwise tolerance between an integer path and the reference path (see the README)."""
        q = self._quantize(x, scale, zero_point, qmin, qmax)
        return self._rounding_bound(q.codes(x, False), q.scale, q.zero, bias)

    def _quantize(self, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> _Quantized:
        granularity = self._granularity(x, scale, zero_point)
        if granularity == "tensor":
            scale, zero_point = scale.reshape(-1)[0], zero_point.reshape(-1)[0]
        return _Quantized(granularity, scale, zero_point, qmin, qmax)

    def _granularity(self, x: Tensor, scale: Tensor, zero_point: Tensor) -> str:
        first_scale, first_zero = scale.reshape(-1)[0], zero_point.reshape(-1)[0]
        if scale.numel() == 1 or bool(((scale == first_scale) & (zero_point == first_zero)).all()):
            return "tensor"
        if self.conv is None:
            return "row"
        return "sample" if scale.shape[2:] == (1, 1) else "pixel"

    def _rounding_bound(self, codes: Tensor, x_scale: Tensor, x_zero: Tensor, bias: Tensor | None) -> Tensor:
        """Elementwise bound on |fast − reference|: both round a K-term float sum (≤ (K+2)·ε·Σ|terms|)."""
        x_abs = (codes.to(torch.int32) - x_zero).abs().float() * x_scale  # |x̂|
        w_codes = self.codes()
        w_abs = w_codes.float().abs() * self.w_scale.reshape(-1, *([1] * (w_codes.ndim - 1)))  # |Ŵ|
        inner = w_codes[0].numel()
        if self.conv is None:
            terms = F.linear(x_abs, w_abs)
        else:
            c = self.conv
            terms = F.conv2d(x_abs, w_abs, None, c.stride, c.padding, c.dilation, c.groups)
        bias_abs = (
            0.0 if bias is None else bias.abs().reshape(-1, *([1] * (terms.ndim - 2 if self.conv else 0)))
        )
        return 2 * (inner + 2) * _EPS * (terms + bias_abs) + 1e-30


@dataclass(frozen=True)
class _Quantized:
    """How this call quantizes its input: granularity, the quantizer's scale and zero point (float,
    broadcastable to the input; 0-d per tensor) and code range."""

    granularity: str
    float_scale: Tensor
    float_zero: Tensor
    qmin: int
    qmax: int

    @property
    def scale(self) -> Tensor:
        """float32 scale."""
        return self.float_scale.float()

    @property
    def zero(self) -> Tensor:
        """int32 zero point of the uint8 codes (``zero_point - qmin``)."""
        return (self.float_zero - self.qmin).to(torch.int32)

    def codes(self, x: Tensor, signed: bool) -> Tensor:
        """uint8 codes (int8 minus 128 with ``signed``) of ``x``, as the reference quantizes it."""
        return w8a8.activation_codes(
            x, self.float_scale, self.float_zero, self.qmin, self.qmax, signed=signed
        )


_PACK_OF = {
    "onednn-w8a8-linear": "onednn-linear",
    "onednn-w8a8-conv1x1-gemm": "onednn-linear",
    "onednn-w8a8-conv": "onednn-conv",
    "onednn-w8a8-linear-rows": "onednn-linear",
    "onednn-w8a8-conv1x1-gemm-rows": "onednn-linear",
    "int_mm-w8a8-linear": "int_mm",
    "int_mm-w8a8-conv1x1-gemm": "int_mm",
}


def _per_row(values: Tensor, lead: tuple[int, ...]) -> Tensor:
    """A scale/zero point broadcastable to ``(*lead, 1)`` as ``(prod(lead), 1)`` (0-d when per tensor)."""
    if values.numel() == 1:
        return values.reshape(())
    return values.expand(*lead, 1).reshape(-1, 1)


def _pixel_rows(values: Tensor, n: int, h: int, w: int) -> Tensor:
    """``(N|1, 1, H|1, W|1)`` scales as one per pixel row ``(N*H*W, 1)`` (0-d when per tensor)."""
    if values.numel() == 1:
        return values.reshape(())
    return values.expand(n, 1, h, w).permute(0, 2, 3, 1).reshape(n * h * w, 1)


def _by_sample(conv: Callable, codes: Tensor, x_scale: Tensor, x_zero: Tensor, bias: Tensor | None) -> Tensor:
    """Run a per-tensor conv once per group of consecutive samples that share (scale, zero point)."""
    if x_scale.numel() == 1:
        return conv(codes, x_scale.reshape(()), x_zero.reshape(()), bias)
    scales, zeros = x_scale.reshape(-1), x_zero.reshape(-1)  # (N,)
    same = (scales[1:] == scales[:-1]) & (zeros[1:] == zeros[:-1])
    starts = [0, *(torch.nonzero(~same).reshape(-1) + 1).tolist(), scales.numel()]
    parts = [conv(codes[a:b], scales[a], zeros[a], bias) for a, b in itertools.pairwise(starts)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]
