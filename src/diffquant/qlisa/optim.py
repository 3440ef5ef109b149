"""Optimizer in backward: one optimizer and one LR scheduler per parameter, stepped as its gradient lands.

Each attached parameter gets its own optimizer (default AdamW) and LR scheduler (default constant), and
a ``Tensor.register_post_accumulate_grad_hook`` that, as soon as backward has accumulated the
parameter's gradient, optionally clips it (per parameter: there is no global norm when each parameter
steps on its own), steps the optimizer and the scheduler, and sets the gradient to ``None``. Gradients
of the whole model never coexist in memory (PyTorch tutorial "How to save memory by fusing the
optimizer step into the backward pass"; LOMO, Lv et al. 2023).

Parameters are attached when their layer is sampled and detached when it is frozen: detaching removes
the hook and deletes the optimizer and scheduler with their state, so memory follows the active set.
One backward = one step: gradient accumulation over several backwards is not possible in this scheme.
An ``after_backward`` callback runs once at the end of every backward in which an attached parameter
stepped (queued on the autograd engine by the first hook that fires), so the optimizer steps can be
counted without the training loop's help.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torch.utils.hooks import RemovableHandle

OptimizerFactory = Callable[[list[nn.Parameter]], Optimizer]
"""Builds the optimizer of one parameter, e.g. ``lambda params: torch.optim.SGD(params, lr=0.1)``."""

SchedulerFactory = Callable[[Optimizer], LRScheduler]
"""Builds the LR scheduler of one parameter's optimizer, e.g. ``lambda opt: CosineAnnealingLR(opt, 1000)``."""


def adamw_factory(lr: float, weight_decay: float = 0.0) -> OptimizerFactory:
    """The default optimizer: ``torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)``."""
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def constant_schedule(optimizer: Optimizer) -> LRScheduler:
    """The default scheduler: a constant learning rate."""
    return LambdaLR(optimizer, lambda _: 1.0)


@dataclasses.dataclass
class _Slot:
    optimizer: Optimizer
    scheduler: LRScheduler
    handle: RemovableHandle


class OptimizerInBackward:
    """Per-parameter optimizers stepped inside backward; attach and detach parameters at any time.

    Args:
        optimizer: factory of one parameter's optimizer.
        lr_scheduler: factory of that optimizer's scheduler (default constant).
        max_grad_norm: clip each parameter's gradient to this L2 norm before its step (``None``: no clipping).
        after_backward: called once at the end of each backward that stepped a parameter (``None``: nothing).

    A scheduler created at global step ``s`` (see :meth:`attach`) is first advanced ``s`` times, so a
    schedule over the whole run (warm-up, cosine decay) holds for layers sampled late too; that costs
    ``s`` scheduler steps per attach (microseconds each).

    Example:
        >>> w = nn.Parameter(torch.ones(3))
        >>> opt = OptimizerInBackward(lambda ps: torch.optim.SGD(ps, lr=0.5))
        >>> opt.attach(w)
        >>> (w * 2.0).sum().backward()  # the hook steps w and frees its gradient
        >>> w.detach().tolist(), w.grad
        ([0.0, 0.0, 0.0], None)
    """

    def __init__(
        self,
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        max_grad_norm: float | None = None,
        after_backward: Callable[[], None] | None = None,
    ):
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None (no clipping), got {max_grad_norm}.")
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler or constant_schedule
        self.max_grad_norm = max_grad_norm
        self.after_backward = after_backward
        self._slots: dict[nn.Parameter, _Slot] = {}
        self._queued = False

    def attach(self, param: nn.Parameter, global_step: int = 0) -> None:
        """Give ``param`` its optimizer, scheduler (advanced to ``global_step``) and hook; no-op if attached.

        Raises:
            ValueError: if ``param`` does not require gradients (its hook would never fire).
        """
        if param in self._slots:
            return
        if not param.requires_grad:
            raise ValueError("cannot attach an optimizer to a parameter that does not require gradients.")
        optimizer = self.optimizer_factory([param])
        scheduler = self.scheduler_factory(optimizer)
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(global_step):
                scheduler.step()
        handle = param.register_post_accumulate_grad_hook(self._step_hook)
        self._slots[param] = _Slot(optimizer, scheduler, handle)

    def detach(self, param: nn.Parameter) -> None:
        """Remove ``param``'s hook and delete its optimizer, scheduler and their state; no-op if not attached."""
        slot = self._slots.pop(param, None)
        if slot is not None:
            slot.handle.remove()
            param.grad = None

    def _step_hook(self, param: torch.Tensor) -> None:
        slot = self._slots[param]
        if self.max_grad_norm is not None:
            nn.utils.clip_grad_norm_([param], self.max_grad_norm)
        slot.optimizer.step()
        slot.scheduler.step()
        param.grad = None
        if self.after_backward is not None and not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)

    def _backward_done(self) -> None:
        self._queued = False
        self.after_backward()

    def reset_backward(self) -> None:
        """Forget a callback queued by a backward that failed before it ended (call before a forward)."""
        self._queued = False

    def __contains__(self, param: object) -> bool:
        return param in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def __iter__(self) -> Iterator[nn.Parameter]:
        return iter(self._slots)

    def optimizer_of(self, param: nn.Parameter) -> Optimizer:
        """The optimizer stepping ``param`` (KeyError if not attached)."""
        return self._slots[param].optimizer

    def scheduler_of(self, param: nn.Parameter) -> LRScheduler:
        """The LR scheduler of ``param``'s optimizer (KeyError if not attached)."""
        return self._slots[param].scheduler
