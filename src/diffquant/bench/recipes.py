"""Fine-tuned rows of ``diffquant demo``: recipes that turn the float digits model into a quantized,
fine-tuned one. A row names its recipe in :attr:`~diffquant.bench.rows.DemoRow.finetune`; the row's
``config`` says which bit-widths the recipe targets.

- ``efficientdm``: PTQ start (first/last layers W8A8, per-step activation tables), QALoRA with
  scale-aware learning rates and TALSQ, data-free distillation from the float model, merge.
- ``tuneqdm``: frozen packed INT weights; only the timestep-aware scales are trained, by data-free
  distillation from the float model.
- ``qlisa``: NF4 (double-quantized) frozen layers, layerwise sampled fine-tuning on the digits data.
- ``qat``: fake-quant training from the float model on the digits data, then conversion.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from diffquant.bench.digits.cache import fp_scheduler
from diffquant.bench.digits.data import load_digits_dataset, train_test_split
from diffquant.bench.digits.model import NULL_CLASS
from diffquant.config import QuantConfig
from diffquant.efficientdm import efficientdm_finetune
from diffquant.finetune.common import fit_denoiser
from diffquant.finetune.distill import distill
from diffquant.models import get_arch_spec
from diffquant.qat import qat_finetune
from diffquant.qlisa import QLISADiffusion
from diffquant.tuneqdm import TuneQDMConfig, apply_tuneqdm, delta_param_groups, register_tas_pre_hook


@dataclass(frozen=True)
class FinetuneBudget:
    """Training steps of the fine-tuned rows (full run; the quick run uses a tenth).

    Attributes:
        distill_iterations: optimizer steps of data-free distillation (EfficientDM, TuneQDM).
        data_steps: optimizer steps on the digits training data (QLISA, QAT).
    """

    distill_iterations: int = 200
    data_steps: int = 300

    def scaled(self, quick: bool) -> FinetuneBudget:
        if not quick:
            return self
        return FinetuneBudget(max(1, self.distill_iterations // 10), max(1, self.data_steps // 10))


TUNEQDM_LR = 1e-4
"""Learning rate of the TuneQDM rows' distillation, relative to each scale (`delta_param_groups`).

Measured on the full demo (PSNR vs the float model's samples, before -> after 200 iterations): 1e-4 lifts
W8 from 50.9 to 54.8 dB and W4 from 28.2 to 31.2 dB; 3e-4 helps W4 (32.4) but hurts W8 (43.0); 1e-2
diverges."""

QLISA_LR = 1e-4
"""Learning rate of the QLISA row (Adam on the sampled float layers). FD / FP on the full demo: 1.08 at
1e-4, 1.30 at 3e-4 and at 1e-3 (plain NF4 without fine-tuning: 1.07)."""

Recipe = Callable[[nn.Module, QuantConfig, FinetuneBudget, Callable[[nn.Module], None]], nn.Module]


def _train_data(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    train, _ = train_test_split(load_digits_dataset(model.config.sample_size))
    return train.images, train.labels


def _efficientdm(fp_model, config, budget, calibrate) -> nn.Module:
    acts = config.activations
    return efficientdm_finetune(
        fp_model,
        scheduler=fp_scheduler(),
        calibrate=calibrate,
        weight_bits=config.weights.bits,
        act_bits=acts.bits if acts is not None else 8,
        iterations=budget.distill_iterations,
        progress=False,
    )


def _tuneqdm(fp_model, config, budget, calibrate) -> nn.Module:
    model = copy.deepcopy(fp_model)
    tq = TuneQDMConfig(
        n_bits=config.weights.bits,
        num_experts=4,
        train_delta_in=True,
        exclude=tuple(get_arch_spec(model).keep_fp),
    )
    apply_tuneqdm(model, tq)
    register_tas_pre_hook(model, tq.num_experts, schedule=fp_scheduler())
    # rates relative to each layer's step: one absolute rate that suits INT4 scales wipes out INT8 ones
    optimizer = torch.optim.AdamW(delta_param_groups(model, lr=TUNEQDM_LR), weight_decay=0.0)
    distill(
        model,
        fp_model,
        optimizer,
        scheduler=fp_scheduler(),
        iterations=budget.distill_iterations,
        progress=False,
    )
    return model.eval()


def _qlisa(fp_model, config, budget, calibrate) -> nn.Module:
    model = copy.deepcopy(fp_model)
    qlisa = QLISADiffusion(model, gamma=4, interval=20, lr=QLISA_LR).register().insert_hook()
    images, labels = _train_data(model)
    fit_denoiser(
        model,
        None,
        images,
        labels,
        fp_scheduler(),
        steps=budget.data_steps,
        batch_size=64,
        label_dropout=0.1,
        null_class=NULL_CLASS,
        after_step=qlisa.step,
        progress=False,
    )
    return qlisa.finalize().eval()


def _qat(fp_model, config, budget, calibrate) -> nn.Module:
    images, labels = _train_data(fp_model)
    return qat_finetune(
        copy.deepcopy(fp_model),
        config,
        images=images,
        labels=labels,
        scheduler=fp_scheduler(),
        steps=budget.data_steps,
        batch_size=64,
        lr=1e-4,
        null_class=NULL_CLASS,
        label_dropout=0.1,
        progress=False,
    ).eval()


FINETUNE_RECIPES: dict[str, Recipe] = {
    "efficientdm": _efficientdm,
    "tuneqdm": _tuneqdm,
    "qlisa": _qlisa,
    "qat": _qat,
}
"""Recipe by name; each gets the float model (left untouched), the row's config, the step budget
and the demo's calibration function, and returns the fine-tuned quantized model."""
