"""Versioned, validated configuration dataclasses for :func:`diffquant.quantize_`.

A :class:`QuantConfig` combines independent choices — how weights are stored and quantized
(:class:`WeightQuantConfig`), how layer inputs are quantized (:class:`ActivationQuantConfig`), and
which layers are targeted. Every config validates itself on construction and round-trips through
JSON (``to_dict`` / ``from_dict``), so a checkpoint records exactly how it was made.

Example:
    >>> from diffquant import QuantConfig, WeightQuantConfig, ActivationQuantConfig
    >>> cfg = QuantConfig(
    ...     weights=WeightQuantConfig(bits=4, granularity="group", group_size=64),
    ...     activations=ActivationQuantConfig(bits=8, mode="static"),
    ... )
    >>> QuantConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

CONFIG_VERSION = 2
"""Version of :class:`QuantConfig`'s schema. Version 2 added ``overrides``; version 1 configs (which have
none) still load and are read as version 2."""
READABLE_VERSIONS = (1, 2)
INHERIT = "inherit"
"""``LayerOverride.activations`` value meaning "as ``QuantConfig.activations``" (the default)."""
WEIGHT_FORMATS = ("int", "nf4")
GRANULARITIES = ("tensor", "channel", "group")
RANGE_METHODS = ("minmax", "percentile", "mse")
SEQUENTIAL_MODES = ("block", "layer", "off")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}.")


def _check_int_bits(bits: Any, what: str) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(
            f"{what} INT quantization supports 2..8 bits, got {bits!r}; use bits in 2..8 "
            "(or format='nf4' for 4-bit normal-float weights)."
        )


def _check_flags(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise TypeError(
                f"{type(config).__name__}.{name} must be True or False, got {value!r} "
                f"({type(value).__name__}); a string such as 'False' is not a flag."
            )


class _JsonConfig:
    """Mixin: JSON round trip for (nested) config dataclasses.

    ``_nested`` maps a field name to the config class of its value, or of each item of its tuple.
    """

    _nested: ClassVar[dict[str, type]] = {}

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of this config (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, _JsonConfig):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = [v.to_dict() if isinstance(v, _JsonConfig) else v for v in value]
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build (and validate) a config from :meth:`to_dict` output; unknown keys are rejected."""
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - names
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} field(s) {sorted(unknown)}; known fields are {sorted(names)}. "
                "Was this config written by a newer diffquant?"
            )
        kwargs = {}
        for key, value in data.items():
            nested = cls._nested.get(key)
            if nested is not None and isinstance(value, dict):
                value = nested.from_dict(value)
            elif isinstance(value, list):
                value = tuple(nested.from_dict(v) if nested and isinstance(v, dict) else v for v in value)
            kwargs[key] = value
        return cls(**kwargs)

    def to_json(self) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class WeightQuantConfig(_JsonConfig):
    """How the weights of targeted Linear/Conv2d layers are quantized and stored.

    Args:
        format: ``"int"`` (affine integer codes) or ``"nf4"`` (4-bit NormalFloat, QLoRA).
        bits: INT bit-width, 2..8 (stored packed: 8 → 1/byte, 4 → 2/byte, 2 → 4/byte, others 1/byte).
            Must be 4 for NF4.
        granularity: ``"tensor"``, ``"channel"`` (per output channel) or ``"group"`` (groups of
            ``group_size`` consecutive inputs per output channel). INT only.
        group_size: group length along the flattened input dimension (required for ``"group"``).
        symmetric: symmetric signed range (zero point 0) or asymmetric unsigned range.
        range_method: how the clipping range is chosen: ``"minmax"``, ``"percentile"`` or ``"mse"``.
        method: weight quantization algorithm from the registry (``"rtn"``; calibrated methods
            such as GPTQ register themselves under their own names).
        block_size: NF4 absmax block size (power of two, 32..4096).
        double_quant: NF4 double quantization of the absmax values (blocks of 256, 8-bit).
        damping: GPTQ/Qronos Hessian damping as a fraction of the mean diagonal (raised
            automatically for ill-conditioned layers).
        act_order: GPTQ/Qronos process columns by decreasing Hessian diagonal (group scales are
            then fixed before the column loop, "static groups").
        sequential: how GPTQ/Qronos see the quantized network: ``"block"`` calibrates block by
            block (UNet down/mid/up blocks, transformer blocks) on the outputs of the already-quantized
            earlier blocks; ``"layer"`` does the same layer by layer in execution order (most
            accurate, one partial replay per layer); ``"off"`` calibrates every layer on float inputs.
        fallback_granularity: what to do with a layer whose input size ``group_size`` does not
            divide: ``None`` (default) raises; ``"channel"`` or ``"tensor"`` quantizes that layer
            at this granularity instead (the layer's stored scales show which one it got).

    Raises:
        ValueError: on an unsupported format, bit-width, granularity or range method, a
            missing/invalid group or block size, INT-only settings with NF4 (granularity, group_size,
            symmetric=False, range_method) or NF4-only settings with INT (block_size, double_quant).
        TypeError: a flag (``symmetric``, ``double_quant``, ``act_order``) that is not a bool.
    """

    format: str = "int"
    bits: int = 8
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    range_method: str = "minmax"
    method: str = "rtn"
    block_size: int = 64
    double_quant: bool = True
    damping: float = 0.01
    act_order: bool = False
    sequential: str = "block"
    fallback_granularity: str | None = None

    def __post_init__(self) -> None:
        _check_choice("format", self.format, WEIGHT_FORMATS)
        _check_flags(self, ("symmetric", "double_quant", "act_order"))
        if self.fallback_granularity is not None:
            _check_choice("fallback_granularity", self.fallback_granularity, ("channel", "tensor"))
        _check_choice("sequential", self.sequential, SEQUENTIAL_MODES)
        if (
            isinstance(self.damping, bool)
            or not isinstance(self.damping, (int, float))
            or not 0 < self.damping < 10
        ):
            raise ValueError(
                f"damping must be a positive fraction of the mean Hessian diagonal, got {self.damping!r}."
            )
        if self.format == "nf4":
            if self.bits != 4:
                raise ValueError(
                    f"NF4 is a 4-bit format, got bits={self.bits}; use bits=4 with format='nf4', "
                    "or format='int' for other bit-widths."
                )
            if (
                not isinstance(self.block_size, int)
                or self.block_size < 32
                or self.block_size > 4096
                or (self.block_size & (self.block_size - 1))
            ):
                raise ValueError(
                    f"NF4 block_size must be a power of two in 32..4096, got {self.block_size!r}; "
                    "64 is the QLoRA default."
                )
            ignored = {
                k: getattr(self, k)
                for k, default in (
                    ("granularity", "channel"),
                    ("group_size", None),
                    ("symmetric", True),
                    ("range_method", "minmax"),
                )
                if getattr(self, k) != default
            }
            if ignored:
                raise ValueError(
                    f"NF4 does not use {ignored}: it is symmetric with one absmax per block_size weights. "
                    "Drop these arguments (set block_size instead), or use format='int'."
                )
            return
        if self.block_size != 64 or self.double_quant is not True:
            raise ValueError(
                f"block_size={self.block_size!r} / double_quant={self.double_quant!r} are NF4 settings, unused by "
                "format='int'; drop them, or set format='nf4'."
            )
        _check_int_bits(self.bits, "weight")
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("range_method", self.range_method, RANGE_METHODS)
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(
                    f"granularity='group' needs a positive integer group_size, got {self.group_size!r}; "
                    "typical values are 32, 64 or 128."
                )
        elif self.group_size is not None:
            raise ValueError(
                f"group_size={self.group_size} is only used with granularity='group' "
                f"(got granularity={self.granularity!r}); drop group_size or set granularity='group'."
            )

    def for_layer(self, in_features: int) -> WeightQuantConfig:
        """The config for a layer with ``in_features`` flattened inputs (``fallback_granularity``
        applied when ``group_size`` does not divide it)."""
        if self.granularity == "group" and self.fallback_granularity and in_features % self.group_size:
            return dataclasses.replace(self, granularity=self.fallback_granularity, group_size=None)
        return self

    @property
    def label(self) -> str:
        """Short storage label used in reports: ``int8``, ``int4``, ``nf4``..."""
        return "nf4" if self.format == "nf4" else f"int{self.bits}"


@dataclass(frozen=True)
class ActivationQuantConfig(_JsonConfig):
    """How the inputs of targeted layers are quantized (fake-quantized in the reference path).

    Args:
        bits: activation bit-width, 2..8 (4 and 8 are the published settings).
        mode: quantizer from the registry: ``"static"`` (one range per layer from calibration) or
            ``"dynamic"`` (per-token ranges computed on the fly); timestep-aware modes register
            themselves under their own names.
        symmetric: symmetric signed range or asymmetric unsigned range (default; activations after
            SiLU/GELU are skewed).
        range_method: how a static range is chosen from calibration data.
        percentile: the percentile used by ``range_method="percentile"``.

    Raises:
        ValueError: on an unsupported bit-width, mode string, range method or percentile.
        TypeError: ``symmetric`` not a bool, ``percentile`` not a number.
    """

    bits: int = 8
    mode: str = "static"
    symmetric: bool = False
    range_method: str = "minmax"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        _check_int_bits(self.bits, "activation")
        _check_flags(self, ("symmetric",))
        if not isinstance(self.mode, str) or not self.mode:
            raise ValueError(f"activation mode must be a non-empty string, got {self.mode!r}.")
        _check_choice("range_method", self.range_method, RANGE_METHODS)
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)):
            raise TypeError(f"percentile must be a number in (50, 100], got {self.percentile!r}.")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}.")

    @property
    def label(self) -> str:
        """Short label used in reports: ``int8``, ``int4``..."""
        return f"int{self.bits}"


@dataclass(frozen=True)
class CalibrationConfig(_JsonConfig):
    """Which denoiser calls of the calibration run are kept (the run is recorded once, then replayed).

    Args:
        num_steps: calls kept, spread uniformly over the recorded trajectory (``None`` keeps all).
        samples_per_step: batch rows kept per call, spread evenly over the batch so both halves of
            a classifier-free-guidance batch are represented (``None`` keeps all).
        merge_batch: consecutive kept calls are concatenated along the batch into replays of at most
            this many samples when their other arguments agree (fewer, larger forwards; timesteps
            are per sample, so one replay may mix noise levels). ``None`` never merges.

    Raises:
        ValueError: on a count below 1.
    """

    num_steps: int | None = None
    samples_per_step: int | None = None
    merge_batch: int | None = 512

    def __post_init__(self) -> None:
        for name in ("num_steps", "samples_per_step", "merge_batch"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(
                    f"CalibrationConfig.{name} must be a positive integer or None, got {value!r}."
                )


def _check_regex(what: str, pattern: Any) -> None:
    if not isinstance(pattern, str):
        raise TypeError(f"{what} must be a regex string, got {pattern!r}.")
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{what} {pattern!r} is not a valid regex: {err}") from err


@dataclass(frozen=True)
class LayerOverride(_JsonConfig):
    """Other settings for the layers whose names match ``pattern`` (one entry of
    ``QuantConfig.overrides``; the first matching entry wins).

    Args:
        pattern: regex, ``re.fullmatch`` on names from ``model.named_modules()``.
        weights: these layers' weight config; ``None`` keeps ``QuantConfig.weights``.
        activations: these layers' input config; ``None`` leaves their inputs unquantized
            (weight-only); :data:`INHERIT` (the default) keeps ``QuantConfig.activations``.
        keep_fp: keep these layers in full precision (``weights`` / ``activations`` then stay unset).

    A matching override decides its layers ahead of ``keep_fp`` and the architecture's defaults, so
    an override can quantize a layer that would otherwise stay in float; ``exclude`` still wins.

    Raises:
        ValueError: on an invalid regex, an override that sets nothing, or ``keep_fp=True`` together
            with ``weights`` / ``activations``.
        TypeError: on a value of the wrong type.

    Example:
        >>> w8a8 = LayerOverride(r"conv_(in|out)", weights=WeightQuantConfig(bits=8),
        ...                      activations=ActivationQuantConfig(bits=8))
        >>> LayerOverride.from_dict(w8a8.to_dict()) == w8a8
        True
    """

    pattern: str
    weights: WeightQuantConfig | None = None
    activations: ActivationQuantConfig | str | None = INHERIT
    keep_fp: bool = False

    _nested: ClassVar[dict[str, type]] = {"weights": WeightQuantConfig, "activations": ActivationQuantConfig}

    def __post_init__(self) -> None:
        _check_regex("LayerOverride pattern", self.pattern)
        if not self.pattern:
            raise ValueError("LayerOverride pattern is empty; give the regex of the layers it applies to.")
        if self.weights is not None and not isinstance(self.weights, WeightQuantConfig):
            raise TypeError(
                f"LayerOverride.weights must be a WeightQuantConfig or None, got {self.weights!r}."
            )
        if not (
            self.activations is None
            or self.activations == INHERIT
            or isinstance(self.activations, ActivationQuantConfig)
        ):
            raise TypeError(
                "LayerOverride.activations must be an ActivationQuantConfig, None (unquantized inputs) or "
                f"INHERIT, got {self.activations!r}."
            )
        if not isinstance(self.keep_fp, bool):
            raise TypeError(f"LayerOverride.keep_fp must be True or False, got {self.keep_fp!r}.")
        sets_config = self.weights is not None or self.activations != INHERIT
        if self.keep_fp and sets_config:
            raise ValueError(
                f"LayerOverride({self.pattern!r}) keeps its layers in full precision and also sets a weight/"
                "activation config; drop one of the two."
            )
        if not self.keep_fp and not sets_config:
            raise ValueError(
                f"LayerOverride({self.pattern!r}) changes nothing; set weights, activations or keep_fp=True."
            )


@dataclass(frozen=True)
class QuantConfig(_JsonConfig):
    """Everything :func:`diffquant.quantize_` needs: weights × activations × targets.

    Args:
        weights: weight quantization (required).
        activations: input-activation quantization, or ``None`` for weight-only quantization.
        include: regexes (``re.fullmatch`` on module names); only matching Linear/Conv2d layers are
            quantized. Empty means every Linear/Conv2d layer.
        exclude: regexes of layers never quantized.
        keep_fp: regexes of layers kept in full precision; ``None`` uses the architecture's
            defaults (first/last layers, timestep embedding — see :mod:`diffquant.models`).
        overrides: per-layer settings (:class:`LayerOverride`), like torchao's per-module configs; the
            first override whose pattern matches a layer decides its weights / activations (or keeps
            it in full precision), ahead of ``keep_fp``. Each pattern must match a selected layer.
        calibration: which recorded denoiser calls calibrate activations and weights.
        version: config schema version (checked on load; version 1 configs load as version 2).

    Raises:
        ValueError: on an invalid regex, an unsupported version, or an override that repeats an
            earlier pattern. (An override that changes nothing for the layers it matches is reported
            by :func:`diffquant.targeting.select_targets`, which knows the layers.)

    Example:
        >>> edges = LayerOverride(r"conv_(in|out)", weights=WeightQuantConfig(bits=8))
        >>> cfg = QuantConfig(weights=WeightQuantConfig(bits=4), overrides=(edges,))
        >>> QuantConfig.from_json(cfg.to_json()) == cfg
        True
    """

    weights: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    activations: ActivationQuantConfig | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    keep_fp: tuple[str, ...] | None = None
    overrides: tuple[LayerOverride, ...] = ()
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    version: int = CONFIG_VERSION

    _nested: ClassVar[dict[str, type]] = {
        "weights": WeightQuantConfig,
        "activations": ActivationQuantConfig,
        "overrides": LayerOverride,
        "calibration": CalibrationConfig,
    }

    def __post_init__(self) -> None:
        if self.version not in READABLE_VERSIONS:
            raise ValueError(
                f"QuantConfig version {self.version} is not supported by this diffquant "
                f"(reads {list(READABLE_VERSIONS)}); re-create the config or upgrade diffquant."
            )
        object.__setattr__(self, "version", CONFIG_VERSION)  # version 1 differs only by having no overrides
        if not isinstance(self.weights, WeightQuantConfig):
            raise TypeError("QuantConfig.weights must be a WeightQuantConfig.")
        if self.activations is not None and not isinstance(self.activations, ActivationQuantConfig):
            raise TypeError("QuantConfig.activations must be an ActivationQuantConfig or None.")
        for name in ("include", "exclude", "keep_fp"):
            patterns = getattr(self, name)
            if patterns is None:
                continue
            if isinstance(patterns, str):
                raise TypeError(f"{name} must be a list/tuple of regexes, not a single string.")
            object.__setattr__(self, name, tuple(patterns))
            for pattern in patterns:
                _check_regex(f"{name} pattern", pattern)
        self._check_overrides()

    def _check_overrides(self) -> None:
        if isinstance(self.overrides, LayerOverride):
            raise TypeError("overrides must be a list/tuple of LayerOverride, not a single LayerOverride.")
        object.__setattr__(self, "overrides", tuple(self.overrides))
        seen: set[str] = set()
        for override in self.overrides:
            if not isinstance(override, LayerOverride):
                raise TypeError(f"QuantConfig.overrides must hold LayerOverride objects, got {override!r}.")
            if override.pattern in seen:
                raise ValueError(
                    f"override pattern {override.pattern!r} appears twice; the first one always wins, "
                    "so drop the other."
                )
            seen.add(override.pattern)

    def settings(
        self, override: LayerOverride | None = None
    ) -> tuple[WeightQuantConfig, ActivationQuantConfig | None]:
        """``(weights, activations)`` of a quantized layer, with ``override`` (one of
        :attr:`overrides`, not a ``keep_fp`` one) applied."""
        if override is None:
            return self.weights, self.activations
        activations = self.activations if override.activations == INHERIT else override.activations
        return override.weights or self.weights, activations

    def override_for(self, name: str) -> LayerOverride | None:
        """The first override whose pattern fully matches the module name ``name``, or ``None``."""
        return next((o for o in self.overrides if re.fullmatch(o.pattern, name)), None)

    @property
    def label(self) -> str:
        """``W4A8``-style label (``A16`` meaning unquantized activations)."""
        w = "NF4" if self.weights.format == "nf4" else f"W{self.weights.bits}"
        a = f"A{self.activations.bits}" if self.activations is not None else "A16"
        return f"{w}{a}"
