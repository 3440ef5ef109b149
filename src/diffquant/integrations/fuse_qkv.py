"""``fuse_qkv_projections`` that keeps the fused projections quantized.

diffusers fuses ``to_q``/``to_k``/``to_v`` into one ``nn.Linear`` built from their ``.weight`` — for a
quantized layer that is the dequantized weight, so fusing would silently un-quantize the model. Here the
fused ``to_qkv`` / ``to_kv`` / ``to_added_qkv`` is a :class:`~diffquant.nn.QuantLinear` whose packed
weight is the row-wise concatenation of the parts' integer codes and scales: it dequantizes to exactly
``torch.cat`` of the parts' dequantized weights. Fusable: INT weights with the same bit-width, symmetry
and number of scale groups per row (a per-tensor scale is repeated per row), and identical input
quantizers. NF4 (block-wise absmax over the flattened weight) and mixed float / quantized parts raise.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from diffquant.nn.packed import IntPackedWeight
from diffquant.nn.qmodules import QuantLinear, is_quantized_layer


def _fusion_groups(attention: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    """``(fused name, part names)`` the diffusers ``fuse_projections`` of ``attention`` builds."""
    cross = bool(getattr(attention, "is_cross_attention", False))
    groups = [("to_kv", ("to_k", "to_v")) if cross else ("to_qkv", ("to_q", "to_k", "to_v"))]
    groups.append(("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")))
    return [
        (fused, parts)
        for fused, parts in groups
        if all(getattr(attention, p, None) is not None for p in parts)
    ]


def _same_input_quant(layers: list[QuantLinear], where: str) -> nn.Module | None:
    quants = [layer.input_quant for layer in layers]
    if all(q is None for q in quants):
        return None
    first = quants[0]
    same = all(
        q is not None
        and q.meta() == first.meta()
        and all(
            torch.equal(a, b)
            for a, b in zip(q.state_dict().values(), first.state_dict().values(), strict=True)
        )
        for q in quants
    )
    if not same:
        raise ValueError(
            f"cannot fuse {where}: its parts quantize their input differently (different activation "
            "quantizers or ranges). Fuse the float model, then quantize it."
        )
    return copy.deepcopy(first)


def fuse_quant_linears(layers: list[QuantLinear], where: str = "projections") -> QuantLinear:
    """One :class:`QuantLinear` computing ``torch.cat([layer(x) for layer in layers], -1)``.

    Raises:
        ValueError: if a part is not a ``QuantLinear`` with INT weights, or the parts differ in input
            size, bits, symmetry, scale groups per row, bias presence or input quantizer.
    """
    if not all(isinstance(layer, QuantLinear) for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers})
        raise ValueError(
            f"cannot fuse {where}: its parts are {kinds}; fusing needs every part quantized (QuantLinear). "
            "Quantize all of them or none (QuantConfig.exclude), or fuse the float model before quantizing."
        )
    packs = [layer.qweight for layer in layers]
    if not all(isinstance(p, IntPackedWeight) for p in packs):
        raise ValueError(
            f"cannot fuse {where}: NF4 weights are scaled in blocks over the flattened weight, so parts cannot "
            "be concatenated exactly. Fuse the float model (fuse_qkv_projections()), then quantize it."
        )
    scales = [p.scale.expand(p.shape[0], p.scale.shape[1]) for p in packs]  # (out_i, n_groups)
    first = packs[0]
    if any(
        (p.bits, p.symmetric, p.shape[1], s.shape[1])
        != (first.bits, first.symmetric, first.shape[1], scales[0].shape[1])
        for p, s in zip(packs, scales, strict=True)
    ):
        raise ValueError(
            f"cannot fuse {where}: its parts differ in bits, symmetry, input size or scale groups "
            f"({[p.meta() for p in packs]}). Fuse the float model, then quantize it."
        )
    if len({layer.bias is None for layer in layers}) != 1:
        raise ValueError(f"cannot fuse {where}: some parts have a bias and some do not.")
    codes = torch.cat([p.int_codes() for p in packs])  # (sum out_i, in)
    zero_points = (
        torch.cat([p.zero_point.expand_as(s) for p, s in zip(packs, scales, strict=True)])
        if not first.symmetric
        else torch.zeros(0)
    )
    qweight = IntPackedWeight.from_codes(
        tuple(codes.shape), codes, torch.cat(scales), zero_points, first.bits, first.symmetric
    )
    bias = torch.cat([layer.bias for layer in layers]) if layers[0].bias is not None else None
    fused = QuantLinear(qweight, bias, _same_input_quant(layers, where), first.shape[1], codes.shape[0])
    return fused.to(first.qdata.device)


class QuantizedFuseQKV:
    """``model.fuse_qkv_projections`` on a quantized diffusers model (installed by ``mark_quantized``).

    Every fusion is planned (and checked) before the model changes; then diffusers' own
    ``fuse_qkv_projections`` runs (attention processors, flags) and the float fused projections it
    built from quantized parts are replaced by quantized ones.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        plan = []
        for name, attention in self.model.named_modules():
            if not hasattr(attention, "fuse_projections"):
                continue
            for fused_name, parts in _fusion_groups(attention):
                layers = [getattr(attention, p) for p in parts]
                if any(map(is_quantized_layer, layers)):
                    plan.append((attention, fused_name, fuse_quant_linears(layers, f"{name}.{fused_name}")))
        type(self.model).fuse_qkv_projections(self.model, *args, **kwargs)
        for attention, fused_name, layer in plan:
            if isinstance(getattr(attention, fused_name, None), nn.Linear):
                setattr(attention, fused_name, layer)
