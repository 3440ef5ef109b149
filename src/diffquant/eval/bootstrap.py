"""Paired bootstrap confidence intervals for sample-quality metrics.

A quantized model and the float model are sampled from the same seeds, so sample ``i`` of one is the
counterpart of sample ``i`` of the other. A *paired* bootstrap (Efron & Tibshirani, 1993, ch. 13)
draws sample indices with replacement once per resample and recomputes every metric of both models
on the same indices; an interval of a ratio or a difference then reflects only the noise that does
not cancel between the two. Percentile intervals: the ``(1 ± level) / 2`` quantiles of the
resampled statistic, optionally shifted by the bootstrap estimate of bias.

Fréchet distance on a resample re-uses features computed once (rows of the feature matrix are
resampled, the images are never re-scored). :class:`FrechetToReference` makes the many distances to
one fixed reference set cheap: with ``S = Σ_ref^{1/2}`` computed once,
``tr (Σ Σ_ref)^{1/2} = Σ_i √λ_i(S Σ S)``, one symmetric eigenvalue problem per resample instead of a
general matrix square root.
"""

from __future__ import annotations

import numpy as np
import torch

from diffquant.eval.frechet import _as_features

Interval = tuple[float, float]


def bootstrap_indices(n: int, resamples: int, seed: int = 0) -> np.ndarray:
    """``int64 (resamples, n)``: each row draws ``n`` indices of ``range(n)`` with replacement.

    Share one matrix between the metrics of every model scored on the same seeds: that pairs them.

    Raises:
        ValueError: ``n < 2`` or ``resamples < 1``.

    Example:
        >>> bootstrap_indices(4, 2, seed=0).shape
        (2, 4)
    """
    if n < 2 or resamples < 1:
        raise ValueError(f"need n >= 2 samples and resamples >= 1, got n={n} and resamples={resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_interval(values: np.ndarray, level: float = 0.95, point: float | None = None) -> Interval:
    """The central ``level`` percentile interval of bootstrap ``values``.

    Args:
        values: the statistic on each resample.
        level: coverage, e.g. 0.95.
        point: the statistic on the original sample. When given, the interval is shifted by the
            bootstrap estimate of bias, ``mean(values) - point``. Fréchet distance needs this: a
            resample repeats some samples and drops others, which inflates FD (by about 1 on 500
            digits), so unshifted intervals can lie wholly above the measured value.

    Raises:
        ValueError: ``level`` not in (0, 1) or no values.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95, got {level}")
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no bootstrap values; draw at least one resample")
    if point is not None:
        finite = values[np.isfinite(values)]
        if finite.size:
            values = values - (finite.mean() - point)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


class FrechetToReference:
    """Fréchet distance of feature sets to one fixed reference set (float64), for many resamples.

    Equals :func:`~diffquant.eval.frechet.frechet_distance` ``(feats, reference)`` up to rounding
    when both covariances are positive definite (more samples than feature dimensions).

    Args:
        reference: ``(M, D)`` reference features (e.g. of the real images).

    Example:
        >>> ref = FrechetToReference(torch.randn(500, 8))
        >>> ref(torch.randn(500, 8)) < 1.0
        True
    """

    def __init__(self, reference: torch.Tensor | np.ndarray) -> None:
        ref = _as_features(reference, "reference")
        self.dim = ref.shape[1]
        self.mean = ref.mean(0)
        sigma = np.cov(ref, rowvar=False)  # (D, D)
        self.trace = float(np.trace(sigma))
        eigval, eigvec = np.linalg.eigh(sigma)
        self.sqrt_sigma = (eigvec * np.sqrt(np.clip(eigval, 0.0, None))) @ eigvec.T  # Σ_ref^{1/2}

    def __call__(self, feats: torch.Tensor | np.ndarray) -> float:
        """FD of ``(N, D)`` features to the reference.

        Raises:
            ValueError: not 2-D, fewer than 2 samples, NaN/Inf, or a feature size unlike the reference.
        """
        arr = _as_features(feats, "feats")
        if arr.shape[1] != self.dim:
            raise ValueError(f"features have {arr.shape[1]} dimensions, the reference {self.dim}")
        return self._distance(arr)

    def _distance(self, arr: np.ndarray) -> float:
        sigma = np.cov(arr, rowvar=False)  # (D, D)
        eig = np.linalg.eigvalsh(self.sqrt_sigma @ sigma @ self.sqrt_sigma)
        diff = arr.mean(0) - self.mean
        fd = diff @ diff + np.trace(sigma) + self.trace - 2.0 * np.sqrt(np.clip(eig, 0.0, None)).sum()
        return max(float(fd), 0.0)

    def resampled(self, feats: torch.Tensor | np.ndarray, index: np.ndarray) -> np.ndarray:
        """``float64 (B,)``: the distance of ``feats[index[b]]`` for each row ``b`` of ``index``."""
        arr = _as_features(feats, "feats")
        if arr.shape[1] != self.dim:
            raise ValueError(f"features have {arr.shape[1]} dimensions, the reference {self.dim}")
        return np.array([self._distance(arr[rows]) for rows in np.asarray(index)])


def resampled_mean(values: torch.Tensor | np.ndarray, index: np.ndarray) -> np.ndarray:
    """``float64 (B,)``: the mean of ``values[index[b]]`` for each resample ``b`` (per-sample values ``(N,)``)."""
    arr = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"values must be one number per sample, shape (N,), got {arr.shape}")
    return arr[np.asarray(index)].mean(axis=1)
