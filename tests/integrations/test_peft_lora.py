"""peft LoRA over diffquant layers: an exact unmerged side branch, trainable, loadable, unloadable."""

import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusionPipeline,
)
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
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


def _transformer_inputs(arch: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    if arch == "pixart":
        return {
            "hidden_states": torch.randn(2, 4, 8, 8, generator=gen),
            "encoder_hidden_states": torch.randn(2, 6, 32, generator=gen),
            "timestep": torch.tensor([5, 900]),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
    if arch == "sd3":
        return {
            "hidden_states": torch.randn(2, 4, 8, 8, generator=gen),
            "encoder_hidden_states": torch.randn(2, 6, 64, generator=gen),
            "pooled_projections": torch.randn(2, 64, generator=gen),
            "timestep": torch.tensor([5.0, 900.0]),
        }
    return {  # flux: 4×4 tokens of 2×2-packed 4-channel latents, 6 text tokens
        "hidden_states": torch.randn(2, 16, 16, generator=gen),
        "encoder_hidden_states": torch.randn(2, 6, 32, generator=gen),
        "pooled_projections": torch.randn(2, 32, generator=gen),
        "timestep": torch.tensor([0.1, 0.9]),
        "img_ids": torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij")
        )
        .reshape(3, -1)
        .T,
        "txt_ids": torch.zeros(6, 3),
        "guidance": None,
    }


@pytest.mark.parametrize(("arch", "fmt"), [("pixart", "int8"), ("sd3", "nf4"), ("flux", "int4")])
def test_lora_on_a_quantized_transformer_trains_and_disables(pipeline_dir, arch, fmt):
    cls = {"pixart": PixArtTransformer2DModel, "sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}[
        arch
    ]
    model = cls.from_pretrained(pipeline_dir(arch), subfolder="transformer")
    diffquant.quantize_(model, QuantConfig(weights=FORMATS[fmt]))
    packed = _packed(model)
    inputs = _transformer_inputs(arch)
    with torch.no_grad():
        base = model(**inputs).sample
    config = _lora(["to_q", "to_k", "to_v", "ff.net.0.proj", "ff.net.2"])
    if hasattr(model, "add_adapter"):
        model.add_adapter(config)
    else:  # PixArtTransformer2DModel has no diffusers adapter API; peft injects directly
        inject_adapter_in_model(config, model)
    assert any(isinstance(m, LoraQuantLinear) for m in model.modules())
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    model(**inputs).sample.square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        assert not torch.equal(model(**inputs).sample, base)
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(False)
        assert torch.equal(model(**inputs).sample, base)
    after = _packed(model)
    assert all(torch.equal(after[k], packed[k]) for k in packed)


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
