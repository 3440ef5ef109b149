"""Which layers a method quantizes, and with what — targets are data, not code.

Every method (``quantize_``, QAT, TuneQDM, QLISA) selects its layers here. A layer is a candidate
when it is a Linear/Conv2d and matches an ``include`` regex (or ``include`` is empty). Then, in order:

1. a layer matching an ``exclude`` regex stays in full precision;
2. the first :class:`~diffquant.config.LayerOverride` whose pattern matches decides the layer: kept
   in full precision (``keep_fp=True``) or quantized with the override's weights / activations;
3. a layer matching a ``keep_fp`` regex (the architecture's defaults when ``keep_fp`` is ``None``)
   stays in full precision;
4. every other candidate is quantized with the config's own weights / activations.

Patterns use ``re.fullmatch`` on names from ``named_modules()``.

Example:
    >>> from diffquant.models.tiny import tiny_unet2d
    >>> targets = select_targets(tiny_unet2d(), LayerSelection())  # the architecture's defaults
    >>> "conv_in" in targets.kept_fp
    True
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from diffquant.config import ActivationQuantConfig, LayerOverride, QuantConfig, WeightQuantConfig
from diffquant.models import get_arch_spec
from diffquant.nn.qmodules import quant_layer_class


@dataclass(frozen=True)
class LayerSelection:
    """Which layers a method takes, for methods whose settings are not a :class:`QuantConfig`
    (TuneQDM, QLISA); the fields mean what :class:`QuantConfig`'s fields of the same names mean.

    Args:
        include: regexes of the candidate layers (empty: every Linear/Conv2d).
        exclude: regexes of layers never taken.
        keep_fp: regexes of layers left in full precision; ``None`` uses the architecture's defaults.

    Raises:
        ValueError: on an invalid regex.
        TypeError: on a single string instead of a list of regexes.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    keep_fp: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("include", "exclude", "keep_fp"):
            patterns = getattr(self, name)
            if patterns is None:
                continue
            if isinstance(patterns, str):
                raise TypeError(
                    f"{name} must be a list/tuple of regexes, not the single string {patterns!r}."
                )
            object.__setattr__(self, name, tuple(patterns))
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"{name} pattern {pattern!r} is not a valid regex: {err}") from err


@dataclass(frozen=True)
class LayerQuant:
    """The effective settings of one quantized layer (its override applied)."""

    weights: WeightQuantConfig
    activations: ActivationQuantConfig | None


@dataclass(frozen=True)
class Targets:
    """The outcome of layer selection.

    Attributes:
        quantize: names of the layers to quantize, in module order.
        kept_fp: candidate layers left in full precision (``exclude``, ``keep_fp``, or an override
            with ``keep_fp=True``), in module order.
        configs: each quantized layer's :class:`LayerQuant` by name (empty for a
            :class:`LayerSelection`, which carries no quantization settings).
    """

    quantize: tuple[str, ...]
    kept_fp: tuple[str, ...]
    configs: dict[str, LayerQuant] = field(default_factory=dict)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def _check_include(model: nn.Module, modules: dict[str, nn.Module], include: tuple[str, ...]) -> None:
    for pattern in include:
        hits = [n for n in modules if n and re.fullmatch(pattern, n)]
        if not hits:
            raise ValueError(
                f"include pattern {pattern!r} matches no module of {type(model).__name__}; "
                f"module names look like {[n for n in modules if n][:5]} (patterns use re.fullmatch)."
            )
        if not any(quant_layer_class(modules[n]) is not None for n in hits):
            kinds = sorted({type(modules[n]).__name__ for n in hits})
            raise ValueError(
                f"include pattern {pattern!r} matches only {', '.join(kinds)} module(s), which diffquant "
                "cannot quantize; it quantizes nn.Linear and nn.Conv2d layers. Name those layers instead."
            )


def _outcome(
    config: QuantConfig, name: str, keep_fp: tuple[str, ...], override: LayerOverride | None
) -> LayerQuant | None:
    """A candidate layer's settings, or ``None`` when it stays in full precision (rules 2-4)."""
    if override is None:
        return None if _matches(name, keep_fp) else LayerQuant(*config.settings())
    return None if override.keep_fp else LayerQuant(*config.settings(override))


def select_targets(model: nn.Module, config: QuantConfig | LayerSelection) -> Targets:
    """Resolve ``config``'s include / exclude / overrides / keep_fp against ``model`` (see the module
    docstring for the order of the rules).

    Args:
        model: the float model.
        config: a :class:`QuantConfig` (each quantized layer's settings are resolved too) or a
            :class:`LayerSelection`.

    Raises:
        ValueError: if an ``include`` pattern matches no module, or matches only modules that
            cannot be quantized (e.g. a GroupNorm); if an override pattern matches no candidate
            layer left by include / exclude, or changes nothing for the layers it matches; or if
            nothing at all is left to quantize.
    """
    modules = dict(model.named_modules())
    keep_fp = config.keep_fp if config.keep_fp is not None else get_arch_spec(model).keep_fp
    _check_include(model, modules, config.include)
    candidates = [
        name
        for name, module in modules.items()
        if quant_layer_class(module) is not None and (not config.include or _matches(name, config.include))
    ]
    excluded = {name for name in candidates if _matches(name, config.exclude)}
    if isinstance(config, LayerSelection):
        quantize = [n for n in candidates if n not in excluded and not _matches(n, keep_fp)]
        _check_not_empty(model, config, keep_fp, quantize)
        chosen = set(quantize)
        return Targets(tuple(quantize), tuple(n for n in candidates if n not in chosen))
    configs: dict[str, LayerQuant] = {}
    changes: dict[str, bool] = {}  # override pattern -> whether it changed some layer's outcome
    for name in candidates:
        if name in excluded:
            continue
        override = config.override_for(name)
        outcome = _outcome(config, name, keep_fp, override)
        if override is not None:
            changed = outcome != _outcome(config, name, keep_fp, None)
            changes[override.pattern] = changes.get(override.pattern, False) or changed
        if outcome is not None:
            configs[name] = outcome
    unused = [o.pattern for o in config.overrides if o.pattern not in changes]
    if unused:
        raise ValueError(
            f"override pattern(s) {unused} match no Linear/Conv2d layer of {type(model).__name__} left by "
            f"include={list(config.include)} / exclude={list(config.exclude)} (or an earlier override "
            f"matches those layers first); layer names look like {candidates[:5]} (patterns use re.fullmatch)."
        )
    idle = [pattern for pattern, changed in changes.items() if not changed]
    if idle:
        raise ValueError(
            f"override pattern(s) {idle} change nothing: the layers they match would get the same settings "
            "without them. Drop them, or give them the settings those layers should differ by."
        )
    quantize = [n for n in candidates if n in configs]
    _check_not_empty(model, config, keep_fp, quantize)
    return Targets(tuple(quantize), tuple(n for n in candidates if n not in configs), configs)


def _check_not_empty(
    model: nn.Module, config: QuantConfig | LayerSelection, keep_fp: tuple[str, ...], quantize: list[str]
) -> None:
    if not quantize:
        raise ValueError(
            f"no Linear/Conv2d layer of {type(model).__name__} is left to quantize "
            f"(include={list(config.include)}, exclude={list(config.exclude)}, keep_fp={list(keep_fp)})."
        )
