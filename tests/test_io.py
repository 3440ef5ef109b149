import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from checkpoint_tools import edit_json, rewrite
from diffquant import (
    ActivationQuantConfig,
    CheckpointError,
    QuantConfig,
    WeightQuantConfig,
    load_quantized,
    quantize_,
    save_quantized,
)
from diffquant.io import CONFIG_NAME, WEIGHTS_NAME
from diffquant.models.tiny import example_inputs, tiny_dit, tiny_unet2d
from diffquant.safefile import read_safetensors

CONFIGS = {
    "w4-group": QuantConfig(
        weights=WeightQuantConfig(bits=4, granularity="group", group_size=8, symmetric=False)
    ),
    "nf4": QuantConfig(weights=WeightQuantConfig(format="nf4", bits=4)),
    "w8a8-static": QuantConfig(weights=WeightQuantConfig(bits=8), activations=ActivationQuantConfig(bits=8)),
    "w2a4-dynamic": QuantConfig(
        weights=WeightQuantConfig(bits=2), activations=ActivationQuantConfig(4, "dynamic")
    ),
}


def _quantized_unet(config):
    torch.manual_seed(0)
    model = tiny_unet2d().eval()
    inputs = example_inputs(model, batch_size=2)
    quantize_(model, config, calibrate=lambda m: m(**inputs))
    return model, inputs


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, inputs = _quantized_unet(CONFIGS["w8a8-static"])
    path = save_quantized(model, tmp_path_factory.mktemp("ckpt") / "unet")
    with torch.no_grad():
        expected = model(**inputs).sample
    return path, inputs, expected


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_load_reproduces_outputs_exactly(tmp_path, name):
    model, inputs = _quantized_unet(CONFIGS[name])
    save_quantized(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_NAME]  # one file, no temp files left
    fresh = tiny_unet2d(seed=123).eval()  # different float weights: everything must come from the file
    loaded = load_quantized(tmp_path, model=fresh)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, model(**inputs).sample)
    assert loaded.diffquant_config == CONFIGS[name]


def test_diffusers_model_is_rebuilt_from_its_saved_config(saved):
    path, inputs, expected = saved
    loaded = load_quantized(path)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, expected)


def test_wrong_architecture_is_rejected(saved):
    path, _, _ = saved
    with pytest.raises(CheckpointError, match="is for a UNet2DModel"):
        load_quantized(path, model=tiny_dit())


def test_other_configuration_of_same_architecture_is_rejected(saved):
    path, _, _ = saved
    wider = tiny_unet2d(in_channels=3)
    with pytest.raises(
        CheckpointError, match="different architecture or configuration|different model configuration"
    ):
        load_quantized(path, model=wider)


def _copy(path, tmp_path):
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path


def test_wrong_version_is_rejected(saved, tmp_path):
    ckpt = _copy(saved[0], tmp_path)
    rewrite(ckpt / WEIGHTS_NAME, metadata=lambda meta: meta.update(format_version="99"))
    with pytest.raises(CheckpointError, match="format version '99'"):
        load_quantized(ckpt)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_weights_are_rejected(saved, tmp_path, damage):
    ckpt = _copy(saved[0], tmp_path)
    data = bytearray((ckpt / WEIGHTS_NAME).read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-10] ^= 0xFF
    (ckpt / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated|checksum"):
        load_quantized(ckpt)


def test_edited_description_fails_the_checksum(saved, tmp_path):
    ckpt = _copy(saved[0], tmp_path)

    def three_bits(description):
        layer = next(v for v in description["layers"].values() if v["input_quant"])
        layer["input_quant"]["config"]["bits"] = 3

    rewrite(ckpt / WEIGHTS_NAME, metadata=edit_json("description", three_bits), recompute_checksum=False)
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_quantized(ckpt)


def test_corrupt_description_is_rejected(saved, tmp_path):
    ckpt = _copy(saved[0], tmp_path)
    rewrite(ckpt / WEIGHTS_NAME, metadata=lambda meta: meta.update(description="{not json"))
    with pytest.raises(CheckpointError, match="no readable description"):
        load_quantized(ckpt)
    (ckpt / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_quantized(ckpt)


@pytest.mark.parametrize("edit", ["missing", "extra"])
def test_missing_or_extra_tensors_are_rejected(saved, tmp_path, edit):
    ckpt = _copy(saved[0], tmp_path)

    def change(tensors):
        if edit == "missing":
            tensors.pop(next(k for k in tensors if k.endswith("qweight.scale")))
        else:
            tensors["bogus.weight"] = torch.zeros(1)

    rewrite(ckpt / WEIGHTS_NAME, tensors=change)  # a consistent but wrong checkpoint
    word = "missing" if edit == "missing" else "unexpected"
    with pytest.raises(CheckpointError, match=f"{word} keys \\['"):
        load_quantized(ckpt)


def test_format_1_checkpoints_still_load_with_a_warning(saved, tmp_path):
    path, inputs, expected = saved
    ckpt = _copy(path, tmp_path)
    meta, tensors = read_safetensors(ckpt / WEIGHTS_NAME)
    save_file(tensors, ckpt / WEIGHTS_NAME, metadata={"format": "diffquant"})  # format 1: JSON beside it
    description = json.loads(meta["description"])
    description.update(
        format="diffquant",
        format_version=1,
        weights_sha256=hashlib.sha256((ckpt / WEIGHTS_NAME).read_bytes()).hexdigest(),
    )
    (ckpt / CONFIG_NAME).write_text(json.dumps(description))
    with pytest.warns(UserWarning, match="format-1 checkpoint"):
        loaded = load_quantized(ckpt)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, expected)
    save_quantized(loaded, ckpt)  # upgrading removes the separate description
    assert sorted(p.name for p in ckpt.iterdir()) == [WEIGHTS_NAME]


def test_save_rejects_unquantized_model_and_file_target(tmp_path):
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(tiny_unet2d(), tmp_path)
    model, _ = _quantized_unet(CONFIGS["nf4"])
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="existing file"):
        save_quantized(model, target)


def test_checkpoint_holds_no_pickles(saved):
    path = saved[0]
    assert {p.suffix for p in path.iterdir()} == {".safetensors"}


def test_rebuilt_models_are_in_eval_mode_and_reproduce_outputs(tmp_path):
    model = tiny_dit().eval()  # DiT drops class labels at random in training mode
    inputs = example_inputs(model, batch_size=2)
    quantize_(model, CONFIGS["w4-group"])
    loaded = load_quantized(save_quantized(model, tmp_path))
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, model(**inputs).sample)


def test_half_precision_models_round_trip(tmp_path):
    model = tiny_unet2d().eval().half()
    inputs = {k: v.half() if v.is_floating_point() else v for k, v in example_inputs(model, 2).items()}
    quantize_(model, CONFIGS["w4-group"])
    loaded = load_quantized(save_quantized(model, tmp_path))
    assert next(loaded.parameters()).dtype == torch.float16
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, model(**inputs).sample)
