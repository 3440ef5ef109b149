"""What the machine's integer instructions can do, read once per process.

On x86 the int8 GEMMs of oneDNN (and fbgemm) multiply unsigned 8-bit activations by signed 8-bit
weights. With VNNI (``vpdpbusd``) or AMX the products accumulate straight into int32, so the result
equals the exact integer sum. Without them (plain AVX2 / AVX-512) the kernels use ``vpmaddubsw``,
which adds two products into a *saturating int16*; a pair ``255*w_k + 255*w_{k+1}`` beyond 32767
is clipped, and the output no longer matches the reference path. :attr:`CpuIsa.exact_int8` says which
case this machine is in (``ONEDNN_MAX_CPU_ISA``, used to emulate an older CPU, is honoured).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_ONEDNN_ISAS_WITH_VNNI = ("VNNI", "BF16", "AMX", "FP16", "ALL", "AVX10")


@dataclass(frozen=True)
class CpuIsa:
    """The CPU features that decide which int8 kernels are exact and fast.

    Attributes:
        capability: ATen's vector ISA (``torch.backends.cpu.get_cpu_capability()``: ``AVX2``, ``AVX512``...).
        vnni: int8 dot products accumulate in int32 (AVX512-VNNI / AVX-VNNI), as oneDNN will use them.
        amx: Intel AMX int8 tiles.
        onednn: torch was built with oneDNN (``torch.ops.onednn`` int8 ops available).
    """

    capability: str
    vnni: bool
    amx: bool
    onednn: bool

    @property
    def exact_int8(self) -> bool:
        """u8·s8 GEMMs accumulate without int16 saturation (VNNI or AMX)."""
        return self.vnni or self.amx

    @property
    def name(self) -> str:
        """Short label, e.g. ``AVX512+VNNI`` or ``AVX2``."""
        extras = [label for label, present in (("VNNI", self.vnni), ("AMX", self.amx)) if present]
        return "+".join([self.capability, *extras])


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume the conservative case
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@functools.cache
def cpu_isa() -> CpuIsa:
    """The :class:`CpuIsa` of this process (cached).

    Example:
        >>> cpu_isa().name in {"DEFAULT", "AVX2", "AVX512", "AVX2+VNNI", "AVX512+VNNI", "AVX512+VNNI+AMX"}
        True
    """
    flags = _cpu_flags()
    onednn_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    onednn_limited = bool(onednn_cap) and not any(tag in onednn_cap for tag in _ONEDNN_ISAS_WITH_VNNI)
    vnni = any(flag in flags for flag in _VNNI_FLAGS[:2]) and not onednn_limited
    amx = "amx_int8" in flags and (not onednn_cap or "AMX" in onednn_cap or onednn_cap == "ALL")
    onednn = hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise")
    return CpuIsa(torch.backends.cpu.get_cpu_capability(), vnni, amx, onednn)
