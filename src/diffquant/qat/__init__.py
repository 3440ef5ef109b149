"""Quantization-aware training, PyTorch eager-mode style (seed 004), on diffquant's own modules.

Fold BatchNorms (:func:`fuse_conv_bn`, :func:`fuse_modules`), swap Linear/Conv2d layers for
fake-quantizing QAT layers (:func:`prepare_qat`), train, then :func:`convert` to packed
:class:`~diffquant.nn.qmodules.QuantLinear` / :class:`~diffquant.nn.qmodules.QuantConv2d` layers that
compute exactly what the eval-mode QAT model computes. :func:`qat_finetune` does all of it for any
diffusers denoiser.

Example:
    >>> import torch
    >>> from diffquant import ActivationQuantConfig, QuantConfig, WeightQuantConfig
    >>> from diffquant.qat import convert, fuse_conv_bn, prepare_qat
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    >>> cfg = QuantConfig(weights=WeightQuantConfig(bits=4), activations=ActivationQuantConfig(bits=8))
    >>> net = prepare_qat(fuse_conv_bn(net), cfg).train()
    >>> net(torch.randn(8, 1, 6, 6)).mean().backward()  # ...an optimizer steps here...
    >>> net = convert(net.eval())
"""

from diffquant.qat.fuse import fold_batch_norm, fuse_conv_bn, fuse_modules
from diffquant.qat.modules import (
    RANGE_MODES,
    ActivationFakeQuantizer,
    LSQActivationFakeQuantizer,
    LSQWeightFakeQuantizer,
    ObserverActivationFakeQuantizer,
    ObserverWeightFakeQuantizer,
    QATConv2d,
    QATLinear,
    WeightFakeQuantizer,
    is_qat_layer,
)
from diffquant.qat.workflow import convert, prepare_qat, qat_finetune, qat_layers

__all__ = [
    "RANGE_MODES",
    "ActivationFakeQuantizer",
    "LSQActivationFakeQuantizer",
    "LSQWeightFakeQuantizer",
    "ObserverActivationFakeQuantizer",
    "ObserverWeightFakeQuantizer",
    "QATConv2d",
    "QATLinear",
    "WeightFakeQuantizer",
    "convert",
    "fold_batch_norm",
    "fuse_conv_bn",
    "fuse_modules",
    "is_qat_layer",
    "prepare_qat",
    "qat_finetune",
    "qat_layers",
]
