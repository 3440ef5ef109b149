import json

import pytest
import torch

import diffquant.bench.digits.cache as cache
from diffquant.bench.digits.classifier import ClassifierConfig
from diffquant.bench.digits.model import TINY_UNET
from diffquant.bench.digits.train import TrainConfig

TINY_TRAIN = TrainConfig(steps=3, batch_size=8, warmup_steps=1)
TINY_CLASSIFIER = ClassifierConfig(width=4, feature_dim=8, epochs=1)


def _fp(cache_dir, seed=0):
    return cache.load_or_train_fp_model(
        cache_dir, seed, progress=False, unet_config=TINY_UNET, train_config=TINY_TRAIN
    )


def _no_training(*args, **kwargs):
    raise AssertionError("a cached artifact was retrained")


def test_fp_model_cache_round_trip(tmp_path, monkeypatch):
    trained = _fp(tmp_path)
    entries = list(tmp_path.iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("fp_unet-seed0-")  # no temp dir left behind
    assert (entries[0] / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((entries[0] / "training.json").read_text())["seed"] == 0

    monkeypatch.setattr(cache, "train_fp_model", _no_training)
    loaded = _fp(tmp_path)
    x, t, c = torch.randn(4, 1, 8, 8), torch.tensor([1, 200, 500, 999]), torch.tensor([0, 3, 10, 11])
    with torch.no_grad():
        assert torch.equal(trained(x, t, class_labels=c).sample, loaded(x, t, class_labels=c).sample)
    assert not loaded.training


def test_cache_key_depends_on_seed_and_config(tmp_path):
    _fp(tmp_path, seed=0)
    _fp(tmp_path, seed=1)
    cache.load_or_train_fp_model(
        tmp_path, 0, progress=False, unet_config=TINY_UNET, train_config=TrainConfig(steps=2, batch_size=8)
    )
    assert len({p.name for p in tmp_path.iterdir()}) == 3


def test_default_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "env"))
    assert cache.default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("DIFFQUANT_CACHE")
    assert cache.default_cache_dir().parts[-2:] == (".cache", "diffquant")


def test_failed_write_leaves_nothing_behind(tmp_path):
    def broken(tmp):
        (tmp / "partial").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        cache._write_atomically(tmp_path / "entry", broken)
    assert list(tmp_path.iterdir()) == []


def test_losing_a_race_keeps_the_first_copy(tmp_path):
    cache._write_atomically(tmp_path / "entry", lambda tmp: (tmp / "a").write_text("first"))
    cache._write_atomically(tmp_path / "entry", lambda tmp: (tmp / "a").write_text("second"))
    assert (tmp_path / "entry" / "a").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_classifier_cache_round_trip(tmp_path, monkeypatch):
    trained = cache.load_or_train_classifier(tmp_path, 0, config=TINY_CLASSIFIER)
    (entry,) = tmp_path.iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["config.json", "model.safetensors"]
    monkeypatch.setattr(cache, "train_classifier", _no_training)
    loaded = cache.load_or_train_classifier(tmp_path, 0, config=TINY_CLASSIFIER)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(trained(x), loaded(x))
    assert loaded.test_accuracy == trained.test_accuracy and 0.0 <= loaded.test_accuracy <= 1.0


def test_corrupt_cache_entry_says_how_to_recover(tmp_path):
    cache.load_or_train_classifier(tmp_path, 0, config=TINY_CLASSIFIER)
    (entry,) = tmp_path.iterdir()
    (entry / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(OSError, match="delete that folder"):
        cache.load_or_train_classifier(tmp_path, 0, config=TINY_CLASSIFIER)


def test_fp_scheduler_matches_training_config():
    sched = cache.fp_scheduler()
    assert sched.config.num_train_timesteps == TrainConfig().num_train_timesteps
    assert sched.config.beta_schedule == TrainConfig().beta_schedule


def _package(tmp_path, seed=0):
    """A packaged copy of the tiny model under tmp_path/assets, as the making script writes it."""
    model = _fp(tmp_path / "cache", seed)
    folder = tmp_path / "assets" / f"fp_unet-seed{seed}"
    model.save_pretrained(folder, safe_serialization=True)
    key = cache._key("fp_unet", seed, cache._fp_payload(TINY_UNET, TINY_TRAIN))
    manifest = {"key": key, "seed": seed, "sha256": cache.sha256_file(folder / cache.FP_WEIGHTS)}
    (folder / cache.PACKAGED_MANIFEST).write_text(json.dumps(manifest))
    return model, folder


def test_packaged_model_is_used_when_its_key_matches(tmp_path, monkeypatch):
    packaged, folder = _package(tmp_path)
    monkeypatch.setattr(cache, "PACKAGED_DIR", folder.parent)
    monkeypatch.setattr(cache, "train_fp_model", _no_training)
    loaded = _fp(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()  # nothing trained, nothing cached
    for a, b in zip(packaged.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_packaged_model_is_not_used_for_another_recipe(tmp_path, monkeypatch):
    _, folder = _package(tmp_path)
    monkeypatch.setattr(cache, "PACKAGED_DIR", folder.parent)
    cache.load_or_train_fp_model(
        tmp_path / "other",
        0,
        progress=False,
        unet_config=TINY_UNET,
        train_config=TrainConfig(steps=2, batch_size=8),
    )
    _fp(tmp_path / "seed1", seed=1)
    assert len(list((tmp_path / "other").iterdir())) == 1 and len(list((tmp_path / "seed1").iterdir())) == 1


def test_damaged_packaged_model_fails_its_hash_check(tmp_path, monkeypatch):
    _, folder = _package(tmp_path)
    monkeypatch.setattr(cache, "PACKAGED_DIR", folder.parent)
    weights = folder / cache.FP_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(OSError, match="SHA-256"):
        _fp(tmp_path / "empty")
    assert cache.load_or_train_fp_model(
        tmp_path / "trained",
        0,
        progress=False,
        unet_config=TINY_UNET,
        train_config=TINY_TRAIN,
        use_packaged=False,
    )


def test_shipped_model_matches_the_default_recipe():
    """The packaged default model is hash-checked and carries today's cache key: a change to UNetConfig,
    TrainConfig or the data split without rerunning benchmarks/make_digits_fp_model.py fails here."""
    folder = cache.packaged_fp_model_dir(cache.fp_model_key(0))
    assert folder is not None, "rerun: python benchmarks/make_digits_fp_model.py --seed 0"
