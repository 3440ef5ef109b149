"""``DiffQuantQuantizer``: the diffusers ``DiffusersQuantizer`` lifecycle for diffquant.

diffusers 0.42 has no public registration hook for quantization backends (transformers has
``register_quantizer``); :func:`register` adds ``"diffquant"`` to
``diffusers.quantizers.auto.AUTO_QUANTIZER_MAPPING`` and ``AUTO_QUANTIZATION_CONFIG_MAPPING``, the two
dicts ``from_pretrained`` and ``PipelineQuantizationConfig`` look backends up in. ``import diffquant``
arranges for it to run as soon as diffusers' quantizers are imported (see :mod:`diffquant.integrations`).

Lifecycle inside ``<Model>.from_pretrained``:

- float checkpoint + ``quantization_config=DiffQuantConfig(...)``: the float weights load as usual, then
  :func:`diffquant.quantize_` runs (calibration-free configs only);
- pre-quantized checkpoint (``config.json`` holds ``quantization_config`` with ``layers``): empty
  ``QuantLinear``/``QuantConv2d`` are swapped in on the meta model before loading, and their packed
  tensors load with their stored dtypes (scales stay float32 whatever ``torch_dtype`` says).

Marking: a quantized model carries ``model.hf_quantizer`` (this quantizer), ``model.config.quantization_config``
(a :class:`DiffQuantConfig`) and ``model.diffquant_config``. ``model.is_quantized`` is left ``False``:
diffusers uses that flag only to refuse ``.to(dtype)``, which would corrupt other backends' packed
weights; diffquant's packed weights and quantization parameters keep their dtypes through a cast
(the float bias and kept layers follow it), so ``pipe.to(torch.bfloat16)`` works.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from diffusers.quantizers.base import DiffusersQuantizer
from torch import nn

from diffquant.api import attach_default_noise_context, quantize_, quantized_layers, register_after_quantize
from diffquant.config import QuantConfig
from diffquant.integrations.diffusers_config import _DTYPES, DiffQuantConfig
from diffquant.integrations.fuse_qkv import QuantizedFuseQKV
from diffquant.nn.qmodules import _QuantLayer, quant_layer_class

QUANT_METHOD = "diffquant"
_STORED_DTYPE_MODULES = ("qweight", "input_quant")  # child names under a quantized layer


class DiffQuantQuantizer(DiffusersQuantizer):
    """Quantize at load time, or rebuild a diffquant-quantized diffusers model from its checkpoint."""

    requires_calibration = False
    # False: diffusers then passes a fresh list to _process_model_before_weight_loading (never the class
    # attribute), which that hook fills with the class's own fp32 modules plus ours.
    use_keep_in_fp32_modules = False

    def __init__(self, quantization_config: DiffQuantConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self._model: weakref.ReferenceType[nn.Module] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # a weak reference cannot be pickled, and a copy must not refresh its config from the original
        return {**self.__dict__, "_model": None}

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        """Refuse a calibrated config on a float checkpoint, and a pre-quantized config without layers."""
        config = self.quantization_config
        if self.pre_quantized and not config.layers:
            raise ValueError(
                "this checkpoint's quantization_config has no 'layers'; it was not written by "
                "diffquant's save_pretrained. Re-save the quantized model with model.save_pretrained(dir)."
            )
        if not self.pre_quantized:
            config.check_calibration_free()

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype | None:
        """Without a ``torch_dtype``, a pre-quantized checkpoint loads in the dtype it was saved in."""
        if torch_dtype is None and self.pre_quantized:
            return self.quantization_config.torch_dtype
        return torch_dtype

    def _process_model_before_weight_loading(
        self, model: nn.Module, keep_in_fp32_modules: list[str] | None = None, **kwargs: Any
    ) -> nn.Module:
        if keep_in_fp32_modules is not None:
            # diffusers casts every float tensor whose name has one of these parts to float32 instead of
            # torch_dtype: that is how scales and activation ranges keep their stored precision.
            wanted = [*(type(model)._keep_in_fp32_modules or []), *_STORED_DTYPE_MODULES]
            keep_in_fp32_modules.extend(m for m in wanted if m not in keep_in_fp32_modules)
        if self.pre_quantized:
            _swap_in_empty_layers(model, self.quantization_config.layers)
        return model

    def check_if_quantized_param(
        self, model: nn.Module, param_value: torch.Tensor, param_name: str, state_dict: dict, **kwargs: Any
    ) -> bool:
        """Packed tensors (codes, scales, ranges) of quantized layers load with their stored dtype."""
        if not self.pre_quantized:
            return False
        return any(part in param_name.split(".") for part in _STORED_DTYPE_MODULES)

    def create_quantized_param(
        self,
        model: nn.Module,
        param_value: torch.Tensor,
        param_name: str,
        target_device: Any,
        state_dict: dict,
        unexpected_keys: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Put a stored tensor in place as it is (no dtype conversion)."""
        module_name, _, tensor_name = param_name.rpartition(".")
        module = model.get_submodule(module_name)
        value = param_value.to(target_device)
        if tensor_name in module._parameters:
            module._parameters[tensor_name] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[tensor_name] = value

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        config = self.quantization_config
        if self.pre_quantized:
            model.diffquant_config = config.quant_config
            attach_default_noise_context(model)
        else:
            quantize_(model, config.quant_config)
        mark_quantized(model, self)
        return model

    @property
    def is_serializable(self) -> bool:
        """Always True. diffusers asks just before writing ``config.json``, so the layer table and
        compute dtype are refreshed here from the model as it is now (e.g. after ``.to(bfloat16)``)."""
        model = self._model() if self._model is not None else None
        if model is not None:
            _describe(model, self.quantization_config)
        return True

    @property
    def is_trainable(self) -> bool:
        """Quantized layers are frozen; LoRA adapters over them train (see ``diffquant.integrations.peft``)."""
        return True

    def _dequantize(self, model: nn.Module) -> nn.Module:
        for name, layer in quantized_layers(model).items():
            model.set_submodule(name, _float_layer(layer))
        del model.diffquant_config
        model.register_to_config(quantization_config=None)
        return model


def _swap_in_empty_layers(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    for name, meta in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(
                f"quantized layer {name!r} of this checkpoint does not exist in {type(model).__name__}: the "
                "quantization_config belongs to another model configuration."
            ) from err
        qcls = quant_layer_class(module)
        if (
            qcls is None
            or qcls.kind != meta.get("kind")
            or list(module.weight.shape) != meta["weight"]["shape"]
        ):
            raise ValueError(
                f"quantized layer {name!r} is a {meta.get('kind')} with weight {meta['weight']['shape']} in the "
                f"checkpoint, but the model has {type(module).__name__}: another model configuration."
            )
        with torch.device("cpu"):
            model.set_submodule(name, _QuantLayer.from_meta(meta))


def _float_layer(layer: _QuantLayer) -> nn.Module:
    weight = layer.weight
    if layer.kind == "linear":
        out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    else:
        out = nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            bias=layer.bias is not None,
        )
    out = out.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
    return out


def _compute_dtype(model: nn.Module) -> str | None:
    """The dtype of the model's float tensors outside quantized layers (bias of the first layer if none)."""
    inside = {
        id(t) for layer in quantized_layers(model).values() for t in (*layer.parameters(), *layer.buffers())
    }
    for tensor in model.parameters():
        if id(tensor) not in inside and tensor.is_floating_point():
            return _name_of(tensor.dtype)
    for layer in quantized_layers(model).values():
        if layer.bias is not None:
            return _name_of(layer.bias.dtype)
    return None


def _name_of(dtype: torch.dtype) -> str | None:
    return next((name for name, d in _DTYPES.items() if d == dtype), None)


def _describe(model: nn.Module, config: DiffQuantConfig) -> None:
    config.layers = {name: layer.meta() for name, layer in quantized_layers(model).items()}
    config.compute_dtype = _compute_dtype(model)


def mark_quantized(model: nn.Module, quantizer: DiffQuantQuantizer | None = None) -> nn.Module:
    """Mark a diffusers model quantized by diffquant so ``save_pretrained`` writes a diffquant checkpoint.

    ``diffquant.quantize_`` calls this for diffusers models; call it yourself only for a model quantized
    some other way (e.g. ``load_quantized``). A no-op for models that are not diffusers ``ModelMixin``.

    Raises:
        ValueError: if the model holds no diffquant-quantized layer.
    """
    if not hasattr(model, "register_to_config") or not hasattr(model, "save_pretrained"):
        return model
    config_obj: QuantConfig | None = getattr(model, "diffquant_config", None)
    if config_obj is None or not quantized_layers(model):
        raise ValueError("model holds no diffquant-quantized layer; call diffquant.quantize_ first.")
    if quantizer is None:
        quantizer = DiffQuantQuantizer(DiffQuantConfig(config_obj), pre_quantized=True)
    quantizer._model = weakref.ref(model)
    _describe(model, quantizer.quantization_config)
    model.hf_quantizer = quantizer
    model.quantization_method = QUANT_METHOD
    model.is_quantized = False  # see the module docstring: dtype casts are safe for diffquant layers
    model.register_to_config(quantization_config=quantizer.quantization_config)
    if hasattr(model, "fuse_qkv_projections"):
        model.fuse_qkv_projections = QuantizedFuseQKV(model)
    return model


def register() -> None:
    """Make ``quant_method="diffquant"`` known to diffusers, and mark diffusers models that
    :func:`diffquant.quantize_` quantizes (:func:`mark_quantized`).

    ``PipelineQuantizationConfig(quant_backend="diffquant", quant_kwargs=..., components_to_quantize=[...])``
    also checks transformers' config registry, so the config class is added there too; list only diffusers
    components (denoiser, VAE): transformers text encoders have no diffquant quantizer.

    Idempotent; ``import diffquant`` calls it once diffusers' quantizers are imported.
    """
    from diffusers.quantizers import auto

    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = DiffQuantQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = DiffQuantConfig
    try:  # PipelineQuantizationConfig(quant_backend=...) also looks the name up in transformers' configs
        from transformers.quantizers import auto as transformers_auto
    except ImportError:
        pass
    else:
        transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, DiffQuantConfig)
    register_after_quantize(_mark_if_diffusers)


def _mark_if_diffusers(model: nn.Module) -> None:
    if getattr(model, "hf_quantizer", None) is None:
        mark_quantized(model)


register()
