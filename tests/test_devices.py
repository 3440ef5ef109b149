"""Finding a model's device, and device-independent calibration sampling."""

import torch
from torch import nn

from diffquant.devices import module_device
from diffquant.nn.act_quant import sample_values


def test_module_device_uses_parameters_then_buffers_then_default():
    only_buffers = nn.Module()
    only_buffers.register_buffer("codes", torch.zeros(3, dtype=torch.uint8, device="meta"))
    assert module_device(only_buffers) == torch.device("meta")
    assert module_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")
    assert module_device(nn.ReLU()) == torch.device("cpu")
    assert module_device(nn.ReLU(), default="meta") == torch.device("meta")


def test_sample_values_are_drawn_from_a_cpu_generator():
    flat = torch.arange(1000.0)
    first, again = sample_values(flat, 64, seed=3), sample_values(flat, 64, seed=3)
    assert first.device.type == "cpu" and first.shape == (64,)
    assert torch.equal(first, again)
    assert not torch.equal(first, sample_values(flat, 64, seed=4))
    assert sample_values(flat[:10], 64, seed=0).shape == (10,)  # never more than the tensor holds
