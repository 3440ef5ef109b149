"""The training loop every fine-tuning method shares: the denoising loss on images with conditioning."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffquant.devices import module_device
from diffquant.finetune.conditioning import (
    Conditioning,
    conditioning_batch_size,
    conditioning_to,
    index_conditioning,
    select_conditioning,
)
from diffquant.finetune.objectives import noisy_batch
from diffquant.finetune.resume import (
    RunCheckpointer,
    Stateful,
    TrainingCheckpoints,
    data_fingerprint,
    resume_loop,
)
from diffquant.models import get_arch_spec


def require_trainable(model: nn.Module, what: str = "the model") -> list[nn.Parameter]:
    """The parameters of ``model`` that require gradients, in registration order.

    Raises:
        ValueError: if there are none (training would silently do nothing).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"nothing to train: no parameter of {what} requires gradients. Apply a fine-tuning method "
            "first (diffquant.finetune.prepare_finetune, or e.g. diffquant.tuneqdm.apply_tuneqdm) or set "
            "requires_grad=True on the parameters to train."
        )
    return params


def _timestep_arg(model: nn.Module) -> str | None:
    name = get_arch_spec(model).timestep_arg
    if name is not None:
        return name
    params = inspect.signature(model.forward).parameters
    return "timestep" if "timestep" in params else None


def model_output(model: nn.Module, x: Tensor, t: Tensor, conditioning: Conditioning | None = None) -> Tensor:
    """Call a diffusers-style denoiser and return its output tensor (ε, v, x₀ or flow velocity).

    The timestep goes by keyword when the model names it (diffusers' PixArt and SD3 take
    ``encoder_hidden_states`` second), else positionally: ``model(x, t, **conditioning)``.
    """
    name = _timestep_arg(model)
    cond = conditioning or {}
    out = model(x, **{name: t}, **cond) if name is not None else model(x, t, **cond)
    if hasattr(out, "sample"):
        return out.sample
    return out[0] if isinstance(out, tuple) else out


def denoising_loss(
    model: nn.Module,
    x0: Tensor,
    scheduler,
    conditioning: Conditioning | None = None,
    *,
    generator: torch.Generator | None = None,
    timesteps: Tensor | None = None,
) -> Tensor:
    """The diffusion training loss ``mean ‖target − model(x_t, t, **conditioning)‖²``.

    ``x_t``, the model timestep and the target follow the scheduler's objective (ε / v / x₀
    prediction, or flow matching; see :mod:`diffquant.finetune.objectives`); for an ε scheduler this is
    the DDPM loss of Ho et al. (2020).

    Args:
        model: the denoiser.
        x0: clean samples ``(B, C, H, W)`` on the model's device.
        scheduler: the model's training scheduler.
        conditioning: model kwargs, batch ``B`` first (see :mod:`diffquant.finetune.conditioning`).
        generator: CPU generator for the timesteps and the noise (reproducible runs).
        timesteps: ``int64 (B,)`` training timesteps to use instead of uniformly drawn ones.

    Raises:
        ValueError: timesteps outside ``[0, T)`` or a scheduler whose objective is unknown.

    Example:
        >>> loss = denoising_loss(unet, latents, DDPMScheduler(),
        ...                       {"encoder_hidden_states": text_states})  # doctest: +SKIP
    """
    batch = noisy_batch(scheduler, x0, generator=generator, timesteps=timesteps)
    prediction = model_output(model, batch.x_t, batch.timestep, conditioning)
    return torch.nn.functional.mse_loss(prediction.float(), batch.target.float())


def fit_denoiser(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    images: Tensor,
    conditioning: Conditioning | None,
    scheduler,
    *,
    steps: int,
    batch_size: int = 32,
    unconditional: Conditioning | None = None,
    cond_dropout: float = 0.0,
    lr_scheduler=None,
    after_step: Callable[[], None] | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "fine-tune",
    checkpoint: TrainingCheckpoints | None = None,
    method_state: Stateful | None = None,
) -> list[float]:
    """Train a denoiser on ``images`` with their ``conditioning`` and :func:`denoising_loss`.

    Batches are drawn with replacement, so 5 images serve as well as 5,000. With ``optimizer=None``
    the caller steps its parameters elsewhere (e.g. QLISA's optimizer-in-backward hooks) and this
    loop only runs forward and backward. Per step the generator draws, in order: the batch indices,
    the dropout mask (only when ``cond_dropout > 0``), the timesteps, the noise.

    Args:
        model: the denoiser; put in train mode here, eval mode at the end.
        optimizer: stepped after every backward (``None``: no step, see above).
        images: ``(N, C, H, W)`` training images (or latents).
        conditioning: model kwargs with ``N`` rows, one per image (``None``: unconditional model), e.g.
            :func:`~diffquant.finetune.conditioning.class_conditioning` of the labels.
        scheduler: the training noise scheduler (its objective decides the loss).
        steps: optimizer steps; batch_size: images per step.
        unconditional: the conditioning that means "no condition" (batch 1 or ``N``), used by
            ``cond_dropout``.
        cond_dropout: probability of replacing a sample's conditioning with ``unconditional``
            (classifier-free-guidance training).
        lr_scheduler: stepped after each optimizer step when given.
        after_step: called after every step (e.g. QLISA's layer re-sampling).
        seed: seeds batches, dropout, timesteps and noise.
        progress: show a progress bar; desc: its label.
        checkpoint: write a training checkpoint every ``checkpoint.every`` steps and resume from one
            (:class:`~diffquant.finetune.resume.TrainingCheckpoints`): model training tensors, optimizer,
            ``lr_scheduler``, ``method_state``, the generator and the global RNGs. A resumed run ends
            with the same tensors and losses, bit for bit, as an uninterrupted one.
        method_state: state of the method kept outside the model and ``optimizer``
            (:attr:`FinetuneSetup.method_state <diffquant.finetune.registry.FinetuneSetup>`, e.g. QLISA's),
            saved in the checkpoints.

    Returns:
        The loss of every step (of the whole run when resumed).

    Raises:
        ValueError: non-positive steps / batch size, ``cond_dropout`` without ``unconditional``,
            conditioning rows that do not match the images, or nothing to train.
        CheckpointError: the checkpoint to resume is damaged, lies beyond ``steps``, or was written by a
            run with other settings, data, model or optimizer (nothing is changed then).

    Example:
        >>> losses = fit_denoiser(unet, opt, latents, {"encoder_hidden_states": states}, DDPMScheduler(),
        ...                       steps=100, unconditional={"encoder_hidden_states": empty_prompt},
        ...                       cond_dropout=0.1)  # doctest: +SKIP
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}.")
    if not 0.0 <= cond_dropout < 1.0:
        raise ValueError(f"cond_dropout must be in [0, 1), got {cond_dropout}.")
    if cond_dropout > 0 and unconditional is None:
        raise ValueError(
            "cond_dropout > 0 needs `unconditional`: the conditioning that means 'no condition' (the "
            "null class, the empty prompt's text states)."
        )
    conditioning = conditioning or {}
    rows = conditioning_batch_size(conditioning)
    if rows is not None and rows != images.shape[0]:
        raise ValueError(
            f"conditioning has {rows} rows for {images.shape[0]} images; give one conditioning per image."
        )
    if optimizer is not None:
        require_trainable(model)
    device = module_device(model)
    gen = torch.Generator().manual_seed(seed)
    settings = {}
    if checkpoint is not None:
        settings = {
            "loop": "fit_denoiser",
            "batch_size": batch_size,
            "cond_dropout": cond_dropout,
            "seed": seed,
            "scheduler": dict(scheduler.config) if hasattr(scheduler, "config") else type(scheduler).__name__,
            "data": data_fingerprint(images, conditioning, unconditional),
        }
    run = RunCheckpointer(checkpoint, model, optimizer, lr_scheduler, method_state, settings)
    start, losses, _ = resume_loop(run, gen, steps)
    model.train()

    for step in tqdm(range(start, steps), desc=desc, disable=not progress, initial=start, total=steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        cond = index_conditioning(conditioning, idx)
        if cond_dropout > 0:
            dropped = torch.rand(batch_size, generator=gen) < cond_dropout
            cond = select_conditioning(dropped, cond, unconditional)
        loss = denoising_loss(
            model, images[idx].to(device), scheduler, conditioning_to(cond, device), generator=gen
        )
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            if lr_scheduler is not None:
                lr_scheduler.step()
        if after_step is not None:
            after_step()
        losses.append(loss.item())
        run.save_if_due(step + 1, {"losses": losses, "generator": gen.get_state()})
    model.eval()
    return losses
