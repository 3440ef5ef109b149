"""Fine-tuned rows of ``diffquant demo``: the digits benchmark's settings of the fine-tuning methods.

A row names its recipe in :attr:`~diffquant.bench.rows.DemoRow.finetune` (a fine-tuning method of
:mod:`diffquant.finetune.methods`); the row's ``config`` says which bit-widths the recipe targets. Each
recipe is data: the method's config for the digits model, and how it trains (data-free distillation
from the float model, or the denoising loss on the digits training split). The setup, the training
loops and ``finalize`` are the library's (:func:`diffquant.finetune.prepare_finetune`).

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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from diffquant.bench.digits.cache import fp_scheduler
from diffquant.bench.digits.data import NUM_DIGITS, load_digits_dataset, train_test_split
from diffquant.bench.digits.model import NULL_CLASS
from diffquant.config import QuantConfig
from diffquant.efficientdm import EfficientDMConfig
from diffquant.finetune import FinetuneConfig, class_conditioning, fit_denoiser, prepare_finetune
from diffquant.finetune.distill import distill
from diffquant.finetune.methods import QATFinetuneConfig, QLISAFinetuneConfig, TuneQDMFinetuneConfig
from diffquant.finetune.resume import TrainingCheckpoints
from diffquant.tuneqdm import TuneQDMConfig

DIGITS = class_conditioning(torch.arange(NUM_DIGITS))
"""The conditionings distillation trajectories draw from: the ten digits."""
UNCONDITIONAL = class_conditioning(NULL_CLASS)
"""The null class: classifier-free guidance's unconditional half and the dropout replacement."""


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

DATA_BATCH_SIZE = 64
DATA_COND_DROPOUT = 0.1


@dataclass(frozen=True)
class DemoRecipe:
    """One fine-tuned row's method settings and training.

    Attributes:
        config: ``(row config, budget) -> method config`` (the row gives the bit widths).
        distill: train by data-free distillation from the float model; else on the digits data.
        distill_options: extra :func:`~diffquant.finetune.distill.distill` arguments.
    """

    config: Callable[[QuantConfig, FinetuneBudget], FinetuneConfig]
    distill: bool
    distill_options: dict[str, Any] = field(default_factory=dict)

    def __call__(
        self,
        fp_model: nn.Module,
        quant: QuantConfig,
        budget: FinetuneBudget,
        calibrate: Callable[[nn.Module], None],
        checkpoint: TrainingCheckpoints | None = None,
    ) -> nn.Module:
        """Fine-tune a copy of ``fp_model`` (left untouched) and return the deployable model;
        ``checkpoint``: training checkpoints and resuming (bit-identical to an uninterrupted run)."""
        scheduler = fp_scheduler()
        setup = prepare_finetune(
            copy.deepcopy(fp_model).eval(),
            self.config(quant, budget),
            scheduler=scheduler,
            calibrate=calibrate,
        )
        if self.distill:
            distill(
                setup.model,
                fp_model,
                setup.optimizer,
                scheduler=scheduler,
                iterations=budget.distill_iterations,
                conditioning=DIGITS,
                unconditional=UNCONDITIONAL,
                lr_scheduler=setup.lr_scheduler,
                progress=False,
                checkpoint=checkpoint,
                method_state=setup.method_state,
                **self.distill_options,
            )
        else:
            train, _ = train_test_split(load_digits_dataset(fp_model.config.sample_size))
            fit_denoiser(
                setup.model,
                setup.optimizer,
                train.images,
                class_conditioning(train.labels),
                scheduler,
                steps=budget.data_steps,
                batch_size=DATA_BATCH_SIZE,
                unconditional=UNCONDITIONAL,
                cond_dropout=DATA_COND_DROPOUT,
                lr_scheduler=setup.lr_scheduler,
                after_step=setup.after_step,
                progress=False,
                checkpoint=checkpoint,
                method_state=setup.method_state,
            )
        return setup.inference_model()


def _efficientdm(quant: QuantConfig, budget: FinetuneBudget) -> EfficientDMConfig:
    acts = quant.activations
    return EfficientDMConfig(
        bits=quant.weights.bits,
        act_bits=acts.bits if acts is not None else 8,
        iterations=budget.distill_iterations,
    )


def _efficientdm_distill() -> dict[str, Any]:
    defaults = EfficientDMConfig()
    return {
        "batch_size": defaults.batch_size,
        "num_sampling_steps": defaults.num_sampling_steps,
        "guidance_scale": defaults.guidance_scale,
        "snr_gamma": defaults.snr_gamma,
        "seed": defaults.seed,
    }


FINETUNE_RECIPES: dict[str, DemoRecipe] = {
    "efficientdm": DemoRecipe(_efficientdm, distill=True, distill_options=_efficientdm_distill()),
    "tuneqdm": DemoRecipe(
        lambda quant, budget: TuneQDMFinetuneConfig(
            tuneqdm=TuneQDMConfig(bits=quant.weights.bits, num_experts=4, train_delta_in=True),
            lr=TUNEQDM_LR,
            keep_arch_fp=True,
        ),
        distill=True,
    ),
    "qlisa": DemoRecipe(
        lambda quant, budget: QLISAFinetuneConfig(gamma=4, interval=20, lr=QLISA_LR), distill=False
    ),
    "qat": DemoRecipe(
        lambda quant, budget: QATFinetuneConfig(quant=quant, lr=1e-4, cosine_steps=budget.data_steps),
        distill=False,
    ),
}
"""Recipe by method name; each gets the float model (left untouched), the row's config, the step budget
and the demo's calibration function, and returns the fine-tuned quantized model."""
