"""The noise-level context on the four diffusers denoisers, loaded back from `save_pretrained`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffquant.models import get_arch_spec
from diffquant.models.tiny import (
    example_inputs,
    scheduler_for_tests,
    tiny_dit,
    tiny_pixart,
    tiny_unet2d,
    tiny_unet2d_condition,
)
from diffquant.noise import NoiseLevel, attach_noise_context, current_noise_level

MIXED = [999, 10, 500, 10]


def _reference_log_snr(scheduler, t) -> torch.Tensor:
    ac = scheduler.alphas_cumprod.double()
    return torch.log(ac / (1 - ac))[torch.as_tensor(t)].float()


@pytest.fixture(params=[tiny_unet2d, tiny_unet2d_condition, tiny_dit, tiny_pixart], ids=lambda b: b.__name__)
def loaded(request, tmp_path) -> nn.Module:
    """A tiny model saved with save_pretrained and loaded back with from_pretrained, in eval mode."""
    built = request.param()
    built.save_pretrained(tmp_path)
    return type(built).from_pretrained(tmp_path).eval()


def _probe(model: nn.Module, first: bool) -> list[NoiseLevel | None]:
    """Record `current_noise_level()` in the first layer, or in a Linear inside the last block."""
    if first:
        name = "conv_in" if hasattr(model, "conv_in") else "pos_embed.proj"
    else:
        last_block = get_arch_spec(model).block_prefixes(model)[-1]
        name = next(
            n for n, m in model.named_modules() if n.startswith(last_block + ".") and isinstance(m, nn.Linear)
        )
    seen: list[NoiseLevel | None] = []
    model.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(current_noise_level()))
    return seen


def test_mixed_per_sample_timesteps(loaded):
    scheduler = scheduler_for_tests()
    handle = attach_noise_context(loaded, scheduler)
    seen = _probe(loaded, first=False)
    with torch.no_grad():
        loaded(**example_inputs(loaded, 4, timesteps=MIXED))
    assert len(seen) == 1 and seen[0] is not None
    assert seen[0].timestep.dtype == torch.float32
    assert torch.equal(seen[0].timestep, torch.tensor(MIXED, dtype=torch.float32))
    torch.testing.assert_close(seen[0].log_snr, _reference_log_snr(scheduler, MIXED), rtol=1e-6, atol=1e-6)
    assert current_noise_level() is None
    handle.remove()
    with torch.no_grad():
        loaded(**example_inputs(loaded, 4, timesteps=MIXED))
    assert seen[-1] is None


@pytest.mark.parametrize("builder", [tiny_unet2d, tiny_unet2d_condition], ids=lambda b: b.__name__)
@pytest.mark.parametrize("t", [250, torch.tensor(250)], ids=["int", "0-d"])
def test_scalar_timestep_broadcasts_to_batch_unet(builder, t):
    model = builder().eval()
    scheduler = scheduler_for_tests()
    attach_noise_context(model, scheduler)
    seen = _probe(model, first=False)
    inputs = {**example_inputs(model, 3), "timestep": t}
    with torch.no_grad():
        model(**inputs)
    assert torch.equal(seen[0].timestep, torch.full((3,), 250.0))
    torch.testing.assert_close(seen[0].log_snr, _reference_log_snr(scheduler, [250] * 3))
    assert current_noise_level() is None


def test_one_element_timestep_broadcasts_dit():
    model = tiny_dit().eval()
    attach_noise_context(model, scheduler_for_tests())
    seen = _probe(model, first=False)
    with torch.no_grad():
        model(**{**example_inputs(model, 3), "timestep": torch.tensor([42])})
    assert torch.equal(seen[0].timestep, torch.full((3,), 42.0))


def test_pixart_scalar_timestep_is_broadcast_and_model_error_restores():
    # PixArt's own forward needs a (B,) timestep; the context still broadcasts the scalar for layers that
    # run before the failure, and the forward hook restores the context after the model's error.
    model = tiny_pixart().eval()
    attach_noise_context(model, scheduler_for_tests())
    seen = _probe(model, first=True)
    with pytest.raises(AssertionError, match="1d-array"), torch.no_grad():  # diffusers' own check
        model(**{**example_inputs(model, 3), "timestep": torch.tensor(5)})
    assert torch.equal(seen[0].timestep, torch.full((3,), 5.0))
    assert current_noise_level() is None


def test_positional_timestep_and_wrong_length(loaded):
    attach_noise_context(loaded, scheduler_for_tests())
    inputs = example_inputs(loaded, 4, timesteps=MIXED)
    sample_key = "sample" if "sample" in inputs else "hidden_states"
    seen = _probe(loaded, first=True)
    if sample_key == "sample":  # the UNets take the timestep as second positional argument
        rest = {k: v for k, v in inputs.items() if k not in ("sample", "timestep")}
        with torch.no_grad():
            loaded(inputs["sample"], inputs["timestep"], **rest)
        assert torch.equal(seen[-1].timestep, torch.tensor(MIXED, dtype=torch.float32))
    with pytest.raises(ValueError, match="3 values but the batch has 4"):
        loaded(**{**inputs, "timestep": torch.tensor([1, 2, 3])})
    assert current_noise_level() is None
