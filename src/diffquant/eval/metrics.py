"""Per-sample fidelity metrics: class accuracy of generated digits, and PSNR / MSE against the FP
model's samples from the same seeds. Images are in ``[-1, 1]`` (data range 2)."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio

DATA_RANGE = 2.0


def _check_pair(images: torch.Tensor, reference: torch.Tensor) -> None:
    if images.shape != reference.shape:
        raise ValueError(
            f"images {tuple(images.shape)} and reference {tuple(reference.shape)} differ in shape; "
            "compare samples generated from the same seeds and labels"
        )
    if images.numel() == 0:
        raise ValueError("images are empty; generate at least one sample")
    if not (torch.isfinite(images).all() and torch.isfinite(reference).all()):
        raise ValueError("images or reference contain NaN/Inf; check the sampler output")


@torch.inference_mode()
def class_accuracy(
    classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> float:
    """Fraction of ``images`` that ``classifier`` assigns to the requested ``labels`` (prompt fidelity).

    Raises:
        ValueError: ``labels`` is not ``(N,)`` for ``N`` images.
    """
    labels = torch.as_tensor(labels)
    if labels.shape != (images.shape[0],) or images.shape[0] == 0:
        raise ValueError(f"labels must be (N,) with N={images.shape[0]} >= 1, got {tuple(labels.shape)}")
    classifier.eval()
    pred = torch.cat([classifier(b).argmax(1).cpu() for b in images.split(batch_size)])
    return (pred == labels.cpu()).float().mean().item()


def mse(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error over all pixels."""
    _check_pair(images, reference)
    return torch.mean((images.double() - reference.double()) ** 2).item()


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB over all pixels, ``10 log10(2² / MSE)``; ``inf`` if identical."""
    _check_pair(images, reference)
    return peak_signal_noise_ratio(images.double(), reference.double(), data_range=DATA_RANGE).item()
