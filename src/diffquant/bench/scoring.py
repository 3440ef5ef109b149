"""Quality scores of one demo row with 95 % paired-bootstrap intervals.

Every row is sampled from the same seeds and labels as the float row of its sampler, so sample ``i``
of a row and of its float row share their starting noise and digit. One matrix of bootstrap indices
is drawn per run and applied to every row and to its float row alike (a paired bootstrap, see
:mod:`diffquant.eval.bootstrap`): FD, FD / FP, class accuracy and PSNR vs FP are recomputed on each
resample from features and per-sample scores computed once.

FD and FD / FP intervals are shifted by the bootstrap estimate of bias: a resample repeats some
samples, which inflates FD (on 500 real digits it doubles it). Even shifted, bootstrap FD intervals
are conservative — measured on real digits, about 2.5× wider than the spread of FD over random
subsets of the same size — so comparisons rest on the paired FD / FP intervals, where the distortion
hits the row and the float row alike, and on class accuracy and PSNR (means of per-sample scores,
for which the plain percentile bootstrap is sound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from diffquant.bench.digits.classifier import predict
from diffquant.eval.bootstrap import FrechetToReference, bootstrap_indices, percentile_interval
from diffquant.eval.frechet import classifier_features, frechet_distance
from diffquant.eval.metrics import DATA_RANGE, class_accuracy, psnr

CI_LEVEL = 0.95


@dataclass
class _FloatScores:
    samples: torch.Tensor  # (N, 1, S, S)
    fd: float
    resampled_fd: np.ndarray  # (B,)


class RowScorer:
    """Scores rows against the real digits and against the float row of the same sampler.

    Args:
        classifier: the digit classifier (features for FD, predictions for class accuracy).
        real_features: ``(M, D)`` classifier features of the real digits.
        labels: ``(N,)`` the digit requested for each sample (the same for every row).
        resamples: bootstrap resamples.
        seed: seed of the bootstrap indices.
    """

    def __init__(
        self,
        classifier: nn.Module,
        real_features: torch.Tensor,
        labels: torch.Tensor,
        *,
        resamples: int = 1000,
        seed: int = 0,
    ) -> None:
        self.classifier = classifier
        self.real_features = real_features
        self.reference = FrechetToReference(real_features)
        self.labels = labels
        self.index = bootstrap_indices(len(labels), resamples, seed)  # (B, N), shared by every row
        self.floats: dict[str, _FloatScores] = {}

    def score(self, samples: torch.Tensor, sampler: str) -> dict[str, Any]:
        """Point values and ``[low, high]`` intervals of ``fd``, ``fd_ratio``, ``class_accuracy`` and
        ``psnr_vs_fp`` (``None`` for the float row itself). The first row scored under a sampler is
        that sampler's float row.

        Raises:
            ValueError: ``samples`` do not match the labels in number.
        """
        if samples.shape[0] != len(self.labels):
            raise ValueError(f"{samples.shape[0]} samples for {len(self.labels)} labels")
        feats = classifier_features(self.classifier, samples).double().numpy()  # (N, D)
        fd = frechet_distance(feats, self.real_features)
        resampled_fd = self.reference.resampled(feats, self.index)
        fp = self.floats.setdefault(sampler, _FloatScores(samples, fd, resampled_fd))
        correct = (predict(self.classifier, samples) == self.labels).double().numpy()  # (N,)
        accuracy = class_accuracy(self.classifier, samples, self.labels)
        scores: dict[str, Any] = {
            "fd": fd,
            "fd_ci": percentile_interval(resampled_fd, CI_LEVEL, point=fd),
            "fd_ratio": fd / fp.fd,
            "fd_ratio_ci": percentile_interval(resampled_fd / fp.resampled_fd, CI_LEVEL, point=fd / fp.fd),
            "class_accuracy": accuracy,
            "class_accuracy_ci": percentile_interval(
                correct[self.index].mean(axis=1), CI_LEVEL, point=accuracy
            ),
            "psnr_vs_fp": None,
            "psnr_vs_fp_ci": None,
        }
        if fp.samples is not samples:
            per_sample_mse = (
                ((samples.double() - fp.samples.double()) ** 2).flatten(1).mean(1).numpy()
            )  # (N,)
            resampled_mse = per_sample_mse[self.index].mean(axis=1)  # (B,)
            with np.errstate(divide="ignore"):
                resampled_psnr = 10.0 * np.log10(DATA_RANGE**2 / resampled_mse)
            scores["psnr_vs_fp"] = psnr(samples, fp.samples)
            scores["psnr_vs_fp_ci"] = percentile_interval(
                resampled_psnr, CI_LEVEL, point=scores["psnr_vs_fp"]
            )
        return {k: list(v) if isinstance(v, tuple) else v for k, v in scores.items()}


def intervals_separate(a: list[float] | None, b: list[float] | None) -> bool:
    """Whether two ``[low, high]`` intervals do not overlap (the only differences the report claims)."""
    if a is None or b is None or any(math.isnan(x) for x in (*a, *b)):
        return False
    return a[1] < b[0] or b[1] < a[0]
