import pytest
import torch

from diffquant.quant.affine import (
    GRANULARITIES,
    choose_qparams,
    dequantize,
    dequantize_weight,
    fake_quantize,
    int_range,
    quantize,
    quantize_weight,
    reshape_groups,
)

ALL_BITS = range(2, 9)


def _param_shape(granularity, out_features, in_features, group_size):
    return {
        "tensor": (1, 1),
        "channel": (out_features, 1),
        "group": (out_features, in_features // group_size),
    }[granularity]


def _expand(param, w):
    """Broadcast a (G0, G1) parameter to w's (out, in) shape."""
    return param.repeat_interleave(w.shape[1] // param.shape[1], dim=1).expand_as(w)


def _within_half_step(w, w_hat, scale):
    """|w - w_hat| <= scale / 2 elementwise, up to float32 rounding."""
    step = _expand(scale, w)
    return bool(((w.float() - w_hat).abs() <= step / 2 + 1e-6 * (w.float().abs() + step)).all())


def test_int_range():
    assert int_range(8, True) == (-128, 127)
    assert int_range(8, False) == (0, 255)
    assert int_range(4, True) == (-8, 7)
    assert int_range(2, False) == (0, 3)


@pytest.mark.parametrize("bits", [1, 9, 0, 16, 4.0, True])
def test_int_range_rejects_bad_bits(bits):
    with pytest.raises(ValueError, match=r"2\.\.8 bits"):
        int_range(bits, True)
    with pytest.raises(ValueError, match=r"2\.\.8 bits"):
        choose_qparams(torch.randn(4, 8), bits, symmetric=False)


def test_reshape_groups_is_a_view():
    w = torch.arange(24.0).reshape(2, 12)
    wg = reshape_groups(w, 3)
    assert wg.shape == (2, 3, 4)
    assert wg.data_ptr() == w.data_ptr()
    assert torch.equal(wg[1, 2], w[1, 8:12])


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_minmax_error_bound_and_code_range(bits, symmetric, granularity):
    gen = torch.Generator().manual_seed(1000 * bits + 10 * symmetric + GRANULARITIES.index(granularity))
    out_features = int(torch.randint(1, 9, (1,), generator=gen))
    group_size = int(torch.randint(1, 5, (1,), generator=gen)) * 8
    in_features = group_size * int(torch.randint(1, 5, (1,), generator=gen))
    shift = torch.randn(out_features, 1, generator=gen)  # some channels are all-positive or all-negative
    w = torch.randn(out_features, in_features, generator=gen) * 3 + shift * 4
    gs = group_size if granularity == "group" else None

    scale, zp = choose_qparams(w, bits, symmetric, granularity, gs)
    assert scale.shape == zp.shape == _param_shape(granularity, out_features, in_features, group_size)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    assert bool((scale > 0).all())
    if symmetric:
        assert bool((zp == 0).all())

    q = quantize_weight(w, scale, zp, bits, symmetric)
    qmin, qmax = int_range(bits, symmetric)
    assert q.shape == w.shape and q.dtype == torch.int32
    assert int(q.min()) >= qmin and int(q.max()) <= qmax

    w_hat = dequantize_weight(q, scale, zp)
    assert w_hat.shape == w.shape and w_hat.dtype == torch.float32
    assert _within_half_step(w, w_hat, scale)
    # Zero is exactly representable (asymmetric) / is code 0 (symmetric).
    assert bool((dequantize(zp, scale, zp) == 0).all())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_values_on_the_grid_round_trip_exactly(bits, symmetric):
    torch.manual_seed(bits)
    qmin, qmax = int_range(bits, symmetric)
    scale = torch.rand(6, 4) * 0.1 + 1e-3  # group granularity, group size 8
    zp = torch.zeros(6, 4, dtype=torch.int32) if symmetric else torch.randint(qmin, qmax + 1, (6, 4))
    zp = zp.to(torch.int32)
    q = torch.randint(qmin, qmax + 1, (6, 32), dtype=torch.int32)
    w = dequantize_weight(q, scale, zp)
    assert torch.equal(quantize_weight(w, scale, zp, bits, symmetric), q)
    assert torch.equal(dequantize_weight(quantize_weight(w, scale, zp, bits, symmetric), scale, zp), w)


def test_fake_quantize_is_bit_identical_to_quantize_dequantize():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7) * 4
    scale = torch.rand(1, 3, 1, 1) * 0.2 + 0.01
    zp = torch.randint(0, 256, (1, 3, 1, 1), dtype=torch.int32)
    expected = dequantize(quantize(x, scale, zp, 0, 255), scale, zp)
    got = fake_quantize(x, scale, zp, 0, 255)
    assert got.dtype == x.dtype
    assert torch.equal(got, expected)
    codes = quantize(x, scale, zp, 0, 255)
    assert codes.dtype == torch.int32 and int(codes.min()) >= 0 and int(codes.max()) <= 255


def test_fake_quantize_keeps_input_dtype():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    out = fake_quantize(x, torch.tensor(0.05), torch.tensor(0), -128, 127)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), x.float(), atol=0.05)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_zero_range_channels(symmetric, granularity, bits):
    w = torch.zeros(4, 16)
    w[1] = 0.37  # constant positive
    w[2] = -2.5  # constant negative
    w[3, 8:] = 1e-3  # half zero, half constant
    gs = 8 if granularity == "group" else None
    scale, zp = choose_qparams(w, bits, symmetric, granularity, gs)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    w_hat = dequantize_weight(quantize_weight(w, scale, zp, bits, symmetric), scale, zp)
    assert not bool(torch.isnan(w_hat).any())
    assert torch.equal(w_hat[0], w[0])  # the all-zero row is exact
    assert _within_half_step(w, w_hat, scale)
    if not symmetric and granularity != "tensor":
        # Each asymmetric range spans [min(c, 0), max(c, 0)]: both ends are on the grid.
        torch.testing.assert_close(w_hat, w, rtol=1e-6, atol=0)


def test_all_zero_tensor():
    w = torch.zeros(3, 8)
    for symmetric in (True, False):
        scale, zp = choose_qparams(w, 4, symmetric, "tensor")
        assert float(scale) == 1.0
        assert torch.equal(dequantize_weight(quantize_weight(w, scale, zp, 4, symmetric), scale, zp), w)


def test_asymmetric_formula():
    w = torch.tensor([[-1.0, 0.5, 3.0, 2.0]])
    scale, zp = choose_qparams(w, 8, False, "channel")
    assert torch.allclose(scale, torch.tensor([[4.0 / 255]]))
    assert int(zp) == round(1.0 / (4.0 / 255))
    scale, zp = choose_qparams(w, 8, True, "channel")
    assert torch.allclose(scale, torch.tensor([[3.0 / 127.5]]))


def test_bf16_weight_is_accepted():
    torch.manual_seed(0)
    w = torch.randn(8, 32, dtype=torch.bfloat16)
    scale, zp = choose_qparams(w, 8, False, "group", 16)
    w_hat = dequantize_weight(quantize_weight(w, scale, zp, 8, False), scale, zp)
    assert _within_half_step(w, w_hat, scale)


def test_method_dispatch():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    base = choose_qparams(w, 4, False, "channel")
    full = choose_qparams(w, 4, False, "channel", method="percentile", percentile=100.0)
    assert torch.equal(base[0], full[0]) and torch.equal(base[1], full[1])
    clipped, _ = choose_qparams(w, 4, False, "channel", method="percentile", percentile=90.0)
    assert bool((clipped < base[0]).all())
    searched, _ = choose_qparams(w, 4, True, "group", 32, method="mse", num_candidates=10)
    assert searched.shape == (8, 2)


def test_bad_inputs():
    w = torch.randn(4, 100)
    with pytest.raises(
        ValueError, match="group_size 48 does not divide in_features 100; choose a divisor such as 50"
    ):
        choose_qparams(w, 4, True, "group", 48)
    with pytest.raises(ValueError, match="needs a group_size"):
        choose_qparams(w, 4, True, "group")
    with pytest.raises(ValueError, match="positive integer"):
        choose_qparams(w, 4, True, "group", 0)
    with pytest.raises(ValueError, match="only used with granularity='group'"):
        choose_qparams(w, 4, True, "channel", 50)
    with pytest.raises(ValueError, match="unknown granularity"):
        choose_qparams(w, 4, True, "row")
    with pytest.raises(ValueError, match="unknown range method"):
        choose_qparams(w, 4, True, method="kl")
    with pytest.raises(ValueError, match="2-D"):
        choose_qparams(torch.randn(100), 4, True)
    with pytest.raises(ValueError, match="2-D"):
        choose_qparams(torch.randn(2, 3, 4), 4, True)
    with pytest.raises(TypeError, match="floating-point"):
        choose_qparams(torch.ones(4, 4, dtype=torch.int32), 4, True)
    for bad in (float("nan"), float("inf"), -float("inf")):
        w_bad = w.clone()
        w_bad[2, 7] = bad
        with pytest.raises(ValueError, match="NaN/Inf"):
            choose_qparams(w_bad, 4, False)


def test_quantize_weight_rejects_mismatched_params():
    w = torch.randn(4, 16)
    scale, zp = choose_qparams(w, 4, False, "group", 8)
    with pytest.raises(ValueError, match="does not fit"):
        quantize_weight(w, scale[:2], zp[:2], 4, False)
    with pytest.raises(ValueError, match="does not fit"):
        quantize_weight(torch.randn(4, 12), torch.ones(4, 5), torch.zeros(4, 5, dtype=torch.int32), 4, False)
    with pytest.raises(ValueError, match="zero_point shape"):
        quantize_weight(w, scale, zp[:, :1], 4, False)
