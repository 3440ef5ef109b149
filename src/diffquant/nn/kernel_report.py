"""``kernel_report``: which execution path each quantized layer of a model runs, and the machine's ISA."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from diffquant.kernels import REFERENCE, cpu_isa, get_kernel_mode
from diffquant.nn.kernel_dispatch import _KERNELS, ineligible_reason
from diffquant.nn.qmodules import is_quantized_layer


@dataclass
class LayerPath:
    """One quantized layer in a :class:`KernelReport`.

    Attributes:
        name: module name; kind: ``linear`` / ``conv2d``; paths: path chosen per input shape seen
            (empty until the layer ran); note: why it is pinned to the reference path, if it is.
    """

    name: str
    kind: str
    paths: dict[str, str] = field(default_factory=dict)
    note: str = ""

    @property
    def summary(self) -> str:
        """The distinct paths taken, or what will happen at the first forward."""
        if self.note:
            return REFERENCE
        if not self.paths:
            return "not run yet (chosen at first forward)"
        return ", ".join(sorted(set(self.paths.values())))


@dataclass
class KernelReport:
    """Which execution path each quantized layer runs, and the machine's ISA.

    Attributes:
        isa: e.g. ``AVX512+VNNI``; mode: the kernel mode; layers: one :class:`LayerPath` each.
    """

    isa: str
    mode: str
    layers: list[LayerPath]

    def counts(self) -> dict[str, int]:
        """Number of layers per path summary."""
        out: dict[str, int] = {}
        for layer in self.layers:
            out[layer.summary] = out.get(layer.summary, 0) + 1
        return out

    def summary(self) -> str:
        """The ISA, the mode and the number of layers per path (one line each)."""
        lines = [f"ISA {self.isa}, kernel mode {self.mode!r}; {len(self.layers)} quantized layers"]
        return "\n".join(lines + [f"  {n:4d} × {path}" for path, n in sorted(self.counts().items())])

    def __str__(self) -> str:
        lines = [self.summary()]
        for layer in self.layers:
            note = f"  ({layer.note})" if layer.note else ""
            lines.append(f"  {layer.name} [{layer.kind}]: {layer.summary}{note}")
        return "\n".join(lines)


def kernel_report(model: nn.Module) -> KernelReport:
    """For each quantized layer of ``model``, the path it runs (as chosen so far) and why.

    Paths are chosen at a layer's first inference forward per input shape, so run the model once
    (e.g. one denoiser call) before reading the report.

    Example:
        >>> import diffquant
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> diffquant.quantize_(model, diffquant.QuantConfig(weights=diffquant.WeightQuantConfig(bits=8)))
        >>> print(diffquant.kernel_report(model).layers[0].note)
        weight-only (no faster CPU kernel than dequantize + float op)
    """
    layers = []
    for name, module in model.named_modules():
        if not is_quantized_layer(module):
            continue
        entry = LayerPath(name, module.kind, note=ineligible_reason(module) or "")
        cached = _KERNELS.get(module)
        if cached is not None and not entry.note:
            used = cached[1].paths_used
            entry.paths = {f"{shape} {granularity}": path for (shape, granularity), path in used.items()}
        layers.append(entry)
    return KernelReport(cpu_isa().name, get_kernel_mode(), layers)
