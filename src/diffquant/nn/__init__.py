"""Quantized modules: packed weights, activation quantizers, QuantLinear / QuantConv2d."""

from diffquant.nn.act_quant import (
    ActivationQuantizer,
    DynamicActivationQuantizer,
    StaticActivationQuantizer,
    build_activation_quantizer,
)
from diffquant.nn.act_step_table import StepTableActivationQuantizer
from diffquant.nn.act_tdq import LogSnrTDQActivationQuantizer, TDQActivationQuantizer
from diffquant.nn.act_timestep import TimestepActivationQuantizer
from diffquant.nn.packed import IntPackedWeight, NF4PackedWeight, PackedWeight
from diffquant.nn.qmodules import QuantConv2d, QuantLinear, is_quantized_layer, quant_layer_class

__all__ = [
    "ActivationQuantizer",
    "DynamicActivationQuantizer",
    "IntPackedWeight",
    "LogSnrTDQActivationQuantizer",
    "NF4PackedWeight",
    "PackedWeight",
    "QuantConv2d",
    "QuantLinear",
    "StaticActivationQuantizer",
    "StepTableActivationQuantizer",
    "TDQActivationQuantizer",
    "TimestepActivationQuantizer",
    "build_activation_quantizer",
    "is_quantized_layer",
    "quant_layer_class",
]
