"""TuneQDM deltas saved as ``.pt``: the seed's ``torch.load(path)`` (weights only) reads
``{"delta_state", "config"}``, and ``load_delta_state`` verifies them as it does safetensors files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffquant.errors import CheckpointError
from diffquant.tuneqdm import (
    TuneQDMConfig,
    apply_tuneqdm,
    load_delta_config,
    load_delta_state,
    save_delta_state,
)

CONFIG = TuneQDMConfig(n_bits=8, num_experts=2, train_delta_in=True)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return apply_tuneqdm(nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 4)), CONFIG)


def _trained(path) -> nn.Module:
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.5)
    save_delta_state(model, path, config=CONFIG)
    return model


def test_seed_torch_load_reads_deltas_and_config(tmp_path):
    path = tmp_path / "tuneqdm_state.pt"
    model = _trained(path)
    checkpoint = torch.load(path)  # the seed's line; torch's default is weights_only=True
    assert TuneQDMConfig(**checkpoint["config"]) == CONFIG == load_delta_config(path)
    deltas = {k: v for k, v in model.state_dict().items() if k.endswith(("delta_in", "delta_out"))}
    assert checkpoint["delta_state"].keys() == deltas.keys()
    assert all(torch.equal(checkpoint["delta_state"][k], v) for k, v in deltas.items())
    fresh = _model()
    load_delta_state(fresh, path)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in deltas.items())


def _edited(path, edit) -> None:
    payload = torch.load(path)
    edit(payload)
    torch.save(payload, path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["delta_state"]["0.delta_out"].add_(1e-3), "checksum"),
        (lambda p: p["config"].update(bits=4), "differs from the checksummed config"),
        (lambda p: p["diffquant"].update(config=p["diffquant"]["config"].replace("8", "4")), "config"),
        (lambda p: p.pop("diffquant"), "expected the keys"),
        (lambda p: p["delta_state"].update({"0.delta_out": "text"}), "corrupt 'delta_state'"),
        (lambda p: p["delta_state"]["0.delta_out"].fill_(float("nan")), "checksum|finite"),
    ],
)
def test_edited_pt_files_are_refused(tmp_path, edit, message):
    path = tmp_path / "d.pt"
    _trained(path)
    _edited(path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_delta_state(_model(), path)


def test_pt_other_base_damaged_and_unsafe_files_are_refused(tmp_path):
    path = tmp_path / "d.pt"
    _trained(path)
    with pytest.raises(CheckpointError, match="other frozen weights"):
        load_delta_state(_model(seed=1), path)
    path.write_bytes(path.read_bytes()[:200])  # truncated zip
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        load_delta_state(_model(), path)

    class Exploit:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"delta_state": {}, "config": {}, "diffquant": Exploit()}, path)
    with pytest.raises(CheckpointError, match="not a readable torch file"):  # weights_only refuses it
        load_delta_state(_model(), path)
