"""Calibration-time state of quantized layers: their float weights and the path each one computes.

Deployed :class:`~diffquant.nn.QuantLinear` / :class:`~diffquant.nn.QuantConv2d` layers hold no
calibration state. While :func:`diffquant.quantize_` calibrates, :func:`calibrating` gives each
targeted layer an entry in a side table keyed by the layer — its original float weight (a reference,
not a copy) and two switches — and a calibration forward that reads it; both are removed on exit.
Calibration runs parts of the model on the *float path* (float weights, unquantized inputs: the
reference statistics X) and parts on the *quantized path* (packed weights, quantized inputs: the
statistics X̃ that the deployed model sees). Outside :func:`layer_paths` a layer computes on the
quantized path, exactly as the deployed layer does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from weakref import WeakKeyDictionary

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class _CalibrationState:
    float_weight: Tensor
    use_float_weight: bool = False
    quantize_inputs: bool = True
    observer: Callable[[Tensor], None] | None = None  # sees the tensor the weight multiplies


_STATES: WeakKeyDictionary[nn.Module, _CalibrationState] = WeakKeyDictionary()


def _calibration_forward(layer: nn.Module, state: _CalibrationState, x: Tensor) -> Tensor:
    """The reference computation of a quantized layer, on the path ``state`` selects."""
    if layer.input_quant is not None and state.quantize_inputs:
        x = layer.input_quant(x)
    if state.observer is not None:
        state.observer(x)
    weight = state.float_weight.to(x.dtype) if state.use_float_weight else layer.qweight.dequantize(x.dtype)
    bias = layer.bias.to(x.dtype) if layer.bias is not None else None
    if layer.kind == "conv2d":
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, bias)


def _state(layer: nn.Module) -> _CalibrationState:
    state = _STATES.get(layer)
    if state is None:
        raise RuntimeError(
            f"{type(layer).__name__} is not being calibrated: float weights and calibration paths exist "
            "only inside diffquant.ptq.paths.calibrating(...), i.e. while quantize_ runs."
        )
    return state


@contextmanager
def calibrating(float_weights: dict[nn.Module, Tensor]) -> Iterator[None]:
    """Within the block, each quantized layer (a key) knows its float weight and computes on the path
    :func:`layer_paths` selects (by default the quantized path).

    Raises:
        RuntimeError: if a layer is already being calibrated.
    """
    layers = list(float_weights)
    for layer in layers:
        if layer in _STATES:
            raise RuntimeError(f"{type(layer).__name__} is already being calibrated.")
    try:
        for layer in layers:
            state = _STATES[layer] = _CalibrationState(float_weights[layer].detach())
            layer.forward = partial(_calibration_forward, layer, state)
        yield
    finally:
        for layer in layers:
            if _STATES.pop(layer, None) is not None:
                del layer.forward  # the class's forward again


def float_weight_of(layer: nn.Module) -> Tensor:
    """The original float weight of a layer being calibrated.

    Raises:
        RuntimeError: outside :func:`calibrating`.
    """
    return _state(layer).float_weight


def layers_under_calibration(model: nn.Module) -> list[nn.Module]:
    """Every layer of ``model`` that :func:`calibrating` currently manages, in module order."""
    return [m for m in model.modules() if m in _STATES]


@contextmanager
def layer_paths(layers: Iterable[nn.Module], *, float_weight: bool, quantize_inputs: bool) -> Iterator[None]:
    """Temporarily set how ``layers`` compute; the previous settings are restored on exit."""
    states = [_state(layer) for layer in layers]
    saved = [(s.use_float_weight, s.quantize_inputs) for s in states]
    try:
        for s in states:
            s.use_float_weight, s.quantize_inputs = float_weight, quantize_inputs
        yield
    finally:
        for s, (use_float, quantize) in zip(states, saved, strict=True):
            s.use_float_weight, s.quantize_inputs = use_float, quantize


@contextmanager
def observe_weight_inputs(layers: dict[str, nn.Module], fn: Callable[[str, Tensor], None]) -> Iterator[None]:
    """Within the block, call ``fn(name, x)`` with each tensor a layer's weight multiplies (its input
    after input quantization, when that is on)."""
    states = {name: _state(layer) for name, layer in layers.items()}
    try:
        for name, s in states.items():
            s.observer = partial(fn, name)
        yield
    finally:
        for s in states.values():
            s.observer = None
