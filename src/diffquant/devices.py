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


def check_device(device: torch.device | str) -> torch.device:
    """``device`` as a :class:`torch.device`, checked to exist on this machine before any work starts.

    Raises:
        ValueError: not a device string, or a CUDA/MPS device this machine does not have, or ``meta``.

    Example:
        >>> check_device("cpu")
        device(type='cpu')
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device={device!r} is not a device ({err}); use 'cpu', 'cuda' or 'cuda:N'."
        ) from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} asks for CUDA, but CUDA is not available here; use device='cpu'."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                f"use an index below {torch.cuda.device_count()}."
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} asks for MPS, which is not available here; use device='cpu'.")
    elif dev.type == "meta":
        raise ValueError("device='meta' holds no data; load onto 'cpu' or 'cuda'.")
    return dev
