import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffquant.quant.packing import pack_int, storage_bits, unpack_int


def test_layout_first_element_in_high_bits():
    assert pack_int(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x12]
    assert pack_int(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b01_10_11_00]
    # The tail of the last byte is zero-padded.
    assert pack_int(torch.tensor([15, 14, 13], dtype=torch.uint8), 4).tolist() == [0xFE, 0xD0]
    assert pack_int(torch.tensor([3], dtype=torch.uint8), 2).tolist() == [0b11_00_00_00]


def test_int4_layout_matches_bitsandbytes_convention():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (1000,), dtype=torch.uint8)
    expected = (codes[::2] << 4) | codes[1::2]  # bitsandbytes' packing of 4-bit codes
    assert torch.equal(pack_int(codes, 4), expected)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 4, 5), (0,)])
def test_round_trip(bits, shape):
    torch.manual_seed(bits)
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    packed = pack_int(codes, bits)
    n = codes.numel()
    assert packed.dtype == torch.uint8
    assert packed.shape == (-(-n * bits // 8),)
    assert torch.equal(unpack_int(packed, bits, n), codes.reshape(-1))


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), data=st.data())
def test_round_trip_property(bits, data):
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=40))
    codes = torch.tensor(values, dtype=torch.uint8)
    assert unpack_int(pack_int(codes, bits), bits, len(values)).tolist() == values


@pytest.mark.parametrize("bits", [3, 5, 6, 7, 1, 16])
def test_unpackable_bits_raise(bits):
    with pytest.raises(ValueError, match="8-bit"):
        pack_int(torch.zeros(4, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="8-bit"):
        unpack_int(torch.zeros(4, dtype=torch.uint8), bits, 4)


def test_out_of_range_codes_raise():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int(torch.tensor([16], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_int(torch.tensor([0, 4], dtype=torch.uint8), 2)


def test_wrong_dtype_and_length_raise():
    with pytest.raises(TypeError, match="uint8"):
        pack_int(torch.tensor([1, 2], dtype=torch.int32), 4)
    with pytest.raises(TypeError, match="uint8"):
        unpack_int(torch.tensor([1, 2], dtype=torch.int8), 4, 4)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_int(torch.zeros(3, dtype=torch.uint8), 4, 4)


def test_storage_bits():
    assert [storage_bits(b) for b in range(2, 9)] == [2, 8, 4, 8, 8, 8, 8]
    for bad in (1, 9, 4.0, True):
        with pytest.raises(ValueError, match=r"2\.\.8"):
            storage_bits(bad)
