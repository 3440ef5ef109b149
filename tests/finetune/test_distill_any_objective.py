"""Distillation follows the scheduler: flow-matching Euler trajectories for flow models, DDIM otherwise."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

from diffquant.finetune.distill import distill
from diffquant.models.tiny import flow_scheduler_for_tests, scheduler_for_tests


class Denoiser(nn.Module):
    """A config-less denoiser that records its timesteps: ``x · w + t / 1000``."""

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(weight))
        self.timesteps: list[torch.Tensor] = []

    def forward(self, x, timestep):
        self.timesteps.append(timestep.clone())
        return x * self.weight + timestep.reshape(-1, 1, 1, 1) / 1000


def _run(student, teacher, scheduler, **kwargs):
    return distill(
        student,
        teacher,
        torch.optim.SGD(student.parameters(), lr=0.1),
        scheduler=scheduler,
        iterations=6,
        batch_size=2,
        num_sampling_steps=3,
        guidance_scale=1.0,
        sample_shape=(1, 2, 2),
        progress=False,
        **kwargs,
    )


def test_flow_models_distill_on_flow_matching_timesteps():
    scheduler = flow_scheduler_for_tests()
    teacher = Denoiser()
    losses = _run(Denoiser(1.5), teacher, scheduler)
    assert losses[-1] < losses[0]
    first = [float(t[0]) for t in teacher.timesteps[:3]]
    assert first[0] == pytest.approx(1000.0) and first == sorted(first, reverse=True)  # σ · T, from σ = 1
    assert teacher.timesteps[0].dtype.is_floating_point
    equal = _run(copy.deepcopy(teacher), teacher, scheduler)
    assert all(loss == 0.0 for loss in equal)
    with pytest.raises(ValueError, match="flow-matching"):
        _run(Denoiser(), teacher, scheduler, snr_gamma=5.0)


def test_ddpm_models_distill_on_ddim_timesteps_and_need_a_shape():
    teacher = Denoiser()
    _run(Denoiser(1.5), teacher, scheduler_for_tests())
    ddim = DDIMScheduler.from_config(scheduler_for_tests().config)
    ddim.set_timesteps(3)
    assert [int(t[0]) for t in teacher.timesteps[:3]] == ddim.timesteps.tolist()
    assert teacher.timesteps[0].dtype == torch.int64
    with pytest.raises(ValueError, match="sample_shape"):
        distill(Denoiser(), teacher, torch.optim.SGD(teacher.parameters()), scheduler=scheduler_for_tests(),
                iterations=1, guidance_scale=1.0, progress=False)  # fmt: skip
