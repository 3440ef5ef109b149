"""Fine-tune the digits UNet with QLISA and save it as an NF4 checkpoint.

QLISA (seed 000): every Linear/Conv2d is stored in NF4 with double quantization while frozen; every
``--interval`` steps the first and last layer plus ``--gamma`` sampled others train in fp32 (LISA), each
parameter stepped by its own AdamW inside backward. The script reports the held-out denoising loss of
the float model, of its NF4 version before training, and after QLISA.

    python examples/qlisa/run_training.py --steps 400 --out out/qlisa-digits
    python examples/qlisa/run_inference.py --model out/qlisa-digits --out out/qlisa-digits/grid.png
"""

from __future__ import annotations

import argparse
import copy

import torch

from diffquant.api import quantize_
from diffquant.bench.digits.cache import fp_scheduler, load_or_train_fp_model
from diffquant.bench.digits.data import DigitsData, load_digits_dataset, train_test_split
from diffquant.bench.digits.model import NULL_CLASS
from diffquant.config import QuantConfig
from diffquant.finetune import class_conditioning, denoising_loss, fit_denoiser
from diffquant.io import save_quantized
from diffquant.qlisa import NF4_CONFIG, QLISADiffusion


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps (one backward each)")
    parser.add_argument(
        "--gamma", type=int, default=2, help="middle layers trained per period besides first/last"
    )
    parser.add_argument("--interval", type=int, default=20, help="steps between layer re-samplings (K)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of every parameter")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument(
        "--label-dropout", type=float, default=0.1, help="keeps classifier-free guidance working"
    )
    parser.add_argument("--max-grad-norm", type=float, default=None, help="per-parameter gradient clipping")
    parser.add_argument("--seed", type=int, default=0, help="seeds layer sampling, batches and noise")
    parser.add_argument(
        "--cache-dir", default=None, help="FP model cache (default: diffquant's cache folder)"
    )
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, data: DigitsData, scheduler, seed: int = 1234) -> float:
    """Denoising loss on ``data`` with fixed noise and timesteps (comparable across models)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    return denoising_loss(
        model, data.images, scheduler, class_conditioning(data.labels), generator=gen
    ).item()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = load_or_train_fp_model(args.cache_dir, progress=not args.no_progress)
    scheduler = fp_scheduler()
    train, test = train_test_split(load_digits_dataset())
    fp_loss = held_out_loss(model, test, scheduler)
    # the starting point QLISA improves on: every layer round-to-nearest NF4, no training
    nf4 = quantize_(copy.deepcopy(model), QuantConfig(weights=NF4_CONFIG, keep_fp=()))
    nf4_loss = held_out_loss(nf4, test, scheduler)

    qlisa = QLISADiffusion(
        model,
        gamma=args.gamma,
        interval=args.interval,
        lr=args.lr,
        seed=args.seed,
        max_grad_norm=args.max_grad_norm,
    )
    qlisa.register().insert_hook()

    # optimizer=None: the hooks step the active parameters inside backward; qlisa.step counts the step
    # and re-samples the active layers every --interval steps
    losses = fit_denoiser(
        model,
        None,
        train.images,
        class_conditioning(train.labels),
        scheduler,
        steps=args.steps,
        batch_size=args.batch_size,
        unconditional=class_conditioning(NULL_CLASS),
        cond_dropout=args.label_dropout,
        after_step=qlisa.step,
        seed=args.seed,
        progress=not args.no_progress,
        desc="qlisa",
    )
    model = qlisa.finalize()
    qlisa_loss = held_out_loss(model, test, scheduler)
    out = save_quantized(model, args.out)
    k = min(20, len(losses))
    print(f"training loss: first {k} steps {sum(losses[:k]) / k:.4f}, last {k} {sum(losses[-k:]) / k:.4f}")
    print(
        f"held-out denoising loss: FP {fp_loss:.4f} | NF4 round-to-nearest {nf4_loss:.4f} | QLISA {qlisa_loss:.4f}"
    )
    print(f"saved the NF4 checkpoint to {out}")


if __name__ == "__main__":
    main()
