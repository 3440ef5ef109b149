"""Sizes of a demo run, and the calibration function that runs the float model's trajectories."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffquant.bench.digits.data import NUM_DIGITS
from diffquant.bench.digits.sampling import sample_digits


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run.

    Attributes:
        quick: the short run (fewer samples and steps, shorter fine-tunes), same rows.
        num_samples: generated samples per row (balanced over the 10 digits).
        num_steps: DDIM steps.
        calibration_samples: samples whose float DDIM trajectories calibrate the quantized rows.
        calibration_steps: denoising steps of those trajectories kept for calibration (uniformly spread).
        sample_batch: samples per denoiser call when sampling (the call batch is twice that under
            guidance); deterministic samplers give the same samples whatever it is.
        latency_batch: images per denoising step when timing (the model sees twice as many with CFG).
        latency_rounds: alternating rounds of the row's and the float model's timing.
        bootstrap_resamples: resamples of the paired bootstrap behind every interval.
        seed: seed of the float model, the classifier and the sampling noise.
    """

    quick: bool = False
    num_samples: int = 500
    num_steps: int = 50
    calibration_samples: int = 32
    calibration_steps: int = 25
    sample_batch: int = 250
    latency_batch: int = 64
    latency_rounds: int = 3
    bootstrap_resamples: int = 1000
    seed: int = 0

    @classmethod
    def for_mode(cls, quick: bool, seed: int = 0) -> DemoSettings:
        """The default full or quick settings."""
        if quick:  # a smoke run of every row: DDIM-10 (calibrated on DDIM-10 trajectories), 200 samples
            return cls(
                quick=True,
                num_samples=200,
                num_steps=10,
                calibration_samples=16,
                calibration_steps=10,
                latency_rounds=2,
                seed=seed,
            )
        return cls(seed=seed)


def calibration_fn(settings: DemoSettings):
    """A calibrate function that runs the float DDIM trajectories of a few balanced samples."""
    labels = torch.arange(settings.calibration_samples) % NUM_DIGITS

    def calibrate(model: nn.Module) -> None:
        # the float trajectories (quantizers observe, they do not quantize, while calibrating)
        sample_digits(model, labels, num_steps=settings.num_steps, seed=settings.seed + 1, progress=False)

    return calibrate
