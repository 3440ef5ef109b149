"""Pure tensor numerics: affine INT quantization, range choice, STE/LSQ, NF4, bit packing.

No modules and no traversal here; everything works on the device of its input.
"""

from diffquant.quant.affine import (
    GRANULARITIES,
    choose_qparams,
    dequantize,
    dequantize_weight,
    fake_quantize,
    int_range,
    qparams_from_range,
    quantize,
    quantize_weight,
    reshape_groups,
)
from diffquant.quant.nf4 import (
    DQ_BLOCK_SIZE,
    NF4_BLOCK_SIZES,
    NF4_CODEBOOK,
    NF4Codes,
    create_dynamic_map,
    dequantize_absmax,
    dequantize_nf4,
    nf4_bits_per_weight,
    quantize_nf4,
)
from diffquant.quant.packing import PACKABLE_BITS, pack_int, storage_bits, unpack_int
from diffquant.quant.ranges import RANGE_METHODS, minmax_range, mse_range, percentile_range
from diffquant.quant.ste import fake_quantize_ste, lsq_fake_quantize, round_ste

__all__ = [
    "DQ_BLOCK_SIZE",
    "GRANULARITIES",
    "NF4_BLOCK_SIZES",
    "NF4_CODEBOOK",
    "PACKABLE_BITS",
    "RANGE_METHODS",
    "NF4Codes",
    "choose_qparams",
    "create_dynamic_map",
    "dequantize",
    "dequantize_absmax",
    "dequantize_nf4",
    "dequantize_weight",
    "fake_quantize",
    "fake_quantize_ste",
    "int_range",
    "lsq_fake_quantize",
    "minmax_range",
    "mse_range",
    "nf4_bits_per_weight",
    "pack_int",
    "percentile_range",
    "qparams_from_range",
    "quantize",
    "quantize_nf4",
    "quantize_weight",
    "reshape_groups",
    "round_ste",
    "storage_bits",
    "unpack_int",
]
