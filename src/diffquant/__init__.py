"""diffquant: quantize diffusion models to low bit-widths and fine-tune them cheaply.

The core API::

    import diffquant
    cfg = diffquant.QuantConfig(weights=diffquant.WeightQuantConfig(bits=4, granularity="group", group_size=64))
    diffquant.quantize_(unet, cfg)
    diffquant.save_quantized(unet, "unet-w4")
    unet = diffquant.load_quantized("unet-w4")
"""

__version__ = "0.1.0"

from diffquant.api import calibrate_activations, quantize_, register_weight_method, weight_bits_per_parameter
from diffquant.config import ActivationQuantConfig, QuantConfig, WeightQuantConfig
from diffquant.io import CheckpointError, load_quantized, save_quantized

__all__ = [
    "ActivationQuantConfig",
    "CheckpointError",
    "QuantConfig",
    "WeightQuantConfig",
    "__version__",
    "calibrate_activations",
    "load_quantized",
    "quantize_",
    "register_weight_method",
    "save_quantized",
    "weight_bits_per_parameter",
]
