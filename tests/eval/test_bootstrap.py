import numpy as np
import pytest
import torch

from diffquant.eval.bootstrap import (
    FrechetToReference,
    bootstrap_indices,
    percentile_interval,
    resampled_mean,
)
from diffquant.eval.frechet import frechet_distance


def _correlated(n, d, seed, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen) / d**0.5
    return torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix.double() + shift


def test_fast_frechet_matches_scipy_sqrtm():
    ref = _correlated(400, 16, 0)
    fast = FrechetToReference(ref)
    for seed, shift in ((1, 0.0), (2, 0.3), (3, 2.0)):
        feats = _correlated(300, 16, seed, shift)
        assert fast(feats) == pytest.approx(frechet_distance(feats, ref), rel=1e-7, abs=1e-9)


def test_resampled_frechet_equals_distance_of_each_resample():
    ref, feats = _correlated(200, 8, 0), _correlated(100, 8, 1, 0.5)
    fast = FrechetToReference(ref)
    index = bootstrap_indices(100, 5, seed=3)
    expected = [frechet_distance(feats[torch.from_numpy(rows)], ref) for rows in index]
    np.testing.assert_allclose(fast.resampled(feats, index), expected, rtol=1e-7)


def test_indices_are_deterministic_and_in_range():
    a, b = bootstrap_indices(50, 20, seed=1), bootstrap_indices(50, 20, seed=1)
    assert np.array_equal(a, b) and a.shape == (20, 50) and a.min() >= 0 and a.max() < 50
    assert not np.array_equal(a, bootstrap_indices(50, 20, seed=2))


def test_interval_of_a_mean_covers_the_truth_at_about_its_level():
    """Statistical check: a 95 % bootstrap interval of a mean of 200 Bernoulli(0.9) draws covers 0.9
    in about 95 % of 200 experiments (binomial: 95 % ± 3.1 % at 2 sigma; we allow 88-99 %)."""
    rng = np.random.default_rng(0)
    index = bootstrap_indices(200, 400, seed=0)
    covered = 0
    for _ in range(200):
        draws = (rng.random(200) < 0.9).astype(float)
        low, high = percentile_interval(resampled_mean(draws, index))
        covered += low <= 0.9 <= high
    assert 0.88 <= covered / 200 <= 0.99


def test_paired_resampling_cancels_shared_noise():
    """Two models whose per-sample scores share most of their noise: the paired interval of the
    difference is far narrower than the two marginal intervals suggest."""
    rng = np.random.default_rng(1)
    shared = rng.normal(size=500)
    a, b = shared + 0.1 + 0.05 * rng.normal(size=500), shared + 0.05 * rng.normal(size=500)
    index = bootstrap_indices(500, 500, seed=0)
    ma, mb = resampled_mean(a, index), resampled_mean(b, index)
    low_a, high_b = percentile_interval(ma)[0], percentile_interval(mb)[1]
    assert low_a < high_b  # the marginal intervals overlap ...
    low, high = percentile_interval(ma - mb)
    assert 0.0 < low < 0.1 < high < 0.2  # ... but the paired difference excludes 0


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="n >= 2"):
        bootstrap_indices(1, 10)
    with pytest.raises(ValueError, match="level"):
        percentile_interval(np.ones(3), level=95)
    with pytest.raises(ValueError, match="no bootstrap values"):
        percentile_interval(np.array([]))
    with pytest.raises(ValueError, match="dimensions"):
        FrechetToReference(torch.randn(20, 4))(torch.randn(20, 5))
    with pytest.raises(ValueError, match="one number per sample"):
        resampled_mean(np.ones((3, 2)), bootstrap_indices(3, 2))


def test_point_shifts_the_interval_by_the_bootstrap_bias():
    values = np.arange(101, dtype=float) + 10.0  # mean 60: a bias of +10 over the point value 50
    low, high = percentile_interval(values, 0.9, point=50.0)
    plain = percentile_interval(values, 0.9)
    assert (low, high) == pytest.approx((plain[0] - 10.0, plain[1] - 10.0))
