"""``diffquant demo``: every method on the embedded digits benchmark, one table.

For each row of :data:`diffquant.bench.rows.DEMO_ROWS` the float digits UNet is copied, quantized,
sampled with DDIM and classifier-free guidance from the same seeds as the float model, and scored:
Fréchet distance (FD) of digit-classifier features to real digits, FD ratio to the float model,
class accuracy of the samples, PSNR against the float model's samples, stored bits per weight,
model size and CPU latency of one denoising step.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from diffquant.api import quantize_, weight_bits_per_parameter
from diffquant.bench.digits.cache import fp_scheduler, load_or_train_classifier, load_or_train_fp_model
from diffquant.bench.digits.data import NUM_DIGITS, load_digits_dataset
from diffquant.bench.digits.model import NULL_CLASS
from diffquant.bench.digits.sampling import sample_digits, save_sample_grid
from diffquant.bench.recipes import FINETUNE_RECIPES, FinetuneBudget
from diffquant.bench.report import write_report
from diffquant.bench.rows import DEMO_ROWS, DemoRow
from diffquant.config import CalibrationConfig
from diffquant.eval.frechet import classifier_features, frechet_distance, noise_floor_fd
from diffquant.eval.metrics import class_accuracy, psnr
from diffquant.eval.perf import measure_paired_latency, model_size_bytes
from diffquant.io import atomic_write_text


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run.

    Attributes:
        quick: the short run (fewer samples), same rows.
        num_samples: generated samples per row (balanced over the 10 digits).
        num_steps: DDIM steps.
        calibration_samples: samples whose float DDIM trajectories calibrate the quantized rows.
        calibration_steps: denoising steps of those trajectories kept for calibration (uniformly spread).
        latency_batch: images per denoising step when timing (the model sees twice as many with CFG).
        seed: seed of the float model, the classifier and the sampling noise.
    """

    quick: bool = False
    num_samples: int = 500
    num_steps: int = 50
    calibration_samples: int = 32
    calibration_steps: int = 25
    latency_batch: int = 64
    seed: int = 0

    @classmethod
    def for_mode(cls, quick: bool, seed: int = 0) -> DemoSettings:
        """The default full or quick settings."""
        if quick:
            return cls(quick=True, num_samples=200, calibration_samples=16, calibration_steps=10, seed=seed)
        return cls(seed=seed)


def _balanced_labels(n: int) -> torch.Tensor:
    return torch.arange(n) % NUM_DIGITS  # 0,1,...,9,0,1,... so every digit is requested equally


def calibration_fn(settings: DemoSettings):
    """A calibrate function that runs the float DDIM trajectories of a few balanced samples."""
    labels = _balanced_labels(settings.calibration_samples)

    def calibrate(model: nn.Module) -> None:
        # the float trajectories (quantizers observe, they do not quantize, while calibrating)
        sample_digits(model, labels, num_steps=settings.num_steps, seed=settings.seed + 1, progress=False)

    return calibrate


def _latency_inputs(model: nn.Module, batch: int) -> dict[str, torch.Tensor]:
    size = model.config.sample_size
    channels = model.config.in_channels
    labels = torch.cat([_balanced_labels(batch), torch.full((batch,), NULL_CLASS)])  # CFG: cond + uncond
    return {
        "sample": torch.randn(2 * batch, channels, size, size),
        "timestep": torch.full((2 * batch,), 500.0),
        "class_labels": labels,
    }


def make_sampler(name: str):
    """A fresh diffusers scheduler of kind ``name`` (see :data:`~diffquant.bench.rows.SAMPLERS`)
    built from the float model's training schedule."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    cls = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}[name]
    return cls.from_config(fp_scheduler().config)


@dataclass
class _RowContext:
    """What every row is scored against."""

    fp_model: nn.Module
    classifier: nn.Module
    real_features: torch.Tensor
    settings: DemoSettings
    out_dir: Path
    models: dict[str, nn.Module]  # quantized models by row name (for transfer rows)
    fp_samples: dict[str, torch.Tensor]  # float samples by sampler label
    fp_fd: dict[str, float]  # float FD by sampler label


def _quantized_model(row: DemoRow, ctx: _RowContext) -> tuple[nn.Module, float]:
    if row.transfer_of is not None:
        return ctx.models[row.transfer_of], 0.0
    start = time.perf_counter()
    if row.finetune is not None:
        budget = FinetuneBudget().scaled(ctx.settings.quick)
        recipe = FINETUNE_RECIPES[row.finetune]
        model = recipe(ctx.fp_model, row.config, budget, calibration_fn(ctx.settings))
        return model, time.perf_counter() - start
    model = copy.deepcopy(ctx.fp_model)
    if row.config is not None:
        config = replace(row.config, calibration=CalibrationConfig(num_steps=ctx.settings.calibration_steps))
        quantize_(model, config, calibrate=calibration_fn(ctx.settings), schedule=fp_scheduler())
    return model, time.perf_counter() - start


def evaluate_row(row: DemoRow, source: DemoRow, ctx: _RowContext) -> dict[str, Any]:
    """Quantize a copy of the float model as ``source`` says (or re-use the transferred model),
    sample it with ``row``'s sampler from the float model's seeds and score it."""
    model, quantize_seconds = _quantized_model(row, ctx)
    ctx.models[row.name] = model
    steps = row.num_steps or ctx.settings.num_steps
    sampler = f"{row.sampler}-{steps}"
    labels = _balanced_labels(ctx.settings.num_samples)
    samples = sample_digits(
        model,
        labels,
        scheduler=make_sampler(row.sampler),
        num_steps=steps,
        seed=ctx.settings.seed,
        progress=False,
    )
    save_sample_grid(samples[:100], labels[:100], ctx.out_dir / f"grid_{row.name}.png")
    fd = frechet_distance(classifier_features(ctx.classifier, samples), ctx.real_features)
    fp_samples = ctx.fp_samples.setdefault(sampler, samples)
    fp_fd = ctx.fp_fd.setdefault(sampler, fd)
    inputs = _latency_inputs(model, ctx.settings.latency_batch)
    latency_ms, fp_latency_ms = measure_paired_latency(model, ctx.fp_model, inputs, rounds=3, repeats=2)
    return {
        "name": row.name,
        "weights": source.weights_label,
        "activations": source.activations_label,
        "method": row.method,
        "sampler": sampler,
        "fd": fd,
        "fd_ratio": fd / fp_fd,  # to the float model under the same sampler
        "class_accuracy": class_accuracy(ctx.classifier, samples, labels),
        "psnr_vs_fp": psnr(samples, fp_samples)
        if fp_samples is not samples
        else None,  # FP vs itself: undefined
        "bits_per_weight": weight_bits_per_parameter(model),
        "size_bytes": model_size_bytes(model),
        "step_latency_ms": latency_ms,
        "latency_vs_fp": latency_ms / fp_latency_ms,
        "calibration_seconds": quantize_seconds,
        "transfer_of": row.transfer_of,
        "finetune": source.finetune,
        "grid": f"grid_{row.name}.png",
    }


def run_demo(
    out_dir: str | Path,
    *,
    quick: bool = False,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    rows: tuple[DemoRow, ...] = DEMO_ROWS,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the digits benchmark and write ``results.json``, ``report.md`` and pictures to ``out_dir``.

    Raises:
        ValueError: if ``out_dir`` is an existing file, the first row is not the float model, a
            transfer row names no earlier row, or a sampler has no float row to compare with.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is an existing file; give a directory (it is created if missing).")
    _check_rows(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = DemoSettings.for_mode(quick, seed)
    started = time.perf_counter()
    fp_model = load_or_train_fp_model(cache_dir, seed=seed, progress=progress).eval()
    classifier = load_or_train_classifier(cache_dir, seed=seed).eval()
    data = load_digits_dataset(fp_model.config.sample_size)
    ctx = _RowContext(
        fp_model, classifier, classifier_features(classifier, data.images), settings, out_dir, {}, {}, {}
    )
    results: dict[str, Any] = {
        "benchmark": "digits",
        "quick": quick,
        "num_samples": settings.num_samples,
        "sampler": f"ddim-{settings.num_steps}",
        "noise_floor_fd": noise_floor_fd(classifier, data, seed=seed),
        "image_size": int(fp_model.config.sample_size),
        "latency_batch": 2 * settings.latency_batch,
        "calibration": {"samples": settings.calibration_samples, "steps": settings.calibration_steps},
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "rows": [],
    }
    by_name = {row.name: row for row in rows}
    for row in tqdm(rows, desc="demo rows", disable=not progress):
        source = by_name[row.transfer_of] if row.transfer_of else row
        results["rows"].append(evaluate_row(row, source, ctx))
    results["total_seconds"] = time.perf_counter() - started
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2))
    write_report(results, out_dir)
    return results


def _check_rows(rows: tuple[DemoRow, ...]) -> None:
    if not rows or rows[0].config is not None or rows[0].transfer_of is not None:
        raise ValueError(
            "the first demo row must be the float model (config=None): FD ratios are relative to it."
        )
    seen, fp_samplers = set(), set()
    for row in rows:
        if row.transfer_of is not None and row.transfer_of not in seen:
            raise ValueError(f"row {row.name} transfers {row.transfer_of!r}, which is not an earlier row.")
        key = (row.sampler, row.num_steps)
        if row.config is None and row.transfer_of is None:
            fp_samplers.add(key)
        elif key not in fp_samplers:
            raise ValueError(f"row {row.name} uses sampler {key}, but no earlier float row does: add one.")
        seen.add(row.name)
