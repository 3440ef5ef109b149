"""diffquant inside the Hugging Face stack: a diffusers quantization backend and peft LoRA layers.

``import diffquant`` arranges (without importing diffusers or peft) that

- once ``diffusers.quantizers.auto`` is imported, ``quant_method="diffquant"`` is registered
  (:class:`DiffQuantConfig`, :class:`DiffQuantQuantizer`);
- once ``peft.tuners.lora.model`` is imported, LoRA targets ``QuantLinear`` / ``QuantConv2d``
  (:mod:`diffquant.integrations.peft`).

Importing ``diffquant.integrations.diffusers`` or ``diffquant.integrations.peft`` registers directly.
"""

from diffquant.integrations._import_hooks import when_imported


def _register_diffusers() -> None:
    from diffquant.integrations.diffusers_quantizer import register

    register()


def _register_peft() -> None:
    from diffquant.integrations.peft import register

    register()


def install_hooks() -> None:
    """Register with diffusers / peft now if imported, else right after they are (idempotent)."""
    when_imported("diffusers.quantizers.auto", _register_diffusers)
    when_imported("peft.tuners.lora.model", _register_peft)
