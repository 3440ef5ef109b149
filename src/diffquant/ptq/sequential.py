"""Sequential block calibration: input statistics of each block's layers on the quantized path.

The denoiser is processed group by group: block by block (UNet down/mid/up blocks, DiT transformer
blocks — the architecture's ``block_prefixes``; layers outside every block form a last group) or layer
by layer in execution order. For each group, every recorded calibration call is replayed up to the end
of the group (the forward stops there) — on the CPU-held calibration inputs rather than on cached
block inputs, because UNet blocks also consume skip connections and embeddings computed elsewhere in
the model's forward:

- the **float path** (float weights, unquantized inputs) gives each layer's float input ``X``;
- the **quantized path** (earlier blocks already quantized, inputs quantized) gives ``X̃``, the
  input the deployed layer will really see.

They accumulate ``H = E[X̃ X̃ᵀ]`` and ``G = E[X X̃ᵀ]`` (:class:`~diffquant.ptq.hessian.InputStatistics`),
a solver (GPTQ, Qronos) turns them into weights, and the next group sees the outputs of this one,
quantized. Only one group's statistics exist at a time; calibration inputs stay on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffquant.models import get_arch_spec
from diffquant.ptq.calibration import DenoiserCall, replay
from diffquant.ptq.hessian import InputStatistics, unfold_conv_input
from diffquant.ptq.paths import layer_paths, observe_weight_inputs

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
    model: nn.Module, layers: dict[str, nn.Module], calls: list[DenoiserCall], mode: str = "block"
) -> list[tuple[str | None, list[str]]]:
    """``(stop_module_name, layer_names)`` groups calibrated one after another.

    ``"block"``: the architecture's blocks in execution order (layers outside every block form a
    last group, ``None``: the whole forward runs); ``"layer"``: one group per layer in execution
    order; ``"off"``: one group of all layers.
    """
    names = list(layers)
    if mode == "off":
        return [(None, names)]
    if mode == "layer":
        return [(name, [name]) for name in execution_order(model, layers, calls[0])]
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
def _capture(model: nn.Module, group: dict[str, nn.Module], call: DenoiserCall, stop: nn.Module | None):
    captured: dict[str, list[Tensor]] = {name: [] for name in group}

    def keep(name: str, x: Tensor) -> None:
        captured[name].append(_as_rows(group[name], x.detach().float()))

    with observe_weight_inputs(group, keep), _stop_after(stop):
        replay(model, [call])
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
        model: the model being quantized (its targeted layers are quantized layers holding their
            float weights).
        layers: the quantized layers to calibrate, by name.
        calls: recorded denoiser calls to replay.
        solve: sets each layer's packed weight from its statistics.
        sequential: ``"block"`` / ``"layer"`` groups on the quantized path, ``"off"``: one pass on
            the float path (see :func:`calibration_groups`).
        need_float_inputs: also accumulate ``G = E[X X̃ᵀ]`` (Qronos).
        progress: show a progress bar over groups.

    Raises:
        ValueError: if a layer saw no calibration data.
    """
    done: list[nn.Module] = []
    groups = calibration_groups(model, layers, calls, sequential)
    for block, names in tqdm(groups, desc="calibrate blocks", disable=not progress, leave=False):
        group = {name: layers[name] for name in names}
        stop = model.get_submodule(block) if block is not None else None
        stats = {name: InputStatistics() for name in names}
        for call in calls:
            x_float = None
            if need_float_inputs or sequential == "off":
                with layer_paths(layers.values(), float_weight=True, quantize_inputs=False):
                    x_float = _capture(model, group, call, stop)
            if sequential != "off":
                with (
                    layer_paths(layers.values(), float_weight=True, quantize_inputs=True),
                    layer_paths(done, float_weight=False, quantize_inputs=True),
                ):
                    x_tilde = _capture(model, group, call, stop)
            else:
                x_tilde = x_float
            for name, rows in x_tilde.items():
                stats[name].add(rows, x_float[name] if need_float_inputs else None)
        for name in names:
            if stats[name].count == 0:
                raise ValueError(
                    f"layer {name!r} received no calibration data: the recorded calls never reach it. "
                    "Check that the calibrate function exercises every branch of the model."
                )
            solve(name, group[name], stats[name])
            del stats[name]
        done.extend(group.values())
