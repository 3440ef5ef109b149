"""Seed 003's scripts (``examples/logsnr``) on the tiny PixArt pipeline: the seed's flags, one code path."""

import importlib.util
import re
from pathlib import Path

from diffusers import DiffusionPipeline

import diffquant.cli.calibrate as calibrate_module
from diffquant.cli import main
from diffquant.nn.qmodules import is_quantized_layer

from .conftest import PIXART_RUN, readme_command

EXAMPLES = Path(__file__).parents[2] / "examples" / "logsnr"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _quantized(model) -> dict:
    return {name: m for name, m in model.named_modules() if is_quantized_layer(m)}


def _readme_argv(script: str, saved_pipeline, out) -> list[str]:
    paths = {"path/to/pixart-pipeline": saved_pipeline("pixart"), out.name: out}
    return readme_command(f"python examples/logsnr/{script}.py", paths)


def test_calibrate_snr_is_diffquant_calibrate_with_logsnr_and_the_bundled_prompts(
    saved_pipeline, tmp_path, monkeypatch
):
    """The README's command makes the request ``diffquant calibrate`` makes (whose run on PixArt W4A4 log-SNR
    is tested in test_quantize_pipeline.py), with log-SNR activations and the prompts next to the script."""
    requests = []
    monkeypatch.setattr(calibrate_module, "execute", lambda request: requests.append(request) or "")
    out = tmp_path / "logsnr_w8a8"
    assert (
        _script("calibrate_snr").main([*_readme_argv("calibrate_snr", saved_pipeline, out), *PIXART_RUN]) == 0
    )
    pipeline = str(saved_pipeline("pixart"))
    argv = [
        "calibrate",
        pipeline,
        "--wbits",
        "8",
        "--abits",
        "8",
        "--activations",
        "logsnr",
        "--save_path",
        str(out),
    ]
    assert main([*argv, "--prompts", str(EXAMPLES / "prompts.txt"), *PIXART_RUN]) == 0
    assert requests[0] == requests[1]
    assert requests[0].config.label == "W8A8" and requests[0].config.activations.mode == "logsnr"
    assert len(requests[0].run.prompts) == 8 and requests[0].out == out


def test_quantize_qronos_blocks_uses_the_bundled_prompts(saved_pipeline, tmp_path):
    """The README's command, on one block of the tiny PixArt (it has 2)."""
    out = tmp_path / "qronos_4blocks"
    argv = [*_readme_argv("quantize_qronos_4blocks", saved_pipeline, out), "--num_blocks", "1", *PIXART_RUN]
    assert _script("quantize_qronos_4blocks").main(argv) == 0
    transformer = DiffusionPipeline.from_pretrained(out).transformer
    names = set(_quantized(transformer))
    assert names and all(re.fullmatch(r"transformer_blocks\.0\..+", n) for n in names)
    config = transformer.diffquant_config
    assert (config.weights.method, config.weights.bits, config.activations.mode) == ("qronos", 4, "static")


def test_more_blocks_than_the_denoiser_has_is_an_error(saved_pipeline, tmp_path, capsys):
    argv = [
        "--pretrained_model_name_or_path",
        str(saved_pipeline("pixart")),
        "--save_path",
        str(tmp_path / "q"),
    ]
    assert _script("quantize_qronos_4blocks").main([*argv, *PIXART_RUN]) == 2  # 4 blocks; the tiny one has 2
    assert "--first-blocks 4: PixArtTransformer2DModel has 2 blocks" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
