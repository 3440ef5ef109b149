"""``quantize_``: the one in-place verb, and the registry of weight quantization methods.

Weight methods register themselves with :func:`register_weight_method`; activation modes register
themselves as :class:`~diffquant.nn.ActivationQuantizer` subclasses. A config picks one of each, so
methods compose freely and adding one never edits this file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from diffquant.config import QuantConfig
from diffquant.models import get_arch_spec
from diffquant.nn.act_quant import ActivationQuantizer
from diffquant.nn.packed import PackedWeight
from diffquant.nn.qmodules import is_quantized_layer, quant_layer_class
from diffquant.noise import attach_noise_context
from diffquant.ptq.calibration import DenoiserCall, record_denoiser_calls, replay
from diffquant.ptq.paths import attach_float_weights, layer_paths, release_float_weights
from diffquant.targeting import select_targets

Calibrate = Callable[[nn.Module], Any]
"""A function that runs the model on representative inputs (its return value is ignored)."""

WeightMethod = Callable[[nn.Module, dict[str, nn.Module], QuantConfig, list[DenoiserCall] | None], None]
"""``(model, quantized_layers_by_name, config, calibration_calls) -> None``.

Every targeted layer starts from round-to-nearest weights and keeps its float weight
(``layer.float_weight``) while the method runs; a calibrated method replaces ``layer.qweight``."""


@dataclass(frozen=True)
class _Method:
    fn: WeightMethod
    needs_calibration: bool


_WEIGHT_METHODS: dict[str, _Method] = {}


def register_weight_method(
    name: str, *, needs_calibration: bool = False
) -> Callable[[WeightMethod], WeightMethod]:
    """Decorator: make a weight quantization method available as ``WeightQuantConfig(method=name)``.

    Args:
        name: the method's name in configs.
        needs_calibration: the method uses the recorded calibration calls (``calibrate`` required).
    """

    def decorator(fn: WeightMethod) -> WeightMethod:
        _WEIGHT_METHODS[name] = _Method(fn, needs_calibration)
        return fn

    return decorator


_AFTER_QUANTIZE: list[Callable[[nn.Module], Any]] = []


def register_after_quantize(fn: Callable[[nn.Module], Any]) -> Callable[[nn.Module], Any]:
    """Call ``fn(model)`` at the end of every successful :func:`quantize_` and ``load_quantized``
    (integrations use it to mark framework models, e.g. diffusers' ``hf_quantizer``). Registering the
    same function twice is a no-op."""
    if fn not in _AFTER_QUANTIZE:
        _AFTER_QUANTIZE.append(fn)
    return fn


def notify_quantized(model: nn.Module) -> None:
    """Run the :func:`register_after_quantize` functions on a model that has just become quantized
    (by :func:`quantize_`, or by ``load_quantized``)."""
    for fn in _AFTER_QUANTIZE:
        fn(model)


def weight_methods() -> tuple[str, ...]:
    """Names of the registered weight methods."""
    return tuple(sorted(_WEIGHT_METHODS))


@register_weight_method("rtn")
def _round_to_nearest(model, layers, config, calls) -> None:
    """Round-to-nearest with the configured range choice: the layers already hold it."""


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    *,
    calibrate: Calibrate | None = None,
    schedule: Any = None,
    progress: bool = False,
) -> nn.Module:
    """Quantize ``model`` in place: swap targeted Linear/Conv2d layers for quantized ones.

    Args:
        model: any module with Linear/Conv2d layers (diffusers UNet/DiT/PixArt included).
        config: what to quantize and how.
        calibrate: ``fn(model)`` that runs representative inputs; required by activation modes
            that need calibration (``"static"``) and by calibrated weight methods.
        schedule: a diffusers scheduler or :class:`~diffquant.noise.NoiseSchedule`, used to publish
            the log-SNR of each call's timesteps to timestep-aware quantizers.
        progress: show a progress bar over layers.

    Returns:
        The same ``model`` object, quantized; ``model.diffquant_config`` records ``config``.

    Raises:
        TypeError: if ``config`` is not a :class:`QuantConfig`.
        ValueError: if the model is already quantized, a method or mode is unknown, calibration
            is needed but missing or empty, or a weight contains NaN/Inf.

    Example:
        >>> import torch, diffquant
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> cfg = diffquant.QuantConfig(weights=diffquant.WeightQuantConfig(bits=4, granularity="group",
        ...                                                              group_size=32))
        >>> _ = diffquant.quantize_(model, cfg)
        >>> type(model[0]).__name__
        'QuantLinear'
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a diffquant.QuantConfig, got {type(config).__name__}.")
    if getattr(model, "diffquant_config", None) is not None or any(map(is_quantized_layer, model.modules())):
        raise ValueError("model is already quantized; quantize a fresh copy of the float model instead.")
    method = _WEIGHT_METHODS.get(config.weights.method)
    if method is None:
        raise ValueError(
            f"unknown weight method {config.weights.method!r}; registered: {list(weight_methods())}."
        )
    act_cls = None
    if config.activations is not None:
        act_cls = ActivationQuantizer.registry.get(config.activations.mode)
        if act_cls is None:
            raise ValueError(
                f"unknown activation mode {config.activations.mode!r}; "
                f"registered: {sorted(ActivationQuantizer.registry)}."
            )
    calibrate_acts = act_cls is not None and act_cls.needs_calibration
    if (calibrate_acts or method.needs_calibration) and calibrate is None:
        needer = (
            f"activation mode {config.activations.mode!r}"
            if calibrate_acts
            else f"weight method {config.weights.method!r}"
        )
        raise ValueError(
            f"{needer} needs calibration data: pass calibrate=fn, where fn(model) runs the float model "
            "on representative inputs (e.g. a few sampling runs)."
        )

    targets = select_targets(model, config)
    originals = {name: model.get_submodule(name) for name in targets.quantize}
    for name, layer in originals.items():
        if not torch.isfinite(layer.weight).all():
            raise ValueError(f"layer {name!r} has NaN/Inf weights; fix the float model before quantizing it.")
    _check_group_size(originals, config)
    attach_default_noise_context(model, schedule)
    calls = None
    if calibrate_acts or method.needs_calibration:
        calls = record_denoiser_calls(model, calibrate, config.calibration)

    layers = {}
    for name in tqdm(targets.quantize, desc="quantize", disable=not progress, leave=False):
        layer = originals[name]
        layers[name] = quant_layer_class(layer).from_float(layer, config.weights, config.activations)
        model.set_submodule(name, layers[name].to(layer.weight.device))
    attach_float_weights(layers, originals)
    try:
        if calibrate_acts:
            # float weights; observing quantizers pass their inputs through unchanged: the float model
            with layer_paths(layers.values(), float_weight=True, quantize_inputs=True):
                calibrate_activations(model, partial(replay, calls=calls))
        method.fn(model, layers, config, calls)
    except BaseException:
        for name, layer in originals.items():  # leave the float model as it was
            model.set_submodule(name, layer)
        raise
    finally:
        release_float_weights(layers.values())
    model.diffquant_config = config
    notify_quantized(model)
    return model


def attach_default_noise_context(model: nn.Module, schedule: Any = None) -> None:
    """Publish each call's noise level when the architecture's timestep argument is known (or a
    schedule is given); a no-op for generic modules without a timestep."""
    if schedule is not None or get_arch_spec(model).timestep_arg is not None:
        attach_noise_context(model, schedule)


def _check_group_size(layers: dict[str, nn.Module], config: QuantConfig) -> None:
    group = config.weights.group_size if config.weights.granularity == "group" else None
    if config.weights.format != "int" or group is None or config.weights.fallback_granularity:
        return
    bad = {name: layer.weight[0].numel() for name, layer in layers.items() if layer.weight[0].numel() % group}
    if bad:
        listed = ", ".join(f"{name} ({size})" for name, size in list(bad.items())[:6])
        raise ValueError(
            f"group_size {group} does not divide the flattened input size of {len(bad)} layer(s): {listed}"
            f"{' ...' if len(bad) > 6 else ''}. Choose a group size that divides them, keep those layers out "
            "with QuantConfig.exclude, or set WeightQuantConfig(fallback_granularity='channel')."
        )


@torch.no_grad()
def calibrate_activations(model: nn.Module, calibrate: Calibrate) -> None:
    """Run ``calibrate(model)`` with every calibratable activation quantizer observing, then fix ranges.

    Raises:
        ValueError: if some quantized layer received no data, or the data contain NaN/Inf.
    """
    quantizers = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, ActivationQuantizer) and m.needs_calibration
    ]
    if not quantizers:
        raise ValueError("model has no activation quantizer to calibrate.")
    for name, quantizer in quantizers:
        quantizer.start_calibration(name.removesuffix(".input_quant"))
    try:
        calibrate(model)
    finally:
        for _, quantizer in quantizers:
            quantizer.stop_observing()
    for _, quantizer in quantizers:
        quantizer.finish_calibration()


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every QuantLinear / QuantConv2d of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if is_quantized_layer(m)}


def weight_bits_per_parameter(model: nn.Module) -> float:
    """Stored bits per weight over all Linear/Conv2d weights (float layers count their dtype's bits).

    Any layer holding a packed ``qweight`` counts as quantized (QuantLinear, TuneQDM's TQ layers, ...).
    """
    bits, count = 0.0, 0
    for module in model.modules():
        if isinstance(getattr(module, "qweight", None), PackedWeight):
            bits += 8 * module.qweight.storage_bytes
            count += module.qweight.numel
        elif quant_layer_class(module) is not None:
            bits += module.weight.numel() * module.weight.element_size() * 8
            count += module.weight.numel()
    if count == 0:
        raise ValueError("model has no Linear/Conv2d weights.")
    return bits / count
