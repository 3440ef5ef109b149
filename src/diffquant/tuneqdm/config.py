"""`TuneQDMConfig`: the settings of TuneQDM fine-tuning, validated on construction, JSON round trip."""

from __future__ import annotations

from dataclasses import InitVar, dataclass
from typing import Any

from diffquant.config import _JsonConfig
from diffquant.targeting import LayerSelection

CONFIG_VERSION = 2
"""Version 2 renamed ``n_bits`` to ``bits`` (``n_bits`` stays as an alias) and added ``keep_fp`` (default: the
architecture's full-precision layers). Version 1 configs still load, as ``keep_fp=()``: they quantized every
selected layer, so old delta checkpoints load onto the same layers."""
_RENAMED_IN_V2 = {"n_bits": "bits"}
SUPPORTED_BITS = (2, 4, 8)


@dataclass(frozen=True)
class TuneQDMConfig(_JsonConfig):
    """How TuneQDM quantizes the denoiser and which scales it trains.

    TuneQDM (Ryu, Lim, Shim, "Memory-Efficient Fine-Tuning for Quantized Diffusion Model", ECCV 2024)
    freezes per-output-channel INT weights and trains only their scales, ``delta_out`` and optionally
    ``delta_in``; with timestep-aware scales (TAS) each scale has ``num_experts`` copies and a sample at
    timestep ``t`` uses copy ``floor(t · num_experts / total_denoising_steps)``.

    Args:
        bits: Weight bit-width: 2, 4 or 8 (stored packed 4, 2 and 1 per byte). ``n_bits`` (the seed's
            name, also read from version-1 JSON) is accepted as an alias; ``config.n_bits`` reads it.
        num_experts: TAS expert copies of every scale; 1 disables TAS (no timestep needed).
        train_delta_in: Train a per-input-channel scale ``delta_in`` (initialised to 1).
        train_delta_out: Train the per-output-channel scale ``delta_out`` (initialised to the min-max
            quantization scale). When False the min-max scale stays frozen.
        total_denoising_steps: Number of training timesteps T of the noise schedule (valid timesteps are
            ``0 .. T - 1``); experts split this range into ``num_experts`` equal parts.
        symmetric: Symmetric signed INT codes (zero point 0) instead of the default asymmetric ones.
        include: Regexes (``re.fullmatch`` on module names); only matching Linear/Conv2d layers are
            quantized. Empty means all of them.
        exclude: Regexes of Linear/Conv2d layers left in float (and frozen).
        keep_fp: Regexes of layers left in float (and frozen); ``None`` (the default) uses the
            architecture's defaults (first/last layers, timestep embedding: see :mod:`diffquant.models`),
            as :func:`diffquant.quantize_` does; ``()`` quantizes every selected layer (the seed's
            behaviour). The three fields are resolved by :func:`diffquant.targeting.select_targets`.
        version: Config schema version (checked on load; version 1 configs load as ``keep_fp=()``).

    Raises:
        ValueError: ``bits`` and a different ``n_bits`` both given; ``bits`` not in {2, 4, 8};
            ``num_experts`` outside ``[1, total_denoising_steps]``;
            ``total_denoising_steps < 1``; nothing to train; an invalid regex; another version.
        TypeError: a non-integer count, a non-bool flag, or a single string for ``include``/``exclude``.

    Example:
        >>> cfg = TuneQDMConfig(n_bits=8, num_experts=4, train_delta_in=True)
        >>> TuneQDMConfig.from_dict(cfg.to_dict()) == cfg, cfg.bits
        (True, 8)
    """

    bits: int = 8
    num_experts: int = 1
    train_delta_in: bool = False
    train_delta_out: bool = True
    total_denoising_steps: int = 1000
    symmetric: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    keep_fp: tuple[str, ...] | None = None
    version: int = CONFIG_VERSION
    n_bits: InitVar[int | None] = None

    def __post_init__(self, n_bits: int | None) -> None:
        if n_bits is not None:
            if self.bits not in (8, n_bits):
                raise ValueError(
                    f"TuneQDMConfig got bits={self.bits} and n_bits={n_bits}; n_bits is the seed's name for "
                    "bits, pass only one."
                )
            object.__setattr__(self, "bits", n_bits)
        if self.version not in (1, CONFIG_VERSION):
            raise ValueError(
                f"TuneQDMConfig version {self.version!r} is not supported (this diffquant reads versions 1 "
                f"and {CONFIG_VERSION}); re-create the config or upgrade diffquant."
            )
        if self.version == 1:  # e.g. the seed's TuneQDMConfig(**{"n_bits": 8, ..., "version": 1})
            object.__setattr__(self, "keep_fp", ())  # version 1 quantized every selected layer
            object.__setattr__(self, "version", CONFIG_VERSION)
        for name in ("bits", "num_experts", "total_denoising_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"TuneQDMConfig.{name} must be an int, got {value!r}.")
        for name in ("train_delta_in", "train_delta_out", "symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"TuneQDMConfig.{name} must be True or False, got {getattr(self, name)!r}.")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(
                f"TuneQDM supports bits in {SUPPORTED_BITS} (packed 1, 2 or 4 codes per byte), got "
                f"{self.bits}; use 8 (the paper's setting), 4 or 2."
            )
        if self.total_denoising_steps < 1:
            raise ValueError(
                f"total_denoising_steps must be >= 1, got {self.total_denoising_steps}; use the scheduler's "
                "num_train_timesteps (1000 for Stable Diffusion)."
            )
        if not 1 <= self.num_experts <= self.total_denoising_steps:
            raise ValueError(
                f"num_experts must be >= 1 and <= total_denoising_steps ({self.total_denoising_steps}), got "
                f"{self.num_experts}; 1 disables timestep-aware scales, the paper uses 4."
            )
        if not (self.train_delta_in or self.train_delta_out):
            raise ValueError(
                "nothing to train: train_delta_in and train_delta_out are both False. Set "
                "train_delta_out=True (the default) and/or train_delta_in=True."
            )
        for name in ("include", "exclude", "keep_fp"):
            patterns = getattr(self, name)
            if isinstance(patterns, str):
                raise TypeError(f"TuneQDMConfig.{name} must be a list/tuple of regexes, not one string.")
            if patterns is not None:
                object.__setattr__(self, name, tuple(patterns))
        LayerSelection(self.include, self.exclude, self.keep_fp)  # raises on an invalid regex

    @property
    def selection(self) -> LayerSelection:
        """The layers this config quantizes, for :func:`diffquant.targeting.select_targets`."""
        return LayerSelection(self.include, self.exclude, self.keep_fp)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TuneQDMConfig:
        """Build (and validate) a config from :meth:`to_dict` output; version-1 dicts (``n_bits``) are
        upgraded. Unknown keys are rejected."""
        if isinstance(data, dict) and data.get("version") == 1:
            data = {_RENAMED_IN_V2.get(k, k): v for k, v in data.items()}
        return super().from_dict(data)


TuneQDMConfig.n_bits = property(lambda self: self.bits, doc="Alias of ``bits`` (the seed's name).")
