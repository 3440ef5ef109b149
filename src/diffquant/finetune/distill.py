"""Data-free distillation of a (quantized) student from a float teacher along the teacher's own samples.

EfficientDM (He et al., ICLR 2024, §3.3): no training images are needed. The float teacher runs its
sampler from pure noise; at every sampling step the student predicts on the *teacher's* ``x_t`` (same
timestep, same conditioning, same classifier-free-guidance batch) and is trained to match the
teacher's output, whatever the model predicts (ε, v, x₀ or a flow velocity),

    L = ‖f_student(x_t, t, c) − f_teacher(x_t, t, c)‖²,

after which the trajectory advances with the teacher's guided output, so the student always sees inputs
from the float model's distribution. One optimizer step per sampling step; a finished trajectory
restarts from fresh noise. The sampler is DDIM (η = 0) for ε / v / x₀ schedulers and the flow-matching
Euler sampler for flow models (built from the training scheduler's config).

Optionally each sample's squared error is weighted by min-SNR-γ (Hang et al., ICCV 2023; see
:func:`~diffquant.finetune.objectives.min_snr_weight`): for ε, ``min(SNR_t, γ) / SNR_t`` with
``SNR_t = ᾱ_t / (1 − ᾱ_t)``, 1 at high noise and small near ``t = 0``. The ε error of the last low-noise
steps barely moves the sample (DDIM's last step ``x₀ = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t`` has
``√(1−ᾱ_t) ≈ 0.006`` on the digits schedule) but is the largest term of the plain MSE, which then spends
the fine-tune on it. Flow-matching models have no ᾱ table: ``snr_gamma`` is refused for them.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from torch import nn
from tqdm.auto import tqdm

from diffquant.finetune.common import model_output, require_trainable
from diffquant.finetune.conditioning import (
    Conditioning,
    concat_conditioning,
    conditioning_batch_size,
    conditioning_to,
    expand_conditioning,
    index_conditioning,
)
from diffquant.finetune.objectives import FLOW_MATCHING, min_snr_weight, prediction_type
from diffquant.finetune.resume import (
    RunCheckpointer,
    Stateful,
    TrainingCheckpoints,
    data_fingerprint,
    resume_loop,
)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    scheduler,
    iterations: int,
    conditioning: Conditioning | None = None,
    unconditional: Conditioning | None = None,
    batch_size: int = 32,
    num_sampling_steps: int = 25,
    guidance_scale: float = 1.5,
    sample_shape: tuple[int, ...] | None = None,
    lr_scheduler=None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "distill",
    snr_gamma: float | None = None,
    checkpoint: TrainingCheckpoints | None = None,
    method_state: Stateful | None = None,
) -> list[float]:
    """Train ``student`` to reproduce ``teacher``'s output on the teacher's sampling trajectories.

    Both models get a ``(B,)`` timestep tensor (one value per sample, so noise-level hooks see the
    per-sample timestep). Under guidance (``guidance_scale != 1``) the call batch is ``[cond, uncond]``
    concatenated and the student is trained on both halves. Each trajectory draws, from ``seed``'s
    generator, its starting noise, then the rows of ``conditioning`` it is conditioned on (uniformly).

    Args:
        student: the model to train (its trainable parameters are what ``optimizer`` steps).
        teacher: the float model; run without gradients, never modified.
        optimizer: stepped once per sampling step (``None``: the method steps its parameters inside
            backward, e.g. QLISA's hooks).
        scheduler: the training scheduler; its config builds the trajectories' sampler (DDIM, or
            flow-matching Euler for a flow-matching scheduler) and says what the models predict.
        iterations: optimizer steps in total; trajectories restart from fresh noise when one ends.
        conditioning: the pool of conditionings trajectories are drawn from (model kwargs, ``N`` rows;
            e.g. ``class_conditioning(torch.arange(10))`` or a set of prompt embeddings); ``None`` for an
            unconditional model.
        unconditional: the "no condition" conditioning (batch 1 or ``batch_size``) of the guided
            batch's second half; required when ``guidance_scale != 1``.
        batch_size: trajectories per batch (the model sees ``2 × batch_size`` rows under guidance).
        num_sampling_steps: sampler steps of each trajectory.
        guidance_scale: classifier-free guidance weight of the teacher's trajectory (1.0: none).
        sample_shape: ``(C, H, W)`` of one sample; default from the teacher's config (``in_channels``,
            ``sample_size``).
        lr_scheduler: stepped after every optimizer step when given.
        seed: seeds the noise and the conditioning draws.
        progress: show a progress bar; desc: its label.
        snr_gamma: weight each sample's error by min-SNR-γ (``None``: the plain MSE of EfficientDM).
        checkpoint: write a training checkpoint every ``checkpoint.every`` optimizer steps and resume
            from one (:class:`~diffquant.finetune.resume.TrainingCheckpoints`): the student's training
            tensors, optimizer, ``lr_scheduler``, ``method_state``, the generator, the global RNGs and
            the trajectory in progress. A resumed run ends with the same tensors and losses, bit for
            bit, as an uninterrupted one.
        method_state: state of the method kept outside the model and ``optimizer``, saved with it.

    Returns:
        The (weighted) loss of every optimizer step (of the whole run when resumed).

    Raises:
        ValueError: the student has nothing to train; a non-positive count; a negative guidance scale;
            guidance without ``unconditional``; an empty ``conditioning``; ``snr_gamma`` on a flow model;
            a sample shape that cannot be read from the teacher.
        CheckpointError: the checkpoint to resume is damaged, lies beyond ``iterations``, or was
            written by a run with other settings, teacher, student or optimizer (nothing is changed then).

    Example:
        >>> losses = distill(quantized, fp_model, torch.optim.Adam(quantized.parameters(), 1e-4),
        ...                  scheduler=fp_scheduler(), iterations=100,
        ...                  conditioning=class_conditioning(torch.arange(10)),
        ...                  unconditional=class_conditioning(10))  # doctest: +SKIP
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
    use_cfg = guidance_scale != 1.0
    if use_cfg and unconditional is None:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs `unconditional` (the null class, the empty prompt's "
            "states); pass it, or guidance_scale=1.0 to distill without guidance."
        )
    conditioning = conditioning or {}
    pool = conditioning_batch_size(conditioning)
    if pool == 0:
        raise ValueError("conditioning is empty; pass the conditionings to distill on (N >= 1 rows).")
    kind = prediction_type(scheduler)
    if snr_gamma is not None:
        min_snr_weight(0.5, snr_gamma, kind)  # refuses flow matching before any work
    require_trainable(student, "the student")
    param = next(student.parameters())
    device, dtype = param.device, param.dtype
    shape = tuple(sample_shape) if sample_shape is not None else _sample_shape(teacher)
    gen = torch.Generator().manual_seed(seed)
    settings = {}
    if checkpoint is not None:
        settings = {
            "loop": "distill",
            "batch_size": batch_size,
            "num_sampling_steps": num_sampling_steps,
            "guidance_scale": guidance_scale,
            "sample_shape": list(shape),
            "seed": seed,
            "snr_gamma": snr_gamma,
            "scheduler": dict(scheduler.config),
            "data": data_fingerprint(conditioning, unconditional),
            "teacher": data_fingerprint(teacher.state_dict()),
        }
    run = RunCheckpointer(checkpoint, student, optimizer, lr_scheduler, method_state, settings)
    start, losses, loop = resume_loop(run, gen, iterations)
    trajectory = loop.get("trajectory")  # (x, rows, position) of a trajectory in progress, or None
    teacher.eval()
    student.train()
    bar = tqdm(total=iterations, desc=desc, disable=not progress, initial=start)
    while len(losses) < iterations:
        sampler = _sampler(scheduler, kind)
        sampler.set_timesteps(num_sampling_steps, device=device)
        if trajectory is None:
            x = torch.randn((batch_size, *shape), generator=gen).to(device) * getattr(
                sampler, "init_noise_sigma", 1.0
            )
            rows = torch.randint(0, pool, (batch_size,), generator=gen) if pool is not None else None
            first = 0
        else:
            x, rows, first = trajectory["x"].to(device), trajectory["rows"], trajectory["position"]
            if hasattr(sampler, "set_begin_index"):  # flow-matching Euler counts its steps
                sampler.set_begin_index(first)
            trajectory = None
        cond = conditioning if rows is None else index_conditioning(conditioning, rows)
        if use_cfg:
            cond = concat_conditioning(cond, expand_conditioning(unconditional, batch_size))  # [cond, uncond]
        cond = conditioning_to(cond, device, dtype)
        for position in range(first, len(sampler.timesteps)):
            t = sampler.timesteps[position]
            x_in = torch.cat([x, x]) if use_cfg else x
            if kind != FLOW_MATCHING:
                x_in = sampler.scale_model_input(x_in, t)
            x_in = x_in.to(dtype)
            t_batch = t.to(device).reshape(1).repeat(x_in.shape[0])  # (2B,): one timestep per sample
            with torch.no_grad():
                out_teacher = model_output(teacher, x_in, t_batch, cond).float()
            out_student = model_output(student, x_in, t_batch, cond).float()
            per_sample = (out_student - out_teacher).square().flatten(1).mean(1)  # (B,)
            if snr_gamma is not None:
                per_sample = per_sample * min_snr_weight(
                    float(sampler.alphas_cumprod[int(t)]), snr_gamma, kind
                )
            loss = per_sample.mean()
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                if lr_scheduler is not None:
                    lr_scheduler.step()
            losses.append(loss.item())
            bar.update()
            if len(losses) == iterations and not run.due(len(losses)):
                break
            if use_cfg:
                out_c, out_u = out_teacher.chunk(2)
                out_teacher = out_u + guidance_scale * (out_c - out_u)
            x = sampler.step(out_teacher, t, x, return_dict=False)[0]
            going_on = position + 1 < len(sampler.timesteps)
            run.save_if_due(
                len(losses),
                {
                    "losses": losses,
                    "generator": gen.get_state(),
                    "trajectory": {"x": x, "rows": rows, "position": position + 1} if going_on else None,
                },
            )
            if len(losses) == iterations:
                break
    bar.close()
    student.eval()
    return losses


def _sampler(scheduler, kind: str):
    """A fresh trajectory sampler from the training scheduler's config."""
    if kind == FLOW_MATCHING:
        return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    return DDIMScheduler.from_config(scheduler.config)


def _sample_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` of one sample, from a diffusers model's config."""
    config = getattr(model, "config", None)
    channels = getattr(config, "in_channels", None)
    size = getattr(config, "sample_size", None)
    if channels is None or size is None:
        raise ValueError(
            f"cannot tell the sample shape of a {type(model).__name__}: distill reads in_channels and "
            "sample_size from the teacher's diffusers config; pass sample_shape=(C, H, W)."
        )
    height, width = size if isinstance(size, (tuple, list)) else (size, size)
    return int(channels), int(height), int(width)
