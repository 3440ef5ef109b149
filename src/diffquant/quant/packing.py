"""Dense bit packing of unsigned integer codes into bytes.

Codes are unsigned (``0 .. 2**bits - 1``) and stored ``8 // bits`` per byte, the **first element in
the highest bits** of each byte -- the same convention as bitsandbytes' NF4 packing, so one unpacker
serves INT4 and NF4. Widths that do not divide 8 (3, 5, 6, 7 bits) are not packed densely: they are
stored one code per byte (see :func:`storage_bits`).
"""

from __future__ import annotations

import torch
from torch import Tensor

PACKABLE_BITS = (2, 4, 8)


def _check_packable(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in PACKABLE_BITS:
        raise ValueError(
            f"bit packing supports {PACKABLE_BITS} bits, got {bits!r}; store {bits}-bit codes as 8-bit "
            f"codes (storage_bits({bits}) == 8) or quantize to 2, 4 or 8 bits"
        )


def storage_bits(bits: int) -> int:
    """Bits actually stored per value for ``bits``-bit codes.

    2, 4 and 8 bits are packed densely (4, 2 and 1 codes per byte). 3, 5, 6 and 7 bits cannot be split
    evenly into bytes and are stored one code per byte, so they cost 8 bits each.

    Raises:
        ValueError: ``bits`` is not an integer in 2..8.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"storage_bits supports 2..8 bits, got {bits!r}; use an integer bit width in 2..8")
    return bits if bits in PACKABLE_BITS else 8


def _shifts(bits: int, device: torch.device) -> Tensor:
    """Left-shift of each slot in a byte, first slot highest: bits=4 -> [4, 0]; bits=2 -> [6, 4, 2, 0]."""
    per_byte = 8 // bits
    return torch.arange(per_byte - 1, -1, -1, device=device, dtype=torch.uint8) * bits


def pack_int(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned ``bits``-bit codes densely into bytes.

    Args:
        codes: ``uint8`` tensor of any shape with values in ``[0, 2**bits - 1]``; packed in row-major
            (``reshape(-1)``) order.
        bits: 2, 4 or 8 (8 only flattens).

    Returns:
        ``uint8`` tensor of shape ``(ceil(numel * bits / 8),)``; the first code of each byte sits in its
        highest bits, and the unused slots of the last byte are zero.

    Raises:
        ValueError: ``bits`` not in (2, 4, 8), or a code does not fit in ``bits`` bits.
        TypeError: ``codes`` is not ``uint8``.
    """
    _check_packable(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(
            f"pack_int expects uint8 codes, got {codes.dtype}; convert with codes.to(torch.uint8)"
        )
    flat = codes.reshape(-1)  # (n,)
    if bits == 8:
        return flat.clone()
    if flat.numel() and int(flat.max()) >= 2**bits:
        raise ValueError(
            f"codes must lie in [0, {2**bits - 1}] for {bits}-bit packing, got max {int(flat.max())}; "
            "offset signed codes by -qmin first"
        )
    per_byte = 8 // bits
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    slots = flat.view(-1, per_byte)  # (n_bytes, per_byte)
    shifted = slots << _shifts(bits, flat.device)  # (n_bytes, per_byte), disjoint bit ranges
    packed = shifted[:, 0].clone()
    for j in range(1, per_byte):
        packed |= shifted[:, j]
    return packed


def unpack_int(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_int`.

    Args:
        packed: ``uint8`` tensor of ``ceil(numel * bits / 8)`` bytes (any shape; read in row-major order).
        bits: 2, 4 or 8.
        numel: number of codes to recover.

    Returns:
        ``uint8`` tensor of shape ``(numel,)``.

    Raises:
        ValueError: ``bits`` not in (2, 4, 8), or ``packed`` has the wrong number of bytes for ``numel``.
        TypeError: ``packed`` is not ``uint8``.
    """
    _check_packable(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int expects uint8 bytes, got {packed.dtype}")
    per_byte = 8 // bits
    expected = -(-numel // per_byte)
    if numel < 0 or packed.numel() != expected:
        raise ValueError(
            f"{numel} codes of {bits} bits need {expected} bytes, got {packed.numel()}; "
            "pass the numel that was packed"
        )
    flat = packed.reshape(-1)  # (n_bytes,)
    if bits == 8:
        return flat.clone()
    mask = 2**bits - 1
    slots = (flat[:, None] >> _shifts(bits, flat.device)) & mask  # (n_bytes, per_byte)
    return slots.reshape(-1)[:numel]
