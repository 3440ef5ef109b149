"""DreamBooth on digits: teach a denoiser a new subject from 5 images under a new class id.

DreamBooth (Ruiz et al., CVPR 2023) binds a subject to a rare token and fine-tunes the model on a
handful of photos, with a *prior-preservation* loss on images the original model generates for the
subject's class, so the class itself is not forgotten. Here the subject is a style of one digit the
float model never saw (left-right mirrored ``3`` s), the token is the reserved class id
``SUBJECT_CLASS`` (11), and the prior images are the float model's own samples of every digit.

Metrics (features of the benchmark's digit classifier):

- *subject fidelity*: mean cosine similarity between generated subject samples and the 5 subject
  images (DreamBooth's DINO score with our classifier as the feature extractor);
- *prompt fidelity*: class accuracy of samples of the ten ordinary digits after fine-tuning.

References for the subject-fidelity scale: unseen mirrored 3s (what a perfect subject generator
scores) and ordinary 3s (what a model that ignores the style scores).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from diffquant.bench.digits.data import DigitsData
from diffquant.bench.digits.model import NULL_CLASS, SUBJECT_CLASS
from diffquant.bench.digits.sampling import balanced_labels, sample_digits
from diffquant.eval.frechet import classifier_features
from diffquant.eval.metrics import class_accuracy
from diffquant.eval.perf import track_peak_memory
from diffquant.finetune import FinetuneConfig, class_conditioning, fit_denoiser, prepare_finetune
from diffquant.finetune.methods import (
    FullFinetuneConfig,
    LoRAFinetuneConfig,
    QALoRAFinetuneConfig,
    QLISAFinetuneConfig,
    TuneQDMFinetuneConfig,
)
from diffquant.finetune.resume import TrainingCheckpoints
from diffquant.tuneqdm import TuneQDMConfig

SUBJECT_DIGIT = 3

PERSONALIZATION_METHODS: dict[str, FinetuneConfig] = {
    "fp-full": FullFinetuneConfig(lr=2e-4),
    "lora": LoRAFinetuneConfig(rank=8, lr=1e-3),
    "tuneqdm-int8": TuneQDMFinetuneConfig(
        tuneqdm=TuneQDMConfig(bits=8, num_experts=4, train_delta_in=True), lr=3e-2
    ),
    "tuneqdm-int4": TuneQDMFinetuneConfig(
        tuneqdm=TuneQDMConfig(bits=4, num_experts=4, train_delta_in=True), lr=3e-2
    ),
    "qalora-int4": QALoRAFinetuneConfig(bits=4, rank=8, lr=1e-3),
    "qlisa": QLISAFinetuneConfig(gamma=2, interval=20, lr=3e-3),
}
"""The methods the personalization and fine-tuning memory benchmarks compare, by label, as configs of
:mod:`diffquant.finetune.methods`.

Learning rates for the digits benchmark's few-hundred-step runs. TuneQDM's are relative to each
layer's scale; 3e-2 had the best subject fidelity of {3e-3, 1e-2, 3e-2} at both 8 and 4 bits. QLISA trains
only a few layers at a time and needs a larger rate: subject fidelity 0.52 / 0.77 / 0.81 at 2e-4 / 1e-3 / 3e-3."""


def mirrored_digits(data: DigitsData, digit: int = SUBJECT_DIGIT) -> Tensor:
    """Every image of ``digit`` in ``data``, mirrored left-right: ``(N, 1, H, W)``."""
    return data.images[data.labels == digit].flip(-1)


def subject_images(data: DigitsData, count: int = 5, seed: int = 0, digit: int = SUBJECT_DIGIT) -> Tensor:
    """``count`` mirrored images of ``digit``, chosen with ``seed``: the subject to teach."""
    pool = mirrored_digits(data, digit)
    if not 1 <= count <= pool.shape[0]:
        raise ValueError(f"count must be in [1, {pool.shape[0]}], got {count}.")
    pick = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
    return pool[pick]


def subject_fidelity(classifier: nn.Module, generated: Tensor, subject: Tensor) -> float:
    """Mean pairwise cosine similarity of classifier features, generated × subject images."""
    a = torch.nn.functional.normalize(classifier_features(classifier, generated), dim=1)
    b = torch.nn.functional.normalize(classifier_features(classifier, subject), dim=1)
    return float((a @ b.T).mean())


@dataclass(frozen=True)
class PersonalizeConfig:
    """How to fine-tune on the subject.

    Attributes:
        steps: optimizer steps; batch_size: images per step.
        prior_preservation: mix in the float model's own samples of the ten digits (half the data).
        prior_per_class: prior images generated per digit.
        label_dropout: probability of training a sample unconditionally (keeps guidance working).
        sampling_steps: DDIM steps for prior images and evaluation samples.
        seed: seeds the prior images, batches and noise.
    """

    steps: int = 300
    batch_size: int = 16
    prior_preservation: bool = True
    prior_per_class: int = 10
    label_dropout: float = 0.1
    sampling_steps: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.prior_per_class < 1 or self.sampling_steps < 1:
            raise ValueError("steps, batch_size, prior_per_class and sampling_steps must all be >= 1.")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}.")


def training_set(fp_model: nn.Module, subject: Tensor, config: PersonalizeConfig) -> tuple[Tensor, Tensor]:
    """Subject images under ``SUBJECT_CLASS`` plus, with prior preservation, as many of the float
    model's own digits (repeating the subject so each half is drawn equally often)."""
    if not config.prior_preservation:
        return subject, torch.full((subject.shape[0],), SUBJECT_CLASS)
    prior_labels = balanced_labels(config.prior_per_class)
    prior = sample_digits(
        fp_model,
        prior_labels,
        num_steps=config.sampling_steps,
        seed=config.seed + 1,
        progress=False,
    )
    reps = -(-prior.shape[0] // subject.shape[0])  # ceil
    subject_rep = subject.repeat(reps, 1, 1, 1)[: prior.shape[0]]
    images = torch.cat([subject_rep, prior])
    labels = torch.cat([torch.full((subject_rep.shape[0],), SUBJECT_CLASS), prior_labels])
    return images, labels


@dataclass
class PersonalizeResult:
    """A fine-tuned model and what its training cost.

    Attributes:
        method: the fine-tuning method; model: its inference form.
        losses: per-step training loss; seconds: training wall time (set-up included);
        peak_bytes: peak memory of training above the level at its start (RSS on CPU).
        trainable_params: parameters that received updates.
    """

    method: str
    model: nn.Module
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    peak_bytes: int = 0
    trainable_params: int = 0


def personalize(
    fp_model: nn.Module,
    method: str,
    images: Tensor,
    labels: Tensor,
    scheduler,
    config: PersonalizeConfig,
    method_config: FinetuneConfig | None = None,
    *,
    progress: bool = True,
    checkpoint: TrainingCheckpoints | None = None,
) -> PersonalizeResult:
    """Fine-tune a copy of ``fp_model`` with ``method`` on ``(images, labels)`` (see :func:`training_set`).

    ``method`` is a label of :data:`PERSONALIZATION_METHODS`, whose config is used unless
    ``method_config`` is given. ``scheduler`` is the training noise scheduler (e.g.
    :func:`diffquant.bench.digits.cache.fp_scheduler`). Samples for prior images and evaluation use DDIM
    (the default of :func:`~diffquant.bench.digits.sampling.sample_digits`). ``checkpoint`` writes
    training checkpoints and resumes from one (:class:`~diffquant.finetune.resume.TrainingCheckpoints`;
    bit-identical to an uninterrupted run; ``seconds`` then counts the resumed part only).

    Raises:
        ValueError: an unknown ``method`` label without ``method_config``.
    """
    if method_config is None:
        if method not in PERSONALIZATION_METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {sorted(PERSONALIZATION_METHODS)}.")
        method_config = PERSONALIZATION_METHODS[method]
    model = copy.deepcopy(fp_model)
    with track_peak_memory() as mem:
        start = time.perf_counter()
        setup = prepare_finetune(model, method_config, scheduler=scheduler)
        trainable = sum(p.numel() for p in setup.model.parameters() if p.requires_grad)
        losses = fit_denoiser(
            setup.model,
            setup.optimizer,
            images,
            class_conditioning(labels),
            scheduler,
            steps=config.steps,
            batch_size=config.batch_size,
            unconditional=class_conditioning(NULL_CLASS),
            cond_dropout=config.label_dropout,
            lr_scheduler=setup.lr_scheduler,
            after_step=setup.after_step,
            seed=config.seed,
            progress=progress,
            desc=f"personalize {method}",
            checkpoint=checkpoint,
            method_state=setup.method_state,
        )
        inference = setup.inference_model()
        seconds = time.perf_counter() - start
    return PersonalizeResult(method, inference, losses, seconds, mem.peak_bytes, trainable)


def evaluate_personalization(
    model: nn.Module,
    classifier: nn.Module,
    subject: Tensor,
    *,
    num_subject_samples: int = 50,
    per_class: int = 20,
    sampling_steps: int = 25,
    seed: int = 100,
) -> dict[str, float | Tensor]:
    """Subject fidelity of ``num_subject_samples`` samples of ``SUBJECT_CLASS`` and prompt fidelity
    (class accuracy) of ``per_class`` samples of each digit; also returns the subject samples."""
    subject_labels = torch.full((num_subject_samples,), SUBJECT_CLASS)
    digit_labels = balanced_labels(per_class)
    samples = sample_digits(
        model,
        torch.cat([subject_labels, digit_labels]),
        num_steps=sampling_steps,
        seed=seed,
        progress=False,
    )
    generated, digits = samples[:num_subject_samples], samples[num_subject_samples:]
    return {
        "subject_fidelity": subject_fidelity(classifier, generated, subject),
        "prompt_fidelity": class_accuracy(classifier, digits, digit_labels),
        "subject_samples": generated,
    }
