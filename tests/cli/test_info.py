"""``diffquant info`` on every kind of folder, and ``--version``."""

import json
import shutil

import pytest
from diffusers import DiffusionPipeline

import diffquant
from diffquant.cli import main
from diffquant.nn.qmodules import is_quantized_layer, quant_layer_class


@pytest.fixture(scope="module")
def quantized_sd(saved_pipeline, tmp_path_factory):
    """The tiny SD pipeline quantized W8A8 (RTN weights, dynamic activations), saved as a pipeline folder."""
    out = tmp_path_factory.mktemp("info") / "sd-w8a8"
    argv = ["quantize", str(saved_pipeline("sd")), "--out", str(out), "--activations", "int8-dynamic"]
    assert main([*argv, "--no-progress"]) == 0
    return out


def _info(path, capsys) -> str:
    assert main(["info", str(path)]) == 0
    return capsys.readouterr().out


def test_info_on_a_quantized_pipeline_counts_what_from_pretrained_loads(quantized_sd, capsys):
    printed = _info(quantized_sd, capsys)
    unet = DiffusionPipeline.from_pretrained(quantized_sd).unet
    quantized = [n for n, m in unet.named_modules() if is_quantized_layer(m)]
    kept = [n for n, m in unet.named_modules() if quant_layer_class(m) and not is_quantized_layer(m)]
    assert printed.startswith(f"StableDiffusionPipeline pipeline folder {quantized_sd}")
    assert "unet: UNet2DConditionModel (diffusers)" in printed
    assert "quantized by diffquant as W8A8 (weight method rtn), dtype float32" in printed
    n = len(quantized)
    assert f"{n} quantized layers: weights int8 ×{n}; activations int8-dynamic ×{n}" in printed
    assert f"{len(kept)} kept in float: {', '.join(sorted(kept))}" in printed
    assert "text_encoder: CLIPTextModel (transformers)" in printed and "float:" in printed
    assert "scheduler: DDIMScheduler (diffusers)" in printed and "no weights" in printed


def test_info_on_model_folders_float_and_quantized(saved_pipeline, quantized_sd, capsys):
    printed = _info(quantized_sd / "unet", capsys)
    assert printed.startswith(f"UNet2DConditionModel model folder {quantized_sd / 'unet'}")
    assert "quantized by diffquant as W8A8" in printed
    printed = _info(saved_pipeline("sd") / "unet", capsys)
    assert "UNet2DConditionModel model folder" in printed and "float:" in printed
    assert "quantized" not in printed


def test_info_on_a_float_pipeline(saved_pipeline, capsys):
    printed = _info(saved_pipeline("pixart"), capsys)
    assert (
        "PixArtAlphaPipeline pipeline folder" in printed
        and "transformer: PixArtTransformer2DModel" in printed
    )
    assert "quantized" not in printed


def test_info_on_a_diffquant_checkpoint(tmp_path, capsys):
    from diffquant.models.tiny import tiny_unet2d

    tiny_unet2d().save_pretrained(tmp_path / "model")
    assert main(["quantize", str(tmp_path / "model"), "--out", str(tmp_path / "ckpt"), "--no-progress"]) == 0
    capsys.readouterr()
    printed = _info(tmp_path / "ckpt", capsys)
    assert (
        "UNet2DModel quantized as W8A16" in printed and f"diffquant checkpoint {tmp_path / 'ckpt'}" in printed
    )


def test_info_refuses_what_it_cannot_read_with_a_message(quantized_sd, tmp_path, capsys):
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("hello")
    (tmp_path / "a-file").write_text("x")
    broken = tmp_path / "broken"
    shutil.copytree(quantized_sd, broken)
    (broken / "vae" / "config.json").write_text("{not json")
    header = tmp_path / "bad-header"
    shutil.copytree(quantized_sd / "unet", header)
    (header / "diffusion_pytorch_model.safetensors").write_bytes(b"\xff" * 64)
    other = tmp_path / "other-backend"
    shutil.copytree(quantized_sd / "unet", other)
    config = json.loads((other / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (other / "config.json").write_text(json.dumps(config))
    cases = [
        (tmp_path / "random", "not a diffusers pipeline folder"),
        (tmp_path / "missing", "is missing"),
        (tmp_path / "a-file", "is a file"),
        (broken, f"{broken / 'vae' / 'config.json'} is not readable JSON"),
        (header, "is not a safetensors file"),
    ]
    for path, message in cases:
        assert main(["info", str(path)]) == 2, path
        assert message in capsys.readouterr().err, path
    assert "quantized by 'bitsandbytes' (not diffquant" in _info(other, capsys)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert (
        exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"diffquant {diffquant.__version__}"
    )
