"""Pick the fastest of several equivalent execution paths by a short micro-benchmark, cached in-process.

A *problem* is everything that decides speed: op, weight shape, conv arguments, input shape, how
the activation scale varies (per tensor / per row). Layers with the same problem share one choice.
Each candidate's output is checked against the reference path's before it can be chosen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

from torch import Tensor

REFERENCE = "dequant-reference"
ROUNDS = 3  # interleaved timing rounds per problem; the median of each path is compared

_choices: dict[Hashable, str] = {}
_rejected: dict[Hashable, dict[str, str]] = {}


def clear_choices() -> None:
    """Forget every cached choice (the next forward of each problem measures again)."""
    _choices.clear()
    _rejected.clear()


def cached_choice(problem: Hashable) -> str | None:
    """The path chosen for ``problem``, or None when it was never measured."""
    return _choices.get(problem)


def rejected_paths(problem: Hashable) -> dict[str, str]:
    """Candidates that were not usable for ``problem``, with the reason (error or mismatch)."""
    return dict(_rejected.get(problem, {}))


def _timed(fn: Callable[[], Tensor]) -> tuple[float, Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def choose(
    problem: Hashable,
    candidates: dict[str, Callable[[], Tensor]],
    reference: Callable[[], Tensor],
    agrees: Callable[[Tensor, Tensor], bool],
) -> tuple[str, Tensor]:
    """The fastest path for ``problem`` (measured once, then cached) and an output computed with it.

    Args:
        problem: hashable description of the problem (see the module docstring).
        candidates: name → zero-argument function computing the layer's output with that path.
        reference: the dequant-reference path (always a candidate, never rejected).
        agrees: ``agrees(candidate_output, reference_output)``; a candidate that disagrees or raises
            is rejected for this problem.
    """
    ref_out = reference()  # warm-up and the oracle output
    usable: dict[str, Callable[[], Tensor]] = {REFERENCE: reference}
    rejected: dict[str, str] = {}
    for name, fn in candidates.items():
        try:
            out = fn()  # warm-up (prepacks lazily) and the correctness check
        except (RuntimeError, NotImplementedError) as err:
            rejected[name] = f"error: {str(err).splitlines()[0][:120]}"
            continue
        if agrees(out, ref_out):
            usable[name] = fn
        else:
            rejected[name] = "output differs from the reference path"
    times: dict[str, list[float]] = {name: [] for name in usable}
    for _ in range(ROUNDS if len(usable) > 1 else 0):
        for name, fn in usable.items():
            times[name].append(_timed(fn)[0])
    best = min(usable, key=lambda n: sorted(times[n])[len(times[n]) // 2] if times[n] else 0.0)
    _choices[problem] = best
    _rejected[problem] = rejected
    return best, (ref_out if best == REFERENCE else usable[best]())


def agrees_within_rounding(bound: Callable[[], Tensor]) -> Callable[[Tensor, Tensor], bool]:
    """An ``agrees`` check: ``|a - b| <= bound()`` elementwise (the bound is computed only if needed)."""

    def check(a: Tensor, b: Tensor) -> bool:
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        return bool(((a - b).abs() <= bound()).all())

    return check
