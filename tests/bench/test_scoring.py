import math

import pytest
import torch

from diffquant.bench.digits.classifier import DigitClassifier
from diffquant.bench.scoring import RowScorer, intervals_separate


@pytest.fixture
def scorer():
    torch.manual_seed(0)
    classifier = DigitClassifier(width=4, feature_dim=8).eval()
    real = torch.rand(300, 1, 8, 8) * 2 - 1
    labels = torch.arange(200) % 10
    with torch.no_grad():
        real_features = classifier.features(real)
    return RowScorer(classifier, real_features, labels, resamples=200, seed=0)


def test_float_row_is_its_own_reference(scorer):
    fp = torch.rand(200, 1, 8, 8) * 2 - 1
    scores = scorer.score(fp, "ddim-50")
    assert scores["fd_ratio"] == 1.0 and scores["fd_ratio_ci"] == [1.0, 1.0]
    assert scores["psnr_vs_fp"] is None and scores["psnr_vs_fp_ci"] is None
    low, high = scores["fd_ci"]
    assert 0 <= low < high and 0 <= scores["class_accuracy_ci"][0] <= scores["class_accuracy_ci"][1] <= 1


def test_rows_are_paired_with_the_float_row_of_their_sampler(scorer):
    fp = torch.rand(200, 1, 8, 8) * 2 - 1
    scorer.score(fp, "ddim-50")
    near = scorer.score((fp + 0.01 * torch.randn_like(fp)).clamp(-1, 1), "ddim-50")
    far = scorer.score((fp + 0.3 * torch.randn_like(fp)).clamp(-1, 1), "ddim-50")
    for scores in (near, far):
        for key in ("fd", "fd_ratio", "psnr_vs_fp"):
            low, high = scores[f"{key}_ci"]
            assert low <= high and math.isfinite(low), key
    # tiny perturbations barely move FD: the paired ratio interval is tight around 1
    assert near["fd_ratio_ci"][0] < 1.0 < near["fd_ratio_ci"][1]
    assert near["fd_ratio_ci"][1] - near["fd_ratio_ci"][0] < far["fd_ratio_ci"][1] - far["fd_ratio_ci"][0]
    assert intervals_separate(near["psnr_vs_fp_ci"], far["psnr_vs_fp_ci"])
    assert near["psnr_vs_fp"] > far["psnr_vs_fp"] + 10
    other = scorer.score(torch.rand(200, 1, 8, 8) * 2 - 1, "dpm-20")  # first of its sampler: a float row
    assert other["psnr_vs_fp"] is None


def test_wrong_sample_count_is_rejected(scorer):
    with pytest.raises(ValueError, match="labels"):
        scorer.score(torch.zeros(10, 1, 8, 8), "ddim-50")


def test_intervals_separate():
    assert intervals_separate([0.0, 1.0], [1.5, 2.0]) and intervals_separate([1.5, 2.0], [0.0, 1.0])
    assert not intervals_separate([0.0, 1.0], [0.9, 2.0])
    assert not intervals_separate(None, [0.0, 1.0]) and not intervals_separate(
        [0.0, float("nan")], [2.0, 3.0]
    )
