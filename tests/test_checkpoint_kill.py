"""A process saving checkpoints over an existing one is SIGKILLed at random moments: after every kill
the checkpoint still loads as the old or the new model, and the next save leaves no temporaries."""

from __future__ import annotations

import copy
import os
import random
import signal
import sys
import time

import pytest
import torch
from torch import nn

from diffquant import QuantConfig, WeightQuantConfig, load_quantized, quantize_, save_quantized
from diffquant.io import WEIGHTS_NAME
from diffquant.tuneqdm import TuneQDMConfig, apply_tuneqdm, load_delta_state, save_delta_state

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs fork")

KILLS = 12
X = torch.randn(2, 256, generator=torch.Generator().manual_seed(0))


def _float_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 512), nn.SiLU(), nn.Linear(512, 512), nn.SiLU(), nn.Linear(512, 64))


def _quantized(seed: int) -> nn.Module:
    model = _float_model(seed)
    return quantize_(
        model, QuantConfig(weights=WeightQuantConfig(bits=4, granularity="group", group_size=32))
    )


def _save_forever(save) -> None:
    """Child process: save alternately model 1 and model 2 until killed."""
    try:
        for i in range(1_000_000):
            save(i % 2)
    finally:
        os._exit(0)


def _kill_at_random_moments(save, check, rng) -> None:
    for _ in range(KILLS):
        pid = os.fork()
        if pid == 0:
            _save_forever(save)
        time.sleep(rng.uniform(0.01, 0.25))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        check()


def test_killed_quantized_saves_never_lose_the_checkpoint(tmp_path):
    models = [_quantized(1), _quantized(2)]
    with torch.no_grad():
        outputs = [m(X) for m in models]
    target = tmp_path / "ckpt"
    save_quantized(models[0], target)

    def check():
        loaded = load_quantized(target, model=_float_model(0))
        with torch.no_grad():
            y = loaded(X)
        assert any(torch.equal(y, o) for o in outputs), "the checkpoint is neither the old nor the new model"

    _kill_at_random_moments(lambda i: save_quantized(models[i], target), check, random.Random(0))
    save_quantized(models[1], target)
    assert sorted(p.name for p in target.iterdir()) == [WEIGHTS_NAME], "temporaries were left behind"


def test_killed_delta_saves_never_lose_the_checkpoint(tmp_path):
    config = TuneQDMConfig(n_bits=4, train_delta_in=True)
    models = [apply_tuneqdm(_float_model(3), config) for _ in range(2)]
    with torch.no_grad():
        for p in models[1].parameters():
            if p.requires_grad:
                p.mul_(1.5)
    target = tmp_path / "d.safetensors"
    save_delta_state(models[0], target)
    deltas = [[p.detach().clone() for p in m.parameters() if p.requires_grad] for m in models]

    def check():
        fresh = apply_tuneqdm(_float_model(3), config)
        load_delta_state(fresh, target)
        loaded = [p for p in fresh.parameters() if p.requires_grad]
        assert any(all(torch.equal(a, b) for a, b in zip(loaded, d, strict=True)) for d in deltas)

    _kill_at_random_moments(lambda i: save_delta_state(models[i], target), check, random.Random(1))
    save_delta_state(models[0], target)
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"], "temporaries were left behind"


def test_a_failing_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = _quantized(1)
    save_quantized(model, tmp_path)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()
    import diffquant.safefile as safefile

    def broken(path, write):
        write(path)  # the real writer, then a failure before the rename
        raise OSError("disk full")

    real = safefile.atomic_write
    monkeypatch.setattr(
        safefile, "atomic_write", lambda path, write: real(path, lambda tmp: broken(tmp, write))
    )
    with pytest.raises(OSError, match="disk full"):
        save_quantized(copy.deepcopy(model), tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_NAME]
