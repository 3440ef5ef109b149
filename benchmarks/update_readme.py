"""Copy a demo run's table and pictures, and the PTQ layer-error results, into the README.

Usage: python benchmarks/update_readme.py [out/demo] [out/bench]

Replaces the text between ``<!-- demo-table:start -->`` / ``<!-- demo-table:end -->`` with the table
of ``out/demo/results.json`` (copying the FD-vs-bits plot and sample grids to docs/assets/), and
between ``<!-- layer-error:start -->`` / ``<!-- layer-error:end -->`` with the summary of
``out/bench/ptq_layer_error.json``.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

from diffquant.io import atomic_write_text
from diffquant.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"
LAYER_START, LAYER_END = "<!-- layer-error:start -->", "<!-- layer-error:end -->"


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


def main(run_dir: str = "out/demo", bench_dir: str = "out/bench") -> None:
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
    block = f"""Full run: {results["num_samples"]} samples per row, {results["sampler"]} with classifier-free guidance,
{results["image_size"]}×{results["image_size"]} digits;
noise floor FD (real vs real) **{results["noise_floor_fd"]:.2f}**;
step latency = one denoiser call on a CFG batch of {results["latency_batch"]} images, {results["threads"]} CPU threads;
whole run {results["total_seconds"] / 60:.1f} min (FP training included if it was not cached). Raw numbers:
[docs/assets/demo_results.json](docs/assets/demo_results.json).

{markdown_table(results)}

Sample grids: {grids}"""
    readme = ROOT / "README.md"
    text = _replace(readme.read_text(), START, END, block)
    layer_json = Path(bench_dir) / "ptq_layer_error.json"
    if layer_json.is_file():
        text = _replace(text, LAYER_START, LAYER_END, layer_error_block(layer_json))
        shutil.copy(layer_json, assets / "ptq_layer_error.json")
    atomic_write_text(readme, text)
    print(f"README table updated from {run / 'results.json'}")


if __name__ == "__main__":
    main(*sys.argv[1:])
