"""torch.compile traces quantized layers without graph breaks (they take the reference path when compiled).

Compiling is slow on a loaded machine; each case is skipped with a note when it takes over 60 s.
"""

import time

import pytest
import torch

import diffquant
from diffquant import ActivationQuantConfig, QuantConfig, WeightQuantConfig

CONFIGS = {
    "w8a8-static": QuantConfig(weights=WeightQuantConfig(bits=8), activations=ActivationQuantConfig()),
    "w8a8-dynamic": QuantConfig(
        weights=WeightQuantConfig(bits=8), activations=ActivationQuantConfig(mode="dynamic")
    ),
    "w4a16-group": QuantConfig(weights=WeightQuantConfig(bits=4, granularity="group", group_size=4)),
}


class ConvThenLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.linear(self.conv(x).permute(0, 2, 3, 1))  # (N, H, W, C) tokens


@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantized_layers_compile_with_fullgraph(name):
    model = ConvThenLinear()
    x = torch.randn(2, 4, 6, 6)
    diffquant.quantize_(model, CONFIGS[name], calibrate=lambda m: m(x))
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        start = time.perf_counter()
        compiled = torch.compile(model, fullgraph=True, backend="eager")(x)  # raises on a graph break
        if time.perf_counter() - start > 60:
            pytest.skip("compiling took over 60 s on this machine")
    # compiled runs the fake-quant reference path; eager may run an integer kernel (same up to rounding)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
