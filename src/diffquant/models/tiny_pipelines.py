"""Tiny, randomly initialised diffusers *pipelines* (SD 1.x, PixArt-α, SD3, Flux) built offline.

Every component is a real diffusers / transformers class built from a small config, and the
tokenizers are written from a few-entry vocabulary, so nothing is downloaded. Save a pipeline with
``save_pretrained`` and tests run the same ``from_pretrained`` code a user runs.

Example:
    >>> pipe = tiny_sd_pipeline()
    >>> image = pipe("a cat", num_inference_steps=2, output_type="pt").images  # (1, 3, 16, 16)
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
)

from diffquant.models.tiny import tiny_pixart, tiny_unet2d_condition

__all__ = [
    "DENOISER",
    "TINY_PIPELINES",
    "run_tiny_pipeline",
    "tiny_flux_pipeline",
    "tiny_pixart_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd_pipeline",
]

_TEXT_WIDTH = 32  # hidden size of every tiny text encoder
_LETTERS = string.ascii_lowercase


def _clip_tokenizer(max_length: int = 16):
    """A byte-level-BPE ``CLIPTokenizer`` over single letters (no merges), written to a temp folder."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"))
    tokenizer.model_max_length = max_length
    return tokenizer


def _t5_tokenizer():
    """A unigram ``T5Tokenizer`` (sentencepiece-style ``▁`` word starts) over single letters."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + c, -1.0) for c in _LETTERS] + [(c, -2.0) for c in _LETTERS]
    backend = Tokenizer(Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0
    )


def _clip_text_encoder(seed: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=2 + 2 * len(_LETTERS),
        hidden_size=_TEXT_WIDTH,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=_TEXT_WIDTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _t5_text_encoder(seed: int, d_model: int = _TEXT_WIDTH):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=4 + 2 * len(_LETTERS),
        d_model=d_model,
        d_ff=37,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        dropout_rate=0.0,
    )
    return T5EncoderModel(config)


def _vae(latent_channels: int, seed: int, **kwargs) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=2,
        sample_size=16,
        **kwargs,
    )


def _in_eval_mode(pipe):
    """Freshly built models are in training mode (dropout); loaded ones are not: match them."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD 1.x: ``UNet2DConditionModel`` + ``AutoencoderKL`` + ``CLIPTextModel`` + ``CLIPTokenizer``, DDIM.

    Images are 16×16 (8×8 latents, 4 channels); no safety checker.
    """
    pipe = StableDiffusionPipeline(
        vae=_vae(4, seed),
        text_encoder=_clip_text_encoder(seed),
        tokenizer=_clip_tokenizer(),
        unet=tiny_unet2d_condition(sample_size=8, cross_attention_dim=_TEXT_WIDTH, seed=seed),
        scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _in_eval_mode(pipe)


def tiny_pixart_pipeline(seed: int = 0) -> PixArtAlphaPipeline:
    """PixArt-α: ``PixArtTransformer2DModel`` + ``T5EncoderModel`` + T5 tokenizer + ``AutoencoderKL``, DDIM."""
    pipe = PixArtAlphaPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_t5_text_encoder(seed),
        vae=_vae(4, seed),
        transformer=tiny_pixart(sample_size=8, caption_channels=_TEXT_WIDTH, seed=seed),
        scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False, steps_offset=1),
    )
    return _in_eval_mode(pipe)


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3: ``SD3Transformer2DModel`` (MM-DiT) + two CLIP-with-projection encoders + T5, flow matching."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=2 * _TEXT_WIDTH,  # CLIP states (2 × 32) padded to the T5 width
        caption_projection_dim=16,
        pooled_projection_dim=2 * _TEXT_WIDTH,
        pos_embed_max_size=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(4, seed, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip_text_encoder(seed, with_projection=True),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_clip_text_encoder(seed + 1, with_projection=True),
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=_t5_text_encoder(seed, d_model=2 * _TEXT_WIDTH),
        tokenizer_3=_t5_tokenizer(),
    )
    return _in_eval_mode(pipe)


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """Flux: ``FluxTransformer2DModel`` (double + single stream) + CLIP + T5, flow matching."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2×2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_TEXT_WIDTH,
        pooled_projection_dim=_TEXT_WIDTH,
        axes_dims_rope=(4, 4, 8),
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(4, seed, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip_text_encoder(seed),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_t5_text_encoder(seed),
        tokenizer_2=_t5_tokenizer(),
        transformer=transformer,
    )
    return _in_eval_mode(pipe)


TINY_PIPELINES = {
    "sd": tiny_sd_pipeline,
    "pixart": tiny_pixart_pipeline,
    "sd3": tiny_sd3_pipeline,
    "flux": tiny_flux_pipeline,
}
"""Builders by short name; the denoiser is ``pipe.unet`` for ``"sd"``, ``pipe.transformer`` otherwise."""

DENOISER = {"sd": "unet", "pixart": "transformer", "sd3": "transformer", "flux": "transformer"}
"""Component (and subfolder) name of each tiny pipeline's denoiser."""


def run_tiny_pipeline(pipe, steps: int = 2, seed: int = 0) -> torch.Tensor:
    """One seeded 16×16 image ``(1, 3, 16, 16)`` from a tiny pipeline, as a float tensor in [0, 1]."""
    kwargs = {"num_inference_steps": steps, "output_type": "pt", "height": 16, "width": 16}
    if not isinstance(pipe, StableDiffusionPipeline):
        kwargs["max_sequence_length"] = 8
    if isinstance(pipe, PixArtAlphaPipeline):
        kwargs["use_resolution_binning"] = False
    return pipe("a cat", generator=torch.Generator().manual_seed(seed), **kwargs).images
