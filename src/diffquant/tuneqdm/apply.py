"""Swap a denoiser's Linear/Conv2d layers for TuneQDM layers, for training or for inference."""

from __future__ import annotations

import re

from torch import nn

from diffquant.layer_swap import replace_layers
from diffquant.targeting import select_targets
from diffquant.tuneqdm.config import TuneQDMConfig
from diffquant.tuneqdm.layers import TQConv2d, TQLinear, _TQLayer, is_tuneqdm_layer

__all__ = [
    "apply_tuneqdm",
    "delta_param_groups",
    "quantize_model",
    "trainable_delta_parameters",
    "tuneqdm_config",
    "tuneqdm_layers",
]


def _target_names(model: nn.Module, config: TuneQDMConfig) -> tuple[str, ...]:
    """Names of the Linear/Conv2d layers ``config`` quantizes, in module order: the selection of
    :func:`diffquant.targeting.select_targets` (include / exclude / keep_fp and the architecture's
    defaults), as for :func:`diffquant.quantize_`."""
    if any(is_tuneqdm_layer(m) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} already has TuneQDM layers; apply TuneQDM once, to the float model."
        )
    return select_targets(model, config.selection).quantize


def _swap_layers(model: nn.Module, config: TuneQDMConfig) -> None:
    if not isinstance(config, TuneQDMConfig):
        raise TypeError(f"config must be a TuneQDMConfig, got {type(config).__name__}.")

    def build(name: str, module: nn.Module) -> nn.Module:
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            raise ValueError(
                f"layer {name!r} uses padding_mode={module.padding_mode!r}; TQConv2d supports 'zeros' only. "
                f"Add {re.escape(name)!r} to TuneQDMConfig.exclude to keep it in float."
            )
        return (TQConv2d if isinstance(module, nn.Conv2d) else TQLinear).from_float(module, config)

    replace_layers(model, _target_names(model, config), build)  # all layers built before the first swap


def apply_tuneqdm(model: nn.Module, config: TuneQDMConfig) -> nn.Module:
    """Prepare ``model`` for TuneQDM fine-tuning, in place: only the TuneQDM scales stay trainable.

    Every selected ``nn.Linear`` / ``nn.Conv2d`` (``config.include`` / ``exclude`` / ``keep_fp``, the
    architecture's full-precision layers by default) becomes a
    `TQLinear` / `TQConv2d` with frozen packed INT weights; every other parameter of the model is
    frozen (``requires_grad=False``). The trainable tensors are ``delta_out`` (``train_delta_out``) and
    ``delta_in`` (``train_delta_in``) of each layer, ``(num_experts, C)`` each — see
    `trainable_delta_parameters`. With ``num_experts > 1`` tell the layers the timestep of each sample
    with `register_tas_pre_hook` (once) or `set_timestep` (every step).

    Ryu, Lim, Shim, "Memory-Efficient Fine-Tuning for Quantized Diffusion Model", ECCV 2024.

    Args:
        model: The float denoiser (e.g. a diffusers ``UNet2DConditionModel``).
        config: What to quantize and train.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: the model already has TuneQDM layers, an ``include`` pattern matches no
            Linear/Conv2d layer, nothing is selected, or a selected conv has an unsupported padding mode.
        TypeError: ``config`` is not a `TuneQDMConfig`.

    Example:
        >>> from diffquant.models.tiny import tiny_unet2d
        >>> unet = apply_tuneqdm(tiny_unet2d(), TuneQDMConfig(num_experts=4, train_delta_in=True))
        >>> opt = torch.optim.AdamW(trainable_delta_parameters(unet), lr=3e-6)
    """
    _swap_layers(model, config)
    model.requires_grad_(False)
    for p in trainable_delta_parameters(model):
        p.requires_grad_(True)
    return model


def quantize_model(model: nn.Module, config: TuneQDMConfig) -> nn.Module:
    """The same layer swap as `apply_tuneqdm`, for inference: no tensor requires gradients afterwards
    in the new layers, and the rest of the model is left as it is. Load trained scales next with
    `load_delta_state` (the config usually comes from `load_delta_config`).

    Returns:
        ``model`` itself.

    Raises:
        ValueError, TypeError: as `apply_tuneqdm`.
    """
    _swap_layers(model, config)
    for p in trainable_delta_parameters(model):
        p.requires_grad_(False)
    return model


def tuneqdm_layers(model: nn.Module) -> dict[str, _TQLayer]:
    """The `TQLinear` / `TQConv2d` layers of ``model`` by module name, in module order."""
    return {name: m for name, m in model.named_modules() if is_tuneqdm_layer(m)}


def tuneqdm_config(model: nn.Module) -> TuneQDMConfig:
    """The config of ``model``'s TuneQDM layers.

    Raises:
        ValueError: the model has no TuneQDM layers, or layers built with different configs.
    """
    configs = {layer.config for layer in tuneqdm_layers(model).values()}
    if not configs:
        raise ValueError(
            f"{type(model).__name__} has no TuneQDM layers; call diffquant.tuneqdm.apply_tuneqdm(model, "
            "config) (training) or quantize_model(model, config) (inference) first."
        )
    if len(configs) > 1:
        raise ValueError(
            f"{type(model).__name__} mixes TuneQDM layers of {len(configs)} configs; apply one config once."
        )
    return configs.pop()


def trainable_delta_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every ``delta_out`` / ``delta_in`` parameter of the TuneQDM layers, in module order (the tensors
    `apply_tuneqdm` trains and `save_delta_state` saves)."""
    return [
        p
        for layer in tuneqdm_layers(model).values()
        for p in (layer.delta_out, layer.delta_in)
        if p is not None
    ]


def delta_param_groups(model: nn.Module, lr: float) -> list[dict]:
    """Optimizer parameter groups for the deltas with scale-relative learning rates.

    ``delta_in`` starts at 1 and takes ``lr``; each layer's ``delta_out`` starts at its min-max step
    (about ``max|W| / 127`` at 8 bits, 16× larger at 4 bits) and takes ``lr`` times that layer's mean
    step, so one Adam update changes every delta by about the same *fraction* at every bit width (a single
    absolute rate that suits INT4 scales wipes out INT8 ones). Pass to any ``torch.optim`` optimizer.

    Example:
        >>> opt = torch.optim.AdamW(delta_param_groups(unet, lr=1e-3), weight_decay=0.0)  # doctest: +SKIP
    """
    groups: list[dict] = []
    for layer in tuneqdm_layers(model).values():
        if layer.delta_out is not None:
            step = float(layer.qweight.scale.float().mean())
            groups.append({"params": [layer.delta_out], "lr": lr * step})
        if layer.delta_in is not None:
            groups.append({"params": [layer.delta_in], "lr": lr})
    if not groups:
        raise ValueError("model has no trainable TuneQDM deltas; apply_tuneqdm(model, config) first.")
    return groups
