"""Command line: ``diffquant demo | quantize | calibrate | info | efficientdm``, one module per subcommand."""

from __future__ import annotations

import argparse
import sys

import diffquant.nn  # registers every activation mode
import diffquant.ptq.methods  # noqa: F401  (registers the calibrated weight methods)
from diffquant._version import __version__
from diffquant.cli import bench, calibrate, info, quantize

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``diffquant`` command."""
    parser = argparse.ArgumentParser(prog="diffquant", description=__doc__)
    parser.add_argument("--version", action="version", version=f"diffquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    bench.add_parsers(sub)
    quantize.add_parser(sub)
    calibrate.add_parser(sub)
    info.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``diffquant`` console script: 0 on success, 2 with a message on bad input."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # bad input: a clear message, no traceback
        print(f"diffquant {args.command}: error: {err}", file=sys.stderr)
        return 2
