"""`ArchSpec`: what diffquant needs to know about one denoiser architecture, as data."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Per-architecture facts used by the noise context, targeting and sequential calibration.

    Args:
        name: Human-readable architecture name (the diffusers class name, or ``"generic"``).
        timestep_arg: Name of the ``forward`` argument that holds the timestep, or ``None`` when
            unknown (the user then passes ``timestep_arg=`` to
            :func:`diffquant.noise.attach_noise_context`).
        keep_fp: Regexes, matched with ``re.fullmatch`` against names from ``model.named_modules()``,
            of the layers kept in higher precision by default (first/last layers, timestep and
            conditioning embeddings).
        block_prefixes: ``model -> [module name, ...]``: the blocks processed one after another by
            sequential calibration (GPTQ / Qronos), in execution order.

    Raises:
        ValueError: if a ``keep_fp`` entry is not a valid regular expression.

    Example:
        >>> spec = ArchSpec("toy", "t", (r"head",), lambda m: ["body"])
        >>> spec.is_kept_fp("head"), spec.is_kept_fp("body.0")
        (True, False)
    """

    name: str
    timestep_arg: str | None
    keep_fp: tuple[str, ...]
    block_prefixes: Callable[[nn.Module], list[str]]

    def __post_init__(self) -> None:
        if isinstance(self.keep_fp, str):
            raise TypeError(
                f"ArchSpec {self.name!r}: keep_fp must be a tuple of regexes, got the string "
                f"{self.keep_fp!r}; write keep_fp=({self.keep_fp!r},)."
            )
        object.__setattr__(self, "keep_fp", tuple(self.keep_fp))
        for pattern in self.keep_fp:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(
                    f"ArchSpec {self.name!r}: keep_fp entry {pattern!r} is not a valid regex ({err}); "
                    "fix the pattern (it is matched with re.fullmatch against module names)."
                ) from err

    @cached_property
    def _keep_fp_re(self) -> re.Pattern[str] | None:
        if not self.keep_fp:
            return None
        return re.compile("|".join(f"(?:{p})" for p in self.keep_fp))

    def is_kept_fp(self, module_name: str) -> bool:
        """True when ``module_name`` fully matches one of the ``keep_fp`` regexes."""
        pattern = self._keep_fp_re
        return pattern is not None and pattern.fullmatch(module_name) is not None
