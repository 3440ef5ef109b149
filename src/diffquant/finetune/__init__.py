"""Shared pieces of quantized fine-tuning: trainable-parameter checks, the denoising loss,
data-free distillation from a float teacher, and personalization on the digits benchmark.

The methods themselves live in :mod:`diffquant.tuneqdm`, :mod:`diffquant.efficientdm`,
:mod:`diffquant.qlisa` and :mod:`diffquant.qat`.
"""

from diffquant.finetune.common import denoising_loss, fit_denoiser, predict_noise, require_trainable

__all__ = ["denoising_loss", "fit_denoiser", "predict_noise", "require_trainable"]
