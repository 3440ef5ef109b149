"""Integer W8A8 kernels against exact integer arithmetic and against the fake-quant reference path.

Tolerance (README "Speed: real int8 kernels"): the integer paths compute ``Σ (q_x - z) q_w`` exactly;
the reference path rounds a K-term float32 sum. Both therefore sit within ``(K+2)·ε·Σ|x̂·ŵ|`` of the
exact value, and the tests allow twice that, elementwise (``W8A8Kernels.rounding_bound``).
"""

import pytest
import torch

from diffquant import ActivationQuantConfig, WeightQuantConfig
from diffquant.kernels import cpu_isa, w8a8
from diffquant.models.tiny import scheduler_for_tests
from diffquant.nn import QuantConv2d, QuantLinear
from diffquant.nn.kernel_dispatch import integer_path_outputs
from diffquant.noise import NoiseSchedule, noise_level
from diffquant.quant import affine

EXACT = cpu_isa().exact_int8
SCHEDULE = NoiseSchedule.from_scheduler(scheduler_for_tests())


def _weight_codes(shape, full_range: bool) -> torch.Tensor:
    """int8 codes; without ``full_range`` |w| <= 64, which no int16 pair can saturate (any CPU)."""
    limit = 128 if full_range else 65
    return torch.randint(-limit, limit, shape, dtype=torch.int8).clamp(min=-128)


@pytest.mark.parametrize("full_range", [False, True])
def test_int_mm_accumulators_equal_exact_integer_sums(full_range):
    if full_range and not EXACT:
        pytest.skip("full-range int8 GEMMs saturate int16 pairs on CPUs without VNNI/AMX")
    codes_w = _weight_codes((24, 40), full_range)
    codes_x = torch.randint(0, 256, (33, 40), dtype=torch.int32).to(torch.uint8)
    zero = torch.randint(0, 256, (33, 1), dtype=torch.int32)  # one zero point per row
    weight_t, col_sums = w8a8.int_mm_pack(codes_w)
    acc = w8a8.int_mm_accumulators((codes_x.int() - 128).to(torch.int8), zero, weight_t, col_sums)
    exact = (codes_x.long() - zero.long()) @ codes_w.long().t()
    assert acc.dtype == torch.int32
    assert torch.equal(acc.long(), exact)


@pytest.mark.parametrize("full_range", [False, True])
def test_onednn_accumulators_equal_exact_integer_sums(full_range):
    if not cpu_isa().onednn:
        pytest.skip("torch built without oneDNN")
    if full_range and not EXACT:
        pytest.skip("full-range int8 GEMMs saturate int16 pairs on CPUs without VNNI/AMX")
    codes_w = _weight_codes((24, 40), full_range)
    codes_x = torch.randint(0, 256, (9, 40), dtype=torch.int32).to(torch.uint8)
    ones = torch.ones(24)  # unit scales: the float32 output is the accumulator itself (|acc| < 2**24)
    out = w8a8.onednn_linear(
        codes_x,
        torch.tensor(1.0),
        torch.tensor(7, dtype=torch.int32),
        w8a8.onednn_pack_linear(codes_w),
        ones,
        None,
    )
    assert torch.equal(out.long(), (codes_x.long() - 7) @ codes_w.long().t())
    conv_w = _weight_codes((6, 5, 3, 3), full_range)
    image = torch.randint(0, 256, (2, 5, 7, 7), dtype=torch.int32).to(torch.uint8)
    packed = w8a8.onednn_pack_conv(conv_w, torch.ones(6), (1, 1), (1, 1), (1, 1), 1)
    out = w8a8.onednn_conv2d(
        image,
        torch.tensor(1.0),
        torch.tensor(7, dtype=torch.int32),
        packed,
        torch.ones(6),
        None,
        (1, 1),
        (1, 1),
        (1, 1),
        1,
    )
    # padding holds the zero point (7), i.e. a centred 0, as in the reference's zero-padded float conv
    exact = torch.nn.functional.conv2d(image.double() - 7, conv_w.double(), padding=1)
    assert torch.equal(out.double(), exact)


@pytest.mark.parametrize("symmetric", [False, True])
def test_activation_codes_are_the_reference_codes(symmetric):
    x = torch.randn(4, 33) * 3
    qmin, qmax = affine.int_range(8, symmetric)
    scale, zero = affine.qparams_from_range(x.min(), x.max(), 8, symmetric)
    x[0, :3] = torch.tensor([1e9, -1e9, 0.0])  # far outside the range: clamped alike
    expected = affine.fake_quantize(x, scale, zero.float(), qmin, qmax)
    codes = w8a8.activation_codes(x, scale, zero.float(), qmin, qmax)
    assert torch.equal(((codes.int() + qmin) - zero) * scale, expected)
    signed = w8a8.activation_codes(x, scale, zero.float(), qmin, qmax, signed=True)
    assert torch.equal(((signed.int() + 128 + qmin) - zero) * scale, expected)


def test_int16_pair_guard():
    assert w8a8.int16_pairs_safe(torch.tensor([[64, -64, 127, 0]], dtype=torch.int8))
    assert not w8a8.int16_pairs_safe(torch.tensor([[65, -64, 0, 0]], dtype=torch.int8))
    conv = torch.zeros(1, 2, 1, 2, dtype=torch.int8)
    conv[0, :, 0, 0] = torch.tensor([100, 100])  # neighbours along input channels, same tap
    assert not w8a8.int16_pairs_safe(conv)
    conv[0, 1, 0, 0], conv[0, 1, 0, 1] = 0, 100  # neighbours along the kernel width only
    assert w8a8.int16_pairs_safe(conv)


def _calibrated(layer, x, level=None):
    layer.input_quant.start_calibration("layer")
    if level is None:
        layer(x)
    else:
        with noise_level(level[0], schedule=SCHEDULE):
            layer(x)
    layer.input_quant.finish_calibration()
    return layer


def _check_paths(layer, x):
    with torch.no_grad():
        reference = layer._reference_forward(x)
        outputs, bound = integer_path_outputs(layer, x)
    assert outputs
    for name, out in outputs.items():
        assert out.shape == reference.shape, name
        assert ((out - reference).abs() <= bound).all(), (name, (out - reference).abs().max())
        assert bound.max() < 1e-2 * reference.abs().max(), "bound too loose to mean anything"
    return outputs


def _weights(full_range: bool) -> WeightQuantConfig:
    return WeightQuantConfig(bits=8 if full_range else 7)  # 7-bit codes pass the int16 guard anywhere


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_linear_paths_match_reference(mode):
    layer = QuantLinear.from_float(torch.nn.Linear(48, 40), _weights(EXACT), ActivationQuantConfig(mode=mode))
    x = torch.randn(2, 7, 48) * 2 + 0.3
    if mode == "static":
        _calibrated(layer, x)
    outputs = _check_paths(layer, x)
    assert any(name.startswith("int_mm") for name in outputs)
    if cpu_isa().onednn:
        assert ("onednn-w8a8-linear" if mode == "static" else "onednn-w8a8-linear-rows") in outputs


@pytest.mark.parametrize("mode", ["step_table", "logsnr"])
def test_timestep_scales_are_runtime_arguments(mode):
    """One packed weight serves per-sample scales of mixed and equal timesteps."""
    conv = QuantConv2d.from_float(
        torch.nn.Conv2d(6, 8, 3, padding=1), _weights(EXACT), ActivationQuantConfig(mode=mode)
    )
    linear = QuantLinear.from_float(torch.nn.Linear(16, 8), _weights(EXACT), ActivationQuantConfig(mode=mode))
    amplitudes = torch.tensor([4.0, 1.0, 0.5]).reshape(3, 1, 1, 1)
    x = torch.randn(3, 6, 5, 5) * amplitudes
    tokens = torch.randn(3, 4, 16) * amplitudes[:, :, 0]
    timesteps = torch.tensor([999.0, 500.0, 10.0])
    for layer, inputs in ((conv, x), (linear, tokens)):
        _calibrated(layer, inputs, level=(timesteps,))
        for level in ([999.0, 10.0, 10.0], [500.0, 500.0, 500.0]):
            with noise_level(torch.tensor(level), schedule=SCHEDULE):
                _check_paths(layer, inputs)


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("symmetric", [False, True])
def test_conv_paths_match_reference(kernel, symmetric):
    float_conv = torch.nn.Conv2d(6, 10, kernel, padding=kernel // 2, stride=1 if kernel == 1 else 2)
    layer = QuantConv2d.from_float(float_conv, _weights(EXACT), ActivationQuantConfig(symmetric=symmetric))
    x = torch.randn(2, 6, 9, 9) + 0.5
    _calibrated(layer, x)
    outputs = _check_paths(layer, x)
    if cpu_isa().onednn:
        assert "onednn-w8a8-conv" in outputs
    assert (kernel == 1) == any("conv1x1" in name for name in outputs)


def test_dynamic_3x3_conv_has_no_integer_path_but_1x1_does():
    acts = ActivationQuantConfig(mode="dynamic")
    conv3 = QuantConv2d.from_float(torch.nn.Conv2d(4, 4, 3, padding=1), _weights(EXACT), acts)
    conv1 = QuantConv2d.from_float(torch.nn.Conv2d(4, 4, 1), _weights(EXACT), acts)
    x = torch.randn(2, 4, 6, 6)
    with pytest.raises(ValueError, match="per-pixel"):  # the scale varies inside the 3x3 window
        integer_path_outputs(conv3, x)
    assert _check_paths(conv1, x)
