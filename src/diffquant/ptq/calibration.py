"""Calibration data from the float model itself: record its denoiser calls once, replay them.

A user's ``calibrate(model)`` function (typically: run the float sampler for a few prompts/classes)
is run once with a forward pre-hook on the denoiser that records every call's arguments — the noisy
input ``x_t``, the per-sample timestep and the conditioning, both halves of a classifier-free-guidance
batch included. The kept calls (spread uniformly over the trajectory, optionally sub-sampled along the
batch) are stored on the CPU and replayed bit-identically on any path of the model (float,
partly quantized, quantized), so float and quantized-path statistics come from the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffquant.config import CalibrationConfig
from diffquant.devices import module_device


@dataclass(frozen=True)
class DenoiserCall:
    """The positional and keyword arguments of one recorded denoiser call (tensors on the CPU)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and value.ndim > 0:
            return value.shape[0]
    return None


def map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor inside nested tuples / lists / dicts."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def _select_rows(call: DenoiserCall, keep: int | None) -> DenoiserCall:
    batch = _batch_size(call.args, call.kwargs)
    if keep is None or batch is None or keep >= batch:
        return call
    rows = torch.linspace(0, batch - 1, keep).round().long()  # evenly spread: both CFG halves

    def pick(t: Tensor) -> Tensor:
        return t[rows] if t.ndim > 0 and t.shape[0] == batch else t

    return DenoiserCall(map_tensors(call.args, pick), map_tensors(call.kwargs, pick))


def _mergeable(a: Any, b: Any, batch_a: int, batch_b: int) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        batched = a.ndim > 0 and a.shape[0] == batch_a and b.ndim > 0 and b.shape[0] == batch_b
        return (batched and a.shape[1:] == b.shape[1:]) or (a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_mergeable(x, y, batch_a, batch_b) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_mergeable(a[k], b[k], batch_a, batch_b) for k in a)
    return type(a) is type(b) and a == b


def _concat(values: list[Any], batches: list[int]) -> Any:
    first = values[0]
    if isinstance(first, Tensor):
        if first.ndim > 0 and first.shape[0] == batches[0]:
            return torch.cat(values)
        return first
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([v[i] for v in values], batches) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _concat([v[k] for v in values], batches) for k in first}
    return first


def merge_calls(calls: list[DenoiserCall], max_batch: int) -> list[DenoiserCall]:
    """Concatenate consecutive calls along the batch (up to ``max_batch`` samples per call) where
    every argument is either batched or identical across them; other calls are kept as they are."""
    merged: list[list[DenoiserCall]] = []
    for call in calls:
        batch = _batch_size(call.args, call.kwargs)
        group = merged[-1] if merged else None
        if group is not None and batch is not None:
            head_batch = _batch_size(group[0].args, group[0].kwargs)
            total = sum(_batch_size(c.args, c.kwargs) for c in group)
            if total + batch <= max_batch and _mergeable(
                (group[0].args, group[0].kwargs), (call.args, call.kwargs), head_batch, batch
            ):
                group.append(call)
                continue
        merged.append([call])
    out = []
    for group in merged:
        batches = [_batch_size(c.args, c.kwargs) for c in group]
        args = _concat([c.args for c in group], batches)
        kwargs = _concat([c.kwargs for c in group], batches)
        out.append(DenoiserCall(args, kwargs))
    return out


@torch.no_grad()
def record_denoiser_calls(
    model: nn.Module, calibrate: Callable[[nn.Module], Any], config: CalibrationConfig | None = None
) -> list[DenoiserCall]:
    """Run ``calibrate(model)`` once and return the kept denoiser calls.

    Raises:
        ValueError: if ``calibrate`` never called the model.
    """
    config = config or CalibrationConfig()
    calls: list[DenoiserCall] = []

    def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append(
            DenoiserCall(
                map_tensors(args, lambda t: t.detach().cpu()), map_tensors(kwargs, lambda t: t.detach().cpu())
            )
        )

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        calibrate(model)
    finally:
        handle.remove()
    if not calls:
        raise ValueError(
            "the calibrate function never called the model (empty calibration data); it must run the "
            "denoiser on representative inputs, e.g. a few sampling runs of the float model."
        )
    if config.num_steps is not None and config.num_steps < len(calls):
        index = torch.linspace(0, len(calls) - 1, config.num_steps).round().long().tolist()
        calls = [calls[i] for i in index]
    calls = [_select_rows(call, config.samples_per_step) for call in calls]
    return merge_calls(calls, config.merge_batch) if config.merge_batch else calls


def replay(
    model: nn.Module, calls: list[DenoiserCall], *, progress: bool = False, desc: str = "replay"
) -> None:
    """Call ``model`` on every recorded call, on the model's device (outputs are discarded)."""
    device = module_device(model)
    for call in tqdm(calls, desc=desc, disable=not progress, leave=False):
        model(
            *map_tensors(call.args, lambda t: t.to(device)),
            **map_tensors(call.kwargs, lambda t: t.to(device)),
        )
