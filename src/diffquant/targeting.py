"""Which layers a :class:`~diffquant.config.QuantConfig` quantizes — targets are data, not code.

A layer is quantized when it is a Linear/Conv2d, matches an ``include`` regex (or ``include`` is
empty), matches no ``exclude`` regex, and matches no ``keep_fp`` regex (the architecture's defaults
when ``keep_fp`` is ``None``). Patterns use ``re.fullmatch`` on names from ``named_modules()``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from diffquant.config import QuantConfig
from diffquant.models import get_arch_spec
from diffquant.nn.qmodules import quant_layer_class


@dataclass(frozen=True)
class Targets:
    """The outcome of layer selection.

    Attributes:
        quantize: names of the layers to quantize, in module order.
        kept_fp: quantizable layers left in full precision by ``keep_fp`` / ``exclude``.
    """

    quantize: tuple[str, ...]
    kept_fp: tuple[str, ...]


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def select_targets(model: nn.Module, config: QuantConfig) -> Targets:
    """Resolve ``config``'s include / exclude / keep_fp patterns against ``model``.

    Raises:
        ValueError: if an ``include`` pattern matches no module, or matches only modules that
            cannot be quantized (e.g. a GroupNorm), or if nothing at all is left to quantize.
    """
    modules = dict(model.named_modules())
    keep_fp = config.keep_fp if config.keep_fp is not None else get_arch_spec(model).keep_fp
    for pattern in config.include:
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
    quantize, kept = [], []
    for name, module in modules.items():
        if quant_layer_class(module) is None:
            continue
        if config.include and not _matches(name, config.include):
            continue
        (kept if _matches(name, config.exclude) or _matches(name, keep_fp) else quantize).append(name)
    if not quantize:
        raise ValueError(
            f"no Linear/Conv2d layer of {type(model).__name__} is left to quantize "
            f"(include={list(config.include)}, exclude={list(config.exclude)}, keep_fp={list(keep_fp)})."
        )
    return Targets(tuple(quantize), tuple(kept))
