"""The noise-level context: the per-sample timestep and log-SNR of the current denoiser call.

Timestep-dependent parts (per-step activation tables, TDQ / log-SNR MLPs, TuneQDM scale experts) read
`current_noise_level()` instead of counting calls, so they stay right under CFG (one call on a doubled
batch), multi-evaluation solvers, mixed-timestep training batches and nested teacher/student calls.

A forward pre-hook on the denoiser sets the value from the denoiser's own timestep argument and a
forward hook restores the previous one, also when ``forward`` raises::

    attach_noise_context(unet, pipe.scheduler)   # once
    unet(latents, t, encoder_hidden_states=emb)  # inner layers see NoiseLevel(timestep=(B,), log_snr=(B,))

Log-SNR, ``λ(t) = log(ᾱ_t / (1 − ᾱ_t))``, is the noise level in a form that does not depend on the
sampler or its step count (Kingma et al., "Variational Diffusion Models", NeurIPS 2021); seed 003
conditions activation scales on it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from diffquant.models import get_arch_spec

__all__ = [
    "NoiseContextHandle",
    "NoiseLevel",
    "NoiseSchedule",
    "attach_noise_context",
    "current_noise_level",
    "detach_noise_context",
    "noise_context_of",
    "noise_level",
    "require_noise_level",
    "restore_noise_context",
]

TimestepRule = Callable[[tuple, dict], Any]
"""``rule(args, kwargs) -> timestep`` given the positional and keyword arguments of a forward call."""

_HANDLE_ATTR = "_diffquant_noise_context"
_FALLBACK_ARG_NAMES = ("timestep", "timesteps")
_ZERO_TERMINAL_ALPHA_BAR = 2.0**-24  # diffusers' replacement for ᾱ_T = 0 (zero terminal SNR)


@dataclass(frozen=True, eq=False)  # tensors: compare by identity
class NoiseLevel:
    """Noise level of each sample in the current denoiser call.

    Attributes:
        timestep: ``(B,)`` float32, the timestep of each sample (training-timestep units, 0..T-1).
        log_snr: ``(B,)`` float32, ``log(ᾱ_t / (1 − ᾱ_t))``, or None when no schedule is known.

    Both are read-only views for the duration of the call; do not modify them in place.
    """

    timestep: Tensor
    log_snr: Tensor | None

    def __post_init__(self) -> None:
        if self.timestep.ndim != 1 or self.timestep.dtype != torch.float32:
            raise ValueError(
                "NoiseLevel.timestep must be a 1-D float32 tensor (one value per sample), got shape "
                f"{tuple(self.timestep.shape)} dtype {self.timestep.dtype}; build it with noise_level(...)."
            )
        if self.log_snr is not None and (
            self.log_snr.shape != self.timestep.shape or self.log_snr.dtype != torch.float32
        ):
            raise ValueError(
                f"NoiseLevel.log_snr must be float32 with the timestep's shape {tuple(self.timestep.shape)}, "
                f"got shape {tuple(self.log_snr.shape)} dtype {self.log_snr.dtype}."
            )

    @property
    def batch_size(self) -> int:
        return self.timestep.shape[0]


_CURRENT: ContextVar[NoiseLevel | None] = ContextVar("diffquant_noise_level", default=None)
# Values to restore when the enclosing denoiser calls return, innermost last: (id(module), previous).
_SAVED: ContextVar[tuple[tuple[int, NoiseLevel | None], ...]] = ContextVar(
    "diffquant_noise_saved", default=()
)


def current_noise_level() -> NoiseLevel | None:
    """The `NoiseLevel` of the denoiser call in progress, or None outside any call / `noise_level` block."""
    return _CURRENT.get()


def require_noise_level(*, need_log_snr: bool = False) -> NoiseLevel:
    """Like `current_noise_level`, but raise when no noise level is set.

    Args:
        need_log_snr: Also require ``log_snr`` (for log-SNR-conditioned parts).

    Raises:
        RuntimeError: outside a denoiser call with an attached context, or without log-SNR when required.
    """
    level = _CURRENT.get()
    if level is None:
        raise RuntimeError(
            "No noise level is set: this layer depends on the timestep. Call "
            "diffquant.noise.attach_noise_context(model, scheduler) on the denoiser before calling it, "
            "or wrap the call in `with diffquant.noise.noise_level(t, batch_size=B):`."
        )
    if need_log_snr and level.log_snr is None:
        raise RuntimeError(
            "The noise level has no log-SNR: this layer is conditioned on log-SNR. Pass the scheduler: "
            "attach_noise_context(model, scheduler), or noise_level(t, schedule=scheduler)."
        )
    return level


class NoiseSchedule:
    """Log-SNR lookup for a discrete diffusion schedule, ``λ(t) = log(ᾱ_t / (1 − ᾱ_t))``.

    Args:
        alphas_cumprod: ``(T,)`` cumulative products ᾱ_t of ``1 − β_t``, each in (0, 1).

    Attributes:
        num_train_timesteps: T; valid timesteps are [0, T − 1].
        alphas_cumprod: ``(T,)`` float64 on CPU.

    Raises:
        ValueError: if ``alphas_cumprod`` is not 1-D and non-empty, or has a value outside (0, 1).

    Example:
        >>> from diffusers import DDPMScheduler
        >>> sched = NoiseSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000))
        >>> sched.log_snr(torch.tensor([0, 999])).shape
        torch.Size([2])
    """

    def __init__(self, alphas_cumprod: Tensor) -> None:
        a = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
        if a.ndim != 1 or a.numel() == 0:
            raise ValueError(
                f"alphas_cumprod must be a non-empty 1-D tensor (one ᾱ per training timestep), got shape "
                f"{tuple(a.shape)}."
            )
        bad = ~((a > 0) & (a < 1))  # also catches NaN
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"alphas_cumprod must lie in (0, 1), but ᾱ[{i}] = {a[i].item()}; log-SNR is infinite there. "
                "For a zero-terminal-SNR schedule use NoiseSchedule.from_scheduler (it replaces ᾱ_T = 0 by "
                "2**-24 like diffusers) or clamp the values yourself."
            )
        self.alphas_cumprod = a
        self.num_train_timesteps = a.numel()
        self._log_snr = torch.log(a) - torch.log1p(-a)  # (T,) float64
        self._tables: dict[torch.device, Tensor] = {}

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> NoiseSchedule:
        """Build from any diffusers scheduler with ``alphas_cumprod`` (DDPM, DDIM, DPM-Solver, Euler, ...).

        A zero terminal ᾱ (``rescale_betas_zero_snr=True``) is replaced by 2**-24, as diffusers' Euler
        and DPM-Solver schedulers do, so log-SNR stays finite.

        Raises:
            TypeError: if the scheduler has no ``alphas_cumprod`` (flow-matching, EDM and VE schedulers
                parametrise noise by sigma).
        """
        alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None:
            raise TypeError(
                f"{type(scheduler).__name__} has no `alphas_cumprod`, so its log-SNR cannot be looked up by "
                "timestep (flow-matching, EDM and VE schedulers are parametrised by sigma). Build "
                "NoiseSchedule(alphas_cumprod) yourself (for a variance-exploding sigma, ᾱ = 1 / (1 + σ²)), "
                "or attach the context without a schedule (log_snr will be None)."
            )
        a = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).clone()
        if a.numel() and a[-1] == 0:
            a[-1] = _ZERO_TERMINAL_ALPHA_BAR
        return cls(a)

    def _tables_on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(log-SNR table in float64, the same rounded to float32) on ``device``, cached."""
        tables = self._tables.get(device)
        if tables is None:
            dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
            tables = self._tables[device] = (
                self._log_snr.to(device, dtype),
                self._log_snr.float().to(device),
            )
        return tables

    def log_snr(self, timestep: Tensor) -> Tensor:
        """Log-SNR of each element of ``timestep``, float32, on the timestep's device.

        Integer-valued timesteps give the table value; fractional ones interpolate log-SNR linearly
        (in float64) between the two neighbouring integer timesteps.

        Raises:
            ValueError: for a timestep outside [0, T − 1] or NaN.
            TypeError: for a bool or complex tensor.
        """
        t = torch.as_tensor(timestep).detach()
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"timesteps must be integer or real-valued, got dtype {t.dtype}.")
        table64, table32 = self._tables_on(t.device)
        if t.numel() == 0:
            return torch.empty(t.shape, dtype=torch.float32, device=t.device)
        last = self.num_train_timesteps - 1
        lo, hi = (v.item() for v in torch.aminmax(t))  # one reduction, one sync per call
        if not (lo >= 0 and hi <= last):  # also False for NaN
            raise ValueError(
                f"timesteps must lie in [0, {last}] (the scheduler's training timesteps), got values in "
                f"[{lo}, {hi}]. Pass scheduler.timesteps entries, not step indices, sigmas or timesteps "
                "normalised to [0, 1]."
            )
        if not t.is_floating_point():
            return table32[t]
        tf = t.to(table64.dtype)
        lower = tf.floor()
        i = lower.long()
        return torch.lerp(table64[i], table64[(i + 1).clamp(max=last)], tf - lower).float()

    def __repr__(self) -> str:
        return f"NoiseSchedule(num_train_timesteps={self.num_train_timesteps})"


def _as_schedule(schedule: Any) -> NoiseSchedule | None:
    if schedule is None or isinstance(schedule, NoiseSchedule):
        return schedule
    if hasattr(schedule, "alphas_cumprod"):
        return NoiseSchedule.from_scheduler(schedule)
    raise TypeError(
        f"Expected a NoiseSchedule, a diffusers scheduler (with .alphas_cumprod) or None, got "
        f"{type(schedule).__name__}. For raw ᾱ values pass NoiseSchedule(alphas_cumprod)."
    )


def _broadcast(value: Any, batch_size: int | None, device: torch.device | None, what: str) -> Tensor:
    """``value`` (scalar, 0-d, 1-element or ``(B,)``) as a detached ``(batch_size,)`` tensor, dtype kept."""
    t = value.detach() if isinstance(value, Tensor) else torch.as_tensor(value, device=device)
    if t.ndim > 1:
        raise ValueError(
            f"The {what} must be a scalar or a 1-D tensor with one value per sample, got shape "
            f"{tuple(t.shape)}."
        )
    t = t.reshape(-1)
    if t.numel() == 1 and batch_size is not None:
        return t.expand(batch_size).contiguous()
    if t.numel() == 0 or (batch_size is not None and t.numel() != batch_size):
        raise ValueError(
            f"The {what} has {t.numel()} values but the batch has {batch_size} samples; pass one value "
            "per sample or a single value for the whole batch."
        )
    return t


def _per_sample(value: Any, batch_size: int | None, device: torch.device | None, what: str) -> Tensor:
    """`_broadcast`, as float32."""
    return _broadcast(value, batch_size, device, what).to(torch.float32)


@contextmanager
def noise_level(
    timestep: Any,
    log_snr: Any = None,
    *,
    batch_size: int | None = None,
    schedule: Any = None,
) -> Iterator[NoiseLevel]:
    """Set the noise level by hand for a block of code (training loops, calibration, tests).

    Restores the previous value on exit. Without ``batch_size`` a single timestep gives a ``(1,)``
    noise level, which broadcasts against any batch.

    Args:
        timestep: Scalar, 0-d, 1-element or ``(B,)`` tensor of training timesteps.
        log_snr: Matching log-SNR values, or None.
        batch_size: Broadcast single values to this many samples (and check vector lengths).
        schedule: A `NoiseSchedule` or diffusers scheduler to compute ``log_snr`` from (instead of
            passing ``log_snr``).

    Raises:
        ValueError: on mismatched lengths, or when both ``log_snr`` and ``schedule`` are given.

    Example:
        >>> with noise_level([999, 10], schedule=NoiseSchedule(torch.linspace(0.99, 0.01, 1000))) as lvl:
        ...     lvl.log_snr.shape
        torch.Size([2])
    """
    if log_snr is not None and schedule is not None:
        raise ValueError("Pass either log_snr or schedule to noise_level(), not both.")
    raw = _broadcast(timestep, batch_size, None, "timestep")
    t = raw.to(torch.float32)
    if schedule is not None:
        snr = _as_schedule(schedule).log_snr(raw)
    elif log_snr is not None:
        snr = _per_sample(log_snr, None, t.device, "log_snr")
        n = batch_size if batch_size is not None else max(t.numel(), snr.numel())
        t, snr = _per_sample(t, n, None, "timestep"), _per_sample(snr, n, None, "log_snr")
    else:
        snr = None
    token = _CURRENT.set(NoiseLevel(t, snr))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


def _first_batched_tensor(values: Iterator[Any], exclude: Any) -> Tensor | None:
    for v in values:
        if isinstance(v, Tensor) and v.ndim > 0 and v is not exclude:
            return v
    return None


class _NoiseContextHook:
    """The pre-hook / forward-hook pair, with the forward signature cached once at attach time."""

    def __init__(
        self, signature: inspect.Signature, timestep_arg: str | TimestepRule, schedule: NoiseSchedule | None
    ) -> None:
        self.signature = signature
        self.timestep_arg = timestep_arg
        self.schedule = schedule
        self.var_keyword = next(
            (p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None
        )

    def __deepcopy__(self, memo: dict) -> _NoiseContextHook:
        return self  # immutable configuration; a deep-copied model shares it

    def _find(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[Any, Tensor | None]:
        """(timestep value, first batched tensor argument) of this call."""
        if callable(self.timestep_arg):
            value = self.timestep_arg(args, kwargs)
            sample = _first_batched_tensor(iter((*args, *kwargs.values())), value)
            where = "the timestep rule returned None"
        else:
            name = self.timestep_arg
            bound: Mapping[str, Any] = self.signature.bind_partial(*args, **kwargs).arguments
            value = bound.get(name)
            if value is None and self.var_keyword is not None:
                value = bound.get(self.var_keyword, {}).get(name)
            sample = _first_batched_tensor(iter(bound.values()), value)
            where = f"its timestep argument {name!r} was not passed (or is None)"
        if value is None:
            raise ValueError(
                f"{type(module).__name__} was called but {where}. Pass the timestep in the call, or "
                "re-attach with attach_noise_context(model, schedule, timestep_arg='<argument name>') or "
                "timestep_arg=lambda args, kwargs: <timestep tensor>."
            )
        return value, sample

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Save first: if anything below raises, `post` (always_call) still restores this value.
        _SAVED.set((*_SAVED.get(), (id(module), _CURRENT.get())))
        value, sample = self._find(module, args, kwargs)
        batch = sample.shape[0] if sample is not None else None
        device = sample.device if sample is not None else None
        raw = _broadcast(value, batch, device, f"timestep of {type(module).__name__}")
        snr = self.schedule.log_snr(raw) if self.schedule is not None else None
        _CURRENT.set(NoiseLevel(raw.to(torch.float32), snr))

    def post(self, module: nn.Module, args: tuple, output: Any) -> None:
        saved = _SAVED.get()
        if saved and saved[-1][0] == id(module):
            _SAVED.set(saved[:-1])
            _CURRENT.set(saved[-1][1])


class NoiseContextHandle:
    """Returned by `attach_noise_context`; ``remove()`` (or leaving a ``with`` block) detaches it.

    Attributes:
        timestep_arg: The argument name or rule used to find the timestep.
        schedule: The `NoiseSchedule`, or None.
    """

    def __init__(self, hook: _NoiseContextHook, pre: Any, post: Any) -> None:
        self.timestep_arg = hook.timestep_arg
        self.schedule = hook.schedule
        self._handles = (pre, post)

    def remove(self) -> None:
        """Remove both hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> NoiseContextHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _resolve_timestep_arg(
    model: nn.Module, signature: inspect.Signature, timestep_arg: str | TimestepRule | None
) -> str | TimestepRule:
    params = signature.parameters
    if timestep_arg is None:
        timestep_arg = get_arch_spec(model).timestep_arg
    if timestep_arg is None:
        timestep_arg = next((n for n in _FALLBACK_ARG_NAMES if n in params), None)
    if timestep_arg is None:
        raise ValueError(
            f"Cannot tell which argument of {type(model).__name__}.forward{signature} holds the timestep. "
            "Pass timestep_arg='<argument name>', or timestep_arg=lambda args, kwargs: <timestep tensor>, "
            "or register an ArchSpec for this class with diffquant.models.register_arch."
        )
    if isinstance(timestep_arg, str):
        has_var_keyword = any(p.kind is p.VAR_KEYWORD for p in params.values())
        if timestep_arg not in params and not has_var_keyword:
            raise ValueError(
                f"{type(model).__name__}.forward has no argument {timestep_arg!r}; its arguments are "
                f"{list(params)}. Pass the right timestep_arg, or a callable rule(args, kwargs)."
            )
    elif not callable(timestep_arg):
        raise TypeError(
            f"timestep_arg must be an argument name, a callable rule(args, kwargs) or None, got "
            f"{type(timestep_arg).__name__}."
        )
    return timestep_arg


def attach_noise_context(
    model: nn.Module,
    schedule: NoiseSchedule | Any | None = None,
    *,
    timestep_arg: str | TimestepRule | None = None,
) -> NoiseContextHandle:
    """Publish a `NoiseLevel` during every forward call of ``model`` (the denoiser).

    A forward pre-hook (run before other pre-hooks) reads the timestep argument, broadcasts a scalar,
    0-d or 1-element timestep to the batch size (dim 0 of the first tensor argument, the sample), keeps a
    ``(B,)`` vector per sample, looks up log-SNR, and sets the value; a forward hook with
    ``always_call=True`` restores the previous value, also when ``forward`` raises, so nested denoiser
    calls (a teacher inside a student's loop) see their own value. Attaching again replaces the hooks.

    Args:
        model: The denoiser.
        schedule: A `NoiseSchedule`, a diffusers scheduler with ``alphas_cumprod``, or None (then
            ``log_snr`` is None).
        timestep_arg: Name of the ``forward`` argument holding the timestep, or a callable
            ``rule(args, kwargs) -> timestep``. Default: the `ArchSpec`'s ``timestep_arg``, else a
            ``forward`` argument named ``timestep`` or ``timesteps``.

    Returns:
        A `NoiseContextHandle`; ``handle.remove()`` removes both hooks.

    Raises:
        ValueError: if the timestep argument cannot be determined or does not exist. At call time:
            if the timestep is missing or its length differs from the batch size, or is out of the
            schedule's range.
        TypeError: for an unsupported ``schedule`` or ``timestep_arg``.

    Example:
        >>> from diffquant.models.tiny import example_inputs, scheduler_for_tests, tiny_unet2d
        >>> unet = tiny_unet2d()
        >>> handle = attach_noise_context(unet, scheduler_for_tests())
        >>> _ = unet(**example_inputs(unet, 4, timesteps=[999, 10, 500, 10]))
        >>> handle.remove()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach_noise_context expects a torch.nn.Module, got {type(model).__name__}.")
    sched = _as_schedule(schedule)
    signature = inspect.signature(model.forward)
    hook = _NoiseContextHook(signature, _resolve_timestep_arg(model, signature, timestep_arg), sched)
    detach_noise_context(model)
    pre = model.register_forward_pre_hook(hook.pre, with_kwargs=True, prepend=True)
    post = model.register_forward_hook(hook.post, always_call=True)
    handle = NoiseContextHandle(hook, pre, post)
    model.__dict__[_HANDLE_ATTR] = handle
    return handle


def detach_noise_context(model: nn.Module) -> None:
    """Remove the hooks `attach_noise_context` put on ``model`` (no-op when none are attached)."""
    handle = model.__dict__.pop(_HANDLE_ATTR, None)
    if handle is not None:
        handle.remove()


def noise_context_of(model: nn.Module) -> NoiseContextHandle | None:
    """The handle of the noise context attached to ``model``, or None."""
    return model.__dict__.get(_HANDLE_ATTR)


def restore_noise_context(model: nn.Module, previous: NoiseContextHandle | None) -> None:
    """Put back the noise context ``model`` had (``previous`` from `noise_context_of`; None: none).

    Used to undo `attach_noise_context` when the work it was attached for fails.
    """
    if noise_context_of(model) is previous:
        return
    detach_noise_context(model)
    if previous is not None:
        attach_noise_context(model, previous.schedule, timestep_arg=previous.timestep_arg)
