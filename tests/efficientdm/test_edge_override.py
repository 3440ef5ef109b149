"""EfficientDM's W8A8 first/last layers come from one quantize_ call with an override."""

import dataclasses
import re
from functools import partial

import pytest
import torch
from torch import nn

from diffquant import ActivationQuantConfig, QuantConfig, WeightQuantConfig, quantize_
from diffquant.config import CalibrationConfig, LayerOverride
from diffquant.efficientdm import efficientdm_quantize_
from diffquant.efficientdm.recipe import edge_layer_override
from diffquant.models.tiny import example_inputs, scheduler_for_tests, tiny_unet2d
from diffquant.nn import PackedWeight, StepTableActivationQuantizer
from diffquant.ptq.calibration import record_denoiser_calls, replay

W4 = WeightQuantConfig(bits=4, symmetric=False, range_method="mse")
A4 = ActivationQuantConfig(bits=4, mode="step_table")


def calibrate(model):
    for t in (999, 500, 0):
        model(**example_inputs(model, 2, timesteps=t, seed=t))


def test_edges_are_w8a8_and_the_rest_w4a4_with_round_to_nearest_weights():
    fp, model = tiny_unet2d().eval(), tiny_unet2d().eval()
    efficientdm_quantize_(
        model, QuantConfig(weights=W4, activations=A4), calibrate=calibrate, schedule=scheduler_for_tests()
    )
    w8 = dataclasses.replace(W4, bits=8)
    for name, weights, bits in [
        ("conv_in", w8, 8),
        ("conv_out", w8, 8),
        ("mid_block.attentions.0.to_v", W4, 4),
    ]:
        layer = model.get_submodule(name)
        reference = PackedWeight.from_float(fp.get_submodule(name).weight, weights)
        assert torch.equal(layer.qweight.qdata, reference.qdata) and torch.equal(
            layer.qweight.scale, reference.scale
        )
        assert (
            isinstance(layer.input_quant, StepTableActivationQuantizer)
            and layer.input_quant.config.bits == bits
        )
    assert isinstance(model.get_submodule("time_embedding.linear_1"), torch.nn.Linear)  # architecture default
    config = model.diffquant_config
    assert config.overrides[0] == edge_layer_override(
        QuantConfig(weights=W4, activations=A4), ("conv_in", "conv_out")
    )


def test_the_edge_override_comes_before_the_users_own():
    user = LayerOverride(r"conv_.*|down_blocks\.0\..*", activations=None)
    model = tiny_unet2d().eval()
    efficientdm_quantize_(
        model, QuantConfig(weights=W4, activations=A4, overrides=(user,)), calibrate=calibrate
    )
    assert model.conv_in.input_quant.config.bits == 8  # the edge override matched first
    assert model.get_submodule("down_blocks.0.resnets.0.conv1").input_quant is None
    assert model.diffquant_config.overrides[1] == user


def test_an_all_w8_config_needs_no_edge_override_on_a_model_without_float_defaults():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    efficientdm_quantize_(model, QuantConfig(weights=WeightQuantConfig(bits=8)))
    assert [model[i].qweight.bits for i in (0, 2)] == [8, 8] and model.diffquant_config.overrides == ()
    unet = efficientdm_quantize_(tiny_unet2d(), QuantConfig(weights=WeightQuantConfig(bits=8)))
    assert unet.conv_in.qweight.bits == 8 and len(unet.diffquant_config.overrides) == 1  # un-keeps the edges


def _two_calls(model, config, edge_layers, calls):
    """The previous efficientdm_quantize_: edges quantized alone (rest float), then the rest (edges float
    again), sharing one recording of the calibration calls. A reference for round-to-nearest weights."""
    replayed = partial(replay, calls=calls)
    once = CalibrationConfig(num_steps=None, samples_per_step=None, merge_batch=None)
    edges = QuantConfig(
        weights=dataclasses.replace(config.weights, bits=8, granularity="channel", group_size=None),
        activations=dataclasses.replace(config.activations, bits=8),
        include=tuple(re.escape(n) for n in edge_layers),
        keep_fp=(),
        calibration=once,
    )
    originals = {name: model.get_submodule(name) for name in edge_layers}
    quantize_(model, edges, calibrate=replayed, schedule=scheduler_for_tests())
    quantized_edges = {name: model.get_submodule(name) for name in edge_layers}
    for name, layer in originals.items():
        model.set_submodule(name, layer)
    model.diffquant_config = None
    rest = dataclasses.replace(config, exclude=edges.include, calibration=once)
    quantize_(model, rest, calibrate=replayed, schedule=scheduler_for_tests())
    for name, layer in quantized_edges.items():
        model.set_submodule(name, layer)
    return model


@pytest.mark.parametrize("mode", ["step_table", "static"])
def test_one_call_equals_the_previous_two_call_path_for_round_to_nearest(mode):
    config = QuantConfig(weights=W4, activations=ActivationQuantConfig(bits=4, mode=mode))
    one = efficientdm_quantize_(
        tiny_unet2d().eval(), config, calibrate=calibrate, schedule=scheduler_for_tests()
    )
    float_model = tiny_unet2d().eval()
    calls = record_denoiser_calls(float_model, calibrate, config.calibration)
    two = _two_calls(float_model, config, ("conv_in", "conv_out"), calls)
    inputs = example_inputs(one, 3, timesteps=[900, 300, 10], seed=4)
    with torch.no_grad():
        assert torch.equal(one(**inputs).sample, two(**inputs).sample)
    assert one.state_dict().keys() == two.state_dict().keys()
    assert all(torch.equal(v, two.state_dict()[k]) for k, v in one.state_dict().items())
