"""Wall time by stage, and the machine a run was measured on."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Iterator

import torch


class StageTimer:
    """Adds up the wall time of named stages.

    Example:
        >>> timer = StageTimer()
        >>> with timer("sample"):
        ...     pass
        >>> list(timer.seconds)
        ['sample']
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def elapsed(self) -> float:
        """Seconds since the timer was made."""
        return time.perf_counter() - self.started


def machine_info(threads: int | None = None) -> dict[str, object]:
    """The CPU instruction set PyTorch dispatches to (``torch.backends.cpu.get_cpu_capability()``,
    e.g. ``"AVX2"`` or ``"AVX512"``), usable cores, torch threads (``threads``, default this
    process's), processor and torch version, under the key ``"machine"``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "machine": {
            "isa": torch.backends.cpu.get_cpu_capability(),
            "cores": cores,
            "threads": torch.get_num_threads() if threads is None else threads,
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
        }
    }
