import pytest
import torch
from torch import nn

import diffquant
from diffquant import ActivationQuantConfig, QuantConfig, WeightQuantConfig, quantize_
from diffquant.api import quantized_layers, weight_bits_per_parameter
from diffquant.models.tiny import example_inputs, scheduler_for_tests, tiny_unet2d
from diffquant.nn import QuantConv2d, QuantLinear


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.head(self.norm(self.conv(x)).mean((2, 3))))


W8 = WeightQuantConfig(bits=8)
A8 = ActivationQuantConfig(bits=8)


def _calibrate_with(*batches):
    def calibrate(model):
        for batch in batches:
            model(batch)

    return calibrate


def test_quantize_swaps_every_linear_and_conv():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 4, 6, 6)
    reference = model(x)
    assert quantize_(model, QuantConfig(weights=W8)) is model
    assert isinstance(model.conv, QuantConv2d) and isinstance(model.head, QuantLinear)
    assert isinstance(model.norm, nn.GroupNorm)
    assert model.diffquant_config.weights == W8
    assert torch.allclose(model(x), reference, atol=0.05)


def test_include_exclude_and_keep_fp():
    model = Net()
    quantize_(
        model, QuantConfig(weights=W8, include=("head", "out", "conv"), exclude=("out",), keep_fp=("conv",))
    )
    assert set(quantized_layers(model)) == {"head"}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (QuantConfig(include=("norm",)), "matches only GroupNorm"),
        (QuantConfig(include=("decoder.*",)), "matches no module"),
        (QuantConfig(exclude=(".*",)), "no Linear/Conv2d layer"),
        (QuantConfig(weights=WeightQuantConfig(method="awq")), "unknown weight method 'awq'"),
        (QuantConfig(activations=ActivationQuantConfig(mode="histogram")), "unknown activation mode"),
        (QuantConfig(activations=A8), "needs calibration data"),
        (
            QuantConfig(weights=WeightQuantConfig(bits=4, granularity="group", group_size=5)),
            "does not divide",
        ),
    ],
)
def test_bad_requests_are_rejected_and_model_is_untouched(config, message):
    model = Net()
    with pytest.raises(ValueError, match=message):
        quantize_(model, config)
    assert not quantized_layers(model)


def test_not_a_config():
    with pytest.raises(TypeError, match="QuantConfig"):
        quantize_(Net(), W8)


def test_nan_weights_are_rejected():
    model = Net()
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'head' has NaN/Inf"):
        quantize_(model, QuantConfig(weights=W8))


def test_quantizing_twice_is_rejected():
    model = quantize_(Net(), QuantConfig(weights=W8))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, QuantConfig(weights=W8))


@pytest.mark.parametrize(
    ("calibrate", "message"),
    [
        (_calibrate_with(), "empty calibration data"),
        (_calibrate_with(torch.full((2, 4, 6, 6), float("inf"))), "NaN/Inf"),
    ],
)
def test_failed_calibration_restores_the_float_model(calibrate, message):
    model = Net()
    with pytest.raises(ValueError, match=message):
        quantize_(model, QuantConfig(weights=W8, activations=A8), calibrate=calibrate)
    assert isinstance(model.conv, nn.Conv2d) and isinstance(model.out, nn.Linear)
    assert getattr(model, "diffquant_config", None) is None


def test_static_w8a8_is_close_to_float_on_calibrated_distribution():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(16, 4, 6, 6)
    reference = model(x)
    quantize_(model, QuantConfig(weights=W8, activations=A8), calibrate=_calibrate_with(x[:8]))
    sqnr = 10 * torch.log10(reference.pow(2).mean() / (model(x) - reference).pow(2).mean())
    assert sqnr > 25


def test_bits_per_weight_counts_float_layers_at_their_width():
    model = Net()
    assert weight_bits_per_parameter(model) == 32
    quantize_(model, QuantConfig(weights=WeightQuantConfig(bits=4), keep_fp=()))
    assert 4 < weight_bits_per_parameter(model) < 8


def test_unet_keeps_architecture_defaults_in_float_and_stays_close():
    torch.manual_seed(0)
    model = tiny_unet2d().eval()
    inputs = example_inputs(model, batch_size=4)
    with torch.no_grad():
        reference = model(**inputs).sample
    calibrate = _calibrate_kwargs(inputs)
    quantize_(
        model, QuantConfig(weights=W8, activations=A8), calibrate=calibrate, schedule=scheduler_for_tests()
    )
    names = set(quantized_layers(model))
    assert "conv_in" not in names and "conv_out" not in names
    assert not any(n.startswith("time_embedding") for n in names)
    assert any(n.startswith("down_blocks") for n in names)
    with torch.no_grad():
        out = model(**inputs).sample
    assert 10 * torch.log10(reference.pow(2).mean() / (out - reference).pow(2).mean()) > 20


def _calibrate_kwargs(inputs):
    def calibrate(model):
        model(**inputs)

    return calibrate


def test_public_api_is_exported():
    for name in ("quantize_", "save_quantized", "load_quantized", "QuantConfig", "register_weight_method"):
        assert hasattr(diffquant, name)


def test_group_fallback_quantizes_indivisible_layers_per_channel():
    model = Net()  # conv: 36 inputs, head: 8, out: 16
    weights = WeightQuantConfig(bits=4, granularity="group", group_size=8, fallback_granularity="channel")
    quantize_(model, QuantConfig(weights=weights, keep_fp=()))
    scales = {name: layer.qweight.scale.shape for name, layer in quantized_layers(model).items()}
    assert scales == {"conv": (8, 1), "head": (16, 1), "out": (4, 2)}
