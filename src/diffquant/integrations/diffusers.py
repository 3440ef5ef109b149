"""diffquant as a diffusers quantization backend (importing this module registers it).

Example:
    >>> from diffusers import UNet2DConditionModel
    >>> from diffquant import WeightQuantConfig
    >>> from diffquant.integrations.diffusers import DiffQuantConfig
    >>> config = DiffQuantConfig(weights=WeightQuantConfig(format="nf4", bits=4))
    >>> # unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", quantization_config=config)
    >>> # unet.save_pretrained("unet-nf4"); UNet2DConditionModel.from_pretrained("unet-nf4")
"""

from diffquant.integrations.diffusers_config import DiffQuantConfig
from diffquant.integrations.diffusers_quantizer import DiffQuantQuantizer, mark_quantized, register
from diffquant.integrations.pipeline import quantize_pipeline

__all__ = ["DiffQuantConfig", "DiffQuantQuantizer", "mark_quantized", "quantize_pipeline", "register"]
