"""W8A8 on CUDA: ``torch._int_mm`` (cuBLAS int8) against the reference path. Skipped without a GPU."""

import pytest
import torch

from diffquant import ActivationQuantConfig, WeightQuantConfig
from diffquant.nn import QuantConv2d, QuantLinear
from diffquant.nn.kernel_dispatch import integer_path_outputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    """The reference path's float matmul must not run in TF32 (that is not float rounding of fp32)."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_int_mm_linear_and_1x1_conv_match_the_reference_on_cuda(mode):
    acts = ActivationQuantConfig(mode=mode)
    linear = QuantLinear.from_float(torch.nn.Linear(64, 32), WeightQuantConfig(bits=8), acts).cuda()
    conv = QuantConv2d.from_float(torch.nn.Conv2d(64, 32, 1), WeightQuantConfig(bits=8), acts).cuda()
    tokens = torch.randn(4, 8, 64, device="cuda")
    image = torch.randn(2, 64, 4, 4, device="cuda")
    for layer, x in ((linear, tokens), (conv, image)):
        if mode == "static":
            layer.input_quant.start_calibration("layer")
            layer(x)
            layer.input_quant.finish_calibration()
        with torch.no_grad():
            reference = layer._reference_forward(x)
            outputs, bound = integer_path_outputs(layer, x)
            fast = layer(x)  # whichever path measured fastest
        int_mm = [name for name in outputs if name.startswith("int_mm")]
        assert int_mm, outputs.keys()
        for name in int_mm:
            assert ((outputs[name] - reference).abs() <= bound).all(), name
        assert ((fast - reference).abs() <= bound).all()
