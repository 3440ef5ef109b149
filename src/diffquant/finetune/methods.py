"""The fine-tuning methods behind one interface, so personalization and the memory benchmark compare
them on equal terms.

Each method turns a float denoiser (modified in place) into a :class:`FinetuneSetup`: the model to
train, its optimizer (``None`` when the method steps inside backward, as QLISA does), a per-step
callback, and ``finalize`` which returns the model used for inference.

- ``fp-full``: full fine-tuning, AdamW on every parameter (DreamBooth; Ruiz et al., CVPR 2023).
- ``lora``: LoRA (Hu et al., ICLR 2022) through ``peft`` on every Linear / Conv2d, base frozen.
- ``tuneqdm-int8`` / ``tuneqdm-int4``: frozen packed INT weights, trainable timestep-aware scales.
- ``qalora-int4``: EfficientDM's QALoRA on an RTN INT4 model, scale-aware learning rates, merged after.
- ``qlisa``: NF4 frozen layers, layerwise importance sampling, optimizer in backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from diffquant.api import quantize_
from diffquant.config import QuantConfig, WeightQuantConfig
from diffquant.efficientdm import apply_qalora, merge_qalora, scale_aware_param_groups
from diffquant.finetune.common import require_trainable
from diffquant.qlisa import QLISADiffusion
from diffquant.tuneqdm import TuneQDMConfig, apply_tuneqdm, delta_param_groups, register_tas_pre_hook


@dataclass
class FinetuneSetup:
    """A model ready to train.

    Attributes:
        model: the model to train (the one passed in, modified in place).
        optimizer: steps the trainable parameters; ``None`` when the method steps them itself.
        after_step: call after every training step, when given.
        finalize: returns the model to run inference with (e.g. merged and re-quantized).
        state_bytes: bytes of optimizer state held by a method that steps its own parameters.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    after_step: Callable[[], None] | None = None
    finalize: Callable[[], nn.Module] | None = None
    state_bytes: Callable[[], int] | None = None

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state (e.g. AdamW moments) held now."""
        if self.optimizer is None:
            return self.state_bytes() if self.state_bytes is not None else 0
        return _state_bytes(self.optimizer)

    def inference_model(self) -> nn.Module:
        """The trained model in its inference form (``finalize``'s result, or the model itself)."""
        model = self.finalize() if self.finalize is not None else self.model
        return model.eval()


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    states = optimizer.state.values()
    return sum(t.nbytes for state in states for t in state.values() if isinstance(t, torch.Tensor))


@dataclass(frozen=True)
class MethodOptions:
    """Knobs shared by the methods.

    Attributes:
        lr: learning rate; ``None`` picks the method's default from :data:`DEFAULT_LR`.
        lora_rank: rank of LoRA and QALoRA adapters.
        num_experts: TuneQDM timestep-aware scale experts.
        qlisa_gamma: QLISA layers sampled besides the first and last; qlisa_interval: steps between samplings.
    """

    lr: float | None = None
    lora_rank: int = 8
    num_experts: int = 4
    qlisa_gamma: int = 2
    qlisa_interval: int = 20


DEFAULT_LR = {
    "fp-full": 2e-4,
    "lora": 1e-3,
    "tuneqdm-int8": 3e-2,  # relative to each scale (delta_param_groups)
    "tuneqdm-int4": 3e-2,
    "qalora-int4": 1e-3,
    "qlisa": 3e-3,
}
"""Learning rates for the digits benchmark's few-hundred-step runs. TuneQDM's are relative to each
layer's scale; 3e-2 had the best subject fidelity of {3e-3, 1e-2, 3e-2} at both 8 and 4 bits. QLISA trains
only a few layers at a time and needs a larger rate: subject fidelity 0.52 / 0.77 / 0.81 at 2e-4 / 1e-3 / 3e-3."""


def _adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(require_trainable(model), lr=lr, weight_decay=0.0)


def _full(model: nn.Module, opts: MethodOptions, lr: float) -> FinetuneSetup:
    model.requires_grad_(True)
    return FinetuneSetup(model, _adamw(model, lr))


def _layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def _lora(model: nn.Module, opts: MethodOptions, lr: float) -> FinetuneSetup:
    config = LoraConfig(r=opts.lora_rank, lora_alpha=opts.lora_rank, target_modules=_layer_names(model))
    model = inject_adapter_in_model(config, model)  # base weights frozen, adapters trainable
    return FinetuneSetup(model, _adamw(model, lr))


def _tuneqdm(bits: int) -> Callable[[nn.Module, MethodOptions, float], FinetuneSetup]:
    def setup(model: nn.Module, opts: MethodOptions, lr: float) -> FinetuneSetup:
        config = TuneQDMConfig(n_bits=bits, num_experts=opts.num_experts, train_delta_in=True)
        apply_tuneqdm(model, config)
        register_tas_pre_hook(model, config.num_experts)
        optimizer = torch.optim.AdamW(delta_param_groups(model, lr), weight_decay=0.0)
        return FinetuneSetup(model, optimizer)

    return setup


def _qalora(model: nn.Module, opts: MethodOptions, lr: float) -> FinetuneSetup:
    quantize_(model, QuantConfig(weights=WeightQuantConfig(bits=4)), progress=False)
    apply_qalora(model, rank=opts.lora_rank)
    optimizer = torch.optim.AdamW(scale_aware_param_groups(model, lr), lr=lr, weight_decay=0.0)
    return FinetuneSetup(model, optimizer, finalize=lambda: merge_qalora(model))


def _qlisa(model: nn.Module, opts: MethodOptions, lr: float) -> FinetuneSetup:
    qlisa = QLISADiffusion(model, gamma=opts.qlisa_gamma, interval=opts.qlisa_interval, lr=lr)
    qlisa.register()
    qlisa.insert_hook()
    return FinetuneSetup(
        model,
        None,
        after_step=qlisa.step,
        finalize=qlisa.finalize,
        state_bytes=lambda: sum(map(_state_bytes, qlisa.named_optimizers().values())),
    )


METHODS: dict[str, Callable[[nn.Module, MethodOptions, float], FinetuneSetup]] = {
    "fp-full": _full,
    "lora": _lora,
    "tuneqdm-int8": _tuneqdm(8),
    "tuneqdm-int4": _tuneqdm(4),
    "qalora-int4": _qalora,
    "qlisa": _qlisa,
}


def prepare_finetune(model: nn.Module, method: str, options: MethodOptions | None = None) -> FinetuneSetup:
    """Set ``model`` (modified in place; pass a copy to keep the original) up for ``method``.

    Raises:
        ValueError: for an unknown method, or when the method leaves nothing to train.
    """
    if method not in METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; choose one of {sorted(METHODS)}.")
    options = options or MethodOptions()
    lr = options.lr if options.lr is not None else DEFAULT_LR[method]
    return METHODS[method](model, options, lr)
