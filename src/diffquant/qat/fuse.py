"""Conv2d + BatchNorm2d folding before quantization (the ``fuse_modules`` step of PyTorch static PTQ/QAT).

An inference-mode ``BatchNorm2d`` is a per-channel affine map, so it folds into the preceding
convolution (Jacob et al., CVPR 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", §3.2; Krishnamoorthi 2018, "Quantizing deep convolutional networks
for efficient inference", §2.9). With ``f = gamma / sqrt(running_var + eps)`` per output channel::

    W' = W * f          (scaled per output channel)
    b' = (b - running_mean) * f + beta

The folded convolution is then quantized as one layer: the integer kernel never sees a separate
normalisation. A ReLU after the pair is kept as it is (it commutes with nothing here and costs nothing).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence

import torch
from torch import nn

from diffquant.qat.modules import is_qat_layer

__all__ = ["fold_batch_norm", "fuse_conv_bn", "fuse_modules"]


def _check_pair(conv: nn.Module, bn: nn.Module, where: str) -> None:
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(
            f"{where}: can only fuse nn.Conv2d followed by nn.BatchNorm2d, got {type(conv).__name__} "
            f"and {type(bn).__name__}; list [conv_name, bn_name] or [conv_name, bn_name, relu_name]."
        )
    if is_qat_layer(conv):
        raise ValueError(f"{where}: the convolution is already prepared for QAT; fuse before prepare_qat.")
    if bn.training:
        raise ValueError(
            f"{where}: BatchNorm2d is in training mode, but fusion folds its running statistics; "
            "call model.eval() before fusing."
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{where}: BatchNorm2d was built with track_running_stats=False and normalises with batch "
            "statistics, which cannot be folded into a convolution; keep this pair unfused."
        )
    if bn.num_features != conv.out_channels:
        raise ValueError(
            f"{where}: BatchNorm2d has {bn.num_features} features but the convolution has "
            f"{conv.out_channels} output channels; they are not a conv/bn pair."
        )


@torch.no_grad()
def fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d computing ``bn(conv(x))`` with ``bn``'s running statistics (eval mode).

    Computed in float64 and cast back to the convolution's dtype; ``conv`` and ``bn`` are unchanged.

    Raises:
        TypeError: if the modules are not a Conv2d and a BatchNorm2d.
        ValueError: if ``bn`` is in training mode, has no running statistics, or its size does not
            match the convolution's output channels.
    """
    _check_pair(conv, bn, "fold_batch_norm")
    dtype = conv.weight.dtype
    factor = torch.rsqrt(bn.running_var.double() + bn.eps)  # (out,)
    if bn.weight is not None:
        factor = factor * bn.weight.double()
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(factor)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(factor)
    fused = copy.deepcopy(conv)
    weight = conv.weight.double() * factor.reshape(
        -1, 1, 1, 1
    )  # (out, in/groups, kh, kw), one factor per row
    fused.weight = nn.Parameter(weight.to(dtype), requires_grad=conv.weight.requires_grad)
    new_bias = (bias - bn.running_mean.double()) * factor + beta
    fused.bias = nn.Parameter(new_bias.to(dtype), requires_grad=conv.weight.requires_grad)
    return fused


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """Fold every ``Conv2d`` directly followed by ``BatchNorm2d`` inside an ``nn.Sequential``, in place.

    The convolution is replaced by the folded one and the BatchNorm by ``nn.Identity`` (so indices and
    names of the container stay valid); a ReLU after the pair stays where it is. Pairs outside
    ``nn.Sequential`` containers are fused by name with :func:`fuse_modules`.

    Returns:
        ``model`` (modified in place).

    Raises:
        ValueError: if a BatchNorm2d of a pair is in training mode (call ``model.eval()`` first) or
            cannot be folded (see :func:`fold_batch_norm`).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
        >>> type(fuse_conv_bn(net)[1]).__name__
        'Identity'
    """
    containers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Sequential)]
    for prefix, container in containers:
        keys = list(container._modules)
        for first, second in itertools.pairwise(keys):
            conv, bn = container._modules[first], container._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                where = f"{prefix}.{first}" if prefix else first
                _check_pair(conv, bn, f"layer {where!r}")
                container._modules[first] = fold_batch_norm(conv, bn)
                container._modules[second] = nn.Identity()
    return model


def fuse_modules(model: nn.Module, groups: Sequence[Sequence[str]]) -> nn.Module:
    """Fold named ``[conv, bn]`` or ``[conv, bn, relu]`` groups in place (like ``torch.ao`` ``fuse_modules``).

    Each convolution becomes the folded one, each BatchNorm ``nn.Identity``; the ReLU, when listed, is
    checked and kept. Every group is checked before anything changes.

    Args:
        model: the float model, in eval mode.
        groups: module names from ``model.named_modules()``, e.g. ``[["conv1", "bn1", "relu1"]]``.

    Returns:
        ``model`` (modified in place).

    Raises:
        TypeError: if a group is not Conv2d, BatchNorm2d (, ReLU).
        ValueError: on an unknown name, a group of the wrong length, or a BatchNorm that cannot be folded
            (training mode: call ``model.eval()`` first).
    """
    pairs = []
    for group in groups:
        if isinstance(group, str) or len(group) not in (2, 3):
            raise ValueError(
                f"each fusion group lists [conv, bn] or [conv, bn, relu] module names, got {group!r}."
            )
        try:
            modules = [model.get_submodule(name) for name in group]
        except AttributeError as err:
            raise ValueError(
                f"fusion group {list(group)}: {err}; names come from model.named_modules()."
            ) from err
        _check_pair(modules[0], modules[1], f"fusion group {list(group)}")
        if len(group) == 3 and not isinstance(modules[2], nn.ReLU):
            raise TypeError(
                f"fusion group {list(group)}: the third module must be nn.ReLU, "
                f"got {type(modules[2]).__name__}."
            )
        pairs.append((group[0], group[1], modules[0], modules[1]))
    for conv_name, bn_name, conv, bn in pairs:
        model.set_submodule(conv_name, fold_batch_norm(conv, bn))
        model.set_submodule(bn_name, nn.Identity())
    return model
