"""Calibration state lives in ptq.paths' side table, never on deployed quantized layers."""

import pytest
import torch
from torch import nn

from diffquant import ActivationQuantConfig, QuantConfig, WeightQuantConfig, quantize_
from diffquant.api import quantized_layers
from diffquant.kernels.mode import kernel_mode
from diffquant.nn import QuantConv2d, QuantLinear
from diffquant.ptq.paths import (
    calibrating,
    float_weight_of,
    layer_paths,
    layers_under_calibration,
    observe_weight_inputs,
)

CALIBRATION_ATTRIBUTES = ("float_weight", "use_float_weight", "quantize_inputs", "input_observer")


def _layer(kind):
    torch.manual_seed(0)
    if kind == "linear":
        float_layer, x = nn.Linear(8, 6), torch.randn(3, 8)
    else:
        float_layer, x = nn.Conv2d(4, 6, 3, padding=1, stride=2), torch.randn(2, 4, 7, 7)
    cls = QuantLinear if kind == "linear" else QuantConv2d
    layer = cls.from_float(
        float_layer, WeightQuantConfig(bits=2), ActivationQuantConfig(bits=2, mode="dynamic")
    )
    return float_layer, layer, x


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_paths_switch_weights_and_inputs_and_the_deployed_forward_returns_on_exit(kind):
    float_layer, layer, x = _layer(kind)
    with kernel_mode("reference"):  # calibration runs the reference computation, bit for bit
        deployed = layer(x)
    seen = []
    with calibrating({layer: float_layer.weight}):
        assert torch.equal(layer(x), deployed)  # default: the quantized path
        with layer_paths([layer], float_weight=True, quantize_inputs=False):
            assert torch.equal(layer(x), float_layer(x))
        with (
            layer_paths([layer], float_weight=True, quantize_inputs=True),
            observe_weight_inputs({"q": layer}, lambda name, t: seen.append((name, t))),
        ):
            assert torch.equal(layer(x), float_layer(layer.input_quant(x)))
        assert float_weight_of(layer) is not None and layers_under_calibration(nn.Sequential(layer)) == [
            layer
        ]
    assert seen[0][0] == "q" and torch.equal(seen[0][1], layer.input_quant(x))  # what the weight multiplies
    with kernel_mode("reference"):
        assert "forward" not in vars(layer) and torch.equal(layer(x), deployed)
    with pytest.raises(RuntimeError, match="not being calibrated"):
        float_weight_of(layer)


def test_a_layer_is_calibrated_once_at_a_time():
    float_layer, layer, _ = _layer("linear")
    outer, inner = calibrating({layer: float_layer.weight}), calibrating({layer: float_layer.weight})
    with outer, pytest.raises(RuntimeError, match="already"), inner:
        pass
    assert "forward" not in vars(layer)


def test_quantized_models_carry_no_calibration_state():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    config = QuantConfig(
        weights=WeightQuantConfig(bits=4, method="gptq"), activations=ActivationQuantConfig(bits=8)
    )
    quantize_(model, config, calibrate=lambda m: m(torch.randn(16, 8)))
    for layer in quantized_layers(model).values():
        assert not any(hasattr(layer, attribute) for attribute in CALIBRATION_ATTRIBUTES)
        assert "forward" not in vars(layer)
    assert layers_under_calibration(model) == []
