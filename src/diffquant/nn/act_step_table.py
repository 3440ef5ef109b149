"""``mode="step_table"``: one activation ``(scale, zero_point)`` per calibrated timestep.

The table of TALSQ (EfficientDM, He et al., ICLR 2024): one step size and zero point per sampling
step and layer, initialised from calibration. EfficientDM indexes its table with a call counter,
which breaks under classifier-free guidance and multi-evaluation solvers; here each sample looks up
the entry of the calibrated timestep nearest to its own timestep (from the noise-level context), so a
table calibrated on DDIM-50 timesteps also serves DDIM-20 or DPM-Solver timesteps, and
:meth:`StepTableActivationQuantizer.resample` re-tabulates it for another sampler.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from diffquant.config import ActivationQuantConfig
from diffquant.nn.act_timestep import ConditionRanges, TimestepActivationQuantizer
from diffquant.quant import affine


def nearest_index(table: Tensor, query: Tensor) -> Tensor:
    """Index of the entry of the sorted 1-D ``table`` nearest to each value of ``query`` (ties: lower).

    Returns:
        ``int64`` with ``query``'s shape.
    """
    right = torch.searchsorted(table, query).clamp(max=table.numel() - 1)
    left = (right - 1).clamp(min=0)
    pick_left = (query - table[left]).abs() <= (table[right] - query).abs()
    return torch.where(pick_left, left, right)


class StepTableActivationQuantizer(TimestepActivationQuantizer):
    """Per-timestep activation ranges, looked up by each sample's nearest calibrated timestep.

    Calibration observes every sample's input under its own timestep (a CFG or mixed-timestep batch
    contributes to several entries) and sets each entry from that timestep's range, chosen by the
    config's range method (min-max / percentile / MSE).

    Buffers (``K`` calibrated timesteps):
        timesteps: ``float32 (K,)`` sorted ascending; scale: ``float32 (K,)``; zero_point:
        ``float32 (K,)``; calibrated: ``bool ()``. After :meth:`make_learnable`, ``scale`` and
        ``zero_point`` are ``nn.Parameter`` s under the same names (same state dict).

    Example:
        >>> from diffquant.noise import noise_level
        >>> q = StepTableActivationQuantizer(ActivationQuantConfig(bits=8, mode="step_table"), channel_dim=-1)
        >>> q.start_calibration("layer")
        >>> with noise_level([999, 0]):
        ...     _ = q(torch.randn(2, 16) * torch.tensor([[4.0], [1.0]]))
        >>> q.finish_calibration()
        >>> q.timesteps.tolist()
        [0.0, 999.0]
    """

    mode = "step_table"

    def __init__(self, config: ActivationQuantConfig, channel_dim: int, num_timesteps: int = 0):
        super().__init__(config, channel_dim)
        self.register_buffer("timesteps", torch.zeros(num_timesteps))
        self.register_buffer("scale", torch.ones(num_timesteps))
        self.register_buffer("zero_point", torch.zeros(num_timesteps))

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "num_timesteps": self.timesteps.numel()}

    @classmethod
    def _allocate(
        cls, config: ActivationQuantConfig, channel_dim: int, meta: dict[str, Any]
    ) -> StepTableActivationQuantizer:
        return cls(config, channel_dim, num_timesteps=int(meta["num_timesteps"]))

    def _set_table(self, timesteps: Tensor, scale: Tensor, zero_point: Tensor) -> None:
        """Replace the table (its size may change); keeps the parameters trainable when learnable."""
        self.timesteps = timesteps.float()
        for name, value in (("scale", scale.float()), ("zero_point", zero_point.float())):
            if self.learnable:
                setattr(self, name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)
        self._cache = None

    def calibrate_from(self, ranges: ConditionRanges) -> None:
        scale, zero_point = affine.qparams_from_range(
            ranges.lo, ranges.hi, self.config.bits, self.config.symmetric
        )
        device = self.timesteps.device
        self._set_table(ranges.conditions.to(device), scale.to(device), zero_point.to(device))

    def qparams_for(self, conditions: Tensor) -> tuple[Tensor, Tensor]:
        """Scale and zero point of the nearest calibrated timestep, each ``(B,)``."""
        table = self.timesteps.float()
        idx = nearest_index(table, conditions.to(table.device, torch.float32))
        return self.scale[idx], self.zero_point[idx]

    @torch.no_grad()
    def resample(self, timesteps: Any) -> None:
        """Re-tabulate at ``timesteps`` (e.g. another sampler's ``scheduler.timesteps``), each entry
        copied from the nearest calibrated timestep. Duplicates are dropped; the result is sorted.

        Raises:
            RuntimeError: if the table was never calibrated.
        """
        if not bool(self.calibrated):
            raise RuntimeError(f"{self.name}: calibrate the step table before resampling it.")
        t = torch.unique(
            torch.as_tensor(timesteps, dtype=torch.float32, device=self.timesteps.device).reshape(-1)
        )
        scale, zero_point = self.qparams_for(t)
        self._set_table(t, scale.detach().clone(), zero_point.detach().clone())

    def make_learnable(self) -> StepTableActivationQuantizer:
        """Turn ``scale`` and ``zero_point`` into ``nn.Parameter`` s, for TALSQ training with LSQ."""
        if not self.learnable:
            self.learnable = True
            self._set_table(self.timesteps, self.scale.detach().clone(), self.zero_point.detach().clone())
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, timesteps={self.timesteps.numel()}"
