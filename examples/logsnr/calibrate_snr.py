"""Seed 003's ``LogSnr-DiT/calibrate_snr.py``: Log-SNR-dependent activation quantization of a pipeline.

Each quantized layer's input range is a small MLP of the log-signal-to-noise ratio λ = log(ᾱ/(1−ᾱ)),
fitted to the ranges seen when the float pipeline samples the calibration prompts (Log-SNR TDQ). The
result is a pipeline folder that ``DiffusionPipeline.from_pretrained`` loads quantized. This is
``diffquant calibrate`` with the seed's defaults; every ``diffquant calibrate`` flag is accepted
(``--method gptq|qronos``, ``--steps``, ``--height``, ``--pipe-arg KEY=VALUE``...).

    python examples/logsnr/calibrate_snr.py --pretrained_model_name_or_path PixArt-alpha-folder \\
        --abits 8 --wbits 8 --save_path logsnr_w8a8
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
    args, rest = parser.parse_known_args(argv)
    prefix = ["calibrate", args.pretrained_model_name_or_path, "--activations", "logsnr"]
    return diffquant_main([*prefix, "--prompts", args.prompts, *rest])


if __name__ == "__main__":
    sys.exit(main())
