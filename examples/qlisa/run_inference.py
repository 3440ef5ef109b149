"""Sample digits from a QLISA checkpoint written by ``run_training.py`` and save a grid.

python examples/qlisa/run_inference.py --model out/qlisa-digits --out out/qlisa-digits/grid.png
"""

from __future__ import annotations

import argparse

from diffquant.bench.digits.cache import fp_scheduler
from diffquant.bench.digits.sampling import DEFAULT_GUIDANCE, balanced_labels, sample_digits, save_sample_grid
from diffquant.io import load_quantized


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory (save_quantized output)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--per-class", type=int, default=8, help="samples per digit class")
    parser.add_argument("--num-steps", type=int, default=50, help="DDIM denoising steps")
    parser.add_argument(
        "--guidance", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance weight"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the initial noise")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = load_quantized(args.model, schedule=fp_scheduler()).eval()
    labels = balanced_labels(args.per_class)
    images = sample_digits(
        model,
        labels,
        num_steps=args.num_steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        progress=not args.no_progress,
    )
    path = save_sample_grid(images, labels, args.out, per_class=args.per_class)
    print(f"wrote {len(labels)} samples to {path}")


if __name__ == "__main__":
    main()
