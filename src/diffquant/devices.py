"""Where a module lives: the device of its first parameter or buffer.

Quantized models can hold only buffers (packed weights) and no parameters, so ``next(model.parameters())``
is not enough; every caller that needs "the model's device" uses :func:`module_device`.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


def module_device(model: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """Device of ``model``'s first parameter, else its first buffer, else ``default``.

    Example:
        >>> module_device(torch.nn.Linear(2, 2))
        device(type='cpu')
    """
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device(default)
