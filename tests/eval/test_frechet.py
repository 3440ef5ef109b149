import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffquant.eval.frechet import (
    classifier_features,
    frechet_distance,
    image_frechet_distance,
    noise_floor_fd,
)


@pytest.fixture
def feats():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(500, 8, generator=gen) @ torch.randn(8, 8, generator=gen) + 0.5


def test_identical_sets_have_zero_distance(feats):
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)


def test_distance_is_symmetric(feats):
    other = torch.randn(400, 8, generator=torch.Generator().manual_seed(1)) * 2
    assert frechet_distance(feats, other) == pytest.approx(frechet_distance(other, feats), rel=1e-8)


def test_mean_shift_adds_its_squared_norm(feats):
    shift = torch.tensor([0.5, -1.0, 0, 0, 2.0, 0, 0, 0.25])
    assert frechet_distance(feats, feats + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    assert frechet_distance(feats, feats + 2 * shift) > frechet_distance(feats, feats + shift)


def test_scaling_matches_closed_form(feats):
    # b = c·a: ‖(1-c)μ‖² + tr(Σ + c²Σ - 2cΣ) = (1-c)² (‖μ‖² + tr Σ)
    c = 1.7
    a = feats.double().numpy()
    expected = (1 - c) ** 2 * (a.mean(0) @ a.mean(0) + np.trace(np.cov(a, rowvar=False)))
    assert frechet_distance(feats, c * feats) == pytest.approx(expected, rel=1e-6)


def test_numpy_and_torch_inputs_agree(feats):
    other = feats * 1.1
    assert frechet_distance(feats.numpy(), other.numpy()) == pytest.approx(
        frechet_distance(feats, other), rel=1e-12
    )


def test_bad_inputs_raise_clear_errors(feats):
    with pytest.raises(ValueError, match="2-D"):
        frechet_distance(feats[0], feats)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(feats[:1], feats)
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(feats, feats[:, :4])
    bad = feats.clone()
    bad[3, 2] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(bad, feats)
    with pytest.warns(UserWarning, match="more samples than feature"):
        frechet_distance(feats[:6], feats)


class _Flatten(torch.nn.Module):
    def features(self, x):
        return x.flatten(1)


def test_image_fd_and_noise_floor():
    images = torch.randn(400, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    extractor = _Flatten()
    assert classifier_features(extractor, images, batch_size=64).shape == (400, 4)
    assert image_frechet_distance(extractor, images, images) == pytest.approx(0.0, abs=1e-9)
    data = SimpleNamespace(images=images)
    floor = noise_floor_fd(extractor, data, seed=0)
    assert floor == noise_floor_fd(extractor, data, seed=0)
    assert 0.0 < floor < 0.5  # two halves of one Gaussian: small but not zero
    assert image_frechet_distance(extractor, images, images + 1.0) > 10 * floor
    with pytest.raises(TypeError, match="features"):
        classifier_features(torch.nn.Identity(), images)
