"""``diffquant quantize``: quantize a pipeline folder (calibrating on prompts), a model folder, or ``digits``."""

from __future__ import annotations

import argparse

from diffquant.api import weight_methods
from diffquant.cli.formats import activation_modes
from diffquant.cli.request import DTYPES, execute, prepare
from diffquant.config import GRANULARITIES, RANGE_METHODS, SEQUENTIAL_MODES

WEIGHT_CHOICES = [f"int{b}" for b in range(2, 9)] + ["nf4"]


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options of the calibration run and the output (shared by ``quantize`` and ``calibrate``)."""
    run = parser.add_argument_group("calibration run (pipeline folders)")
    run.add_argument(
        "--prompts", default=None, metavar="FILE", help="text file, one prompt per line ('#' lines skipped)"
    )
    run.add_argument(
        "--steps", type=positive_int, default=10, metavar="N", help="sampling steps of the calibration run"
    )
    run.add_argument(
        "--calibration-prompts-limit",
        type=positive_int,
        default=None,
        metavar="N",
        help="use at most this many prompts",
    )
    run.add_argument("--seed", type=int, default=0, help="seed of the calibration run")
    run.add_argument("--height", type=positive_int, default=None, help="image height of the calibration run")
    run.add_argument("--width", type=positive_int, default=None, help="image width of the calibration run")
    run.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    run.add_argument(
        "--pipe-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more pipeline call arguments (VALUE read as JSON, else as text), e.g. max_sequence_length=120",
    )
    run.add_argument(
        "--component", default=None, help="the denoiser to quantize (default: unet or transformer)"
    )
    run.add_argument(
        "--first-blocks",
        type=positive_int,
        default=None,
        metavar="N",
        help="quantize only the layers of the denoiser's first N blocks (the rest stays float)",
    )
    run.add_argument("--device", default=None, help="run on this device, e.g. cuda (default: as loaded, CPU)")
    run.add_argument("--dtype", default=None, choices=DTYPES, help="load the model in this dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def cmd_quantize(args: argparse.Namespace) -> int:
    """Check every argument, then load, quantize and save."""
    print(execute(prepare(args)))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``quantize`` to the ``diffquant`` subcommands."""
    quant = sub.add_parser(
        "quantize",
        help="quantize a diffusers pipeline folder (calibrating on prompts), a model folder, or 'digits'",
        description="Pipeline folder: writes a pipeline folder that DiffusionPipeline.from_pretrained loads "
        "quantized. Model folder (or --subfolder): writes a diffquant checkpoint (calibration-free configs).",
    )
    quant.add_argument(
        "model", help="a diffusers pipeline or model folder, or 'digits' for the embedded benchmark model"
    )
    quant.add_argument("--out", required=True, help="folder to write (new or empty, or --overwrite)")
    quant.add_argument(
        "--subfolder", default=None, help="quantize only this model of a pipeline folder, e.g. unet"
    )
    quant.add_argument("--weights", default="int8", choices=WEIGHT_CHOICES)
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
        help=f"none or INTn-MODE with MODE one of {', '.join(activation_modes())} (e.g. int8-static, int4-logsnr)",
    )
    quant.add_argument("--method", default="rtn", choices=list(weight_methods()), help="weight method")
    quant.add_argument(
        "--sequential", default="block", choices=list(SEQUENTIAL_MODES), help="GPTQ/Qronos mode"
    )
    quant.add_argument("--damping", type=float, default=0.01, help="GPTQ/Qronos Hessian damping")
    quant.add_argument(
        "--act-order", action="store_true", help="GPTQ/Qronos: columns by decreasing Hessian diagonal"
    )
    quant.add_argument("--exclude", nargs="*", default=[], help="regexes of layers to keep in float")
    quant.add_argument("--cache-dir", default=None, help="digits model cache")
    add_run_options(quant)
    quant.set_defaults(func=cmd_quantize)
