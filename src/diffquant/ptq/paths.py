"""Switch quantized layers between the float path and the quantized path while calibrating.

During quantization every :class:`~diffquant.nn.QuantLinear` / :class:`~diffquant.nn.QuantConv2d`
keeps its original float weight (``float_weight``, never saved). Calibration runs parts of the model
on the *float path* (float weights, unquantized inputs: the reference statistics X) and parts on the
*quantized path* (packed weights, quantized inputs: the statistics X̃ that the deployed model sees).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial

from torch import Tensor, nn


@contextmanager
def layer_paths(layers: Iterable[nn.Module], *, float_weight: bool, quantize_inputs: bool) -> Iterator[None]:
    """Temporarily set how ``layers`` compute; the previous settings are restored on exit."""
    layers = list(layers)
    saved = [(layer.use_float_weight, layer.quantize_inputs) for layer in layers]
    try:
        for layer in layers:
            layer.use_float_weight, layer.quantize_inputs = float_weight, quantize_inputs
        yield
    finally:
        for layer, (use_float, quantize) in zip(layers, saved, strict=True):
            layer.use_float_weight, layer.quantize_inputs = use_float, quantize


def attach_float_weights(layers: dict[str, nn.Module], originals: dict[str, nn.Module]) -> None:
    """Give each quantized layer a reference to its original float weight (no copy)."""
    for name, layer in layers.items():
        layer.float_weight = originals[name].weight.detach()


def release_float_weights(layers: Iterable[nn.Module]) -> None:
    """Drop the float weights once quantization is finished."""
    for layer in layers:
        layer.float_weight, layer.use_float_weight, layer.quantize_inputs = None, False, True


@contextmanager
def observe_weight_inputs(layers: dict[str, nn.Module], fn: Callable[[str, Tensor], None]) -> Iterator[None]:
    """Within the block, call ``fn(name, x)`` with each tensor a layer's weight multiplies (its input
    after input quantization, when that is on)."""
    try:
        for name, layer in layers.items():
            layer.input_observer = partial(fn, name)
        yield
    finally:
        for layer in layers.values():
            layer.input_observer = None
