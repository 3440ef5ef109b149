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
from collections.abc import Callable
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
from diffquant.bench.scoring import CI_LEVEL, RowScorer
from diffquant.bench.timing import StageTimer, machine_info
from diffquant.config import CalibrationConfig
from diffquant.eval.frechet import classifier_features, noise_floor_fd
from diffquant.eval.perf import measure_paired_latency, model_size_bytes
from diffquant.io import atomic_write_text
from diffquant.ptq.calibration import record_denoiser_calls, replay


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
        latency_rounds: alternating rounds of the row's and the float model's timing.
        bootstrap_resamples: resamples of the paired bootstrap behind every interval.
        seed: seed of the float model, the classifier and the sampling noise.
    """

    quick: bool = False
    num_samples: int = 500
    num_steps: int = 50
    calibration_samples: int = 32
    calibration_steps: int = 25
    latency_batch: int = 64
    latency_rounds: int = 3
    bootstrap_resamples: int = 1000
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


def recorded_calibration_fn(fp_model: nn.Module, settings: DemoSettings) -> Callable[[nn.Module], None]:
    """Like :func:`calibration_fn`, but the float trajectories are sampled once, here, from ``fp_model``:
    the returned function replays the recorded denoiser inputs on the model it is given (the float
    model being calibrated, which computes exactly what the sampler would), so the rows of one run
    share one sampling run."""
    calls = record_denoiser_calls(fp_model, calibration_fn(settings), CalibrationConfig(merge_batch=None))

    def calibrate(model: nn.Module) -> None:
        replay(model, calls)

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
    scorer: RowScorer
    calibrate: Callable[[nn.Module], None]
    settings: DemoSettings
    out_dir: Path
    models: dict[str, nn.Module]  # quantized models by row name (for transfer rows)


def _quantized_model(row: DemoRow, ctx: _RowContext) -> nn.Module:
    if row.transfer_of is not None:
        return ctx.models[row.transfer_of]
    if row.finetune is not None:
        budget = FinetuneBudget().scaled(ctx.settings.quick)
        return FINETUNE_RECIPES[row.finetune](ctx.fp_model, row.config, budget, ctx.calibrate)
    model = copy.deepcopy(ctx.fp_model)
    if row.config is not None:
        config = replace(row.config, calibration=CalibrationConfig(num_steps=ctx.settings.calibration_steps))
        quantize_(model, config, calibrate=ctx.calibrate, schedule=fp_scheduler())
    return model


def evaluate_row(row: DemoRow, source: DemoRow, ctx: _RowContext) -> dict[str, Any]:
    """Quantize a copy of the float model as ``source`` says (or re-use the transferred model),
    sample it with ``row``'s sampler from the float model's seeds and score it. The row's
    ``seconds`` holds the wall time of each stage."""
    timer = StageTimer()
    with timer("quantize"):
        model = _quantized_model(row, ctx)
    ctx.models[row.name] = model
    steps = row.num_steps or ctx.settings.num_steps
    sampler = f"{row.sampler}-{steps}"
    labels = ctx.scorer.labels
    with timer("sample"):
        samples = sample_digits(
            model, labels, scheduler=make_sampler(row.sampler), num_steps=steps, seed=ctx.settings.seed,
            progress=False,
        )  # fmt: skip
    with timer("score"):
        scores = ctx.scorer.score(samples, sampler)
        save_sample_grid(samples[:100], labels[:100], ctx.out_dir / f"grid_{row.name}.png")
    with timer("latency"):
        inputs = _latency_inputs(model, ctx.settings.latency_batch)
        latency_ms, fp_latency_ms = measure_paired_latency(
            model, ctx.fp_model, inputs, rounds=ctx.settings.latency_rounds, repeats=2
        )
    return {
        "name": row.name,
        "weights": source.weights_label,
        "activations": source.activations_label,
        "method": row.method,
        "sampler": sampler,
        **scores,
        "bits_per_weight": weight_bits_per_parameter(model),
        "size_bytes": model_size_bytes(model),
        "step_latency_ms": latency_ms,
        "latency_vs_fp": latency_ms / fp_latency_ms,
        "calibration_seconds": timer.seconds["quantize"] if row.transfer_of is None else 0.0,
        "transfer_of": row.transfer_of,
        "finetune": source.finetune,
        "grid": f"grid_{row.name}.png",
        "seconds": timer.seconds,
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
    timer = StageTimer()
    with timer("float_model"):
        fp_model = load_or_train_fp_model(cache_dir, seed=seed, progress=progress).eval()
    with timer("classifier"):
        classifier = load_or_train_classifier(cache_dir, seed=seed).eval()
        data = load_digits_dataset(fp_model.config.sample_size)
        real_features = classifier_features(classifier, data.images)
        noise_floor = noise_floor_fd(classifier, data, seed=seed)
    with timer("calibration_trajectories"):
        calibrate = recorded_calibration_fn(fp_model, settings)
    scorer = RowScorer(
        classifier, real_features, _balanced_labels(settings.num_samples),
        resamples=settings.bootstrap_resamples, seed=seed,
    )  # fmt: skip
    ctx = _RowContext(fp_model, scorer, calibrate, settings, out_dir, {})
    results: dict[str, Any] = {
        "benchmark": "digits",
        "quick": quick,
        "num_samples": settings.num_samples,
        "sampler": f"ddim-{settings.num_steps}",
        "noise_floor_fd": noise_floor,
        "image_size": int(fp_model.config.sample_size),
        "latency_batch": 2 * settings.latency_batch,
        "calibration": {"samples": settings.calibration_samples, "steps": settings.calibration_steps},
        "confidence": {
            "level": CI_LEVEL,
            "method": "paired bootstrap",
            "resamples": settings.bootstrap_resamples,
        },
        **machine_info(),
        "rows": [],
    }
    by_name = {row.name: row for row in rows}
    for row in tqdm(rows, desc="demo rows", disable=not progress):
        source = by_name[row.transfer_of] if row.transfer_of else row
        results["rows"].append(evaluate_row(row, source, ctx))
    stages = dict(timer.seconds)
    for row in results["rows"]:
        for stage, seconds in row["seconds"].items():
            stages[f"rows_{stage}"] = stages.get(f"rows_{stage}", 0.0) + seconds
    results["stage_seconds"] = stages
    results["total_seconds"] = timer.elapsed()
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
