"""Default `ArchSpec`s for the diffusers denoisers (module names checked against diffusers 0.42.1).

Why these layers stay in higher precision by default:

- **First and last layers** (``conv_in`` / ``pos_embed.proj`` and ``conv_out`` / ``proj_out*``): the
  input layer sees the raw noisy latent and the output layer writes the predicted noise directly, so
  their error is not averaged out by later layers. Following the PTQ convention (BRECQ, Li et al.
  ICLR 2021), Q-Diffusion (Li et al., ICCV 2023) and PTQ4DM (Shang et al., CVPR 2023) leave them
  unquantized, and EfficientDM (He et al., ICLR 2024) keeps them at 8 bits. They hold well under 1 % of
  the weights.
- **Timestep / class / added-condition embedding MLPs**: they turn the timestep (and label, image size,
  pooled text) into the vector that conditions every block, so one error there shifts every block at
  once, and their input distribution changes with the timestep, which is exactly what a static
  activation range handles worst (TDQ, So et al., NeurIPS 2023). They run once per call on a
  ``(B, C)`` vector, so keeping them costs no time. (diffusers' DiT gives every block its own copy of
  the timestep MLP: about 7 % of DiT-XL's weights.)
- **Text-conditioning projections** (PixArt ``caption_projection``, UNet ``encoder_hid_proj``): they map
  the text-encoder states, which carry large outlier channels (T5 in PixArt), into the keys and values
  of every cross-attention layer. They run once per call and hold about 1 % of PixArt's weights.
  Seed 003 does not say whether it quantizes them; keeping them is the safer default, and
  ``QuantConfig(include=...)`` can quantize them.

Not kept: the adaLN modulation Linear inside each DiT block (``transformer_blocks.i.norm1.linear``)
holds about a third of DiT-XL's weights, and PTQ4DiT (Wu et al., NeurIPS 2024) and Q-DiT (Chen et al.,
2024) quantize it; keeping it would halve the compression. PixArt's single shared ``adaln_single.linear``
is kept: it is about 1.3 % of PixArt-α's weights and conditions every block.
"""

from __future__ import annotations

from torch import nn

from diffquant.models.registry import register_arch
from diffquant.models.spec import ArchSpec

__all__ = ["DIT_SPEC", "PIXART_SPEC", "SD3_SPEC", "UNET2D_CONDITION_SPEC", "UNET2D_SPEC"]


def _unet_blocks(model: nn.Module) -> list[str]:
    """``down_blocks.i``..., ``mid_block``, ``up_blocks.i``... in the order UNet.forward runs them.

    (``named_modules()`` lists ``up_blocks`` before ``mid_block``, so registration order is wrong here.)
    """
    names = [f"down_blocks.{i}" for i in range(len(model.down_blocks))]
    if getattr(model, "mid_block", None) is not None:
        names.append("mid_block")
    names += [f"up_blocks.{i}" for i in range(len(model.up_blocks))]
    return names


def _transformer_blocks(model: nn.Module) -> list[str]:
    return [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]


_UNET_KEEP_FP = (
    r"conv_in",  # first layer
    r"conv_out",  # last layer
    r"time_embedding\.(?:linear_[12]|cond_proj)",  # timestep MLP (+ LCM guidance-scale projection)
    r"class_embedding(?:\.linear_[12])?",  # label Embedding / class MLP ("timestep", "projection" types)
)

UNET2D_SPEC = ArchSpec(
    name="UNet2DModel",
    timestep_arg="timestep",
    keep_fp=_UNET_KEEP_FP,
    block_prefixes=_unet_blocks,
)

UNET2D_CONDITION_SPEC = ArchSpec(
    name="UNet2DConditionModel",
    timestep_arg="timestep",
    keep_fp=(
        *_UNET_KEEP_FP,
        r"add_embedding\.linear_[12]",  # SDXL "text_time" added-condition MLP
        r"encoder_hid_proj",  # text-state projection (encoder_hid_dim_type="text_proj")
    ),
    block_prefixes=_unet_blocks,
)

DIT_SPEC = ArchSpec(
    name="DiTTransformer2DModel",
    timestep_arg="timestep",
    keep_fp=(
        r"pos_embed\.proj",  # patch embedding conv: first layer
        # timestep MLP and label table of each block's adaLN-Zero conditioning
        r"transformer_blocks\.\d+\.norm1\.emb\.timestep_embedder\.linear_[12]",
        r"transformer_blocks\.\d+\.norm1\.emb\.class_embedder\.embedding_table",
        r"proj_out_[12]",  # final adaLN modulation (proj_out_1) and output projection (proj_out_2)
    ),
    block_prefixes=_transformer_blocks,
)

PIXART_SPEC = ArchSpec(
    name="PixArtTransformer2DModel",
    timestep_arg="timestep",
    keep_fp=(
        r"pos_embed\.proj",  # patch embedding conv: first layer
        # adaLN-single: timestep MLP (+ resolution / aspect-ratio MLPs at 1024 px) and its modulation
        r"adaln_single\.emb\.\w+_embedder\.linear_[12]",
        r"adaln_single\.linear",
        r"caption_projection\.linear_[12]",  # T5 states -> cross-attention width
        r"proj_out",  # last layer
    ),
    block_prefixes=_transformer_blocks,
)

SD3_SPEC = ArchSpec(
    name="SD3Transformer2DModel",
    timestep_arg="timestep",
    keep_fp=(
        r"pos_embed\.proj",  # patch embedding conv: first layer
        r"time_text_embed\.(?:timestep|text)_embedder\.linear_[12]",  # timestep + pooled-text MLPs
        r"context_embedder",  # text-encoder states -> joint attention width
        r"norm_out\.linear",  # final adaLN modulation
        r"proj_out",  # last layer
    ),
    block_prefixes=_transformer_blocks,
)

for _spec in (UNET2D_SPEC, UNET2D_CONDITION_SPEC, DIT_SPEC, PIXART_SPEC, SD3_SPEC):
    register_arch(_spec.name, _spec)
