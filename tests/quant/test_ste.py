import math

import pytest
import torch

from diffquant.quant.affine import fake_quantize
from diffquant.quant.ste import fake_quantize_ste, lsq_fake_quantize, round_ste


def test_round_ste_forward_and_identity_gradient():
    x = torch.tensor([-2.5, -1.49, -0.5, 0.2, 0.5, 1.5, 2.7], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    upstream = torch.arange(1.0, 8.0)
    y.backward(upstream)
    assert torch.equal(x.grad, upstream)


def test_fake_quantize_ste_forward_is_bit_identical_and_gradient_is_masked():
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 8) * 3).requires_grad_()
    scale = (torch.rand(1, 3, 1) * 0.1 + 0.02).requires_grad_()
    zp = torch.tensor([[[3]], [[-2]], [[0]]], dtype=torch.int32).reshape(1, 3, 1)
    qmin, qmax = -8, 7
    y = fake_quantize_ste(x, scale, zp, qmin, qmax)
    assert torch.equal(y, fake_quantize(x.detach(), scale.detach(), zp, qmin, qmax))
    upstream = torch.randn_like(y)
    y.backward(upstream)
    v = x.detach() / scale.detach() + zp  # LSQ's mask: clip before rounding
    inside = (v >= qmin) & (v <= qmax)
    assert 0 < int(inside.sum()) < inside.numel()  # both regimes are exercised
    torch.testing.assert_close(x.grad, upstream * inside, rtol=1e-6, atol=0)
    assert scale.grad is None


def _lsq_step_grad_reference(x, s, qmin, qmax):
    """LSQ (Esser et al. 2020, eq. 3): d x_hat / d s per element, zero point 0."""
    v = x / s
    return torch.where(v <= qmin, float(qmin), torch.where(v >= qmax, float(qmax), torch.round(v) - v))


def test_lsq_step_gradient_matches_paper_formula():
    x = torch.tensor([-3.0, -1.23, -0.4, 0.0, 0.26, 0.74, 1.1, 2.9, 5.0])
    step = torch.tensor(0.3, requires_grad=True)
    qmin, qmax = -4, 3
    y = lsq_fake_quantize(x, step, torch.tensor(0), qmin, qmax)
    assert torch.equal(y, fake_quantize(x, step.detach(), torch.tensor(0), qmin, qmax))
    upstream = torch.linspace(-1, 1, x.numel())
    y.backward(upstream)
    g = 1 / math.sqrt(x.numel() * qmax)
    expected = g * (upstream * _lsq_step_grad_reference(x, step.detach(), qmin, qmax)).sum()
    torch.testing.assert_close(step.grad, expected, rtol=1e-5, atol=1e-7)


def test_lsq_per_channel_step_and_custom_grad_scale():
    torch.manual_seed(0)
    x = (torch.randn(3, 10) * 2).requires_grad_()
    step = torch.tensor([[0.1], [0.3], [0.5]], requires_grad=True)
    y = lsq_fake_quantize(x, step, torch.zeros(3, 1, dtype=torch.int32), -8, 7, grad_scale=0.5)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    per_element = _lsq_step_grad_reference(x.detach(), step.detach(), -8, 7)
    torch.testing.assert_close(
        step.grad, 0.5 * (upstream * per_element).sum(1, keepdim=True), rtol=1e-5, atol=1e-6
    )
    v = x.detach() / step.detach()
    inside = (v >= -8) & (v <= 7)
    torch.testing.assert_close(x.grad, upstream * inside, rtol=1e-6, atol=0)


def test_lsq_float_zero_point_is_rounded_and_learnable():
    # x / 0.1 + 20: the first five are inside [0, 255]; -5.0 -> -30 and 30.0 -> 320 are clipped.
    x = torch.tensor([-1.0, 0.0, 0.33, 1.0, 3.0, -5.0, 30.0])
    step = torch.tensor(0.1, requires_grad=True)
    zp = torch.tensor(20.4, requires_grad=True)  # used as 20
    qmin, qmax = 0, 255
    y = lsq_fake_quantize(x, step, zp, qmin, qmax, grad_scale=0.5)
    assert torch.equal(y, fake_quantize(x, step.detach(), torch.tensor(20.0), qmin, qmax))
    y.sum().backward()
    # Inside, z cancels; each clipped element contributes -step, times the gradient scale.
    torch.testing.assert_close(zp.grad, torch.tensor(0.5 * 2 * -0.1))


def test_lsq_rejects_nonpositive_qmax():
    with pytest.raises(ValueError, match="qmax"):
        lsq_fake_quantize(torch.randn(3), torch.tensor(0.1), torch.tensor(0), -1, 0)
