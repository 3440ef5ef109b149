"""Copy a demo run's table and pictures, and the PTQ layer-error results, into the README.

Usage: python benchmarks/update_readme.py [out/demo] [out/bench] [out/efficientdm]

Replaces the text between ``<!-- demo-table:start -->`` / ``<!-- demo-table:end -->`` with the table
of ``out/demo/results.json`` (copying the FD-vs-bits plot and sample grids to docs/assets/), between
``<!-- demo-reading:start -->`` / ``<!-- demo-reading:end -->`` with the reading notes written from its
intervals (:mod:`diffquant.bench.reading`), and between ``<!-- layer-error:start -->`` /
``<!-- layer-error:end -->`` with the summary of ``out/bench/ptq_layer_error.json``; likewise the
fine-tuning memory, personalization and EfficientDM walkthrough tables from
``out/bench/finetune_memory.json``, ``out/bench/personalization.json`` and
``out/efficientdm/efficientdm_results.json`` when those exist.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

from diffquant.bench.efficientdm_walkthrough import markdown_report
from diffquant.bench.reading import reading_text
from diffquant.bench.report import markdown_table
from diffquant.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"
READING_START, READING_END = "<!-- demo-reading:start -->", "<!-- demo-reading:end -->"
LAYER_START, LAYER_END = "<!-- layer-error:start -->", "<!-- layer-error:end -->"
MiB = 2**20


def _replace(text: str, start: str, end: str, block: str) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"README.md lacks the {start} / {end} markers.")
    return re.sub(
        re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{block}\n{end}", text, flags=re.S
    )


def layer_error_block(path: Path) -> str:
    """Markdown summary of ``ptq_layer_error.json``."""
    results = json.loads(path.read_text())
    lines = [
        f"Median over the digits UNet's quantized layers of ‖WX − QX̃‖/‖WX‖ on held-out trajectories "
        f"(per-channel asymmetric weights, {results['calibration_calls']} merged calibration replays, "
        f"sequential mode `{results['sequential']}`{', quick run' if results['quick'] else ''}):",
        "",
        "| bits | RTN | GPTQ | Qronos | GPTQ / RTN (median ratio) | Qronos / GPTQ (median ratio) "
        "| calibration s (GPTQ, Qronos) |",
        "|---|---|---|---|---|---|---|",
    ]
    for bits, r in results["bits"].items():
        e, q, sec = r["median_error"], r["median_ratio"], r["calibration_seconds"]
        lines.append(
            f"| {bits.upper()} | {e['rtn']:.4f} | {e['gptq']:.4f} | {e['qronos']:.4f} | {q['gptq_over_rtn']:.3f} "
            f"| {q['qronos_over_gptq']:.3f} | {sec['gptq']:.0f}, {sec['qronos']:.0f} |"
        )
    return "\n".join(lines)


def finetune_memory_block(path: Path) -> str:
    """Markdown table of ``finetune_memory.json``."""
    results = json.loads(path.read_text())
    lines = [
        f"One training step (forward, backward, optimizer; peak over {results['steps']} steps, "
        f"{results['device'].upper()}, peak RSS above the level before training plus the stored weights). "
        "`digits`: the benchmark UNet (1.0M parameters, batch 16 of 8×8); `unet-cond`: a "
        "Stable-Diffusion-shaped `UNet2DConditionModel` built from a config (52M parameters, batch 2 of "
        "4×32×32 latents, 77 text tokens). MiB:",
        "",
        "| model | method | weights | trainable | optimizer state | activations & temporaries "
        "| peak | peak / FP full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['weights_bytes'] / MiB:.1f} | {r['trainable_bytes'] / MiB:.1f} "
            f"| {r['optimizer_state_bytes'] / MiB:.1f} | {r['activations_bytes'] / MiB:.1f} "
            f"| {r['peak_bytes'] / MiB:.1f} | {r['ratio_to_fp']:.2f} |"
        )
    return "\n".join(lines)


def personalization_block(path: Path) -> str:
    """Markdown table of ``personalization.json``."""
    results = json.loads(path.read_text())
    ref, cfg = results["references"], results["config"]
    lines = [
        f"Subject: {results['subject']}; {cfg['steps']} steps of batch {cfg['batch_size']}, prior "
        f"preservation {'on' if cfg['prior_preservation'] else 'off'}. Subject fidelity = mean cosine "
        "similarity of digit-classifier features of 50 generated subject samples to the 5 images "
        f"(for scale: unseen mirrored 3s score {ref['unseen_subject_images']:.3f}, ordinary 3s "
        f"{ref['ordinary_3s']:.3f}, the model before fine-tuning {ref['fp_model_before_finetuning']:.3f}); "
        "prompt fidelity = class accuracy of 200 samples of the ten digits afterwards. Peak memory is "
        "the RSS growth during training of this 1M-parameter model (see the table above for a large UNet).",
        "",
        "| method | subject fidelity ↑ | vs FP full | prompt fidelity ↑ | trainable params | train time (s) "
        "| peak memory (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['method']} | {r['subject_fidelity']:.3f} | {r['subject_vs_fp_full']:.3f} "
            f"| {r['prompt_fidelity']:.3f} | {r['trainable_params']:,} | {r['train_seconds']:.0f} "
            f"| {r['peak_bytes'] / MiB:.1f} |"
        )
    return "\n".join(lines) + "\n\n![personalization samples](docs/assets/personalization.png)"


def efficientdm_block(path: Path) -> str:
    """The walkthrough table of ``efficientdm_results.json``, its sample grids copied to docs/assets."""
    results = json.loads(path.read_text())
    grids = ROOT / "docs" / "assets" / "efficientdm"
    grids.mkdir(parents=True, exist_ok=True)
    for step in results["steps"]:
        shutil.copy(path.parent / step["grid"], grids / step["grid"])
    return markdown_report(results, title=False, grid_dir="docs/assets/efficientdm/")


def _optional_block(text: str, name: str, path: Path, render) -> str:
    if not path.is_file():
        return text
    shutil.copy(path, ROOT / "docs" / "assets" / path.name)
    return _replace(text, f"<!-- {name}:start -->", f"<!-- {name}:end -->", render(path))


def main(
    run_dir: str = "out/demo", bench_dir: str = "out/bench", efficientdm_dir: str = "out/efficientdm"
) -> None:
    run = Path(run_dir)
    results = json.loads((run / "results.json").read_text())
    if results["quick"]:
        raise SystemExit("refusing to put a --quick run in the README; run `make demo` for the full table.")
    assets = ROOT / "docs" / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "fd_vs_bits.png", assets / "fd_vs_bits.png")
    for row in results["rows"]:
        shutil.copy(run / row["grid"], assets / row["grid"])
    shutil.copy(run / "results.json", assets / "demo_results.json")
    grids = " ".join(f"[{row['name']}](docs/assets/{row['grid']})" for row in results["rows"])
    machine = results["machine"]
    block = f"""Full run: {results["num_samples"]} samples per row, {results["sampler"]} with classifier-free guidance,
{results["image_size"]}×{results["image_size"]} digits;
noise floor FD (real vs real) **{results["noise_floor_fd"]:.2f}**;
brackets: 95% paired-bootstrap intervals ({results["confidence"]["resamples"]} resamples);
step latency = one denoiser call on a CFG batch of {results["latency_batch"]} images,
{machine["threads"]} CPU thread(s); whole run {results["total_seconds"] / 60:.1f} min on {machine["cores"]} cores
({machine["isa"]}, {results["workers"]} row workers, torch {machine["torch"]}). Raw numbers, with the time of
every stage: [docs/assets/demo_results.json](docs/assets/demo_results.json).

{markdown_table(results)}

Sample grids: {grids}"""
    readme = ROOT / "README.md"
    text = _replace(readme.read_text(), START, END, block)
    text = _replace(text, READING_START, READING_END, reading_text(results))
    layer_json = Path(bench_dir) / "ptq_layer_error.json"
    if layer_json.is_file():
        text = _replace(text, LAYER_START, LAYER_END, layer_error_block(layer_json))
        shutil.copy(layer_json, assets / "ptq_layer_error.json")
    bench = Path(bench_dir)
    text = _optional_block(text, "finetune-memory", bench / "finetune_memory.json", finetune_memory_block)
    text = _optional_block(text, "personalization", bench / "personalization.json", personalization_block)
    if (bench / "personalization.png").is_file():
        shutil.copy(bench / "personalization.png", assets / "personalization.png")
    edm = Path(efficientdm_dir) / "efficientdm_results.json"
    text = _optional_block(text, "efficientdm", edm, efficientdm_block)
    atomic_write_text(readme, text)
    print(f"README table updated from {run / 'results.json'}")


if __name__ == "__main__":
    main(*sys.argv[1:])
