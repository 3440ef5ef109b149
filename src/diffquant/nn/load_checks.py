"""Rebuild quantized layers from untrusted checkpoint descriptions: check everything, then allocate.

A checkpoint's checksum proves the file is the one that was saved; these checks make sure what it
says is usable even when the file was re-saved after tampering: every description field is checked
against the float layer it replaces (kind, weight shape, conv arguments, bias) before any tensor is
allocated, sizes are bounded by that layer, and loaded tensors are checked for values no quantizer
produces (NaN/Inf, scales <= 0, codes or zero points out of range, uncalibrated quantizers).
Every check raises ``ValueError`` naming the field or tensor; :mod:`diffquant.io` adds file and layer.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from diffquant.config import ActivationQuantConfig
from diffquant.nn.act_quant import ActivationQuantizer, StaticActivationQuantizer
from diffquant.nn.act_step_table import StepTableActivationQuantizer
from diffquant.nn.act_tdq import TDQActivationQuantizer
from diffquant.nn.packed import PackedWeight
from diffquant.nn.qmodules import _QuantLayer, quant_layer_class

LAYER_FIELDS = {"kind", "layer", "has_bias", "weight", "input_quant"}
SIZE_LIMITS = {"num_timesteps": 100_000, "hidden": 4096, "num_frequencies": 64}
"""Upper bounds of the size fields of activation quantizer descriptions (allocation stays small)."""


def _fields(what: str, meta: Any, expected: set[str]) -> None:
    if not isinstance(meta, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(meta).__name__}.")
    missing, unknown = sorted(expected - set(meta)), sorted(set(meta) - expected)
    if missing or unknown:
        raise ValueError(f"{what}: missing field(s) {missing}, unknown field(s) {unknown}.")


def _layer_args(module: nn.Module, kind: str) -> dict[str, Any]:
    """The ``layer`` field a correct description of ``module`` holds."""
    if kind == "linear":
        return {"in_features": module.in_features, "out_features": module.out_features}
    padding = module.padding if isinstance(module.padding, str) else list(module.padding)
    return {
        "stride": list(module.stride),
        "padding": padding,
        "dilation": list(module.dilation),
        "groups": module.groups,
    }


def check_activation_meta(meta: Any, channel_dim: int) -> None:
    """Raise ``ValueError`` unless ``meta`` describes a registered activation quantizer for a layer whose
    feature axis is ``channel_dim``, with every size field within :data:`SIZE_LIMITS`."""
    if meta is None:
        return
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ValueError("field 'input_quant' must be null or an object with a 'config' object.")
    try:
        config = ActivationQuantConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"field 'input_quant.config': {err}") from err
    cls = ActivationQuantizer.registry.get(config.mode)
    if cls is None:
        raise ValueError(
            f"field 'input_quant.config.mode' is {config.mode!r}; registered: {sorted(ActivationQuantizer.registry)}."
        )
    _fields("field 'input_quant'", meta, set(cls(config, channel_dim).meta()))
    if meta["channel_dim"] != channel_dim or isinstance(meta["channel_dim"], bool):
        raise ValueError(
            f"field 'input_quant.channel_dim' must be {channel_dim}, got {meta['channel_dim']!r}."
        )
    for key, limit in SIZE_LIMITS.items():
        value = meta.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
            raise ValueError(f"field 'input_quant.{key}' must be an integer in 0..{limit}, got {value!r}.")
    if not isinstance(meta.get("learnable", False), bool):
        raise ValueError(f"field 'input_quant.learnable' must be true or false, got {meta['learnable']!r}.")


def build_quant_layer(meta: Any, module: nn.Module) -> _QuantLayer:
    """An empty quantized layer for the float ``module``, from its checked description ``meta``.

    Raises:
        ValueError: a field is missing, unknown, ill-typed, or disagrees with ``module`` (kind, weight
            shape, conv arguments, bias); the message names the field.
    """
    _fields("the layer description", meta, LAYER_FIELDS)
    qcls = quant_layer_class(module)
    if qcls is None or meta["kind"] != qcls.kind:
        raise ValueError(
            f"field 'kind' is {meta['kind']!r}, but the model's layer is a {type(module).__name__}."
        )
    if getattr(module, "padding_mode", "zeros") != "zeros":
        raise ValueError(
            f"the model's conv uses padding_mode={module.padding_mode!r}; quantized convs pad with zeros."
        )
    expected = _layer_args(module, qcls.kind)
    _fields("field 'layer'", meta["layer"], set(expected))
    for key, value in expected.items():
        if meta["layer"][key] != value or isinstance(meta["layer"][key], bool):
            raise ValueError(
                f"field 'layer.{key}' is {meta['layer'][key]!r}, but the model's layer has {value!r}."
            )
    if meta["has_bias"] is not (module.bias is not None):
        raise ValueError(
            f"field 'has_bias' is {meta['has_bias']!r}, but the model's layer has bias={module.bias is not None}."
        )
    check_activation_meta(meta["input_quant"], qcls.channel_dim)
    PackedWeight.from_meta(meta["weight"], tuple(module.weight.shape))  # checks before the layer allocates
    return _QuantLayer.from_meta(meta)


def check_quantizer_values(quantizer: ActivationQuantizer) -> None:
    """Raise ``ValueError`` for loaded quantizer tensors no calibration produces."""
    for name, t in itertools.chain(quantizer.named_parameters(), quantizer.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"tensor 'input_quant.{name}' contains NaN/Inf.")
    calibrated = getattr(quantizer, "calibrated", None)
    if calibrated is not None and not bool(calibrated):
        raise ValueError(
            "tensor 'input_quant.calibrated' is false: the activation quantizer was never calibrated."
        )
    if isinstance(quantizer, (StaticActivationQuantizer, StepTableActivationQuantizer)):
        if not (quantizer.scale > 0).all():
            raise ValueError("tensor 'input_quant.scale' has zero or negative entries; scales are positive.")
        zp = quantizer.zero_point
        if (
            not getattr(quantizer, "learnable", False)
            and ((zp < quantizer.qmin) | (zp > quantizer.qmax)).any()
        ):
            raise ValueError(
                f"tensor 'input_quant.zero_point' is outside {quantizer.qmin}..{quantizer.qmax}."
            )
    if isinstance(quantizer, StepTableActivationQuantizer) and (quantizer.timesteps.diff() <= 0).any():
        raise ValueError("tensor 'input_quant.timesteps' is not strictly increasing.")
    if isinstance(quantizer, TDQActivationQuantizer) and (
        quantizer.range_unit <= 0 or quantizer.cond_lo > quantizer.cond_hi
    ):
        raise ValueError(
            "tensors 'input_quant.range_unit' (> 0) / 'cond_lo' <= 'cond_hi' hold impossible values."
        )


def check_layer_values(layer: _QuantLayer) -> None:
    """Raise ``ValueError`` naming the tensor when a loaded layer holds values no quantizer produces."""
    try:
        layer.qweight.check_values()
    except ValueError as err:
        raise ValueError(f"qweight: {err}") from err
    if layer.bias is not None and not torch.isfinite(layer.bias).all():
        raise ValueError("tensor 'bias' contains NaN/Inf.")
    if layer.input_quant is not None:
        check_quantizer_values(layer.input_quant)


__all__ = ["build_quant_layer", "check_activation_meta", "check_layer_values", "check_quantizer_values"]
