"""The QAT workflow: ``prepare_qat`` → train → ``convert`` (PyTorch eager-mode QAT, diffquant's modules).

1. (optional) fold BatchNorms: :func:`diffquant.qat.fuse_conv_bn` / :func:`diffquant.qat.fuse_modules`;
2. :func:`prepare_qat` swaps the targeted Linear/Conv2d layers (the same selection as
   :func:`diffquant.quantize_`: ``include`` / ``exclude`` / ``keep_fp`` and the architecture's
   default full-precision layers) for :class:`~diffquant.qat.QATLinear` / :class:`~diffquant.qat.QATConv2d`;
3. train as usual (activation observers update in training mode only);
4. :func:`convert` replaces every QAT layer by a :class:`~diffquant.nn.qmodules.QuantLinear` /
   :class:`~diffquant.nn.qmodules.QuantConv2d` holding the packed weight codes and the learned static
   activation range. The converted model computes exactly what the eval-mode QAT model computes and
   saves with :func:`diffquant.save_quantized`.

:func:`qat_finetune` runs all of it on a denoiser with its scheduler's denoising loss.
"""

from __future__ import annotations

from torch import Tensor, nn

from diffquant.config import QuantConfig, WeightQuantConfig
from diffquant.finetune.common import fit_denoiser
from diffquant.finetune.conditioning import Conditioning
from diffquant.finetune.registry import finetune_config, prepare_finetune
from diffquant.finetune.resume import TrainingCheckpoints
from diffquant.layer_swap import replace_layers
from diffquant.nn.qmodules import is_quantized_layer
from diffquant.qat.modules import is_qat_layer, qat_layer_class
from diffquant.targeting import select_targets

__all__ = ["convert", "prepare_qat", "qat_finetune", "qat_layers"]


def qat_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every QATLinear / QATConv2d of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if is_qat_layer(m)}


def _check_config(config: QuantConfig) -> None:
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a diffquant.QuantConfig, got {type(config).__name__}.")
    _check_weights(config.weights)


def _check_weights(weights: WeightQuantConfig) -> None:
    if weights.format != "int":
        raise ValueError(
            f"QAT trains affine INT weights, got format={weights.format!r}; use "
            "WeightQuantConfig(format='int', bits=2..8) (NF4 is a post-training format: use quantize_)."
        )
    if weights.method != "rtn":
        raise ValueError(
            f"QAT learns round-to-nearest weights, got method={weights.method!r}; calibrated "
            "methods such as GPTQ are post-training (diffquant.quantize_). Use method='rtn'."
        )


def prepare_qat(
    model: nn.Module,
    config: QuantConfig,
    *,
    weight_range: str = "observer",
    act_range: str = "observer",
    averaging_constant: float = 0.01,
) -> nn.Module:
    """Swap the targeted Linear/Conv2d layers of ``model`` for QAT layers, in place.

    Args:
        model: the float model (fold its BatchNorms first, see :func:`diffquant.qat.fuse_conv_bn`).
        config: weights (INT 2..8 bits, ``method="rtn"``), activations (``mode="static"`` min-max, or
            ``None`` for weight-only QAT) and targets (``include`` / ``exclude`` / ``keep_fp``; with
            ``keep_fp=None`` the architecture's defaults stay in full precision, as in
            :func:`diffquant.quantize_`).
        weight_range: ``"observer"`` (min-max of the current weight at every forward, straight-through
            gradient) or ``"lsq"`` (learned per-channel step sizes and zero points).
        act_range: ``"observer"`` (moving-average min/max, frozen in eval mode) or ``"lsq"``.
        averaging_constant: the activation observer's moving-average weight per training batch.

    Returns:
        ``model``, with QAT layers in place (train it, then call :func:`convert`).

    Raises:
        TypeError: if ``config`` is not a :class:`QuantConfig`.
        ValueError: on an unsupported config (NF4, GPTQ, dynamic activations, bad range mode), a
            model without Linear/Conv2d layers, a model already prepared or quantized, or a group
            size that does not divide a layer's inputs.

    Example:
        >>> from diffquant import QuantConfig, WeightQuantConfig, ActivationQuantConfig
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> cfg = QuantConfig(weights=WeightQuantConfig(bits=4), activations=ActivationQuantConfig(bits=8))
        >>> net = prepare_qat(net, cfg)
        >>> _ = net(torch.randn(32, 8)).sum().backward()  # train...
        >>> net = convert(net.eval())
        >>> type(net[0]).__name__
        'QuantLinear'
    """
    _check_config(config)
    if qat_layers(model):
        raise ValueError("model is already prepared for QAT; train it and call convert(model).")
    if getattr(model, "diffquant_config", None) is not None or any(map(is_quantized_layer, model.modules())):
        raise ValueError("model is already quantized; prepare a fresh copy of the float model for QAT.")
    if not any(qat_layer_class(m) is not None for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear or nn.Conv2d layer; QAT fake-quantizes those layers, "
            "so there is nothing to prepare."
        )
    if qat_layer_class(model) is not None:
        raise ValueError(
            f"prepare_qat needs a model that contains layers, got a bare {type(model).__name__}; wrap it, "
            "e.g. nn.Sequential(layer)."
        )
    targets = select_targets(model, config)
    for settings in targets.configs.values():  # overrides may give layers other weight configs
        _check_weights(settings.weights)

    def build(name: str, layer: nn.Module) -> nn.Module:
        settings = targets.configs[name]
        return qat_layer_class(layer).from_float(
            layer,
            settings.weights,
            settings.activations,
            weight_range=weight_range,
            act_range=act_range,
            averaging_constant=averaging_constant,
        )

    replace_layers(model, targets.quantize, build)  # every layer built first: a failure changes nothing
    model.diffquant_qat_config = config
    return model


def convert(model: nn.Module) -> nn.Module:
    """Replace every QAT layer by its quantized layer, in place; the model is then saveable with
    :func:`diffquant.save_quantized` (load it into the same float model, BatchNorms folded the same way).

    Eval-mode outputs of the QAT model and of the converted model are identical (the packed codes and
    the static activation ranges are the fake-quantization parameters of the eval-mode forward).

    Returns:
        ``model``; ``model.diffquant_config`` records the config given to :func:`prepare_qat`.

    Raises:
        ValueError: if ``model`` has no QAT layer, or an activation quantizer has seen no training
            batch (its range is undefined).
    """
    layers = qat_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no QAT layer to convert; call prepare_qat(model, config) and "
            "train it first."
        )
    unseen = [name for name, layer in layers.items() if not layer.is_initialized]
    if unseen:
        raise ValueError(
            f"{len(unseen)} QAT layer(s) ({', '.join(unseen[:4])}{' ...' if len(unseen) > 4 else ''}) "
            "have seen "
            "no training batch, so their activation ranges are undefined; train (or run at least one "
            "forward pass in model.train() mode) before convert."
        )
    quantized = {name: layer.to_quantized() for name, layer in layers.items()}
    for name, layer in quantized.items():
        model.set_submodule(name, layer)
    first = next(iter(layers.values()))
    config = getattr(model, "diffquant_qat_config", None) or QuantConfig(
        weights=first.weight_fake_quant.config,
        activations=first.input_fake_quant.config if first.input_fake_quant is not None else None,
    )
    model.__dict__.pop("diffquant_qat_config", None)
    model.diffquant_config = config
    return model


def qat_finetune(
    model: nn.Module,
    config: QuantConfig,
    *,
    images: Tensor,
    conditioning: Conditioning | None,
    scheduler,
    unconditional: Conditioning | None = None,
    cond_dropout: float = 0.0,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
    weight_range: str = "lsq",
    act_range: str = "lsq",
    checkpoint: TrainingCheckpoints | None = None,
) -> nn.Module:
    """Quantization-aware fine-tuning of a denoiser: prepare, train, convert (in place).

    The ``"qat"`` fine-tuning method (:class:`~diffquant.finetune.methods.QATFinetuneConfig`): every
    parameter (float weights, biases, norms, embeddings and LSQ step sizes) is trained with AdamW (no
    weight decay) on the scheduler's denoising loss (:func:`diffquant.finetune.fit_denoiser`) under a
    cosine learning-rate schedule.

    Args:
        model: the float denoiser.
        config: see :func:`prepare_qat`.
        images: ``(N, C, H, W)`` training images (or latents).
        conditioning: model kwargs with one row per image (e.g. ``{"class_labels": labels}``), or
            ``None`` for an unconditional model.
        scheduler: the model's training noise scheduler (ε, v, x₀ or flow matching).
        unconditional, cond_dropout: classifier-free-guidance dropout (keeps the unconditional
            branch trained); see :func:`diffquant.finetune.fit_denoiser`.
        steps, batch_size, lr, seed: optimisation settings (``lr`` is the peak learning rate).
        progress: show a progress bar.
        weight_range, act_range: see :func:`prepare_qat`; learned (LSQ) ranges by default.
        checkpoint: training checkpoints every N steps and resuming
            (:class:`~diffquant.finetune.resume.TrainingCheckpoints`; the resumed run is bit-identical).

    Returns:
        ``model``, converted (QuantLinear / QuantConv2d layers, eval mode).

    Raises:
        ValueError: as :func:`prepare_qat`, or on bad training settings.
    """
    if steps < 1 or batch_size < 1:  # checked before the model is changed
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}.")
    method = finetune_config(
        "qat", quant=config, weight_range=weight_range, act_range=act_range, lr=lr, cosine_steps=steps
    )
    setup = prepare_finetune(model, method)
    fit_denoiser(
        setup.model,
        setup.optimizer,
        images,
        conditioning,
        scheduler,
        steps=steps,
        batch_size=batch_size,
        unconditional=unconditional,
        cond_dropout=cond_dropout,
        lr_scheduler=setup.lr_scheduler,
        seed=seed,
        progress=progress,
        desc="QAT",
        checkpoint=checkpoint,
    )
    return setup.inference_model()
