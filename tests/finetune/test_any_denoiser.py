"""Every quantized fine-tuning method trains a text-conditional UNet (v-prediction), PixArt (ε,
``added_cond_kwargs``) and an SD3-style flow-matching transformer, and ends deployable."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_cases import Case, N
from torch import nn

from diffquant.config import ActivationQuantConfig, QuantConfig, WeightQuantConfig
from diffquant.efficientdm import EfficientDMConfig
from diffquant.finetune import denoising_loss, fit_denoiser, model_output, prepare_finetune
from diffquant.finetune.conditioning import Conditioning
from diffquant.finetune.distill import distill
from diffquant.finetune.methods import QATFinetuneConfig, QLISAFinetuneConfig, TuneQDMFinetuneConfig
from diffquant.finetune.objectives import prediction_type
from diffquant.models import get_arch_spec
from diffquant.models.tiny import example_inputs
from diffquant.nn.qmodules import is_quantized_layer
from diffquant.tuneqdm import TuneQDMConfig, is_tuneqdm_layer

DATA_METHODS = {
    "tuneqdm": TuneQDMFinetuneConfig(tuneqdm=TuneQDMConfig(bits=4, num_experts=4, train_delta_in=True)),
    "qlisa": QLISAFinetuneConfig(gamma=2, interval=5, lr=3e-3),
    "qat": QATFinetuneConfig(
        quant=QuantConfig(weights=WeightQuantConfig(bits=4), activations=ActivationQuantConfig(bits=8)),
        lr=3e-3,
        cosine_steps=30,
    ),
}


def _repeat(cond: Conditioning, times: int) -> Conditioning:
    return {
        k: v.repeat(times, *[1] * (v.ndim - 1)) if isinstance(v, torch.Tensor) else v for k, v in cond.items()
    }


@torch.no_grad()
def fixed_batch_loss(model: nn.Module, case: Case) -> float:
    """Denoising loss of every image at 4 fixed timesteps with fixed noise."""
    model.eval()
    timesteps = torch.linspace(0, 999, 4 * N).long()
    gen = torch.Generator().manual_seed(5)
    images, cond = case.images.repeat(4, 1, 1, 1), _repeat(case.conditioning, 4)
    return denoising_loss(model, images, case.scheduler, cond, generator=gen, timesteps=timesteps).item()


def assert_deployable(model: nn.Module, quantized=is_quantized_layer) -> None:
    """Every Linear/Conv2d is quantized except the architecture's full-precision defaults; finite output."""
    spec = get_arch_spec(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d) or quantized(m)}
    float_layers = [n for n, m in layers.items() if not quantized(m)]
    assert sum(map(quantized, layers.values())) > 10
    assert all(spec.is_kept_fp(n) for n in float_layers), float_layers
    inputs = example_inputs(model, batch_size=2, timesteps=[999, 10])
    with torch.no_grad():
        assert torch.isfinite(model.eval()(**inputs).sample).all()


@pytest.mark.parametrize("method", sorted(DATA_METHODS))
def test_training_on_data_lowers_the_loss_and_ends_deployable(case, method):
    model = copy.deepcopy(case.model)
    before = fixed_batch_loss(case.model, case)  # the float start
    setup = prepare_finetune(model, DATA_METHODS[method], scheduler=case.scheduler)
    if method != "qat":  # quantized before training: the fair start
        before = fixed_batch_loss(setup.model, case)
    losses = fit_denoiser(
        setup.model,
        setup.optimizer,
        case.images,
        case.conditioning,
        case.scheduler,
        steps=30,
        batch_size=8,
        unconditional=case.unconditional,
        cond_dropout=0.1,
        lr_scheduler=setup.lr_scheduler,
        after_step=setup.after_step,
        progress=False,
    )
    final = setup.inference_model()
    after = fixed_batch_loss(final, case)
    assert after < 0.9 * before, (before, after)  # measured: 0.60 .. 0.83
    assert sum(losses[-5:]) < sum(losses[:5])
    assert_deployable(final, is_tuneqdm_layer if method == "tuneqdm" else is_quantized_layer)


@torch.no_grad()
def distillation_error(student: nn.Module, teacher: nn.Module, case: Case) -> float:
    """Mean squared student-teacher output difference on fixed noisy inputs at 4 noise levels."""
    gen = torch.Generator().manual_seed(7)
    total = 0.0
    for t in (900.0, 600.0, 300.0, 50.0):
        x = torch.randn(case.images.shape, generator=gen)
        t_batch = torch.full((N,), t)
        diff = model_output(student.eval(), x, t_batch, case.conditioning) - model_output(
            teacher, x, t_batch, case.conditioning
        )
        total += diff.square().mean().item()
    return total / 4


def test_efficientdm_distillation_lowers_the_error_and_ends_deployable(case):
    v_prediction = prediction_type(case.scheduler) == "v_prediction"
    config = EfficientDMConfig(
        bits=4,
        act_bits=4,
        rank=4,
        iterations=8,
        lr=1e-2,
        step_lr=0.1,
        act_lr=0.1,
        batch_size=4,
        num_sampling_steps=4,
        calibration_steps=None,
        snr_gamma=5.0 if v_prediction else None,  # min-SNR for v; flow matching refuses it
    )
    model = copy.deepcopy(case.model)
    setup = prepare_finetune(model, config, scheduler=case.scheduler, calibrate=case.calibrate)
    before = distillation_error(setup.model, case.model, case)  # the PTQ start (LoRA B = 0)
    losses = distill(
        setup.model,
        case.model,
        setup.optimizer,
        scheduler=case.scheduler,
        iterations=config.iterations,
        conditioning=case.conditioning,
        unconditional=case.unconditional,
        batch_size=config.batch_size,
        num_sampling_steps=config.num_sampling_steps,
        snr_gamma=config.snr_gamma,
        lr_scheduler=setup.lr_scheduler,
        progress=False,
    )
    assert len(losses) == config.iterations and all(torch.isfinite(torch.tensor(losses)))
    final = setup.inference_model()
    after = distillation_error(final, case.model, case)
    assert after < 0.9 * before, (before, after)  # measured: 0.67 .. 0.82
    assert_deployable(final)
    assert (
        final.get_submodule(get_arch_spec(final).keep_fp[0].replace("\\", "")).qweight.bits == 8
    )  # W8A8 edge
