"""Save and load TuneQDM's trained scales: one safetensors file, config and fingerprint in its metadata.

The file holds only the trainable tensors, ``<layer>.delta_out`` and ``<layer>.delta_in``
(``(num_experts, C)`` each); the frozen INT weights are re-made from the pretrained model by
`quantize_model`. Its safetensors metadata holds the `TuneQDMConfig`, an architecture fingerprint (class
name, and kind and weight shape of every TuneQDM layer) and the SHA-256 of the tensors, so loading into
a model of another configuration or architecture, or from a damaged file, fails with the reason.
Files are written atomically; nothing is ever unpickled.

Inference from a checkpoint (the seed's flow)::

    config = load_delta_config("dog.safetensors")
    quantize_model(pipe.unet, config)
    load_delta_state(pipe.unet, "dog.safetensors")
    register_tas_pre_hook(pipe.unet, config.num_experts, num_inference_steps=50)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from diffquant.io import CheckpointError, atomic_write_bytes
from diffquant.tuneqdm.apply import tuneqdm_config, tuneqdm_layers
from diffquant.tuneqdm.config import TuneQDMConfig

__all__ = ["DELTA_FILE_NAME", "load_delta_config", "load_delta_state", "save_delta_state"]

FORMAT = "diffquant.tuneqdm"
FORMAT_VERSION = "1"
DELTA_FILE_NAME = "tuneqdm_deltas.safetensors"
"""File name used when a checkpoint path is an existing directory."""


def _file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / DELTA_FILE_NAME if path.is_dir() else path


def _delta_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The trainable tensors by state-dict key (``<layer>.delta_out`` / ``<layer>.delta_in``)."""
    return {
        f"{name}.{attr}" if name else attr: getattr(layer, attr)
        for name, layer in tuneqdm_layers(model).items()
        for attr in ("delta_out", "delta_in")
        if getattr(layer, attr) is not None
    }


def _fingerprint(model: nn.Module) -> dict[str, Any]:
    return {
        "architecture": type(model).__name__,
        "layers": {name: layer.fingerprint() for name, layer in tuneqdm_layers(model).items()},
    }


def _sha256(tensors: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        digest.update(f"{key}:{t.dtype}:{list(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _config_differences(saved: TuneQDMConfig, model: TuneQDMConfig) -> str:
    a, b = saved.to_dict(), model.to_dict()
    return ", ".join(f"{k}: checkpoint {a[k]!r}, model {b[k]!r}" for k in a if a[k] != b[k])


def save_delta_state(model: nn.Module, path: str | os.PathLike, config: TuneQDMConfig | None = None) -> Path:
    """Write the trained TuneQDM scales of ``model`` to one safetensors file.

    Args:
        model: The model prepared by `apply_tuneqdm`.
        path: The file (``.safetensors`` recommended; parent folders are created), or an existing
            directory, which gets a `DELTA_FILE_NAME` file.
        config: The `TuneQDMConfig` used (optional; checked against the model's layers).

    Returns:
        The path of the written file.

    Raises:
        ValueError: the model has no TuneQDM layers, or ``config`` differs from theirs.
    """
    model_config = tuneqdm_config(model)
    if config is not None and config != model_config:
        raise ValueError(
            f"config differs from the one the model's TuneQDM layers were built with "
            f"({_config_differences(config, model_config)}); pass the config given to apply_tuneqdm."
        )
    tensors = {k: v.detach().contiguous().cpu() for k, v in _delta_tensors(model).items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model_config.to_json(),
        "fingerprint": json.dumps(_fingerprint(model), sort_keys=True),
        "tensors_sha256": _sha256(tensors),
    }
    file = _file(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(file, safetensors_bytes(tensors, metadata))
    return file


def _read(path: str | os.PathLike) -> tuple[TuneQDMConfig, dict[str, Any], dict[str, Tensor]]:
    """(config, fingerprint, tensors) of a checkpoint, every part validated."""
    file = _file(path)
    if not file.is_file():
        raise CheckpointError(f"{file} does not exist; pass the path save_delta_state returned.")
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file} is not a readable safetensors file ({err}); re-save it.") from err
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a TuneQDM delta checkpoint (no {FORMAT!r} metadata).")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{file} has TuneQDM checkpoint version {metadata.get('format_version')!r}; this diffquant reads "
            f"version {FORMAT_VERSION}. Install the diffquant that wrote it."
        )
    if metadata.get("tensors_sha256") != _sha256(tensors):
        raise CheckpointError(f"{file} is corrupt: its tensors do not match their checksum; re-save it.")
    try:
        config = TuneQDMConfig.from_json(metadata["config"])
        fingerprint = json.loads(metadata["fingerprint"])
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{file} has corrupt metadata ({err}); re-save it.") from err
    return config, fingerprint, tensors


def load_delta_config(path: str | os.PathLike) -> TuneQDMConfig:
    """The `TuneQDMConfig` stored in a checkpoint (to build the model with `quantize_model`).

    Raises:
        CheckpointError: a missing, corrupt or foreign file.
    """
    return _read(path)[0]


def _check_fingerprint(saved: dict[str, Any], model: dict[str, Any]) -> None:
    if saved.get("architecture") != model["architecture"]:
        raise CheckpointError(
            f"the checkpoint is for a {saved.get('architecture')}, but the model is a {model['architecture']}."
        )
    saved_layers, model_layers = saved.get("layers", {}), model["layers"]
    missing = [n for n in saved_layers if n not in model_layers]
    extra = [n for n in model_layers if n not in saved_layers]
    if missing or extra:
        raise CheckpointError(
            f"different architecture: checkpoint layers missing from the model {missing[:5]}, model layers "
            f"not in the checkpoint {extra[:5]}. Load into the model the scales were trained on."
        )
    for name, facts in saved_layers.items():
        if facts != model_layers[name]:
            raise CheckpointError(
                f"different architecture: layer {name!r} is {facts} in the checkpoint but "
                f"{model_layers[name]} in the model."
            )


def load_delta_state(model: nn.Module, path: str | os.PathLike) -> None:
    """Load scales written by `save_delta_state` into ``model``'s TuneQDM layers, in place.

    The model must have been prepared with the checkpoint's config (``quantize_model(model,
    load_delta_config(path))``) from the same pretrained architecture.

    Raises:
        CheckpointError: a missing, corrupt or foreign file; a different config (names each differing
            field); a different architecture (names the layers); missing or unexpected tensors.
        ValueError: the model has no TuneQDM layers (CheckpointError is a ValueError too).
    """
    saved_config, fingerprint, tensors = _read(path)
    model_config = tuneqdm_config(model)
    if saved_config != model_config:
        differences = _config_differences(saved_config, model_config)
        raise CheckpointError(
            f"the checkpoint was trained with another TuneQDM config ({differences}); build the model with "
            "quantize_model(model, load_delta_config(path))."
        )
    _check_fingerprint(fingerprint, _fingerprint(model))
    params = _delta_tensors(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"the checkpoint's tensors do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    for key, param in params.items():
        if tensors[key].shape != param.shape:
            raise CheckpointError(
                f"tensor {key!r} is {list(tensors[key].shape)} in the checkpoint but {list(param.shape)} in "
                "the model."
            )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])
