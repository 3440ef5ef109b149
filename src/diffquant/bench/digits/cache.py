"""Train-once caching of the benchmark's FP denoiser and digit classifier.

Each artifact lives in its own folder named after a hash of everything that determines it (configs,
seed, data split, cache format), under ``$DIFFQUANT_CACHE`` or ``~/.cache/diffquant``. Folders are
written into a temporary sibling and renamed into place, so a folder that exists is complete; two
processes racing to train the same artifact both succeed and one copy wins. Everything is stored as
safetensors + JSON: nothing is unpickled when loading.

The default FP model ships with the package (``bench/digits/assets/``, made by
``benchmarks/make_digits_fp_model.py``): its manifest records the cache key it was trained under and
the SHA-256 of its weights. It is used, after checking the hash, whenever the requested seed and
configs give the same key; any change to the recipe changes the key, and the model is then trained
and cached as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from diffusers import DDPMScheduler, UNet2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffquant.bench.digits.classifier import ClassifierConfig, DigitClassifier, train_classifier
from diffquant.bench.digits.data import SPLIT_SEED, TEST_FRACTION, load_digits_dataset, train_test_split
from diffquant.bench.digits.model import UNetConfig
from diffquant.bench.digits.train import TrainConfig, train_fp_model, training_scheduler
from diffquant.eval.metrics import class_accuracy

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
CACHE_ENV = "DIFFQUANT_CACHE"
PACKAGED_DIR = Path(__file__).resolve().parent / "assets"
PACKAGED_MANIFEST = "manifest.json"
FP_WEIGHTS = "diffusion_pytorch_model.safetensors"
CLASSIFIER_WEIGHTS = "model.safetensors"
CLASSIFIER_CONFIG = "config.json"
TRAINING_INFO = "training.json"


def default_cache_dir() -> Path:
    """``$DIFFQUANT_CACHE`` if set, else ``~/.cache/diffquant``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "diffquant"


def _key(kind: str, seed: int, payload: dict) -> str:
    payload = {"kind": kind, "format": CACHE_FORMAT, "seed": seed, **payload}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _entry_dir(cache_dir: str | Path | None, kind: str, seed: int, payload: dict) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"{kind}-seed{seed}-{_key(kind, seed, payload)}"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fp_model_key(
    seed: int = 0, unet_config: UNetConfig | None = None, train_config: TrainConfig | None = None
) -> str:
    """The cache key of the FP model trained with these settings (what a packaged model must match)."""
    return _key("fp_unet", seed, _fp_payload(unet_config or UNetConfig(), train_config or TrainConfig()))


def _fp_payload(unet_config: UNetConfig, train_config: TrainConfig) -> dict:
    return {
        "unet": unet_config.to_dict(),
        "train": train_config.to_dict(),
        "data": _data_key(unet_config.sample_size),
    }


def packaged_fp_model_dir(key: str, packaged_dir: Path | None = None) -> Path | None:
    """The packaged FP model folder whose manifest records ``key`` and whose weights match the
    manifest's SHA-256, or ``None`` if no packaged model has that key.

    Raises:
        OSError: a packaged model has the key but its weights fail the hash check (a damaged
            checkout: restore the file from git, or delete the folder to train instead).
    """
    root = packaged_dir if packaged_dir is not None else PACKAGED_DIR
    for manifest_path in sorted(root.glob(f"*/{PACKAGED_MANIFEST}")):
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") != key:
            continue
        weights = manifest_path.parent / FP_WEIGHTS
        if not weights.is_file() or sha256_file(weights) != manifest["sha256"]:
            raise OSError(
                f"packaged FP model {weights} does not match the SHA-256 in {manifest_path}; restore it "
                f"(git checkout -- {manifest_path.parent}) or delete that folder to train the model instead"
            )
        return manifest_path.parent
    return None


def _write_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp_dir)`` on a fresh sibling folder of ``final`` and rename it to ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    try:
        write(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            logger.info("another process cached %s first; keeping its copy", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _data_key(image_size: int) -> dict:
    return {"image_size": image_size, "split_seed": SPLIT_SEED, "test_fraction": TEST_FRACTION}


def fp_scheduler() -> DDPMScheduler:
    """The ``DDPMScheduler`` (noise schedule, ᾱ_t) of the default cached FP model.

    Build samplers from its config, e.g. ``DDIMScheduler.from_config(fp_scheduler().config)`` or
    ``DPMSolverMultistepScheduler.from_config(fp_scheduler().config)``.
    """
    return training_scheduler(TrainConfig())


def load_or_train_fp_model(
    cache_dir: str | Path | None = None,
    seed: int = 0,
    *,
    progress: bool = True,
    unet_config: UNetConfig | None = None,
    train_config: TrainConfig | None = None,
    use_packaged: bool = True,
) -> UNet2DModel:
    """The FP digits denoiser for ``seed``: the packaged model when its key matches (hash-checked),
    else loaded from the cache, else trained (minutes on CPU) and cached with ``save_pretrained``
    (safetensors).

    Args:
        cache_dir: cache root (default :func:`default_cache_dir`).
        seed: training seed.
        progress: show the training progress bar.
        unet_config: architecture (default :class:`~diffquant.bench.digits.model.UNetConfig`).
        train_config: hyper-parameters (default :class:`~diffquant.bench.digits.train.TrainConfig`).
        use_packaged: look for a packaged model first (``False``: cache or train, as the script that
            makes the packaged model does).

    Raises:
        OSError: the packaged model fails its hash check, or the cached model is unreadable.

    Returns:
        The model on CPU in eval mode.

    Example:
        >>> unet = load_or_train_fp_model("/tmp/dq_cache", seed=0)  # doctest: +SKIP
    """
    unet_config = unet_config or UNetConfig()
    train_config = train_config or TrainConfig()
    payload = _fp_payload(unet_config, train_config)
    packaged = packaged_fp_model_dir(_key("fp_unet", seed, payload)) if use_packaged else None
    path = packaged or _entry_dir(cache_dir, "fp_unet", seed, payload)
    if not path.is_dir():
        logger.info("training the FP digits UNet (seed %d); caching it in %s", seed, path)
        start = time.perf_counter()
        result = train_fp_model(None, unet_config, train_config, seed, progress=progress)
        info = {
            **payload,
            "seed": seed,
            "train_seconds": time.perf_counter() - start,
            "final_loss": result.losses[-1],
        }

        def write(tmp: Path) -> None:
            result.model.save_pretrained(tmp, safe_serialization=True)
            (tmp / TRAINING_INFO).write_text(json.dumps(info, indent=2))

        _write_atomically(path, write)
    try:
        return UNet2DModel.from_pretrained(path).eval()
    except (OSError, ValueError) as err:
        raise OSError(
            f"cached FP model at {path} is unreadable ({err}); delete that folder to retrain"
        ) from err


def load_or_train_classifier(
    cache_dir: str | Path | None = None,
    seed: int = 0,
    *,
    progress: bool = False,
    config: ClassifierConfig | None = None,
    image_size: int = 8,
) -> DigitClassifier:
    """The digit classifier for ``seed``, loaded from the cache or trained (seconds) and cached.

    Its held-out accuracy on the test split is stored next to the weights and set as
    ``classifier.test_accuracy``.

    Returns:
        The classifier on CPU in eval mode.
    """
    config = config or ClassifierConfig()
    payload = {"classifier": config.to_dict(), "data": _data_key(image_size)}
    path = _entry_dir(cache_dir, "classifier", seed, payload)
    if not path.is_dir():
        train, test = train_test_split(load_digits_dataset(image_size))
        model = train_classifier(train, config, seed, progress=progress)
        info = {**payload, "seed": seed, "test_accuracy": class_accuracy(model, test.images, test.labels)}
        logger.info(
            "trained the digit classifier (held-out accuracy %.4f); caching it in %s",
            info["test_accuracy"],
            path,
        )

        def write(tmp: Path) -> None:
            save_file(model.state_dict(), tmp / CLASSIFIER_WEIGHTS)
            (tmp / CLASSIFIER_CONFIG).write_text(json.dumps(info, indent=2))

        _write_atomically(path, write)
    try:
        info = json.loads((path / CLASSIFIER_CONFIG).read_text())
        model = DigitClassifier(info["classifier"]["width"], info["classifier"]["feature_dim"])
        model.load_state_dict(load_file(path / CLASSIFIER_WEIGHTS))
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as err:
        raise OSError(
            f"cached classifier at {path} is unreadable ({err}); delete that folder to retrain"
        ) from err
    model.test_accuracy = float(info["test_accuracy"])
    return model.eval()
