import torch

from diffquant import load_quantized
from diffquant.cli import main
from diffquant.models.tiny import example_inputs, tiny_unet2d


def test_demo_refuses_an_existing_file_as_out(tmp_path, capsys):
    target = tmp_path / "results"
    target.write_text("keep me")
    assert main(["demo", "--quick", "--out", str(target)]) == 2
    assert "existing file" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_quantize_a_diffusers_folder_then_info_and_load(tmp_path, capsys):
    model = tiny_unet2d().eval()
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "w4"
    args = ["quantize", str(tmp_path / "model"), "--weights", "int4", "--group-size", "8", "--out", str(out)]
    assert main([*args, "--activations", "int8-dynamic"]) == 0
    assert "W4A8" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "UNet2DModel quantized as W4A8" in printed
    assert "quantized layers" in printed and "ISA" in printed  # the kernel report
    assert "dequant-reference" in printed  # group-wise INT4 weights have no integer kernel
    loaded = load_quantized(out)
    inputs = example_inputs(loaded, batch_size=2)
    with torch.no_grad():
        assert torch.isfinite(loaded(**inputs).sample).all()


def test_quantize_rejects_bad_requests_with_a_message(tmp_path, capsys):
    tiny_unet2d().save_pretrained(tmp_path / "model")
    base = ["quantize", str(tmp_path / "model"), "--out", str(tmp_path / "q")]
    assert main([*base, "--activations", "eight-bit"]) == 2
    assert "expected 'none' or INTn-MODE" in capsys.readouterr().err
    assert main([*base, "--activations", "int8-static"]) == 2
    assert "calibration" in capsys.readouterr().err
    assert main([*base, "--method", "gptq"]) == 2
    assert "calibration" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path), "--out", str(tmp_path / "q")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_efficientdm_rejects_a_bad_bit_spec(capsys):
    assert main(["efficientdm", "--bits", "W4"]) == 2
    assert "--bits must look like W4A4" in capsys.readouterr().err
