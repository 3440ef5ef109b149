"""Three tiny denoisers of the conditionings and objectives fine-tuning must handle, with their data:
a text-conditional UNet (v-prediction), PixArt (ε, ``added_cond_kwargs``), SD3 (flow matching)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, PixArtTransformer2DModel, UNet2DConditionModel
from torch import nn

from diffquant.finetune import model_output
from diffquant.models.tiny import (
    flow_scheduler_for_tests,
    scheduler_for_tests,
    tiny_pixart,
    tiny_sd3,
    tiny_unet2d_condition,
)

N = 4  # training images


@dataclass
class Case:
    """A float denoiser, its training scheduler and a tiny conditioned data set."""

    model: nn.Module
    scheduler: object
    images: torch.Tensor  # (N, C, H, W)
    conditioning: dict  # N rows
    unconditional: dict  # 1 row

    def calibrate(self, model: nn.Module) -> None:
        """Float calls at three noise levels (PTQ calibration of the activation tables)."""
        with torch.no_grad():
            for t in (900, 500, 100):
                model_output(model, self.images, torch.full((N,), float(t)), self.conditioning)


def _conditioning(model: nn.Module) -> dict:
    gen = torch.Generator().manual_seed(0)
    cfg = model.config
    if isinstance(model, UNet2DConditionModel):
        return {"encoder_hidden_states": torch.randn(N, 4, cfg.cross_attention_dim, generator=gen)}
    if isinstance(model, PixArtTransformer2DModel):
        return {
            "encoder_hidden_states": torch.randn(N, 4, cfg.caption_channels, generator=gen),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
    return {  # SD3
        "encoder_hidden_states": torch.randn(N, 4, cfg.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(N, cfg.pooled_projection_dim, generator=gen),
    }


def make_case(name: str) -> Case:
    model, scheduler = {
        "unet-text-v": (tiny_unet2d_condition, lambda: DDPMScheduler(prediction_type="v_prediction")),
        "pixart-eps": (tiny_pixart, scheduler_for_tests),
        "sd3-flow": (tiny_sd3, flow_scheduler_for_tests),
    }[name]
    model = model().eval()
    cfg = model.config
    ramp = torch.linspace(-1, 1, cfg.sample_size).reshape(1, 1, 1, -1)  # learnable structure
    images = (ramp * torch.tensor([1.0, -1.0, 0.5, -0.5]).reshape(N, 1, 1, 1)).expand(
        N, cfg.in_channels, cfg.sample_size, cfg.sample_size
    )
    cond = _conditioning(model)
    uncond = {k: torch.zeros_like(v[:1]) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
    return Case(model, scheduler(), images.contiguous(), cond, uncond)


CASES = ("unet-text-v", "pixart-eps", "sd3-flow")
