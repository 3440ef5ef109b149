"""Second-order post-training quantization: GPTQ and Qronos over per-layer input statistics.

Pure tensor functions over ``(W, H, G)``; the calibration pipeline that runs the model, hooks the layers
and feeds :class:`InputStatistics` is built on top of them.
"""

from diffquant.ptq.gptq import QuantResult, gptq_quantize
from diffquant.ptq.hessian import InputStatistics, NotPositiveDefiniteError, unfold_conv_input
from diffquant.ptq.qronos import qronos_quantize

__all__ = [
    "InputStatistics",
    "NotPositiveDefiniteError",
    "QuantResult",
    "gptq_quantize",
    "qronos_quantize",
    "unfold_conv_input",
]
