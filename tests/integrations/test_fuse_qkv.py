"""fuse_qkv_projections on quantized models keeps the fused projections quantized."""

import pytest
import torch
from diffusers import SD3Transformer2DModel

import diffquant
from diffquant import ActivationQuantConfig, QuantConfig, WeightQuantConfig
from diffquant.models.tiny import example_inputs, tiny_pixart
from diffquant.nn import QuantLinear

INT4_GROUP_ASYMMETRIC = QuantConfig(
    weights=WeightQuantConfig(bits=4, granularity="group", group_size=8, symmetric=False),
    activations=ActivationQuantConfig(bits=8, mode="dynamic"),
)


@pytest.mark.parametrize(
    "config", [QuantConfig(weights=WeightQuantConfig(bits=8, granularity="tensor")), INT4_GROUP_ASYMMETRIC]
)
def test_pixart_fused_projections_stay_quantized_and_agree(config):
    model = diffquant.quantize_(tiny_pixart(), config)
    inputs = example_inputs(model, batch_size=2, timesteps=[4, 600])
    attn1, attn2 = model.transformer_blocks[0].attn1, model.transformer_blocks[0].attn2
    parts_qkv = torch.cat([attn1.to_q.weight, attn1.to_k.weight, attn1.to_v.weight])
    parts_kv = torch.cat([attn2.to_k.weight, attn2.to_v.weight])
    with torch.no_grad():
        unfused = model(**inputs).sample
    model.fuse_qkv_projections()
    assert isinstance(attn1.to_qkv, QuantLinear) and isinstance(attn2.to_kv, QuantLinear)
    assert torch.equal(attn1.to_qkv.weight, parts_qkv) and torch.equal(attn2.to_kv.weight, parts_kv)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, unfused, rtol=0, atol=1e-5)


def test_sd3_added_projections_fuse_quantized(pipeline_dir):
    model = SD3Transformer2DModel.from_pretrained(pipeline_dir("sd3"), subfolder="transformer")
    diffquant.quantize_(model, QuantConfig(weights=WeightQuantConfig(bits=8)))
    model.fuse_qkv_projections()
    attn = model.transformer_blocks[0].attn
    assert isinstance(attn.to_qkv, QuantLinear) and isinstance(attn.to_added_qkv, QuantLinear)


def test_nf4_and_mixed_parts_refuse_before_changing_anything():
    model = diffquant.quantize_(tiny_pixart(), QuantConfig(weights=WeightQuantConfig(format="nf4", bits=4)))
    with pytest.raises(ValueError, match="NF4"):
        model.fuse_qkv_projections()
    assert not hasattr(model.transformer_blocks[0].attn1, "to_qkv")
    mixed = diffquant.quantize_(
        tiny_pixart(), QuantConfig(weights=WeightQuantConfig(bits=8), exclude=(r".*attn1\.to_k",))
    )
    with pytest.raises(ValueError, match="every part quantized"):
        mixed.fuse_qkv_projections()
    assert not hasattr(mixed.transformer_blocks[0].attn1, "to_qkv")
