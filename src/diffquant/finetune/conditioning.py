"""Conditioning as data: the keyword arguments a denoiser takes besides the noisy sample and timestep.

A *conditioning* is a dict of model kwargs, batch dimension first, for example

- class-conditional UNet / DiT: ``{"class_labels": int64 (B,)}``;
- Stable Diffusion: ``{"encoder_hidden_states": (B, L, D)}`` (+ ``encoder_attention_mask`` (B, L));
- SDXL: ``{"encoder_hidden_states": ..., "added_cond_kwargs": {"text_embeds": (B, P), "time_ids": (B, 6)}}``;
- PixArt: ``{"encoder_hidden_states": ..., "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}``;
- SD3 / Flux: ``{"encoder_hidden_states": ..., "pooled_projections": (B, P)}``.

Values may be tensors (batch first), nested dicts of the same, or anything else (``None``, flags), which
is passed through unchanged. An *unconditional* conditioning (the empty prompt, the null class) has the
same keys with batch size 1 (broadcast to any batch) or the batch's size; it stands in for a sample's
conditioning under classifier-free-guidance dropout and forms the second half of a guided batch.

Example:
    >>> cond = class_conditioning(torch.tensor([3, 1, 4]))
    >>> uncond = class_conditioning(torch.tensor([10]))
    >>> select_conditioning(torch.tensor([False, True, False]), cond, uncond)["class_labels"]
    tensor([ 3, 10,  4])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Conditioning = dict[str, Any]
"""Model kwargs, tensors batch first; nested dicts allowed; non-tensor values pass through."""


def _map(cond: Conditioning, fn: Callable[[Tensor], Tensor]) -> Conditioning:
    out: Conditioning = {}
    for key, value in cond.items():
        if isinstance(value, Tensor):
            out[key] = fn(value)
        elif isinstance(value, dict):
            out[key] = _map(value, fn)
        else:
            out[key] = value
    return out


def _tensors(cond: Conditioning) -> list[tuple[str, Tensor]]:
    found = []
    for key, value in cond.items():
        if isinstance(value, Tensor):
            found.append((key, value))
        elif isinstance(value, dict):
            found += [(f"{key}.{k}", v) for k, v in _tensors(value)]
    return found


def class_conditioning(labels: Tensor | int) -> Conditioning:
    """``{"class_labels": labels}`` (a single id becomes a batch of one: an unconditional class)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    return {"class_labels": labels.reshape(-1)}


def conditioning_batch_size(cond: Conditioning) -> int | None:
    """The common leading dimension of the tensors of ``cond`` (``None`` when it holds no tensor).

    Raises:
        ValueError: tensors with different batch sizes, or a 0-dim tensor.
    """
    sizes = {}
    for key, value in _tensors(cond):
        if value.ndim == 0:
            raise ValueError(
                f"conditioning {key!r} is a 0-dim tensor; every conditioning tensor needs a batch "
                "dimension first (e.g. labels of shape (B,), text states (B, L, D))."
            )
        sizes[key] = value.shape[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"conditioning tensors disagree on the batch size: {sizes}; give every tensor the same "
            "leading (batch) dimension."
        )
    return next(iter(sizes.values()), None)


def index_conditioning(cond: Conditioning, index: Tensor) -> Conditioning:
    """The rows ``index`` (``int64 (B,)`` or bool mask) of every tensor of ``cond``."""
    return _map(cond, lambda t: t[index.to(t.device)])


def expand_conditioning(cond: Conditioning, batch_size: int) -> Conditioning:
    """``cond`` with batch size ``batch_size``: batch-1 tensors are repeated, others must match.

    Raises:
        ValueError: a tensor whose batch size is neither 1 nor ``batch_size``.
    """
    size = conditioning_batch_size(cond)
    if size is None or size == batch_size:
        return dict(cond)
    if size != 1:
        raise ValueError(
            f"cannot broadcast a conditioning of batch size {size} to {batch_size}; give the "
            "unconditional conditioning batch size 1 (shared) or the batch's size."
        )
    return _map(cond, lambda t: t.expand(batch_size, *t.shape[1:]).clone())


def concat_conditioning(first: Conditioning, second: Conditioning) -> Conditioning:
    """Rows of ``first`` then rows of ``second`` (same keys; non-tensor values taken from ``first``).

    Raises:
        ValueError: the two have different keys.
    """
    if first.keys() != second.keys():
        raise ValueError(
            f"cannot concatenate conditionings with different keys {sorted(first)} and {sorted(second)}; "
            "the unconditional conditioning needs the same keys as the conditional one."
        )
    out: Conditioning = {}
    for key, value in first.items():
        other = second[key]
        if isinstance(value, Tensor):
            out[key] = torch.cat([value, other.to(value.device)])
        elif isinstance(value, dict):
            out[key] = concat_conditioning(value, other)
        else:
            out[key] = value
    return out


def select_conditioning(use_second: Tensor, first: Conditioning, second: Conditioning) -> Conditioning:
    """Per sample: ``second`` where ``use_second`` (bool ``(B,)``) is True, else ``first``.

    ``second`` may have batch size 1 (e.g. the unconditional conditioning); tensor shapes beyond the
    batch dimension must agree (pad text states to the same length).

    Raises:
        ValueError: different keys or shapes.
    """
    batch = use_second.shape[0]
    second = expand_conditioning(second, batch)
    if first.keys() != second.keys():
        raise ValueError(
            f"cannot mix conditionings with different keys {sorted(first)} and {sorted(second)}; the "
            "unconditional conditioning needs the same keys as the conditional one."
        )
    out: Conditioning = {}
    for key, value in first.items():
        other = second[key]
        if isinstance(value, Tensor):
            if other.shape != value.shape:
                raise ValueError(
                    f"conditioning {key!r}: shape {tuple(value.shape)} vs unconditional "
                    f"{tuple(other.shape)}; they must agree beyond the batch dimension."
                )
            mask = use_second.to(value.device).reshape(batch, *([1] * (value.ndim - 1)))
            out[key] = torch.where(mask, other.to(value.device, value.dtype), value)
        elif isinstance(value, dict):
            out[key] = select_conditioning(use_second, value, other)
        else:
            out[key] = value
    return out


def conditioning_to(
    cond: Conditioning, device: torch.device | str, dtype: torch.dtype | None = None
) -> Conditioning:
    """``cond`` on ``device``; floating-point tensors also cast to ``dtype`` when given (ids stay integer)."""

    def move(t: Tensor) -> Tensor:
        if dtype is not None and t.is_floating_point():
            return t.to(device, dtype)
        return t.to(device)

    return _map(cond, move)
