"""The embedded "digits" benchmark: sklearn's real 8×8 digits, a small class-conditional
``UNet2DModel`` trained with DDPM and cached per seed, a DDIM sampler with classifier-free guidance,
and the digit classifier whose features define the benchmark's Fréchet distance."""

from diffquant.bench.digits.cache import (
    default_cache_dir,
    fp_scheduler,
    load_or_train_classifier,
    load_or_train_fp_model,
)
from diffquant.bench.digits.classifier import ClassifierConfig, DigitClassifier, train_classifier
from diffquant.bench.digits.data import NUM_DIGITS, DigitsData, load_digits_dataset, train_test_split
from diffquant.bench.digits.model import NULL_CLASS, SUBJECT_CLASS, UNetConfig, build_unet
from diffquant.bench.digits.sampling import balanced_labels, sample_digits, save_sample_grid
from diffquant.bench.digits.train import TrainConfig, train_fp_model, training_scheduler

__all__ = [
    "NULL_CLASS",
    "NUM_DIGITS",
    "SUBJECT_CLASS",
    "ClassifierConfig",
    "DigitClassifier",
    "DigitsData",
    "TrainConfig",
    "UNetConfig",
    "balanced_labels",
    "build_unet",
    "default_cache_dir",
    "fp_scheduler",
    "load_digits_dataset",
    "load_or_train_classifier",
    "load_or_train_fp_model",
    "sample_digits",
    "save_sample_grid",
    "train_classifier",
    "train_fp_model",
    "train_test_split",
    "training_scheduler",
]
