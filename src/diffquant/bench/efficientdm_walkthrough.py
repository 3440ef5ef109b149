"""The EfficientDM walkthrough (seed 001) on the digits benchmark, one measured step at a time.

The seed's educational sequence, each step adding one idea to the previous one and scored with the
demo's metrics (FD of digit-classifier features to real digits, FD ratio to the float model, class
accuracy, PSNR against the float model's samples from the same seeds, stored bits per weight):

1. ``fp32``: the float baseline.
2. ``ptq``: post-training quantization, RTN weights and per-timestep activation tables, first and
   last layers at W8A8 — the start of every fine-tune below.
3. ``qalora``: QALoRA fine-tuning with the ordinary denoising loss on the digits.
4. ``scale_aware``: + per-layer LoRA learning rates proportional to the weight step.
5. ``talsq``: + trainable per-timestep activation step sizes.
6. ``distill``: + data-free distillation from the float model instead of the data (full EfficientDM).
7. the comparison: ``efficientdm_results.json`` and the Markdown table ``efficientdm.md``.

State lives in the output folder (results JSON, the float samples, the PTQ checkpoint), so the steps
can run in one call (:func:`run_walkthrough`) or one process each (``examples/efficientdm/``,
through :func:`step_main`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from diffquant.api import weight_bits_per_parameter
from diffquant.bench.demo import DemoSettings, calibration_fn
from diffquant.bench.digits.cache import fp_scheduler, load_or_train_classifier, load_or_train_fp_model
from diffquant.bench.digits.data import NUM_DIGITS, load_digits_dataset, train_test_split
from diffquant.bench.digits.model import NULL_CLASS
from diffquant.bench.digits.sampling import DEFAULT_GUIDANCE, sample_digits, save_sample_grid
from diffquant.bench.recipes import DIGITS, UNCONDITIONAL
from diffquant.efficientdm.recipe import EfficientDMConfig, finetune_ptq_model, ptq_start
from diffquant.eval.frechet import classifier_features, frechet_distance, noise_floor_fd
from diffquant.eval.metrics import class_accuracy, psnr
from diffquant.finetune import class_conditioning, model_output
from diffquant.io import atomic_write_bytes, atomic_write_text, load_quantized, save_quantized

RESULTS_NAME = "efficientdm_results.json"
REPORT_NAME = "efficientdm.md"
_FP_SAMPLES = "fp_samples.safetensors"
_PTQ_CHECKPOINT = "checkpoints/ptq"
_EPS_TRAJECTORIES, _EPS_STEPS, _EPS_SEED_OFFSET = 32, 25, 1000


@dataclass(frozen=True)
class Step:
    """One step of the walkthrough: ``switches`` are the :class:`EfficientDMConfig` fields of a
    fine-tuning step (``None`` for the float and PTQ steps)."""

    name: str
    title: str
    switches: dict[str, bool] | None = None


_DATA = {"distill": False}
STEPS: tuple[Step, ...] = (
    Step("fp32", "float baseline"),
    Step("ptq", "PTQ: RTN weights, per-step activation tables, first/last layers W8A8"),
    Step("qalora", "QALoRA, denoising loss on the digits", {"scale_aware": False, "talsq": False, **_DATA}),
    Step("scale_aware", "+ scale-aware LoRA learning rates", {"scale_aware": True, "talsq": False, **_DATA}),
    Step(
        "talsq",
        "+ TALSQ (trainable per-timestep activation steps)",
        {"scale_aware": True, "talsq": True, **_DATA},
    ),
    Step(
        "distill",
        "+ data-free distillation (EfficientDM)",
        {"scale_aware": True, "talsq": True, "distill": True},
    ),
)
STEP_NAMES = tuple(step.name for step in STEPS)


@dataclass(frozen=True)
class WalkthroughSettings:
    """Sizes of a walkthrough run.

    Attributes:
        quick: the short run (fewer samples and iterations).
        weight_bits, act_bits: precision of the quantized layers (first/last: W8A8).
        num_samples: generated samples per step (balanced over the digits); num_steps: DDIM steps.
        calibration_samples, calibration_steps: float trajectories calibrating the PTQ start.
        iterations: optimizer steps of each fine-tune.
        seed: seed of the float model, the classifier, sampling and fine-tuning.
    """

    quick: bool = False
    weight_bits: int = 4
    act_bits: int = 4
    num_samples: int = 500
    num_steps: int = 50
    calibration_samples: int = 32
    calibration_steps: int = 25
    iterations: int = 300
    seed: int = 0

    @classmethod
    def for_mode(
        cls, quick: bool, *, weight_bits: int = 4, act_bits: int = 4, seed: int = 0
    ) -> WalkthroughSettings:
        """The default full or quick settings."""
        sizes = (
            {"num_samples": 200, "calibration_samples": 16, "calibration_steps": 10, "iterations": 100}
            if quick
            else {}
        )
        return cls(quick=quick, weight_bits=weight_bits, act_bits=act_bits, seed=seed, **sizes)

    def demo_settings(self) -> DemoSettings:
        """The demo's settings with these sizes (for :func:`diffquant.bench.demo.calibration_fn`)."""
        return DemoSettings(
            quick=self.quick,
            num_samples=self.num_samples,
            num_steps=self.num_steps,
            calibration_samples=self.calibration_samples,
            calibration_steps=self.calibration_steps,
            seed=self.seed,
        )

    def config(self, switches: dict[str, bool] | None = None) -> EfficientDMConfig:
        """The fine-tune settings of a step."""
        return EfficientDMConfig(
            bits=self.weight_bits,
            act_bits=self.act_bits,
            calibration_steps=self.calibration_steps,
            iterations=self.iterations,
            seed=self.seed,
            **(switches or {}),
        )


class Walkthrough:
    """The walkthrough's shared state, persisted in ``out_dir`` between steps.

    Args:
        out_dir: output folder (created); holds the results, grids and checkpoints.
        settings: run sizes; must match the settings an existing ``out_dir`` was made with.
        cache_dir: cache of the float model and the classifier.
        progress: progress bars.

    Raises:
        ValueError: if ``out_dir`` is a file, or holds results made with other settings.
    """

    def __init__(
        self,
        out_dir: str | Path,
        settings: WalkthroughSettings,
        *,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(
                f"{self.out_dir} is an existing file; give a directory (it is created if missing)."
            )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.progress = progress
        self.scheduler = fp_scheduler()
        self.fp_model = load_or_train_fp_model(cache_dir, seed=settings.seed, progress=progress).eval()
        self.classifier = load_or_train_classifier(cache_dir, seed=settings.seed).eval()
        self.data = load_digits_dataset(self.fp_model.config.sample_size)
        self.real_features = classifier_features(self.classifier, self.data.images)
        self.labels = torch.arange(settings.num_samples) % NUM_DIGITS  # every digit equally
        self.results = self._load_results()

    # --- persisted state ---------------------------------------------------------------------------

    def _load_results(self) -> dict[str, Any]:
        path = self.out_dir / RESULTS_NAME
        wanted = dataclasses.asdict(self.settings)
        if path.is_file():
            results = json.loads(path.read_text())
            if results.get("settings") != wanted:
                raise ValueError(
                    f"{path} was made with other settings ({results.get('settings')}); run every step with the "
                    "same --quick / --weight-bits / --act-bits / --seed, or use a fresh --out folder."
                )
            return results
        return {
            "benchmark": "digits",
            "method": "EfficientDM (He et al., ICLR 2024)",
            "label": f"W{self.settings.weight_bits}A{self.settings.act_bits}",
            "settings": wanted,
            "sampler": f"ddim-{self.settings.num_steps}",
            "noise_floor_fd": noise_floor_fd(self.classifier, self.data, seed=self.settings.seed),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "steps": [],
        }

    def _record(self, entry: dict[str, Any]) -> dict[str, Any]:
        steps = {s["name"]: s for s in self.results["steps"]}
        steps[entry["name"]] = entry
        self.results["steps"] = [steps[name] for name in STEP_NAMES if name in steps]
        atomic_write_text(self.out_dir / RESULTS_NAME, json.dumps(self.results, indent=2))
        return entry

    def step_result(self, name: str) -> dict[str, Any] | None:
        """The recorded result of step ``name``, or None."""
        return next((s for s in self.results["steps"] if s["name"] == name), None)

    def _fp_samples(self) -> torch.Tensor:
        path = self.out_dir / _FP_SAMPLES
        if path.is_file() and self.step_result("fp32") is not None:
            return load_file(path)["samples"]
        self.run_fp()
        return load_file(path)["samples"]

    def ptq_model(self) -> nn.Module:
        """The PTQ start, loaded from the step-2 checkpoint (made first if missing)."""
        path = self.out_dir / _PTQ_CHECKPOINT
        if not path.is_dir() or self.step_result("ptq") is None:
            self.run_ptq()
        return load_quantized(path, schedule=self.scheduler)

    # --- steps -------------------------------------------------------------------------------------

    def _sample(self, model: nn.Module) -> torch.Tensor:
        s = self.settings
        return sample_digits(model, self.labels, num_steps=s.num_steps, seed=s.seed, progress=False)

    @torch.no_grad()
    def _eps_error(self, model: nn.Module) -> float:
        """Mean squared difference of the model's and the float model's ε along float DDIM-25
        trajectories (32 samples, guided, seeds unseen in training): the output error that data-free
        distillation minimises, far less noisy than FD."""
        sampler = DDIMScheduler.from_config(self.scheduler.config)
        sampler.set_timesteps(_EPS_STEPS)
        gen = torch.Generator().manual_seed(self.settings.seed + _EPS_SEED_OFFSET)
        size = self.fp_model.config.sample_size
        x = torch.randn((_EPS_TRAJECTORIES, 1, size, size), generator=gen)
        digits = torch.arange(_EPS_TRAJECTORIES) % NUM_DIGITS
        cond = class_conditioning(torch.cat([digits, torch.full_like(digits, NULL_CLASS)]))  # (2N,): [c, u]
        total = 0.0
        for t in sampler.timesteps:
            x_in, t_in = torch.cat([x, x]), t.reshape(1).repeat(2 * _EPS_TRAJECTORIES)  # (2N,) timesteps
            eps = model_output(self.fp_model, x_in, t_in, cond)
            total += torch.mean((model_output(model, x_in, t_in, cond) - eps) ** 2).item()
            eps_c, eps_u = eps.chunk(2)
            x = sampler.step(eps_u + DEFAULT_GUIDANCE * (eps_c - eps_u), t, x, return_dict=False)[0]
        return total / len(sampler.timesteps)

    def _evaluate(self, step: Step, model: nn.Module, samples: torch.Tensor, **extra: Any) -> dict[str, Any]:
        index = STEP_NAMES.index(step.name)
        grid = f"grid_{index + 1}_{step.name}.png"
        save_sample_grid(samples[:100], self.labels[:100], self.out_dir / grid)
        fd = frechet_distance(classifier_features(self.classifier, samples), self.real_features)
        fp = self.step_result("fp32")
        is_fp = step.name == "fp32"
        return self._record(
            {
                "step": index + 1,
                "name": step.name,
                "title": step.title,
                "weights": "fp32" if is_fp else f"int{self.settings.weight_bits}",
                "activations": "fp32" if is_fp else f"int{self.settings.act_bits}",
                "fd": fd,
                "fd_ratio": 1.0 if is_fp else fd / fp["fd"],
                "class_accuracy": class_accuracy(self.classifier, samples, self.labels),
                "psnr_vs_fp": None if is_fp else psnr(samples, self._fp_samples()),
                "eps_mse_vs_fp": 0.0 if is_fp else self._eps_error(model),
                "bits_per_weight": weight_bits_per_parameter(model),
                "grid": grid,
                **extra,
            }
        )

    def run_fp(self) -> dict[str, Any]:
        """Step 1: sample and score the float model."""
        samples = self._sample(self.fp_model)
        atomic_write_bytes(self.out_dir / _FP_SAMPLES, safetensors_bytes({"samples": samples.contiguous()}))
        return self._evaluate(STEPS[0], self.fp_model, samples, seconds=0.0)

    def run_ptq(self) -> dict[str, Any]:
        """Step 2: the PTQ start (saved as a checkpoint for the fine-tuning steps), scored."""
        self._fp_samples()  # the float reference first
        start = time.perf_counter()
        calibrate = calibration_fn(self.settings.demo_settings())
        model = ptq_start(
            self.fp_model, self.settings.config(), calibrate=calibrate, scheduler=self.scheduler
        )
        seconds = time.perf_counter() - start
        save_quantized(model, self.out_dir / _PTQ_CHECKPOINT)
        return self._evaluate(STEPS[1], model, self._sample(model), seconds=seconds)

    def run_finetune(self, name: str) -> dict[str, Any]:
        """Steps 3-6: fine-tune the PTQ start with the step's switches, merge, score, save."""
        step = STEPS[STEP_NAMES.index(name)] if name in STEP_NAMES else None
        if step is None or step.switches is None:
            fine_tunes = [s.name for s in STEPS if s.switches is not None]
            raise ValueError(f"unknown fine-tuning step {name!r}; choose one of {fine_tunes}.")
        self._fp_samples()
        model = self.ptq_model()
        config = self.settings.config(step.switches)
        train, _ = train_test_split(load_digits_dataset(self.fp_model.config.sample_size))
        report = finetune_ptq_model(
            model,
            self.fp_model,
            config,
            scheduler=self.scheduler,
            conditioning=DIGITS,
            unconditional=UNCONDITIONAL,
            train_data=(train.images, class_conditioning(train.labels)),
            progress=self.progress,
        )
        save_quantized(model, self.out_dir / "checkpoints" / name)
        window = config.num_sampling_steps if config.distill else max(1, len(report.losses) // 10)
        return self._evaluate(
            step,
            model,
            self._sample(model),
            seconds=report.finetune_seconds,
            iterations=config.iterations,
            loss_start=sum(report.losses[:window]) / window,  # distillation: one whole trajectory each
            loss_end=sum(report.losses[-window:]) / window,
            trainable_parameters=report.trainable_parameters,
            config=dataclasses.asdict(config),
        )

    def run(self, name: str) -> dict[str, Any]:
        """Run step ``name`` (one of :data:`STEP_NAMES`)."""
        if name == "fp32":
            return self.run_fp()
        if name == "ptq":
            return self.run_ptq()
        return self.run_finetune(name)

    def write_report(self) -> dict[str, Any]:
        """Step 7: the comparison table ``efficientdm.md`` from the recorded steps; returns the results."""
        atomic_write_text(self.out_dir / REPORT_NAME, markdown_report(self.results))
        return self.results


COLUMNS = (
    ("step", "step", "{}"),
    ("name", "name", "{}"),
    ("title", "what", "{}"),
    ("weights", "W", "{}"),
    ("activations", "A", "{}"),
    ("fd", "FD ↓", "{:.2f}"),
    ("fd_ratio", "FD / FP", "{:.3f}"),
    ("class_accuracy", "class acc ↑", "{:.3f}"),
    ("psnr_vs_fp", "PSNR vs FP (dB) ↑", "{:.1f}"),
    ("eps_mse_vs_fp", "ε MSE vs FP ↓", "{:.4f}"),
    ("bits_per_weight", "bits/weight", "{:.2f}"),
    ("seconds", "time (s)", "{:.1f}"),
    ("loss_start", "loss start", "{:.4f}"),
    ("loss_end", "loss end", "{:.4f}"),
)


def markdown_report(results: dict[str, Any], *, title: bool = True, grid_dir: str = "") -> str:
    """The walkthrough's results as Markdown: a table, one line per step, and the sample grids.

    Args:
        title: start with a ``#`` heading (off when embedded in another document).
        grid_dir: prefix of the sample-grid links (e.g. ``"docs/assets/efficientdm/"``).
    """
    s = results["settings"]
    lines = [f"# EfficientDM walkthrough ({results['label']}, digits)", ""] if title else []
    lines += [
        f"{results['method']}: {s['num_samples']} samples per step, {results['sampler']} with classifier-free "
        f"guidance, {s['iterations']} fine-tuning iterations per step{' (quick run)' if s['quick'] else ''}. "
        f"FD noise floor (two halves of the real digits): {results['noise_floor_fd']:.2f}. First and last layers "
        "at W8A8; fine-tunes start from the PTQ model (step 2); time is calibration (PTQ) or training. "
        "ε MSE vs FP: the noise-prediction error against the float model along its own sampling "
        "trajectories. Losses are each step's training objective (denoising loss on data, or the "
        "distillation loss over one whole trajectory), comparable within a step only.",
        "",
        "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in results["steps"]:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "—" for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Sample grids: " + " ".join(f"[{row['name']}]({grid_dir}{row['grid']})" for row in results["steps"]),
        "",
    ]
    return "\n".join(lines)


def run_walkthrough(
    out_dir: str | Path,
    *,
    quick: bool = False,
    weight_bits: int = 4,
    act_bits: int = 4,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the whole walkthrough and write ``efficientdm_results.json``, ``efficientdm.md`` and one
    sample grid per step to ``out_dir``.

    Args:
        out_dir: output folder (created if missing).
        quick: the short run (≈ 3 min on 2 CPU cores; the full run ≈ 10 min).
        weight_bits, act_bits: precision of the quantized layers.
        seed: seed of the float model, classifier, sampling and fine-tuning.
        cache_dir: cache of the float model and classifier (trained there if missing).
        progress: progress bars.

    Returns:
        The results (as written to ``efficientdm_results.json``).

    Raises:
        ValueError: if ``out_dir`` is a file or holds a run with other settings.
    """
    started = time.perf_counter()
    settings = WalkthroughSettings.for_mode(quick, weight_bits=weight_bits, act_bits=act_bits, seed=seed)
    walk = Walkthrough(out_dir, settings, cache_dir=cache_dir, progress=progress)
    for name in STEP_NAMES:
        walk.run(name)
    walk.results["total_seconds"] = time.perf_counter() - started
    return walk.write_report()


def step_main(step: str, argv: list[str] | None = None) -> dict[str, Any]:
    """Command line of one example script (``examples/efficientdm/stepN_*.py``).

    ``step`` is a name of :data:`STEP_NAMES`, or ``"report"`` for step 7. Steps share state through
    ``--out``; a step whose inputs are missing runs the earlier steps it needs.
    """
    parser = argparse.ArgumentParser(description=f"EfficientDM walkthrough on digits: step {step!r}.")
    parser.add_argument("--out", default="efficientdm-walkthrough", help="folder shared by all steps")
    parser.add_argument("--quick", action="store_true", help="fewer samples and iterations")
    parser.add_argument("--weight-bits", type=int, default=4, help="weight bits of the quantized layers")
    parser.add_argument("--act-bits", type=int, default=4, help="activation bits of the quantized layers")
    parser.add_argument("--seed", type=int, default=0, help="seed of models, sampling and fine-tuning")
    parser.add_argument("--cache-dir", default=None, help="cache of the float model and classifier")
    args = parser.parse_args(argv)
    settings = WalkthroughSettings.for_mode(
        args.quick, weight_bits=args.weight_bits, act_bits=args.act_bits, seed=args.seed
    )
    walk = Walkthrough(args.out, settings, cache_dir=args.cache_dir)
    if step != "report":
        walk.run(step)
    results = walk.write_report()
    print(markdown_report(results))
    return results
