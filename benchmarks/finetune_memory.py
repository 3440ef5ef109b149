"""Peak training memory of every fine-tuning method, on the digits UNet and on a 52M-parameter
Stable-Diffusion-shaped ``UNet2DConditionModel`` built from a config.

Each (model, method) pair runs in a fresh subprocess, so one measurement never inherits another's
allocations. A worker builds the model, sets the method up, then measures a few training steps
(forward, backward, optimizer): peak RSS above the level before the first step on CPU (Linux VmHWM,
with glibc's mmap threshold fixed so freed tensors leave the resident set),
peak allocated memory on CUDA. Reported per pair:

- ``weights_bytes``: the model's stored tensors (packed integer / NF4 weights as stored);
- ``trainable_bytes``: parameters that receive updates (their gradients are as large, except under
  QLISA's optimizer-in-backward, which frees each gradient as soon as it is used);
- ``optimizer_state_bytes``: AdamW moments held after the steps;
- ``step_peak_bytes``: peak above the level before training (gradients + optimizer state +
  activations + temporaries); ``activations_bytes`` is that peak minus gradients and optimizer state;
- ``peak_bytes`` = ``weights_bytes + step_peak_bytes`` and ``ratio_to_fp``: that over FP full
  fine-tuning's, measured in the same run.

Usage: python benchmarks/finetune_memory.py [--out out/bench] [--steps 3] [--models digits unet-cond]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from diffquant.bench.digits.model import build_unet
from diffquant.bench.personalize import PERSONALIZATION_METHODS
from diffquant.eval.perf import model_size_bytes, track_peak_memory
from diffquant.finetune import denoising_loss, prepare_finetune
from diffquant.io import atomic_write_text

BATCH = {"digits": 16, "unet-cond": 2}


def build(model_name: str) -> tuple[torch.nn.Module, torch.Tensor, dict[str, torch.Tensor]]:
    """The model, a batch of clean inputs and its conditioning, all seeded."""
    torch.manual_seed(0)
    batch = BATCH[model_name]
    if model_name == "digits":
        return build_unet(), torch.randn(batch, 1, 8, 8), {"class_labels": torch.arange(batch) % 10}
    model = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(96, 192, 384, 384),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=256,
        attention_head_dim=8,
    )
    return model, torch.randn(batch, 4, 32, 32), {"encoder_hidden_states": torch.randn(batch, 77, 256)}


def _bytes(tensors) -> int:
    return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))


def measure(model_name: str, method: str, steps: int, device: str) -> dict:
    """One worker's measurement (see the module docstring)."""
    model, x0, cond = build(model_name)
    params = sum(p.numel() for p in model.parameters())
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    setup = prepare_finetune(model.to(device), PERSONALIZATION_METHODS[method], scheduler=scheduler)
    x0, cond = x0.to(device), {k: v.to(device) for k, v in cond.items()}
    gen = torch.Generator().manual_seed(0)
    setup.model.train()
    start = time.perf_counter()
    with track_peak_memory(device) as mem:
        for _ in range(steps):
            loss = denoising_loss(setup.model, x0, scheduler, cond, generator=gen)
            if setup.optimizer is not None:
                setup.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if setup.optimizer is not None:
                setup.optimizer.step()
            if setup.lr_scheduler is not None:
                setup.lr_scheduler.step()
            if setup.after_step is not None:
                setup.after_step()
    seconds = (time.perf_counter() - start) / steps
    trainable = [p for p in setup.model.parameters() if p.requires_grad]
    state_bytes = setup.optimizer_state_bytes()
    grad_bytes = (
        _bytes(trainable) if setup.optimizer is not None else max(map(_bytes, ([p] for p in trainable)))
    )
    weights = model_size_bytes(setup.model)
    return {
        "model": model_name,
        "method": method,
        "parameters": params,
        "batch_size": x0.shape[0],
        "device": mem.device,
        "memory_source": mem.source,
        "weights_bytes": weights,
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_bytes": _bytes(trainable),
        "gradient_bytes": grad_bytes,
        "optimizer_state_bytes": state_bytes,
        "step_peak_bytes": mem.peak_bytes,
        "activations_bytes": max(0, mem.peak_bytes - grad_bytes - state_bytes),
        "peak_bytes": weights + mem.peak_bytes,
        "step_seconds": seconds,
    }


def run_worker(model_name: str, method: str, steps: int, device: str) -> dict:
    """Run :func:`measure` in a fresh interpreter and return its result."""
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        model_name,
        method,
        "--steps",
        str(steps),
        "--device",
        device,
    ]
    # glibc serves large blocks with mmap and returns them to the OS on free, so RSS follows the live
    # tensors; left dynamic, its threshold grows and freed blocks stay resident (±150 MiB run to run).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"worker {model_name}/{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/bench")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(BATCH), choices=list(BATCH))
    parser.add_argument(
        "--methods", nargs="+", default=list(PERSONALIZATION_METHODS), choices=list(PERSONALIZATION_METHODS)
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.worker:
        print(json.dumps(measure(*args.worker, args.steps, args.device)))
        return
    if "fp-full" not in args.methods:
        raise SystemExit("--methods must include fp-full: every ratio is relative to it.")
    rows = []
    for model_name in args.models:
        for method in args.methods:
            row = run_worker(model_name, method, args.steps, args.device)
            rows.append(row)
            print(f"{model_name:10s} {method:14s} peak {row['peak_bytes'] / 2**20:8.1f} MiB", flush=True)
    for row in rows:
        fp = next(r for r in rows if r["model"] == row["model"] and r["method"] == "fp-full")
        row["ratio_to_fp"] = row["peak_bytes"] / fp["peak_bytes"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"steps": args.steps, "device": args.device, "torch_threads": 2, "rows": rows}
    atomic_write_text(out / "finetune_memory.json", json.dumps(result, indent=2))
    print(f"wrote {out / 'finetune_memory.json'}")


if __name__ == "__main__":
    main()
