"""Quantized fine-tuning on any diffusers denoiser, behind one surface.

- :mod:`~diffquant.finetune.conditioning`: conditioning as data (model kwargs per sample, and the
  unconditional conditioning of classifier-free guidance);
- :mod:`~diffquant.finetune.objectives`: the training target from the scheduler (ε, v, x₀, flow matching);
- :mod:`~diffquant.finetune.common`: :func:`denoising_loss` and the loop :func:`fit_denoiser`;
- :mod:`~diffquant.finetune.distill`: data-free distillation from a float teacher;
- :mod:`~diffquant.finetune.resume`: training checkpoints every N steps and bit-identical resuming
  (:class:`TrainingCheckpoints`, the ``checkpoint=`` argument of both loops);
- :mod:`~diffquant.finetune.registry` + :mod:`~diffquant.finetune.methods`: every method
  (``fp-full``, ``lora``, ``tuneqdm``, ``qalora``, ``efficientdm``, ``qlisa``, ``qat``) as a config and
  :func:`prepare_finetune`.

Example:
    >>> from diffquant.finetune import fit_denoiser, finetune_config, prepare_finetune
    >>> setup = prepare_finetune(unet, finetune_config("qlisa", lr=1e-4))  # doctest: +SKIP
    >>> fit_denoiser(setup.model, setup.optimizer, latents, {"encoder_hidden_states": states}, sched,
    ...              steps=200, after_step=setup.after_step)  # doctest: +SKIP
    >>> quantized = setup.inference_model()  # doctest: +SKIP
"""

from diffquant.finetune.common import denoising_loss, fit_denoiser, model_output, require_trainable
from diffquant.finetune.conditioning import Conditioning, class_conditioning
from diffquant.finetune.registry import (
    FinetuneConfig,
    FinetuneSetup,
    finetune_config,
    finetune_methods,
    prepare_finetune,
    register_finetune_method,
)
from diffquant.finetune.resume import TrainingCheckpoints

__all__ = [
    "Conditioning",
    "FinetuneConfig",
    "FinetuneSetup",
    "TrainingCheckpoints",
    "class_conditioning",
    "denoising_loss",
    "finetune_config",
    "finetune_methods",
    "fit_denoiser",
    "model_output",
    "prepare_finetune",
    "register_finetune_method",
    "require_trainable",
]
