import math

import pytest
import torch

from diffquant.eval.metrics import class_accuracy, mse, psnr


def test_psnr_of_identical_images_is_infinite():
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    assert psnr(x, x) == math.inf
    assert mse(x, x) == 0.0


def test_psnr_and_mse_of_known_error():
    ref = torch.zeros(10, 1, 8, 8)
    noisy = ref.clone()
    noisy[::2] += 0.1
    noisy[1::2] -= 0.1
    assert mse(noisy, ref) == pytest.approx(0.01)
    assert psnr(noisy, ref) == pytest.approx(10 * math.log10(4 / 0.01))  # data range 2 for [-1, 1]


def test_mismatched_or_bad_inputs_raise():
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(x, torch.zeros(3, 1, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        mse(torch.full_like(x, math.nan), x)
    with pytest.raises(ValueError, match="empty"):
        psnr(x[:0], x[:0])


class _ByBrightness(torch.nn.Module):
    """Predicts class round(mean pixel * 10) — a classifier with known outputs."""

    def forward(self, x):
        return torch.nn.functional.one_hot(x.mean((1, 2, 3)).mul(10).round().long(), 10).float()


def test_class_accuracy_counts_requested_labels():
    images = torch.stack([torch.full((1, 8, 8), v / 10) for v in range(10)])
    labels = torch.arange(10)
    assert class_accuracy(_ByBrightness(), images, labels) == 1.0
    wrong = labels.clone()
    wrong[:3] = 9
    assert class_accuracy(_ByBrightness(), images, wrong, batch_size=4) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="labels must be"):
        class_accuracy(_ByBrightness(), images, labels[:5])
