"""Checks and losses every fine-tuning method shares."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffquant.devices import module_device


def require_trainable(model: nn.Module, what: str = "the model") -> list[nn.Parameter]:
    """The parameters of ``model`` that require gradients, in registration order.

    Raises:
        ValueError: if there are none (training would silently do nothing).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"nothing to train: no parameter of {what} requires gradients. Apply a fine-tuning method "
            "first (e.g. diffquant.tuneqdm.apply_tuneqdm, diffquant.efficientdm.apply_qalora, "
            "peft LoRA) or set requires_grad=True on the parameters to train."
        )
    return params


def predict_noise(model: nn.Module, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
    """Call a diffusers-style denoiser and return its ε prediction as a tensor."""
    out = model(x, t, **cond)
    if hasattr(out, "sample"):
        return out.sample
    return out[0] if isinstance(out, tuple) else out


def denoising_loss(
    model: nn.Module,
    x0: Tensor,
    scheduler,
    *,
    generator: torch.Generator | None = None,
    timesteps: Tensor | None = None,
    **cond: Tensor,
) -> Tensor:
    """The DDPM ε-prediction loss (Ho et al., 2020): ``mean ‖ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t)‖²``.

    Args:
        model: the denoiser, called as ``model(x_t, t, **cond)``.
        x0: clean images ``(B, C, H, W)`` on the model's device.
        scheduler: a diffusers scheduler with ``add_noise`` and ``config.num_train_timesteps``.
        generator: CPU generator for the noise and timesteps (reproducible runs).
        timesteps: ``int64 (B,)`` to use instead of uniformly drawn ones.
        cond: extra model inputs, e.g. ``class_labels``.
    """
    num_train = int(scheduler.config.num_train_timesteps)
    if timesteps is None:
        timesteps = torch.randint(0, num_train, (x0.shape[0],), generator=generator)
    elif bool(((timesteps < 0) | (timesteps >= num_train)).any()):
        raise ValueError(f"timesteps must lie in [0, {num_train - 1}] (the scheduler's range).")
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    t = timesteps.to(x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    return torch.nn.functional.mse_loss(predict_noise(model, x_t, t, **cond).float(), noise.float())


def fit_denoiser(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    images: Tensor,
    labels: Tensor,
    scheduler,
    *,
    steps: int,
    batch_size: int = 32,
    label_dropout: float = 0.0,
    null_class: int | None = None,
    lr_scheduler=None,
    after_step: Callable[[], None] | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "fine-tune",
) -> list[float]:
    """Train a class-conditional denoiser on ``(images, labels)`` with :func:`denoising_loss`.

    Batches are drawn with replacement, so 5 images serve as well as 5,000. With ``optimizer=None``
    the caller steps its parameters elsewhere (e.g. QLISA's optimizer-in-backward hooks) and this
    loop only runs forward and backward.

    Args:
        model: denoiser called as ``model(x_t, t, class_labels=c)``; put in train mode here.
        optimizer: stepped after every backward (``None``: no step, see above).
        images: ``(N, C, H, W)`` training images; labels: ``int64 (N,)`` class ids.
        scheduler: the training noise scheduler.
        steps: optimizer steps; batch_size: images per step.
        label_dropout: probability of replacing a label with ``null_class`` (keeps classifier-free
            guidance working).
        lr_scheduler: stepped after each optimizer step when given.
        after_step: called after every step (e.g. QLISA's layer re-sampling).
        seed: seeds batches, timesteps, noise and label dropout.

    Returns:
        The loss of every step.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}.")
    if label_dropout > 0 and null_class is None:
        raise ValueError("label_dropout > 0 needs null_class (the label that means 'no class').")
    if optimizer is not None:
        require_trainable(model)
    device = module_device(model)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses: list[float] = []

    for _ in tqdm(range(steps), desc=desc, disable=not progress):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        c = labels[idx].clone()
        if label_dropout > 0:
            c[torch.rand(batch_size, generator=gen) < label_dropout] = null_class
        loss = denoising_loss(
            model, images[idx].to(device), scheduler, generator=gen, class_labels=c.to(device)
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
    model.eval()
    return losses
