"""peft LoRA over diffquant's ``QuantLinear`` / ``QuantConv2d``: an unmerged float side branch.

``y = base(x) + B(A(dropout(x))) · scaling`` where ``base`` is the frozen quantized layer (its packed
weight is never touched) and ``A``, ``B`` are float ``nn.Linear`` / ``nn.Conv2d`` — QLoRA for diffusion
models, for every weight format (INT8 / INT4 / INT2 / NF4). ``add_adapter``, ``load_lora_weights``,
``set_adapters``, ``disable_adapters`` and ``unload_lora_weights`` work as on float layers.

Merging is refused: ``W₀ + BA`` is not representable in the packed format without re-quantizing,
which would change the base layer for good and make ``unmerge`` impossible (``fuse_lora`` raises
with this explanation).

Registration: peft dispatches layers only through per-config ``LoraConfig._register_custom_module``
(diffusers builds its own ``LoraConfig`` inside ``load_lora_weights``), so :func:`register` puts a
dispatcher for diffquant layers in front of ``peft.tuners.lora.model.LoraModel._create_new_module``;
every other layer goes to peft's own dispatchers unchanged. ``import diffquant`` runs it once peft's
LoRA model is imported.
"""

from __future__ import annotations

from typing import Any

from peft.tuners.lora import LoraConfig
from peft.tuners.lora.layer import Conv2d as LoraConv2d
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from diffquant.nn.qmodules import QuantConv2d, QuantLinear

__all__ = ["LoraQuantConv2d", "LoraQuantLinear", "dispatch_diffquant", "register"]


def _refuse_merge(layer: nn.Module) -> None:
    raise ValueError(
        f"cannot merge a LoRA adapter into {type(layer.get_base_layer()).__name__}: its weight is stored "
        "quantized, and W + BA would have to be re-quantized, changing the base layer for good (no unmerge). "
        "Keep the adapter unmerged (it runs as a side branch), or merge into the float model and quantize "
        "the result with diffquant.quantize_."
    )


class LoraQuantLinear(LoraLinear):
    """LoRA on a :class:`~diffquant.nn.QuantLinear` (unmerged; ``merge`` raises ``ValueError``)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any):
        if config.use_dora or kwargs.get("use_dora"):
            raise ValueError("DoRA over a quantized layer is not supported; use plain LoRA (use_dora=False).")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Refused (see the module docstring)."""
        _refuse_merge(self)


class LoraQuantConv2d(LoraConv2d):
    """LoRA on a :class:`~diffquant.nn.QuantConv2d`: ``A`` is a float conv with the base kernel, stride
    and padding, ``B`` a 1×1 conv (unmerged; ``merge`` raises ``ValueError``)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any):
        if config.use_dora or kwargs.get("use_dora"):
            raise ValueError("DoRA over a quantized layer is not supported; use plain LoRA (use_dora=False).")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_channels, module.out_channels

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any):
        """peft's conv ``update_layer`` builds ``type(base_layer)`` adapters; ours are float ``nn.Conv2d``."""
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        base = self.get_base_layer()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = (
            nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0.0 else nn.Identity()
        )
        self.lora_A[adapter_name] = nn.Conv2d(
            self.in_features, r, base.kernel_size, base.stride, base.padding, bias=False
        )
        self.lora_B[adapter_name] = nn.Conv2d(
            r, self.out_features, 1, 1, groups=base.groups, bias=config.lora_bias
        )
        self.lora_bias[adapter_name] = config.lora_bias
        self.scaling[adapter_name] = lora_alpha / (r**0.5 if config.use_rslora else r)
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = False
        if config.init_lora_weights:
            self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Refused (see the module docstring)."""
        _refuse_merge(self)


_LORA_LAYER_FOR: dict[type[nn.Module], type[nn.Module]] = {
    QuantLinear: LoraQuantLinear,
    QuantConv2d: LoraQuantConv2d,
}


def dispatch_diffquant(
    target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any
) -> nn.Module | None:
    """peft dispatcher: a LoRA layer for a diffquant layer, ``None`` for anything else."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    for layer_cls, lora_cls in _LORA_LAYER_FOR.items():
        if isinstance(base, layer_cls):
            return lora_cls(target, adapter_name, config=config, **kwargs)
    return None


def register() -> None:
    """Put :func:`dispatch_diffquant` in front of peft's LoRA dispatchers (idempotent)."""
    from peft.tuners.lora.model import LoraModel

    original = LoraModel._create_new_module
    if getattr(original, "_diffquant", False):
        return

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        new_module = dispatch_diffquant(target, adapter_name, lora_config, **kwargs)
        return new_module if new_module is not None else original(lora_config, adapter_name, target, **kwargs)

    _create_new_module._diffquant = True
    LoraModel._create_new_module = staticmethod(_create_new_module)


register()
