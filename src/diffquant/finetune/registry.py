"""One fine-tuning surface: a registry of methods, each a config dataclass plus a ``prepare`` handler.

Like PEFT's tuners and torchao's config → handler registry: every method registers a versioned, validated
config class (JSON round trip) and ``prepare(model, config, context) -> FinetuneSetup``; callers never
branch on the method. A setup holds what one training loop needs (optimizer or ``None`` when the method
steps inside backward, an optional LR schedule, an after-step callback) and ``finalize`` giving the
deployable model. Training itself is any loop over the setup: :func:`diffquant.finetune.fit_denoiser`
(images + conditioning) or :func:`diffquant.finetune.distill.distill` (data-free, from a float teacher).

Example:
    >>> from diffquant.finetune import fit_denoiser, prepare_finetune
    >>> from diffquant.finetune.methods import TuneQDMFinetuneConfig
    >>> setup = prepare_finetune(unet, TuneQDMFinetuneConfig(lr=1e-2), scheduler=sched)  # doctest: +SKIP
    >>> fit_denoiser(setup.model, setup.optimizer, latents, cond, sched, steps=100,
    ...              lr_scheduler=setup.lr_scheduler, after_step=setup.after_step)  # doctest: +SKIP
    >>> deployable = setup.inference_model()  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from diffquant.config import _JsonConfig

FINETUNE_CONFIG_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(_JsonConfig):
    """Base of every fine-tuning method's config (keyword-only fields, JSON round trip).

    Subclasses set the class attribute ``method`` (their registry name) and validate their fields in
    ``__post_init__`` (calling ``super().__post_init__()``).

    Raises:
        ValueError: a config written by another schema version.
    """

    method: ClassVar[str] = ""
    version: int = FINETUNE_CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.version != FINETUNE_CONFIG_VERSION:
            raise ValueError(
                f"{type(self).__name__} version {self.version!r} is not supported (this diffquant reads "
                f"version {FINETUNE_CONFIG_VERSION}); re-create the config or upgrade diffquant."
            )

    def _require_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive number, got {value!r}.")


@dataclass(frozen=True)
class FinetuneContext:
    """What some methods need besides the model and config.

    Attributes:
        scheduler: the training noise scheduler (TuneQDM's timestep experts, EfficientDM's PTQ start).
        calibrate: ``fn(model)`` running the float model on representative inputs (PTQ calibration of
            methods that start from a calibrated quantized model, e.g. EfficientDM's activation tables).
    """

    scheduler: Any = None
    calibrate: Callable[[nn.Module], Any] | None = None


@dataclass
class FinetuneSetup:
    """A model ready to train.

    Attributes:
        model: the model to train (the one passed in, modified in place).
        optimizer: steps the trainable parameters; ``None`` when the method steps them itself
            (QLISA's optimizer in backward).
        lr_scheduler: the method's learning-rate schedule, stepped after each optimizer step, or ``None``.
        after_step: call after every training step, when given.
        finalize: returns the deployable model (e.g. merged and re-quantized); ``None``: the model itself.
        state_bytes: bytes of optimizer state held by a method that steps its own parameters.
        method_state: the method's own training state (``state_dict()`` / ``load_state_dict()``) kept
            outside the model and ``optimizer``, e.g. QLISA's sampled layers and per-parameter optimizers;
            pass it to :func:`~diffquant.finetune.fit_denoiser` / ``distill`` (``method_state=``) so that
            training checkpoints hold it. ``None``: there is none.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    lr_scheduler: Any = None
    after_step: Callable[[], None] | None = None
    finalize: Callable[[], nn.Module] | None = None
    state_bytes: Callable[[], int] | None = None
    method_state: Any = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that require gradients now."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state (e.g. AdamW moments) held now."""
        if self.optimizer is None:
            return self.state_bytes() if self.state_bytes is not None else 0
        return optimizer_state_bytes(self.optimizer)

    def inference_model(self) -> nn.Module:
        """The trained model in its inference form (``finalize``'s result, or the model), in eval mode."""
        model = self.finalize() if self.finalize is not None else self.model
        return model.eval()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer``'s state."""
    states = optimizer.state.values()
    return sum(t.nbytes for state in states for t in state.values() if isinstance(t, torch.Tensor))


Prepare = Callable[[nn.Module, Any, FinetuneContext], FinetuneSetup]


@dataclass(frozen=True)
class _Method:
    config_class: type[FinetuneConfig]
    prepare: Prepare


_METHODS: dict[str, _Method] = {}
_BUILTINS = "diffquant.finetune.methods"


def register_finetune_method(name: str, config_class: type[FinetuneConfig]) -> Callable[[Prepare], Prepare]:
    """Decorator registering ``prepare(model, config, context) -> FinetuneSetup`` as method ``name``.

    Args:
        name: the method's name (``config_class.method`` must equal it).
        config_class: its :class:`FinetuneConfig` subclass; configs of this type dispatch to ``prepare``.

    Raises:
        ValueError: ``name`` or ``config_class`` already registered, or a ``config_class.method`` mismatch.

    Example:
        >>> @dataclass(frozen=True, kw_only=True)
        ... class SGDConfig(FinetuneConfig):
        ...     method: ClassVar[str] = "sgd-full"
        ...     lr: float = 1e-2
        >>> @register_finetune_method("sgd-full", SGDConfig)
        ... def _prepare(model, config, context):
        ...     return FinetuneSetup(model, torch.optim.SGD(model.parameters(), lr=config.lr))
    """
    if config_class.method != name:
        raise ValueError(
            f"{config_class.__name__}.method is {config_class.method!r}, registered as {name!r}."
        )

    def register(prepare: Prepare) -> Prepare:
        if name in _METHODS or any(m.config_class is config_class for m in _METHODS.values()):
            raise ValueError(f"fine-tuning method {name!r} ({config_class.__name__}) is already registered.")
        _METHODS[name] = _Method(config_class, prepare)
        return prepare

    return register


def _registry() -> dict[str, _Method]:
    importlib.import_module(_BUILTINS)  # the built-in methods register themselves on import
    return _METHODS


def finetune_methods() -> tuple[str, ...]:
    """Names of the registered methods, sorted."""
    return tuple(sorted(_registry()))


def finetune_config(method: str, **fields: Any) -> FinetuneConfig:
    """The config of ``method`` with ``fields`` set (the rest default), e.g.
    ``finetune_config("tuneqdm", lr=1e-4)``.

    Raises:
        ValueError: unknown method; TypeError: unknown field.
    """
    methods = _registry()
    if method not in methods:
        raise ValueError(f"unknown fine-tuning method {method!r}; choose one of {sorted(methods)}.")
    return methods[method].config_class(**fields)


def prepare_finetune(
    model: nn.Module,
    config: FinetuneConfig,
    *,
    scheduler: Any = None,
    calibrate: Callable[[nn.Module], Any] | None = None,
) -> FinetuneSetup:
    """Set ``model`` up (in place; pass a copy to keep the original) for the method ``config`` names.

    Args:
        model: the float denoiser.
        config: a registered method's config (see :func:`finetune_methods`, :func:`finetune_config`).
        scheduler, calibrate: see :class:`FinetuneContext`; methods that need them say so.

    Raises:
        TypeError: ``config`` is not a registered method's config.
        ValueError: the method leaves nothing to train, or lacks a scheduler / calibration it needs.
    """
    for method in _registry().values():
        if type(config) is method.config_class:
            return method.prepare(model, config, FinetuneContext(scheduler, calibrate))
    raise TypeError(
        f"{type(config).__name__} is not a fine-tuning method config; build one with "
        f"finetune_config(name, ...) for a name in {finetune_methods()}."
    )
