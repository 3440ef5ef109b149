"""diffquant inside the Hugging Face stack: a diffusers quantization backend and peft LoRA layers.

``import diffquant`` arranges (without importing diffusers or peft) that

- once ``diffusers.quantizers.auto`` is imported, ``quant_method="diffquant"`` is registered
  (:class:`DiffQuantConfig`, :class:`DiffQuantQuantizer`);
- once ``peft.tuners.lora.model`` is imported, LoRA targets ``QuantLinear`` / ``QuantConv2d``
  (:mod:`diffquant.integrations.peft`).

Importing ``diffquant.integrations.diffusers`` or ``diffquant.integrations.peft`` registers directly.
"""

import importlib
import sys

from diffquant.integrations._import_hooks import when_imported


def _import_to_register(*modules: str):
    """A callback importing ``modules[0]``, whose import registers it — unless one of ``modules`` is
    already imported or being imported (it registers itself when its import finishes)."""

    def callback() -> None:
        if not any(name in sys.modules for name in modules):
            importlib.import_module(modules[0])

    return callback


def install_hooks() -> None:
    """Register with diffusers / peft now if imported, else right after they are (idempotent)."""
    when_imported(
        "diffusers.quantizers.auto",
        _import_to_register(
            "diffquant.integrations.diffusers_quantizer", "diffquant.integrations.diffusers_config"
        ),
    )
    when_imported("peft.tuners.lora.model", _import_to_register("diffquant.integrations.peft"))
