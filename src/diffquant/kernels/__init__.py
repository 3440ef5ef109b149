"""Integer execution paths for quantized layers (below ``diffquant.nn``; imports torch and ``diffquant.quant`` only).

- :mod:`~diffquant.kernels.isa`: what this CPU's int8 instructions can do exactly.
- :mod:`~diffquant.kernels.w8a8`: W8A8 kernels as pure tensor functions (oneDNN, ``torch._int_mm``).
- :mod:`~diffquant.kernels.w8a8_layer`: one layer's prepacked weights, candidate paths and choice.
- :mod:`~diffquant.kernels.select`: the per-problem micro-benchmark, cached in-process.
- :mod:`~diffquant.kernels.mode`: ``"auto"`` / ``"reference"`` / ``"saturating"``.

Quantized layers call into this package from their forward (:mod:`diffquant.nn.kernel_dispatch`);
:func:`diffquant.kernel_report` says which path each layer runs.
"""

from diffquant.kernels.isa import CpuIsa, cpu_isa
from diffquant.kernels.mode import KERNEL_MODES, get_kernel_mode, kernel_mode, set_kernel_mode
from diffquant.kernels.select import REFERENCE, clear_choices

__all__ = [
    "KERNEL_MODES",
    "REFERENCE",
    "CpuIsa",
    "clear_choices",
    "cpu_isa",
    "get_kernel_mode",
    "kernel_mode",
    "set_kernel_mode",
]
