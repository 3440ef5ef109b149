"""Test helpers: rewrite a checkpoint file with edited metadata or tensors, keeping or fixing its checksum."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from diffquant.safefile import CHECKSUM_KEY, checksum, read_safetensors


def rewrite(
    file: Path,
    *,
    metadata: Callable[[dict[str, str]], None] | None = None,
    tensors: Callable[[dict[str, Tensor]], None] | None = None,
    recompute_checksum: bool = True,
) -> None:
    """Apply the in-place edits to the file's metadata / tensors and write it back (a forger's re-save
    when ``recompute_checksum``; a plain edit otherwise)."""
    meta, data = read_safetensors(Path(file))
    data = {k: v.clone() for k, v in data.items()}
    if metadata is not None:
        metadata(meta)
    if tensors is not None:
        tensors(data)
    if recompute_checksum:
        meta[CHECKSUM_KEY] = checksum(meta, data)
    save_file(data, str(file), metadata=meta)


def edit_json(key: str, edit: Callable[[dict], None]) -> Callable[[dict[str, str]], None]:
    """A metadata edit that parses the JSON entry ``key``, applies ``edit`` and stores it back."""

    def apply(meta: dict[str, str]) -> None:
        value = json.loads(meta[key])
        edit(value)
        meta[key] = json.dumps(value)

    return apply
