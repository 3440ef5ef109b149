"""Copy a demo run's table and pictures into the README.

Usage: python benchmarks/update_readme.py [out/demo]

Replaces the text between ``<!-- demo-table:start -->`` and ``<!-- demo-table:end -->`` in README.md
with the table of ``results.json`` and copies the FD-vs-bits plot and sample grids to docs/assets/.
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


def main(run_dir: str = "out/demo") -> None:
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
    block = f"""{START}
Full run: {results["num_samples"]} samples per row, {results["sampler"]} with classifier-free guidance,
{results["image_size"]}×{results["image_size"]} digits;
noise floor FD (real vs real) **{results["noise_floor_fd"]:.2f}**;
step latency = one denoiser call on a CFG batch of {results["latency_batch"]} images, {results["threads"]} CPU threads;
whole run {results["total_seconds"] / 60:.1f} min (FP training included if it was not cached). Raw numbers:
[docs/assets/demo_results.json](docs/assets/demo_results.json).

{markdown_table(results)}

Sample grids: {grids}
{END}"""
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md lacks the {START} / {END} markers.")
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    atomic_write_text(readme, text)
    print(f"README table updated from {run / 'results.json'}")


if __name__ == "__main__":
    main(*sys.argv[1:])
