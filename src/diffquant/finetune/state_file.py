"""Nested training state (optimizer / scheduler ``state_dict()``, RNG states, loop counters) as one
checksummed safetensors file: tensors as tensors, everything else as JSON in the file's metadata.

A state is any nesting of dicts, lists, tuples, tensors, numbers, strings, booleans and ``None``, the
shape of PyTorch's ``state_dict()``. :func:`encode_state` replaces each tensor by a reference to a named
tensor and tags what JSON cannot say on its own (tuples, dicts with non-string keys such as an
optimizer's parameter indices, non-finite floats), so :func:`decode_state` rebuilds an equal structure
— bit-identical tensors, ints still ints, tuples still tuples. Nothing is ever pickled: the file holds
tensors and JSON only, written atomically with a SHA-256 over both (:mod:`diffquant.safefile`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from diffquant.errors import CheckpointError
from diffquant.safefile import read_checked_safetensors, write_checked_safetensors

FORMAT = "diffquant.training"
FORMAT_VERSION = "1"
_TAGS = ("__tensor__", "__tuple__", "__items__", "__float__")


def encode_state(state: Any, tensors: dict[str, Tensor], path: str = "") -> Any:
    """A JSON-ready copy of ``state`` whose tensors are moved into ``tensors`` (keyed by their path).

    Raises:
        TypeError: a value that is neither a tensor nor plain data (names its path), e.g. a function.
    """
    if isinstance(state, Tensor):
        tensors[path] = state.detach().cpu().clone()  # clone: no two stored tensors share memory
        return {"__tensor__": path}
    if isinstance(state, bool) or state is None or isinstance(state, int | str):
        return state
    if isinstance(state, float):
        return state if math.isfinite(state) else {"__float__": repr(state)}
    if isinstance(state, tuple | list):
        items = [encode_state(v, tensors, f"{path}/{i}") for i, v in enumerate(state)]
        return {"__tuple__": items} if isinstance(state, tuple) else items
    if isinstance(state, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in state):
            return {k: encode_state(v, tensors, f"{path}/{k}") for k, v in state.items()}
        return {
            "__items__": [
                [encode_state(k, tensors, f"{path}/key{i}"), encode_state(v, tensors, f"{path}/{k}")]
                for i, (k, v) in enumerate(state.items())
            ]
        }
    raise TypeError(
        f"training state entry {path or '/'!r} is a {type(state).__name__}; a checkpoint holds tensors and "
        "plain data only (numbers, strings, lists, dicts)."
    )


def decode_state(encoded: Any, tensors: dict[str, Tensor]) -> Any:
    """The inverse of :func:`encode_state`.

    Raises:
        KeyError: a tensor reference that ``tensors`` lacks.
    """
    if isinstance(encoded, list):
        return [decode_state(v, tensors) for v in encoded]
    if not isinstance(encoded, dict):
        return encoded
    if set(encoded) == {"__tensor__"}:
        return tensors[encoded["__tensor__"]]
    if set(encoded) == {"__tuple__"}:
        return tuple(decode_state(v, tensors) for v in encoded["__tuple__"])
    if set(encoded) == {"__items__"}:
        return {decode_state(k, tensors): decode_state(v, tensors) for k, v in encoded["__items__"]}
    if set(encoded) == {"__float__"}:
        return float(encoded["__float__"])
    return {k: decode_state(v, tensors) for k, v in encoded.items()}


def write_state_file(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to one safetensors file at ``path``, atomically, checksummed.

    Raises:
        TypeError: ``state`` holds something other than tensors and plain data.
    """
    tensors: dict[str, Tensor] = {}
    document = json.dumps(encode_state(state, tensors), sort_keys=True)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "state": document}
    return write_checked_safetensors(path, tensors, metadata)


def read_state_file(path: str | os.PathLike) -> dict[str, Any]:
    """The state written by :func:`write_state_file`, checksum verified.

    Raises:
        CheckpointError: missing, unreadable, edited or damaged, or not a training checkpoint.
    """
    path = Path(path)
    metadata, tensors = read_checked_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a diffquant training checkpoint (no {FORMAT!r} metadata).")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is a training checkpoint of version {metadata.get('format_version')!r}; this diffquant "
            f"reads version {FORMAT_VERSION}. Resume with the diffquant that wrote it."
        )
    try:
        state = decode_state(json.loads(metadata["state"]), tensors)
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path} has a corrupt training state ({err!r}); delete it.") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} has a corrupt training state (not an object); delete it.")
    return state
