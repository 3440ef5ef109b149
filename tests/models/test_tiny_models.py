"""Tiny diffusers builders: size, determinism, forward shapes, save/load round trip."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from diffquant.models.tiny import (
    example_inputs,
    scheduler_for_tests,
    tiny_dit,
    tiny_pixart,
    tiny_unet2d,
    tiny_unet2d_condition,
)

BUILDERS = [tiny_unet2d, tiny_unet2d_condition, tiny_dit, tiny_pixart]
SAMPLE_KEY = {
    tiny_unet2d: "sample",
    tiny_unet2d_condition: "sample",
    tiny_dit: "hidden_states",
    tiny_pixart: "hidden_states",
}


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_size_determinism_and_forward_shape(builder):
    model = builder()
    n_params = sum(p.numel() for p in model.parameters())
    assert 3_000 <= n_params <= 100_000
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in builder().state_dict().items())
    assert not all(torch.equal(state[k], v) for k, v in builder(seed=1).state_dict().items())
    inputs = example_inputs(model, batch_size=3, timesteps=[999, 0, 500])
    assert torch.equal(inputs["timestep"], torch.tensor([999, 0, 500]))
    with torch.no_grad():
        out = model(**inputs).sample
    assert out.shape == inputs[SAMPLE_KEY[builder]].shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_save_pretrained_round_trip(builder, tmp_path):
    model = builder().eval()
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    inputs = example_inputs(model, batch_size=2, timesteps=[10, 900])
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, loaded(**inputs).sample)


def test_example_inputs_per_architecture():
    unet = example_inputs(tiny_unet2d(), 2)
    assert set(unet) == {"sample", "timestep", "class_labels"}
    assert set(example_inputs(tiny_unet2d(class_conditional=False), 2)) == {"sample", "timestep"}
    cond = example_inputs(tiny_unet2d_condition(cross_attention_dim=16), 2)
    assert cond["encoder_hidden_states"].shape == (2, 4, 16)
    dit = example_inputs(tiny_dit(), 2)
    assert set(dit) == {"hidden_states", "timestep", "class_labels"} and dit["class_labels"].max() < 10
    pixart = example_inputs(tiny_pixart(caption_channels=12), 2)
    assert pixart["encoder_hidden_states"].shape == (2, 4, 12)
    assert pixart["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}
    for inputs in (unet, cond, dit, pixart):
        t = inputs["timestep"]
        assert t.shape == (2,) and t.dtype == torch.int64 and t.min() >= 0 and t.max() < 1000
    # same seed, same inputs; a single timestep is repeated per sample
    assert torch.equal(example_inputs(tiny_dit(), 2)["hidden_states"], dit["hidden_states"])
    assert torch.equal(example_inputs(tiny_dit(), 3, timesteps=7)["timestep"], torch.tensor([7, 7, 7]))


def test_example_inputs_rejects_bad_input():
    with pytest.raises(ValueError, match="3 timesteps for batch_size=2"):
        example_inputs(tiny_unet2d(), 2, timesteps=[1, 2, 3])
    with pytest.raises(TypeError, match="UNet2DModel"):
        example_inputs(nn.Linear(2, 2), 2)


def test_scheduler_for_tests():
    scheduler = scheduler_for_tests()
    assert isinstance(scheduler, DDPMScheduler)
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.alphas_cumprod.shape == (1000,)
