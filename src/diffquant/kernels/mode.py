"""The process-wide kernel mode: which execution paths quantized layers may take.

- ``"auto"`` (default): at inference, each layer runs the fastest *exact* path measured on this
  machine (an integer kernel, or the dequant-reference path when nothing beats it).
- ``"reference"``: always the dequant-reference (fake-quant) path — the oracle.
- ``"saturating"``: like ``"auto"``, but on CPUs without VNNI/AMX also allows oneDNN's u8·s8 kernels
  whose int16 intermediate sums may saturate, when a layer's output stays within 2 % of the reference
  path's largest value (full-range W8A8 layers measured ~10 % off under AVX2 emulation, so they stay
  on the reference path; 7-bit weights never saturate and are exact in ``"auto"``).

Training and calibration always use the reference path (see :func:`diffquant.nn.kernel_dispatch`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

KERNEL_MODES = ("auto", "reference", "saturating")
_mode = ["auto"]


def get_kernel_mode() -> str:
    """The current kernel mode (one of :data:`KERNEL_MODES`)."""
    return _mode[0]


def set_kernel_mode(mode: str) -> None:
    """Set the kernel mode for this process.

    Raises:
        ValueError: ``mode`` is not one of :data:`KERNEL_MODES`.

    Example:
        >>> set_kernel_mode("reference"); set_kernel_mode("auto")
    """
    if mode not in KERNEL_MODES:
        raise ValueError(f"unknown kernel mode {mode!r}; choose one of {', '.join(KERNEL_MODES)}.")
    _mode[0] = mode


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[None]:
    """Run a block under ``mode`` and restore the previous mode afterwards.

    Example:
        >>> with kernel_mode("reference"):
        ...     pass  # every quantized layer runs its fake-quant reference path here
    """
    previous = get_kernel_mode()
    set_kernel_mode(mode)
    try:
        yield
    finally:
        set_kernel_mode(previous)
