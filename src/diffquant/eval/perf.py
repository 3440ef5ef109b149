"""Cost metrics: latency of one denoiser call, stored model size, and peak memory."""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffquant.devices import module_device

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step_latency(
    model: nn.Module, inputs: dict | tuple, *, warmup: int = 2, repeats: int = 10
) -> float:
    """Median wall time in milliseconds of one ``model(*inputs)`` / ``model(**inputs)`` under
    ``torch.inference_mode()`` (CUDA is synchronised around each call).

    Example:
        >>> ms = measure_step_latency(unet, (x, t), warmup=1, repeats=5)  # doctest: +SKIP
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if not isinstance(inputs, dict | tuple):
        raise TypeError(
            f"inputs must be a tuple of positional args or a dict of kwargs, got {type(inputs).__name__}"
        )
    device = module_device(model)

    def call() -> None:
        model(**inputs) if isinstance(inputs, dict) else model(*inputs)

    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure_paired_latency(
    model: nn.Module, reference: nn.Module, inputs: dict | tuple, *, rounds: int = 5, repeats: int = 3
) -> tuple[float, float]:
    """Median latency (ms) of ``model`` and of ``reference``, measured alternately in ``rounds`` so that
    machine noise hits both alike; their ratio is the trustworthy number on a shared machine.

    Returns:
        ``(model_ms, reference_ms)``.
    """
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(measure_step_latency(model, inputs, warmup=1, repeats=repeats))
        theirs.append(measure_step_latency(reference, inputs, warmup=1, repeats=repeats))
    return statistics.median(ours), statistics.median(theirs)


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in ``model.state_dict()`` (parameters and buffers, packed weights as stored)."""
    return sum(t.nbytes for t in model.state_dict().values() if isinstance(t, torch.Tensor))


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes (Linux ``ru_maxrss`` is in KiB).

    The peak since process start, or since the last :func:`track_peak_memory` block on CPU: that block
    resets the kernel's high-water mark, which ``ru_maxrss`` reads.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) via ``/proc/self/clear_refs``; False if unsupported."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@dataclass
class PeakMemory:
    """Filled in when the :func:`track_peak_memory` block exits.

    Attributes:
        device: ``"cuda"`` or ``"cpu"``.
        peak_bytes: peak memory during the block above the level at entry.
        source: how it was measured: ``"cuda_max_memory_allocated"``, ``"VmHWM"`` (exact peak RSS in
            the block) or ``"ru_maxrss"`` (growth of the lifetime peak: underestimates when the process
            had already peaked higher before the block).
    """

    device: str
    peak_bytes: int = 0
    source: str = ""


@contextlib.contextmanager
def track_peak_memory(device: torch.device | str | None = None) -> Iterator[PeakMemory]:
    """Measure peak memory of the enclosed code.

    On CUDA: peak ``torch.cuda.max_memory_allocated`` minus the allocation at entry (tensors only).
    On CPU: peak resident set size minus RSS at entry, from Linux's VmHWM after resetting it
    (``/proc/self/clear_refs``; this also resets what :func:`peak_rss_bytes` reports); where that is not
    possible, the growth of ``ru_maxrss``.

    Args:
        device: the device to track; default CUDA if available, else CPU.

    Example:
        >>> with track_peak_memory("cpu") as mem:
        ...     buf = torch.ones(1 << 20)
        >>> mem.peak_bytes >= 0
        True
    """
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    result = PeakMemory(dev.type)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        start = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        yield result
        torch.cuda.synchronize(dev)
        result.peak_bytes = max(0, torch.cuda.max_memory_allocated(dev) - start)
        result.source = "cuda_max_memory_allocated"
        return
    start_rss = _status_kib("VmRSS")
    if start_rss is not None and _reset_rss_peak():
        yield result
        peak = _status_kib("VmHWM")
        result.peak_bytes = max(0, (peak or start_rss) - start_rss) * 1024
        result.source = "VmHWM"
        return
    start_max = peak_rss_bytes()
    yield result
    result.peak_bytes = max(0, peak_rss_bytes() - start_max)
    result.source = "ru_maxrss"
