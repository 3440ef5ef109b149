"""The "reading the table" text of a demo run, written from its intervals.

Only differences whose 95 % intervals separate are claimed. Against the float row the paired
interval of FD / FP is used (it excludes 1 or it does not); between two rows, their intervals of
the same metric must not overlap (a conservative test: overlapping intervals are reported as "no
difference shown at this sample size", never as "equal").
"""

from __future__ import annotations

from typing import Any

from diffquant.bench.scoring import intervals_separate

METRICS = {
    "fd_ratio": ("FD / FP", "{:.3f}", False),  # (label, format, higher is better)
    "class_accuracy": ("class accuracy", "{:.3f}", True),
    "psnr_vs_fp": ("PSNR vs FP", "{:.1f} dB", True),
}

COMPARISONS: tuple[tuple[str, str, str, str], ...] = (
    ("psnr_vs_fp", "w4a8-gptq", "w4a8-rtn", "GPTQ vs RTN weights at W4A8"),
    ("psnr_vs_fp", "w4a8-qronos", "w4a8-rtn", "Qronos vs RTN weights at W4A8"),
    ("psnr_vs_fp", "w4a8-qronos", "w4a8-gptq", "Qronos vs GPTQ at W4A8"),
    ("fd_ratio", "w4a4-qronos-logsnr", "w4a4-qronos-static", "W4A4 log-SNR vs static activation ranges"),
    ("fd_ratio", "w4a4-qronos-steptable", "w4a4-qronos-static", "W4A4 per-step table vs static ranges"),
    ("fd_ratio", "w4a4-qronos-logsnr-dpm20", "w4a4-qronos-static-dpm20", "the same under DPM-Solver++ 20"),
    ("fd_ratio", "w4a4-qronos-steptable-dpm20", "w4a4-qronos-static-dpm20", "the same, per-step table"),
    ("fd_ratio", "w4a4-efficientdm", "w4a4-qronos-static", "EfficientDM vs PTQ at W4A4"),
    ("psnr_vs_fp", "w4a4-efficientdm", "w4a4-qronos-static", "EfficientDM vs PTQ at W4A4"),
    ("psnr_vs_fp", "w4-tuneqdm", "w4a16-rtn-g64", "TuneQDM W4 vs RTN W4 (weight-only)"),
    ("fd_ratio", "nf4-qlisa", "nf4", "QLISA vs plain NF4"),
    ("psnr_vs_fp", "nf4-qlisa", "nf4", "QLISA vs plain NF4"),
    ("fd_ratio", "w4a8-qat", "w4a8-rtn", "QAT vs RTN at W4A8"),
    ("psnr_vs_fp", "w4a8-qat", "w4a8-rtn", "QAT vs RTN at W4A8"),
)
"""``(metric, row, other row, what is compared)``; comparisons naming a row the run lacks are skipped."""


def _with_interval(row: dict[str, Any], metric: str) -> str:
    fmt = METRICS[metric][1]
    low, high = row[f"{metric}_ci"]
    return f"{fmt.format(row[metric])} [{fmt.format(low)}, {fmt.format(high)}]"


def versus_float(results: dict[str, Any]) -> list[str]:
    """Rows whose paired FD / FP interval lies above 1, below 1, or contains it."""
    worse, better, same = [], [], []
    for row in results["rows"]:
        if row["psnr_vs_fp"] is None:  # a float row
            continue
        low, high = row["fd_ratio_ci"]
        (worse if low > 1.0 else better if high < 1.0 else same).append(row["name"])
    lines = []
    if worse:
        lines.append(f"FD / FP interval above 1 (worse FD than float): {', '.join(worse)}.")
    if better:
        lines.append(
            f"FD / FP interval below 1 (lower FD than the float model's samples): {', '.join(better)}."
        )
    if same:
        lines.append(f"No FD difference from float shown (interval contains 1): {', '.join(same)}.")
    return lines


def pairwise(results: dict[str, Any]) -> list[str]:
    """One sentence per comparison in :data:`COMPARISONS` whose rows are in the run."""
    rows = {row["name"]: row for row in results["rows"]}
    lines = []
    for metric, a, b, what in COMPARISONS:
        if a not in rows or b not in rows or rows[a].get(f"{metric}_ci") is None:
            continue
        if rows[b].get(f"{metric}_ci") is None:
            continue
        label, _, higher_better = METRICS[metric]
        va, vb = rows[a][metric], rows[b][metric]
        values = f"{_with_interval(rows[a], metric)} vs {_with_interval(rows[b], metric)}"
        if intervals_separate(rows[a][f"{metric}_ci"], rows[b][f"{metric}_ci"]):
            verdict = "better" if (va > vb) == higher_better else "worse"
            lines.append(f"{what}, {label}: {a} is **{verdict}** than {b} ({values}).")
        else:
            lines.append(f"{what}, {label}: intervals overlap, no difference shown ({values}).")
    return lines


def reading_text(results: dict[str, Any]) -> str:
    """Markdown bullets: every claim the run's intervals support, and the comparisons they do not."""
    level = results.get("confidence", {}).get("level", 0.95)
    head = (
        f"Reading the table: brackets are {level:.0%} paired-bootstrap intervals over the "
        f"{results['num_samples']} samples (each row resampled on the same indices as the float row of "
        "its sampler); only differences whose intervals separate are claimed."
    )
    return "\n".join([head, "", *(f"- {line}" for line in versus_float(results) + pairwise(results))])
