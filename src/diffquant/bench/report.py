"""Human-readable report of a demo run: a Markdown table, sample grids and an FD-vs-bits plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffquant.bench.reading import reading_text
from diffquant.io import atomic_write_text

COLUMNS = (
    ("name", "row", "{}"),
    ("weights", "W", "{}"),
    ("activations", "A", "{}"),
    ("sampler", "sampler", "{}"),
    ("fd", "FD ↓ [95% CI]", "{:.2f}"),
    ("fd_ratio", "FD / FP [95% CI]", "{:.3f}"),
    ("class_accuracy", "class acc ↑ [95% CI]", "{:.3f}"),
    ("psnr_vs_fp", "PSNR vs FP (dB) ↑ [95% CI]", "{:.1f}"),
    ("bits_per_weight", "bits/weight", "{:.2f}"),
    ("size_bytes", "size (KiB)", "{}"),
    ("step_latency_ms", "step latency (ms)", "{:.1f}"),
    ("latency_vs_fp", "latency / FP", "{:.2f}"),
    ("calibration_seconds", "quantize / fine-tune time (s)", "{:.1f}"),
)


def _cell(key: str, fmt: str, row: dict[str, Any]) -> str:
    value = row.get(key)
    if value is None:
        return "—"
    if key == "size_bytes":
        return f"{value / 1024:.0f}"
    interval = row.get(f"{key}_ci")
    if interval is not None and interval[0] != interval[1]:  # the float row's FD / FP is exactly 1
        return f"{fmt.format(value)} [{fmt.format(interval[0])}, {fmt.format(interval[1])}]"
    return fmt.format(value)


def markdown_table(results: dict[str, Any]) -> str:
    """The results table in Markdown (one line per row)."""
    header = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [header, rule]
    for row in results["rows"]:
        lines.append("| " + " | ".join(_cell(key, fmt, row) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def _stage_line(results: dict[str, Any]) -> str:
    stages = results.get("stage_seconds", {})
    return ", ".join(f"{name.replace('_', ' ')} {seconds:.0f} s" for name, seconds in stages.items())


def summary_text(results: dict[str, Any]) -> str:
    """A one-screen plain-text summary of a run: one short line per row, then machine and stage times."""
    lines = [
        f"{'row':<28} {'FD [95% CI]':>21} {'FD/FP':>6} {'acc':>6} {'PSNR':>5} {'bits':>5} {'lat/FP':>6}",
    ]
    for row in results["rows"]:
        fd_low, fd_high = row["fd_ci"]
        psnr = "—" if row["psnr_vs_fp"] is None else f"{row['psnr_vs_fp']:.1f}"
        lines.append(
            f"{row['name']:<28} {row['fd']:>6.2f} [{fd_low:>5.2f}, {fd_high:>5.2f}] {row['fd_ratio']:>6.3f} "
            f"{row['class_accuracy']:>6.3f} {psnr:>5} {row['bits_per_weight']:>5.2f} {row['latency_vs_fp']:>6.2f}"
        )
    machine = results["machine"]
    lines += [
        "",
        f"{results['num_samples']} samples per row, noise floor FD {results['noise_floor_fd']:.2f}; "
        f"{machine['isa']}, {machine['cores']} cores, {machine['threads']} threads, torch {machine['torch']}",
        f"total {results['total_seconds']:.0f} s: {_stage_line(results)}",
    ]
    return "\n".join(lines)


def plot_fd_vs_bits(results: dict[str, Any], path: Path) -> None:
    """FD (with its 95 % interval) against stored bits per weight, one labelled point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for row in (r for r in results["rows"] if r.get("sampler", results["sampler"]) == results["sampler"]):
        low, high = row.get("fd_ci") or (row["fd"], row["fd"])
        yerr = [[max(0.0, row["fd"] - low)], [max(0.0, high - row["fd"])]]
        ax.errorbar(row["bits_per_weight"], row["fd"], yerr=yerr, fmt="o", ms=5, capsize=2)
        ax.annotate(
            row["name"],
            (row["bits_per_weight"], row["fd"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.axhline(
        results["noise_floor_fd"],
        color="grey",
        linestyle="--",
        linewidth=1,
        label="noise floor (real vs real)",
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("stored bits per weight (log scale)")
    ax.set_ylabel("FD to real digits (lower is better)")
    ax.set_title(f"digits benchmark, {results['sampler']}, {results['num_samples']} samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def write_report(results: dict[str, Any], out_dir: Path) -> Path:
    """Write ``report.md`` and ``fd_vs_bits.png`` into ``out_dir``; returns the report path."""
    plot_fd_vs_bits(results, out_dir / "fd_vs_bits.png")
    machine = results["machine"]
    grids = "\n".join(
        f"| {row['name']} | ![{row['name']}]({row['grid']}) |" for row in results["rows"] if row.get("grid")
    )
    text = f"""# diffquant demo — digits benchmark

{"Quick run (fewer samples)." if results["quick"] else "Full run."} {results["num_samples"]} samples per row,
sampler {results["sampler"]} with classifier-free guidance, images {results["image_size"]}×{results["image_size"]}.
FD is the Fréchet distance between digit-classifier features of the samples and of the real digits;
its noise floor (FD between two random halves of the real data) is **{results["noise_floor_fd"]:.2f}**.
FD / FP compares with the float model under the same sampler. Rows ending in `-dpm20` re-use the
model of the row they name, calibrated on DDIM-50 trajectories, without recalibration (sampler transfer).
Step latency: one denoiser call on {results["latency_batch"]} images (CFG batch), CPU, {machine["threads"]} threads
({machine["isa"]});
"latency / FP" is measured alternately with the float model in the same run, the number to trust on a
noisy machine. Quantize time includes calibration. Total time {results["total_seconds"]:.0f} s
({_stage_line(results)}).

{markdown_table(results)}

{reading_text(results)}

![FD vs bits](fd_vs_bits.png)

## Samples (first 100 per row, digits 0–9 left to right)

| row | samples |
|---|---|
{grids}
"""
    path = out_dir / "report.md"
    atomic_write_text(path, text)
    return path
