"""Tiny, randomly initialised diffusers denoisers built from configs, for tests and benchmarks.

Each builder returns a real diffusers model (the same classes as Stable Diffusion, DiT and PixArt)
with 15k-55k parameters, seeded so two calls give identical weights. Outputs have the input's
shape (``out_channels == in_channels``, no learned variance). They round-trip through
``save_pretrained`` / ``from_pretrained`` like any checkpoint.

Example:
    >>> model = tiny_unet2d()
    >>> out = model(**example_inputs(model, batch_size=2, timesteps=[999, 10])).sample
    >>> tuple(out.shape)
    (2, 1, 8, 8)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import (
    DDPMScheduler,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from torch import nn

from diffquant.devices import module_device

__all__ = [
    "example_inputs",
    "flow_scheduler_for_tests",
    "scheduler_for_tests",
    "tiny_dit",
    "tiny_pixart",
    "tiny_sd3",
    "tiny_unet2d",
    "tiny_unet2d_condition",
]

_NUM_CLASSES = 10  # label vocabulary of the class-conditional tiny models
_TEXT_TOKENS = 4  # sequence length of the fake text-encoder states in `example_inputs`
_NUM_TRAIN_TIMESTEPS = 1000
_ARCHS = (
    UNet2DModel,
    UNet2DConditionModel,
    DiTTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
)


def tiny_unet2d(
    sample_size: int = 8, class_conditional: bool = True, *, in_channels: int = 1, seed: int = 0
) -> UNet2DModel:
    """A two-level class-conditional ``UNet2DModel`` (one attention level), about 45k parameters.

    Args:
        sample_size: Spatial size; must be divisible by 2 (one downsampling).
        class_conditional: Add a 10-entry label embedding (``class_labels`` argument).
        in_channels: Image channels (1 = grey digits).
        seed: ``torch.manual_seed`` used for the random initialisation.
    """
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
        num_class_embeds=_NUM_CLASSES if class_conditional else None,
    )


def tiny_unet2d_condition(
    sample_size: int = 8, cross_attention_dim: int = 16, *, in_channels: int = 4, seed: int = 0
) -> UNet2DConditionModel:
    """A Stable-Diffusion-shaped ``UNet2DConditionModel`` (cross-attention), about 52k parameters.

    Args:
        sample_size: Latent spatial size; must be divisible by 2.
        cross_attention_dim: Width of ``encoder_hidden_states``.
        in_channels: Latent channels.
        seed: ``torch.manual_seed`` used for the random initialisation.
    """
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
        cross_attention_dim=cross_attention_dim,
    )


def tiny_dit(
    sample_size: int = 8, num_layers: int = 2, *, in_channels: int = 4, seed: int = 0
) -> DiTTransformer2DModel:
    """A class-conditional ``DiTTransformer2DModel`` (adaLN-Zero, patch 2, width 16), about 20k parameters.

    Args:
        sample_size: Latent spatial size; must be divisible by the patch size 2.
        num_layers: Number of transformer blocks.
        in_channels: Latent channels.
        seed: ``torch.manual_seed`` used for the random initialisation.
    """
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=num_layers,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=_NUM_CLASSES,
    )


def tiny_pixart(
    sample_size: int = 8,
    num_layers: int = 2,
    *,
    in_channels: int = 4,
    caption_channels: int = 12,
    seed: int = 0,
) -> PixArtTransformer2DModel:
    """A ``PixArtTransformer2DModel`` (adaLN-single, cross-attention to captions), about 16k parameters.

    Args:
        sample_size: Latent spatial size; must be divisible by the patch size 2. (128 would switch
            on PixArt's resolution / aspect-ratio conditions; keep it small.)
        num_layers: Number of transformer blocks.
        in_channels: Latent channels.
        caption_channels: Width of the text-encoder states (4096 for T5-XXL in PixArt-α).
        seed: ``torch.manual_seed`` used for the random initialisation.
    """
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=num_layers,
        sample_size=sample_size,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=caption_channels,
    )


def tiny_sd3(
    sample_size: int = 8,
    num_layers: int = 2,
    *,
    in_channels: int = 4,
    joint_attention_dim: int = 12,
    pooled_projection_dim: int = 8,
    seed: int = 0,
) -> SD3Transformer2DModel:
    """A Stable-Diffusion-3-shaped ``SD3Transformer2DModel`` (MMDiT, patch 2, width 16), about 22k
    parameters; a flow-matching model: train and sample it with :func:`flow_scheduler_for_tests`.

    Args:
        sample_size: Latent spatial size; must be divisible by the patch size 2.
        num_layers: Number of joint transformer blocks.
        in_channels: Latent channels.
        joint_attention_dim: Width of ``encoder_hidden_states`` (4096 for SD3's T5 + CLIP states).
        pooled_projection_dim: Width of ``pooled_projections`` (2048 in SD3).
        seed: ``torch.manual_seed`` used for the random initialisation.
    """
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=16,
        pooled_projection_dim=pooled_projection_dim,
        pos_embed_max_size=sample_size * 2,
    )


def flow_scheduler_for_tests() -> FlowMatchEulerDiscreteScheduler:
    """``FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)`` (SD3's schedule)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=_NUM_TRAIN_TIMESTEPS, shift=3.0)


def scheduler_for_tests() -> DDPMScheduler:
    """``DDPMScheduler(num_train_timesteps=1000)`` with diffusers' default linear betas (1e-4 .. 0.02)."""
    return DDPMScheduler(num_train_timesteps=_NUM_TRAIN_TIMESTEPS)


def example_inputs(
    model: nn.Module,
    batch_size: int,
    timesteps: int | Sequence[int] | torch.Tensor | None = None,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments for one forward call of a tiny (or any) diffusers denoiser of the four classes.

    Args:
        model: A ``UNet2DModel``, ``UNet2DConditionModel``, ``DiTTransformer2DModel``,
            ``PixArtTransformer2DModel`` or ``SD3Transformer2DModel``; shapes are read from ``model.config``.
        batch_size: Number of samples B.
        timesteps: One timestep per sample (length B), one for all, or None for random integers in
            [0, 1000). Always returned as a ``(B,)`` int64 tensor (DiT and PixArt require one).
        seed: Seed of the ``torch.Generator`` drawing the sample, timesteps, labels and text states.

    Returns:
        ``{"sample" | "hidden_states": (B, C, H, W), "timestep": (B,), ...}`` plus ``class_labels`` (B,),
        ``encoder_hidden_states`` (B, 4, D), ``added_cond_kwargs`` and ``pooled_projections`` (B, P) as
        the architecture needs, on the model's device.

    Raises:
        TypeError: for a model of another class.
        ValueError: if ``timesteps`` has neither 1 nor ``batch_size`` elements.
    """
    if not isinstance(model, _ARCHS):
        raise TypeError(
            f"example_inputs does not know {type(model).__name__}; it supports UNet2DModel, "
            "UNet2DConditionModel, DiTTransformer2DModel, PixArtTransformer2DModel and "
            "SD3Transformer2DModel. Build the forward kwargs of other models yourself."
        )
    cfg = model.config
    device = module_device(model)
    gen = torch.Generator().manual_seed(seed)
    size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size,) * 2
    x = torch.randn(batch_size, cfg.in_channels, *size, generator=gen)
    if timesteps is None:
        t = torch.randint(0, _NUM_TRAIN_TIMESTEPS, (batch_size,), generator=gen)
    else:
        t = torch.as_tensor(timesteps, dtype=torch.int64).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch_size).clone()
        if t.numel() != batch_size:
            raise ValueError(
                f"example_inputs: got {t.numel()} timesteps for batch_size={batch_size}; pass one "
                "timestep per sample or a single one for all."
            )

    def labels() -> torch.Tensor:
        return torch.randint(0, _NUM_CLASSES, (batch_size,), generator=gen)

    def text(width: int) -> torch.Tensor:
        return torch.randn(batch_size, _TEXT_TOKENS, width, generator=gen)

    if isinstance(model, UNet2DConditionModel):
        inputs = {"sample": x, "timestep": t, "encoder_hidden_states": text(cfg.cross_attention_dim)}
    elif isinstance(model, UNet2DModel):
        inputs = {"sample": x, "timestep": t}
        if cfg.num_class_embeds is not None:
            inputs["class_labels"] = labels()
    elif isinstance(model, SD3Transformer2DModel):
        inputs = {
            "hidden_states": x,
            "timestep": t,
            "encoder_hidden_states": text(cfg.joint_attention_dim),
            "pooled_projections": torch.randn(batch_size, cfg.pooled_projection_dim, generator=gen),
        }
    elif isinstance(model, DiTTransformer2DModel):
        inputs = {"hidden_states": x, "timestep": t, "class_labels": labels() % cfg.num_embeds_ada_norm}
    else:  # PixArtTransformer2DModel
        # The PixArt pipeline passes these two for every resolution below 1024 px.
        inputs = {
            "hidden_states": x,
            "timestep": t,
            "encoder_hidden_states": text(cfg.caption_channels or cfg.cross_attention_dim),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
