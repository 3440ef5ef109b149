"""Seed 003's ``qronos_diffusion/quantize_qronos_4blocks.py``: Qronos on the denoiser's first blocks.

Qronos (GPTQ-style second-order rounding that also corrects the error already made by earlier layers)
quantizes the weights of the layers inside the first ``--num_blocks`` transformer blocks, block by block
on the outputs of the already-quantized blocks; every other layer stays in float. Default W4A8 with
static activations. This is ``diffquant calibrate --method qronos --first-blocks N``; every
``diffquant calibrate`` flag is accepted.

    python examples/logsnr/quantize_qronos_4blocks.py --pretrained_model_name_or_path PixArt-alpha-folder \\
        --save_path qronos_4blocks
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffquant.cli import main as diffquant_main

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.txt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="a diffusers pipeline folder")
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="calibration prompts, one per line")
    parser.add_argument(
        "--num_blocks", type=int, default=4, help="quantize the layers of this many first blocks"
    )
    args, rest = parser.parse_known_args(argv)
    defaults = ["--method", "qronos", "--wbits", "4", "--abits", "8", "--activations", "static"]
    prefix = [
        "calibrate",
        args.pretrained_model_name_or_path,
        *defaults,
        "--first-blocks",
        str(args.num_blocks),
    ]
    return diffquant_main([*prefix, "--prompts", args.prompts, *rest])


if __name__ == "__main__":
    sys.exit(main())
