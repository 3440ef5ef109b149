"""peft LoRA over diffquant layers: an exact unmerged side branch, trainable, loadable, unloadable."""

import pytest
import torch
from diffusers import DiffusionPipeline, SD3Transformer2DModel, StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import diffquant
from diffquant import QuantConfig, WeightQuantConfig
from diffquant.integrations.peft import LoraQuantConv2d, LoraQuantLinear
from diffquant.models.tiny import example_inputs, tiny_unet2d_condition
from diffquant.models.tiny_pipelines import run_tiny_pipeline

FORMATS = {
    "int8": WeightQuantConfig(bits=8),
    "int4": WeightQuantConfig(bits=4, granularity="group", group_size=8, fallback_granularity="channel"),
    "nf4": WeightQuantConfig(format="nf4", bits=4, block_size=32),
}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


def _lora(targets, r: int = 4) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights="gaussian", target_modules=targets)


def _randomize_lora_b(model) -> None:
    """peft starts B at zero (a no-op adapter); give it values so the branch really contributes."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)


def _packed(model) -> dict[str, torch.Tensor]:
    return {
        k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items() if ".qweight." in k
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_unmerged_lora_is_base_plus_delta_exactly(fmt):
    unet = diffquant.quantize_(tiny_unet2d_condition(), QuantConfig(weights=FORMATS[fmt]))
    unet.add_adapter(_lora(UNET_TARGETS))
    _randomize_lora_b(unet)
    layers = [m for m in unet.modules() if isinstance(m, (LoraQuantLinear, LoraQuantConv2d))]
    assert {type(m) for m in layers} == {LoraQuantLinear, LoraQuantConv2d}
    for layer in layers[:: max(1, len(layers) // 4)]:
        base = layer.get_base_layer()
        shape = (
            (2, 5, base.in_features) if isinstance(layer, LoraQuantLinear) else (2, base.in_channels, 6, 6)
        )
        x = torch.randn(shape)
        delta = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
        with torch.no_grad():
            assert delta.abs().max() > 0
            assert torch.equal(layer(x), base(x) + delta)


@pytest.mark.parametrize("fmt", FORMATS)
def test_qlora_training_moves_only_the_adapter(fmt):
    unet = diffquant.quantize_(tiny_unet2d_condition(), QuantConfig(weights=FORMATS[fmt]))
    packed = _packed(unet)
    unet.add_adapter(_lora(UNET_TARGETS))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    inputs = example_inputs(unet, batch_size=2, timesteps=[10, 700])
    target = torch.randn_like(unet(**inputs).sample)
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.mse_loss(unet(**inputs).sample, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]
    after = _packed(unet)
    assert after.keys() == packed.keys() and all(torch.equal(after[k], packed[k]) for k in packed)


def test_lora_on_a_quantized_transformer_trains_and_disables(pipeline_dir):
    model = SD3Transformer2DModel.from_pretrained(pipeline_dir("sd3"), subfolder="transformer")
    diffquant.quantize_(model, QuantConfig(weights=FORMATS["nf4"]))
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=gen),
        "encoder_hidden_states": torch.randn(2, 6, 64, generator=gen),
        "pooled_projections": torch.randn(2, 64, generator=gen),
        "timestep": torch.tensor([5.0, 900.0]),
    }
    with torch.no_grad():
        base = model(**inputs).sample
    model.add_adapter(_lora(["to_q", "to_k", "to_v", "add_q_proj", "ff.net.0.proj", "ff.net.2"]))
    assert any(isinstance(m, LoraQuantLinear) for m in model.modules())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**inputs).sample.square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        assert not torch.equal(model(**inputs).sample, base)
        model.disable_adapters()
        assert torch.equal(model(**inputs).sample, base)


def test_pipeline_load_set_unload_lora_weights_and_fuse_refusal(pipeline_dir, tmp_path):
    # a LoRA trained on the float UNet, saved the diffusers way
    donor = DiffusionPipeline.from_pretrained(pipeline_dir("sd")).unet
    donor.add_adapter(_lora(UNET_TARGETS))
    _randomize_lora_b(donor)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(donor))

    pipe = DiffusionPipeline.from_pretrained(pipeline_dir("sd"))
    diffquant.quantize_(pipe.unet, QuantConfig(weights=FORMATS["int4"]))
    base_image = run_tiny_pipeline(pipe)
    packed = _packed(pipe.unet)
    pipe.load_lora_weights(tmp_path, adapter_name="style")
    assert any(isinstance(m, LoraQuantConv2d) for m in pipe.unet.modules())
    lora_image = run_tiny_pipeline(pipe)
    assert not torch.equal(lora_image, base_image)
    pipe.set_adapters(["style"], adapter_weights=[0.0])
    assert torch.equal(run_tiny_pipeline(pipe), base_image)
    pipe.set_adapters(["style"], adapter_weights=[1.0])
    assert torch.equal(run_tiny_pipeline(pipe), lora_image)
    with pytest.raises(ValueError, match="cannot merge a LoRA adapter"):
        pipe.fuse_lora()
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert not any(isinstance(m, (LoraQuantLinear, LoraQuantConv2d)) for m in pipe.unet.modules())
    after = _packed(pipe.unet)
    assert all(torch.equal(after[k], packed[k]) for k in packed)
    assert torch.equal(run_tiny_pipeline(pipe), base_image)
