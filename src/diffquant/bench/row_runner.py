"""The work of one demo row — quantize or fine-tune, sample, time — in this process or a worker.

Rows are independent given the float model and the seeds, so ``diffquant demo`` runs groups of rows
(a row and the transfer rows re-using its model) in parallel worker processes, one torch thread each:
on a small CPU this uses every core without the thread oversubscription that slows a 1M-parameter
UNet's tiny convolutions. Each row seeds the global RNG from its name, so its result does not
depend on which worker ran it or what ran before. Scoring happens in the parent, which holds the
float rows' samples.
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from diffquant.api import quantize_, weight_bits_per_parameter
from diffquant.bench.digits.cache import fp_scheduler, load_or_train_fp_model
from diffquant.bench.digits.data import NUM_DIGITS
from diffquant.bench.digits.model import NULL_CLASS
from diffquant.bench.digits.sampling import sample_digits
from diffquant.bench.recipes import FINETUNE_RECIPES, FinetuneBudget
from diffquant.bench.rows import DemoRow
from diffquant.bench.settings import DemoSettings, calibration_fn
from diffquant.bench.timing import StageTimer
from diffquant.config import CalibrationConfig
from diffquant.eval.perf import measure_paired_latency, model_size_bytes
from diffquant.kernels import kernel_mode
from diffquant.ptq.calibration import record_denoiser_calls, replay


def balanced_labels(n: int) -> torch.Tensor:
    """``0, 1, ..., 9, 0, 1, ...`` (``n`` labels): every digit requested equally."""
    return torch.arange(n) % NUM_DIGITS


def make_sampler(name: str):
    """A fresh diffusers scheduler of kind ``name`` (see :data:`~diffquant.bench.rows.SAMPLERS`)
    built from the float model's training schedule."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    cls = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}[name]
    return cls.from_config(fp_scheduler().config)


def _latency_inputs(model: nn.Module, batch: int) -> dict[str, torch.Tensor]:
    size = model.config.sample_size
    channels = model.config.in_channels
    labels = torch.cat([balanced_labels(batch), torch.full((batch,), NULL_CLASS)])  # CFG: cond + uncond
    return {
        "sample": torch.randn(2 * batch, channels, size, size, generator=torch.Generator().manual_seed(0)),
        "timestep": torch.full((2 * batch,), 500.0),
        "class_labels": labels,
    }


@dataclass
class RowRun:
    """A row's samples and the measurements that need its model (scores come later, in the parent)."""

    name: str
    samples: torch.Tensor  # (N, 1, S, S)
    measured: dict[str, Any]


class RowRunner:
    """Quantizes, samples and times rows against one float model.

    Args:
        fp_model: the float digits UNet (left untouched).
        settings: the run's sizes.

    The float model's calibration trajectories are sampled once, here, and replayed to every row's
    calibration (the calibrate function always receives the float model being calibrated, which
    computes exactly what the sampler would).
    """

    def __init__(self, fp_model: nn.Module, settings: DemoSettings) -> None:
        self.fp_model = fp_model
        self.settings = settings
        self.calls = record_denoiser_calls(
            fp_model, calibration_fn(settings), CalibrationConfig(merge_batch=None)
        )

    def calibrate(self, model: nn.Module) -> None:
        """Replay the float calibration trajectories on ``model``."""
        replay(model, self.calls)

    def _model(self, row: DemoRow) -> nn.Module:
        if row.finetune is not None:
            budget = FinetuneBudget().scaled(self.settings.quick)
            return FINETUNE_RECIPES[row.finetune](self.fp_model, row.config, budget, self.calibrate)
        model = copy.deepcopy(self.fp_model)
        if row.config is not None:
            calibration = CalibrationConfig(num_steps=self.settings.calibration_steps)
            quantize_(
                model,
                replace(row.config, calibration=calibration),
                calibrate=self.calibrate,
                schedule=fp_scheduler(),
            )
        return model

    def run_group(self, rows: tuple[DemoRow, ...]) -> list[RowRun]:
        """Run ``rows[0]`` and then the transfer rows that re-use its model."""
        runs, model = [], None
        for row in rows:
            timer = StageTimer()
            torch.manual_seed(self.settings.seed + zlib.crc32(row.name.encode()))
            if row.transfer_of is None:
                with timer("quantize"):
                    model = self._model(row)
            steps = row.num_steps or self.settings.num_steps
            # quality on the reference path: integer kernels are chosen by timing and agree with it only up
            # to float rounding, which would make scores depend on the machine's load; latency uses them
            with timer("sample"), kernel_mode("reference"):
                samples = sample_digits(
                    model,
                    balanced_labels(self.settings.num_samples),
                    scheduler=make_sampler(row.sampler),
                    num_steps=steps,
                    seed=self.settings.seed,
                    batch_size=self.settings.sample_batch,
                    progress=False,
                )
            with timer("latency"):
                inputs = _latency_inputs(model, self.settings.latency_batch)
                latency_ms, fp_latency_ms = measure_paired_latency(
                    model, self.fp_model, inputs, rounds=self.settings.latency_rounds, repeats=2
                )
            measured = {
                "sampler": f"{row.sampler}-{steps}",
                "bits_per_weight": weight_bits_per_parameter(model),
                "size_bytes": model_size_bytes(model),
                "step_latency_ms": latency_ms,
                "latency_vs_fp": latency_ms / fp_latency_ms,
                "calibration_seconds": timer.seconds.get("quantize", 0.0),
                "seconds": timer.seconds,
            }
            runs.append(RowRun(row.name, samples, measured))
        return runs


_WORKER: RowRunner | None = None


def init_worker(cache_dir: Any, settings: DemoSettings, threads: int) -> None:
    """Process-pool initializer: one float model and one set of calibration calls per worker."""
    global _WORKER
    torch.set_num_threads(threads)
    fp_model = load_or_train_fp_model(cache_dir, seed=settings.seed, progress=False).eval()
    _WORKER = RowRunner(fp_model, settings)


def run_group_in_worker(rows: tuple[DemoRow, ...]) -> list[RowRun]:
    """Process-pool task: :meth:`RowRunner.run_group` on this worker's runner."""
    if _WORKER is None:
        raise RuntimeError("init_worker did not run in this process")
    return _WORKER.run_group(rows)
