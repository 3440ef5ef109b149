"""Training state files: nested state round-trips exactly (tensors, tuples, int keys, non-finite floats),
edits are refused, what cannot be stored is named; the checkpoint options refuse bad values."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffquant.errors import CheckpointError
from diffquant.finetune import fit_denoiser
from diffquant.finetune.resume import TrainingCheckpoints, checkpoint_files, rng_state, set_rng_state
from diffquant.finetune.state_file import read_state_file, write_state_file
from diffquant.safefile import write_checked_safetensors


def test_nested_state_round_trips_exactly(tmp_path):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))])
    opt.param_groups[0]["params"][0].sum().backward()
    opt.step()
    state = {
        "optimizer": opt.state_dict(),  # int keys, tuples (betas), 0-d step tensors, None
        "odd": {"inf": math.inf, "nan": [math.nan], 3: (1, "a", None, True)},
        "ints": torch.arange(5, dtype=torch.uint8),
        "__tensor__": "a key that looks like a tag",
    }
    path = write_state_file(tmp_path / "s.safetensors", state)
    back = read_state_file(path)
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]  # betas still a tuple
    saved, loaded = state["optimizer"]["state"][0], back["optimizer"]["state"][0]
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert back["odd"]["inf"] == math.inf and math.isnan(back["odd"]["nan"][0])
    assert back["odd"][3] == (1, "a", None, True) and back["__tensor__"] == state["__tensor__"]
    assert back["ints"].dtype == torch.uint8 and torch.equal(back["ints"], state["ints"])


def test_unstorable_edited_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(TypeError, match="'/fn' is a function"):
        write_state_file(tmp_path / "s.safetensors", {"fn": lambda: 0})
    path = write_state_file(tmp_path / "s.safetensors", {"step": 3})
    data = path.read_bytes().replace(b'\\"step\\": 3', b'\\"step\\": 4')
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="checksum"):
        read_state_file(path)
    write_checked_safetensors(path, {}, {"format": "other", "state": json.dumps({})})
    with pytest.raises(CheckpointError, match="not a diffquant training checkpoint"):
        read_state_file(path)


def test_rng_states_restore():
    import random

    import numpy as np

    state = rng_state()
    a = (torch.rand(2), random.random(), np.random.rand())
    set_rng_state(state)
    assert (torch.equal(torch.rand(2), a[0]), random.random(), np.random.rand()) == (True, a[1], a[2])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"every": 0}, "every must be a positive integer"),
        ({"every": 2.5}, "every must be a positive integer"),
        ({"every": 1, "keep_last": 0}, "keep_last must be a positive integer"),
        ({"every": 1, "resume": 3}, "resume must be True"),
    ],
)
def test_checkpoint_options_refuse_bad_values(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        TrainingCheckpoints(tmp_path, **fields)


def test_a_loop_without_optimizer_needs_method_state(tmp_path):
    model = torch.nn.Conv2d(1, 1, 1)
    with pytest.raises(ValueError, match="pass method_state"):
        fit_denoiser(model, None, torch.zeros(2, 1, 4, 4), None, None, steps=2,
                     checkpoint=TrainingCheckpoints(tmp_path, every=1))  # fmt: skip
    assert checkpoint_files(tmp_path) == []
