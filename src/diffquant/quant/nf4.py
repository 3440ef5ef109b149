"""NF4 (4-bit NormalFloat) block-wise quantization with double quantization of the block scales.

QLoRA (Dettmers et al., NeurIPS 2023) and its reference implementation bitsandbytes: flatten the tensor,
split it into blocks of ``block_size`` values, store each block's absmax and, per value, the index of
the nearest NF4 codebook entry of ``x / absmax``; two indices per byte, first element in the high
nibble. Double quantization stores the block absmaxes themselves in 8 bits: subtract their mean and
quantize blockwise (256 per block) with bitsandbytes' signed 8-bit *dynamic* code.

Codes, packing and nested statistics are identical to bitsandbytes'
``quantize_4bit(x, blocksize, quant_type="nf4", compress_statistics=double_quant)`` on CPU (cross-checked
in ``tests/quant/test_nf4.py``); bitsandbytes is not imported here.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor

from diffquant.quant.packing import pack_int, unpack_int

NF4_CODEBOOK = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
"""The 16 NF4 values, ascending; index 7 is exactly 0.

Derivation (QLoRA, Appendix E; bitsandbytes ``create_normal_map(offset=0.9677083)``): with ``Φ⁻¹`` the
standard normal quantile function and ``δ = 0.9677083``, take 8 positive values
``Φ⁻¹(linspace(δ, 0.5, 9)[:-1])``, 7 negative values ``-Φ⁻¹(linspace(δ, 0.5, 8)[:-1])`` and 0, sort, and
divide by the largest magnitude. The halves have 8 and 7 non-zero values so that 0 is represented
exactly (asymmetric), and ``δ`` puts the outermost quantiles at ±1 after normalisation.
"""

NF4_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Block sizes accepted by bitsandbytes' ``quantize_4bit``."""

DQ_BLOCK_SIZE = 256
"""Absmaxes per second-level block in double quantization (bitsandbytes' fixed value)."""

# bitsandbytes clamps the divisor of an all-zero block to this value (the block's codes are then 7).
_ABSMAX_FLOOR = 1e-38
# bitsandbytes' CPU 8-bit blockwise quantizer looks codes up in a table of this many bins over [-1, 1].
_DYNAMIC_LUT_SIZE = 65536


def create_dynamic_map() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic quantization code (Dettmers 2016, arXiv:1511.04561).

    Re-implements ``bitsandbytes.functional.create_dynamic_map(signed=True)`` (7 exponent bits, 8 total):
    for ``e`` in ``0..6`` it holds the midpoints of ``2**e + 1`` evenly spaced points in ``[0.1, 1]``,
    scaled by ``10**(e - 6)``, with both signs; plus 0 and 1. 256 values ascending, fp32
    (``[-0.99297, ..., 0, ..., 1]``).
    """
    values: list[float] = []
    for e in range(7):
        boundaries = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        magnitude = 10 ** (e - 6)
        values += (magnitude * means).tolist()
        values += (-magnitude * means).tolist()
    values += [0.0, 1.0]  # 2 * (1 + 2 + ... + 64) + 2 = 256 values
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def _dynamic_code_and_lut(device: torch.device) -> tuple[Tensor, Tensor]:
    """The dynamic code and bitsandbytes' CPU encoding table on ``device``.

    bitsandbytes' CPU kernel does not search the code per value: it maps ``v`` in [-1, 1] to bin
    ``int((v + 1) * 0.5 * 65535 + 0.5)`` and reads the code index from a table giving, for each bin
    centre ``-1 + 2 i / 65535``, the nearest code (ties to the lower index). This can differ from the
    exact nearest code only within a bin's width of a decision boundary; we replicate it for identical
    codes.
    """
    code = create_dynamic_map().to(device)
    midpoints = 0.5 * (code[:-1] + code[1:])  # (255,)
    bins = torch.arange(_DYNAMIC_LUT_SIZE, dtype=torch.float32, device=device)
    centres = -1.0 + (2.0 * bins) / (_DYNAMIC_LUT_SIZE - 1)  # (65536,)
    # (65536,): how many midpoints lie strictly below each centre, i.e. the nearest code, ties lower
    lut = torch.searchsorted(midpoints, centres, side="left").to(torch.uint8)
    return code, lut


@dataclasses.dataclass(kw_only=True)
class NF4Codes:
    """A tensor in NF4 with its block statistics (plain tensors and ints, ready for a state_dict).

    With ``n = prod(shape)``, ``n_blocks = ceil(n / block_size)`` and
    ``n_dq_blocks = ceil(n_blocks / dq_block_size)``:

    Attributes:
        packed: ``uint8 (ceil(n / 2),)`` NF4 indices, two per byte, first element in the high nibble; an
            odd ``n`` is padded with index 7 (0.0) in the last low nibble, as bitsandbytes does.
        shape: shape of the original tensor.
        dtype: dtype of the original tensor (the default dequantization dtype).
        block_size: values per absmax block, one of :data:`NF4_BLOCK_SIZES`.
        double_quant: whether the absmaxes are stored in 8 bits (the three ``absmax_*`` fields) or in
            fp32 (``absmax``).
        absmax: ``float32 (n_blocks,)`` per-block absmax; ``None`` when ``double_quant``.
        absmax_q: ``uint8 (n_blocks,)`` indices into the 8-bit dynamic code of
            ``(absmax - absmax_offset) / absmax_scale[block]``; ``None`` unless ``double_quant``.
        absmax_scale: ``float32 (n_dq_blocks,)`` absmax of ``absmax - absmax_offset`` per block of
            ``dq_block_size``; ``None`` unless ``double_quant``.
        absmax_offset: ``float32`` scalar (shape ``()``), the mean absmax; ``None`` unless ``double_quant``.
        dq_block_size: absmaxes per second-level block (256 in bitsandbytes).
    """

    packed: Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    block_size: int
    double_quant: bool
    absmax: Tensor | None = None
    absmax_q: Tensor | None = None
    absmax_scale: Tensor | None = None
    absmax_offset: Tensor | None = None
    dq_block_size: int = DQ_BLOCK_SIZE

    def __post_init__(self) -> None:
        self.shape = tuple(int(d) for d in self.shape)
        _check_block_size(self.block_size)
        n_blocks = -(-self.numel // self.block_size)
        expected = {"packed": ((-(-self.numel // 2),), torch.uint8)}
        if self.double_quant:
            n_dq_blocks = -(-n_blocks // self.dq_block_size)
            expected |= {
                "absmax_q": ((n_blocks,), torch.uint8),
                "absmax_scale": ((n_dq_blocks,), torch.float32),
                "absmax_offset": ((), torch.float32),
            }
            unused = ("absmax",)
        else:
            expected["absmax"] = ((n_blocks,), torch.float32)
            unused = ("absmax_q", "absmax_scale", "absmax_offset")
        for name in unused:
            if getattr(self, name) is not None:
                raise ValueError(f"NF4Codes(double_quant={self.double_quant}) must not carry {name}")
        for name, (shape, dtype) in expected.items():
            value = getattr(self, name)
            if value is None or tuple(value.shape) != shape or value.dtype != dtype:
                got = None if value is None else (tuple(value.shape), value.dtype)
                raise ValueError(
                    f"NF4Codes.{name} must be {dtype} of shape {shape} for shape={self.shape}, "
                    f"block_size={self.block_size}; got {got}. Build NF4Codes with quantize_nf4"
                )

    @property
    def numel(self) -> int:
        """Number of values in the original tensor."""
        n = 1
        for d in self.shape:
            n *= d
        return n


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size not in NF4_BLOCK_SIZES:
        raise ValueError(
            f"NF4 block_size must be one of {NF4_BLOCK_SIZES} (bitsandbytes' set), got {block_size!r}; "
            "64 is the QLoRA default"
        )


def _blocks(flat: Tensor, block_size: int) -> Tensor:
    """Zero-pad a 1-D tensor to whole blocks: ``(n,) -> (ceil(n / block_size), block_size)``."""
    pad = (-flat.numel()) % block_size
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)


def _quantize_dynamic_blockwise(v: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """8-bit dynamic-code blockwise quantization of a 1-D fp32 tensor, as bitsandbytes' CPU kernel.

    Returns ``(codes uint8 (n,), absmax float32 (ceil(n / block_size),))``; an all-zero block gets code 0.
    """
    _, lut = _dynamic_code_and_lut(v.device)
    blocks = _blocks(v, block_size)  # (n_dq_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)  # (n_dq_blocks,)
    inv = 1.0 / absmax.clamp(min=_ABSMAX_FLOOR)
    normed = (blocks * inv[:, None]).clamp(-1.0, 1.0)  # (n_dq_blocks, block_size)
    bins = ((normed + 1.0) * 0.5 * (_DYNAMIC_LUT_SIZE - 1) + 0.5).to(torch.int64)  # truncation, >= 0
    codes = torch.where(absmax[:, None] > 0, lut[bins], torch.zeros_like(lut[bins]))
    return codes.reshape(-1)[: v.numel()], absmax


def quantize_nf4(x: Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Codes:
    """Quantize a tensor of any shape to NF4, block-wise (QLoRA; bitsandbytes ``quantize_4bit``).

    Each value's code is the bucket of ``clamp(x / absmax, -1, 1)`` between the codebook midpoints; a
    value exactly on a midpoint takes the lower code, and an all-zero block gets absmax 0 and code 7
    (0.0). Double quantization: ``offset = mean(absmax)``; ``absmax - offset`` is quantized blockwise
    (256 per block) with the 8-bit dynamic code (:func:`create_dynamic_map`).

    Args:
        x: floating-point tensor, any shape (fp32, bf16, fp16; computed in fp32).
        block_size: values per block, one of :data:`NF4_BLOCK_SIZES`.
        double_quant: store the block absmaxes in 8 bits (≈4.127 instead of 4.5 bits per weight at 64).

    Returns:
        :class:`NF4Codes`.

    Raises:
        ValueError: bad ``block_size``, empty ``x``, or NaN/Inf in ``x``.
        TypeError: ``x`` is not floating-point.

    Example:
        >>> codes = quantize_nf4(torch.randn(128, 64), block_size=64)
        >>> w_hat = dequantize_nf4(codes, dtype=torch.bfloat16)
    """
    _check_block_size(block_size)
    if not x.is_floating_point():
        raise TypeError(f"NF4 quantizes floating-point tensors, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError("cannot NF4-quantize an empty tensor; skip it or keep it in full precision")
    if not torch.isfinite(x).all():
        raise ValueError("tensor contains NaN/Inf; fix the checkpoint or keep this layer in full precision")
    n = x.numel()
    blocks = _blocks(x.reshape(-1).float(), block_size)  # (n_blocks, block_size), zero padded
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,); the zero padding never changes a max
    divisor = absmax.clamp(min=_ABSMAX_FLOOR)
    scaled = blocks * (1.0 / divisor)[:, None]  # (n_blocks, block_size)
    if n % block_size:
        # bitsandbytes divides in the trailing partial block and multiplies by the reciprocal elsewhere.
        scaled[-1] = blocks[-1] / divisor[-1]
    boundaries = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]).to(x.device) / 2  # (15,)
    codes = torch.bucketize(scaled.clamp(-1.0, 1.0), boundaries).to(torch.uint8)  # (n_blocks, block_size)
    # An odd n always leaves zero padding in the last block (block sizes are even), whose code is 7:
    # taking one code more than n pads the last byte with 0.0's code, as bitsandbytes does.
    packed = pack_int(codes.reshape(-1)[: n + n % 2], 4)  # (ceil(n / 2),)
    common = {"packed": packed, "shape": tuple(x.shape), "dtype": x.dtype, "block_size": block_size}
    if not double_quant:
        return NF4Codes(**common, double_quant=False, absmax=absmax)
    offset = absmax.mean()
    absmax_q, absmax_scale = _quantize_dynamic_blockwise(absmax - offset, DQ_BLOCK_SIZE)
    return NF4Codes(
        **common,
        double_quant=True,
        absmax_q=absmax_q,
        absmax_scale=absmax_scale,
        absmax_offset=offset,
        dq_block_size=DQ_BLOCK_SIZE,
    )


def dequantize_absmax(codes: NF4Codes) -> Tensor:
    """Per-block absmax ``float32 (n_blocks,)``, decoding the 8-bit nested statistics if double-quantized."""
    if not codes.double_quant:
        return codes.absmax
    dynamic_code, _ = _dynamic_code_and_lut(codes.absmax_q.device)
    values = dynamic_code[codes.absmax_q.long()]  # (n_blocks,)
    scaled = (_blocks(values, codes.dq_block_size) * codes.absmax_scale[:, None]).reshape(-1)
    return scaled[: values.numel()] + codes.absmax_offset


def dequantize_nf4(codes: NF4Codes, dtype: torch.dtype | None = None) -> Tensor:
    """Reconstruct the tensor: ``NF4_CODEBOOK[index] * absmax[block]``, computed in fp32.

    Returns:
        Tensor of ``codes.shape`` in ``dtype`` (default ``codes.dtype``), on ``codes.packed``'s device.
    """
    n = codes.numel
    index = unpack_int(codes.packed, 4, n).long()  # (n,)
    values = NF4_CODEBOOK.to(codes.packed.device)[index]  # (n,)
    absmax = dequantize_absmax(codes)  # (n_blocks,)
    out = (_blocks(values, codes.block_size) * absmax[:, None]).reshape(-1)[:n]  # (n,)
    return out.reshape(codes.shape).to(dtype or codes.dtype)


def nf4_bits_per_weight(block_size: int, double_quant: bool, dq_block_size: int = DQ_BLOCK_SIZE) -> float:
    """Storage cost per value: 4 bits plus the amortised block statistics.

    Without double quantization ``4 + 32 / block_size`` (4.5 at 64); with it
    ``4 + 8 / block_size + 32 / (block_size * dq_block_size)`` (≈4.127 at 64), ignoring the single fp32
    offset per tensor.
    """
    _check_block_size(block_size)
    if not double_quant:
        return 4.0 + 32.0 / block_size
    return 4.0 + 8.0 / block_size + 32.0 / (block_size * dq_block_size)
