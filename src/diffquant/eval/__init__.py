"""Evaluation: Fréchet distance on classifier features, class accuracy, PSNR / MSE against the FP
model's samples, and cost (step latency, stored size, peak memory)."""

from diffquant.eval.frechet import (
    classifier_features,
    frechet_distance,
    image_frechet_distance,
    noise_floor_fd,
)
from diffquant.eval.metrics import class_accuracy, mse, psnr
from diffquant.eval.perf import (
    PeakMemory,
    measure_step_latency,
    model_size_bytes,
    peak_rss_bytes,
    track_peak_memory,
)

__all__ = [
    "PeakMemory",
    "class_accuracy",
    "classifier_features",
    "frechet_distance",
    "image_frechet_distance",
    "measure_step_latency",
    "model_size_bytes",
    "mse",
    "noise_floor_fd",
    "peak_rss_bytes",
    "psnr",
    "track_peak_memory",
]
