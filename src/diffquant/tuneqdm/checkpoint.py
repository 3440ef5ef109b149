"""Save and load TuneQDM's trained scales: one safetensors file, config and fingerprints in its metadata.

``.safetensors`` is the recommended format. A path ending in ``.pt`` / ``.pth`` gets the seed's layout
instead, readable with plain ``torch.load(path)`` (``weights_only=True``, torch's default):
``{"delta_state": {name: tensor}, "config": {field: value}, "diffquant": {metadata strings}}`` — tensors,
strings and numbers only, so loading it unpickles nothing unsafe; ``TuneQDMConfig(**ckpt["config"])``
rebuilds the config. Both formats carry the same metadata and checksum and are verified the same way.

The file holds only the trainable tensors, ``<layer>.delta_out`` and ``<layer>.delta_in``
(``(num_experts, C)`` each); the frozen INT weights are re-made from the pretrained model by
`quantize_model`. Its safetensors metadata holds the `TuneQDMConfig`, an architecture fingerprint (class
name, and kind and weight shape of every TuneQDM layer), a fingerprint of the frozen base weights (SHA-256
of every layer's packed codes, scales, zero points and bias) and one SHA-256 over all of it and the
tensors, so an edited config or tensor, a damaged file, another configuration or architecture, or
another pretrained model (unless ``allow_different_base=True``) fails with the reason. Deltas must be
finite floating-point tensors, at save and at load. Files are written atomically; nothing is ever unpickled.

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
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffquant.errors import CheckpointError
from diffquant.safefile import atomic_write, checksum, read_safetensors, write_checked_safetensors
from diffquant.tuneqdm.apply import tuneqdm_config, tuneqdm_layers
from diffquant.tuneqdm.config import TuneQDMConfig

__all__ = ["DELTA_FILE_NAME", "load_delta_config", "load_delta_state", "save_delta_state"]

FORMAT = "diffquant.tuneqdm"
FORMAT_VERSION = "2"
LEGACY_VERSION = "1"  # only the tensors checksummed, no base fingerprint: loads with a warning
DELTA_FILE_NAME = "tuneqdm_deltas.safetensors"
"""File name used when a checkpoint path is an existing directory."""
TORCH_SUFFIXES = (".pt", ".pth")
"""File suffixes saved in the seed's ``torch.load``-able layout."""
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip container
_TORCH_LOAD_ERRORS = (
    pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError, KeyError,
    AttributeError, TypeError, IndexError,
)  # fmt: skip


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


def _base_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the frozen base: every TuneQDM layer's packed codes, scales, zero points and bias."""
    frozen = {
        f"{name}.{key}": tensor
        for name, layer in tuneqdm_layers(model).items()
        for key, tensor in layer.state_dict().items()
        if not key.startswith(("delta_out", "delta_in"))
    }
    return checksum({}, frozen)


def _check_deltas(tensors: dict[str, Tensor], where: str) -> None:
    """Deltas are finite floating-point scales (the message names the layer). Their sign is not checked:
    training is unconstrained, and a scale may legitimately cross zero."""
    for key, tensor in tensors.items():
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise ValueError(
                f"{where}: tensor {key!r} (layer {key.rsplit('.', 1)[0]!r}) is not a finite floating-point "
                "tensor; TuneQDM scales must be finite (lower the learning rate or re-train)."
            )


def _legacy_sha256(tensors: dict[str, Tensor]) -> str:
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
            directory, which gets a `DELTA_FILE_NAME` file. A ``.pt`` / ``.pth`` path gets the seed's
            layout, read by ``torch.load(path)`` as ``{"delta_state": ..., "config": ...}`` (see the
            module docstring); it is verified on load exactly as safetensors is.
        config: The `TuneQDMConfig` used (optional; checked against the model's layers).

    Returns:
        The path of the written file.

    Raises:
        ValueError: the model has no TuneQDM layers, ``config`` differs from theirs, or a delta holds
            NaN/Inf (the message names the layer).
    """
    model_config = tuneqdm_config(model)
    if config is not None and config != model_config:
        raise ValueError(
            f"config differs from the one the model's TuneQDM layers were built with "
            f"({_config_differences(config, model_config)}); pass the config given to apply_tuneqdm."
        )
    tensors = {k: v.detach().contiguous().cpu() for k, v in _delta_tensors(model).items()}
    _check_deltas(tensors, "refusing to save")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model_config.to_json(),
        "fingerprint": json.dumps(_fingerprint(model), sort_keys=True),
        "base_sha256": _base_fingerprint(model),
    }
    file = _file(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    if file.suffix in TORCH_SUFFIXES:
        payload = {
            "delta_state": tensors,
            "config": model_config.to_dict(),
            "diffquant": {**metadata, "sha256": checksum(metadata, tensors)},
        }
        return atomic_write(file, lambda tmp: torch.save(payload, tmp))
    return write_checked_safetensors(file, tensors, metadata)


def _read_file(file: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """``(metadata, tensors)`` of a safetensors or ``.pt`` delta file, unverified."""
    if not file.is_file():
        raise CheckpointError(f"{file} does not exist or is not a file.")
    with open(file, "rb") as f:
        is_torch = f.read(4) == _ZIP_MAGIC
    if not is_torch:
        return read_safetensors(file)
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)  # tensors and plain data only
    except _TORCH_LOAD_ERRORS as err:
        raise CheckpointError(
            f"{file} is not a readable torch file (truncated or damaged: {err}); re-save it."
        ) from err
    fields = payload.keys() if isinstance(payload, dict) else ()
    if set(fields) != {"delta_state", "config", "diffquant"}:
        raise CheckpointError(
            f"{file} is not a diffquant TuneQDM checkpoint: expected the keys 'delta_state', 'config' and "
            f"'diffquant', found {sorted(map(str, fields))[:5]}."
        )
    metadata, tensors = payload["diffquant"], payload["delta_state"]
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(
            f"{file} has corrupt metadata ('diffquant' must map names to strings); re-save it."
        )
    if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
        raise CheckpointError(
            f"{file} has a corrupt 'delta_state' (it must map names to tensors); re-save it."
        )
    try:
        same_config = json.loads(metadata.get("config", "null")) == payload["config"]
    except ValueError:
        same_config = False
    if not same_config:
        raise CheckpointError(
            f"{file}: its 'config' differs from the checksummed config in its metadata (edited after "
            "saving); re-save it."
        )
    return metadata, tensors


def _read(path: str | os.PathLike) -> tuple[TuneQDMConfig, dict[str, Any], str | None, dict[str, Tensor]]:
    """(config, fingerprint, base fingerprint or None for format 1, tensors), every part validated."""
    file = _file(path)
    metadata, tensors = _read_file(file)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a TuneQDM delta checkpoint (no {FORMAT!r} metadata).")
    version = metadata.get("format_version")
    if version == LEGACY_VERSION:
        if metadata.get("tensors_sha256") != _legacy_sha256(tensors):
            raise CheckpointError(f"{file} is corrupt: its tensors do not match their checksum; re-save it.")
        warnings.warn(
            f"{file} is a format-1 TuneQDM checkpoint: its config is not checksummed and the frozen base "
            "weights are not fingerprinted; re-save it with save_delta_state to upgrade it.",
            stacklevel=3,
        )
    elif version != FORMAT_VERSION:
        raise CheckpointError(
            f"{file} has TuneQDM checkpoint version {version!r}; this diffquant reads version "
            f"{FORMAT_VERSION}. Install the diffquant that wrote it."
        )
    elif metadata.get("sha256") != checksum(metadata, tensors):
        raise CheckpointError(
            f"{file} fails its checksum: its tensors or metadata (TuneQDM config, fingerprints) were edited or "
            "damaged after saving; re-save it."
        )
    try:
        config = TuneQDMConfig.from_json(metadata["config"])
        fingerprint = json.loads(metadata["fingerprint"])
        if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("layers", {}), dict):
            raise TypeError("the fingerprint must be an object with a 'layers' object")
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{file} has corrupt metadata ({err}); re-save it.") from err
    try:
        _check_deltas(tensors, str(file))
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    return config, fingerprint, metadata.get("base_sha256") if version == FORMAT_VERSION else None, tensors


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


def load_delta_state(
    model: nn.Module, path: str | os.PathLike, *, allow_different_base: bool = False
) -> None:
    """Load scales written by `save_delta_state` into ``model``'s TuneQDM layers, in place.

    The model must have been prepared with the checkpoint's config (``quantize_model(model,
    load_delta_config(path))``) from the same pretrained model: the scales were trained for those frozen
    weights, which the checkpoint fingerprints. Everything is checked before any scale is written.

    Args:
        model: the model prepared by `quantize_model` / `apply_tuneqdm`.
        path: the file, ``.safetensors`` or the seed's ``.pt`` (read with ``weights_only=True``), or a
            directory holding `DELTA_FILE_NAME`.
        allow_different_base: load even when the frozen weights differ from those the scales were
            trained on (e.g. a deliberately transferred fine-tune).

    Raises:
        CheckpointError: a missing, corrupt, edited or foreign file; a different config (names each
            differing field); a different architecture (names the layers); other frozen base weights;
            missing or unexpected tensors; NaN/Inf scales (names the layer).
        ValueError: the model has no TuneQDM layers (CheckpointError is a ValueError too).

    Example:
        >>> unet = quantize_model(unet, load_delta_config("dog.safetensors"))  # doctest: +SKIP
        >>> load_delta_state(unet, "dog.safetensors")  # doctest: +SKIP
    """
    saved_config, fingerprint, base, tensors = _read(path)
    model_config = tuneqdm_config(model)
    if saved_config != model_config:
        differences = _config_differences(saved_config, model_config)
        raise CheckpointError(
            f"the checkpoint was trained with another TuneQDM config ({differences}); build the model with "
            "quantize_model(model, load_delta_config(path))."
        )
    _check_fingerprint(fingerprint, _fingerprint(model))
    if base is not None and not allow_different_base and base != _base_fingerprint(model):
        raise CheckpointError(
            f"{_file(path)} was trained on other frozen weights: the model's packed codes/scales differ from "
            "the pretrained model the scales were fitted to. Quantize the same pretrained model, or pass "
            "allow_different_base=True to load them anyway."
        )
    params = _delta_tensors(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"the checkpoint's tensors do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    for key, param in params.items():
        if tensors[key].shape != param.shape:  # any float dtype: scales trained in fp32 serve an fp16 model
            raise CheckpointError(
                f"tensor {key!r} is {list(tensors[key].shape)} in the checkpoint but {list(param.shape)} in "
                "the model."
            )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])
