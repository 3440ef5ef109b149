"""TALSQ: trainable per-timestep activation step sizes (EfficientDM, He et al., ICLR 2024, §3.2).

Activation ranges of a diffusion model move with the noise level, so EfficientDM gives every layer
one (step, zero point) per sampling step, initialised from calibration and trained with LSQ during
fine-tuning. The table is :class:`~diffquant.nn.StepTableActivationQuantizer` (activation mode
``"step_table"``). The reference selects the entry with a call counter, which is wrong under
classifier-free guidance and multi-evaluation solvers; here each sample uses the entry of its own
timestep, read from the noise-level context (:mod:`diffquant.noise`), so a training batch that mixes
timesteps updates exactly the entries of the timesteps it contains.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from diffquant.nn.act_step_table import StepTableActivationQuantizer
from diffquant.nn.qmodules import is_quantized_layer


def enable_talsq(model: nn.Module, timesteps: Any = None) -> dict[str, StepTableActivationQuantizer]:
    """Make the step sizes of every quantized layer's step-table activation quantizer trainable (LSQ).

    Only the per-timestep step sizes (``scale``) train; the zero points keep their calibrated values.

    Args:
        model: a model quantized with ``ActivationQuantConfig(mode="step_table")`` (with or without
            QALoRA adapters).
        timesteps: optionally re-tabulate every table at these timesteps first (e.g. the sampler's
            ``scheduler.timesteps``: one entry per sampling step, as in EfficientDM), each entry
            copied from the nearest calibrated timestep.

    Returns:
        ``{layer name: quantizer}`` of the tables made trainable.

    Raises:
        ValueError: if some quantized layer's inputs are quantized in another mode, or no layer has a
            step table, with how to calibrate one.

    Example:
        >>> cfg = QuantConfig(weights=WeightQuantConfig(bits=4),
        ...                   activations=ActivationQuantConfig(bits=4, mode="step_table"))
        >>> diffquant.quantize_(unet, cfg, calibrate=run_sampler, schedule=scheduler)  # doctest: +SKIP
        >>> tables = enable_talsq(unet)  # doctest: +SKIP
    """
    tables: dict[str, StepTableActivationQuantizer] = {}
    other: dict[str, str] = {}
    for name, module in model.named_modules():
        if not is_quantized_layer(module) or module.input_quant is None:
            continue
        quantizer = module.input_quant
        if isinstance(quantizer, StepTableActivationQuantizer):
            tables[name] = quantizer
        else:
            other[name] = quantizer.mode
    if other or not tables:
        found = (
            f"{len(other)} layer(s) quantize their inputs in another mode, e.g. "
            + ", ".join(f"{n} ({mode!r})" for n, mode in list(other.items())[:3])
            if other
            else "no quantized layer quantizes its inputs"
        )
        raise ValueError(
            f"TALSQ trains per-timestep activation step tables, but {found}. Quantize the float model with "
            "ActivationQuantConfig(bits=..., mode='step_table') and calibrate=fn (fn runs the float "
            "sampler, e.g. diffquant.bench.demo.calibration_fn(settings)), plus schedule=scheduler."
        )
    for quantizer in tables.values():
        if timesteps is not None:
            quantizer.resample(timesteps)
        quantizer.make_learnable()
        quantizer.scale.requires_grad_(True)
        quantizer.zero_point.requires_grad_(False)  # LSQ learns the step; the zero point stays calibrated
    return tables
