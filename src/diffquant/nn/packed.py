"""Typed containers for packed quantized weights.

Each container is a small :class:`torch.nn.Module` whose declared buffers are the stored tensors,
so ``state_dict`` / ``load_state_dict`` / ``.to(device)`` work unchanged and a checkpoint holds
exactly the packed bytes. A weight of any shape is handled as a 2-D ``(out, in)`` matrix (a Conv2d
kernel ``(out, in, kh, kw)`` is flattened to ``(out, in*kh*kw)``) and reshaped back on
:meth:`PackedWeight.dequantize`.

Containers are built with ``from_float`` (quantize) or ``empty`` (allocate the right shapes, e.g.
before ``load_state_dict`` of a saved checkpoint), and describe themselves with ``meta()`` — the
JSON-serialisable facts needed to rebuild them. Loading never trusts a description: ``from_meta``
checks every field (types, ranges, the expected weight shape) *before* allocating anything, and
``check_values`` checks the loaded tensors (finite, positive scales, codes in range).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from diffquant.config import WeightQuantConfig
from diffquant.quant import affine, nf4, packing


class PackedWeight(nn.Module):
    """Base class: a quantized weight that can be dequantized to a float tensor."""

    format: ClassVar[str]
    registry: ClassVar[dict[str, type[PackedWeight]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        PackedWeight.registry[cls.format] = cls

    shape: tuple[int, ...]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Float weight of the original shape."""
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        """JSON-serialisable description; ``PackedWeight.from_meta(meta)`` rebuilds an empty container."""
        raise NotImplementedError

    def numerical_warning(self) -> str | None:
        """A sentence on precision this weight lost beyond what its format promises, or None."""
        return None

    def _apply(self, fn, recurse=True):
        """Device moves apply, dtype casts do not: codes and scales keep their stored dtypes, so
        ``model.to(torch.bfloat16)`` leaves the float32 scales exact (``dequantize(dtype)`` computes in
        float32 and casts the weight to the compute dtype at use)."""
        stored = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, old in stored.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    @property
    def device(self) -> torch.device:
        """Where the packed codes live (peft reads ``layer.qweight.device`` when it wraps a layer)."""
        return self.qdata.device

    @property
    def numel(self) -> int:
        """Number of weights represented."""
        return math.prod(self.shape)

    @property
    def storage_bytes(self) -> int:
        """Bytes of every stored tensor (codes, scales, zero points, ...)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per represented weight, overhead of scales included."""
        return 8.0 * self.storage_bytes / self.numel

    @staticmethod
    def from_meta(meta: dict[str, Any], shape: tuple[int, ...] | None = None) -> PackedWeight:
        """Allocate an empty container described by :meth:`meta` (e.g. before loading a checkpoint).

        Args:
            meta: the description; every field is checked before anything is allocated.
            shape: the weight shape the layer being rebuilt has; the description must match it.

        Raises:
            ValueError: an unknown format, a missing/unknown/ill-typed field, or another shape (the
                message names the field).
        """
        if not isinstance(meta, dict):
            raise ValueError(f"the weight description must be a JSON object, got {type(meta).__name__}.")
        fmt = meta.get("format")
        if fmt not in PackedWeight.registry:
            raise ValueError(
                f"unknown packed weight format {fmt!r}; known: {sorted(PackedWeight.registry)}. "
                "Was the checkpoint written by a newer diffquant?"
            )
        cls = PackedWeight.registry[fmt]
        cls.check_meta(meta, shape)
        return cls.empty(meta)

    @classmethod
    def check_meta(cls, meta: dict[str, Any], shape: tuple[int, ...] | None = None) -> None:
        """Raise ``ValueError`` naming the field unless ``meta`` is a valid description (of ``shape``)."""
        raise NotImplementedError

    def check_values(self) -> None:
        """Raise ``ValueError`` naming the tensor unless the stored tensors are usable (finite, positive
        scales, codes in range). Run after loading untrusted tensors."""
        raise NotImplementedError

    @staticmethod
    def from_float(weight: Tensor, config: WeightQuantConfig) -> PackedWeight:
        """Quantize ``weight`` round-to-nearest as ``config`` says."""
        cls = PackedWeight.registry[config.format]
        return cls.from_float(weight, config)  # type: ignore[attr-defined]


def _check_fields(meta: dict[str, Any], expected: set[str]) -> None:
    missing, unknown = sorted(expected - set(meta)), sorted(set(meta) - expected)
    if missing or unknown:
        raise ValueError(f"weight description: missing field(s) {missing}, unknown field(s) {unknown}.")


def _int_field(meta: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"weight field {key!r} must be an integer in {lo}..{hi}, got {value!r}.")
    return value


def _bool_field(meta: dict[str, Any], key: str) -> bool:
    if not isinstance(meta[key], bool):
        raise ValueError(f"weight field {key!r} must be true or false, got {meta[key]!r}.")
    return meta[key]


def _check_shape(meta: dict[str, Any], shape: tuple[int, ...] | None) -> tuple[int, ...]:
    value = meta["shape"]
    if (
        not isinstance(value, list)
        or len(value) not in (2, 4)
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in value)
    ):
        raise ValueError(f"weight field 'shape' must be 2 or 4 positive integers, got {value!r}.")
    if shape is not None and tuple(value) != tuple(shape):
        raise ValueError(f"weight field 'shape' is {value} but the layer's weight is {list(shape)}.")
    return tuple(value)


def _check_finite(name: str, t: Tensor) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"tensor {name!r} contains NaN/Inf.")


def _flatten_2d(weight: Tensor) -> Tensor:
    # (out, in, kh, kw) -> (out, in*kh*kw); Linear (out, in) unchanged
    return weight.detach().reshape(weight.shape[0], -1).float()


class IntPackedWeight(PackedWeight):
    """Affine INT weight, 2..8 bits, packed (8 → 1/byte, 4 → 2/byte, 2 → 4/byte, 3/5/6/7 → 1/byte).

    Buffers:
        qdata: ``uint8 (ceil(out*in*bits_stored/8),)`` unsigned codes ``q - qmin``, first element in
            the high bits.
        scale: ``float32 (out, n_groups)`` (``(1, 1)`` per-tensor, ``(out, 1)`` per-channel).
        zero_point: ``uint8 (out, n_groups)``, asymmetric only (symmetric has zero point 0 and stores none).
    """

    format = "int"

    def __init__(self, shape: tuple[int, ...], bits: int, symmetric: bool, scale_shape: tuple[int, int]):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.bits = int(bits)
        self.symmetric = bool(symmetric)
        self.qmin, self.qmax = affine.int_range(self.bits, self.symmetric)
        stored = packing.storage_bits(self.bits)
        self.register_buffer("qdata", torch.zeros(math.ceil(self.numel * stored / 8), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(scale_shape, dtype=torch.float32))
        if not self.symmetric:
            self.register_buffer("zero_point", torch.zeros(scale_shape, dtype=torch.uint8))

    @classmethod
    def from_float(cls, weight: Tensor, config: WeightQuantConfig) -> IntPackedWeight:
        """Quantize a float weight round-to-nearest with ``config`` (bits, granularity, range)."""
        w2d = _flatten_2d(weight)
        scale, zero_point = affine.choose_qparams(
            w2d, config.bits, config.symmetric, config.granularity, config.group_size, config.range_method
        )
        q = affine.quantize_weight(w2d, scale, zero_point, config.bits, config.symmetric)
        return cls.from_codes(tuple(weight.shape), q, scale, zero_point, config.bits, config.symmetric)

    @classmethod
    def from_codes(
        cls, shape: tuple[int, ...], q: Tensor, scale: Tensor, zero_point: Tensor, bits: int, symmetric: bool
    ) -> IntPackedWeight:
        """Pack integer codes ``q`` (2-D, in ``[qmin, qmax]``) with their scale and zero point.

        Calibrated methods (GPTQ, Qronos) compute codes themselves and store them through this.
        """
        packed = cls(shape, bits, symmetric, tuple(scale.shape))
        codes = (q.to(torch.int32) - packed.qmin).to(torch.uint8)
        packed.qdata = packing.pack_int(codes, packing.storage_bits(bits)).to(q.device)
        packed.scale = scale.detach().float().clone()
        if not symmetric:
            packed.zero_point = zero_point.detach().to(torch.uint8).clone()
        return packed

    @classmethod
    def empty(cls, meta: dict[str, Any]) -> IntPackedWeight:
        """Allocate from :meth:`meta` (checked by :meth:`PackedWeight.from_meta`)."""
        return cls(tuple(meta["shape"]), meta["bits"], meta["symmetric"], tuple(meta["scale_shape"]))

    @classmethod
    def check_meta(cls, meta: dict[str, Any], shape: tuple[int, ...] | None = None) -> None:
        """Fields, bits 2..8, and a scale shape ``(1, 1)`` or ``(out, n_groups)`` with ``n_groups``
        dividing the flattened input size (so the scale is never larger than the weight)."""
        _check_fields(meta, {"format", "shape", "bits", "symmetric", "scale_shape"})
        out, *rest = _check_shape(meta, shape)
        _int_field(meta, "bits", 2, 8)
        _bool_field(meta, "symmetric")
        scale_shape, fan_in = meta["scale_shape"], math.prod(rest)
        valid = (
            isinstance(scale_shape, list)
            and len(scale_shape) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in scale_shape)
            and (scale_shape == [1, 1] or (scale_shape[0] == out and fan_in % scale_shape[1] == 0))
        )
        if not valid:
            raise ValueError(
                f"weight field 'scale_shape' must be [1, 1] or [{out}, n_groups] with n_groups dividing "
                f"{fan_in}, got {scale_shape!r}."
            )

    def check_values(self) -> None:
        """Scales finite and > 0; codes and zero points within ``0 .. 2**bits - 1``."""
        _check_finite("scale", self.scale)
        if not (self.scale > 0).all():
            raise ValueError("tensor 'scale' has zero or negative entries; quantization scales are positive.")
        top = (1 << self.bits) - 1
        if packing.storage_bits(self.bits) == 8 and self.bits < 8 and int(self.qdata.max()) > top:
            raise ValueError(f"tensor 'qdata' holds codes above {top}, out of range for {self.bits} bits.")
        if not self.symmetric and int(self.zero_point.max()) > top:
            raise ValueError(
                f"tensor 'zero_point' holds values above {top}, out of range for {self.bits} bits."
            )

    def meta(self) -> dict[str, Any]:
        """Format, shape, bits, symmetry and scale shape."""
        return {
            "format": self.format,
            "shape": list(self.shape),
            "bits": self.bits,
            "symmetric": self.symmetric,
            "scale_shape": list(self.scale.shape),
        }

    def int_codes(self) -> Tensor:
        """Signed integer codes ``(out, in)`` as int32 (``qmin..qmax``)."""
        out = self.shape[0]
        codes = packing.unpack_int(self.qdata, packing.storage_bits(self.bits), self.numel)
        return codes.to(torch.int32).reshape(out, -1) + self.qmin  # (out, in)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``(q - z) * scale`` reshaped to the original weight shape."""
        zero_point = self.zero_point.to(torch.int32) if not self.symmetric else torch.zeros_like(self.scale)
        w2d = affine.dequantize_weight(self.int_codes(), self.scale, zero_point)
        return w2d.reshape(self.shape).to(dtype)


class NF4PackedWeight(PackedWeight):
    """4-bit NormalFloat weight with block-wise absmax, optionally double-quantized (QLoRA).

    Codes and packing are identical to bitsandbytes ``quantize_4bit(quant_type="nf4")``.

    Buffers:
        qdata: ``uint8 (ceil(numel/2),)`` two codes per byte, first element in the high nibble.
        absmax: ``float32 (n_blocks,)`` without double quantization; with it, ``absmax_q``
            ``uint8 (n_blocks,)``, ``absmax_scale`` ``float32 (ceil(n_blocks/256),)`` and
            ``absmax_offset`` ``float32 ()``.
    """

    format = "nf4"

    def __init__(self, shape: tuple[int, ...], block_size: int, double_quant: bool, dtype: torch.dtype):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.block_size = int(block_size)
        self.double_quant = bool(double_quant)
        self.orig_dtype = dtype
        n_blocks = math.ceil(self.numel / self.block_size)
        self.register_buffer("qdata", torch.zeros(math.ceil(self.numel / 2), dtype=torch.uint8))
        if self.double_quant:
            self.register_buffer("absmax_q", torch.zeros(n_blocks, dtype=torch.uint8))
            self.register_buffer("absmax_scale", torch.ones(math.ceil(n_blocks / 256), dtype=torch.float32))
            self.register_buffer("absmax_offset", torch.zeros((), dtype=torch.float32))
        else:
            self.register_buffer("absmax", torch.ones(n_blocks, dtype=torch.float32))

    @classmethod
    def from_float(cls, weight: Tensor, config: WeightQuantConfig) -> NF4PackedWeight:
        """Quantize ``weight`` to NF4 with ``config.block_size`` / ``config.double_quant``."""
        codes = nf4.quantize_nf4(weight.detach(), config.block_size, config.double_quant)
        packed = cls(tuple(weight.shape), config.block_size, config.double_quant, weight.dtype)
        packed.qdata = codes.packed
        if config.double_quant:
            packed.absmax_q = codes.absmax_q
            packed.absmax_scale = codes.absmax_scale
            packed.absmax_offset = codes.absmax_offset
            flat = weight.detach().reshape(-1).float()
            blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % config.block_size))
            absmax = blocks.reshape(-1, config.block_size).abs().amax(dim=1)  # (n_blocks,)
            kept = absmax > 0
            error = (nf4.dequantize_absmax(packed.codes()) - absmax).abs()[kept] / absmax[kept]
            packed.absmax_error = float(error.max()) if error.numel() else 0.0
        else:
            packed.absmax = codes.absmax
        return packed

    MAX_ABSMAX_ERROR: ClassVar[float] = 0.2
    """Relative error of a double-quantized block absmax above which :meth:`numerical_warning` speaks
    (typical weights stay under 0.05; one block 100x larger than the rest pushes the others past 0.3)."""

    absmax_error: float = 0.0
    """Largest relative error of a block's double-quantized absmax, measured by :meth:`from_float`."""

    def numerical_warning(self) -> str | None:
        """Why this weight lost precision (one outlier block dominating the 8-bit absmax statistics), or
        None."""
        if self.absmax_error <= self.MAX_ABSMAX_ERROR:
            return None
        return (
            f"NF4 double quantization distorts block absmax values by up to {100 * self.absmax_error:.0f}% "
            "(one outlier block dominates the 8-bit absmax statistics); use double_quant=False or a "
            "smaller block_size for this layer, or keep it in float."
        )

    @classmethod
    def empty(cls, meta: dict[str, Any]) -> NF4PackedWeight:
        """Allocate from :meth:`meta` (checked by :meth:`PackedWeight.from_meta`)."""
        return cls(tuple(meta["shape"]), meta["block_size"], meta["double_quant"], torch.float32)

    @classmethod
    def check_meta(cls, meta: dict[str, Any], shape: tuple[int, ...] | None = None) -> None:
        """Fields, a power-of-two block size in 32..4096 and a boolean double-quant flag."""
        _check_fields(meta, {"format", "shape", "block_size", "double_quant"})
        _check_shape(meta, shape)
        size = _int_field(meta, "block_size", 32, 4096)
        if size & (size - 1):
            raise ValueError(f"weight field 'block_size' must be a power of two, got {size}.")
        _bool_field(meta, "double_quant")

    def check_values(self) -> None:
        """Block statistics finite, absmax and its double-quant scales >= 0 (every 4-bit code is valid)."""
        stats = ("absmax_q", "absmax_scale", "absmax_offset") if self.double_quant else ("absmax",)
        for name in stats:
            _check_finite(name, getattr(self, name))
        for name in ("absmax_scale",) if self.double_quant else ("absmax",):
            if (getattr(self, name) < 0).any():
                raise ValueError(f"tensor {name!r} has negative entries; absolute maxima are >= 0.")

    def meta(self) -> dict[str, Any]:
        """Format, shape, block size and double-quant flag."""
        return {
            "format": self.format,
            "shape": list(self.shape),
            "block_size": self.block_size,
            "double_quant": self.double_quant,
        }

    def codes(self) -> nf4.NF4Codes:
        """The stored tensors as an :class:`~diffquant.quant.nf4.NF4Codes` record."""
        stats = (
            {
                "absmax_q": self.absmax_q,
                "absmax_scale": self.absmax_scale,
                "absmax_offset": self.absmax_offset,
            }
            if self.double_quant
            else {"absmax": self.absmax}
        )
        return nf4.NF4Codes(
            packed=self.qdata,
            shape=self.shape,
            dtype=self.orig_dtype,
            block_size=self.block_size,
            double_quant=self.double_quant,
            **stats,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dequantize to ``dtype`` (QLISA dequantizes to bf16 on the fly)."""
        return nf4.dequantize_nf4(self.codes(), dtype=dtype)
