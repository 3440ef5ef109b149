import pytest
import torch

from diffquant.quant.affine import fake_quantize, int_range, qparams_from_range, reshape_groups
from diffquant.quant.ranges import RANGE_METHODS, minmax_range, mse_range, percentile_range


def _lp_error(wg, lo, hi, bits, symmetric, p):
    """Per-group sum |w - fake_quant(w)|^p for the range (lo, hi); (G0, G1)."""
    qmin, qmax = int_range(bits, symmetric)
    scale, zp = qparams_from_range(lo, hi, bits, symmetric)
    w_hat = fake_quantize(wg, scale[..., None], zp[..., None], qmin, qmax)
    return (wg - w_hat).abs().pow(p).sum(-1)


def _student_t(shape, df=2.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(shape, generator=gen)
    chi2 = torch.distributions.Chi2(torch.tensor(df)).sample(shape)
    return normal / (chi2 / df).sqrt()


def test_minmax_range():
    torch.manual_seed(0)
    wg = torch.randn(3, 4, 16)
    lo, hi = minmax_range(wg)
    assert lo.shape == hi.shape == (3, 4)
    assert torch.equal(lo, wg.amin(-1)) and torch.equal(hi, wg.amax(-1))


@pytest.mark.parametrize("percentile", [99.99, 99.0, 90.0, 75.5])
@pytest.mark.parametrize("group_size", [1, 2, 7, 100])
def test_percentile_matches_torch_quantile(percentile, group_size):
    torch.manual_seed(group_size)
    wg = torch.randn(3, 2, group_size)
    lo, hi = percentile_range(wg, percentile)
    torch.testing.assert_close(lo, torch.quantile(wg, 1 - percentile / 100, dim=-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hi, torch.quantile(wg, percentile / 100, dim=-1), rtol=1e-6, atol=1e-6)


def test_percentile_100_is_minmax_and_bad_values_raise():
    torch.manual_seed(0)
    wg = torch.randn(2, 3, 50)
    lo, hi = percentile_range(wg, 100.0)
    assert torch.equal(lo, wg.amin(-1)) and torch.equal(hi, wg.amax(-1))
    for bad in (50.0, 10.0, 100.5):
        with pytest.raises(ValueError, match=r"\(50, 100\]"):
            percentile_range(wg, bad)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_search_beats_minmax_on_heavy_tailed_weights(symmetric):
    wg = reshape_groups(_student_t((64, 256)), 2)  # (64, 2, 128)
    lo_mm, hi_mm = minmax_range(wg)
    lo, hi = mse_range(wg, bits=4, symmetric=symmetric)
    assert lo.shape == hi.shape == (64, 2)
    # The search only shrinks the range, by at most 0.8.
    assert bool((lo.abs() <= lo_mm.abs()).all() and (hi.abs() <= hi_mm.abs()).all())
    assert bool((hi >= 0.2 * hi_mm - 1e-6).all())
    err_mse = _lp_error(wg, lo, hi, 4, symmetric, 2.4)
    err_mm = _lp_error(wg, lo_mm, hi_mm, 4, symmetric, 2.4)
    assert bool((err_mse <= err_mm).all())
    assert float(err_mse.sum()) < 0.97 * float(err_mm.sum())
    # Also better in plain squared error.
    assert float(_lp_error(wg, lo, hi, 4, symmetric, 2.0).sum()) < float(
        _lp_error(wg, lo_mm, hi_mm, 4, symmetric, 2.0).sum()
    )


def test_mse_single_candidate_is_minmax():
    torch.manual_seed(0)
    wg = torch.randn(5, 1, 32)
    lo, hi = mse_range(wg, 4, False, num_candidates=1)
    lo_mm, hi_mm = minmax_range(wg)
    assert torch.equal(lo, lo_mm) and torch.equal(hi, hi_mm)


def test_mse_picks_the_known_best_alpha():
    # One large outlier among small values: shrinking the range lowers the error of the many small ones.
    wg = torch.cat([torch.linspace(-1, 1, 63), torch.tensor([20.0])]).reshape(1, 1, 64)
    _, hi = mse_range(wg, 2, False, num_candidates=80, p=2.0)
    alphas = 1 - 0.8 * torch.arange(80) / 80
    errors = torch.stack(
        [_lp_error(wg, a * wg.amin(-1), a * wg.amax(-1), 2, False, 2.0)[0, 0] for a in alphas]
    )
    best = alphas[int(errors.argmin())]
    torch.testing.assert_close(hi, best * wg.amax(-1))
    assert float(best) < 1.0


def test_mse_rejects_bad_options():
    wg = torch.randn(1, 1, 8)
    with pytest.raises(ValueError, match="num_candidates"):
        mse_range(wg, 4, True, num_candidates=0)
    with pytest.raises(ValueError, match="p must be positive"):
        mse_range(wg, 4, True, p=0)


def test_registry_uniform_keyword_interface():
    assert set(RANGE_METHODS) == {"minmax", "percentile", "mse"}
    torch.manual_seed(0)
    wg = torch.randn(4, 2, 16)
    for fn in RANGE_METHODS.values():
        lo, hi = fn(wg, bits=4, symmetric=True)
        assert lo.shape == hi.shape == (4, 2)
        assert lo.dtype == hi.dtype == torch.float32
        assert bool((lo <= hi).all())
