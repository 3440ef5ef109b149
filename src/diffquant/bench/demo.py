"""``diffquant demo``: every method on the embedded digits benchmark, one table.

For each row of :data:`diffquant.bench.rows.DEMO_ROWS` the float digits UNet is copied, quantized,
sampled with DDIM and classifier-free guidance from the same seeds as the float model, and scored:
Fréchet distance (FD) of digit-classifier features to real digits, FD ratio to the float model,
class accuracy of the samples, PSNR against the float model's samples, stored bits per weight,
model size and CPU latency of one denoising step. Quality figures carry 95 % paired-bootstrap
intervals (:mod:`diffquant.bench.scoring`); ``results.json`` records the machine and the wall time
of every stage. Rows run in parallel worker processes (:mod:`diffquant.bench.row_runner`).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diffquant.bench.digits.cache import load_or_train_classifier, load_or_train_fp_model
from diffquant.bench.digits.data import load_digits_dataset
from diffquant.bench.digits.sampling import save_sample_grid
from diffquant.bench.report import write_report
from diffquant.bench.row_runner import RowRun, RowRunner, balanced_labels, init_worker, run_group_in_worker
from diffquant.bench.rows import DEMO_ROWS, DemoRow
from diffquant.bench.scoring import CI_LEVEL, RowScorer
from diffquant.bench.settings import DemoSettings, calibration_fn
from diffquant.bench.timing import StageTimer, machine_info
from diffquant.eval.frechet import classifier_features, noise_floor_fd
from diffquant.io import atomic_write_text

__all__ = ["DemoSettings", "calibration_fn", "default_workers", "run_demo"]


def default_workers() -> int:
    """Worker processes for the rows: the usable CPU cores (at most 4; 1 where there is one core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


def row_groups(rows: tuple[DemoRow, ...]) -> list[tuple[DemoRow, ...]]:
    """Each row that builds a model, followed by the transfer rows that re-use it."""
    groups: dict[str, list[DemoRow]] = {}
    for row in rows:
        groups.setdefault(row.transfer_of or row.name, []).append(row)
    return [tuple(group) for group in groups.values()]


def _run_rows(
    rows: tuple[DemoRow, ...], settings: DemoSettings, cache_dir: Any, workers: int, progress: bool
) -> dict[str, RowRun]:
    """Every row's :class:`RowRun`, by name; a progress bar over rows with ETA."""
    groups = row_groups(rows)
    runs: dict[str, RowRun] = {}
    bar = tqdm(total=len(rows), desc="demo rows", disable=not progress)
    if workers == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in the workers: rows are measured alike whatever the worker count
        try:
            runner = RowRunner(
                load_or_train_fp_model(cache_dir, seed=settings.seed, progress=False), settings
            )
            for group in groups:
                for run in runner.run_group(group):
                    runs[run.name] = run
                    bar.update()
        finally:
            torch.set_num_threads(threads)
        bar.close()
        return runs
    # the longest groups first (fine-tunes, then models with transfer rows) shorten the parallel run
    order = sorted(groups, key=lambda g: (g[0].finetune is None, -len(g)))
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    with ProcessPoolExecutor(workers, context, init_worker, (cache_dir, settings, 1)) as pool:
        pending: set[Future] = {pool.submit(run_group_in_worker, group) for group in order}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    for run in future.result():
                        runs[run.name] = run
                        bar.update()
        except BaseException:
            for future in pending:  # a failed row (or Ctrl-C) stops the run instead of finishing the rest
                future.cancel()
            raise
    bar.close()
    return runs


def run_demo(
    out_dir: str | Path,
    *,
    quick: bool = False,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    rows: tuple[DemoRow, ...] = DEMO_ROWS,
    progress: bool = True,
    workers: int | None = None,
    settings: DemoSettings | None = None,
) -> dict[str, Any]:
    """Run the digits benchmark and write ``results.json``, ``report.md`` and pictures to ``out_dir``.

    Args:
        out_dir: output folder (created if missing).
        quick: the short run (:meth:`DemoSettings.for_mode`).
        seed: seed of the float model, classifier, sampling noise and bootstrap.
        cache_dir: cache of trained models (default :func:`~diffquant.bench.digits.default_cache_dir`).
        rows: the table's rows; the first must be the float model.
        progress: show progress bars.
        workers: parallel worker processes for the rows (default :func:`default_workers`; 1 runs
            them in this process). Workers are spawned, so a script calling ``run_demo`` with more
            than one needs the usual ``if __name__ == "__main__":`` guard.
        settings: sizes of the run, overriding ``quick`` and ``seed`` (e.g. a smaller test run).

    Raises:
        ValueError: if ``out_dir`` is an existing file, the first row is not the float model, a
            transfer row names no earlier row, a sampler has no float row to compare with, or
            ``workers`` is below 1.

    Example:
        >>> results = run_demo("out/demo", quick=True)  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is an existing file; give a directory (it is created if missing).")
    _check_rows(rows)
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    settings = settings or DemoSettings.for_mode(quick, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = StageTimer()
    with timer("float_model"):  # trained here if needed, so the workers only load it
        fp_model = load_or_train_fp_model(cache_dir, seed=settings.seed, progress=progress).eval()
    with timer("classifier"):
        classifier = load_or_train_classifier(cache_dir, seed=settings.seed).eval()
        data = load_digits_dataset(fp_model.config.sample_size)
        real_features = classifier_features(classifier, data.images)
        noise_floor = noise_floor_fd(classifier, data, seed=settings.seed)
    with timer("rows"):
        runs = _run_rows(rows, settings, cache_dir, min(workers, len(row_groups(rows))), progress)
    labels = balanced_labels(settings.num_samples)
    with timer("score"):
        scorer = RowScorer(
            classifier, real_features, labels, resamples=settings.bootstrap_resamples, seed=settings.seed
        )
        by_name = {row.name: row for row in rows}
        table = []
        for row in rows:  # in table order: each sampler's float row comes first
            run, source = runs[row.name], by_name[row.transfer_of] if row.transfer_of else row
            save_sample_grid(run.samples[:100], labels[:100], out_dir / f"grid_{row.name}.png")
            table.append(
                {
                    "name": row.name,
                    "weights": source.weights_label,
                    "activations": source.activations_label,
                    "method": row.method,
                    **run.measured,
                    **scorer.score(run.samples, run.measured["sampler"]),
                    "transfer_of": row.transfer_of,
                    "finetune": source.finetune,
                    "grid": f"grid_{row.name}.png",
                }
            )
    stages = dict(timer.seconds)  # wall time; then each row stage summed over rows (and workers)
    for row in table:
        for stage, seconds in row["seconds"].items():
            stages[f"{stage} (sum over rows)"] = stages.get(f"{stage} (sum over rows)", 0.0) + seconds
    results: dict[str, Any] = {
        "benchmark": "digits",
        "quick": settings.quick,
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
        **machine_info(threads=1),  # every row runs single-threaded (see row_runner)
        "workers": min(workers, len(row_groups(rows))),
        "stage_seconds": stages,
        "total_seconds": timer.elapsed(),
        "rows": table,
    }
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
