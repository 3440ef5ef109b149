"""EfficientDM's W8A8 first/last layers come from one quantize_ call with an override."""

import dataclasses

import torch

from diffquant import ActivationQuantConfig, QuantConfig, WeightQuantConfig
from diffquant.config import LayerOverride
from diffquant.efficientdm import efficientdm_quantize_
from diffquant.efficientdm.recipe import edge_layer_override
from diffquant.models.tiny import example_inputs, scheduler_for_tests, tiny_unet2d
from diffquant.nn import PackedWeight, StepTableActivationQuantizer

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
