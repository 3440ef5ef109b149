"""Command line: ``diffquant demo | quantize | info``."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import diffquant.nn  # registers every activation mode
import diffquant.ptq.methods  # noqa: F401  (registers the calibrated weight methods)
from diffquant.api import needs_calibration, weight_methods
from diffquant.config import (
    GRANULARITIES,
    RANGE_METHODS,
    SEQUENTIAL_MODES,
    ActivationQuantConfig,
    QuantConfig,
    WeightQuantConfig,
)
from diffquant.nn.act_quant import ActivationQuantizer


def _weight_config(args: argparse.Namespace) -> WeightQuantConfig:
    granularity = "group" if args.group_size else args.granularity
    if args.weights == "nf4":
        if (
            args.group_size
            or args.asymmetric
            or args.granularity != "channel"
            or args.range_method != "minmax"
        ):
            raise ValueError(
                "--group-size, --asymmetric, --granularity and --range-method apply to INT weights; NF4 takes "
                "--block-size only."
            )
        block_size = 64 if args.block_size is None else args.block_size
        return WeightQuantConfig(format="nf4", bits=4, block_size=block_size, method=args.method)
    if args.block_size is not None:
        raise ValueError(
            f"--block-size is the NF4 block size; it does not apply to --weights {args.weights}."
        )
    bits = int(args.weights.removeprefix("int"))
    return WeightQuantConfig(
        bits=bits,
        granularity=granularity,
        group_size=args.group_size,
        symmetric=not args.asymmetric,
        range_method=args.range_method,
        method=args.method,
        sequential=args.sequential,
    )


def _activation_config(spec: str) -> ActivationQuantConfig | None:
    if spec == "none":
        return None
    bits, _, mode = spec.partition("-")  # e.g. "int8-static"
    if not bits.startswith("int") or not bits[3:].isdigit() or not mode:
        raise ValueError(
            f"--activations {spec!r}: expected 'none' or INTn-MODE such as 'int8-static', 'int8-dynamic'."
        )
    if mode not in ActivationQuantizer.registry:
        raise ValueError(
            f"--activations {spec!r}: unknown mode {mode!r}; choose one of {_activation_modes()}."
        )
    return ActivationQuantConfig(bits=int(bits[3:]), mode=mode)


def _load_diffusers_model(path: str, subfolder: str | None):
    import diffusers

    folder = Path(path) / (subfolder or "")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} has no config.json; give a diffusers model folder (or --subfolder unet).")
    class_name = json.loads(config_file.read_text())["_class_name"]
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ValueError(f"{config_file} names {class_name!r}, which is not a diffusers model class.")
    return cls.from_pretrained(path, subfolder=subfolder)


def cmd_demo(args: argparse.Namespace) -> int:
    from diffquant.bench.demo import run_demo
    from diffquant.bench.report import summary_text

    results = run_demo(
        args.out, quick=args.quick, seed=args.seed, cache_dir=args.cache_dir, progress=not args.no_progress
    )
    print(summary_text(results))
    print(f"report (table with intervals, samples, reading notes): {Path(args.out) / 'report.md'}")
    return 0


def cmd_efficientdm(args: argparse.Namespace) -> int:
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


def cmd_quantize(args: argparse.Namespace) -> int:
    from diffquant.api import quantize_, weight_bits_per_parameter
    from diffquant.io import save_quantized

    config = QuantConfig(
        weights=_weight_config(args),
        activations=_activation_config(args.activations),
        exclude=tuple(args.exclude),
    )
    calibrate = schedule = None
    if args.model == "digits":
        from diffquant.bench.demo import DemoSettings, calibration_fn
        from diffquant.bench.digits.cache import fp_scheduler, load_or_train_fp_model

        model, schedule = load_or_train_fp_model(args.cache_dir), fp_scheduler()
        calibrate = calibration_fn(DemoSettings())
    else:
        model = _load_diffusers_model(args.model, args.subfolder)
        if needs_calibration(config):
            raise ValueError(
                "calibrated activations and weight methods need calibration samples, which the CLI can make "
                "only for the digits model; use --activations none|int8-dynamic with --method rtn, or call "
                "diffquant.quantize_(..., calibrate=fn) from Python."
            )
    quantize_(model.eval(), config, calibrate=calibrate, schedule=schedule, progress=True)
    save_quantized(model, args.out)
    print(f"{config.label}: {weight_bits_per_parameter(model):.2f} bits/weight, saved to {args.out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from diffquant.io import read_checkpoint_description

    description = read_checkpoint_description(args.checkpoint)
    config = QuantConfig.from_dict(description["quant_config"])
    print(f"{description['architecture']} quantized as {config.label} ({len(description['layers'])} layers)")
    print(config.to_json())
    print(_kernel_summary(args.checkpoint))
    return 0


def _activation_modes() -> list[str]:
    return sorted(ActivationQuantizer.registry)


def _kernel_summary(checkpoint: str) -> str:
    """Which execution path the checkpoint's layers take on this machine, after one example call."""
    import torch

    from diffquant.io import load_quantized
    from diffquant.models.tiny import example_inputs, scheduler_for_tests
    from diffquant.nn.kernel_report import kernel_report

    model = load_quantized(checkpoint, schedule=scheduler_for_tests())
    note = ""
    try:
        with torch.no_grad():
            model(**example_inputs(model, batch_size=2))
    except (TypeError, RuntimeError) as err:  # no example inputs for this architecture
        note = f"\n  (paths are chosen at the first forward; could not run one here: {err})"
    return kernel_report(model).summary() + note


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``diffquant`` command."""
    parser = argparse.ArgumentParser(prog="diffquant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run every method on the embedded digits benchmark")
    demo.add_argument("--quick", action="store_true", help="fewer samples (same rows), about 2 minutes")
    demo.add_argument("--out", default="out/demo", help="output directory (created; must not be a file)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the float model, classifier and sampling")
    demo.add_argument("--cache-dir", default=None, help="where the trained float model is cached")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=cmd_demo)

    quant = sub.add_parser("quantize", help="quantize a diffusers model folder (or 'digits') and save it")
    quant.add_argument("model", help="a diffusers model folder, or 'digits' for the embedded benchmark model")
    quant.add_argument("--out", required=True, help="checkpoint directory to write")
    quant.add_argument(
        "--subfolder", default=None, help="model subfolder inside a pipeline folder, e.g. unet"
    )
    quant.add_argument("--weights", default="int8", choices=[f"int{b}" for b in range(2, 9)] + ["nf4"])
    quant.add_argument("--granularity", default="channel", choices=[g for g in GRANULARITIES if g != "group"])
    quant.add_argument(
        "--group-size", type=int, default=None, help="per-group weight scales (implies groups)"
    )
    quant.add_argument("--asymmetric", action="store_true", help="asymmetric weight range")
    quant.add_argument("--range-method", default="minmax", choices=list(RANGE_METHODS))
    quant.add_argument("--block-size", type=int, default=None, help="NF4 block size (default 64; NF4 only)")
    quant.add_argument(
        "--activations",
        default="none",
        help=f"none or INTn-MODE with MODE one of {', '.join(_activation_modes())} (e.g. int8-static)",
    )
    quant.add_argument("--method", default="rtn", choices=list(weight_methods()), help="weight method")
    quant.add_argument(
        "--sequential", default="block", choices=list(SEQUENTIAL_MODES), help="GPTQ/Qronos mode"
    )
    quant.add_argument("--exclude", nargs="*", default=[], help="regexes of layers to keep in float")
    quant.add_argument("--cache-dir", default=None, help="digits model cache")
    quant.set_defaults(func=cmd_quantize)

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

    info = sub.add_parser("info", help="describe a saved quantized checkpoint")
    info.add_argument("checkpoint")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``diffquant`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # bad input: a clear message, no traceback
        print(f"diffquant {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
