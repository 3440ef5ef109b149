"""``diffquant demo`` and ``diffquant efficientdm``: the embedded digits benchmark (imported lazily)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> int:
    """Run every method on the digits benchmark and print the summary table."""
    from diffquant.bench.demo import run_demo
    from diffquant.bench.report import summary_text

    results = run_demo(
        args.out, quick=args.quick, seed=args.seed, cache_dir=args.cache_dir, progress=not args.no_progress
    )
    print(summary_text(results))
    print(f"report (table with intervals, samples, reading notes): {Path(args.out) / 'report.md'}")
    return 0


def cmd_efficientdm(args: argparse.Namespace) -> int:
    """EfficientDM step by step on the digits benchmark."""
    from diffquant.bench.efficientdm_walkthrough import markdown_report, run_walkthrough

    weight_bits, act_bits = _bit_pair(args.bits)
    results = run_walkthrough(
        args.out,
        quick=args.quick,
        weight_bits=weight_bits,
        act_bits=act_bits,
        seed=args.seed,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
    )
    print(markdown_report(results))
    return 0


def _bit_pair(spec: str) -> tuple[int, int]:
    match = re.fullmatch(r"[wW](\d)[aA](\d)", spec)
    if match is None:
        raise ValueError(f"--bits must look like W4A4 or W4A8, got {spec!r}.")
    return int(match[1]), int(match[2])


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` and ``efficientdm`` to the ``diffquant`` subcommands."""
    demo = sub.add_parser("demo", help="run every method on the embedded digits benchmark")
    demo.add_argument("--quick", action="store_true", help="fewer samples (same rows), about 2 minutes")
    demo.add_argument("--out", default="out/demo", help="output directory (created; must not be a file)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the float model, classifier and sampling")
    demo.add_argument("--cache-dir", default=None, help="where the trained float model is cached")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=cmd_demo)

    edm = sub.add_parser(
        "efficientdm",
        help="EfficientDM step by step on the digits benchmark: FP → PTQ → QALoRA → + scale-aware LR → "
        "+ TALSQ → + distillation, with a comparison table",
    )
    edm.add_argument("--bits", default="W4A4", help="weights and activations, e.g. W4A4 or W4A8")
    edm.add_argument("--quick", action="store_true", help="fewer fine-tuning steps and samples")
    edm.add_argument("--out", default="out/efficientdm", help="output directory")
    edm.add_argument("--seed", type=int, default=0)
    edm.add_argument("--cache-dir", default=None, help="where the trained float model is cached")
    edm.add_argument("--no-progress", action="store_true", help="hide progress bars")
    edm.set_defaults(func=cmd_efficientdm)
