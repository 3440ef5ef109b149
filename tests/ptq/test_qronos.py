import statistics

import pytest
import torch

from diffquant.ptq import InputStatistics, NotPositiveDefiniteError, gptq_quantize, qronos_quantize
from diffquant.quant.affine import (
    choose_qparams,
    dequantize_weight,
    fake_quantize,
    int_range,
    qparams_from_range,
    quantize_weight,
)


def correlated_inputs(n, d, seed, decay=2.0):
    """``(n, d)`` inputs mixing ``d`` latent factors with singular values ``1 .. 10**-decay``."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -decay, d)
    return torch.randn(n, d, generator=g) @ mix.T


def statistics_of(x_tilde, x_float, dtype=torch.float32):
    stats = InputStatistics(dtype=dtype)
    stats.add(x_tilde, x_float)
    return stats.H, stats.G


def rtn(W, bits):
    scale, zp = choose_qparams(W, bits, True)
    return dequantize_weight(quantize_weight(W, scale, zp, bits, True), scale, zp)


def mismatched_error(W, W_hat, x_float, x_tilde):
    """‖W X − Ŵ X̃‖: the quantized layer on quantized-path inputs against the float layer's outputs."""
    return (x_float @ W.T - x_tilde @ W_hat.T).norm().item()


def noisy(x, seed):
    g = torch.Generator().manual_seed(seed)
    return x + 0.2 * x.std() * torch.randn(x.shape, generator=g)


def act_quantized(x, seed):
    """Per-tensor asymmetric 4-bit fake quantization of the activations (``seed`` unused)."""
    scale, zp = qparams_from_range(x.min(), x.max(), 4, symmetric=False)
    return fake_quantize(x, scale, zp, *int_range(4, False))


def test_matched_inputs_reduce_to_gptq_with_the_same_damping():
    """With X̃ = X (G = H) and GPTQ's damping, Qronos is GPTQ: step 1 keeps column 0, step 1b is OBS."""
    for cfg in (
        dict(bits=4),
        dict(bits=3, granularity="group", group_size=16, act_order=True, static_groups=True),
    ):
        x = correlated_inputs(512, 64, seed=0)
        W = torch.randn(32, 64)
        H, G = statistics_of(x, x)
        q = qronos_quantize(W, H, G, alpha=0.0, percdamp=0.01, **cfg)
        g = gptq_quantize(W, H, percdamp=0.01, **cfg)
        assert q.damping == pytest.approx(g.damping)
        assert (q.q == g.q).float().mean().item() >= 0.995
        assert q.loss == pytest.approx(g.loss, rel=0.01)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_matched_inputs_error_close_to_gptq(bits):
    ratios = []
    for seed in range(5):
        x = correlated_inputs(512, 64, seed=seed)
        W = torch.randn(32, 64, generator=torch.Generator().manual_seed(seed))
        H, G = statistics_of(x, x)
        q = qronos_quantize(W, H, G, bits=bits)
        g = gptq_quantize(W, H, bits=bits)
        ratios.append(mismatched_error(W, q.weight, x, x) / mismatched_error(W, g.weight, x, x))
    assert statistics.median(ratios) <= 1.05, ratios


def test_float32_is_as_accurate_as_float64_on_ill_conditioned_inputs():
    """cond(H) = 1e4: recomputing W·G·(H_λ)⁻¹ in float32 would lose ~cond·eps; the residual form does not."""
    x = correlated_inputs(1024, 128, seed=8)
    W = torch.randn(64, 128)
    H, G = statistics_of(x, x)
    err32 = mismatched_error(W, qronos_quantize(W, H, G, bits=8).weight, x, x)
    err64 = mismatched_error(W, qronos_quantize(W.double(), H.double(), G.double(), bits=8).weight, x, x)
    assert err32 == pytest.approx(err64, rel=0.05)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("mismatch", [noisy, act_quantized])
def test_mismatched_inputs_beat_gptq_and_rtn(bits, mismatch):
    vs_gptq, vs_rtn = [], []
    for seed in range(5):
        x = correlated_inputs(512, 64, seed=seed)
        x_tilde = mismatch(x, seed)
        W = torch.randn(32, 64, generator=torch.Generator().manual_seed(seed))
        H, G = statistics_of(x_tilde, x)
        err = mismatched_error(W, qronos_quantize(W, H, G, bits=bits).weight, x, x_tilde)
        vs_gptq.append(err / mismatched_error(W, gptq_quantize(W, H, bits=bits).weight, x, x_tilde))
        vs_rtn.append(err / mismatched_error(W, rtn(W, bits), x, x_tilde))
    assert statistics.median(vs_gptq) < 1.0, vs_gptq
    assert statistics.median(vs_rtn) < 1.0, vs_rtn


@pytest.mark.parametrize("act_order", [False, True])
def test_loss_is_the_excess_over_the_best_float_weights(act_order):
    x = correlated_inputs(512, 48, seed=3).double()
    x_tilde = noisy(x, 3)
    H, G = statistics_of(x_tilde, x, dtype=torch.float64)
    W = torch.randn(16, 48, dtype=torch.float64)
    res = qronos_quantize(W, H, G, bits=3, act_order=act_order)
    h_damped = H + res.damping * torch.eye(48, dtype=torch.float64)
    w_star = W @ (G + res.damping * torch.eye(48, dtype=torch.float64)) @ torch.linalg.inv(h_damped)
    delta = res.weight.double() - w_star
    assert res.loss == pytest.approx(0.5 * (delta @ h_damped * delta).sum().item(), rel=1e-6)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(bits=4),
        dict(bits=3, symmetric=False, act_order=True),
        dict(bits=4, granularity="group", group_size=16),
        dict(bits=4, granularity="group", group_size=16, act_order=True, static_groups=True),
        dict(bits=8, granularity="tensor"),
    ],
)
def test_block_size_invariance_and_layout(cfg):
    x = correlated_inputs(512, 64, seed=4)
    H, G = statistics_of(noisy(x, 4).double(), x.double(), dtype=torch.float64)
    W = torch.randn(24, 64, dtype=torch.float64)
    results = [qronos_quantize(W, H, G, block_size=b, **cfg) for b in (1, 4, 128)]
    for res in results:
        assert (res.q == results[-1].q).float().mean().item() >= 0.995
        assert res.weight.dtype == torch.float32 and res.q.dtype == torch.int32
        assert torch.equal(res.weight, dequantize_weight(res.q, res.scale, res.zero_point))
        qmin, qmax = int_range(cfg["bits"], cfg.get("symmetric", True))
        assert res.q.min() >= qmin and res.q.max() <= qmax


def test_dead_quantized_inputs_give_zero_columns():
    """A feature that is zero on the quantized path but not in float: its column cannot help, it is 0."""
    x = correlated_inputs(256, 32, seed=5)
    x_tilde = noisy(x, 5)
    x_tilde[:, [0, 9]] = 0.0
    W = torch.randn(8, 32)
    H, G = statistics_of(x_tilde, x)
    for kwargs in (dict(bits=4), dict(bits=4, act_order=True, symmetric=False)):
        res = qronos_quantize(W, H, G, **kwargs)
        assert torch.isfinite(res.weight).all()
        assert (res.weight[:, [0, 9]] == 0).all()
        assert mismatched_error(W, res.weight, x, x_tilde) < mismatched_error(W, rtn(W, 4), x, x_tilde)


def test_singular_hessian_retries_and_indefinite_raises():
    x = correlated_inputs(8, 64, seed=6)  # rank 8: a tiny alpha·σ_max does not make it factorisable
    H, G = statistics_of(x, x)
    res = qronos_quantize(torch.randn(8, 64), H, G, bits=4, alpha=1e-12, max_retries=10)
    assert res.retries >= 1 and torch.isfinite(res.weight).all()
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite"):
        qronos_quantize(torch.randn(4, 16), -torch.eye(16), torch.eye(16), bits=4)


def test_bad_arguments():
    W, eye = torch.randn(4, 16), torch.eye(16)
    with pytest.raises(ValueError, match="G shape"):
        qronos_quantize(W, eye, torch.eye(8), bits=4)
    with pytest.raises(ValueError, match="finite"):
        qronos_quantize(W, eye, torch.full((16, 16), float("inf")), bits=4)
    with pytest.raises(ValueError, match="static_groups=True"):
        qronos_quantize(W, eye, eye, bits=4, granularity="group", group_size=8, act_order=True)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        qronos_quantize(W, eye, eye, bits=4, alpha=-1.0)
