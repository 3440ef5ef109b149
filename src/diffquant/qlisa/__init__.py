"""QLISA (seed 000): NF4 frozen layers, layerwise importance sampling, optimizer in backward.

QLoRA's NF4 storage (Dettmers et al., NeurIPS 2023) for every frozen layer, LISA's sampling (Pan et al.,
NeurIPS 2024) of which layers train, and one optimizer per parameter stepped inside backward.

Example:
    >>> from diffquant.qlisa import QLISADiffusion
    >>> qlisa = QLISADiffusion(unet, gamma=2, interval=20, lr=2e-4).register().insert_hook()  # doctest: +SKIP
"""

from diffquant.qlisa.layers import NF4_CONFIG, QLISAConv2d, QLISALayer, QLISALinear, qlisa_layer_for
from diffquant.qlisa.optim import OptimizerInBackward, adamw_factory, constant_schedule
from diffquant.qlisa.qlisa_diffusion import QLISADiffusion
from diffquant.qlisa.sampling import LayerSampler

__all__ = [
    "NF4_CONFIG",
    "LayerSampler",
    "OptimizerInBackward",
    "QLISAConv2d",
    "QLISADiffusion",
    "QLISALayer",
    "QLISALinear",
    "adamw_factory",
    "constant_schedule",
    "qlisa_layer_for",
]
