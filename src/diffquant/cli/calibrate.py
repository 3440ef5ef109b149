"""``diffquant calibrate``: ``quantize`` under seed 003's flag names (``--wbits/--abits/--save_path``).

It translates its flags into ``quantize``'s and runs the same code: the seed's
``calibrate_snr.py --abits 8 --wbits 8 --save_path out`` becomes
``diffquant calibrate PIPELINE_DIR --abits 8 --wbits 8 --prompts prompts.txt --save_path out``
(Log-SNR activations by default).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffquant.api import weight_methods
from diffquant.cli.formats import activation_modes
from diffquant.cli.quantize import add_run_options
from diffquant.cli.request import execute, prepare
from diffquant.config import SEQUENTIAL_MODES

_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def as_quantize_args(args: argparse.Namespace) -> argparse.Namespace:
    """The ``quantize`` arguments that mean what ``calibrate``'s arguments mean.

    Raises:
        ValueError: a ``--save_path`` that names a file (``.pt``...), or ``--wbits`` outside 2..8 / nf4.
    """
    save_path = Path(args.save_path)
    if save_path.suffix in _FILE_SUFFIXES:
        raise ValueError(
            f"--save_path {args.save_path!r} names a file; diffquant writes a pipeline folder that "
            f"DiffusionPipeline.from_pretrained loads: give a folder such as {str(save_path.with_suffix(''))!r}."
        )
    if args.wbits != "nf4" and args.wbits not in {str(b) for b in range(2, 9)}:
        raise ValueError(f"--wbits {args.wbits!r}: choose 2..8 (INT weights) or nf4.")
    weight_only = args.activations == "none" or args.abits == 16
    values = dict(vars(args))
    for seed_flag in ("wbits", "abits", "save_path", "pipeline"):
        values.pop(seed_flag)
    values.update(
        model=args.pipeline,
        out=args.save_path,
        weights="nf4" if args.wbits == "nf4" else f"int{args.wbits}",
        activations="none" if weight_only else f"int{args.abits}-{args.activations}",
        group_size=args.group_size,
        granularity="channel",
        asymmetric=False,
        range_method="minmax",
        block_size=None,
        exclude=[],
        subfolder=None,
        cache_dir=None,
    )
    return argparse.Namespace(**values)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Translate to ``quantize``'s arguments, check them all, then load, calibrate, quantize and save."""
    print(execute(prepare(as_quantize_args(args))))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``calibrate`` to the ``diffquant`` subcommands."""
    cal = sub.add_parser(
        "calibrate",
        help="calibrate and quantize a pipeline folder with the seed's flags (--wbits/--abits/--save_path)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cal.add_argument("pipeline", help="a diffusers pipeline folder (PixArt, SD...)")
    cal.add_argument("--save_path", required=True, help="pipeline folder to write")
    cal.add_argument("--wbits", default="8", help="weight bits, 2..8, or nf4")
    cal.add_argument(
        "--abits", type=int, default=8, choices=[*range(2, 9), 16], help="activation bits (16: float)"
    )
    cal.add_argument(
        "--activations",
        default="logsnr",
        choices=[*activation_modes(), "none"],
        help="activation quantizer (logsnr: Log-SNR-dependent ranges)",
    )
    cal.add_argument("--method", default="rtn", choices=list(weight_methods()), help="weight method")
    cal.add_argument("--group_size", type=int, default=None, help="per-group weight scales")
    cal.add_argument("--sequential", default="block", choices=list(SEQUENTIAL_MODES), help="GPTQ/Qronos mode")
    cal.add_argument("--damping", type=float, default=0.01, help="GPTQ/Qronos Hessian damping")
    cal.add_argument(
        "--act_order", action="store_true", help="GPTQ/Qronos: columns by decreasing Hessian diagonal"
    )
    add_run_options(cal)
    cal.set_defaults(func=cmd_calibrate)
