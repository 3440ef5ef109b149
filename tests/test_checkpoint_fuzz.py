"""Fuzz: hundreds of damaged or tampered checkpoints, each loaded in-process.

Every case must end as an identical load (the mutation did not change anything that matters) or a
CheckpointError; any other exception, or a load whose outputs differ, fails. Mutations: byte flips,
truncations, appended bytes, metadata edits with the checksum kept (caught by the checksum), and a
forger's re-saves with a recomputed checksum of values no quantizer produces (caught by validation).
A re-save of *valid* but different values is a valid checkpoint by construction and is not a case.
"""

from __future__ import annotations

import copy
import random
import shutil
import warnings

import pytest
import torch
from torch import nn

from checkpoint_tools import edit_json, rewrite
from diffquant import (
    CheckpointError,
    QuantConfig,
    WeightQuantConfig,
    load_quantized,
    quantize_,
    save_quantized,
)
from diffquant.io import WEIGHTS_NAME
from diffquant.models.tiny import example_inputs, tiny_unet2d
from diffquant.tuneqdm import (
    TuneQDMConfig,
    apply_tuneqdm,
    load_delta_config,
    load_delta_state,
    quantize_model,
    save_delta_state,
    set_timestep,
    trainable_delta_parameters,
)


def _convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.SiLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.SiLU(),
        nn.Linear(32, 8),
    ).eval()


X = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------- mutations
def _flip(fraction: float, xor: int):
    def apply(file):
        data = bytearray(file.read_bytes())
        data[min(int(fraction * len(data)), len(data) - 1)] ^= xor
        file.write_bytes(bytes(data))

    return apply


def _truncate(fraction: float):
    return lambda file: file.write_bytes(file.read_bytes()[: int(fraction * file.stat().st_size)])


def _append(extra: bytes):
    return lambda file: file.write_bytes(file.read_bytes() + extra)


def _meta(edit, recompute: bool):
    return lambda file: rewrite(file, metadata=edit, recompute_checksum=recompute)


def _tensors(edit):
    return lambda file: rewrite(file, tensors=edit)


def _set(key: str, value):
    return lambda meta: meta.__setitem__(key, value)


def _drop(key: str):
    return lambda meta: meta.pop(key, None)


def _fill(suffix: str, value: float, index: int = 0):
    """Put ``value`` into element ``index`` of the ``n``-th (by sorted name) tensor ending in ``suffix``."""

    def edit(tensors):
        keys = sorted(k for k in tensors if k.endswith(suffix))
        t = tensors[keys[index % len(keys)]]
        t.reshape(-1)[0] = value

    return edit


def _retype(suffix: str, dtype: torch.dtype):
    def edit(tensors):
        key = sorted(k for k in tensors if k.endswith(suffix))[0]
        tensors[key] = tensors[key].to(dtype)

    return edit


def _reshape(suffix: str):
    def edit(tensors):
        key = sorted(k for k in tensors if k.endswith(suffix))[0]
        tensors[key] = tensors[key].reshape(-1)[:-1].clone()

    return edit


def _pop(suffix: str):
    def edit(tensors):
        tensors.pop(sorted(k for k in tensors if k.endswith(suffix))[0])

    return edit


def _add(tensors):
    tensors["stowaway.weight"] = torch.zeros(3)


def _swap_differently_shaped(tensors):
    keys = sorted(tensors)
    a = keys[0]
    b = next(k for k in keys if tensors[k].shape != tensors[a].shape)
    tensors[a], tensors[b] = tensors[b], tensors[a]


def _generic(rng: random.Random, n_flips: int, n_truncations: int) -> dict:
    cases = {}
    for i in range(n_flips):
        fraction = rng.random() if i % 2 else rng.random() * 0.1  # half of them in the header region
        cases[f"flip-{i}"] = _flip(fraction, rng.randrange(1, 256))
    for i in range(n_truncations):
        cases[f"truncate-{i}"] = _truncate(rng.random())
    cases["truncate-empty"] = _truncate(0.0)
    cases["append-zeros"] = _append(b"\x00" * 8)
    cases["append-text"] = _append(b"tail")
    return cases


def _quant_layer_edits(first: str) -> dict:
    """Description edits of the first quantized layer (name ``first``) of a diffquant checkpoint."""

    def layer(edit):
        def apply(description):
            edit(description["layers"][first])

        return edit_json("description", apply)

    def weight(key, value):
        return layer(lambda m: m["weight"].__setitem__(key, value))

    edits = {
        "bits-9": weight("bits", 9),
        "bits-string": weight("bits", "4"),
        "bits-bool": weight("bits", True),
        "bits-3": weight("bits", 3),
        "symmetric-string": weight("symmetric", "False"),
        "symmetric-flip": layer(
            lambda m: m["weight"].__setitem__("symmetric", not m["weight"].get("symmetric", True))
        ),
        "scale-shape-huge": weight("scale_shape", [20000, 20000]),
        "scale-shape-negative": weight("scale_shape", [-1, 1]),
        "shape-wrong": layer(lambda m: m["weight"].__setitem__("shape", [m["weight"]["shape"][0] + 1, 3])),
        "shape-huge": weight("shape", [1 << 20, 1 << 20]),
        "format-fp4": weight("format", "fp4"),
        "weight-extra-field": weight("extra", 1),
        "weight-missing-field": layer(lambda m: m["weight"].pop("shape")),
        "weight-not-object": layer(lambda m: m.__setitem__("weight", [1, 2])),
        "kind-swap": layer(lambda m: m.__setitem__("kind", "linear" if m["kind"] == "conv2d" else "conv2d")),
        "kind-unknown": layer(lambda m: m.__setitem__("kind", "conv3d")),
        "has-bias-flip": layer(lambda m: m.__setitem__("has_bias", not m["has_bias"])),
        "has-bias-string": layer(lambda m: m.__setitem__("has_bias", "yes")),
        "layer-args-missing": layer(lambda m: m.__setitem__("layer", {})),
        "layer-args-null": layer(lambda m: m.__setitem__("layer", None)),
        "input-quant-garbage": layer(lambda m: m.__setitem__("input_quant", {"config": {"bits": 3}})),
        "input-quant-list": layer(lambda m: m.__setitem__("input_quant", [1])),
        "layer-missing": edit_json("description", lambda d: d["layers"].pop(first)),
        "layer-unknown": edit_json(
            "description", lambda d: d["layers"].__setitem__("no.such", d["layers"][first])
        ),
        "layers-list": edit_json("description", lambda d: d.__setitem__("layers", [])),
        "quant-config-bits": edit_json(
            "description", lambda d: d["quant_config"]["weights"].__setitem__("bits", 1)
        ),
        "quant-config-unknown": edit_json("description", lambda d: d["quant_config"].__setitem__("x", 1)),
        "quant-config-null": edit_json("description", lambda d: d.__setitem__("quant_config", None)),
        "description-extra": edit_json("description", lambda d: d.__setitem__("extra", 1)),
        "architecture-other": edit_json("description", lambda d: d.__setitem__("architecture", "Linear")),
    }
    cases = {}
    for name, edit in edits.items():
        cases[f"meta-{name}"] = _meta(edit, recompute=False)  # the checksum catches it
        cases[f"forged-{name}"] = _meta(edit, recompute=True)  # validation catches it
    for name, edit in {
        "version-3": _set("format_version", "3"),
        "version-missing": _drop("format_version"),
        "format-other": _set("format", "other"),
        "description-not-json": _set("description", "{nope"),
        "description-missing": _drop("description"),
        "description-list": _set("description", "[]"),
    }.items():
        cases[f"meta-{name}"] = _meta(edit, recompute=False)
        cases[f"forged-{name}"] = _meta(edit, recompute=True)
    cases["meta-checksum-missing"] = _meta(_drop("sha256"), recompute=False)
    cases["meta-checksum-garbage"] = _meta(_set("sha256", "0" * 64), recompute=False)
    cases["tensors-kept-checksum"] = lambda file: rewrite(
        file, tensors=_fill(".bias", 2.0), recompute_checksum=False
    )
    return cases


def _int_tensor_edits() -> dict:
    cases = {}
    for i, value in enumerate([float("nan"), float("inf"), -float("inf"), -1.0, 0.0, -1e-30]):
        cases[f"forged-scale-{i}"] = _tensors(_fill("qweight.scale", value, index=i))
    for i, value in enumerate([float("nan"), float("inf")]):
        cases[f"forged-bias-{i}"] = _tensors(_fill(".bias", value, index=i))
    cases["forged-zero-point-16"] = _tensors(_fill("qweight.zero_point", 16))
    cases["forged-zero-point-255"] = _tensors(_fill("qweight.zero_point", 255, index=1))
    cases["forged-scale-fp16"] = _tensors(_retype("qweight.scale", torch.float16))
    cases["forged-scale-fp64"] = _tensors(_retype("qweight.scale", torch.float64))
    cases["forged-qdata-int8"] = _tensors(_retype("qweight.qdata", torch.int8))
    cases["forged-qdata-short"] = _tensors(_reshape("qweight.qdata"))
    cases["forged-scale-short"] = _tensors(_reshape("qweight.scale"))
    cases["forged-missing-scale"] = _tensors(_pop("qweight.scale"))
    cases["forged-missing-bias"] = _tensors(_pop(".bias"))
    cases["forged-extra-tensor"] = _tensors(_add)
    cases["forged-swap"] = _tensors(_swap_differently_shaped)
    return cases


def _nf4_tensor_edits() -> dict:
    cases = {}
    for i, value in enumerate([float("nan"), float("inf"), -1.0, -1e-20]):
        cases[f"forged-absmax-scale-{i}"] = _tensors(_fill("qweight.absmax_scale", value, index=i))
    for i, value in enumerate([float("nan"), float("inf"), -float("inf")]):
        cases[f"forged-absmax-offset-{i}"] = _tensors(_fill("qweight.absmax_offset", value, index=i))
        cases[f"forged-bias-{i}"] = _tensors(_fill(".bias", value, index=i))
    cases["forged-absmax-q-int32"] = _tensors(_retype("qweight.absmax_q", torch.int32))
    cases["forged-absmax-scale-bf16"] = _tensors(_retype("qweight.absmax_scale", torch.bfloat16))
    cases["forged-qdata-short"] = _tensors(_reshape("qweight.qdata"))
    cases["forged-absmax-q-short"] = _tensors(_reshape("qweight.absmax_q"))
    cases["forged-missing-offset"] = _tensors(_pop("qweight.absmax_offset"))
    cases["forged-extra-tensor"] = _tensors(_add)
    cases["forged-swap"] = _tensors(_swap_differently_shaped)
    return cases


def _tuneqdm_edits() -> dict:
    def config(key, value):
        return edit_json("config", lambda c: c.__setitem__(key, value))

    edits = {
        "n-bits-4": config("n_bits", 4),
        "n-bits-3": config("n_bits", 3),
        "symmetric": config("symmetric", True),
        "symmetric-string": config("symmetric", "False"),
        "steps": config("total_denoising_steps", 500),
        "experts": config("num_experts", 1),
        "delta-in": config("train_delta_in", False),
        "exclude-one": config("exclude", ["0"]),
        "config-unknown": config("x", 1),
        "config-not-json": _set("config", "{"),
        "config-missing": _drop("config"),
        "fingerprint-arch": edit_json("fingerprint", lambda f: f.__setitem__("architecture", "Other")),
        "fingerprint-layer": edit_json("fingerprint", lambda f: f["layers"].popitem()),
        "fingerprint-shape": edit_json(
            "fingerprint", lambda f: next(iter(f["layers"].values())).__setitem__("weight_shape", [1])
        ),
        "fingerprint-list": _set("fingerprint", "[]"),
        "base": _set("base_sha256", "0" * 64),
        "version": _set("format_version", "3"),
        "format": _set("format", "other"),
    }
    cases = {}
    for name, edit in edits.items():
        cases[f"meta-{name}"] = _meta(edit, recompute=False)
        if name != "steps":  # with 2 experts a consistent step count is a valid (different) checkpoint
            cases[f"forged-{name}"] = _meta(edit, recompute=True)
    for i, value in enumerate([float("nan"), float("inf"), -float("inf")]):
        cases[f"forged-delta-out-{i}"] = _tensors(_fill("delta_out", value, index=i))
        cases[f"forged-delta-in-{i}"] = _tensors(_fill("delta_in", value, index=i))
    cases["forged-delta-int"] = _tensors(_retype("delta_out", torch.int32))
    cases["forged-delta-short"] = _tensors(_reshape("delta_in"))
    cases["forged-missing-delta"] = _tensors(_pop("delta_out"))
    cases["forged-extra-tensor"] = _tensors(_add)
    cases["forged-swap"] = _tensors(_swap_differently_shaped)
    cases["meta-checksum-missing"] = _meta(_drop("sha256"), recompute=False)
    cases["tensors-kept-checksum"] = lambda file: rewrite(
        file, tensors=_fill("delta_out", 2.0), recompute_checksum=False
    )
    return cases


# ------------------------------------------------------------------------------------------ subjects
class _Subject:
    """A saved checkpoint, how to load it, and the outputs an identical load reproduces."""

    def __init__(self, tmp, name):
        self.dir = tmp / name
        self.expected = None

    def copy_to(self, tmp):
        target = tmp / "case"
        shutil.copytree(self.dir, target)
        return target


class _QuantSubject(_Subject):
    def __init__(self, tmp, name, config, calibrate):
        super().__init__(tmp, name)
        self.template = _convnet()
        model = copy.deepcopy(self.template)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(model, config, calibrate=calibrate)
        save_quantized(model, self.dir)
        self.expected = self.outputs(model)

    def outputs(self, model):
        with torch.no_grad():
            return model(X)

    def file(self, directory):
        return directory / WEIGHTS_NAME

    def load(self, directory):
        return load_quantized(directory, model=copy.deepcopy(self.template))


class _UNetSubject(_QuantSubject):
    def __init__(self, tmp):
        _Subject.__init__(self, tmp, "unet")
        model = tiny_unet2d().eval()
        self.inputs = example_inputs(model, batch_size=2)
        quantize_(model, QuantConfig(weights=WeightQuantConfig(bits=4, granularity="group", group_size=8)))
        save_quantized(model, self.dir)
        self.expected = self.outputs(model)

    def outputs(self, model):
        with torch.no_grad():
            return model(**self.inputs).sample

    def load(self, directory):
        return load_quantized(directory)  # rebuilt from the saved architecture and model_config


class _DeltaSubject(_Subject):
    CONFIG = TuneQDMConfig(n_bits=4, num_experts=2, train_delta_in=True)

    def __init__(self, tmp):
        super().__init__(tmp, "deltas")
        model = apply_tuneqdm(_convnet(), self.CONFIG)
        with torch.no_grad():
            for p in trainable_delta_parameters(model):
                p.mul_(1 + 0.2 * torch.rand_like(p))
        self.dir.mkdir()
        save_delta_state(model, self.dir)
        self.expected = self.outputs(model)

    def outputs(self, model):
        set_timestep(model, torch.tensor([0, 999, 400, 600]))
        with torch.no_grad():
            return model(X)

    def file(self, directory):
        return directory / "tuneqdm_deltas.safetensors"

    def load(self, directory):
        model = quantize_model(_convnet(), load_delta_config(directory))
        load_delta_state(model, directory)
        return model


def _calibrate(model):
    model(X)


GPTQ = QuantConfig(
    weights=WeightQuantConfig(bits=4, granularity="group", group_size=4, symmetric=False, method="gptq")
)
NF4 = QuantConfig(weights=WeightQuantConfig(format="nf4", bits=4, block_size=32, double_quant=True))


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    return {
        "gptq": _QuantSubject(tmp, "gptq", GPTQ, _calibrate),
        "nf4": _QuantSubject(tmp, "nf4", NF4, None),
        "deltas": _DeltaSubject(tmp),
        "unet": _UNetSubject(tmp),
    }


def _cases() -> list:
    rng = random.Random(14)
    first = "0"  # the first quantized layer of the conv net
    cases = []
    for kind, specific in (("gptq", _int_tensor_edits()), ("nf4", _nf4_tensor_edits())):
        for name, fn in {**_generic(rng, 30, 10), **_quant_layer_edits(first), **specific}.items():
            cases.append(pytest.param(kind, fn, id=f"{kind}-{name}"))
    for name, fn in {**_generic(rng, 40, 14), **_tuneqdm_edits()}.items():
        cases.append(pytest.param("deltas", fn, id=f"deltas-{name}"))

    def unet(edit):
        return edit_json("description", edit)

    unet_edits = {
        "auto-model": unet(lambda d: d.__setitem__("architecture", "AutoModel")),
        "model-mixin": unet(lambda d: d.__setitem__("architecture", "ModelMixin")),
        "not-a-model": unet(lambda d: d.__setitem__("architecture", "DDPMScheduler")),
        "unknown-class": unet(lambda d: d.__setitem__("architecture", "Nope")),
        "config-string": unet(lambda d: d.__setitem__("model_config", "../other/unet")),
        "config-list": unet(lambda d: d.__setitem__("model_config", [1])),
        "config-null": unet(lambda d: d.__setitem__("model_config", None)),
        "norm-groups": unet(lambda d: d["model_config"].__setitem__("norm_num_groups", 5)),
        "channels-huge": unet(lambda d: d["model_config"].__setitem__("block_out_channels", [4096, 4096])),
        "channels-string": unet(lambda d: d["model_config"].__setitem__("block_out_channels", "x")),
        "in-channels": unet(lambda d: d["model_config"].__setitem__("in_channels", 7)),
        "layers-per-block": unet(lambda d: d["model_config"].__setitem__("layers_per_block", 3)),
    }
    for name, edit in unet_edits.items():
        cases.append(pytest.param("unet", _meta(edit, recompute=False), id=f"unet-meta-{name}"))
        cases.append(pytest.param("unet", _meta(edit, recompute=True), id=f"unet-forged-{name}"))
    for i in range(6):
        cases.append(
            pytest.param("unet", _flip(rng.random() * 0.3, rng.randrange(1, 256)), id=f"unet-flip-{i}")
        )
    return cases


CASES = _cases()


def test_there_are_at_least_300_mutations():
    assert len(CASES) >= 300


@pytest.mark.parametrize(("kind", "mutate"), CASES)
def test_mutated_checkpoint_loads_identically_or_is_rejected(subjects, tmp_path, kind, mutate):
    subject = subjects[kind]
    directory = subject.copy_to(tmp_path)
    mutate(subject.file(directory))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = subject.load(directory)
    except CheckpointError as err:
        assert str(err), "a rejection must say why"
        return
    assert torch.equal(subject.outputs(model), subject.expected), "a mutated checkpoint loaded silently"
