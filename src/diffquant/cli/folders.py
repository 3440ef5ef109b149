"""What a folder on disk is (diffquant checkpoint, diffusers pipeline, diffusers model), read without
loading any weights: JSON configs and safetensors headers only, nothing unpickled."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from diffquant.io import WEIGHTS_NAME

CHECKPOINT, PIPELINE, MODEL = "diffquant checkpoint", "pipeline", "model"
_MAX_HEADER = 100 << 20  # a safetensors header larger than this is not one


def folder_kind(path: str | os.PathLike) -> str:
    """``CHECKPOINT`` (``save_quantized``), ``PIPELINE`` (``model_index.json``) or ``MODEL``
    (``config.json`` naming a class).

    Raises:
        ValueError: if ``path`` is missing, a file, or none of the three (the message says what was looked for).
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} is missing: no such folder.")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; give a folder (a pipeline, a model or a diffquant checkpoint).")
    if (path / WEIGHTS_NAME).is_file():
        return CHECKPOINT
    if (path / "model_index.json").is_file():
        return PIPELINE
    if "_class_name" in read_json(path / "config.json", missing_ok=True):
        return MODEL
    raise ValueError(
        f"{path} has no config.json or model_index.json and no {WEIGHTS_NAME}: it is not a diffusers pipeline "
        "folder (pipe.save_pretrained), a diffusers model folder (model.save_pretrained) or a diffquant "
        "checkpoint (diffquant.save_quantized). Give one of those."
    )


def read_json(file: Path, *, missing_ok: bool = False) -> dict[str, Any]:
    """The JSON object in ``file`` (``{}`` when missing and ``missing_ok``).

    Raises:
        ValueError: unreadable or not a JSON object (the message names the file).
    """
    if missing_ok and not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not readable JSON ({err}); re-save the folder.") from err
    if not isinstance(data, dict):
        raise ValueError(f"{file} holds a JSON {type(data).__name__}, not an object; re-save the folder.")
    return data


def pipeline_components(path: Path) -> dict[str, tuple[str, str]]:
    """``{component: (library, class name)}`` from ``model_index.json`` (entries set to ``null`` skipped)."""
    index = read_json(path / "model_index.json")
    return {
        name: (entry[0], entry[1])
        for name, entry in index.items()
        if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2 and all(entry)
    }


def folder_size(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def safetensors_shapes(folder: Path) -> dict[str, list[int]]:
    """``{tensor name: shape}`` of every ``*.safetensors`` file in ``folder``, from the headers alone.

    Raises:
        ValueError: a file whose header is not safetensors (the message names it).
    """
    shapes: dict[str, list[int]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            try:
                if not 0 < size <= _MAX_HEADER:
                    raise ValueError(f"header length {size}")
                header = json.loads(handle.read(size))
            except (ValueError, UnicodeDecodeError) as err:
                raise ValueError(f"{file} is not a safetensors file ({err}); re-save the model.") from err
        shapes.update(
            {k: v["shape"] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
        )
    return shapes
