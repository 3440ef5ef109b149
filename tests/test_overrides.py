"""Per-layer overrides: validation, JSON round trip, selection rules, quantize_ per layer, save/load."""

import pytest
import torch

from diffquant import (
    ActivationQuantConfig,
    QuantConfig,
    WeightQuantConfig,
    load_quantized,
    quantize_,
    save_quantized,
)
from diffquant.api import needs_calibration, quantized_layers
from diffquant.config import INHERIT, LayerOverride
from diffquant.models.tiny import example_inputs, scheduler_for_tests, tiny_unet2d
from diffquant.nn import PackedWeight, StaticActivationQuantizer
from diffquant.targeting import LayerQuant, LayerSelection, select_targets

W4 = WeightQuantConfig(bits=4, symmetric=False)
W8 = WeightQuantConfig(bits=8)
W4G8 = WeightQuantConfig(bits=4, granularity="group", group_size=8)
A4 = ActivationQuantConfig(bits=4)
A8 = ActivationQuantConfig(bits=8)
ATTENTION = r".*attentions\.\d+\.to_[qkv]"


def calibrate(model):
    for t in (900, 500, 100):
        model(**example_inputs(model, 2, timesteps=t, seed=t))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"pattern": "conv_("}, ValueError, "not a valid regex"),
        ({"pattern": ""}, ValueError, "empty"),
        ({"pattern": "conv_in"}, ValueError, "changes nothing"),
        ({"pattern": "conv_in", "keep_fp": True, "weights": W8}, ValueError, "drop one"),
        ({"pattern": "conv_in", "weights": {"bits": 8}}, TypeError, "WeightQuantConfig"),
        ({"pattern": "conv_in", "activations": "static"}, TypeError, "ActivationQuantConfig"),
        ({"pattern": "conv_in", "keep_fp": 1}, TypeError, "True or False"),
    ],
)
def test_override_validates_itself(kwargs, error, message):
    with pytest.raises(error, match=message):
        LayerOverride(**kwargs)


def test_quant_config_rejects_repeated_patterns_and_a_bare_override():
    edge = LayerOverride("conv_in", weights=W8)
    with pytest.raises(ValueError, match="appears twice"):
        QuantConfig(overrides=(edge, LayerOverride("conv_in", keep_fp=True)))
    with pytest.raises(TypeError, match="not a single LayerOverride"):
        QuantConfig(overrides=edge)


def test_overrides_round_trip_through_json_and_version_1_still_loads():
    config = QuantConfig(
        weights=W4,
        activations=A4,
        overrides=[
            LayerOverride("conv_(in|out)", weights=W8, activations=A8),
            LayerOverride(ATTENTION, activations=None),
            LayerOverride("mid_block.*", weights=W4G8),
            LayerOverride("time_embedding.*", keep_fp=True),
        ],
    )
    assert isinstance(config.overrides, tuple)
    restored = QuantConfig.from_json(config.to_json())
    assert restored == config
    assert restored.overrides[1].activations is None and restored.overrides[2].activations == INHERIT
    old = QuantConfig(weights=W4).to_dict()
    del old["overrides"]
    old["version"] = 1
    assert QuantConfig.from_dict(old) == QuantConfig(weights=W4)
    with pytest.raises(ValueError, match="version 3"):
        QuantConfig.from_dict({**old, "version": 3})


def test_selection_rules_first_override_wins_and_beats_keep_fp_but_not_exclude():
    model = tiny_unet2d()
    config = QuantConfig(
        weights=W4,
        activations=A4,
        exclude=(r"conv_out",),
        overrides=(
            LayerOverride(r"conv_in|conv_out|down_blocks\.0\.resnets\.0\.conv1", weights=W8, activations=A8),
            LayerOverride(r"down_blocks\.0\..*", activations=None),
            LayerOverride(r"mid_block\.resnets\.\d+\.conv\d", keep_fp=True),
        ),
    )
    targets = select_targets(model, config)
    assert targets.configs["conv_in"] == LayerQuant(W8, A8)  # arch keep_fp default, overridden
    assert targets.configs["down_blocks.0.resnets.0.conv1"] == LayerQuant(W8, A8)  # first match wins
    assert targets.configs["down_blocks.0.resnets.0.conv2"] == LayerQuant(W4, None)
    assert targets.configs["up_blocks.0.resnets.0.conv1"] == LayerQuant(W4, A4)
    assert "conv_out" in targets.kept_fp and "conv_out" not in targets.configs  # exclude wins
    assert {"mid_block.resnets.0.conv1", "time_embedding.linear_1"} <= set(targets.kept_fp)
    assert list(targets.quantize) == list(targets.configs)
    quantizable = targets.quantize + targets.kept_fp
    assert sorted(quantizable) == sorted(select_targets(model, LayerSelection(keep_fp=())).quantize)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ((LayerOverride("decoder.*", weights=W8),), "match no Linear/Conv2d layer"),
        ((LayerOverride("conv_out", weights=W8),), "match no Linear/Conv2d layer"),  # excluded
        ((LayerOverride("up_blocks.*", weights=W4),), "change nothing"),
        ((LayerOverride("time_embedding.*", keep_fp=True),), "change nothing"),  # kept anyway
        (
            (LayerOverride("up_blocks.*", weights=W8), LayerOverride(r"up_blocks\.0.*", activations=None)),
            "earlier override",
        ),
    ],
)
def test_override_that_matches_nothing_or_changes_nothing_is_an_error(overrides, message):
    config = QuantConfig(weights=W4, exclude=("conv_out",), overrides=overrides)
    with pytest.raises(ValueError, match=message):
        select_targets(tiny_unet2d(), config)


def test_quantize_gives_each_layer_its_own_weights_and_input_quantizer():
    fp = tiny_unet2d().eval()
    model = tiny_unet2d().eval()
    config = QuantConfig(
        weights=W4,
        activations=A4,
        overrides=(
            LayerOverride("conv_(in|out)", weights=W8, activations=A8),
            LayerOverride(ATTENTION, weights=W4G8, activations=None),
        ),
    )
    quantize_(model, config, calibrate=calibrate, schedule=scheduler_for_tests())
    layers = quantized_layers(model)
    expected = {
        "conv_in": (W8, 8),
        "down_blocks.1.attentions.0.to_q": (W4G8, None),
        "mid_block.resnets.0.conv1": (W4, 4),
    }
    for name, (weights, act_bits) in expected.items():
        layer = layers[name]
        reference = PackedWeight.from_float(fp.get_submodule(name).weight, weights)
        assert all(
            torch.equal(a, b)
            for a, b in zip(layer.qweight.state_dict().values(), reference.state_dict().values(), strict=True)
        )
        if act_bits is None:
            assert layer.input_quant is None
        else:
            assert isinstance(layer.input_quant, StaticActivationQuantizer)
            assert layer.input_quant.config.bits == act_bits and bool(layer.input_quant.calibrated)
    assert "time_embedding.linear_1" not in layers and model.diffquant_config == config


def test_gptq_uses_each_layers_group_size_and_calibrated_modes_only_in_overrides_need_data():
    model = tiny_unet2d().eval()
    config = QuantConfig(
        weights=WeightQuantConfig(bits=4, method="gptq"),
        overrides=(
            LayerOverride(
                ATTENTION, weights=WeightQuantConfig(bits=4, granularity="group", group_size=8, method="gptq")
            ),
        ),
    )
    quantize_(model, config, calibrate=calibrate, schedule=scheduler_for_tests())
    assert model.get_submodule("mid_block.attentions.0.to_q").qweight.scale.shape == (16, 2)  # 16 inputs / 8
    assert model.get_submodule("mid_block.attentions.0.to_out.0").qweight.scale.shape == (16, 1)
    assert model.diffquant_calibration["layers"]["mid_block.attentions.0.to_q"]["method"] == "gptq"
    weight_only = QuantConfig(weights=W4, overrides=(LayerOverride("conv_in", activations=A8),))
    assert needs_calibration(weight_only) and not needs_calibration(QuantConfig(weights=W4))
    with pytest.raises(ValueError, match="activation mode 'static' needs calibration data"):
        quantize_(tiny_unet2d(), weight_only)


def test_layers_overridden_to_rtn_are_left_to_rtn_by_gptq():
    model = tiny_unet2d().eval()
    fp = tiny_unet2d().eval()
    config = QuantConfig(
        weights=WeightQuantConfig(bits=4, method="gptq"),
        overrides=(LayerOverride(r"down_blocks\.0\..*", weights=WeightQuantConfig(bits=4)),),
    )
    quantize_(model, config, calibrate=calibrate, schedule=scheduler_for_tests())
    rtn = model.get_submodule("down_blocks.0.resnets.0.conv1")
    reference = PackedWeight.from_float(
        fp.get_submodule("down_blocks.0.resnets.0.conv1").weight, WeightQuantConfig(bits=4)
    )
    assert torch.equal(rtn.qweight.qdata, reference.qdata) and torch.equal(rtn.qweight.scale, reference.scale)
    assert "down_blocks.0.resnets.0.conv1" not in model.diffquant_calibration["layers"]
    assert "down_blocks.1.resnets.0.conv1" in model.diffquant_calibration["layers"]


def test_models_quantized_with_overrides_save_and_load_exactly(tmp_path):
    model = tiny_unet2d().eval()
    config = QuantConfig(
        weights=W4G8,
        activations=A4,
        overrides=(
            LayerOverride(
                "conv_(in|out)", weights=W8, activations=ActivationQuantConfig(bits=8, mode="dynamic")
            ),
            LayerOverride(ATTENTION, weights=WeightQuantConfig(format="nf4", bits=4), activations=None),
        ),
    )
    quantize_(model, config, calibrate=calibrate, schedule=scheduler_for_tests())
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path, model=tiny_unet2d(seed=5).eval(), schedule=scheduler_for_tests())
    assert loaded.diffquant_config == config
    inputs = example_inputs(model, 3, timesteps=[800, 400, 20], seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, model(**inputs).sample)
    assert loaded.get_submodule("down_blocks.1.attentions.0.to_k").qweight.meta()["format"] == "nf4"


def test_other_methods_layers_run_their_float_weights_on_the_float_path():
    gptq = WeightQuantConfig(bits=4, method="gptq", sequential="off")  # every statistic from float inputs
    mixed, alone = tiny_unet2d().eval(), tiny_unet2d().eval()
    rtn_blocks = LayerOverride(r"down_blocks\.0\..*", weights=WeightQuantConfig(bits=4, sequential="off"))
    quantize_(mixed, QuantConfig(weights=gptq, overrides=(rtn_blocks,)), calibrate=calibrate)
    quantize_(alone, QuantConfig(weights=gptq), calibrate=calibrate)
    name = "up_blocks.0.resnets.0.conv1"  # downstream of the RTN layers
    assert torch.equal(mixed.get_submodule(name).qweight.qdata, alone.get_submodule(name).qweight.qdata)
    assert torch.equal(mixed.get_submodule(name).qweight.scale, alone.get_submodule(name).qweight.scale)
