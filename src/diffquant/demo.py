"""``diffquant demo``: every method on the embedded digits benchmark, one table.

For each row of :data:`diffquant.demo_rows.DEMO_ROWS` the float digits UNet is copied, quantized,
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from diffquant.api import quantize_, weight_bits_per_parameter
from diffquant.demo_rows import DEMO_ROWS, DemoRow
from diffquant.eval.frechet import frechet_distance, noise_floor_fd
from diffquant.eval.metrics import class_accuracy, psnr
from diffquant.eval.perf import measure_step_latency, model_size_bytes
from diffquant.io import atomic_write_text
from diffquant.report import write_report
from diffquant.toy.cache import fp_scheduler, load_or_train_classifier, load_or_train_fp_model
from diffquant.toy.data import NUM_DIGITS, load_digits_dataset
from diffquant.toy.model import NULL_CLASS
from diffquant.toy.sampling import sample_digits, save_sample_grid


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run.

    Attributes:
        quick: the short run (fewer samples), same rows.
        num_samples: generated samples per row (balanced over the 10 digits).
        num_steps: DDIM steps.
        calibration_samples: samples whose float trajectories calibrate static activation ranges.
        latency_batch: images per denoising step when timing (the model sees twice as many with CFG).
        seed: seed of the float model, the classifier and the sampling noise.
    """

    quick: bool = False
    num_samples: int = 1000
    num_steps: int = 50
    calibration_samples: int = 64
    latency_batch: int = 64
    seed: int = 0

    @classmethod
    def for_mode(cls, quick: bool, seed: int = 0) -> DemoSettings:
        """The default full or quick settings."""
        return (
            cls(quick=True, num_samples=300, calibration_samples=32, seed=seed) if quick else cls(seed=seed)
        )


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


def evaluate_row(
    row: DemoRow,
    fp_model: nn.Module,
    classifier: nn.Module,
    real_features: torch.Tensor,
    fp_samples: torch.Tensor | None,
    settings: DemoSettings,
    out_dir: Path,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Quantize a copy of the float model as ``row`` says, sample it and score it."""
    model = copy.deepcopy(fp_model)
    start = time.perf_counter()
    if row.config is not None:
        calibrate = calibration_fn(settings) if row.calibrated else None
        quantize_(model, row.config, calibrate=calibrate, schedule=fp_scheduler())
    quantize_seconds = time.perf_counter() - start
    labels = _balanced_labels(settings.num_samples)
    samples = sample_digits(model, labels, num_steps=settings.num_steps, seed=settings.seed, progress=False)
    save_sample_grid(samples[:100], labels[:100], out_dir / f"grid_{row.name}.png")
    with torch.inference_mode():
        features = classifier.features(samples)
    result = {
        "name": row.name,
        "weights": row.weights_label,
        "activations": row.activations_label,
        "method": row.method,
        "fd": frechet_distance(features, real_features),
        "class_accuracy": class_accuracy(classifier, samples, labels),
        "psnr_vs_fp": psnr(samples, fp_samples)
        if fp_samples is not None
        else None,  # FP vs itself: undefined
        "bits_per_weight": weight_bits_per_parameter(model),
        "size_bytes": model_size_bytes(model),
        "step_latency_ms": measure_step_latency(model, _latency_inputs(model, settings.latency_batch)),
        "quantize_seconds": quantize_seconds,
        "grid": f"grid_{row.name}.png",
    }
    return result, samples


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
        ValueError: if ``out_dir`` is an existing file, or ``rows`` does not start with the float row.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is an existing file; give a directory (it is created if missing).")
    if not rows or rows[0].config is not None:
        raise ValueError(
            "the first demo row must be the float model (config=None): FD ratios are relative to it."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = DemoSettings.for_mode(quick, seed)
    started = time.perf_counter()
    fp_model = load_or_train_fp_model(cache_dir, seed=seed, progress=progress).eval()
    classifier = load_or_train_classifier(cache_dir, seed=seed).eval()
    data = load_digits_dataset(fp_model.config.sample_size)
    with torch.inference_mode():
        real_features = classifier.features(data.images)
    results: dict[str, Any] = {
        "benchmark": "digits",
        "quick": quick,
        "num_samples": settings.num_samples,
        "sampler": f"ddim-{settings.num_steps}",
        "noise_floor_fd": noise_floor_fd(classifier, data, seed=seed),
        "image_size": int(fp_model.config.sample_size),
        "latency_batch": 2 * settings.latency_batch,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "rows": [],
    }
    fp_samples = None
    for row in tqdm(rows, desc="demo rows", disable=not progress):
        result, samples = evaluate_row(
            row, fp_model, classifier, real_features, fp_samples, settings, out_dir
        )
        if fp_samples is None:
            fp_samples = samples
        result["fd_ratio"] = result["fd"] / results["rows"][0]["fd"] if results["rows"] else 1.0
        results["rows"].append(result)
    results["total_seconds"] = time.perf_counter() - started
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2))
    write_report(results, out_dir)
    return results
