"""Save and load quantized models: packed safetensors + a versioned JSON description.

A checkpoint directory holds

- ``diffquant_model.safetensors``: the full state dict of the quantized model (packed codes, scales,
  calibrated activation ranges, and the float layers that were kept);
- ``diffquant_config.json``: format version, architecture name, the model's own config when it has
  one (diffusers models), the :class:`~diffquant.config.QuantConfig`, each quantized layer's
  description, and the SHA-256 of the tensor file.

Loading rebuilds the quantized layers from the description and loads the tensors — no
re-quantization, bit-identical outputs. Nothing is ever unpickled; every file is written to a
temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from diffquant import __version__
from diffquant.api import attach_default_noise_context, notify_quantized, quantized_layers
from diffquant.config import QuantConfig
from diffquant.nn.qmodules import _QuantLayer, quant_layer_class

FORMAT_NAME = "diffquant"
FORMAT_VERSION = 1
WEIGHTS_NAME = "diffquant_model.safetensors"
CONFIG_NAME = "diffquant_config.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, of another version, or for another architecture."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _model_config(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)  # diffusers ConfigMixin models expose a FrozenDict config
    if config is None or not hasattr(model, "from_config"):
        return None
    # a diffusers quantization_config (and its load dtype) describes a checkpoint, not the architecture
    skip = ("quantization_config", "_pre_quantization_dtype")
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in skip}, default=str))


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Save a model quantized by :func:`diffquant.quantize_` to ``directory`` (created if needed).

    Returns:
        The directory path.

    Raises:
        ValueError: if ``model`` is not quantized, or ``directory`` is an existing file.
    """
    config: QuantConfig | None = getattr(model, "diffquant_config", None)
    if config is None:
        raise ValueError(
            "model is not quantized by diffquant; call diffquant.quantize_(model, config) first."
        )
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is an existing file; choose a directory path for the checkpoint.")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{WEIGHTS_NAME}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT_NAME})
        digest = _sha256(Path(tmp))
        os.replace(tmp, directory / WEIGHTS_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    description = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "diffquant_version": __version__,
        "architecture": type(model).__name__,
        "model_config": _model_config(model),
        "quant_config": config.to_dict(),
        "layers": {name: layer.meta() for name, layer in quantized_layers(model).items()},
        "weights_sha256": digest,
    }
    atomic_write_text(directory / CONFIG_NAME, json.dumps(description, indent=2, sort_keys=True))
    return directory


def _read_description(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a diffquant checkpoint: {CONFIG_NAME} is missing.")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt ({err}); re-save the checkpoint.") from err
    if not isinstance(description, dict) or description.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a diffquant checkpoint description.")
    version = description.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format version {version!r} is not supported (this diffquant reads version "
            f"{FORMAT_VERSION}); re-quantize with this version or install the matching diffquant."
        )
    return description


def _build_model(description: dict[str, Any]) -> nn.Module:
    arch, model_config = description["architecture"], description.get("model_config")
    import diffusers  # optional dependency, needed only to rebuild a diffusers model from its config

    cls = getattr(diffusers, arch, None)
    if model_config is None or cls is None or not hasattr(cls, "from_config"):
        raise CheckpointError(
            f"cannot rebuild a {arch} by itself; pass the float model: load_quantized(path, model=...)."
        )
    return cls.from_config(model_config)


def _swap_in_quantized_layers(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    for name, meta in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise CheckpointError(
                f"checkpoint layer {name!r} does not exist in {type(model).__name__}: the checkpoint is "
                "for a different architecture or model configuration."
            ) from err
        qcls = quant_layer_class(module)
        expected = list(meta["weight"]["shape"])
        if qcls is None or qcls.kind != meta["kind"] or list(module.weight.shape) != expected:
            found = list(module.weight.shape) if hasattr(module, "weight") else None
            raise CheckpointError(
                f"checkpoint layer {name!r} is a {meta['kind']} with weight {expected}, but the model has "
                f"{type(module).__name__} with weight {found}: different architecture or configuration."
            )
        model.set_submodule(name, _QuantLayer.from_meta(meta))


def load_quantized(
    directory: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    device: str | torch.device = "cpu",
    schedule: Any = None,
) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized`, without re-quantizing.

    Args:
        directory: the checkpoint directory.
        model: the float model (same architecture and configuration) to quantize in place; may be
            omitted for diffusers models, which are rebuilt from the saved config.
        device: where to put the loaded model.
        schedule: scheduler for the noise-level context (see :func:`diffquant.quantize_`).

    Raises:
        CheckpointError: missing / corrupt / truncated files, another format version, another
            architecture, missing or unexpected tensors.
    """
    directory = Path(directory)
    description = _read_description(directory)
    if model is None:
        model = _build_model(description)
    elif type(model).__name__ != description["architecture"]:
        raise CheckpointError(
            f"checkpoint is for a {description['architecture']}, but a {type(model).__name__} was given."
        )
    if getattr(model, "diffquant_config", None) is not None:
        raise CheckpointError("model is already quantized; pass the float model to load_quantized.")
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; the checkpoint is incomplete.")
    if _sha256(weights) != description.get("weights_sha256"):
        raise CheckpointError(
            f"{weights} is corrupt or truncated (checksum mismatch); re-save the checkpoint."
        )
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights} cannot be read ({err}); re-save the checkpoint.") from err
    _swap_in_quantized_layers(model, description["layers"])
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not fit {type(model).__name__}: missing keys {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}. Is it for another model configuration?"
        )
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"tensor {key!r} has shape {list(tensor.shape)} in the checkpoint but {list(expected[key].shape)} "
                "in the model: different model configuration."
            )
    model.load_state_dict(tensors, strict=True)
    model.diffquant_config = QuantConfig.from_dict(description["quant_config"])
    model.to(device)
    attach_default_noise_context(model, schedule)
    notify_quantized(
        model
    )  # e.g. diffusers models get marked so save_pretrained writes a quantized checkpoint
    return model
