"""``DiffQuantConfig``: a diffusers quantization config (``quant_method="diffquant"``) around a QuantConfig.

Import it from :mod:`diffquant.integrations.diffusers`, which also registers the backend with diffusers."""

from __future__ import annotations

import copy
import json
from enum import Enum
from typing import Any

import torch
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from diffquant.api import _WEIGHT_METHODS
from diffquant.config import QuantConfig
from diffquant.nn.act_quant import ActivationQuantizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DiffQuantMethod(str, Enum):
    """diffusers reads ``quant_method.value``; a ``str`` enum also works as a plain dict key."""

    DIFFQUANT = "diffquant"


class DiffQuantConfig(QuantizationConfigMixin):
    """diffquant as a diffusers quantization backend.

    Pass it to ``<Model>.from_pretrained(..., quantization_config=...)`` or in a
    ``PipelineQuantizationConfig(quant_mapping={"transformer": ...})``: the model is loaded in float
    and quantized round-to-nearest right after its weights are read. ``save_pretrained`` then writes the
    packed weights and this config (with ``layers``, each quantized layer's description) into the
    component's ``config.json``, and ``from_pretrained`` rebuilds the quantized layers from it.

    Args:
        quant_config: the :class:`~diffquant.QuantConfig` (or its ``to_dict()``). Alternatively give its
            fields (``weights=..., activations=..., include=..., exclude=..., keep_fp=...``) as keywords.
        layers: filled in when a model is quantized: ``{layer name: QuantLinear/QuantConv2d.meta()}``.
            Leave it ``None`` to quantize a float checkpoint.
        compute_dtype: filled in on save: the dtype of the model's float tensors (``"bfloat16"``...),
            used when ``from_pretrained`` is given no ``torch_dtype``.

    Raises:
        ValueError: if both ``quant_config`` and field keywords are given, or on an invalid config.
            Calibrated configs (static activations, GPTQ / Qronos) are refused by ``from_pretrained``
            (:meth:`check_calibration_free`): quantize the loaded model with ``diffquant.quantize_``.

    Example:
        >>> from diffquant import WeightQuantConfig
        >>> config = DiffQuantConfig(weights=WeightQuantConfig(bits=4, granularity="group", group_size=32))
        >>> # UNet2DConditionModel.from_pretrained(path, subfolder="unet", quantization_config=config)
        >>> config.quant_config.label
        'W4A16'
    """

    def __init__(
        self,
        quant_config: QuantConfig | dict[str, Any] | None = None,
        layers: dict[str, dict[str, Any]] | None = None,
        compute_dtype: str | None = None,
        **fields: Any,
    ):
        fields.pop("quant_method", None)  # present in a saved config.json
        if quant_config is not None and fields:
            raise ValueError(f"give either quant_config or QuantConfig fields ({sorted(fields)}), not both.")
        if quant_config is None:
            quant_config = QuantConfig(**fields) if _all_objects(fields) else QuantConfig.from_dict(fields)
        elif isinstance(quant_config, dict):
            quant_config = QuantConfig.from_dict(quant_config)
        elif not isinstance(quant_config, QuantConfig):
            raise TypeError(
                f"quant_config must be a diffquant.QuantConfig, got {type(quant_config).__name__}."
            )
        if compute_dtype is not None and compute_dtype not in _DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(_DTYPES)}, got {compute_dtype!r}.")
        self.quant_method = DiffQuantMethod.DIFFQUANT
        self.quant_config = quant_config
        self.layers = layers
        self.compute_dtype = compute_dtype

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """``compute_dtype`` as a ``torch.dtype`` (None when not recorded)."""
        return _DTYPES[self.compute_dtype] if self.compute_dtype else None

    def needs_calibration(self) -> bool:
        """True when the weight method or the activation mode needs calibration data."""
        method = _WEIGHT_METHODS.get(self.quant_config.weights.method)
        acts = self.quant_config.activations
        act_cls = ActivationQuantizer.registry.get(acts.mode) if acts is not None else None
        return bool(
            (method is not None and method.needs_calibration) or (act_cls and act_cls.needs_calibration)
        )

    def check_calibration_free(self) -> None:
        """Raise ``ValueError`` for configs that ``from_pretrained`` cannot apply (they need calibration)."""
        if self.needs_calibration():
            raise ValueError(
                f"{self.quant_config.label} with weight method {self.quant_config.weights.method!r} and "
                f"activations {self.quant_config.activations} needs calibration data, which from_pretrained "
                "does not have. Load the float pipeline and call diffquant.integrations.diffusers.quantize_pipeline("
                "pipe, quant_config) (or diffquant.quantize_(model, quant_config, calibrate=fn) with fn running "
                "a few sampling steps); save_pretrained(dir) then writes a "
                "checkpoint that from_pretrained loads. (RTN / NF4 weights and dynamic activations need no "
                "calibration.)"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what ``config.json`` stores under ``quantization_config``)."""
        return {
            "quant_method": self.quant_method.value,
            "quant_config": self.quant_config.to_dict(),
            "layers": copy.deepcopy(self.layers),
            "compute_dtype": self.compute_dtype,
        }

    def to_diff_dict(self) -> dict[str, Any]:
        """Same as :meth:`to_dict` (diffusers' ``__repr__`` calls it)."""
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DiffQuantConfig) and json.dumps(
            self.to_dict(), sort_keys=True
        ) == json.dumps(other.to_dict(), sort_keys=True)


def _all_objects(fields: dict[str, Any]) -> bool:
    """True when QuantConfig fields are given as objects (``WeightQuantConfig(...)``), not JSON dicts."""
    return not any(isinstance(v, dict) for v in fields.values())
