"""The training target follows the scheduler: ε, v (get_velocity), x₀, flow matching; min-SNR weights."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler
from torch import nn

from diffquant.finetune import denoising_loss
from diffquant.finetune.objectives import (
    FLOW_MATCHING,
    flow_sigmas,
    min_snr_weight,
    noisy_batch,
    prediction_type,
)
from diffquant.models.tiny import flow_scheduler_for_tests

X0 = torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(0))
T = torch.tensor([0, 1, 250, 500, 998, 999])


def _noise(seed: int) -> torch.Tensor:
    """The noise ``noisy_batch`` draws after the timesteps from ``Generator(seed)``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(X0.shape, generator=gen)


@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler])
def test_epsilon_v_and_sample_targets(scheduler_class):
    for kind in ("epsilon", "v_prediction", "sample"):
        scheduler = scheduler_class(prediction_type=kind)
        batch = noisy_batch(scheduler, X0, generator=torch.Generator().manual_seed(1), timesteps=T)
        noise = _noise(1)
        assert torch.equal(batch.timestep, T)
        ddpm = DDPMScheduler()  # same betas: the same x_t for every scheduler of the family
        assert torch.equal(batch.x_t, ddpm.add_noise(X0, noise, T))
        expected = {"epsilon": noise, "v_prediction": ddpm.get_velocity(X0, noise, T), "sample": X0}[kind]
        assert torch.equal(batch.target, expected), kind
        if kind == "v_prediction" and scheduler_class is not EulerDiscreteScheduler:  # Euler: σ-indexed
            assert torch.equal(batch.target, scheduler.get_velocity(X0, noise, T))


def test_v_target_is_the_velocity_formula():
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    batch = noisy_batch(scheduler, X0, generator=torch.Generator().manual_seed(2), timesteps=T)
    a = scheduler.alphas_cumprod[T].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(batch.target, a.sqrt() * _noise(2) - (1 - a).sqrt() * X0)


def test_flow_matching_interpolates_and_targets_noise_minus_data():
    scheduler = flow_scheduler_for_tests()
    assert prediction_type(scheduler) == FLOW_MATCHING
    batch = noisy_batch(scheduler, X0, generator=torch.Generator().manual_seed(3), timesteps=T)
    noise = _noise(3)
    sigma = scheduler.sigmas.flip(0)[T]  # the scheduler's own training sigmas, low noise first
    torch.testing.assert_close(flow_sigmas(scheduler, T), sigma)
    s = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(batch.x_t, (1 - s) * X0 + s * noise)
    torch.testing.assert_close(batch.target, noise - X0)
    torch.testing.assert_close(batch.timestep, sigma * 1000)  # diffusers: model timestep σ · T
    assert batch.timestep.max() == 1000.0  # t = 999 is pure noise (σ = 1)


def test_unknown_prediction_types_are_refused():
    with pytest.raises(ValueError, match="prediction_type='flow_prediction'"):
        prediction_type(UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True))
    scheduler = DDPMScheduler()
    scheduler.register_to_config(prediction_type="x_start")
    with pytest.raises(ValueError, match="cannot train"):
        denoising_loss(nn.Identity(), X0, scheduler)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        noisy_batch(DDPMScheduler(), X0, timesteps=T + 1)


def test_min_snr_weights_match_hang_et_al():
    alpha_bar, gamma = 0.9, 5.0  # SNR 9
    assert min_snr_weight(alpha_bar, gamma, "epsilon") == pytest.approx(5 / 9)
    assert min_snr_weight(alpha_bar, gamma, "v_prediction") == pytest.approx(5 / 10)
    assert min_snr_weight(alpha_bar, gamma, "sample") == pytest.approx(5.0)
    assert min_snr_weight(0.5, gamma, "epsilon") == 1.0  # SNR 1 < γ
    with pytest.raises(ValueError, match="flow-matching"):
        min_snr_weight(alpha_bar, gamma, FLOW_MATCHING)
