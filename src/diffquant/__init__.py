"""diffquant: quantize diffusion models to low bit-widths and fine-tune them cheaply.

The core API::

    import diffquant
    cfg = diffquant.QuantConfig(weights=diffquant.WeightQuantConfig(bits=4, method="gptq"))
    diffquant.quantize_(unet, cfg, calibrate=lambda m: run_the_float_sampler(m))
    diffquant.save_quantized(unet, "unet-w4")
    unet = diffquant.load_quantized("unet-w4")
"""

from diffquant._version import __version__
from diffquant.api import calibrate_activations, quantize_, register_weight_method, weight_bits_per_parameter
from diffquant.config import ActivationQuantConfig, LayerOverride, QuantConfig, WeightQuantConfig
from diffquant.errors import NumericalWarning
from diffquant.integrations import install_hooks as _install_integration_hooks
from diffquant.io import CheckpointError, load_quantized, save_quantized
from diffquant.nn.kernel_report import kernel_report
from diffquant.ptq import methods as _ptq_methods  # noqa: F401  (registers the "gptq" and "qronos" weight methods)

_install_integration_hooks()  # diffusers / peft learn about diffquant when (and if) they are imported

__all__ = [
    "ActivationQuantConfig",
    "CheckpointError",
    "LayerOverride",
    "NumericalWarning",
    "QuantConfig",
    "WeightQuantConfig",
    "__version__",
    "calibrate_activations",
    "kernel_report",
    "load_quantized",
    "quantize_",
    "register_weight_method",
    "save_quantized",
    "weight_bits_per_parameter",
]
