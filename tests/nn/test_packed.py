import math

import pytest
import torch

from diffquant import WeightQuantConfig
from diffquant.nn import IntPackedWeight, NF4PackedWeight, PackedWeight
from diffquant.quant import affine, nf4


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(16, 36), (8, 4, 3, 3)])
@pytest.mark.parametrize(
    ("granularity", "group_size", "symmetric"),
    [("tensor", None, True), ("channel", None, False), ("group", 12, False), ("group", 4, True)],
)
def test_int_packed_matches_affine_reference(bits, shape, granularity, group_size, symmetric):
    torch.manual_seed(0)
    w = torch.randn(shape)
    cfg = WeightQuantConfig(bits=bits, granularity=granularity, group_size=group_size, symmetric=symmetric)
    packed = IntPackedWeight.from_float(w, cfg)
    w2d = w.reshape(shape[0], -1)
    scale, zp = affine.choose_qparams(w2d, bits, symmetric, granularity, group_size)
    reference = affine.dequantize_weight(affine.quantize_weight(w2d, scale, zp, bits, symmetric), scale, zp)
    assert torch.equal(packed.dequantize(), reference.reshape(shape))
    stored_bits = 8 if bits not in (2, 4) else bits
    assert packed.qdata.numel() == math.ceil(w.numel() * stored_bits / 8)
    assert ("zero_point" in dict(packed.named_buffers())) is (not symmetric)


def test_int4_storage_is_half_a_byte_per_weight():
    packed = IntPackedWeight.from_float(torch.randn(64, 128), WeightQuantConfig(bits=4))
    # 4 bits of codes + one fp32 scale per 128-weight channel
    assert packed.bits_per_weight == pytest.approx(4 + 32 / 128)


@pytest.mark.parametrize(
    "cfg",
    [
        WeightQuantConfig(bits=4, granularity="group", group_size=8, symmetric=False),
        WeightQuantConfig(bits=2),
        WeightQuantConfig(format="nf4", bits=4, block_size=64, double_quant=True),
        WeightQuantConfig(format="nf4", bits=4, block_size=32, double_quant=False),
    ],
)
def test_state_dict_round_trip_through_meta(cfg):
    torch.manual_seed(1)
    w = torch.randn(24, 8, 3, 3)
    packed = PackedWeight.from_float(w, cfg)
    rebuilt = PackedWeight.from_meta(packed.meta())
    assert not torch.equal(rebuilt.dequantize(), packed.dequantize())  # empty before loading
    rebuilt.load_state_dict(packed.state_dict(), strict=True)
    assert torch.equal(rebuilt.dequantize(), packed.dequantize())


def test_nf4_packed_matches_nf4_functions_and_overhead():
    torch.manual_seed(2)
    w = torch.randn(64, 96)
    packed = NF4PackedWeight.from_float(w, WeightQuantConfig(format="nf4", bits=4))
    direct = nf4.dequantize_nf4(nf4.quantize_nf4(w, 64, True), dtype=torch.float32)
    assert torch.equal(packed.dequantize(torch.float32), direct)
    assert packed.dequantize(torch.bfloat16).dtype == torch.bfloat16
    # 4 bits + 8-bit absmax per 64 + fp32 per 256 blocks + offset: ~4.127 bits (QLoRA's figure)
    assert 4.12 < packed.bits_per_weight < 4.14


def test_unknown_format_in_meta_is_rejected():
    with pytest.raises(ValueError, match="unknown packed weight format"):
        PackedWeight.from_meta({"format": "fp4"})
