"""``quantize_``: the one in-place verb, and the registry of weight quantization methods.

Weight methods register themselves with :func:`register_weight_method`; activation modes register
themselves as :class:`~diffquant.nn.ActivationQuantizer` subclasses. A config picks one of each, so
methods compose freely and adding one never edits this file.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from diffquant.config import ActivationQuantConfig, QuantConfig, WeightQuantConfig
from diffquant.errors import NumericalWarning
from diffquant.layer_swap import replace_layers
from diffquant.models import get_arch_spec
from diffquant.nn.act_quant import ActivationQuantizer
from diffquant.nn.packed import PackedWeight
from diffquant.nn.qmodules import is_quantized_layer, quant_layer_class
from diffquant.noise import attach_noise_context, noise_context_of, restore_noise_context
from diffquant.ptq.calibration import DenoiserCall, record_denoiser_calls, replay
from diffquant.ptq.paths import calibrating, layer_paths
from diffquant.targeting import LayerQuant, select_targets

Calibrate = Callable[[nn.Module], Any]
"""A function that runs the model on representative inputs (its return value is ignored)."""

WeightMethod = Callable[
    [nn.Module, dict[str, nn.Module], dict[str, WeightQuantConfig], list[DenoiserCall] | None], None
]
"""``(model, quantized_layers_by_name, weight_config_by_name, calibration_calls) -> None``.

A method gets the layers whose (possibly overridden) weight config names it. Every targeted layer
starts from round-to-nearest weights; while the method runs its float weight is
:func:`diffquant.ptq.paths.float_weight_of` ``(layer)``; a calibrated method replaces ``layer.qweight``."""


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
        TypeError: if ``model`` is not a module, ``config`` not a :class:`QuantConfig`, or
            ``calibrate`` not callable.
        ValueError: if the model is already quantized, a method or mode is unknown, calibration
            is needed but missing or empty, a weight or bias contains NaN/Inf, or a layer has no
            weights (meta device). On any error the model is left exactly as it was.

    Warns:
        NumericalWarning: a layer lost precision its format should keep (named in the message).

    Example:
        >>> import torch, diffquant
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> cfg = diffquant.QuantConfig(weights=diffquant.WeightQuantConfig(bits=4, granularity="group",
        ...                                                              group_size=32))
        >>> _ = diffquant.quantize_(model, cfg)
        >>> type(model[0]).__name__
        'QuantLinear'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a diffquant.QuantConfig, got {type(config).__name__}.")
    if calibrate is not None and not callable(calibrate):
        raise TypeError(f"calibrate must be a function fn(model), got {type(calibrate).__name__}.")
    if getattr(model, "diffquant_config", None) is not None or any(map(is_quantized_layer, model.modules())):
        raise ValueError("model is already quantized; quantize a fresh copy of the float model instead.")
    calibrated = _calibration_needer(config)
    if calibrated is not None and calibrate is None:
        raise ValueError(
            f"{calibrated} needs calibration data: pass calibrate=fn, where fn(model) runs the float model "
            "on representative inputs (e.g. a few sampling runs)."
        )

    targets = select_targets(model, config)
    originals = {name: model.get_submodule(name) for name in targets.quantize}
    for name, layer in originals.items():
        if layer.weight.is_meta:
            raise ValueError(
                f"layer {name!r} is on the meta device (no weights); load the model's weights before quantizing."
            )
        for what, tensor in (("weights", layer.weight), ("bias", layer.bias)):
            if tensor is not None and not torch.isfinite(tensor).all():
                raise ValueError(
                    f"layer {name!r} has NaN/Inf {what}; fix the float model before quantizing it."
                )
    _check_group_size(originals, targets.configs)
    with _rolled_back_on_error(model, originals):
        attach_default_noise_context(model, schedule)
        calls = None
        if calibrated is not None:
            calls = record_denoiser_calls(model, calibrate, config.calibration)

        def build(name: str, layer: nn.Module) -> nn.Module:
            settings = targets.configs[name]
            quantized = quant_layer_class(layer).from_float(layer, settings.weights, settings.activations)
            _warn_numerical_loss(name, quantized)
            return quantized.to(layer.weight.device)

        names = tqdm(targets.quantize, desc="quantize", disable=not progress, leave=False)
        layers = replace_layers(model, names, build)
        with calibrating({layers[name]: originals[name].weight for name in layers}):
            if any(
                s.activations is not None and _activation_class(s.activations).needs_calibration
                for s in targets.configs.values()
            ):
                # float weights; observing quantizers pass their inputs through unchanged: the float model
                with layer_paths(layers.values(), float_weight=True, quantize_inputs=True):
                    calibrate_activations(model, partial(replay, calls=calls))
            for method, names in _method_groups(targets.configs):
                method.fn(
                    model,
                    {n: layers[n] for n in names},
                    {n: targets.configs[n].weights for n in names},
                    calls,
                )
    model.diffquant_config = config
    notify_quantized(model)
    return model


def _settings(config: QuantConfig) -> Iterator[tuple[WeightQuantConfig, ActivationQuantConfig | None]]:
    """Every (weights, activations) pair ``config`` can give a layer: its own and its overrides'."""
    yield config.settings()
    for override in config.overrides:
        if not override.keep_fp:
            yield config.settings(override)


def _weight_method(name: str) -> _Method:
    method = _WEIGHT_METHODS.get(name)
    if method is None:
        raise ValueError(f"unknown weight method {name!r}; registered: {list(weight_methods())}.")
    return method


def _activation_class(config: ActivationQuantConfig) -> type[ActivationQuantizer]:
    cls = ActivationQuantizer.registry.get(config.mode)
    if cls is None:
        raise ValueError(
            f"unknown activation mode {config.mode!r}; registered: {sorted(ActivationQuantizer.registry)}."
        )
    return cls


def _calibration_needer(config: QuantConfig) -> str | None:
    """What in ``config`` needs calibration data (for the error message), or ``None``; raises on an
    unknown weight method or activation mode."""
    needers = []
    for weights, activations in _settings(config):
        if activations is not None and _activation_class(activations).needs_calibration:
            needers.append(f"activation mode {activations.mode!r}")
        if _weight_method(weights.method).needs_calibration:
            needers.append(f"weight method {weights.method!r}")
    return needers[0] if needers else None


def needs_calibration(config: QuantConfig) -> bool:
    """Whether :func:`quantize_` needs ``calibrate=`` for ``config`` (a calibrated activation mode or
    weight method, in the config itself or in one of its overrides).

    Raises:
        ValueError: on an unknown weight method or activation mode.
    """
    return _calibration_needer(config) is not None


def _method_groups(configs: dict[str, LayerQuant]) -> list[tuple[_Method, list[str]]]:
    """Layers grouped by weight method; uncalibrated methods (final weights) run first, so a calibrated
    method sees the other layers at their final weights."""
    groups: dict[str, list[str]] = {}
    for name, settings in configs.items():
        groups.setdefault(settings.weights.method, []).append(name)
    ordered = sorted(groups.items(), key=lambda item: _weight_method(item[0]).needs_calibration)
    return [(_weight_method(method), names) for method, names in ordered]


@contextmanager
def _rolled_back_on_error(model: nn.Module, originals: dict[str, nn.Module]) -> Iterator[None]:
    """On any exception inside, put every original layer and the previous noise context back: a failed
    ``quantize_`` leaves the model exactly as it was (and quantizable again)."""
    previous_context = noise_context_of(model)
    try:
        yield
    except BaseException:
        for name, layer in originals.items():
            model.set_submodule(name, layer)
        restore_noise_context(model, previous_context)
        raise


def _warn_numerical_loss(name: str, layer: nn.Module) -> None:
    message = layer.qweight.numerical_warning()
    if message is not None:
        warnings.warn(f"layer {name!r}: {message}", NumericalWarning, stacklevel=3)


def attach_default_noise_context(model: nn.Module, schedule: Any = None) -> None:
    """Publish each call's noise level when the architecture's timestep argument is known (or a
    schedule is given); a no-op for generic modules without a timestep."""
    if schedule is not None or get_arch_spec(model).timestep_arg is not None:
        attach_noise_context(model, schedule)


def _check_group_size(layers: dict[str, nn.Module], configs: dict[str, LayerQuant]) -> None:
    bad: dict[int, dict[str, int]] = {}  # group size -> {layer: flattened input size}
    for name, layer in layers.items():
        weights = configs[name].weights
        if weights.format != "int" or weights.granularity != "group" or weights.fallback_granularity:
            continue
        if layer.weight[0].numel() % weights.group_size:
            bad.setdefault(weights.group_size, {})[name] = layer.weight[0].numel()
    if bad:
        problems = "; ".join(
            f"group_size {group} does not divide the flattened input size of {len(sizes)} layer(s): "
            + ", ".join(f"{name} ({size})" for name, size in list(sizes.items())[:6])
            + (" ..." if len(sizes) > 6 else "")
            for group, sizes in bad.items()
        )
        raise ValueError(
            f"{problems}. Choose a group size that divides them, keep those layers out with "
            "QuantConfig.exclude, give them another config with QuantConfig.overrides, or set "
            "WeightQuantConfig(fallback_granularity='channel')."
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
