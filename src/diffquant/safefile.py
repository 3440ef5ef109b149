"""Files that are never half-written, and safetensors files whose every byte that matters is checksummed.

- :func:`atomic_write` writes through a temporary sibling (``.<name>.<random>.tmp``), flushes it to
  disk, renames it over the target and flushes the directory: a reader (or a crash at any moment)
  sees the old file or the new one, never a mix. Temporaries left by a killed writer are removed by
  the next write of the same file (two processes writing one file at once are not supported).
- :func:`write_checked_safetensors` / :func:`read_checked_safetensors`: one safetensors file whose
  string metadata carries a SHA-256 over *all* other metadata entries and all tensors (name, dtype,
  shape, bytes), so an edit anywhere — a tensor, a config field in the metadata — is detected.
  safetensors holds no code: nothing is ever unpickled.
"""

from __future__ import annotations

import glob
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from diffquant.errors import CheckpointError

CHECKSUM_KEY = "sha256"
"""The metadata entry holding :func:`checksum`."""


def stale_temporaries(path: Path) -> list[Path]:
    """Temporaries of earlier writes of ``path`` (left behind when a writer was killed)."""
    path = Path(path)
    return [Path(p) for p in glob.glob(str(path.parent / f".{glob.escape(path.name)}.*.tmp"))]


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows): the rename is all we have
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Create or replace ``path`` atomically: ``write(tmp)`` fills a temporary sibling, then it is
    flushed to disk and renamed over ``path``. Stale temporaries of ``path`` are removed first.

    Args:
        path: the file to write (its folder must exist).
        write: writes the whole content to the path it is given.

    Returns:
        ``path``.

    Example:
        >>> atomic_write("out.txt", lambda tmp: tmp.write_text("hello"))  # doctest: +SKIP
    """
    path = Path(path)
    for stale in stale_temporaries(path):
        stale.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def checksum(metadata: dict[str, str], tensors: dict[str, Tensor]) -> str:
    """SHA-256 over every metadata entry but :data:`CHECKSUM_KEY` and every tensor (name, dtype, shape,
    bytes), in sorted order; each field is length-prefixed so no two contents share a digest input."""
    digest = hashlib.sha256()

    def field(text: str) -> None:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    for key in sorted(k for k in metadata if k != CHECKSUM_KEY):
        field(key)
        field(metadata[key])
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        field(f"{key}:{t.dtype}:{list(t.shape)}")
        data = t.reshape(-1).view(torch.uint8).numpy()  # the raw bytes, whatever the dtype
        digest.update(data.size.to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def write_checked_safetensors(
    path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str]
) -> Path:
    """Write ``tensors`` and string ``metadata`` to one safetensors file, atomically, with a checksum
    over both stored under :data:`CHECKSUM_KEY`."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    stored = {**metadata, CHECKSUM_KEY: checksum(metadata, tensors)}
    # Serialised in memory and written by us: safetensors' own save_file writes through a temporary of its
    # own (".tmpXXXXXX"), which a killed process would leave behind under a name we cannot recognise.
    data = safetensors_bytes(tensors, metadata=stored)
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """``(metadata, tensors)`` of a safetensors file, unverified.

    Raises:
        CheckpointError: the file is missing or not a readable safetensors file.
    """
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or damaged: {err}); re-save it."
        ) from err
    return metadata, tensors


def read_checked_safetensors(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """``(metadata, tensors)`` of a file written by :func:`write_checked_safetensors`, checksum verified.

    Raises:
        CheckpointError: missing, unreadable, or its checksum does not match (edited or damaged).
    """
    metadata, tensors = read_safetensors(path)
    if metadata.get(CHECKSUM_KEY) != checksum(metadata, tensors):
        raise CheckpointError(
            f"{path} fails its checksum: its tensors or metadata (configs, layer descriptions) were edited "
            "or damaged after saving; re-save the checkpoint."
        )
    return metadata, tensors
