import pytest
import torch

from diffquant.ptq import InputStatistics, NotPositiveDefiniteError, QuantResult, gptq_quantize
from diffquant.quant.affine import (
    choose_qparams,
    dequantize,
    dequantize_weight,
    int_range,
    quantize,
    quantize_weight,
)


def correlated_inputs(n, d, seed, decay=2.0):
    """``(n, d)`` inputs mixing ``d`` latent factors with singular values ``1 .. 10**-decay``."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -decay, d)
    return torch.randn(n, d, generator=g) @ mix.T


def hessian(x):
    stats = InputStatistics()
    stats.add(x)
    return stats.H


def rtn(W, bits, symmetric=True, granularity="channel", group_size=None):
    scale, zp = choose_qparams(W, bits, symmetric, granularity, group_size)
    return dequantize_weight(quantize_weight(W, scale, zp, bits, symmetric), scale, zp)


def output_error(W, W_hat, x):
    return (x @ (W - W_hat).T).norm().item()


def reference_gptq(
    W, H, *, bits, symmetric=True, granularity="channel", group_size=None, percdamp=0.01, act_order=False
):
    """Unoptimised GPTQ/OBQ in float64: one column at a time, explicit inverse-Hessian downdates.

    For the column ``j`` being quantized: ``e = (w_j − q_j) / H⁻¹_jj``, ``W −= e ⊗ H⁻¹[j, :]`` (OBS optimal
    update of the free columns) and ``H⁻¹ −= H⁻¹[:, j] H⁻¹[j, :] / H⁻¹_jj`` (remove column ``j``).
    Dynamic groups are chosen from the current weights when their first column is reached.
    """
    qmin, qmax = int_range(bits, symmetric)
    scale, zp = choose_qparams(W, bits, symmetric, granularity, group_size)
    gs = group_size if granularity == "group" else W.shape[1]
    W, H = W.double().clone(), H.double().clone()
    dead = H.diagonal() == 0
    order = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else range(W.shape[1])
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    lam = percdamp * H.diagonal().mean()
    h_inv = torch.linalg.inv(H + lam * torch.eye(H.shape[0], dtype=torch.float64))
    codes = torch.zeros(W.shape, dtype=torch.int32)
    for j in map(int, order):
        if granularity == "group" and not act_order and j % gs == 0:
            s, z = choose_qparams(W[:, j : j + gs].float(), bits, symmetric, "channel")
            scale[:, j // gs], zp[:, j // gs] = s[:, 0], z[:, 0]
        s, z = scale[:, j // gs], zp[:, j // gs]
        codes[:, j] = quantize(W[:, j], s, z, qmin, qmax)
        w_hat = dequantize(codes[:, j], s, z).double()
        e = (W[:, j] - w_hat) / h_inv[j, j]
        W -= e[:, None] * h_inv[j][None, :]
        W[:, j] = w_hat
        h_inv -= h_inv[:, j : j + 1] @ h_inv[j : j + 1, :] / h_inv[j, j]
    return codes, scale, zp


CONFIGS = [
    dict(bits=4),
    dict(bits=3, symmetric=False),
    dict(bits=4, granularity="group", group_size=16),
    dict(bits=3, granularity="group", group_size=32, symmetric=False),
    dict(bits=4, act_order=True),
    dict(bits=4, granularity="group", group_size=16, act_order=True, static_groups=True),
    dict(bits=8, granularity="tensor"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_reference_for_every_block_size(cfg):
    """Float64: the lazy-block Cholesky form equals the column-by-column OBQ form for any block size.

    Float32 runs agree with each other across block sizes; against the float64 reference a rounding
    tie can flip one code, and the flip then propagates along its row (the compensation differs), so
    only the layer output is compared there.
    """
    x = correlated_inputs(512, 64, seed=1)
    W = torch.randn(48, 64)
    H = hessian(x)
    ref_kwargs = {k: v for k, v in cfg.items() if k != "static_groups"}
    ref_codes, ref_scale, ref_zp = reference_gptq(W, H, **ref_kwargs)
    ref_weight = dequantize_weight(ref_codes, ref_scale, ref_zp)
    ref_err = output_error(W, ref_weight, x)
    f32_codes = gptq_quantize(W, H, block_size=128, **cfg).q
    for block_size in (1, 4, 128):
        res = gptq_quantize(W.double(), H.double(), block_size=block_size, **cfg)
        agree = (res.q == ref_codes).float().mean().item()
        assert agree >= 0.995, f"block_size={block_size}: only {agree:.4f} of the codes agree"
        torch.testing.assert_close(res.scale, ref_scale, rtol=1e-5, atol=0)
        assert output_error(res.weight, ref_weight, x) <= 0.01 * ref_err
        res32 = gptq_quantize(W, H, block_size=block_size, **cfg)
        assert (res32.q == f32_codes).float().mean().item() >= 0.995
        assert output_error(W, res32.weight, x) == pytest.approx(ref_err, rel=0.02)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_result_layout_and_exact_dequantization(cfg):
    W = torch.randn(24, 64)
    res = gptq_quantize(W, hessian(correlated_inputs(256, 64, seed=2)), **cfg)
    assert isinstance(res, QuantResult)
    qmin, qmax = int_range(cfg["bits"], cfg.get("symmetric", True))
    assert res.q.dtype == torch.int32 and res.q.shape == W.shape
    assert res.q.min() >= qmin and res.q.max() <= qmax
    granularity = cfg.get("granularity", "channel")
    expected_shape = {"tensor": (1, 1), "channel": (24, 1), "group": (24, 64 // cfg.get("group_size", 1))}
    assert res.scale.shape == expected_shape[granularity] and res.scale.dtype == torch.float32
    assert res.zero_point.shape == res.scale.shape and res.zero_point.dtype == torch.int32
    assert torch.equal(res.weight, dequantize_weight(res.q, res.scale, res.zero_point))
    assert res.retries == 0 and res.damping > 0


@pytest.mark.parametrize(
    "cfg",
    [
        dict(bits=4),
        dict(bits=4, act_order=True),
        dict(bits=3, granularity="group", group_size=16, act_order=True, static_groups=True),
    ],
)
def test_fixed_qparams_come_from_the_original_weight(cfg):
    W = torch.randn(16, 64)
    res = gptq_quantize(W, hessian(correlated_inputs(256, 64, seed=3)), **cfg)
    scale, zp = choose_qparams(W, cfg["bits"], True, cfg.get("granularity", "channel"), cfg.get("group_size"))
    assert torch.equal(res.scale, scale) and torch.equal(res.zero_point, zp)


def test_dynamic_groups_follow_the_updated_weights():
    W = torch.randn(16, 64)
    H = hessian(correlated_inputs(256, 64, seed=4))
    dynamic = gptq_quantize(W, H, bits=3, granularity="group", group_size=16)
    static = gptq_quantize(W, H, bits=3, granularity="group", group_size=16, static_groups=True)
    scale, _ = choose_qparams(W, 3, True, "group", 16)
    assert torch.equal(static.scale, scale)
    assert torch.equal(dynamic.scale[:, 0], scale[:, 0])  # group 0 is reached before any update
    assert not torch.equal(dynamic.scale[:, 1:], scale[:, 1:])


@pytest.mark.parametrize("act_order", [False, True])
def test_loss_is_the_damped_quadratic_objective(act_order):
    x = correlated_inputs(512, 64, seed=5)
    H = hessian(x).double()
    W = torch.randn(32, 64, dtype=torch.float64)
    res = gptq_quantize(W, H, bits=3, act_order=act_order)
    delta = res.weight.double() - W
    h_damped = H + res.damping * torch.eye(64, dtype=torch.float64)
    assert res.loss == pytest.approx(0.5 * (delta @ h_damped * delta).sum().item(), rel=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(
    "grid",
    [
        dict(),
        dict(act_order=True),
        dict(granularity="group", group_size=16),
        dict(granularity="group", group_size=16, act_order=True, static_groups=True),
        dict(symmetric=False),
    ],
    ids=["channel", "act_order", "group", "group-act_order", "asymmetric"],
)
def test_output_error_beats_rtn(bits, grid):
    ratios = []
    for seed in range(3):
        x = correlated_inputs(512, 64, seed=10 + seed, decay=3.0)
        W = torch.randn(32, 64, generator=torch.Generator().manual_seed(seed))
        res = gptq_quantize(W, hessian(x), bits=bits, **grid)
        rtn_kwargs = {k: v for k, v in grid.items() if k not in ("act_order", "static_groups")}
        ratios.append(output_error(W, res.weight, x) / output_error(W, rtn(W, bits, **rtn_kwargs), x))
    assert max(ratios) <= 1.0
    if bits in (3, 4):
        assert max(ratios) < 0.6, ratios


def test_dead_inputs_give_zero_columns():
    x = correlated_inputs(256, 32, seed=6)
    x[:, [0, 7, 31]] = 0.0
    W = torch.randn(8, 32)
    for kwargs in (dict(bits=4), dict(bits=4, symmetric=False, act_order=True)):
        res = gptq_quantize(W, hessian(x), **kwargs)
        assert torch.isfinite(res.weight).all()
        assert (res.weight[:, [0, 7, 31]] == 0).all()
        assert output_error(W, res.weight, x) < output_error(W, rtn(W, 4), x)


def test_act_order_with_dynamic_groups_is_rejected():
    with pytest.raises(ValueError, match="static_groups=True"):
        gptq_quantize(
            torch.randn(4, 32), torch.eye(32), bits=4, granularity="group", group_size=8, act_order=True
        )


def test_indefinite_hessian_raises():
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite"):
        gptq_quantize(torch.randn(4, 16), -torch.eye(16), bits=4)


def test_singular_hessian_succeeds_with_recorded_retries():
    x = correlated_inputs(8, 64, seed=7)  # fewer samples than features: rank-deficient H
    W = torch.randn(16, 64)
    res = gptq_quantize(W, hessian(x), bits=4, percdamp=1e-9, max_retries=10)
    assert res.retries >= 1 and res.damping > 1e-9 * hessian(x).diagonal().mean().item()
    assert torch.isfinite(res.weight).all()
    assert output_error(W, res.weight, x) < output_error(W, rtn(W, 4), x)


def test_bad_arguments():
    W = torch.randn(4, 16)
    with pytest.raises(ValueError, match="does not match"):
        gptq_quantize(W, torch.eye(8), bits=4)
    with pytest.raises(ValueError, match="2-D weight"):
        gptq_quantize(torch.randn(4, 4, 2, 2), torch.eye(16), bits=4)
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize(W, torch.eye(16), bits=4, block_size=0)
    with pytest.raises(ValueError, match="finite"):
        gptq_quantize(W, torch.full((16, 16), float("nan")), bits=4)
    with pytest.raises(ValueError, match="2..8 bits"):
        gptq_quantize(W, torch.eye(16), bits=1)
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(W, torch.eye(16), bits=4, granularity="group", group_size=5)
