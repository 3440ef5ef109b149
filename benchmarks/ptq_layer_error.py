"""Per-layer output error of RTN, GPTQ and Qronos on the digits UNet, at W4 and W3 (per channel).

For every quantized layer, on held-out calibration inputs (float sampler trajectories from other
seeds than the calibration set), the relative error of the layer output against the float network,

    ‖W X − Q X̃‖ / ‖W X‖,

where X is the layer's input in the float model and X̃ its input in the quantized model (so error
accumulated upstream counts, as it does at inference). Writes ``ptq_layer_error.json`` with every
layer's error and the median ratios Qronos/GPTQ and GPTQ/RTN per bit-width.

Usage: python benchmarks/ptq_layer_error.py [--out out/bench] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffquant import QuantConfig, WeightQuantConfig, quantize_
from diffquant.api import quantized_layers
from diffquant.bench.digits.cache import fp_scheduler, load_or_train_fp_model
from diffquant.bench.digits.sampling import sample_digits
from diffquant.config import CalibrationConfig
from diffquant.io import atomic_write_text
from diffquant.ptq.calibration import record_denoiser_calls, replay

METHODS = ("rtn", "gptq", "qronos")


def _trajectory_calls(model: nn.Module, n: int, seed: int, keep: int):
    labels = torch.arange(n) % 10
    return record_denoiser_calls(
        model,
        lambda m: sample_digits(m, labels, num_steps=50, seed=seed, progress=False),
        CalibrationConfig(num_steps=keep),
    )


def _layer_inputs(model: nn.Module, names: list[str], calls) -> dict[str, list[torch.Tensor]]:
    inputs = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: inputs[name].append(args[0])
        )
        for name in names
    ]
    with torch.no_grad():
        replay(model, calls)
    for handle in handles:
        handle.remove()
    return inputs


def _apply(layer: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d) or getattr(layer, "kind", None) == "conv2d":
        return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight)


def layer_errors(fp_model: nn.Module, q_model: nn.Module, calls) -> dict[str, float]:
    """``‖W X − Q X̃‖ / ‖W X‖`` per quantized layer of ``q_model`` over ``calls``."""
    names = list(quantized_layers(q_model))
    x_float = _layer_inputs(fp_model, names, calls)
    x_quant = _layer_inputs(q_model, names, calls)
    errors = {}
    with torch.no_grad():
        for name in names:
            fp_layer, q_layer = fp_model.get_submodule(name), q_model.get_submodule(name)
            q_weight = q_layer.qweight.dequantize()
            num = den = 0.0
            for x, xt in zip(x_float[name], x_quant[name], strict=True):
                y = _apply(fp_layer, fp_layer.weight, x)
                # the input quantizer is part of the quantized path; weight-only here, so X̃ is the raw input
                num += (y - _apply(q_layer, q_weight, xt)).pow(2).sum().item()
                den += y.pow(2).sum().item()
            errors[name] = (num / den) ** 0.5
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/bench", help="output directory")
    parser.add_argument("--quick", action="store_true", help="fewer calibration samples")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument(
        "--sequential", default="layer", choices=["layer", "block", "off"], help="GPTQ/Qronos mode"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    fp_model = load_or_train_fp_model(args.cache_dir).eval()
    n, keep = (32, 8) if args.quick else (64, 16)
    calib = _trajectory_calls(fp_model, n, seed=1, keep=keep)
    held_out = _trajectory_calls(fp_model, n, seed=2, keep=keep)
    results = {
        "benchmark": "ptq_layer_error",
        "quick": args.quick,
        "sequential": args.sequential,
        "calibration_calls": len(calib),
        "bits": {},
    }
    for bits in (4, 3):
        per_method, seconds = {}, {}
        for method in METHODS:
            model = copy.deepcopy(fp_model)
            weights = WeightQuantConfig(bits=bits, symmetric=False, method=method, sequential=args.sequential)
            start = time.perf_counter()
            quantize_(
                model,
                QuantConfig(weights=weights),
                calibrate=lambda m: replay(m, calib),
                schedule=fp_scheduler(),
            )
            seconds[method] = time.perf_counter() - start
            per_method[method] = layer_errors(fp_model, model, held_out)
            print(f"W{bits} {method}: median error {statistics.median(per_method[method].values()):.4f}")
        layers = list(per_method["rtn"])
        ratio = {
            "qronos_over_gptq": statistics.median(
                per_method["qronos"][n] / per_method["gptq"][n] for n in layers
            ),
            "gptq_over_rtn": statistics.median(per_method["gptq"][n] / per_method["rtn"][n] for n in layers),
        }
        results["bits"][f"w{bits}"] = {
            "median_ratio": ratio,
            "median_error": {m: statistics.median(per_method[m].values()) for m in METHODS},
            "calibration_seconds": seconds,
            "layers": {n: {m: per_method[m][n] for m in METHODS} for n in layers},
        }
        print(
            f"W{bits}: median Qronos/GPTQ {ratio['qronos_over_gptq']:.3f}, GPTQ/RTN {ratio['gptq_over_rtn']:.3f}"
        )
    atomic_write_text(out / "ptq_layer_error.json", json.dumps(results, indent=2))
    print(f"wrote {out / 'ptq_layer_error.json'}")


if __name__ == "__main__":
    main()
