"""diffquant as a diffusers quantization backend, exercised through the user's from_pretrained calls."""

import json

import pytest
import torch
from diffusers import DiffusionPipeline, PipelineQuantizationConfig, UNet2DConditionModel

import diffquant
from diffquant import ActivationQuantConfig, QuantConfig, WeightQuantConfig
from diffquant.integrations.diffusers import DiffQuantConfig
from diffquant.models.tiny import example_inputs, tiny_unet2d_condition
from diffquant.models.tiny_pipelines import DENOISER, run_tiny_pipeline
from diffquant.nn import is_quantized_layer

INT4_DYNAMIC = QuantConfig(
    weights=WeightQuantConfig(bits=4, granularity="group", group_size=8, fallback_granularity="channel"),
    activations=ActivationQuantConfig(bits=8, mode="dynamic"),
)
NF4 = QuantConfig(weights=WeightQuantConfig(format="nf4", bits=4, block_size=32))
INT8 = QuantConfig(weights=WeightQuantConfig(bits=8))


def _n_quantized(model) -> int:
    return sum(map(is_quantized_layer, model.modules()))


def test_model_from_pretrained_quantizes_with_diffquant_config(pipeline_dir):
    unet = UNet2DConditionModel.from_pretrained(
        pipeline_dir("sd"), subfolder="unet", quantization_config=DiffQuantConfig(INT4_DYNAMIC)
    )
    float_unet = UNet2DConditionModel.from_pretrained(pipeline_dir("sd"), subfolder="unet")
    reference = diffquant.quantize_(float_unet, INT4_DYNAMIC)
    assert _n_quantized(unet) == _n_quantized(reference) > 0
    assert unet.diffquant_config == INT4_DYNAMIC
    assert isinstance(unet.config.quantization_config, DiffQuantConfig)
    assert torch.equal(
        unet.state_dict()["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.qweight.qdata"],
        reference.state_dict()["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.qweight.qdata"],
    )


def test_pipeline_quantization_config_quant_mapping(pipeline_dir):
    config = PipelineQuantizationConfig(quant_mapping={"transformer": DiffQuantConfig(NF4)})
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir("pixart"), quantization_config=config)
    assert _n_quantized(pipe.transformer) > 0
    assert _n_quantized(pipe.vae) == 0
    assert torch.isfinite(run_tiny_pipeline(pipe)).all()


def test_pipeline_quantization_config_quant_backend(pipeline_dir):
    config = PipelineQuantizationConfig(
        quant_backend="diffquant", quant_kwargs={"weights": {"bits": 8}}, components_to_quantize=["unet"]
    )
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir("sd"), quantization_config=config)
    assert pipe.unet.diffquant_config == INT8
    assert _n_quantized(pipe.text_encoder) == 0


def test_calibrated_config_is_refused_with_a_pointer_to_quantize_(pipeline_dir):
    static = QuantConfig(weights=WeightQuantConfig(bits=8), activations=ActivationQuantConfig(mode="static"))
    with pytest.raises(ValueError, match=r"diffquant\.quantize_\(model, quant_config, calibrate=fn\)"):
        UNet2DConditionModel.from_pretrained(
            pipeline_dir("sd"), subfolder="unet", quantization_config=DiffQuantConfig(static)
        )


@pytest.mark.parametrize(
    ("arch", "config", "by_quantize_"),
    [("sd", INT4_DYNAMIC, False), ("pixart", NF4, True), ("sd3", INT8, True), ("flux", INT4_DYNAMIC, False)],
)
def test_pipeline_save_pretrained_reloads_identical(pipeline_dir, tmp_path, arch, config, by_quantize_):
    name = DENOISER[arch]
    if by_quantize_:  # quantized by the library directly, on a loaded pipeline
        pipe = DiffusionPipeline.from_pretrained(pipeline_dir(arch))
        diffquant.quantize_(getattr(pipe, name), config)
    else:
        mapping = PipelineQuantizationConfig(quant_mapping={name: DiffQuantConfig(config)})
        pipe = DiffusionPipeline.from_pretrained(pipeline_dir(arch), quantization_config=mapping)
    image = run_tiny_pipeline(pipe)
    pipe.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "diffquant"
    assert QuantConfig.from_dict(saved["quant_config"]) == config
    assert len(saved["layers"]) == _n_quantized(getattr(pipe, name)) > 0
    assert not list(tmp_path.rglob("*.bin"))  # safetensors only: nothing to unpickle

    reloaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert _n_quantized(getattr(reloaded, name)) == len(saved["layers"])
    assert torch.isfinite(image).all()
    assert torch.equal(run_tiny_pipeline(reloaded), image)
    alone = type(getattr(pipe, name)).from_pretrained(tmp_path, subfolder=name)
    assert alone.diffquant_config == config


def test_bf16_cast_keeps_scales_and_checkpoint_keeps_dtype(pipeline_dir, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir("sd"))
    diffquant.quantize_(pipe.unet, INT4_DYNAMIC)
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    scale = layer.qweight.scale.clone()
    pipe.to(torch.bfloat16)
    assert layer.qweight.scale.dtype == torch.float32 and torch.equal(layer.qweight.scale, scale)
    assert pipe.unet.conv_in.weight.dtype == torch.bfloat16
    image = run_tiny_pipeline(pipe)
    assert torch.isfinite(image).all()

    pipe.save_pretrained(tmp_path)
    unet = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")  # no torch_dtype: the saved one
    assert unet.conv_in.weight.dtype == torch.bfloat16
    assert (
        unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.qweight.scale.dtype
        == torch.float32
    )
    reloaded = DiffusionPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert torch.equal(run_tiny_pipeline(reloaded), image)


def test_from_pretrained_honours_torch_dtype_and_keeps_scales_float32(pipeline_dir, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir("sd"), subfolder="unet")
    diffquant.quantize_(unet, INT8)
    unet.save_pretrained(tmp_path)
    bf16 = UNet2DConditionModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    layer = bf16.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.qweight.scale.dtype == torch.float32 and bf16.conv_in.weight.dtype == torch.bfloat16
    assert torch.equal(layer.qweight.scale, unet.get_submodule(_name(unet, "attn1.to_q")).qweight.scale)


def _name(model, suffix: str) -> str:
    return next(n for n, _ in model.named_modules() if n.endswith(suffix))


def test_diffquant_config_json_round_trip():
    config = DiffQuantConfig(weights=WeightQuantConfig(bits=4, granularity="group", group_size=16))
    assert DiffQuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="not both"):
        DiffQuantConfig(INT8, weights=WeightQuantConfig(bits=4))


def test_calibrated_model_saves_and_reloads_identical(tmp_path):
    unet = tiny_unet2d_condition()
    inputs = example_inputs(unet, batch_size=2, timesteps=[3, 500])
    config = QuantConfig(
        weights=WeightQuantConfig(
            bits=4, method="gptq", granularity="group", group_size=8, fallback_granularity="channel"
        ),
        activations=ActivationQuantConfig(bits=8, mode="static"),
    )
    diffquant.quantize_(unet, config, calibrate=lambda model: model(**inputs))
    unet.save_pretrained(tmp_path)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).sample, unet(**inputs).sample)


def test_dequantize_returns_float_layers_with_the_dequantized_weights(pipeline_dir):
    unet = UNet2DConditionModel.from_pretrained(
        pipeline_dir("sd"), subfolder="unet", quantization_config=DiffQuantConfig(NF4)
    )
    inputs = example_inputs(unet, batch_size=1, timesteps=[7])
    with torch.no_grad():
        quantized = unet(**inputs).sample
    unet.dequantize()
    assert _n_quantized(unet) == 0 and getattr(unet, "hf_quantizer", None) is None
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, quantized)


def test_load_quantized_checkpoint_re_saves_the_diffusers_way(tmp_path):
    unet = diffquant.quantize_(tiny_unet2d_condition(), INT8)
    diffquant.save_quantized(unet, tmp_path / "diffquant-format")
    loaded = diffquant.load_quantized(tmp_path / "diffquant-format")
    loaded.save_pretrained(tmp_path / "diffusers-format")
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "diffusers-format")
    inputs = example_inputs(unet, batch_size=1, timesteps=[9])
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).sample, unet(**inputs).sample)
