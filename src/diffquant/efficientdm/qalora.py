"""QALoRA: LoRA added to the dequantized weight *before* fake quantization, merged after training.

EfficientDM (He et al., ICLR 2024, §3.1) fine-tunes a post-training-quantized model through its
quantizer:

    W' = FakeQuant_s(W₀ + (α / r) · B·A),   FakeQuant_s(w) = (clamp(round(w / s) + z, qmin, qmax) − z) · s

with ``W₀`` the dequantized PTQ weight (frozen), ``A`` (``r × in``, Kaiming-uniform) and ``B``
(``out × r``, zeros) the LoRA factors, and the step ``s`` (per output channel, or per group: the PTQ
scale's shape) learned with LSQ (:func:`diffquant.quant.ste.lsq_fake_quantize`); the zero point stays
at its PTQ value. Since ``B = 0`` at the start, the wrapped model computes exactly what the PTQ model
did. For a Conv2d, ``A`` is a convolution with the original kernel size (``r × in × kh × kw``) and
``B`` is 1×1 (``out × r × 1 × 1``), so ``B·A`` is a kernel of the original shape.

Because the LoRA update lives inside the quantizer, :func:`merge_qalora` re-quantizes
``W₀ + (α/r)·B·A`` with the learned step into plain :class:`~diffquant.nn.QuantLinear` /
:class:`~diffquant.nn.QuantConv2d` layers: the fine-tuned model costs nothing extra at inference and
its outputs equal the unmerged model's exactly.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffquant.nn.act_timestep import TimestepActivationQuantizer
from diffquant.nn.packed import IntPackedWeight
from diffquant.nn.qmodules import QuantConv2d, QuantLinear, is_quantized_layer
from diffquant.quant import affine, ste

_MIN_STEP = 1e-8  # keeps a learned weight step positive (a step of 0 would divide by zero)


class QALoRALayer(nn.Module):
    """A :class:`~diffquant.nn.QuantLinear` / :class:`~diffquant.nn.QuantConv2d` with a QALoRA adapter.

    The wrapped layer (``base_layer``) keeps its bias, its input activation quantizer (applied first,
    as before), its convolution arguments and its packed weight, which is dequantized to ``W₀`` on the
    fly: no float copy of the frozen weight is kept. During training the fake-quantized weight is
    recomputed in the backward pass (activation checkpointing of the weight path), so only the weight
    the layer actually uses stays in memory between forward and backward, not LSQ's temporaries. A frozen
    input quantizer rounds with zero gradient, so the gradient passes it straight through (same
    values): every adapter trains, also those whose outputs reach the loss through later quantized
    layers. A trainable one (TALSQ) provides LSQ's gradients itself.

    Parameters (trainable):
        lora_A: ``(r, in)`` for Linear, ``(r, in, kh, kw)`` for Conv2d; Kaiming-uniform.
        lora_B: ``(out, r)`` for Linear, ``(out, r, 1, 1)`` for Conv2d; zeros.
        weight_step: ``float32 (out, n_groups)``, the PTQ weight scale (``(out, 1)`` per channel).

    Buffers (frozen):
        zero_point: ``int32 (out, n_groups)`` (zeros for symmetric weights).

    Args:
        base_layer: a quantized layer with an INT packed weight (Conv2d: ``groups == 1``).
        rank: LoRA rank ``r``.
        alpha: LoRA scaling numerator; the update is ``(alpha / rank) · B·A`` (default ``alpha = rank``).
    """

    def __init__(self, base_layer: QuantLinear | QuantConv2d, rank: int, alpha: float | None = None):
        super().__init__()
        reason = unsupported_reason(base_layer)
        if reason is not None:
            raise ValueError(f"cannot apply QALoRA to this layer: {reason}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}.")
        packed: IntPackedWeight = base_layer.qweight
        self.base_layer = base_layer
        self.rank = rank
        self.scaling = (alpha if alpha is not None else rank) / rank
        self.bits, self.symmetric = packed.bits, packed.symmetric
        self.qmin, self.qmax = packed.qmin, packed.qmax
        self.weight_shape = tuple(packed.shape)
        zero_point = (
            packed.zero_point.to(torch.int32)
            if not packed.symmetric
            else torch.zeros_like(packed.scale, dtype=torch.int32)
        )
        self.register_buffer("zero_point", zero_point)
        self.weight_step = nn.Parameter(packed.scale.detach().clone())
        out_channels, in_channels, *kernel = self.weight_shape  # kernel: [] for Linear, [kh, kw] for Conv2d
        device = packed.scale.device
        self.lora_A = nn.Parameter(torch.empty(rank, in_channels, *kernel, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_channels, rank, *(1 for _ in kernel), device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear / PEFT LoRA initialisation

    def delta_weight(self) -> Tensor:
        """``(alpha / r) · B·A`` in the weight's shape."""
        # (out, r) @ (r, in*kh*kw) -> (out, in*kh*kw); for a conv, 1x1 B after A is this kernel
        delta = self.lora_B.reshape(self.weight_shape[0], self.rank) @ self.lora_A.reshape(self.rank, -1)
        return (delta * self.scaling).reshape(self.weight_shape)

    def step(self) -> Tensor:
        """The weight step in use: ``weight_step`` kept positive, ``(out, n_groups)``."""
        return self.weight_step.clamp_min(_MIN_STEP)

    def _grouped_weight(self) -> Tensor:
        """``W₀ + (α/r)·B·A`` viewed as ``(out, n_groups, group_size)``."""
        w = self.base_layer.qweight.dequantize(torch.float32) + self.delta_weight()
        return w.reshape(w.shape[0], self.weight_step.shape[1], -1)  # (out, n_groups, group_size)

    def quantized_weight(self) -> Tensor:
        """``FakeQuant(W₀ + (α/r)·B·A)`` in the weight's shape, with LSQ gradients for the step."""
        wg = self._grouped_weight()
        w_hat = ste.lsq_fake_quantize(
            wg, self.step()[..., None], self.zero_point[..., None], self.qmin, self.qmax
        )  # (out, n_groups, group_size)
        return w_hat.reshape(self.weight_shape)

    def forward(self, x: Tensor) -> Tensor:
        base = self.base_layer
        x_q = base._quantize_input(x)
        frozen = x_q is not x and not any(p.requires_grad for p in base.input_quant.parameters())
        if frozen and torch.is_grad_enabled():
            # a frozen quantizer rounds (zero gradient): pass the gradient straight through to earlier
            # layers; the value is exactly x_q (x - x.detach() is exactly 0)
            x_q = x_q.detach() + (x - x.detach())
        x = x_q
        if torch.is_grad_enabled():  # recomputed in backward: LSQ's temporaries are not kept
            weight = checkpoint(self.quantized_weight, use_reentrant=False).to(x.dtype)
        else:
            weight = self.quantized_weight().to(x.dtype)
        bias = base.bias.to(x.dtype) if base.bias is not None else None
        if isinstance(base, QuantConv2d):
            return F.conv2d(x, weight, bias, base.stride, base.padding, base.dilation, base.groups)
        return F.linear(x, weight, bias)

    @torch.no_grad()
    def merge(self) -> QuantLinear | QuantConv2d:
        """A plain quantized layer holding ``FakeQuant(W₀ + (α/r)·B·A)`` as packed codes with the
        learned step; same bias and input quantizer. Its output equals this layer's exactly."""
        base = self.base_layer
        wg = self._grouped_weight()
        step = self.step()
        # the same arithmetic as the forward's fake quantization: clamp(round(w / s) + z)
        codes = affine.quantize(wg, step[..., None], self.zero_point[..., None], self.qmin, self.qmax)
        packed = IntPackedWeight.from_codes(
            self.weight_shape,
            codes.reshape(self.weight_shape[0], -1),  # (out, in*kh*kw)
            step,
            self.zero_point,
            self.bits,
            self.symmetric,
        )
        return type(base)(packed, base.bias, base.input_quant, **base._layer_args())

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, bits={self.bits}"


def unsupported_reason(layer: nn.Module) -> str | None:
    """Why QALoRA cannot wrap ``layer``, or ``None`` when it can."""
    if not is_quantized_layer(layer):
        return f"{type(layer).__name__} is not a QuantLinear / QuantConv2d"
    if not isinstance(layer.qweight, IntPackedWeight):
        return (
            f"its weight is {layer.qweight.format!r}, not affine INT: QALoRA learns the INT step size "
            "(quantize with WeightQuantConfig(format='int'))"
        )
    if isinstance(layer, QuantConv2d) and layer.groups != 1:
        return f"it is a grouped convolution (groups={layer.groups}); QALoRA supports groups=1 only"
    return None


def qalora_layers(model: nn.Module) -> dict[str, QALoRALayer]:
    """Every :class:`QALoRALayer` of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QALoRALayer)}


def apply_qalora(model: nn.Module, rank: int = 32, alpha: float | None = None) -> nn.Module:
    """Wrap every quantized layer of a PTQ model with a :class:`QALoRALayer` and freeze the rest.

    Afterwards only the LoRA factors, the weight steps and already-trainable timestep-aware activation
    quantizers require gradients (TALSQ tables are made trainable by
    :func:`diffquant.efficientdm.enable_talsq`, before or after this). Layers QALoRA
    cannot handle (NF4 weights, grouped convolutions) stay as they are, frozen, with a warning.

    Args:
        model: a model quantized by :func:`diffquant.quantize_` (modified in place).
        rank: LoRA rank (EfficientDM: 32).
        alpha: LoRA scaling numerator (default: ``rank``, i.e. scaling 1).

    Returns:
        ``model``.

    Raises:
        ValueError: if ``model`` has no quantized layer, already carries QALoRA adapters, or no
            quantized layer can be wrapped.

    Example:
        >>> diffquant.quantize_(unet, QuantConfig(weights=WeightQuantConfig(bits=4)))  # doctest: +SKIP
        >>> apply_qalora(unet, rank=32)  # doctest: +SKIP
    """
    if qalora_layers(model):
        raise ValueError(
            "model already carries QALoRA adapters; merge_qalora(model) first or use a fresh copy."
        )
    targets = {name: m for name, m in model.named_modules() if is_quantized_layer(m)}
    if not targets:
        raise ValueError(
            "model has no quantized layer; QALoRA fine-tunes a quantized model: run diffquant.quantize_ "
            "(or diffquant.efficientdm.efficientdm_quantize_) first."
        )
    skipped = {name: reason for name, m in targets.items() if (reason := unsupported_reason(m)) is not None}
    if len(skipped) == len(targets):
        raise ValueError(f"no quantized layer can take a QALoRA adapter: {_listing(skipped)}.")
    tables = [  # TALSQ tables made trainable before stay trainable
        p
        for m in model.modules()
        if isinstance(m, TimestepActivationQuantizer)
        for p in m.parameters()
        if p.requires_grad
    ]
    model.requires_grad_(False)
    for param in tables:
        param.requires_grad_(True)
    for name, layer in targets.items():
        if name not in skipped:
            model.set_submodule(name, QALoRALayer(layer, rank, alpha))
    if skipped:
        warnings.warn(
            f"QALoRA left {len(skipped)} quantized layer(s) frozen without an adapter: {_listing(skipped)}.",
            stacklevel=2,
        )
    return model


def merge_qalora(model: nn.Module) -> nn.Module:
    """Replace every :class:`QALoRALayer` by its merged, re-quantized plain layer (in place).

    The merged model runs exactly the unmerged model's computation with no adapter left, can be
    saved with :func:`diffquant.save_quantized`, and has every parameter frozen (activation step
    tables included; they keep their trained values).

    Raises:
        ValueError: if ``model`` has no QALoRA adapter.
    """
    layers = qalora_layers(model)
    if not layers:
        raise ValueError("model has no QALoRA adapter to merge; apply_qalora(model) adds them.")
    for name, layer in layers.items():
        model.set_submodule(name, layer.merge())
    model.requires_grad_(False)
    return model


def _listing(reasons: dict[str, str], limit: int = 4) -> str:
    items = [f"{name} ({why})" for name, why in list(reasons.items())[:limit]]
    return "; ".join(items) + (" ..." if len(reasons) > limit else "")
