"""Data-free distillation of a (quantized) student from a float teacher along the teacher's own samples.

EfficientDM (He et al., ICLR 2024, §3.3): no training images are needed. The float teacher runs its
sampler from pure noise; at every sampling step the student predicts the noise on the *teacher's*
``x_t`` (same timestep, same labels, same classifier-free-guidance batch) and is trained to match the
teacher's prediction,

    L = ‖ε_student(x_t, t, c) − ε_teacher(x_t, t, c)‖²,

after which the trajectory advances with the teacher's guided ε, so the student always sees inputs from
the float model's distribution. One optimizer step per sampling step; a finished trajectory restarts
from fresh noise.

Optionally each sample's squared error is weighted by min-SNR-γ (Hang et al., ICCV 2023),
``w_t = min(SNR_t, γ) / SNR_t`` with ``SNR_t = ᾱ_t / (1 − ᾱ_t)``: 1 at high noise, small near
``t = 0``. The ε error of the last low-noise steps barely moves the sample (DDIM's last step
``x₀ = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t`` has ``√(1−ᾱ_t) ≈ 0.006`` on the digits schedule) but is the largest
term of the plain MSE, which then spends the fine-tune on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler
from torch import nn
from tqdm.auto import tqdm

from diffquant.finetune.common import predict_noise, require_trainable


def distill(
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    scheduler,
    iterations: int,
    batch_size: int = 32,
    num_sampling_steps: int = 25,
    guidance_scale: float = 1.5,
    classes: Sequence[int] = range(10),
    null_class: int = 10,
    lr_scheduler=None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "distill",
    cond_kwarg: str = "class_labels",
    snr_gamma: float | None = None,
) -> list[float]:
    """Train ``student`` to predict ``teacher``'s noise on the teacher's DDIM trajectories.

    Both models are called as ``model(x_t, t, **{cond_kwarg: c})`` with a ``(B,)`` timestep tensor
    (one value per sample, so noise-level hooks see the per-sample timestep). Under guidance
    (``guidance_scale != 1``) the call batch is ``[cond, uncond]`` concatenated, as in
    :func:`diffquant.bench.digits.sampling.sample_digits`, and the student is trained on both halves.

    Args:
        student: the model to train (its trainable parameters are what ``optimizer`` steps).
        teacher: the float model; run without gradients, never modified.
        optimizer: stepped once per sampling step.
        scheduler: a diffusers scheduler; its config builds the DDIM (η = 0) sampler of the
            trajectories (e.g. the training ``DDPMScheduler``).
        iterations: optimizer steps in total; trajectories restart from fresh noise when one ends.
        batch_size: trajectories per batch (the model sees ``2 × batch_size`` rows under guidance).
        num_sampling_steps: DDIM steps of each trajectory.
        guidance_scale: classifier-free guidance weight of the teacher's trajectory (1.0: none).
        classes: class ids drawn uniformly for each trajectory.
        null_class: the "no class" id of the unconditional half.
        lr_scheduler: stepped after every optimizer step when given.
        seed: seeds the noise and the labels.
        progress: show a progress bar; desc: its label.
        cond_kwarg: name of the conditioning argument of the models' forward.
        snr_gamma: weight each sample's error by min-SNR-γ (``None``: the plain MSE of EfficientDM).

    Returns:
        The (weighted) loss of every optimizer step.

    Raises:
        ValueError: if the student has nothing to train, or on a non-positive count, an empty
            ``classes`` or a negative guidance scale.

    Example:
        >>> losses = distill(quantized, fp_model, torch.optim.Adam(quantized.parameters(), 1e-4),
        ...                  scheduler=fp_scheduler(), iterations=100)  # doctest: +SKIP
    """
    if iterations < 1 or batch_size < 1 or num_sampling_steps < 1:
        raise ValueError(
            f"iterations, batch_size and num_sampling_steps must be >= 1, got {iterations}, {batch_size} "
            f"and {num_sampling_steps}."
        )
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0 (1.0 disables guidance), got {guidance_scale}.")
    if snr_gamma is not None and not snr_gamma > 0:
        raise ValueError(f"snr_gamma must be positive (or None for the plain MSE), got {snr_gamma}.")
    class_ids = torch.as_tensor(list(classes), dtype=torch.long)
    if class_ids.numel() == 0:
        raise ValueError("classes is empty; pass the class ids to distill on, e.g. range(10).")
    require_trainable(student, "the student")
    param = next(student.parameters())
    device, dtype = param.device, param.dtype
    sample_shape = _sample_shape(teacher)
    use_cfg = guidance_scale != 1.0
    gen = torch.Generator().manual_seed(seed)
    teacher.eval()
    student.train()
    losses: list[float] = []
    bar = tqdm(total=iterations, desc=desc, disable=not progress)
    while len(losses) < iterations:
        sampler = DDIMScheduler.from_config(scheduler.config)
        sampler.set_timesteps(num_sampling_steps, device=device)
        x = torch.randn((batch_size, *sample_shape), generator=gen).to(device) * sampler.init_noise_sigma
        c = class_ids[torch.randint(0, class_ids.numel(), (batch_size,), generator=gen)].to(device)
        if use_cfg:
            c = torch.cat([c, torch.full_like(c, null_class)])  # (2B,): [cond, uncond]
        for t in sampler.timesteps:
            x_in = sampler.scale_model_input(torch.cat([x, x]) if use_cfg else x, t).to(dtype)
            t_batch = t.to(device).reshape(1).repeat(x_in.shape[0])  # (2B,): one timestep per sample
            with torch.no_grad():
                eps_teacher = predict_noise(teacher, x_in, t_batch, **{cond_kwarg: c}).float()
            eps_student = predict_noise(student, x_in, t_batch, **{cond_kwarg: c}).float()
            per_sample = (eps_student - eps_teacher).square().flatten(1).mean(1)  # (B,)
            if snr_gamma is not None:
                per_sample = per_sample * _min_snr_weight(sampler, t, snr_gamma)
            loss = per_sample.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if lr_scheduler is not None:
                lr_scheduler.step()
            losses.append(loss.item())
            bar.update()
            if len(losses) == iterations:
                break
            if use_cfg:
                eps_c, eps_u = eps_teacher.chunk(2)
                eps_teacher = eps_u + guidance_scale * (eps_c - eps_u)
            x = sampler.step(eps_teacher, t, x, return_dict=False)[0]
    bar.close()
    student.eval()
    return losses


def _min_snr_weight(sampler: DDIMScheduler, t: torch.Tensor, gamma: float) -> float:
    """``min(SNR_t, γ) / SNR_t`` of timestep ``t`` (min-SNR-γ weighting for ε prediction)."""
    alpha_bar = float(sampler.alphas_cumprod[int(t)])
    snr = alpha_bar / (1.0 - alpha_bar)
    return min(snr, gamma) / snr


def _sample_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` of one sample, from a diffusers model's config."""
    config = getattr(model, "config", None)
    channels = getattr(config, "in_channels", None)
    size = getattr(config, "sample_size", None)
    if channels is None or size is None:
        raise ValueError(
            f"cannot tell the sample shape of a {type(model).__name__}: distill reads in_channels and "
            "sample_size from the teacher's diffusers config; give the teacher a `config` with both."
        )
    height, width = size if isinstance(size, (tuple, list)) else (size, size)
    return int(channels), int(height), int(width)
