import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffquant.ptq import InputStatistics, NotPositiveDefiniteError, unfold_conv_input
from diffquant.ptq.hessian import (
    condition_number,
    damped_cholesky_inverse,
    dead_inputs,
    fix_dead_inputs,
    spectral_norm,
)


def _moment(a, b):
    """One-shot ``2/n Σ a bᵀ`` over the rows of ``(n, in)`` inputs, in float64."""
    return 2.0 * a.double().T @ b.double() / a.shape[0]


# --- InputStatistics ---------------------------------------------------------------------------------


def test_streaming_equals_one_shot():
    x_float = torch.randn(700, 24) * torch.linspace(0.1, 3.0, 24)
    x_tilde = x_float + 0.1 * torch.randn_like(x_float)
    stats = InputStatistics()
    for lo, hi in [(0, 1), (1, 65), (65, 300), (300, 700)]:
        stats.add(x_tilde[lo:hi], x_float[lo:hi])
    assert stats.count == 700
    assert stats.H.dtype == torch.float32 and stats.G.dtype == torch.float32
    torch.testing.assert_close(stats.H.double(), _moment(x_tilde, x_tilde), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.G.double(), _moment(x_float, x_tilde), rtol=1e-5, atol=1e-5)


def test_leading_dims_are_flattened_and_float64_kept():
    x = torch.randn(4, 10, 8, dtype=torch.float64)  # (batch, tokens, in)
    stats = InputStatistics(8, dtype=torch.float64)
    stats.add(x[:2])
    stats.add(x[2:])
    assert stats.count == 40
    torch.testing.assert_close(stats.H, _moment(x.reshape(-1, 8), x.reshape(-1, 8)), rtol=1e-12, atol=1e-12)


def test_low_precision_inputs_accumulate_in_float32():
    x = torch.randn(64, 16).to(torch.bfloat16)
    stats = InputStatistics()
    stats.add(x)
    assert stats.H.dtype == torch.float32
    torch.testing.assert_close(stats.H.double(), _moment(x.float(), x.float()), rtol=1e-5, atol=1e-5)


def test_hessian_is_symmetric_psd():
    x = torch.randn(300, 32) @ torch.randn(32, 32)
    stats = InputStatistics()
    stats.add(x[:100])
    stats.add(x[100:])
    H = stats.H
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-5 * H.abs().max().item())
    eigvals = torch.linalg.eigvalsh(H.double())
    assert eigvals.min() >= -1e-5 * eigvals.max()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_raise(bad):
    x = torch.randn(8, 4)
    x[3, 1] = bad
    stats = InputStatistics()
    with pytest.raises(ValueError, match="calibration inputs .* contain NaN/Inf"):
        stats.add(x)
    with pytest.raises(ValueError, match="calibration inputs .* contain NaN/Inf"):
        stats.add(torch.randn(8, 4), x_float=x)
    assert stats.count == 0


def test_empty_statistics_raise():
    stats = InputStatistics(4)
    with pytest.raises(ValueError, match="no calibration data"):
        _ = stats.H
    with pytest.raises(ValueError, match="no calibration data"):
        _ = stats.G
    stats.add(torch.randn(5, 4))
    with pytest.raises(ValueError, match="pass x_float"):
        _ = stats.G


def test_shape_mismatches_raise():
    stats = InputStatistics(4)
    with pytest.raises(ValueError, match="5 features, expected 4"):
        stats.add(torch.randn(3, 5))
    with pytest.raises(ValueError, match="x_float shape"):
        stats.add(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"\(N, in\)"):
        stats.add(torch.randn(4))
    stats.add(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="every add"):
        stats.add(torch.randn(3, 4))


# --- conv unfolding ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=(3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1)),
        dict(kernel_size=1),
        dict(kernel_size=4, padding="same"),
        dict(kernel_size=3, padding="valid"),
        dict(kernel_size=3, padding=1, padding_mode="reflect"),
        dict(kernel_size=3, padding=1, padding_mode="circular"),
    ],
)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_unfold_matches_conv2d(kwargs):
    conv = nn.Conv2d(5, 7, **kwargs)
    x = torch.randn(2, 5, 9, 8)
    y = conv(x)  # (N, out, H_out, W_out)
    cols = unfold_conv_input(x, conv)  # (N*L, C*kh*kw)
    n, out, h_out, w_out = y.shape
    assert cols.shape == (n * h_out * w_out, conv.weight[0].numel())
    y_cols = cols @ conv.weight.reshape(out, -1).T + conv.bias  # (N*L, out)
    y_cols = y_cols.reshape(n, h_out, w_out, out).permute(0, 3, 1, 2)
    torch.testing.assert_close(y_cols, y, rtol=1e-5, atol=1e-5)


def test_unfold_rejects_grouped_conv_and_bad_input():
    with pytest.raises(ValueError, match="grouped convolutions"):
        unfold_conv_input(torch.randn(1, 4, 5, 5), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        unfold_conv_input(torch.randn(4, 5, 5), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="channels"):
        unfold_conv_input(torch.randn(1, 3, 5, 5), nn.Conv2d(4, 4, 3))


def test_unfolded_statistics_give_the_conv_output_error():
    """``ΔW H ΔWᵀ`` on unfolded patches equals the conv's squared output error."""
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    cols = unfold_conv_input(x, conv)
    stats = InputStatistics(dtype=torch.float64)
    stats.add(cols)
    delta = 0.01 * torch.randn(4, 27, dtype=torch.float64)  # (out, in*kh*kw)
    out_err = F.conv2d(x, delta.reshape(4, 3, 3, 3), padding=1).square().sum()
    torch.testing.assert_close((delta @ stats.H * delta).sum() * stats.count / 2, out_err)


# --- dead inputs, damping, conditioning ---------------------------------------------------------------


def test_fix_dead_inputs():
    x = torch.randn(50, 6)
    x[:, 2] = 0
    x[:, 5] = 0
    H = _moment(x, x).float()
    W = torch.randn(3, 6)
    H_fixed, W_fixed, dead = fix_dead_inputs(H, W)
    assert dead.tolist() == [False, False, True, False, False, True]
    assert torch.equal(dead_inputs(H), dead)
    assert (H_fixed.diagonal()[dead] == 1).all() and (W_fixed[:, dead] == 0).all()
    assert torch.equal(W_fixed[:, ~dead], W[:, ~dead]) and (W[:, dead] != 0).all()  # inputs untouched
    torch.linalg.cholesky(H_fixed)


def test_damped_cholesky_inverse_factorises_the_damped_inverse():
    x = torch.randn(200, 16) @ torch.randn(16, 16)
    H = _moment(x, x).float()
    U, lam, retries = damped_cholesky_inverse(H, percdamp=0.01)
    assert retries == 0
    assert lam == pytest.approx(0.01 * H.diagonal().mean().item(), rel=1e-6)
    assert torch.equal(U, torch.triu(U))
    expected = torch.linalg.inv(H.double() + lam * torch.eye(16, dtype=torch.float64))
    torch.testing.assert_close(
        (U.T @ U).double(), expected, rtol=1e-3, atol=1e-5 * expected.abs().max().item()
    )


def test_indefinite_hessian_raises_clear_error():
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite.*raise percdamp"):
        damped_cholesky_inverse(-torch.eye(8))
    assert issubclass(NotPositiveDefiniteError, ValueError)


def test_singular_psd_hessian_succeeds_with_retries():
    x = torch.randn(8, 64)  # 8 samples for 64 features: rank 8
    H = _moment(x, x).float()
    U, lam, retries = damped_cholesky_inverse(H, percdamp=1e-9, max_retries=10)
    assert retries >= 1
    assert lam == pytest.approx(1e-9 * H.diagonal().mean().item() * 10**retries, rel=1e-4)
    assert torch.isfinite(U).all()
    with pytest.raises(NotPositiveDefiniteError):
        damped_cholesky_inverse(H, percdamp=1e-9, max_retries=0)


def test_damping_argument_validation():
    with pytest.raises(ValueError, match="square"):
        damped_cholesky_inverse(torch.ones(3, 4))
    with pytest.raises(ValueError, match="NaN/Inf"):
        damped_cholesky_inverse(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="damping must be >= 0"):
        damped_cholesky_inverse(torch.eye(3), percdamp=-1.0)


def test_spectral_norm_and_condition_number():
    q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    eigvals = torch.logspace(0, -4, 40, dtype=torch.float64)  # cond 1e4, clear gaps at both ends
    H = (q * eigvals) @ q.T
    assert spectral_norm(H) == pytest.approx(1.0, rel=1e-3)
    assert condition_number(H.float()) == pytest.approx(1e4, rel=0.05)
    assert condition_number(-torch.eye(4)) == float("inf")
