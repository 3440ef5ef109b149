"""Save and load quantized models: one checksummed safetensors file per checkpoint.

A checkpoint directory holds one file, ``diffquant_model.safetensors``:

- its tensors are the full state dict of the quantized model (packed codes, scales, calibrated
  activation ranges, and the float layers that were kept);
- its string metadata holds the format version and a JSON ``description``: architecture name, the
  model's own config (diffusers models), the :class:`~diffquant.config.QuantConfig` and each
  quantized layer's description — plus a SHA-256 over the description and every tensor.

Guarantees: a save replaces the file atomically (temporary sibling, fsync, rename), so a crash leaves
the old checkpoint or the new one; loading verifies the checksum (any edit of a tensor or of the
description is refused), then checks every description field against the model and every loaded
value (finite, positive scales, codes in range) before the caller's model is touched — a failed load
leaves it as it was. Nothing is ever unpickled. Checkpoints of format 1 (``diffquant_config.json``
beside the tensors, only the tensors checksummed) still load, with a warning.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffquant._version import __version__
from diffquant.api import attach_default_noise_context, notify_quantized, quantized_layers
from diffquant.config import QuantConfig
from diffquant.devices import check_device
from diffquant.errors import CheckpointError
from diffquant.nn.load_checks import build_quant_layer, check_layer_values
from diffquant.nn.qmodules import _QuantLayer
from diffquant.safefile import atomic_write, checksum, read_safetensors, write_checked_safetensors

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_quantized",
    "read_checkpoint_description",
    "save_quantized",
]

FORMAT_NAME = "diffquant"
FORMAT_VERSION = 2
WEIGHTS_NAME = "diffquant_model.safetensors"
CONFIG_NAME = "diffquant_config.json"
"""The separate description file of format 1 (read for compatibility, removed by the next save)."""
DESCRIPTION_FIELDS = {"architecture", "model_config", "quant_config", "layers"}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync and a rename."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _model_config(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)  # diffusers ConfigMixin models expose a FrozenDict config
    if config is None or not hasattr(model, "from_config"):
        return None
    # a diffusers quantization_config (and its load dtype) describes a checkpoint, not the architecture
    skip = ("quantization_config", "_pre_quantization_dtype")
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in skip}, default=str))


def _refuse_non_finite(model: nn.Module, state: dict[str, Tensor]) -> None:
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(
                f"tensor {key!r} contains NaN/Inf; refusing to save a model that cannot produce finite "
                "outputs. Fix or re-quantize that layer first."
            )
    for name, layer in quantized_layers(model).items():
        try:
            check_layer_values(layer)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err} Refusing to save it; re-quantize the model.") from err


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Save a model quantized by :func:`diffquant.quantize_` to ``directory`` (created if needed).

    The directory gets one file, written atomically: if the process dies mid-save, the directory still
    holds the previous checkpoint (or none); temporaries of killed saves are removed by the next save.

    Returns:
        The directory path.

    Raises:
        ValueError: if ``model`` is not quantized, holds NaN/Inf or impossible quantization values
            (the message names the tensor), or ``directory`` is an existing file.

    Example:
        >>> diffquant.save_quantized(unet, "unet-w4")  # doctest: +SKIP
    """
    config: QuantConfig | None = getattr(model, "diffquant_config", None)
    if config is None:
        raise ValueError(
            "model is not quantized by diffquant; call diffquant.quantize_(model, config) first."
        )
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is an existing file; choose a directory path for the checkpoint.")
    state = model.state_dict()
    _refuse_non_finite(model, state)
    description = {
        "architecture": type(model).__name__,
        "model_config": _model_config(model),
        "quant_config": config.to_dict(),
        "layers": {name: layer.meta() for name, layer in quantized_layers(model).items()},
    }
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "diffquant_version": __version__,
        "description": json.dumps(description, sort_keys=True, allow_nan=False),
    }
    directory.mkdir(parents=True, exist_ok=True)
    write_checked_safetensors(directory / WEIGHTS_NAME, state, metadata)
    (directory / CONFIG_NAME).unlink(missing_ok=True)  # a format-1 description, stale now
    return directory


def _legacy_description(directory: Path, weights: Path) -> dict[str, Any]:
    """The description of a format-1 checkpoint (JSON beside the tensors, tensors checksummed)."""
    import hashlib

    path = directory / CONFIG_NAME
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is missing or corrupt ({err}); re-save the checkpoint.") from err
    if not isinstance(description, dict) or description.get("format_version") != 1:
        raise CheckpointError(f"{path} is not a format-1 diffquant description.")
    if hashlib.sha256(weights.read_bytes()).hexdigest() != description.get("weights_sha256"):
        raise CheckpointError(
            f"{weights} is corrupt or truncated (checksum mismatch); re-save the checkpoint."
        )
    warnings.warn(
        f"{directory} is a format-1 checkpoint: its description ({CONFIG_NAME}) is not covered by a "
        "checksum. Re-save it with save_quantized to upgrade it to format 2.",
        stacklevel=3,
    )
    return {key: description.get(key) for key in DESCRIPTION_FIELDS}


def _read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(description, tensors) of a checkpoint, checksum verified and the description's types checked."""
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(
            f"{directory} is not a diffquant checkpoint: {WEIGHTS_NAME} is missing (incomplete or never saved)."
        )
    metadata, tensors = read_safetensors(weights)
    if metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{weights} is not a diffquant checkpoint (no {FORMAT_NAME!r} format metadata)."
        )
    version = metadata.get("format_version")
    if version is None and (directory / CONFIG_NAME).is_file():
        description = _legacy_description(directory, weights)
    elif version != str(FORMAT_VERSION):
        raise CheckpointError(
            f"checkpoint format version {version!r} of {weights} is not supported (this diffquant reads version "
            f"{FORMAT_VERSION}); re-quantize with this version or install the matching diffquant."
        )
    else:
        if metadata.get("sha256") != checksum(metadata, tensors):
            raise CheckpointError(
                f"{weights} fails its checksum: its tensors or its description (quant config, model config, "
                "layer descriptions) were edited or damaged after saving; re-save the checkpoint."
            )
        try:
            description = json.loads(metadata["description"])
        except (KeyError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{weights} has no readable description ({err}); re-save it.") from err
    _check_description(description, weights)
    return description, tensors


def _check_description(description: Any, file: Path) -> None:
    if not isinstance(description, dict) or set(description) != DESCRIPTION_FIELDS:
        found = sorted(description) if isinstance(description, dict) else type(description).__name__
        raise CheckpointError(
            f"{file}: the description must have fields {sorted(DESCRIPTION_FIELDS)}, got {found}."
        )
    checks = {
        "architecture": isinstance(description["architecture"], str),
        "model_config": description["model_config"] is None or isinstance(description["model_config"], dict),
        "quant_config": isinstance(description["quant_config"], dict),
        "layers": isinstance(description["layers"], dict)
        and all(isinstance(k, str) and k for k in description["layers"]),
    }
    for field, ok in checks.items():
        if not ok:
            raise CheckpointError(
                f"{file}: description field {field!r} has the wrong type ({type(description[field]).__name__}); "
                "architecture is a class name, model_config an object or null, quant_config an object, "
                "layers an object keyed by layer name."
            )


def read_checkpoint_description(directory: str | os.PathLike) -> dict[str, Any]:
    """The verified description of a checkpoint: ``architecture``, ``model_config``, ``quant_config``
    and ``layers`` (one entry per quantized layer).

    Raises:
        CheckpointError: missing, corrupt or edited checkpoint, or another format version.
    """
    return _read_checkpoint(Path(directory))[0]


def _size_on_meta_device(cls: type, model_config: dict[str, Any]) -> int | None:
    """Number of state-dict values of ``cls.from_config(model_config)``, built without allocating (None
    when the model cannot be built on the meta device; the real build then reports the problem)."""
    try:
        with torch.device("meta"):
            probe = cls.from_config(model_config)
    except Exception:  # any failure here is reported by the real build
        return None
    return sum(t.numel() for t in probe.state_dict().values())


def _build_model(description: dict[str, Any], file: Path, tensors: dict[str, Tensor]) -> nn.Module:
    arch, model_config = description["architecture"], description["model_config"]
    if model_config is None:
        raise CheckpointError(
            f"cannot rebuild a {arch} by itself; pass the float model: load_quantized(path, model=...)."
        )
    try:
        import diffusers  # optional dependency, needed only to rebuild a diffusers model from its config
    except ImportError as err:
        raise CheckpointError(
            f"rebuilding a {arch} needs diffusers (pip install diffquant[diffusers]), or pass model=..."
        ) from err
    cls = getattr(diffusers, arch, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise CheckpointError(
            f"{file}: architecture {arch!r} is not a diffusers model class; pass the float model: "
            "load_quantized(path, model=...)."
        )
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    size = _size_on_meta_device(cls, model_config)
    if size is not None and size > 8 * stored + (1 << 20):  # >= 2 bits per weight are stored: 4x is the limit
        raise CheckpointError(
            f"{file}: the saved model_config describes a {arch} of {size} parameters, but the file stores only "
            f"{stored} bytes; the description does not belong to these tensors."
        )
    try:
        model = cls.from_config(model_config).eval()  # as diffusers' from_pretrained: inference mode
    except Exception as err:  # from_config raises whatever the model's __init__ raises on bad values
        raise CheckpointError(
            f"{file}: cannot build a {arch} from the saved model_config ({type(err).__name__}: {err})."
        ) from err
    layers = tuple(f"{name}." for name in description["layers"])
    dtypes = {t.dtype for k, t in tensors.items() if t.is_floating_point() and not k.startswith(layers)}
    if len(dtypes) == 1 and (dtype := dtypes.pop()) != torch.float32:
        model = model.to(dtype)  # a model saved in half precision
    return model


def _compare(file: Path, where: str, expected: dict[str, Tensor], found: dict[str, Tensor]) -> None:
    """Same keys, shapes and dtypes (``where`` names the layer or part)."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{file}: {where} does not fit the model: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. Is it for another model "
            "configuration?"
        )
    for key, tensor in found.items():
        want = expected[key]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise CheckpointError(
                f"{file}: {where}: tensor {key!r} is {tensor.dtype} {list(tensor.shape)} in the checkpoint but "
                f"{want.dtype} {list(want.shape)} in the model: different model configuration or dtype."
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{file}: {where}: tensor {key!r} contains NaN/Inf.")


def _load_layer(
    file: Path, name: str, meta: Any, model: nn.Module, tensors: dict[str, Tensor]
) -> _QuantLayer:
    """A new quantized layer for ``model``'s layer ``name``, checked and loaded (``model`` untouched)."""
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        raise CheckpointError(
            f"{file}: checkpoint layer {name!r} does not exist in {type(model).__name__}: the checkpoint is "
            "for a different architecture or model configuration."
        ) from err
    try:
        layer = build_quant_layer(meta, module)
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{file}: layer {name!r}: {err}") from err
    prefix = f"{name}."
    own = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    bias = own.get("bias")
    if layer.bias is not None and bias is not None and bias.is_floating_point():
        layer.bias = nn.Parameter(torch.zeros_like(bias), requires_grad=False)  # the saved precision
    _compare(file, f"layer {name!r}", layer.state_dict(), own)
    layer.load_state_dict(own, strict=True)
    try:
        check_layer_values(layer)
    except ValueError as err:
        raise CheckpointError(f"{file}: layer {name!r}: {err}") from err
    return layer


def load_quantized(
    directory: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    device: str | torch.device = "cpu",
    schedule: Any = None,
) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized`, without re-quantizing.

    Everything is checked before ``model`` is changed: on any error the model is left as it was.

    Args:
        directory: the checkpoint directory.
        model: the float model (same architecture and configuration) to quantize in place; may be
            omitted for diffusers models, which are rebuilt from the saved config (in eval mode, as
            ``from_pretrained`` returns them).
        device: where to put the loaded model (checked first: asking for CUDA without CUDA fails at once).
        schedule: scheduler for the noise-level context (see :func:`diffquant.quantize_`).

    Raises:
        CheckpointError: missing / corrupt / truncated / edited files (checksum), another format
            version, another architecture, missing or unexpected tensors, or descriptions and values
            no quantizer produces (NaN/Inf, scales <= 0, codes out of range); the message names the
            file, the layer and the field.
        ValueError: a device this machine does not have.

    Example:
        >>> unet = diffquant.load_quantized("unet-w4", device="cuda")  # doctest: +SKIP
    """
    device = check_device(device)
    directory = Path(directory)
    file = directory / WEIGHTS_NAME
    description, tensors = _read_checkpoint(directory)
    try:
        quant_config = QuantConfig.from_dict(description["quant_config"])
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{file}: description field 'quant_config': {err}") from err
    if model is None:
        model = _build_model(description, file, tensors)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (the float model), got {type(model).__name__}.")
    elif type(model).__name__ != description["architecture"]:
        raise CheckpointError(
            f"checkpoint is for a {description['architecture']}, but a {type(model).__name__} was given."
        )
    if getattr(model, "diffquant_config", None) is not None:
        raise CheckpointError("model is already quantized; pass the float model to load_quantized.")
    new_layers = {
        name: _load_layer(file, name, meta, model, tensors) for name, meta in description["layers"].items()
    }
    prefixes = tuple(f"{name}." for name in new_layers)
    rest = {k: v for k, v in tensors.items() if not k.startswith(prefixes)}
    expected_rest = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    _compare(file, "the float part of the model", expected_rest, rest)
    attach_default_noise_context(model, schedule)  # may reject the schedule; nothing else changed yet
    # Every check passed: from here on nothing can fail.
    for name, layer in new_layers.items():
        model.set_submodule(name, layer)
    model.load_state_dict(rest, strict=False)
    model.diffquant_config = quant_config
    model.to(device)
    notify_quantized(
        model
    )  # e.g. diffusers models get marked so save_pretrained writes a quantized checkpoint
    return model
