"""``diffquant info PATH``: what a folder holds — a diffquant checkpoint, a (quantized) pipeline or model folder.

Pipelines and models are described from their JSON configs and safetensors headers (nothing is loaded or
unpickled): per component its class, whether and how it is quantized, layer counts, the layers kept in
float and the size on disk. A diffquant checkpoint is loaded to report which kernels its layers take here.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

from diffquant.cli.folders import (
    CHECKPOINT,
    PIPELINE,
    folder_kind,
    folder_size,
    pipeline_components,
    read_json,
    safetensors_shapes,
)
from diffquant.config import QuantConfig

_SHOWN = 6  # layer names listed before "..."


def describe_folder(path: str | Path) -> str:
    """The summary ``diffquant info`` prints for ``path``.

    Raises:
        ValueError: ``path`` is missing, a file, not a checkpoint / pipeline / model folder, or holds a
            corrupt config, header or checkpoint (the message names the file).
    """
    path = Path(path)
    kind = folder_kind(path)
    if kind == CHECKPOINT:
        return _describe_checkpoint(path)
    if kind == PIPELINE:
        index = read_json(path / "model_index.json")
        lines = [f"{index.get('_class_name', '?')} pipeline folder {path} ({_size(folder_size(path))})"]
        for name, (library, cls) in pipeline_components(path).items():
            lines += _describe_component(path / name, f"{name}: {cls} ({library})")
        return "\n".join(lines)
    config = read_json(path / "config.json")
    return "\n".join(_describe_component(path, f"{config['_class_name']} model folder {path}"))


def _describe_component(folder: Path, title: str) -> list[str]:
    if not folder.is_dir():
        return [f"{title}: missing folder {folder.name}/"]
    config = read_json(folder / "config.json", missing_ok=True)
    shapes = safetensors_shapes(folder)
    head = f"{title}, {_size(folder_size(folder))}"
    if not shapes:
        pickled = sorted(f.name for f in folder.glob("*.bin"))
        note = f"weights in {pickled} (pickle; not read)" if pickled else "no weights"
        return [f"{head}, {note}"]
    quantization = config.get("quantization_config")
    if quantization is None:
        return [
            f"{head}, float: {len(_float_layers(shapes, {}))} weight layers, {_parameters(shapes)} parameters"
        ]
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "diffquant":
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        return [f"{head}, quantized by {method!r} (not diffquant; formats not read)"]
    return [head, *_describe_diffquant(folder, quantization, shapes)]


def _describe_diffquant(
    folder: Path, quantization: dict[str, Any], shapes: dict[str, list[int]]
) -> list[str]:
    try:
        config = QuantConfig.from_dict(quantization["quant_config"])
        layers = quantization["layers"]
        weights = Counter(_weight_format(meta["weight"]) for meta in layers.values())
        inputs = Counter(_input_format(meta.get("input_quant")) for meta in layers.values())
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(
            f"{folder / 'config.json'}: its diffquant quantization_config is incomplete or invalid ({err!r}); "
            "re-save the quantized model with save_pretrained."
        ) from err
    kept = _float_layers(shapes, layers)
    shown = ", ".join(kept[:_SHOWN]) + (" ..." if len(kept) > _SHOWN else "")
    return [
        f"  quantized by diffquant as {config.label} (weight method {config.weights.method}), "
        f"dtype {quantization.get('compute_dtype') or 'float32'}",
        f"  {len(layers)} quantized layers: weights {_counts(weights)}; activations {_counts(inputs)}",
        f"  {len(kept)} kept in float" + (f": {shown}" if kept else ""),
    ]


def _weight_format(meta: dict[str, Any]) -> str:
    return "nf4" if meta["format"] == "nf4" else f"int{meta['bits']}"


def _input_format(meta: dict[str, Any] | None) -> str:
    if meta is None:
        return "none"
    config = meta["config"]
    return f"int{config['bits']}-{config['mode']}"


def _counts(counter: Counter) -> str:
    return ", ".join(f"{key} ×{n}" for key, n in sorted(counter.items()))


def _float_layers(shapes: dict[str, list[int]], quantized: dict[str, Any]) -> list[str]:
    """Layers stored with a float 2-D (Linear, embedding) or 4-D (Conv2d) ``weight``, not quantized."""
    names = [key.removesuffix(".weight") for key, shape in shapes.items() if key.endswith(".weight")]
    return sorted(n for n in names if len(shapes[n + ".weight"]) in (2, 4) and n not in quantized)


def _parameters(shapes: dict[str, list[int]]) -> str:
    total = 0
    for shape in shapes.values():
        count = 1
        for dim in shape:
            count *= dim
        total += count
    return f"{total / 1e6:.2f} M" if total >= 1e5 else str(total)


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _describe_checkpoint(path: Path) -> str:
    from diffquant.io import read_checkpoint_description

    description = read_checkpoint_description(path)
    config = QuantConfig.from_dict(description["quant_config"])
    lines = [
        f"{description['architecture']} quantized as {config.label} ({len(description['layers'])} layers), "
        f"diffquant checkpoint {path} ({_size(folder_size(path))})",
        config.to_json(),
        _kernel_summary(path),
    ]
    return "\n".join(lines)


def _kernel_summary(checkpoint: Path) -> str:
    """Which execution path the checkpoint's layers take on this machine, after one example call."""
    import torch

    from diffquant.io import load_quantized
    from diffquant.models.tiny import example_inputs, scheduler_for_tests
    from diffquant.nn.kernel_report import kernel_report

    model = load_quantized(checkpoint, schedule=scheduler_for_tests())
    note = ""
    try:
        with torch.no_grad():
            model(**example_inputs(model, batch_size=2))
    except (TypeError, RuntimeError) as err:  # no example inputs for this architecture
        note = f"\n  (paths are chosen at the first forward; could not run one here: {err})"
    return kernel_report(model).summary() + note


def cmd_info(args: argparse.Namespace) -> int:
    """Print the summary of one folder."""
    print(describe_folder(args.path))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``info`` to the ``diffquant`` subcommands."""
    info = sub.add_parser(
        "info",
        help="summarize a folder: diffquant checkpoint, (quantized) pipeline or model folder",
        description=__doc__,
    )
    info.add_argument("path", help="a pipeline, model or diffquant checkpoint folder")
    info.set_defaults(func=cmd_info)
