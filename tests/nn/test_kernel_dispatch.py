"""When quantized layers take an integer kernel, and what kernel_report says about it."""

import pytest
import torch

import diffquant
from diffquant import ActivationQuantConfig, QuantConfig, WeightQuantConfig
from diffquant.kernels import REFERENCE, CpuIsa, cpu_isa, kernel_mode, set_kernel_mode
from diffquant.models.tiny import example_inputs, tiny_pixart
from diffquant.nn import QuantLinear
from diffquant.nn.kernel_report import kernel_report


def _static_linear(bits: int = 8) -> QuantLinear:
    layer = QuantLinear.from_float(
        torch.nn.Linear(32, 24), WeightQuantConfig(bits=bits), ActivationQuantConfig()
    )
    layer.input_quant.start_calibration("layer")
    layer(torch.randn(16, 32))
    layer.input_quant.finish_calibration()
    return layer


def _paths(layer: torch.nn.Module) -> set[str]:
    return set(kernel_report(torch.nn.Sequential(layer)).layers[0].paths.values())


def test_inference_takes_an_integer_path_where_it_is_faster_and_agrees():
    layer = _static_linear(bits=8 if cpu_isa().exact_int8 else 7)
    x = torch.randn(64, 32)
    with torch.no_grad():
        out = layer(x)
        reference = layer._reference_forward(x)
    assert _paths(layer)  # a choice was made and recorded
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_training_calibration_and_reference_mode_use_the_reference_path():
    layer = _static_linear()
    x = torch.randn(8, 32, requires_grad=True)
    out = layer(x)  # grad enabled and the input requires grad
    assert out.requires_grad and torch.equal(out, layer._reference_forward(x))
    assert not _paths(layer)
    with kernel_mode("reference"), torch.no_grad():
        assert torch.equal(layer(x), layer._reference_forward(x))
    assert not _paths(layer)
    layer.input_quant.start_calibration("layer")  # observing: inputs pass through unquantized
    with torch.no_grad():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    layer.input_quant.finish_calibration()
    assert not _paths(layer)


def test_without_vnni_full_range_weights_stay_on_the_reference_path(monkeypatch):
    no_vnni = CpuIsa(capability="AVX2", vnni=False, amx=False, onednn=cpu_isa().onednn)
    monkeypatch.setattr("diffquant.kernels.w8a8_layer.cpu_isa", lambda: no_vnni)
    weights = torch.zeros(24, 32)
    weights[:, :2] = 1.0  # codes 127, 127 side by side: 255 * 254 saturates an int16 pair
    layer = QuantLinear.from_float(
        torch.nn.Linear(32, 24), WeightQuantConfig(bits=8), ActivationQuantConfig()
    )
    layer.qweight = type(layer.qweight).from_float(weights, WeightQuantConfig(bits=8))
    layer.input_quant.start_calibration("layer")
    layer(torch.randn(4, 32))
    layer.input_quant.finish_calibration()
    with torch.no_grad():
        layer(torch.randn(4, 32))
    assert _paths(layer) == {REFERENCE}
    set_kernel_mode("saturating")  # the user accepts int16 saturation: integer paths are candidates
    try:
        from diffquant.nn.kernel_dispatch import integer_path_outputs

        assert integer_path_outputs(layer, torch.randn(4, 32))[0]
    finally:
        set_kernel_mode("auto")


def test_kernel_report_names_each_layers_path_and_the_isa():
    model = tiny_pixart()
    inputs = example_inputs(model, batch_size=2, timesteps=[500, 500])
    config = QuantConfig(weights=WeightQuantConfig(bits=8), activations=ActivationQuantConfig(bits=8))
    diffquant.quantize_(model, config, calibrate=lambda m: m(**inputs))
    report = diffquant.kernel_report(model)
    assert report.isa == cpu_isa().name
    assert {layer.summary for layer in report.layers} == {"not run yet (chosen at first forward)"}
    with torch.no_grad():
        model(**inputs)
    report = diffquant.kernel_report(model)
    assert all(layer.paths for layer in report.layers)
    assert report.isa in str(report) and report.layers[0].name in str(report)


@pytest.mark.parametrize(
    ("weights", "note"),
    [
        (WeightQuantConfig(bits=4, granularity="group", group_size=8), "group-wise"),
        (WeightQuantConfig(format="nf4", bits=4), "nf4 weights"),
        (WeightQuantConfig(bits=8, symmetric=False), "asymmetric"),
    ],
)
def test_kernel_report_says_why_a_layer_has_no_integer_path(weights, note):
    layer = QuantLinear.from_float(torch.nn.Linear(32, 24), weights, ActivationQuantConfig(mode="dynamic"))
    entry = kernel_report(torch.nn.Sequential(layer)).layers[0]
    assert note in entry.note and entry.summary == REFERENCE
