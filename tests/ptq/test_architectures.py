"""Calibrated PTQ on real diffusers architectures built from configs (saved and reloaded)."""

import pytest
import torch
from torch import nn

from diffquant import ActivationQuantConfig, QuantConfig, WeightQuantConfig, quantize_
from diffquant.api import quantized_layers
from diffquant.models import get_arch_spec
from diffquant.models.tiny import (
    example_inputs,
    scheduler_for_tests,
    tiny_dit,
    tiny_pixart,
    tiny_unet2d_condition,
)

BUILDERS = {"unet2d_condition": tiny_unet2d_condition, "dit": tiny_dit, "pixart": tiny_pixart}


def _sqnr_db(reference, approx):
    return (10 * torch.log10(reference.pow(2).mean() / (reference - approx).pow(2).mean())).item()


@pytest.fixture(params=sorted(BUILDERS))
def reloaded(request, tmp_path):
    model = BUILDERS[request.param]()
    model.save_pretrained(tmp_path)
    return type(model).from_pretrained(tmp_path).eval()


def _timesteps(batch, seed):
    return torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize(
    ("weights", "activations", "min_sqnr"),
    [
        (WeightQuantConfig(bits=8, method="gptq"), ActivationQuantConfig(bits=8), 25.0),
        (WeightQuantConfig(bits=4, symmetric=False, method="qronos"), ActivationQuantConfig(bits=8), 12.0),
    ],
)
def test_calibrated_ptq_covers_every_layer_and_stays_close(reloaded, weights, activations, min_sqnr):
    model = reloaded
    calib = [example_inputs(model, 4, timesteps=_timesteps(4, s), seed=s) for s in range(4)]
    held_out = example_inputs(model, 4, timesteps=_timesteps(4, 99), seed=99)
    with torch.no_grad():
        reference = model(**held_out).sample
    quantize_(
        model,
        QuantConfig(weights=weights, activations=activations),
        calibrate=lambda m: [m(**c) for c in calib],
        schedule=scheduler_for_tests(),
    )
    spec = get_arch_spec(model)
    left_float = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert left_float and all(spec.is_kept_fp(n) for n in left_float)  # only the architecture's defaults
    assert len(quantized_layers(model)) > 3 * len(left_float) // 2
    with torch.no_grad():
        out = model(**held_out).sample
    assert _sqnr_db(reference, out) > min_sqnr
