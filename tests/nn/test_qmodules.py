import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffquant import ActivationQuantConfig, WeightQuantConfig
from diffquant.nn import QuantConv2d, QuantLinear
from diffquant.nn.qmodules import _QuantLayer


def sqnr_db(reference, approx):
    return (10 * torch.log10(reference.pow(2).mean() / (reference - approx).pow(2).mean())).item()


def test_linear_reference_path_is_exact():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    q = QuantLinear.from_float(lin, WeightQuantConfig(bits=4, granularity="group", group_size=16))
    x = torch.randn(5, 7, 64)
    assert torch.equal(q(x), F.linear(x, q.qweight.dequantize(), lin.bias))
    assert torch.equal(q.weight, q.qweight.dequantize())


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(8, 16, 3, padding=1),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.Conv2d(8, 8, 3, padding=1, groups=4),
        nn.Conv2d(8, 16, 1),
        nn.Conv2d(8, 16, 3, padding="same"),
    ],
)
def test_conv_reference_path_matches_float_conv_with_dequantized_weight(conv):
    torch.manual_seed(0)
    q = QuantConv2d.from_float(conv, WeightQuantConfig(bits=8))
    x = torch.randn(2, 8, 9, 9)
    expected = F.conv2d(
        x, q.qweight.dequantize(), conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups
    )
    assert torch.equal(q(x), expected)
    assert sqnr_db(conv(x), q(x)) > 35  # 8-bit per-channel weights


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quality_degrades_gracefully_with_bits(bits):
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    x = torch.randn(64, 256)
    q = QuantLinear.from_float(lin, WeightQuantConfig(bits=bits, symmetric=False))
    # ~6 dB per bit for uniform quantization; generous floors
    assert sqnr_db(lin(x), q(x)) > {8: 40, 4: 16, 2: 3}[bits]


@pytest.mark.parametrize(
    "make",
    [
        lambda: QuantLinear.from_float(nn.Linear(32, 16), WeightQuantConfig(format="nf4", bits=4)),
        lambda: QuantConv2d.from_float(
            nn.Conv2d(4, 8, 3, padding=1),
            WeightQuantConfig(bits=4, symmetric=False),
            ActivationQuantConfig(bits=8, mode="dynamic"),
        ),
    ],
)
def test_meta_round_trip_gives_identical_outputs(make):
    torch.manual_seed(0)
    layer = make()
    rebuilt = _QuantLayer.from_meta(layer.meta())
    rebuilt.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(2, 4, 6, 6) if isinstance(layer, QuantConv2d) else torch.randn(3, 32)
    assert torch.equal(rebuilt(x), layer(x))


def test_unsupported_padding_mode_is_rejected():
    with pytest.raises(ValueError, match="padding_mode='zeros' only"):
        QuantConv2d.from_float(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), WeightQuantConfig())


def test_half_precision_inputs_run_in_their_dtype():
    lin = nn.Linear(16, 8)
    q = QuantLinear.from_float(lin, WeightQuantConfig(bits=8))
    out = q(torch.randn(2, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
