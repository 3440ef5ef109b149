"""``quantize_pipeline``: calibrated quantization of a diffusers pipeline's denoiser by running the pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from diffquant.api import _WEIGHT_METHODS, quantize_
from diffquant.config import QuantConfig
from diffquant.models import GENERIC_SPEC, get_arch_spec


def quantize_pipeline(
    pipe: Any,
    config: QuantConfig,
    *,
    prompts: Sequence[str] = ("a photograph",),
    num_inference_steps: int = 10,
    component: str | None = None,
    seed: int = 0,
    progress: bool = False,
    **pipe_kwargs: Any,
) -> Any:
    """Quantize ``pipe``'s denoiser in place, calibrating on the pipeline's own sampling runs.

    The calibration run is ``pipe(prompt=list(prompts), num_inference_steps=..., output_type="latent",
    generator=seeded, **pipe_kwargs)`` on the float denoiser; its denoiser calls are recorded and replayed
    (see :func:`diffquant.quantize_`), and the pipeline's scheduler gives the noise levels. Works for
    calibration-free configs too. The scheduler gives noise levels to timestep-aware quantizers when it
    has ``alphas_cumprod`` (DDPM / DDIM / DPM-Solver); flow-matching pipelines (SD3, Flux) get none, so use
    static or dynamic activations there. Afterwards ``pipe.save_pretrained(dir)`` writes a diffquant checkpoint
    that ``DiffusionPipeline.from_pretrained(dir)`` loads without calibrating again.

    Args:
        pipe: a diffusers pipeline.
        config: what to quantize and how (static / timestep-aware activations, GPTQ / Qronos allowed).
        prompts: calibration prompts (one batch).
        num_inference_steps: sampling steps of the calibration run.
        component: the denoiser's name; default ``"unet"`` if the pipeline has one, else ``"transformer"``.
        seed: seed of the calibration run's generator.
        progress: show progress bars (passed to :func:`diffquant.quantize_`).
        **pipe_kwargs: more arguments for the pipeline call (``height``, ``guidance_scale``...).

    Returns:
        ``pipe`` (its denoiser quantized).

    Raises:
        ValueError: if the pipeline has no such component; if GPTQ / Qronos is asked to run block- or
            layer-sequentially on a denoiser without an ArchSpec (SD3, Flux: use ``sequential="off"``); or
            from :func:`diffquant.quantize_`.

    Example:
        >>> cfg = QuantConfig(weights=WeightQuantConfig(bits=4, method="gptq"),
        ...                   activations=ActivationQuantConfig(bits=8, mode="static"))
        >>> quantize_pipeline(pipe, cfg, prompts=["a cat", "a dog"], num_inference_steps=20)
        >>> pipe.save_pretrained("sd-w4a8")
    """
    name = component or ("unet" if getattr(pipe, "unet", None) is not None else "transformer")
    denoiser = getattr(pipe, name, None)
    if not isinstance(denoiser, torch.nn.Module):
        raise ValueError(
            f"{type(pipe).__name__} has no {name!r} model to quantize; pass component=<the denoiser's name>."
        )

    def calibrate(model: torch.nn.Module) -> None:
        generator = torch.Generator().manual_seed(seed)
        pipe(
            prompt=list(prompts),
            num_inference_steps=num_inference_steps,
            output_type="latent",
            generator=generator,
            **pipe_kwargs,
        )

    _check_sequential_calibration(denoiser, config)
    # DDPM-family schedulers give each timestep's log-SNR; flow-matching ones have no alphas_cumprod
    schedule = pipe.scheduler if hasattr(pipe.scheduler, "alphas_cumprod") else None
    quantize_(denoiser, config, calibrate=calibrate, schedule=schedule, progress=progress)
    return pipe


def _check_sequential_calibration(denoiser: torch.nn.Module, config: QuantConfig) -> None:
    """Block / layer-sequential GPTQ or Qronos needs the denoiser's block order (an ArchSpec)."""
    method = _WEIGHT_METHODS.get(config.weights.method)
    if (
        method is not None
        and method.needs_calibration
        and config.weights.sequential != "off"
        and get_arch_spec(denoiser) is GENERIC_SPEC
    ):
        raise ValueError(
            f"{type(denoiser).__name__} has no diffquant ArchSpec, so {config.weights.method!r} cannot run "
            f"sequential={config.weights.sequential!r} (it needs the order of the denoiser's blocks). Use "
            "WeightQuantConfig(sequential='off') (every layer calibrated on float inputs), or register the "
            "architecture with diffquant.models.register_arch."
        )
