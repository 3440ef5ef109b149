"""TuneQDM chooses its layers through diffquant.targeting, with the architecture's defaults."""

import pytest
import torch
from torch import nn

from diffquant.models import get_arch_spec
from diffquant.models.tiny import example_inputs, tiny_unet2d
from diffquant.targeting import LayerSelection, select_targets
from diffquant.tuneqdm import (
    TQConv2d,
    TuneQDMConfig,
    apply_tuneqdm,
    quantize_model,
    register_tas_pre_hook,
    tuneqdm_layers,
)


def test_the_architecture_defaults_stay_in_float_unless_keep_fp_says_otherwise():
    model = apply_tuneqdm(tiny_unet2d(), TuneQDMConfig())
    kept = get_arch_spec(model).keep_fp
    assert type(model.conv_in) is nn.Conv2d and type(model.conv_out) is nn.Conv2d
    assert isinstance(model.time_embedding.linear_1, nn.Linear)
    assert list(tuneqdm_layers(model)) == list(
        select_targets(tiny_unet2d(), LayerSelection(keep_fp=kept)).quantize
    )
    everything = apply_tuneqdm(tiny_unet2d(), TuneQDMConfig(keep_fp=()))  # the seed's selection
    assert isinstance(everything.conv_in, TQConv2d) and isinstance(
        everything.time_embedding.linear_1, nn.Module
    )
    assert len(tuneqdm_layers(everything)) == len(
        select_targets(tiny_unet2d(), LayerSelection(keep_fp=())).quantize
    )


def test_version_1_configs_load_as_the_seeds_selection():
    old = TuneQDMConfig(n_bits=4).to_dict()
    del old["keep_fp"]
    old["version"] = 1
    config = TuneQDMConfig.from_dict(old)
    assert config.keep_fp == () and config.version == 2
    assert TuneQDMConfig.from_json(config.to_json()) == config
    assert TuneQDMConfig.from_dict({**TuneQDMConfig().to_dict()}).keep_fp is None
    with pytest.raises(ValueError, match="not a valid regex"):
        TuneQDMConfig(keep_fp=("(",))


def test_quantize_model_is_the_same_swap_frozen_with_unchanged_layer_numerics():
    config = TuneQDMConfig(n_bits=4, num_experts=2, exclude=(r"mid_block\..*",))
    fp = tiny_unet2d().eval()
    model = quantize_model(tiny_unet2d().eval(), config)
    trained = apply_tuneqdm(tiny_unet2d().eval(), config)
    assert list(tuneqdm_layers(model)) == list(tuneqdm_layers(trained))
    assert not any(p.requires_grad for layer in tuneqdm_layers(model).values() for p in layer.parameters())
    assert "mid_block.attentions.0.to_q" not in tuneqdm_layers(model)
    name = "down_blocks.0.resnets.0.conv1"
    reference = TQConv2d.from_float(fp.get_submodule(name), config)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            model.get_submodule(name).state_dict().values(), reference.state_dict().values(), strict=True
        )
    )
    for m in (model, trained):
        register_tas_pre_hook(m, config.num_experts)
    inputs = example_inputs(model, 2, timesteps=[100, 900], seed=2)
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, trained(**inputs).sample)
