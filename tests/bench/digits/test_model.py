import pytest
import torch

from diffquant.bench.digits.model import (
    NULL_CLASS,
    NUM_CLASS_EMBEDS,
    SUBJECT_CLASS,
    TINY_UNET,
    UNetConfig,
    build_unet,
    count_parameters,
)


def test_default_unet_has_twelve_class_embeddings_and_budgeted_size():
    model = build_unet()
    assert model.config.num_class_embeds == NUM_CLASS_EMBEDS == 12
    assert model.class_embedding.num_embeddings == 12
    assert (NULL_CLASS, SUBJECT_CLASS) == (10, 11)
    assert 0.5e6 <= count_parameters(model) <= 1.5e6


def test_unet_predicts_noise_shaped_output_for_every_class():
    model = build_unet(TINY_UNET).eval()
    x = torch.randn(12, 1, 8, 8)
    out = model(x, torch.arange(12) * 80, class_labels=torch.arange(12)).sample
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_bad_unet_configs_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(block_out_channels=(8, 8, 8, 8, 8))
    with pytest.raises(ValueError, match="norm_num_groups"):
        UNetConfig(block_out_channels=(30, 60), norm_num_groups=8, attention_levels=())
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(attention_levels=(5,))
