import pytest
import torch

from diffquant import ActivationQuantConfig
from diffquant.nn import DynamicActivationQuantizer, StaticActivationQuantizer, build_activation_quantizer


def _calibrated(config, *batches):
    quantizer = build_activation_quantizer(config, channel_dim=-1)
    quantizer.start_calibration("layer")
    for batch in batches:
        assert torch.equal(quantizer(batch), batch)  # observing: values pass through unchanged
    quantizer.finish_calibration()
    return quantizer


def test_static_minmax_covers_observed_range_with_half_step_error():
    torch.manual_seed(0)
    batches = [torch.randn(32, 16) * 3, torch.rand(32, 16) * 5]
    quantizer = _calibrated(ActivationQuantConfig(bits=8), *batches)
    assert isinstance(quantizer, StaticActivationQuantizer)
    x = torch.cat(batches)
    err = (quantizer(x) - x).abs().max()
    assert err <= quantizer.scale.item() / 2 + 1e-6
    levels = torch.unique(torch.round(quantizer(x) / quantizer.scale + quantizer.zero_point))
    assert levels.numel() <= 256


@pytest.mark.parametrize("method", ["percentile", "mse"])
def test_static_clipping_methods_shrink_the_range_on_outliers(method):
    torch.manual_seed(0)
    x = torch.randn(4096, 8)
    x[0, 0] = 80.0  # one outlier
    minmax = _calibrated(ActivationQuantConfig(bits=4), x)
    clipped = _calibrated(ActivationQuantConfig(bits=4, range_method=method, percentile=99.9), x)
    assert clipped.scale.item() < minmax.scale.item()
    bulk = x[1:]
    assert (clipped(bulk) - bulk).pow(2).mean() < (minmax(bulk) - bulk).pow(2).mean()


def test_static_errors():
    quantizer = build_activation_quantizer(ActivationQuantConfig(), channel_dim=-1)
    with pytest.raises(RuntimeError, match="never calibrated"):
        quantizer(torch.randn(2, 4))
    quantizer.start_calibration("blk.0")
    with pytest.raises(ValueError, match="no data through blk.0"):
        quantizer.finish_calibration()
    quantizer.start_calibration("blk.0")
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantizer(torch.tensor([[1.0, float("nan")]]))


def test_static_constant_input_gets_finite_scale():
    quantizer = _calibrated(ActivationQuantConfig(bits=8), torch.zeros(4, 4))
    assert torch.isfinite(quantizer.scale).all() and quantizer.scale.item() > 0
    assert torch.equal(quantizer(torch.zeros(2, 4)), torch.zeros(2, 4))


@pytest.mark.parametrize(("channel_dim", "shape"), [(-1, (3, 5, 64)), (1, (2, 16, 4, 4))])
def test_dynamic_is_per_token(channel_dim, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    x[0] *= 100  # a loud token must not coarsen the others
    quantizer = build_activation_quantizer(ActivationQuantConfig(bits=8, mode="dynamic"), channel_dim)
    assert isinstance(quantizer, DynamicActivationQuantizer)
    out = quantizer(x)
    span = x.amax(dim=channel_dim, keepdim=True) - x.amin(dim=channel_dim, keepdim=True)
    assert ((out - x).abs() <= span / 255 / 2 + 1e-5).all()


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown activation mode 'histogram'"):
        build_activation_quantizer(ActivationQuantConfig(mode="histogram"), channel_dim=-1)
