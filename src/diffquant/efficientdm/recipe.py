"""The EfficientDM recipe end to end: PTQ start, QALoRA, scale-aware LR, TALSQ, distillation, merge.

EfficientDM (He et al., ICLR 2024) fine-tunes a low-bit PTQ model cheaply:

1. PTQ: round-to-nearest (or GPTQ / Qronos) weights and per-timestep activation tables calibrated
   on the float model's sampling trajectories; the first and last layers at W8A8
   (:func:`efficientdm_quantize_`).
2. QALoRA adapters on every quantized layer (:func:`~diffquant.efficientdm.apply_qalora`).
3. Scale-aware learning rates (:func:`~diffquant.efficientdm.scale_aware_param_groups`).
4. TALSQ: the activation tables become trainable (:func:`~diffquant.efficientdm.enable_talsq`).
5. Data-free distillation from the float model (:func:`diffquant.finetune.distill.distill`), or,
   with ``distill=False``, the ordinary denoising loss on training images.
6. Merge: plain quantized layers again (:func:`~diffquant.efficientdm.merge_qalora`).

Steps 3-5 are switches of :class:`EfficientDMConfig`, so each can be ablated.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import time
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from diffquant.api import quantize_
from diffquant.config import (
    INHERIT,
    ActivationQuantConfig,
    CalibrationConfig,
    LayerOverride,
    QuantConfig,
    WeightQuantConfig,
)
from diffquant.efficientdm.qalora import apply_qalora, merge_qalora
from diffquant.efficientdm.scale_aware import scale_aware_param_groups
from diffquant.efficientdm.talsq import enable_talsq
from diffquant.finetune.common import fit_denoiser
from diffquant.finetune.conditioning import Conditioning
from diffquant.finetune.distill import distill
from diffquant.finetune.registry import FinetuneConfig, FinetuneSetup
from diffquant.finetune.resume import TrainingCheckpoints
from diffquant.models import get_arch_spec
from diffquant.nn.qmodules import quant_layer_class

EDGE_BITS = 8
"""Bit-width of the first and last layers' weights and inputs (EfficientDM keeps them at W8A8)."""


@dataclass(frozen=True, kw_only=True)
class EfficientDMConfig(FinetuneConfig):
    """Settings of :func:`efficientdm_finetune` (fine-tuning method ``"efficientdm"``).

    Args:
        bits: weight bit-width of all layers but the first and last (those are 8-bit). ``weight_bits``
            is accepted as an alias (and read as ``config.weight_bits``).
        act_bits: input-activation bit-width of those layers.
        weight_method: PTQ weight method of the start model (``"rtn"``, ``"gptq"``, ``"qronos"``).
        weight_range: range choice of the PTQ weights (``"minmax"``, ``"percentile"``, ``"mse"``).
        act_range: range choice of each per-timestep activation entry.
        calibration_steps: denoiser calls of the calibration run kept for calibration.
        rank: LoRA rank; alpha: LoRA scaling numerator (default ``rank``).
        iterations: optimizer steps of the fine-tune.
        lr: LoRA learning rate of a layer with the average weight step (Adam). The defaults were
            chosen on the digits benchmark (W4A4, 150 distillation steps): LoRA 1e-3 and step sizes
            1e-2 (relative) reduce the student-teacher ε error the most; 2e-3 / 3e-2 diverge.
        step_lr: weight-step learning rate relative to each layer's mean step; act_lr: the same
            for the activation step tables (see :func:`~diffquant.efficientdm.scale_aware_param_groups`).
        cosine: decay every learning rate to 0 along a cosine over ``iterations`` (``False``: constant).
        scale_aware: per-layer LoRA learning rates proportional to the weight step.
        talsq: train the per-timestep activation tables.
        distill: data-free distillation from the float model; ``False`` trains on images with the
            denoising loss.
        batch_size: trajectories (distillation) or images (denoising loss) per step.
        num_sampling_steps: sampler steps of each distillation trajectory.
        guidance_scale: classifier-free guidance of the distillation trajectories.
        snr_gamma: min-SNR-γ weighting of the distillation loss (``None``: EfficientDM's plain MSE).
            Measured on digits W4A4 (300 steps): the plain MSE spends the fine-tune on the last,
            near-noiseless step and leaves PSNR vs FP at the PTQ start's 23.3 dB; γ = 5 gives 25.6 dB.
            Flow-matching models need ``None``.
        cond_dropout: conditioning → unconditional probability of the denoising-loss batches.
        seed: seeds LoRA initialisation, batches and noise.
        version: config schema version.

    Raises:
        ValueError: on a non-positive count or learning rate, or ``bits`` and a different
            ``weight_bits`` both given.

    Example:
        >>> EfficientDMConfig(weight_bits=4, act_bits=8).label
        'W4A8'
    """

    method: ClassVar[str] = "efficientdm"
    bits: int = 4
    act_bits: int = 4
    weight_method: str = "rtn"
    weight_range: str = "mse"
    act_range: str = "minmax"
    calibration_steps: int | None = 25
    rank: int = 32
    alpha: float | None = None
    iterations: int = 300
    lr: float = 1e-3
    step_lr: float = 1e-2
    act_lr: float = 1e-2
    cosine: bool = True
    scale_aware: bool = True
    talsq: bool = True
    distill: bool = True
    batch_size: int = 16
    num_sampling_steps: int = 25
    guidance_scale: float = 1.5
    snr_gamma: float | None = 5.0
    cond_dropout: float = 0.1
    seed: int = 0
    weight_bits: InitVar[int | None] = None

    def __post_init__(self, weight_bits: int | None) -> None:
        super().__post_init__()
        if weight_bits is not None:
            if self.bits not in (_DEFAULT_BITS, weight_bits):
                raise ValueError(
                    f"EfficientDMConfig got bits={self.bits} and weight_bits={weight_bits}; weight_bits is "
                    "an alias of bits, pass only one."
                )
            object.__setattr__(self, "bits", weight_bits)
        for name in ("rank", "iterations", "batch_size", "num_sampling_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EfficientDMConfig.{name} must be a positive integer, got {value!r}.")
        for name in ("lr", "step_lr", "act_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"EfficientDMConfig.{name} must be positive, got {value!r}.")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"EfficientDMConfig.cond_dropout must be in [0, 1), got {self.cond_dropout}.")

    @classmethod
    def for_mode(cls, quick: bool, **fields: Any) -> EfficientDMConfig:
        """The digits benchmark's sizes: 100 iterations when ``quick`` (≈ 15-20 s on 2 CPU cores),
        else 300 (≈ 45-60 s); ``fields`` override any setting."""
        return cls(**{"iterations": 100 if quick else 300, **fields})

    @property
    def label(self) -> str:
        """``W4A4``-style label."""
        return f"W{self.bits}A{self.act_bits}"

    def quant_config(self) -> QuantConfig:
        """The PTQ config of the layers between the first and the last."""
        return QuantConfig(
            weights=WeightQuantConfig(
                bits=self.bits,
                symmetric=False,
                range_method=self.weight_range,
                method=self.weight_method,
            ),
            activations=ActivationQuantConfig(
                bits=self.act_bits, mode="step_table", range_method=self.act_range
            ),
        )


_DEFAULT_BITS = 4
EfficientDMConfig.weight_bits = property(lambda self: self.bits, doc="Alias of ``bits``.")


@dataclass
class EfficientDMReport:
    """What a fine-tune did, attached to the result as ``model.efficientdm_report``.

    Attributes:
        config: the settings used.
        losses: the loss of every optimizer step.
        ptq_seconds: time of the PTQ start (0 when a PTQ model was given).
        finetune_seconds: time of QALoRA set-up, training and merging.
        trainable_parameters: parameters trained (LoRA factors, steps, activation tables).
        learning_rates: ``{group name: lr}`` of the optimizer's parameter groups.
    """

    config: EfficientDMConfig
    losses: list[float] = field(default_factory=list)
    ptq_seconds: float = 0.0
    finetune_seconds: float = 0.0
    trainable_parameters: int = 0
    learning_rates: dict[str, float] = field(default_factory=dict)


def first_last_layers(model: nn.Module) -> tuple[str, str]:
    """Names of the first and the last Linear/Conv2d in registration order (``conv_in`` and
    ``conv_out`` for diffusers UNets).

    Raises:
        ValueError: if the model has no Linear/Conv2d layer.
    """
    names = [name for name, m in model.named_modules() if quant_layer_class(m) is not None]
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear/Conv2d layer to quantize.")
    return names[0], names[-1]


def edge_layer_override(config: QuantConfig, edge_layers: tuple[str, ...]) -> LayerOverride:
    """The override that gives ``edge_layers`` EfficientDM's W8A8: 8-bit per-channel weights (the
    rest of ``config.weights`` kept) and 8-bit inputs of ``config``'s activation mode (unquantized
    inputs stay unquantized).

    Example:
        >>> cfg = QuantConfig(weights=WeightQuantConfig(bits=4))
        >>> edge_layer_override(cfg, ("conv_in", "conv_out")).pattern
        'conv_in|conv_out'
    """
    acts = config.activations
    return LayerOverride(
        pattern="|".join(re.escape(name) for name in edge_layers),
        weights=dataclasses.replace(config.weights, bits=EDGE_BITS, granularity="channel", group_size=None),
        activations=dataclasses.replace(acts, bits=EDGE_BITS) if acts is not None else INHERIT,
    )


def efficientdm_quantize_(
    model: nn.Module,
    config: QuantConfig,
    *,
    calibrate: Callable[[nn.Module], Any] | None = None,
    schedule: Any = None,
    edge_layers: tuple[str, ...] | None = None,
    calibration: CalibrationConfig | None = None,
    progress: bool = False,
) -> nn.Module:
    """PTQ with EfficientDM's layer precisions: ``edge_layers`` at W8A8, the rest as ``config`` says.

    One :func:`diffquant.quantize_` call with :func:`edge_layer_override` placed first in
    ``config.overrides`` (left out when ``config`` already quantizes the edge layers so). Layers the
    architecture keeps in full precision (timestep embedding; see :mod:`diffquant.models`) stay so,
    except the edge layers (an override beats ``keep_fp``).

    Args:
        model: the float model (quantized in place).
        config: the low-bit config; its activation config's mode is reused for the edge layers.
        calibrate: ``fn(model)`` running the float model on representative inputs (needed by
            calibrated activation modes and weight methods).
        schedule: the scheduler, for the noise-level context.
        edge_layers: layers kept at 8 bits (default :func:`first_last_layers`).
        calibration: which recorded calls are kept (default: ``config.calibration``).
        progress: progress bars.

    Returns:
        ``model``; ``model.diffquant_config`` is the config used (``config`` with the edge override
        and the ``calibration`` given).

    Raises:
        ValueError: as :func:`diffquant.quantize_` (e.g. calibration needed but no ``calibrate``).

    Example:
        >>> cfg = QuantConfig(weights=WeightQuantConfig(bits=4, symmetric=False),
        ...                   activations=ActivationQuantConfig(bits=4, mode="step_table"))
        >>> efficientdm_quantize_(unet, cfg, calibrate=run_sampler, schedule=scheduler)  # doctest: +SKIP
    """
    edge_layers = tuple(edge_layers) if edge_layers is not None else first_last_layers(model)
    edge = edge_layer_override(config, edge_layers)
    keep_fp = config.keep_fp if config.keep_fp is not None else get_arch_spec(model).keep_fp
    kept = any(re.fullmatch(pattern, name) for pattern in keep_fp for name in edge_layers)
    needed = config.settings(edge) != config.settings() or kept  # else the edges are W8A8 already
    config = dataclasses.replace(
        config,
        overrides=(edge, *config.overrides) if needed else config.overrides,
        calibration=calibration or config.calibration,
    )
    return quantize_(model, config, calibrate=calibrate, schedule=schedule, progress=progress)


def ptq_start(
    fp_model: nn.Module,
    config: EfficientDMConfig,
    *,
    calibrate: Callable[[nn.Module], Any],
    scheduler: Any,
    progress: bool = False,
) -> nn.Module:
    """A quantized copy of ``fp_model``: the start of the fine-tune (``fp_model`` is not modified)."""
    model = copy.deepcopy(fp_model).eval()
    return efficientdm_quantize_(
        model,
        config.quant_config(),
        calibrate=calibrate,
        schedule=scheduler,
        calibration=CalibrationConfig(num_steps=config.calibration_steps),
        progress=progress,
    )


def qalora_setup(model: nn.Module, config: EfficientDMConfig) -> FinetuneSetup:
    """QALoRA adapters (seeded by ``config.seed``), TALSQ when ``config.talsq``, scale-aware Adam groups
    and the cosine schedule on a PTQ model, in place; ``finalize`` merges the adapters back."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # LoRA initialisation
        apply_qalora(model, config.rank, config.alpha)
    if config.talsq:
        enable_talsq(model)
    groups = scale_aware_param_groups(
        model, config.lr, scale_aware=config.scale_aware, step_lr=config.step_lr, act_lr=config.act_lr
    )
    optimizer = torch.optim.Adam(groups)
    lr_scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.iterations) if config.cosine else None
    )
    return FinetuneSetup(model, optimizer, lr_scheduler, finalize=lambda: merge_qalora(model))


def train_setup(
    setup: FinetuneSetup,
    teacher: nn.Module,
    config: EfficientDMConfig,
    *,
    scheduler: Any,
    conditioning: Conditioning | None = None,
    unconditional: Conditioning | None = None,
    train_data: tuple[Tensor, Conditioning | None] | None = None,
    progress: bool = True,
    checkpoint: TrainingCheckpoints | None = None,
) -> list[float]:
    """Run ``config.iterations`` steps of distillation from ``teacher`` (``config.distill``) or of the
    denoising loss on ``train_data``; returns the losses. Arguments as :func:`finetune_ptq_model`."""
    if config.distill:
        return distill(
            setup.model,
            teacher,
            setup.optimizer,
            scheduler=scheduler,
            iterations=config.iterations,
            conditioning=conditioning,
            unconditional=unconditional,
            batch_size=config.batch_size,
            num_sampling_steps=config.num_sampling_steps,
            guidance_scale=config.guidance_scale,
            snr_gamma=config.snr_gamma,
            lr_scheduler=setup.lr_scheduler,
            seed=config.seed,
            progress=progress,
            desc=f"EfficientDM {config.label} distill",
            checkpoint=checkpoint,
        )
    if train_data is None:
        raise ValueError(
            "EfficientDMConfig(distill=False) trains on data: pass train_data=(images, conditioning) "
            "(conditioning: model kwargs with one row per image, or None for an unconditional model)."
        )
    images, image_conditioning = train_data
    return fit_denoiser(
        setup.model,
        setup.optimizer,
        images,
        image_conditioning,
        scheduler,
        steps=config.iterations,
        batch_size=config.batch_size,
        unconditional=unconditional,
        cond_dropout=config.cond_dropout if unconditional is not None else 0.0,
        lr_scheduler=setup.lr_scheduler,
        seed=config.seed,
        progress=progress,
        desc=f"EfficientDM {config.label} denoise",
        checkpoint=checkpoint,
    )


def finetune_ptq_model(
    model: nn.Module,
    teacher: nn.Module,
    config: EfficientDMConfig,
    *,
    scheduler: Any,
    conditioning: Conditioning | None = None,
    unconditional: Conditioning | None = None,
    train_data: tuple[Tensor, Conditioning | None] | None = None,
    progress: bool = True,
    checkpoint: TrainingCheckpoints | None = None,
) -> EfficientDMReport:
    """Fine-tune a PTQ model in place with QALoRA (+ the switches of ``config``) and merge it.

    Args:
        model: the quantized model (step-table activations when ``config.talsq``).
        teacher: the float model (the distillation teacher).
        config: the settings.
        scheduler: the training noise scheduler; distillation samples with DDIM (flow-matching Euler
            for a flow scheduler) built from its config.
        conditioning: distillation: the pool of conditionings trajectories draw from (model kwargs, e.g.
            :func:`~diffquant.finetune.conditioning.class_conditioning` of ``torch.arange(10)``);
            ``None`` for an unconditional model.
        unconditional: the "no condition" conditioning (batch 1): the guided batch's second half and
            the denoising loss's dropout replacement (``None``: no guidance, no dropout).
        train_data: ``(images, conditioning per image)`` for the denoising loss (``config.distill=False``).
        progress: progress bar.
        checkpoint: training checkpoints every N steps and resuming
            (:class:`~diffquant.finetune.resume.TrainingCheckpoints`; the resumed run is bit-identical).

    Returns:
        The report (also attached as ``model.efficientdm_report``).

    Raises:
        ValueError: ``config.distill=False`` without ``train_data``; guidance without ``unconditional``.
    """
    start = time.perf_counter()
    if not config.distill and train_data is None:
        raise ValueError(
            "EfficientDMConfig(distill=False) trains on data: pass train_data=(images, conditioning)."
        )
    setup = qalora_setup(model, config)
    groups = setup.optimizer.param_groups
    report = EfficientDMReport(
        config,
        trainable_parameters=sum(p.numel() for group in groups for p in group["params"]),
        learning_rates={group["name"]: group["lr"] for group in groups},
    )
    report.losses = train_setup(
        setup,
        teacher,
        config,
        scheduler=scheduler,
        conditioning=conditioning,
        unconditional=unconditional,
        train_data=train_data,
        progress=progress,
        checkpoint=checkpoint,
    )
    setup.inference_model()
    report.finetune_seconds = time.perf_counter() - start
    model.efficientdm_report = report
    return report


def efficientdm_finetune(
    fp_model: nn.Module,
    config: EfficientDMConfig | None = None,
    *,
    scheduler: Any,
    calibrate: Callable[[nn.Module], Any],
    conditioning: Conditioning | None = None,
    unconditional: Conditioning | None = None,
    train_data: tuple[Tensor, Conditioning | None] | None = None,
    progress: bool = True,
    checkpoint: TrainingCheckpoints | None = None,
    **overrides: Any,
) -> nn.Module:
    """EfficientDM on a float denoiser: PTQ start, QALoRA fine-tune, merge. ``fp_model`` is untouched.

    Args:
        fp_model: the float denoiser (also the distillation teacher), of any conditioning.
        config: the settings (default :class:`EfficientDMConfig`); keyword ``overrides`` replace
            single fields, e.g. ``bits=4`` (or ``weight_bits=4``), ``act_bits=8``, ``distill=False``.
        scheduler: the model's training noise scheduler (ε, v, x₀ or flow matching).
        calibrate: ``fn(model)`` running the float sampler on a few samples; calibrates the activation
            tables.
        conditioning, unconditional, train_data: the data, see :func:`finetune_ptq_model`.
        progress: progress bars.
        checkpoint: training checkpoints and resuming of the fine-tune (see :func:`finetune_ptq_model`;
            the PTQ start is re-made, deterministically, on resume).

    Returns:
        The merged quantized model (plain ``QuantLinear`` / ``QuantConv2d`` layers, savable with
        :func:`diffquant.save_quantized`), with the :class:`EfficientDMReport` as
        ``model.efficientdm_report``.

    Raises:
        ValueError: for an unknown override or invalid settings; ``distill=False`` without ``train_data``.

    Example:
        >>> q = efficientdm_finetune(fp_unet, scheduler=scheduler, calibrate=run_sampler, weight_bits=4,
        ...                          act_bits=4, iterations=200,
        ...                          conditioning={"encoder_hidden_states": prompt_states},
        ...                          unconditional={"encoder_hidden_states": empty_prompt_states})  # doctest: +SKIP
    """
    config = config or EfficientDMConfig()
    if "weight_bits" in overrides:
        overrides["bits"] = overrides.pop("weight_bits")
    known = {f.name for f in dataclasses.fields(EfficientDMConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown EfficientDM setting(s) {unknown}; known settings are {sorted(known)}.")
    config = dataclasses.replace(config, **overrides)
    if not config.distill and train_data is None:  # before the PTQ start's minutes of work
        raise ValueError(
            "EfficientDMConfig(distill=False) trains on data: pass train_data=(images, conditioning)."
        )
    start = time.perf_counter()
    model = ptq_start(fp_model, config, calibrate=calibrate, scheduler=scheduler, progress=False)
    ptq_seconds = time.perf_counter() - start
    report = finetune_ptq_model(
        model,
        fp_model,
        config,
        scheduler=scheduler,
        conditioning=conditioning,
        unconditional=unconditional,
        train_data=train_data,
        progress=progress,
        checkpoint=checkpoint,
    )
    report.ptq_seconds = ptq_seconds
    return model
