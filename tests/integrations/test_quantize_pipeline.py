"""quantize_pipeline: calibrated PTQ of a pipeline's denoiser from its own sampling runs."""

import pytest
import torch
from diffusers import DiffusionPipeline

from diffquant import ActivationQuantConfig, QuantConfig, WeightQuantConfig
from diffquant.integrations.pipeline import quantize_pipeline
from diffquant.models.tiny_pipelines import run_tiny_pipeline
from diffquant.nn import StaticActivationQuantizer


def _gptq_static(sequential: str) -> QuantConfig:
    weights = WeightQuantConfig(
        bits=4,
        method="gptq",
        granularity="group",
        group_size=8,
        fallback_granularity="channel",
        sequential=sequential,
    )
    return QuantConfig(weights=weights, activations=ActivationQuantConfig(bits=8, mode="static"))


SIZES = {"height": 16, "width": 16}


@pytest.mark.parametrize(("arch", "sequential"), [("sd", "block"), ("sd3", "off")])
def test_calibrated_pipeline_saves_and_reloads_identical(pipeline_dir, tmp_path, arch, sequential):
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir(arch))
    extra = {} if arch == "sd" else {"max_sequence_length": 8}
    quantize_pipeline(
        pipe, _gptq_static(sequential), prompts=["a cat"], num_inference_steps=2, **SIZES, **extra
    )
    denoiser = pipe.unet if arch == "sd" else pipe.transformer
    quantizers = [m for m in denoiser.modules() if isinstance(m, StaticActivationQuantizer)]
    assert quantizers and all(bool(q.calibrated) for q in quantizers)
    image = run_tiny_pipeline(pipe)
    pipe.save_pretrained(tmp_path)
    assert torch.equal(run_tiny_pipeline(DiffusionPipeline.from_pretrained(tmp_path)), image)


def test_sequential_gptq_without_an_arch_spec_is_refused_up_front(pipeline_dir):
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir("flux"))
    with pytest.raises(ValueError, match=r"sequential='off'"):
        quantize_pipeline(pipe, _gptq_static("block"), num_inference_steps=2, **SIZES, max_sequence_length=8)
    with pytest.raises(ValueError, match="component="):
        quantize_pipeline(pipe, _gptq_static("off"), component="unet")
