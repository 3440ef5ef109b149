"""`ArchSpec` defaults name real modules of the diffusers denoisers, and blocks run in the listed order."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

from diffquant.models import GENERIC_SPEC, ArchSpec, get_arch_spec, register_arch
from diffquant.models.registry import _REGISTRY
from diffquant.models.tiny import example_inputs, tiny_dit, tiny_pixart, tiny_unet2d, tiny_unet2d_condition

LAYER_TYPES = (nn.Linear, nn.Conv2d, nn.Embedding)


def _kept(model: nn.Module) -> dict[str, nn.Module]:
    spec = get_arch_spec(model)
    return {name: m for name, m in model.named_modules() if spec.is_kept_fp(name)}


def _config(model: nn.Module, **overrides) -> dict:
    return {**{k: v for k, v in model.config.items() if not k.startswith("_")}, **overrides}


def _unet2d_variant() -> UNet2DModel:
    """Class embedding as a timestep MLP instead of a label table."""
    torch.manual_seed(0)
    return UNet2DModel(**_config(tiny_unet2d(), num_class_embeds=None, class_embed_type="timestep"))


def _unet2d_condition_variant() -> UNet2DConditionModel:
    """All optional embeddings: LCM guidance projection, SDXL added conditions, text projection, class MLP."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        **_config(
            tiny_unet2d_condition(),
            time_cond_proj_dim=6,
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=8,
            class_embed_type="projection",
            encoder_hid_dim_type="text_proj",
            encoder_hid_dim=12,
        )
    )


# models per architecture: (tiny default, variants exercising the optional layers)
ARCH_MODELS = {
    "UNet2DModel": lambda: [tiny_unet2d(), _unet2d_variant()],
    "UNet2DConditionModel": lambda: [tiny_unet2d_condition(), _unet2d_condition_variant()],
    "DiTTransformer2DModel": lambda: [tiny_dit()],
    # sample_size=128 switches on PixArt's resolution / aspect-ratio embedders
    "PixArtTransformer2DModel": lambda: [tiny_pixart(), tiny_pixart(sample_size=128)],
}

EXPECTED_KEEP_FP = {
    tiny_unet2d: {
        "conv_in",
        "conv_out",
        "time_embedding.linear_1",
        "time_embedding.linear_2",
        "class_embedding",
    },
    tiny_unet2d_condition: {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"},
    tiny_dit: {
        "pos_embed.proj",
        *(
            f"transformer_blocks.{i}.norm1.emb.{leaf}"
            for i in range(2)
            for leaf in (
                "timestep_embedder.linear_1",
                "timestep_embedder.linear_2",
                "class_embedder.embedding_table",
            )
        ),
        "proj_out_1",
        "proj_out_2",
    },
    tiny_pixart: {
        "pos_embed.proj",
        "adaln_single.emb.timestep_embedder.linear_1",
        "adaln_single.emb.timestep_embedder.linear_2",
        "adaln_single.linear",
        "caption_projection.linear_1",
        "caption_projection.linear_2",
        "proj_out",
    },
}


@pytest.mark.parametrize("builder", list(EXPECTED_KEEP_FP), ids=lambda b: b.__name__)
def test_keep_fp_matches_exactly_the_intended_layers(builder):
    kept = _kept(builder())
    assert set(kept) == EXPECTED_KEEP_FP[builder]
    assert all(isinstance(m, LAYER_TYPES) for m in kept.values())


def test_unconditional_unet_keeps_no_class_embedding():
    assert set(_kept(tiny_unet2d(class_conditional=False))) == {
        "conv_in",
        "conv_out",
        "time_embedding.linear_1",
        "time_embedding.linear_2",
    }


@pytest.mark.parametrize("arch", list(ARCH_MODELS))
def test_every_keep_fp_regex_matches_a_layer(arch):
    models = ARCH_MODELS[arch]()
    spec = get_arch_spec(models[0])
    assert spec.name == arch
    for pattern in spec.keep_fp:
        matched = [
            (name, m)
            for model in models
            for name, m in model.named_modules()
            if ArchSpec("one", None, (pattern,), GENERIC_SPEC.block_prefixes).is_kept_fp(name)
        ]
        assert any(isinstance(m, LAYER_TYPES) for _, m in matched), f"{pattern!r} matches no layer"
        # a regex may name a container (class_embedding as an MLP), but never a leaf that is not a layer
        leaves = [(name, m) for name, m in matched if not list(m.children())]
        assert all(isinstance(m, LAYER_TYPES) for _, m in leaves), (pattern, leaves)


def test_variants_keep_their_optional_embeddings():
    kept = {n for n, m in _kept(_unet2d_condition_variant()).items() if isinstance(m, LAYER_TYPES)}
    assert kept == {
        "conv_in",
        "conv_out",
        "time_embedding.linear_1",
        "time_embedding.linear_2",
        "time_embedding.cond_proj",
        "add_embedding.linear_1",
        "add_embedding.linear_2",
        "encoder_hid_proj",
        "class_embedding.linear_1",
        "class_embedding.linear_2",
    }


@pytest.mark.parametrize(
    "builder", [tiny_unet2d, tiny_unet2d_condition, tiny_dit, tiny_pixart], ids=lambda b: b.__name__
)
def test_blocks_exist_and_run_in_listed_order(builder):
    model = builder()
    blocks = get_arch_spec(model).block_prefixes(model)
    assert len(blocks) >= 2
    order: list[str] = []
    for name in blocks:
        block = model.get_submodule(name)  # raises if the name does not exist
        assert any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in block.modules())
        block.register_forward_pre_hook(lambda m, args, name=name: order.append(name))
    with torch.no_grad():
        model(**example_inputs(model, batch_size=2))
    assert order == blocks


def test_unet_blocks_are_down_mid_up():
    model = tiny_unet2d()
    assert get_arch_spec(model).block_prefixes(model) == [
        "down_blocks.0",
        "down_blocks.1",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
    ]


def test_generic_fallback_and_mro_lookup():
    class MyUNet(UNet2DModel):
        pass

    assert get_arch_spec(MyUNet(**_config(tiny_unet2d()))).name == "UNet2DModel"

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3)
            self.act = nn.SiLU()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(4, 4))
            self.head = nn.Linear(4, 1)

    spec = get_arch_spec(Net())
    assert spec is GENERIC_SPEC
    assert spec.timestep_arg is None and spec.keep_fp == ()
    assert spec.block_prefixes(Net()) == ["stem", "body", "head"]
    assert not spec.is_kept_fp("stem")


def test_register_arch():
    name = "_TestOnlyDenoiser"
    spec = ArchSpec(name, "t", (r"head",), lambda m: ["body"])
    model_cls = type(name, (nn.Module,), {})
    try:
        register_arch(name, spec)
        assert get_arch_spec(model_cls()) is spec
        with pytest.raises(ValueError, match="replace=True"):
            register_arch(model_cls, spec)
        other = ArchSpec(name, "u", (), lambda m: [])
        register_arch(model_cls, other, replace=True)
        assert get_arch_spec(model_cls()) is other
        with pytest.raises(TypeError, match="ArchSpec"):
            register_arch(name, {"timestep_arg": "t"}, replace=True)
    finally:
        _REGISTRY.pop(name, None)


def test_arch_spec_validation():
    with pytest.raises(ValueError, match=r"not a valid regex"):
        ArchSpec("bad", None, (r"conv_(in",), lambda m: [])
    with pytest.raises(TypeError, match="tuple of regexes"):
        ArchSpec("bad", None, "conv_in", lambda m: [])
    spec = ArchSpec("ok", None, [r"a\.\d+", "b"], lambda m: [])
    assert spec.keep_fp == (r"a\.\d+", "b")
    assert spec.is_kept_fp("a.12") and spec.is_kept_fp("b")
    assert not spec.is_kept_fp("a.12.x") and not spec.is_kept_fp("xb")  # fullmatch, not search
