import dataclasses

import pytest
import torch

from diffquant.quant.nf4 import (
    NF4_BLOCK_SIZES,
    NF4_CODEBOOK,
    NF4Codes,
    create_dynamic_map,
    dequantize_absmax,
    dequantize_nf4,
    nf4_bits_per_weight,
    quantize_nf4,
)
from diffquant.quant.packing import unpack_int

MAX_HALF_GAP = float((NF4_CODEBOOK[1:] - NF4_CODEBOOK[:-1]).max()) / 2


@pytest.fixture(scope="module")
def bnb():
    """bitsandbytes' functional API with torch.compile disabled (its odd-shape dequantize path compiles)."""
    functional = pytest.importorskip("bitsandbytes.functional")
    with torch._dynamo.config.patch(disable=True):
        yield functional


def _assert_matches_bnb(bnb, x, block_size, double_quant):
    packed, state = bnb.quantize_4bit(
        x, blocksize=block_size, quant_type="nf4", compress_statistics=double_quant
    )
    codes = quantize_nf4(x, block_size, double_quant)
    assert torch.equal(codes.packed, packed.reshape(-1))
    if double_quant:
        assert torch.equal(codes.absmax_q, state.absmax)
        assert torch.equal(codes.absmax_offset, state.offset)
        assert torch.equal(codes.absmax_scale, state.state2.absmax)
        assert state.state2.blocksize == codes.dq_block_size
    else:
        assert torch.equal(codes.absmax, state.absmax)
    expected = bnb.dequantize_4bit(packed, state, quant_type="nf4").reshape(x.shape)  # 1-D comes back (1, n)
    got = dequantize_nf4(codes)
    assert got.dtype == x.dtype == expected.dtype and got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_codebook_matches_bitsandbytes_and_its_derivation(bnb):
    assert torch.equal(NF4_CODEBOOK, bnb.get_4bit_type("nf4", device="cpu"))
    norm = pytest.importorskip("scipy.stats").norm
    offset = 0.9677083
    positive = norm.ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1].numpy()).tolist()
    negative = (-norm.ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1].numpy())).tolist()
    values = torch.tensor(sorted([*positive, 0.0, *negative]), dtype=torch.float64)
    torch.testing.assert_close(NF4_CODEBOOK.double(), values / values.abs().max(), rtol=0, atol=1e-6)
    assert float(NF4_CODEBOOK[7]) == 0.0


def test_dynamic_map_matches_bitsandbytes(bnb):
    code = create_dynamic_map()
    assert code.shape == (256,) and code.dtype == torch.float32
    assert torch.equal(code, bnb.create_dynamic_map(signed=True))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("block_size", [32, 64, 128, 4096])
@pytest.mark.parametrize(
    "shape", [(1,), (63,), (65,), (130,), (1000,), (4097,), (33, 65), (3, 5, 7, 11), (300, 257)]
)
def test_matches_bitsandbytes_fp32(bnb, shape, block_size, double_quant):
    torch.manual_seed(len(shape) * 10_000 + shape[-1])
    x = torch.randn(shape) * torch.rand(shape[0], *[1] * (len(shape) - 1)) * 3
    _assert_matches_bnb(bnb, x, block_size, double_quant)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("block_size", [32, 64, 4096])
@pytest.mark.parametrize("shape", [(65,), (1000,), (2, 3, 4, 5), (300, 257)])
def test_matches_bitsandbytes_bf16(bnb, shape, block_size, double_quant):
    torch.manual_seed(shape[-1])
    x = (torch.randn(shape) * 0.05).to(torch.bfloat16)
    _assert_matches_bnb(bnb, x, block_size, double_quant)


def test_ties_at_midpoints_take_the_lower_code(bnb):
    midpoints = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2
    x = torch.cat([midpoints, torch.tensor([1.0])])  # absmax 1: x / absmax is exact
    x = torch.cat([x, -x]).repeat(4)[:64]
    codes = quantize_nf4(x, 64, double_quant=False)
    index = unpack_int(codes.packed, 4, 64)
    assert index[:15].tolist() == list(range(15))
    _assert_matches_bnb(bnb, x, 64, double_quant=False)


def test_zero_blocks(bnb):
    x = torch.randn(64 * 6 + 10)
    x[64:128] = 0  # full zero block
    x[-10:] = 0  # zero trailing partial block
    for double_quant in (False, True):
        codes = quantize_nf4(x, 64, double_quant)
        absmax = dequantize_absmax(codes)
        assert bool(torch.isfinite(absmax).all())
        index = unpack_int(codes.packed, 4, x.numel())
        assert bool((index[64:128] == 7).all()) and bool((index[-10:] == 7).all())
        out = dequantize_nf4(codes)
        assert not bool(torch.isnan(out).any())
        assert bool((out[64:128] == 0).all()) and bool((out[-10:] == 0).all())
    x_full = x[: 64 * 6]  # whole blocks only: statistics match bitsandbytes bit for bit
    _assert_matches_bnb(bnb, x_full, 64, double_quant=True)
    _assert_matches_bnb(bnb, torch.zeros(128), 64, double_quant=False)


@pytest.mark.parametrize("block_size", [32, 64, 256])
def test_error_bound(block_size):
    torch.manual_seed(block_size)
    x = torch.randn(37, 129) * torch.rand(37, 1) * 5
    codes = quantize_nf4(x, block_size, double_quant=False)
    n = x.numel()
    absmax = codes.absmax.repeat_interleave(block_size)[:n].reshape(x.shape)
    err = (x - dequantize_nf4(codes)).abs()
    assert bool((err <= absmax * MAX_HALF_GAP * (1 + 1e-6) + 1e-7).all())
    # Double quantization adds the error of the 8-bit absmax; the dynamic code's gaps are < 0.015.
    dq = quantize_nf4(x, block_size, double_quant=True)
    absmax_hat = dequantize_absmax(dq)
    block_scale = dq.absmax_scale.repeat_interleave(dq.dq_block_size)[: absmax_hat.numel()]
    assert bool(((absmax_hat - codes.absmax).abs() <= 0.0075 * block_scale + 1e-6).all())
    sqnr_db = 10 * torch.log10(x.pow(2).sum() / (x - dequantize_nf4(dq)).pow(2).sum())
    assert float(sqnr_db) > 18.0


def test_dtypes_and_state_dict_round_trip():
    torch.manual_seed(0)
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    codes = quantize_nf4(x)
    assert codes.block_size == 64 and codes.double_quant and codes.dtype == torch.bfloat16
    assert codes.packed.shape == (512,) and codes.packed.dtype == torch.uint8
    assert codes.absmax is None and codes.absmax_q.shape == (16,) and codes.absmax_q.dtype == torch.uint8
    assert codes.absmax_scale.shape == (1,) and codes.absmax_offset.shape == ()
    assert dequantize_nf4(codes).dtype == torch.bfloat16
    assert dequantize_nf4(codes, torch.float32).dtype == torch.float32
    rebuilt = NF4Codes(**{f.name: getattr(codes, f.name) for f in dataclasses.fields(codes)})
    assert torch.equal(dequantize_nf4(rebuilt), dequantize_nf4(codes))


def test_nf4_codes_validation():
    codes = quantize_nf4(torch.randn(100), 64, double_quant=False)
    with pytest.raises(ValueError, match="packed"):
        dataclasses.replace(codes, packed=codes.packed[:-1])
    with pytest.raises(ValueError, match="absmax"):
        dataclasses.replace(codes, absmax=None)
    with pytest.raises(ValueError, match="must not carry absmax_q"):
        dataclasses.replace(codes, absmax_q=torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="block_size"):
        dataclasses.replace(codes, block_size=48)


@pytest.mark.parametrize("block_size", [48, 8192, 16, 0, 64.0])
def test_bad_block_size(block_size):
    with pytest.raises(ValueError, match="block_size must be one of"):
        quantize_nf4(torch.randn(128), block_size)


def test_bad_inputs():
    for bad in (float("nan"), float("inf")):
        x = torch.randn(128)
        x[5] = bad
        with pytest.raises(ValueError, match="NaN/Inf"):
            quantize_nf4(x)
    with pytest.raises(TypeError, match="floating-point"):
        quantize_nf4(torch.ones(128, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.zeros(0))


def test_bits_per_weight():
    assert nf4_bits_per_weight(64, double_quant=False) == 4.5
    assert nf4_bits_per_weight(64, double_quant=True) == pytest.approx(4.127, abs=1e-3)
    assert nf4_bits_per_weight(128, double_quant=False) == 4.25
    with pytest.raises(ValueError):
        nf4_bits_per_weight(100, double_quant=True)
    assert set(NF4_BLOCK_SIZES) == {2**k for k in range(5, 13)}
