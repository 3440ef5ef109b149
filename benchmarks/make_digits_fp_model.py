"""Make the packaged FP digits model that ``diffquant demo`` uses instead of training one.

Usage: python benchmarks/make_digits_fp_model.py [--seed 0] [--cache-dir DIR]

Trains the FP digits UNet with the default recipe (``UNetConfig()``, ``TrainConfig()``; or loads it
from ``--cache-dir`` if that cache already holds it) and writes it to
``src/diffquant/bench/digits/assets/fp_unet-seed<SEED>/`` with a ``manifest.json`` recording its
cache key, the SHA-256 of its weights and how it was made. Run it again whenever ``UNetConfig``,
``TrainConfig`` or the data split change: until then the key no longer matches and the demo trains
the model itself (the packaged model is never used for a recipe it was not made with).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from diffquant.bench.digits.cache import (
    FP_WEIGHTS,
    PACKAGED_DIR,
    PACKAGED_MANIFEST,
    fp_model_key,
    load_or_train_fp_model,
    sha256_file,
)
from diffquant.bench.digits.model import UNetConfig
from diffquant.bench.digits.train import TrainConfig
from diffquant.bench.timing import machine_info


def make_packaged_model(seed: int, cache_dir: str | None) -> Path:
    """Train (or load from ``cache_dir``) the default FP model and write the packaged copy."""
    torch.set_num_threads(1)  # measured fastest for this 1M-parameter model on CPU
    model = load_or_train_fp_model(cache_dir, seed=seed, use_packaged=False)
    final = PACKAGED_DIR / f"fp_unet-seed{seed}"
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        manifest = {
            "key": fp_model_key(seed),
            "seed": seed,
            "sha256": sha256_file(tmp / FP_WEIGHTS),
            "made_by": f"python benchmarks/make_digits_fp_model.py --seed {seed}",
            "unet": asdict(UNetConfig()),
            "train": asdict(TrainConfig()),
            **machine_info(),
        }
        (tmp / PACKAGED_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.replace(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="cache to train into / load from")
    args = parser.parse_args()
    path = make_packaged_model(args.seed, args.cache_dir)
    print(f"wrote {path} (cache key {fp_model_key(args.seed)})")


if __name__ == "__main__":
    main()
