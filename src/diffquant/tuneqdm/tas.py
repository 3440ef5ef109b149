"""Tell TuneQDM layers the timestep: by hand (`set_timestep`) or from every forward (`register_tas_pre_hook`).

A layer with timestep-aware scales (TAS, ``num_experts > 1``) reads the timestep from, in order:
the value set with `set_timestep`; the noise-level context of the current denoiser call
(:func:`diffquant.noise.current_noise_level`, one timestep per sample), which `register_tas_pre_hook`
attaches; otherwise it raises ``RuntimeError``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from diffquant.noise import NoiseContextHandle, NoiseSchedule, attach_noise_context
from diffquant.tuneqdm.apply import tuneqdm_config, tuneqdm_layers

__all__ = ["register_tas_pre_hook", "set_timestep"]


def set_timestep(model: nn.Module, timestep: Any) -> None:
    """Fix the timestep every TuneQDM layer of ``model`` uses in the following forwards.

    Takes precedence over the noise-level context; ``None`` clears it. Useful in training loops that
    call the denoiser themselves, and with gradient checkpointing (recomputation in backward runs
    outside the denoiser call, where no noise-level context is set).

    Args:
        model: A model prepared by `apply_tuneqdm` / `quantize_model`.
        timestep: An int, a float, a 0-d or ``(B,)`` tensor of training timesteps in
            ``[0, total_denoising_steps)`` (one per sample: a batch may mix timesteps), or None.

    Raises:
        ValueError: a timestep out of range or with more than one dimension; no TuneQDM layers.
        TypeError: a bool or complex timestep.

    Example:
        >>> set_timestep(unet, timesteps)  # (B,) int64, the ones the noise was added at
        >>> loss = F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=emb).sample, noise)
    """
    tuneqdm_config(model)  # raises when there are no TuneQDM layers
    for layer in tuneqdm_layers(model).values():
        layer.set_timestep(timestep)


def register_tas_pre_hook(
    model: nn.Module,
    num_experts: int,
    num_inference_steps: int | None = None,
    *,
    schedule: NoiseSchedule | Any | None = None,
    timestep_arg: Any = None,
) -> NoiseContextHandle:
    """Make ``model`` pick each sample's scale expert from the timestep argument of every forward.

    Attaches the noise-level context (:func:`diffquant.noise.attach_noise_context`): a forward pre-hook
    publishes the per-sample timestep of each denoiser call, so classifier-free guidance (one call on a
    doubled batch), multistep solvers and mixed-timestep training batches all select experts from the
    real timestep. Clears any timestep fixed with `set_timestep` (it would take precedence).

    Gradient checkpointing recomputes blocks during backward, outside the denoiser call; there, use
    `set_timestep` instead, or run the backward inside ``diffquant.noise.noise_level(t)``.

    Args:
        model: The denoiser prepared by `apply_tuneqdm` / `quantize_model`.
        num_experts: Must equal the layers' ``num_experts`` (guards against loading scales trained with
            another TAS setting).
        num_inference_steps: Accepted for compatibility with the reference code, whose hook counted
            calls to derive the timestep; experts here come from the real timestep, so the step count
            does not matter and is only checked to be a positive int.
        schedule: Forwarded to `attach_noise_context` (a diffusers scheduler or `NoiseSchedule`), so
            other timestep-dependent parts still get log-SNR; its ``num_train_timesteps`` must equal
            ``total_denoising_steps``.
        timestep_arg: Forwarded to `attach_noise_context` (the ``forward`` argument holding the
            timestep; default from the architecture).

    Returns:
        The noise-context handle; ``handle.remove()`` detaches it.

    Raises:
        ValueError: ``num_experts`` differs from the layers', a bad ``num_inference_steps``, a schedule
            with another number of training timesteps, or no TuneQDM layers.
        TypeError: a schedule without ``alphas_cumprod``.

    Example:
        >>> handle = register_tas_pre_hook(pipe.unet, config.num_experts, num_inference_steps=50)
        >>> image = pipe(prompt, num_inference_steps=50).images[0]
    """
    config = tuneqdm_config(model)
    if num_experts != config.num_experts:
        raise ValueError(
            f"register_tas_pre_hook got num_experts={num_experts}, but the model's TuneQDM layers have "
            f"{config.num_experts}; pass config.num_experts (load_delta_config(path).num_experts)."
        )
    if num_inference_steps is not None and (
        isinstance(num_inference_steps, bool)
        or not isinstance(num_inference_steps, int)
        or num_inference_steps < 1
    ):
        raise ValueError(f"num_inference_steps must be a positive int or None, got {num_inference_steps!r}.")
    if schedule is not None and not isinstance(schedule, NoiseSchedule):
        schedule = NoiseSchedule.from_scheduler(schedule)
    if schedule is not None and schedule.num_train_timesteps != config.total_denoising_steps:
        raise ValueError(
            f"the schedule has {schedule.num_train_timesteps} training timesteps but the TuneQDM layers "
            f"select experts over total_denoising_steps={config.total_denoising_steps}; build the config "
            "with total_denoising_steps=scheduler.config.num_train_timesteps."
        )
    handle = attach_noise_context(model, schedule, timestep_arg=timestep_arg)
    set_timestep(model, None)
    return handle
