"""Checkpoint file mechanics: earlier formats still load (with a warning), atomic writes clean up."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diffquant import CheckpointError
from diffquant.safefile import atomic_write, read_safetensors, stale_temporaries
from diffquant.tuneqdm import TuneQDMConfig, apply_tuneqdm, load_delta_state, save_delta_state
from diffquant.tuneqdm.checkpoint import _legacy_sha256


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 8))


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_format_1_delta_files_load_with_a_warning(tmp_path):
    config = TuneQDMConfig(n_bits=4, train_delta_in=True)
    model = apply_tuneqdm(_mlp(), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.25)
    path = save_delta_state(model, tmp_path / "new.safetensors")
    meta, tensors = read_safetensors(path)
    legacy = {k: meta[k] for k in ("format", "config", "fingerprint")}
    legacy.update(format_version="1", tensors_sha256=_legacy_sha256(tensors))
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=legacy)
    fresh = apply_tuneqdm(_mlp(), config)
    with pytest.warns(UserWarning, match="format-1 TuneQDM checkpoint"):
        load_delta_state(fresh, tmp_path / "old.safetensors")
    trained = [p for p in model.parameters() if p.requires_grad]
    loaded = [p for p in fresh.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(trained, loaded, strict=True))
    legacy["config"] = json.dumps({**json.loads(legacy["config"]), "bits": 8})  # format 1: config unchecked,
    save_file(
        tensors, str(tmp_path / "old.safetensors"), metadata=legacy
    )  # but the model must still match it
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="bits: checkpoint 8, model 4"):
        load_delta_state(apply_tuneqdm(_mlp(), config), tmp_path / "old.safetensors")


def test_atomic_write_removes_stale_temporaries_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    stale = tmp_path / ".file.bin.abc123.tmp"
    stale.write_bytes(b"left by a killed writer")
    other = tmp_path / ".other.bin.abc123.tmp"
    other.write_bytes(b"not ours")

    def failing(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old" and not stale.exists() and other.exists()
    atomic_write(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new" and stale_temporaries(target) == []
