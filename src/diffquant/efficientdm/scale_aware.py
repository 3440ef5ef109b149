"""Scale-aware optimization: each layer's LoRA learning rate proportional to its weight step size.

EfficientDM (He et al., ICLR 2024, §3.2): under QALoRA a weight changes its quantized value only when
``W₀ + B·A`` crosses a rounding boundary, i.e. moves by about one step ``Δ_w``. Step sizes differ by
orders of magnitude between layers (and between 4- and 8-bit layers), so one learning rate is too
small to change anything in layers with a large step and too large for those with a small one. The
reference code sets each layer's LoRA learning rate to ``mean(Δ_w) / 2500``.

Normalisation here: ``lr_layer = base_lr · mean(Δ_layer) / mean_over_layers(mean(Δ))``, so a layer
with the average step size trains at ``base_lr`` and ``base_lr`` keeps the meaning it has without
scale awareness (``scale_aware=False`` gives every layer ``base_lr``). The reference's absolute
rule is ``reference_divisor=2500``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from diffquant.efficientdm.qalora import qalora_layers
from diffquant.nn.act_step_table import StepTableActivationQuantizer


def scale_aware_param_groups(
    model: nn.Module,
    base_lr: float,
    *,
    scale_aware: bool = True,
    step_lr: float = 1e-3,
    act_lr: float = 1e-3,
    reference_divisor: float | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for a model prepared by :func:`~diffquant.efficientdm.apply_qalora`.

    Groups (each carries a ``"name"`` key for logging):

    - ``lora:<layer>``: that layer's ``lora_A`` and ``lora_B`` at
      ``base_lr · mean(Δ_layer) / mean_l mean(Δ_l)`` (``base_lr`` when ``scale_aware=False``;
      ``mean(Δ_layer) / reference_divisor`` when that is given);
    - ``weight_step:<layer>``: the layer's weight step at ``step_lr · mean(Δ_layer)``;
    - ``act_step:<layer>``: a trainable activation step table (TALSQ, after
      :func:`~diffquant.efficientdm.enable_talsq`) at ``act_lr · mean(table)``;
    - ``other``: any other trainable parameter, at ``base_lr``.

    Step sizes get learning rates *relative to their size*: Adam moves a parameter by about its
    learning rate per iteration whatever the gradient's scale, and step sizes range from 1e-4
    (8-bit weights) to 1 (activations), so ``step_lr = 1e-3`` lets every step change by about 0.1 %
    per iteration. Frozen parameters are left out.

    Args:
        model: the model with QALoRA adapters.
        base_lr: LoRA learning rate of a layer with the average weight step.
        scale_aware: scale each layer's LoRA learning rate by its step size.
        step_lr: weight-step learning rate relative to the layer's mean step.
        act_lr: activation-table learning rate relative to the table's mean step.
        reference_divisor: use the reference's absolute rule ``lr = mean(Δ_layer) / divisor``
            (EfficientDM: 2500) instead of the normalised one.

    Raises:
        ValueError: if the model has no QALoRA adapter, or a learning rate is not positive.

    Example:
        >>> optimizer = torch.optim.AdamW(scale_aware_param_groups(unet, 1e-3))  # doctest: +SKIP
    """
    layers = qalora_layers(model)
    if not layers:
        raise ValueError("model has no QALoRA adapter; call diffquant.efficientdm.apply_qalora(model) first.")
    for name, value in (("base_lr", base_lr), ("step_lr", step_lr), ("act_lr", act_lr)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}.")
    if reference_divisor is not None and not reference_divisor > 0:
        raise ValueError(f"reference_divisor must be positive, got {reference_divisor!r}.")

    mean_step = {name: float(layer.step().detach().mean()) for name, layer in layers.items()}
    average = sum(mean_step.values()) / len(mean_step)
    groups: list[dict[str, Any]] = []
    for name, layer in layers.items():
        if reference_divisor is not None:
            lr = mean_step[name] / reference_divisor
        elif scale_aware:
            lr = base_lr * mean_step[name] / average
        else:
            lr = base_lr
        groups.append({"params": [layer.lora_A, layer.lora_B], "lr": lr, "name": f"lora:{name}"})
        groups.append(
            {"params": [layer.weight_step], "lr": step_lr * mean_step[name], "name": f"weight_step:{name}"}
        )
    for name, module in model.named_modules():
        if (
            isinstance(module, StepTableActivationQuantizer)
            and module.learnable
            and module.scale.requires_grad
        ):
            lr = act_lr * float(module.scale.detach().abs().mean())
            groups.append(
                {"params": [module.scale], "lr": lr, "name": f"act_step:{name.removesuffix('.input_quant')}"}
            )
    grouped = {id(p) for group in groups for p in group["params"]}
    for group in groups:
        group["params"] = [p for p in group["params"] if p.requires_grad]
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in grouped]
    if others:
        groups.append({"params": others, "lr": base_lr, "name": "other"})
    return [group for group in groups if group["params"]]
