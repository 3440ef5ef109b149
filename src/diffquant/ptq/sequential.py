"""Sequential calibration: each layer's input statistics on the already-quantized network.

The denoiser is processed block by block (UNet down/mid/up blocks, DiT transformer blocks — the
architecture's ``block_prefixes``). For each block, every recorded calibration call is replayed up to
the block's entry (the forward stops there) on two paths, and the block's inputs are **cached on the
CPU** together with the call's noise level:

- the **float path** (float weights, unquantized inputs) gives the float network's block inputs;
- the **quantized path** (earlier blocks already quantized, inputs quantized) gives the inputs the
  deployed block will really see.

The block alone is then re-run on its cached inputs to collect each layer's ``X`` (float path) and
``X̃`` (quantized path) and accumulate ``H = E[X̃ X̃ᵀ]`` and ``G = E[X X̃ᵀ]``
(:class:`~diffquant.ptq.hessian.InputStatistics`); a solver (GPTQ, Qronos) turns them into weights.
Modes: ``"block"`` solves all of a block's layers from one pass; ``"layer"`` solves them one at a
time in execution order, each on the outputs of the block's already-quantized earlier layers (the
block is re-run, not the whole network); ``"off"`` solves every layer from float inputs in one pass.
Layers outside every block form a last group calibrated from whole-model replays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffquant.models import get_arch_spec
from diffquant.noise import NoiseLevel, current_noise_level, noise_level
from diffquant.ptq.calibration import DenoiserCall, map_tensors, replay
from diffquant.ptq.hessian import InputStatistics, unfold_conv_input
from diffquant.ptq.paths import layer_paths, layers_under_calibration, observe_weight_inputs

Solver = Callable[[str, nn.Module, InputStatistics], None]
"""``solve(name, layer, statistics)``: set ``layer.qweight`` from the statistics."""


class _StopForward(Exception):
    """Raised after the block being calibrated: the rest of the forward is not needed."""


def execution_order(model: nn.Module, layers: dict[str, nn.Module], call: DenoiserCall) -> list[str]:
    """Names of ``layers`` in the order one replayed ``call`` first runs them (unreached ones last)."""
    order: list[str] = []

    def seen(name: str) -> None:
        if name not in order:
            order.append(name)

    handles = [
        layer.register_forward_pre_hook(lambda *_, name=name: seen(name)) for name, layer in layers.items()
    ]
    try:
        with torch.no_grad(), layer_paths(layers.values(), float_weight=True, quantize_inputs=False):
            replay(model, [call])
    finally:
        for handle in handles:
            handle.remove()
    return order + [name for name in layers if name not in order]


def calibration_groups(
    model: nn.Module, layers: dict[str, nn.Module], mode: str = "block"
) -> list[tuple[str | None, list[str]]]:
    """``(stop_module_name, layer_names)`` groups calibrated one after another.

    ``"block"`` and ``"layer"``: the architecture's blocks in execution order (layers outside every
    block form a last group, ``None``: the whole forward runs); ``"off"``: one group of all layers.
    """
    names = list(layers)
    if mode == "off":
        return [(None, names)]
    groups, placed = [], set()
    for block in get_arch_spec(model).block_prefixes(model):
        members = [n for n in names if n not in placed and (n == block or n.startswith(block + "."))]
        placed.update(members)
        if members:
            groups.append((block, members))
    rest = [n for n in names if n not in placed]
    return groups + ([(None, rest)] if rest else [])


def _as_rows(layer: nn.Module, x: Tensor) -> Tensor:
    if getattr(layer, "kind", None) == "conv2d":
        return unfold_conv_input(x, layer)  # (N*L, in*kh*kw)
    return x.reshape(-1, x.shape[-1])  # (N*tokens, in)


@dataclass(frozen=True)
class _CachedInput:
    """A module's call arguments (on the CPU) and the noise level of the denoiser call they came from."""

    call: DenoiserCall
    level: NoiseLevel | None


@contextmanager
def _stop_after(module: nn.Module | None) -> Iterator[None]:
    if module is None:
        yield
        return

    def stop(*_):
        raise _StopForward

    handle = module.register_forward_hook(stop)
    try:
        yield
    except _StopForward:
        pass
    finally:
        handle.remove()


@torch.no_grad()
def _block_inputs(model: nn.Module, block: nn.Module, calls: list[DenoiserCall]) -> list[_CachedInput]:
    """Replay ``calls`` up to ``block`` and keep its inputs (CPU) with their noise levels."""
    cached: list[_CachedInput] = []

    def keep(_module, args, kwargs):
        cpu = partial(map_tensors, fn=lambda t: t.detach().cpu())
        cached.append(_CachedInput(DenoiserCall(cpu(args), cpu(kwargs)), current_noise_level()))
        raise _StopForward

    handle = block.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        for call in calls:
            with suppress(_StopForward):
                replay(model, [call])
    finally:
        handle.remove()
    return cached


def _run_block(block: nn.Module, inputs: _CachedInput) -> None:
    level = inputs.level
    context = noise_level(level.timestep, level.log_snr) if level is not None else nullcontext()
    with context:
        replay(block, [inputs.call])


@torch.no_grad()
def _capture(
    run: Callable[[], None], group: dict[str, nn.Module], stop: nn.Module | None
) -> dict[str, Tensor]:
    captured: dict[str, list[Tensor]] = {name: [] for name in group}

    def keep(name: str, x: Tensor) -> None:
        captured[name].append(_as_rows(group[name], x.detach().float()))

    with observe_weight_inputs(group, keep), _stop_after(stop):
        run()
    return {name: torch.cat(rows) for name, rows in captured.items() if rows}


def calibrate_sequentially(
    model: nn.Module,
    layers: dict[str, nn.Module],
    calls: list[DenoiserCall],
    solve: Solver,
    *,
    sequential: str = "block",
    need_float_inputs: bool = False,
    progress: bool = False,
) -> None:
    """Calibrate ``layers`` group by group with ``solve``; see the module docstring.

    Args:
        model: the model being quantized (its targeted layers are quantized layers under
            :func:`~diffquant.ptq.paths.calibrating`).
        layers: the quantized layers to calibrate, by name. Other layers under calibration (those
            of other weight methods) compute with their float weights on the float path and their
            current quantized weights on the quantized path.
        calls: recorded denoiser calls to replay.
        solve: sets each layer's packed weight from its statistics.
        sequential: ``"block"``, ``"layer"`` or ``"off"`` (see the module docstring).
        need_float_inputs: also accumulate ``G = E[X X̃ᵀ]`` (Qronos).
        progress: show a progress bar over blocks.

    Raises:
        ValueError: if a layer saw no calibration data.
    """
    everything = layers_under_calibration(model)  # ``layers`` and those other methods quantize
    float_path = partial(layer_paths, everything, float_weight=True, quantize_inputs=False)
    done: list[nn.Module] = []

    def quant_path():  # unsolved layers: float weights behind quantized inputs; the others quantized
        stack = ExitStack()
        stack.enter_context(layer_paths(everything, float_weight=False, quantize_inputs=True))
        pending = [layer for layer in layers.values() if layer not in done]
        stack.enter_context(layer_paths(pending, float_weight=True, quantize_inputs=True))
        return stack

    order = execution_order(model, layers, calls[0]) if sequential == "layer" else list(layers)
    for block_name, names in tqdm(
        calibration_groups(model, layers, sequential),
        desc="calibrate",
        disable=not progress,
        leave=False,
    ):
        block = model.get_submodule(block_name) if block_name is not None else None
        if block is not None:  # cache the block's inputs once per path; later passes re-run the block only
            with float_path():
                float_inputs = _block_inputs(model, block, calls) if need_float_inputs else None
            with quant_path():
                quant_inputs = _block_inputs(model, block, calls)
        steps = [[n] for n in order if n in names] if sequential == "layer" else [names]
        for step in steps:
            group = {name: layers[name] for name in step}
            stop = group[step[-1]] if sequential == "layer" else None
            stats = {name: InputStatistics() for name in step}
            for i, call in enumerate(calls):
                if block is None:
                    run_quant = partial(replay, model, [call])
                    run_float = run_quant
                else:
                    run_quant = partial(_run_block, block, quant_inputs[i])
                    run_float = partial(_run_block, block, float_inputs[i]) if need_float_inputs else None
                x_float = None
                if need_float_inputs or sequential == "off":
                    with float_path():
                        x_float = _capture(run_float, group, stop)
                if sequential == "off":
                    x_tilde = x_float
                else:
                    with quant_path():
                        x_tilde = _capture(run_quant, group, stop)
                for name, rows in x_tilde.items():
                    stats[name].add(rows, x_float[name] if need_float_inputs else None)
            for name in step:
                if stats[name].count == 0:
                    raise ValueError(
                        f"layer {name!r} received no calibration data: the recorded calls never reach it. "
                        "Check that the calibrate function exercises every branch of the model."
                    )
                solve(name, group[name], stats.pop(name))
            done.extend(group.values())
