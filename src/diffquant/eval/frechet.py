"""Fréchet distance between Gaussians fitted to feature sets (the "F" in FID).

Heusel et al. (2017), "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium": for feature means ``μ_a, μ_b`` and covariances ``Σ_a, Σ_b``

    FD = ‖μ_a - μ_b‖² + tr(Σ_a + Σ_b - 2 (Σ_a Σ_b)^{1/2}).

Computed in float64 with ``scipy.linalg.sqrtm``. On the digits benchmark the features are the digit
classifier's penultimate layer (``DigitClassifier.features``), not Inception's.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch
from torch import nn

_SQRTM_EPS = 1e-6


def _as_features(feats: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    arr = (
        feats.detach().cpu().double().numpy()
        if isinstance(feats, torch.Tensor)
        else np.asarray(feats, np.float64)
    )
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) feature matrix, got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise ValueError(f"{name} has {arr.shape[0]} samples; a covariance needs at least 2 (use hundreds)")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or Inf; check the images fed to the feature extractor")
    return arr


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two ``(N, D)`` feature sets (float64).

    Raises:
        ValueError: not 2-D, fewer than 2 samples, different feature sizes, or NaN/Inf values.

    Warns:
        UserWarning: a set has no more samples than features, so its covariance is singular and the
            distance is biased; use more samples.
    """
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}; use the same feature extractor"
        )
    dim = a.shape[1]
    if min(a.shape[0], b.shape[0]) <= dim:
        warnings.warn(
            f"FD with {a.shape[0]} and {b.shape[0]} samples of {dim}-D features: covariance is singular and "
            "the distance is biased; use more samples than feature dimensions",
            stacklevel=2,
        )
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # (D, D)
    covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():  # singular product: regularise as pytorch-fid does
        offset = np.eye(dim) * _SQRTM_EPS
        covmean = scipy.linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    fd = float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)


@torch.inference_mode()
def classifier_features(classifier: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """``classifier.features`` over ``images`` in batches: ``(N, D)`` float32 on CPU."""
    if not hasattr(classifier, "features"):
        raise TypeError(f"{type(classifier).__name__} has no .features(x); pass a DigitClassifier")
    classifier.eval()
    return torch.cat([classifier.features(b).float().cpu() for b in images.split(batch_size)])


def image_frechet_distance(classifier: nn.Module, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """FD between two image sets ``(N, 1, S, S)`` in the classifier's feature space."""
    return frechet_distance(
        classifier_features(classifier, images_a), classifier_features(classifier, images_b)
    )


def noise_floor_fd(classifier: nn.Module, data, seed: int = 0) -> float:
    """FD between two random halves of the real images (``data.images``): the smallest FD that
    sampling noise alone produces at that sample size. Deterministic for ``seed``."""
    images = data.images
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    half = images.shape[0] // 2
    return image_frechet_distance(classifier, images[order[:half]], images[order[half : 2 * half]])
