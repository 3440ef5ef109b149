"""Denoiser step latency, memory and quality of float and quantized models on CPU.

Two models built from configs (random weights, seeded): an SD-style ``UNet2DConditionModel``
(64×64 latent, cross-attention) and a PixArt-style transformer (adaLN-single, hidden 768). Every
call is a classifier-free-guidance batch of 2. Rows: fp32, fp32 compiled (``torch.compile``), bf16,
W8A8 static / dynamic / log-SNR (per-channel int8 weights, 8-bit activations: integer kernels where
:func:`diffquant.kernel_report` says so), W4A16 (INT4 group 64) and NF4 (weight-only: dequantize +
float op).

Per row:

- ``step_ms``: median of one denoiser call over interleaved rounds (every row once per round, in a
  rotating order, so machine noise hits all rows alike); ``ratio``: over fp32's median from the
  same rounds. W8A8 static also reports ``reference_ratio``: the same layers forced onto the
  fake-quant reference path (``kernel_mode("reference")``), measured in the same rounds.
- ``resident_bytes``: the model's tensors (packed weights as stored) plus the prepacked int8 copies
  the kernels hold; ``checkpoint_bytes``: files written by ``save_quantized`` (float rows: one
  safetensors file).
- ``peak_rss_bytes``: peak resident set of a fresh process that loads the row and runs one call
  (Linux VmHWM, reset after loading, plus the RSS before the call); not measured for the compiled row.
- ``psnr_db``: PSNR of the final latents of one DDIM trajectory (CFG 4) against fp32's, range of the
  fp32 latents; W8A8 rows also ``psnr_reference_db`` (the reference path's trajectory).

Usage: python benchmarks/latency.py [--quick] [--out out/bench] [--models unet pixart] [--rows ...]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDIMScheduler, PixArtTransformer2DModel, UNet2DConditionModel
from safetensors.torch import save_file

import diffquant
from diffquant import ActivationQuantConfig, QuantConfig, WeightQuantConfig
from diffquant.eval.perf import model_size_bytes, track_peak_memory
from diffquant.io import atomic_write_text
from diffquant.kernels import cpu_isa, kernel_mode
from diffquant.nn.kernel_dispatch import kernel_cache_bytes

ROWS = ("fp32", "fp32-compiled", "bf16", "w8a8-static", "w8a8-dynamic", "w8a8-logsnr", "w4a16", "nf4")
W8A8 = ("w8a8-static", "w8a8-dynamic", "w8a8-logsnr")
QUANT_CONFIGS = {
    "w8a8-static": QuantConfig(weights=WeightQuantConfig(bits=8), activations=ActivationQuantConfig(bits=8)),
    "w8a8-dynamic": QuantConfig(
        weights=WeightQuantConfig(bits=8), activations=ActivationQuantConfig(bits=8, mode="dynamic")
    ),
    "w8a8-logsnr": QuantConfig(
        weights=WeightQuantConfig(bits=8), activations=ActivationQuantConfig(bits=8, mode="logsnr")
    ),
    "w4a16": QuantConfig(
        weights=WeightQuantConfig(bits=4, granularity="group", group_size=64, fallback_granularity="channel")
    ),
    "nf4": QuantConfig(weights=WeightQuantConfig(format="nf4", bits=4)),
}
SIZES = {
    "full": {
        "unet": {"channels": (128, 256, 512, 768), "layers": 1, "latent": 64, "text": (77, 768)},
        "pixart": {"blocks": 8, "heads": 12, "head_dim": 64, "latent": 32, "text": (77, 768)},
        "steps": 4,
        "rounds": 3,
    },
    "quick": {
        "unet": {"channels": (16, 32, 32, 64), "layers": 1, "latent": 16, "text": (8, 32)},
        "pixart": {"blocks": 2, "heads": 2, "head_dim": 16, "latent": 8, "text": (8, 32)},
        "steps": 2,
        "rounds": 2,
    },
}
GUIDANCE = 4.0
QUICK_SKIPS = ("fp32-compiled", "w8a8-logsnr")  # compiling / fitting the log-SNR MLPs takes minutes


def build_model(name: str, size: dict) -> torch.nn.Module:
    """The float model of ``name`` at ``size`` (seeded, eval mode)."""
    torch.manual_seed(0)
    spec = size[name]
    if name == "unet":
        # SD layout, with attention only below the full latent resolution (as SDXL does).
        model = UNet2DConditionModel(
            sample_size=spec["latent"],
            in_channels=4,
            out_channels=4,
            block_out_channels=spec["channels"],
            layers_per_block=spec["layers"],
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=spec["text"][1],
            attention_head_dim=8,
            norm_num_groups=min(32, spec["channels"][0]),
        )
    else:
        model = PixArtTransformer2DModel(
            num_attention_heads=spec["heads"],
            attention_head_dim=spec["head_dim"],
            in_channels=4,
            out_channels=4,
            num_layers=spec["blocks"],
            sample_size=spec["latent"],
            patch_size=2,
            cross_attention_dim=spec["heads"] * spec["head_dim"],
            caption_channels=spec["text"][1],
        )
    return model.eval()


class Denoiser:
    """One row: a model and how to call it on a CFG batch (float32 in and out)."""

    def __init__(self, name: str, model: torch.nn.Module, arch: str, dtype: torch.dtype = torch.float32):
        self.name, self.model, self.arch, self.dtype = name, model, arch, dtype

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x, cond = latents.to(self.dtype), text.to(self.dtype)
        if self.arch == "unet":
            out = self.model(sample=x, timestep=t, encoder_hidden_states=cond).sample
        else:
            none = {"resolution": None, "aspect_ratio": None}
            out = self.model(
                hidden_states=x, timestep=t, encoder_hidden_states=cond, added_cond_kwargs=none
            ).sample
        return out.float()


def conditioning(size: dict, arch: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial latents ``(1, 4, H, W)`` and text states ``(2, L, D)`` (unconditional first)."""
    gen = torch.Generator().manual_seed(1)
    latent = size[arch]["latent"]
    tokens, width = size[arch]["text"]
    latents = torch.randn(1, 4, latent, latent, generator=gen)
    text = torch.cat([torch.zeros(1, tokens, width), torch.randn(1, tokens, width, generator=gen)])
    return latents, text


def scheduler(steps: int) -> DDIMScheduler:
    """DDIM with ``steps`` inference steps (SD's scaled-linear betas)."""
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.set_timesteps(steps)
    return sched


@torch.no_grad()
def trajectory(
    call: Callable, latents: torch.Tensor, text: torch.Tensor, sched: DDIMScheduler
) -> torch.Tensor:
    """Final latents of a DDIM run with classifier-free guidance."""
    x = latents.clone()
    for t in sched.timesteps:
        eps_uncond, eps_cond = call(torch.cat([x, x]), t.reshape(1).expand(2), text).chunk(2)
        x = sched.step(eps_uncond + GUIDANCE * (eps_cond - eps_uncond), t, x).prev_sample
    return x


def psnr_db(x: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR over the reference's value range."""
    mse = (x.double() - reference.double()).pow(2).mean().item()
    span = (reference.max() - reference.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(span**2 / mse)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def make_row(
    row: str, arch: str, size: dict, sched: DDIMScheduler, workdir: Path, fp32: torch.nn.Module
) -> tuple[Denoiser, int]:
    """The row's denoiser and its checkpoint bytes (the checkpoint is written under ``workdir``)."""
    if row in ("fp32", "fp32-compiled"):
        path = workdir / f"{arch}-fp32.safetensors"
        if not path.exists():
            save_file({k: v.contiguous() for k, v in fp32.state_dict().items()}, str(path))
        model = fp32 if row == "fp32" else torch.compile(fp32)
        return Denoiser(row, model, arch), path.stat().st_size
    if row == "bf16":
        model = copy.deepcopy(fp32).to(torch.bfloat16)
        path = workdir / f"{arch}-bf16.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return Denoiser(row, model, arch, torch.bfloat16), path.stat().st_size
    model = copy.deepcopy(fp32)
    latents, text = conditioning(size, arch)
    float_call = Denoiser("calibration", model, arch)
    calib_latents = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
    diffquant.quantize_(
        model,
        QUANT_CONFIGS[row],
        calibrate=lambda m: trajectory(float_call, calib_latents, text, sched),
        schedule=sched,
    )
    out = workdir / f"{arch}-{row}"
    diffquant.save_quantized(model, out)
    return Denoiser(row, model, arch), _dir_bytes(out)


def interleaved_latency(denoisers: list[Denoiser], inputs: tuple, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of every row (and of the W8A8 rows' reference path), interleaved."""
    jobs: list[tuple[str, Callable[[], object]]] = []
    for d in denoisers:
        jobs.append((d.name, lambda d=d: d(*inputs)))
        if d.name == "w8a8-static":

            def on_reference(d: Denoiser = d) -> object:
                with kernel_mode("reference"):
                    return d(*inputs)

            jobs.append((d.name + "/reference", on_reference))
    times: dict[str, list[float]] = {name: [] for name, _ in jobs}
    with torch.no_grad():
        for _, job in jobs:  # warm-up: kernel choice, compilation, first-touch allocations
            job()
        for r in range(rounds):
            shift = r % len(jobs)
            for name, job in jobs[shift:] + jobs[:shift]:
                start = time.perf_counter()
                job()
                times[name].append(time.perf_counter() - start)
    return times


def rss_worker(arch: str, row: str, size_name: str, checkpoint: str) -> dict:
    """In a fresh process: load the row, run one warm-up call, then measure one call's peak RSS."""
    size = SIZES[size_name]
    sched = scheduler(size["steps"])
    if row in QUANT_CONFIGS:
        model = diffquant.load_quantized(checkpoint, schedule=sched).eval()
    else:
        model = build_model(arch, size)
        model = model.to(torch.bfloat16) if row == "bf16" else model
    call = Denoiser(row, model, arch, torch.bfloat16 if row == "bf16" else torch.float32)
    latents, text = conditioning(size, arch)
    inputs = (torch.cat([latents, latents]), torch.tensor([500, 500]), text)
    gc.collect()
    with torch.no_grad():
        call(*inputs)
        gc.collect()
        before = _vm_rss()
        with track_peak_memory("cpu") as mem:
            call(*inputs)
    return {"peak_rss_bytes": before + mem.peak_bytes, "rss_source": mem.source}


def _vm_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run_rss_worker(arch: str, row: str, size_name: str, checkpoint: Path) -> dict:
    """:func:`rss_worker` in a subprocess (glibc returns freed blocks, so RSS follows live tensors)."""
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        arch,
        row,
        "--size",
        size_name,
        "--checkpoint",
        str(checkpoint),
    ]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        return {"peak_rss_bytes": None, "rss_source": f"worker failed: {done.stderr.strip()[-300:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> dict:
    """ISA, CPU model, torch version and thread count."""
    model_name = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    isa = cpu_isa()
    return {
        "isa": isa.name,
        "exact_int8": isa.exact_int8,
        "cpu": model_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quantized_engine": torch.backends.quantized.engine,
    }


def bench_model(arch: str, size_name: str, rows: list[str], workdir: Path, rss: bool) -> dict:
    """Every row of one model: build, quantize, trajectories, interleaved latency, memory."""
    size = SIZES[size_name]
    sched = scheduler(size["steps"])
    fp32 = build_model(arch, size)
    latents, text = conditioning(size, arch)
    denoisers, checkpoint_bytes = [], {}
    for row in rows:
        start = time.perf_counter()
        denoiser, checkpoint_bytes[row] = make_row(row, arch, size, sched, workdir, fp32)
        denoisers.append(denoiser)
        print(f"  {arch} {row}: ready in {time.perf_counter() - start:.1f} s", flush=True)
    finals: dict[str, torch.Tensor] = {}
    for d in denoisers:
        finals[d.name] = trajectory(d, latents, text, sched)
        if d.name in W8A8:
            with kernel_mode("reference"):
                finals[d.name + "/reference"] = trajectory(d, latents, text, sched)
    inputs = (torch.cat([latents, latents]), torch.tensor([500, 500]), text)
    times = interleaved_latency(denoisers, inputs, size["rounds"])
    median = {name: statistics.median(ts) for name, ts in times.items()}
    results = []
    for d in denoisers:
        row = d.name
        entry = {
            "row": row,
            "step_ms": median[row] * 1e3,
            "ratio": median[row] / median["fp32"],
            "resident_bytes": model_size_bytes(d.model) + kernel_cache_bytes(d.model),
            "checkpoint_bytes": checkpoint_bytes[row],
            "psnr_db": psnr_db(finals[row], finals["fp32"]),
        }
        if row + "/reference" in median:
            entry["reference_ratio"] = median[row + "/reference"] / median["fp32"]
        if row in W8A8:
            entry["psnr_reference_db"] = psnr_db(finals[row + "/reference"], finals["fp32"])
        if row in QUANT_CONFIGS:
            entry["kernel_paths"] = diffquant.kernel_report(d.model).counts()
        if rss and row != "fp32-compiled":
            checkpoint = workdir / f"{arch}-{row}"
            entry.update(run_rss_worker(arch, row, size_name, checkpoint))
        results.append(entry)
        print(f"  {arch} {row}: {entry['step_ms']:.1f} ms ({entry['ratio']:.2f}x fp32)", flush=True)
    params = sum(p.numel() for p in fp32.parameters())
    return {
        "model": arch,
        "parameters": params,
        "config": size[arch],
        "steps": size["steps"],
        "rows": results,
    }


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def markdown(result: dict) -> str:
    """The README table of a result."""
    m = result["machine"]
    lines = [
        f"Measured on {m['cpu']} (ISA {m['isa']}, int8 exact: {m['exact_int8']}), torch {m['torch']}, "
        f"{m['threads']} threads; median of {result['rounds']} interleaved rounds.",
        "",
        "| model | row | step ms | / fp32 | reference path / fp32 | peak RSS MiB | resident MiB | "
        "checkpoint MiB | PSNR dB (fast / reference) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in result["models"]:
        label = f"{model['model']} ({model['parameters'] / 1e6:.0f}M)"
        for r in model["rows"]:
            ref = f"{r['reference_ratio']:.2f}×" if "reference_ratio" in r else ""
            psnr = "—" if r["row"] == "fp32" else f"{r['psnr_db']:.1f}"
            if "psnr_reference_db" in r:
                psnr += f" / {r['psnr_reference_db']:.1f}"
            lines.append(
                f"| {label} | {r['row']} | {r['step_ms']:.0f} | {r['ratio']:.2f}× | {ref} | "
                f"{_mib(r.get('peak_rss_bytes'))} | {_mib(r['resident_bytes'])} | "
                f"{_mib(r['checkpoint_bytes'])} | {psnr} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 steps: a smoke test in seconds")
    parser.add_argument("--out", default="out/bench", help="directory for latency.json and latency.md")
    parser.add_argument("--models", nargs="+", default=["unet", "pixart"], choices=["unet", "pixart"])
    parser.add_argument(
        "--rows", nargs="+", default=None, choices=ROWS, help="default: all (quick: no compile)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared CPU)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "ROW"), help=argparse.SUPPRESS)
    parser.add_argument("--size", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(rss_worker(*args.worker, args.size, args.checkpoint)))
        return 0
    size_name = "quick" if args.quick else "full"
    rows = args.rows or [r for r in ROWS if not (args.quick and r in QUICK_SKIPS)]
    if "fp32" not in rows:
        parser.error("--rows must include fp32: every ratio is relative to it.")
    rows = ["fp32", *[r for r in rows if r != "fp32"]]
    result = {"machine": machine(), "size": size_name, "rounds": SIZES[size_name]["rounds"], "models": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models:
            print(f"{arch}:", flush=True)
            rss = not (args.no_rss or args.quick)
            result["models"].append(bench_model(arch, size_name, rows, Path(tmp), rss=rss))
            atomic_write_text(out / "latency.json", json.dumps(result, indent=2))  # after each model
            atomic_write_text(out / "latency.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
