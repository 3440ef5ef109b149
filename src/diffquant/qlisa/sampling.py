"""Layerwise importance sampling: which layers train in the next period (LISA; Pan et al., NeurIPS 2024).

LISA observes that in LoRA training the first (embedding) and last (head) layers change far more than
the rest, and mimics that with full-parameter updates on few layers: every ``interval`` steps, freeze
all layers, keep the first and the last trainable, and unfreeze ``gamma`` of the others drawn uniformly
at random (LMFlow defaults: ``gamma = 2``, ``interval = 20``).
"""

from __future__ import annotations

import torch

DEFAULT_GAMMA = 2
DEFAULT_INTERVAL = 20


class LayerSampler:
    """Draws the active layer indices ``{0, num_layers - 1} ∪ (gamma uniform middle indices)``.

    Args:
        num_layers: number of layers, in module order (index 0 is the first, ``num_layers - 1`` the last).
        gamma: middle layers activated per period; ``0`` trains only the first and last layers.
        seed: seeds the sampler's own :class:`torch.Generator` (the global RNG is untouched).

    Raises:
        ValueError: ``num_layers < 1``, or ``gamma`` negative or larger than the number of middle layers.

    Example:
        >>> sampler = LayerSampler(num_layers=10, gamma=2, seed=0)
        >>> active = sampler.sample()
        >>> active[0], active[-1], len(active)
        (0, 9, 4)
    """

    def __init__(self, num_layers: int, gamma: int = DEFAULT_GAMMA, seed: int = 0):
        if num_layers < 1:
            raise ValueError(f"layerwise sampling needs at least one layer, got num_layers={num_layers}.")
        num_middle = max(num_layers - 2, 0)
        if not isinstance(gamma, int) or isinstance(gamma, bool) or not 0 <= gamma <= num_middle:
            raise ValueError(
                f"gamma={gamma!r} must be an integer in 0..{num_middle}: the model has {num_layers} "
                f"sampling layers, of which {num_middle} lie between the always-trained first and last; "
                f"lower gamma (or include more layers)."
            )
        self.num_layers, self.gamma = num_layers, gamma
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def always_active(self) -> tuple[int, ...]:
        """The first and last indices (one index for a single-layer model)."""
        return tuple(sorted({0, self.num_layers - 1}))

    def sample(self) -> tuple[int, ...]:
        """The next period's active indices, ascending: first, last, and ``gamma`` distinct middle ones."""
        num_middle = max(self.num_layers - 2, 0)
        middle = torch.randperm(num_middle, generator=self.generator)[: self.gamma] + 1  # (gamma,) in 1..n-2
        return tuple(sorted({*self.always_active, *middle.tolist()}))
