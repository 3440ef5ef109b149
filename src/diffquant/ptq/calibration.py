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


def _map(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    return value


def _select_rows(call: DenoiserCall, keep: int | None) -> DenoiserCall:
    batch = _batch_size(call.args, call.kwargs)
    if keep is None or batch is None or keep >= batch:
        return call
    rows = torch.linspace(0, batch - 1, keep).round().long()  # evenly spread: both CFG halves

    def pick(t: Tensor) -> Tensor:
        return t[rows] if t.ndim > 0 and t.shape[0] == batch else t

    return DenoiserCall(_map(call.args, pick), _map(call.kwargs, pick))


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
            DenoiserCall(_map(args, lambda t: t.detach().cpu()), _map(kwargs, lambda t: t.detach().cpu()))
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
    return [_select_rows(call, config.samples_per_step) for call in calls]


def replay(
    model: nn.Module, calls: list[DenoiserCall], *, progress: bool = False, desc: str = "replay"
) -> None:
    """Call ``model`` on every recorded call, on the model's device (outputs are discarded)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for call in tqdm(calls, desc=desc, disable=not progress, leave=False):
        model(*_map(call.args, lambda t: t.to(device)), **_map(call.kwargs, lambda t: t.to(device)))
