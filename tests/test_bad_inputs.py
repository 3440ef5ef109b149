"""Every bad input gets a clear error (or warning) at construction or call time, naming the problem;
a call that fails leaves the model exactly as it was."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from diffquant import (
    ActivationQuantConfig,
    CheckpointError,
    QuantConfig,
    WeightQuantConfig,
    load_quantized,
    quantize_,
    save_quantized,
)
from diffquant.cli import main
from diffquant.config import CalibrationConfig
from diffquant.devices import check_device
from diffquant.errors import NumericalWarning
from diffquant.io import WEIGHTS_NAME
from diffquant.tuneqdm import (
    TuneQDMConfig,
    apply_tuneqdm,
    load_delta_state,
    quantize_model,
    save_delta_state,
    trainable_delta_parameters,
)

W4 = QuantConfig(weights=WeightQuantConfig(bits=4))


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 8))


def _convnet(padding_mode: str = "zeros") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode=padding_mode),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 4),
    )


def _with_nan(what: str) -> nn.Module:
    model = _mlp()
    with torch.no_grad():
        getattr(model[2], what)[0] = float("nan")
    return model


def _meta_model() -> nn.Module:
    with torch.device("meta"):
        return _mlp()


def _snapshot(model: nn.Module):
    return [(n, type(m)) for n, m in model.named_modules()], {
        k: v.clone() for k, v in model.state_dict().items()
    }


def _same(model: nn.Module, snapshot) -> bool:
    modules, state = snapshot
    now = model.state_dict()
    return [(n, type(m)) for n, m in model.named_modules()] == modules and all(
        torch.allclose(now[k], v, rtol=0, atol=0, equal_nan=True) for k, v in state.items()
    )


def _raise(exc):
    raise exc


# (id, call, error type, regex the message must match)
CONFIG_CASES = [
    (
        "weight-symmetric-string",
        lambda: WeightQuantConfig(symmetric="False"),
        TypeError,
        "symmetric must be True or False",
    ),
    ("weight-symmetric-int", lambda: WeightQuantConfig(symmetric=0), TypeError, "symmetric"),
    (
        "weight-double-quant-string",
        lambda: WeightQuantConfig(format="nf4", bits=4, double_quant="yes"),
        TypeError,
        "double_quant",
    ),
    ("weight-act-order-int", lambda: WeightQuantConfig(act_order=1), TypeError, "act_order"),
    ("damping-bool", lambda: WeightQuantConfig(damping=True), ValueError, "damping"),
    ("damping-zero", lambda: WeightQuantConfig(damping=0), ValueError, "damping"),
    ("damping-negative", lambda: WeightQuantConfig(damping=-0.1), ValueError, "damping"),
    ("damping-string", lambda: WeightQuantConfig(damping="0.01"), ValueError, "damping"),
    ("bits-1", lambda: WeightQuantConfig(bits=1), ValueError, "2..8 bits"),
    ("bits-9", lambda: WeightQuantConfig(bits=9), ValueError, "2..8 bits"),
    ("bits-float", lambda: WeightQuantConfig(bits=4.0), ValueError, "2..8 bits"),
    ("bits-bool", lambda: WeightQuantConfig(bits=True), ValueError, "2..8 bits"),
    ("format-unknown", lambda: WeightQuantConfig(format="fp8"), ValueError, "format='fp8'"),
    ("granularity-unknown", lambda: WeightQuantConfig(granularity="row"), ValueError, "granularity='row'"),
    ("group-without-size", lambda: WeightQuantConfig(granularity="group"), ValueError, "group_size"),
    (
        "group-size-zero",
        lambda: WeightQuantConfig(granularity="group", group_size=0),
        ValueError,
        "group_size",
    ),
    (
        "group-size-with-channel",
        lambda: WeightQuantConfig(group_size=32),
        ValueError,
        "only used with granularity='group'",
    ),
    ("range-method-unknown", lambda: WeightQuantConfig(range_method="max"), ValueError, "range_method='max'"),
    ("nf4-8-bits", lambda: WeightQuantConfig(format="nf4", bits=8), ValueError, "NF4 is a 4-bit format"),
    (
        "nf4-block-48",
        lambda: WeightQuantConfig(format="nf4", bits=4, block_size=48),
        ValueError,
        "power of two",
    ),
    ("nf4-block-16", lambda: WeightQuantConfig(format="nf4", bits=4, block_size=16), ValueError, "32..4096"),
    (
        "nf4-group",
        lambda: WeightQuantConfig(format="nf4", bits=4, granularity="group", group_size=64),
        ValueError,
        "NF4 does not use",
    ),
    (
        "nf4-asymmetric",
        lambda: WeightQuantConfig(format="nf4", bits=4, symmetric=False),
        ValueError,
        "NF4 does not use.*symmetric",
    ),
    (
        "nf4-range-method",
        lambda: WeightQuantConfig(format="nf4", bits=4, range_method="mse"),
        ValueError,
        "range_method",
    ),
    ("int-block-size", lambda: WeightQuantConfig(bits=4, block_size=128), ValueError, "NF4 settings"),
    ("int-double-quant", lambda: WeightQuantConfig(bits=4, double_quant=False), ValueError, "NF4 settings"),
    ("sequential-unknown", lambda: WeightQuantConfig(sequential="all"), ValueError, "sequential='all'"),
    (
        "fallback-group",
        lambda: WeightQuantConfig(fallback_granularity="group"),
        ValueError,
        "fallback_granularity",
    ),
    (
        "act-bits-16",
        lambda: ActivationQuantConfig(bits=16),
        ValueError,
        "activation INT quantization supports 2..8",
    ),
    (
        "act-symmetric-string",
        lambda: ActivationQuantConfig(symmetric="True"),
        TypeError,
        "symmetric must be True or False",
    ),
    ("act-mode-empty", lambda: ActivationQuantConfig(mode=""), ValueError, "non-empty string"),
    ("act-range-method", lambda: ActivationQuantConfig(range_method="x"), ValueError, "range_method='x'"),
    ("act-percentile-low", lambda: ActivationQuantConfig(percentile=10), ValueError, "percentile"),
    ("act-percentile-string", lambda: ActivationQuantConfig(percentile="99"), TypeError, "percentile"),
    ("calib-steps-zero", lambda: CalibrationConfig(num_steps=0), ValueError, "num_steps"),
    ("calib-samples-bool", lambda: CalibrationConfig(samples_per_step=True), ValueError, "samples_per_step"),
    ("calib-merge-negative", lambda: CalibrationConfig(merge_batch=-1), ValueError, "merge_batch"),
    ("quant-version", lambda: QuantConfig(version=3), ValueError, "version 3"),
    (
        "quant-weights-none",
        lambda: QuantConfig(weights=None),
        TypeError,
        "weights must be a WeightQuantConfig",
    ),
    ("quant-activations-string", lambda: QuantConfig(activations="int8"), TypeError, "activations must be"),
    ("quant-include-string", lambda: QuantConfig(include="conv"), TypeError, "not a single string"),
    ("quant-exclude-bad-regex", lambda: QuantConfig(exclude=["("]), ValueError, "not a valid regex"),
    (
        "quant-from-dict-unknown",
        lambda: QuantConfig.from_dict({"bogus": 1}),
        ValueError,
        "unknown QuantConfig field",
    ),
    ("quant-from-dict-string", lambda: QuantConfig.from_dict("x"), TypeError, "expects a dict"),
    ("tuneqdm-3-bits", lambda: TuneQDMConfig(n_bits=3), ValueError, "bits in"),
    ("tuneqdm-bits-bool", lambda: TuneQDMConfig(n_bits=True), TypeError, "bits must be an int"),
    ("tuneqdm-experts-zero", lambda: TuneQDMConfig(num_experts=0), ValueError, "num_experts"),
    (
        "tuneqdm-steps-zero",
        lambda: TuneQDMConfig(total_denoising_steps=0),
        ValueError,
        "total_denoising_steps",
    ),
    ("tuneqdm-flag-string", lambda: TuneQDMConfig(train_delta_in="yes"), TypeError, "train_delta_in"),
    (
        "tuneqdm-nothing-to-train",
        lambda: TuneQDMConfig(train_delta_out=False),
        ValueError,
        "nothing to train",
    ),
    ("tuneqdm-include-string", lambda: TuneQDMConfig(include="x"), TypeError, "not one string"),
    ("device-nonsense", lambda: check_device("gpu0"), ValueError, "is not a device"),
    ("device-meta", lambda: check_device("meta"), ValueError, "holds no data"),
]


@pytest.mark.parametrize(("call", "error", "match"), [pytest.param(*c[1:], id=c[0]) for c in CONFIG_CASES])
def test_bad_configs_and_arguments_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _static():
    return QuantConfig(weights=WeightQuantConfig(bits=8), activations=ActivationQuantConfig(bits=8))


def _gptq():
    return QuantConfig(weights=WeightQuantConfig(bits=4, method="gptq"))


# (id, model factory, call(model) , error type, regex); the model must be unchanged afterwards
QUANTIZE_CASES = [
    ("config-dict", _mlp, lambda m: quantize_(m, {"bits": 4}), TypeError, "must be a diffquant.QuantConfig"),
    (
        "calibrate-not-callable",
        _mlp,
        lambda m: quantize_(m, _static(), calibrate=5),
        TypeError,
        "calibrate must be",
    ),
    (
        "unknown-method",
        _mlp,
        lambda m: quantize_(m, QuantConfig(weights=WeightQuantConfig(method="awq"))),
        ValueError,
        "unknown weight method 'awq'",
    ),
    (
        "unknown-act-mode",
        _mlp,
        lambda m: quantize_(m, QuantConfig(activations=ActivationQuantConfig(mode="magic"))),
        ValueError,
        "unknown activation mode 'magic'",
    ),
    (
        "static-without-calibrate",
        _mlp,
        lambda m: quantize_(m, _static()),
        ValueError,
        "needs calibration data",
    ),
    (
        "gptq-without-calibrate",
        _mlp,
        lambda m: quantize_(m, _gptq()),
        ValueError,
        "weight method 'gptq' needs calibration",
    ),
    (
        "nan-weight",
        lambda: _with_nan("weight"),
        lambda m: quantize_(m, W4),
        ValueError,
        "layer '2' has NaN/Inf weights",
    ),
    (
        "nan-bias",
        lambda: _with_nan("bias"),
        lambda m: quantize_(m, W4),
        ValueError,
        "layer '2' has NaN/Inf bias",
    ),
    ("meta-device", _meta_model, lambda m: quantize_(m, W4), ValueError, "meta device"),
    (
        "group-size-not-dividing",
        _mlp,
        lambda m: quantize_(
            m, QuantConfig(weights=WeightQuantConfig(bits=4, granularity="group", group_size=5))
        ),
        ValueError,
        "does not divide",
    ),
    (
        "padding-mode-reflect",
        lambda: _convnet("reflect"),
        lambda m: quantize_(m, W4),
        ValueError,
        "padding_mode='zeros' only",
    ),
    (
        "gptq-nf4",
        _mlp,
        lambda m: quantize_(
            m,
            QuantConfig(weights=WeightQuantConfig(format="nf4", bits=4, method="gptq")),
            calibrate=lambda x: x(torch.randn(4, 16)),
        ),
        ValueError,
        "quantizes INT weights",
    ),
    (
        "calibrate-raises",
        _mlp,
        lambda m: quantize_(m, _static(), calibrate=lambda x: _raise(RuntimeError("sampler broke"))),
        RuntimeError,
        "sampler broke",
    ),
    (
        "calibrate-runs-nothing",
        _mlp,
        lambda m: quantize_(m, _static(), calibrate=lambda x: None),
        ValueError,
        "calibration",
    ),
    (
        "calibrate-nan-inputs",
        _mlp,
        lambda m: quantize_(m, _static(), calibrate=lambda x: x(torch.full((2, 16), float("nan")))),
        ValueError,
        "NaN/Inf",
    ),
    ("bad-schedule", _mlp, lambda m: quantize_(m, W4, schedule="cosine"), TypeError, "schedule"),
    ("save-unquantized", _mlp, lambda m: save_quantized(m, "unused-dir"), ValueError, "not quantized"),
    (
        "load-model-not-module",
        _mlp,
        lambda m: load_quantized("/nonexistent", model="unet"),
        CheckpointError,
        "missing",
    ),
]


@pytest.mark.parametrize(
    ("factory", "call", "error", "match"), [pytest.param(*c[1:], id=c[0]) for c in QUANTIZE_CASES]
)
def test_failing_calls_raise_clear_errors_and_leave_the_model_unchanged(factory, call, error, match):
    model = factory()
    before = _snapshot(model) if not next(model.parameters()).is_meta else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=match):
            call(model)
    if before is not None:
        assert _same(model, before)
        assert getattr(model, "diffquant_config", None) is None
        assert not model._forward_pre_hooks, "a noise-context hook was left behind"


def test_a_model_whose_quantization_failed_can_be_quantized_again():
    model = _convnet("reflect")
    with pytest.raises(ValueError, match="padding_mode"):
        quantize_(model, W4)
    quantize_(model, QuantConfig(weights=WeightQuantConfig(bits=4), exclude=["2"]))
    assert type(model[0]).__name__ == "QuantConv2d" and type(model[2]) is nn.Conv2d


def test_already_quantized_model_is_refused():
    model = quantize_(_mlp(), W4)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, W4)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        quantize_(None, W4)


@pytest.fixture
def checkpoint(tmp_path):
    model = quantize_(_mlp(), W4)
    return save_quantized(model, tmp_path / "ckpt"), model


def _forge_nan_scale(directory):
    from checkpoint_tools import rewrite

    def edit(tensors):
        tensors["2.qweight.scale"][0, 0] = float("nan")

    rewrite(directory / WEIGHTS_NAME, tensors=edit)


LOAD_CASES = [
    (
        "wrong-architecture",
        lambda d: load_quantized(d, model=_convnet()),
        CheckpointError,
        "is for a Sequential|does not exist|layer",
    ),
    (
        "other-configuration",
        lambda d: load_quantized(d, model=nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 9))),
        CheckpointError,
        "layer '2'.*out_features",
    ),
    ("not-a-checkpoint", lambda d: load_quantized(d.parent, model=_mlp()), CheckpointError, "missing"),
    ("no-model-for-generic", lambda d: load_quantized(d), CheckpointError, "pass the float model"),
    (
        "already-quantized",
        lambda d: load_quantized(d, model=quantize_(_mlp(), W4)),
        CheckpointError,
        "already quantized",
    ),
    ("device-cuda-missing", lambda d: load_quantized(d, model=_mlp(), device="cuda:99"), ValueError, "CUDA"),
    ("device-nonsense", lambda d: load_quantized(d, model=_mlp(), device="tpu9"), ValueError, "not a device"),
]


@pytest.mark.parametrize(("call", "error", "match"), [pytest.param(*c[1:], id=c[0]) for c in LOAD_CASES])
def test_bad_loads_raise_clear_errors(checkpoint, call, error, match):
    with pytest.raises(error, match=match):
        call(checkpoint[0])


def test_a_failed_load_leaves_the_given_model_untouched(checkpoint):
    directory, _ = checkpoint
    _forge_nan_scale(directory)
    model = _mlp(seed=5)
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match="layer '2'.*scale.*NaN"):
        load_quantized(directory, model=model)
    assert _same(model, before)


def test_nan_in_a_quantized_model_is_refused_at_save(tmp_path):
    model = quantize_(_mlp(), W4)
    with torch.no_grad():
        model[0].bias[0] = float("inf")
    with pytest.raises(ValueError, match="'0.bias' contains NaN/Inf"):
        save_quantized(model, tmp_path)
    assert not any(tmp_path.iterdir())
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="existing file"):
        save_quantized(quantize_(_mlp(), W4), target)


def test_tuneqdm_bad_inputs(tmp_path):
    config = TuneQDMConfig(n_bits=4)
    model = apply_tuneqdm(_mlp(), config)
    with pytest.raises(ValueError, match="already has TuneQDM layers"):
        apply_tuneqdm(model, config)
    with pytest.raises(TypeError, match="must be a TuneQDMConfig"):
        apply_tuneqdm(_mlp(), W4)
    path = save_delta_state(model, tmp_path / "d.safetensors")
    with pytest.raises(ValueError, match="no TuneQDM layers"):
        load_delta_state(_mlp(), path)
    other_base = quantize_model(_mlp(seed=9), config)
    with pytest.raises(CheckpointError, match="other frozen weights.*allow_different_base"):
        load_delta_state(other_base, path)
    load_delta_state(other_base, path, allow_different_base=True)  # an explicit opt-in
    with torch.no_grad():
        trainable_delta_parameters(model)[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer '2'.*finite"):
        save_delta_state(model, tmp_path / "e.safetensors")
    assert not (tmp_path / "e.safetensors").exists()


def test_all_zero_calibration_inputs_warn_instead_of_zeroing_a_gptq_layer():
    model = _mlp()
    float_weight = model[0].weight.detach().clone()
    with pytest.warns(NumericalWarning, match="layer '0'.*zero"):
        quantize_(model, _gptq(), calibrate=lambda m: m(torch.zeros(8, 16)))
    assert model[0].weight.abs().sum() > 0  # round-to-nearest kept, not a zeroed layer
    torch.testing.assert_close(model[0].weight, float_weight, atol=0.3, rtol=0)


def test_nf4_outlier_block_warns_naming_the_layer():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = 1000.0
    with pytest.warns(NumericalWarning, match="layer '0'.*outlier block"):
        quantize_(model, QuantConfig(weights=WeightQuantConfig(format="nf4", bits=4, block_size=32)))


def test_normal_weights_give_no_numerical_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)
        quantize_(_mlp(), QuantConfig(weights=WeightQuantConfig(format="nf4", bits=4, block_size=32)))
        quantize_(_mlp(), _gptq(), calibrate=lambda m: m(torch.randn(32, 16)))


CLI_CASES = [
    (
        "block-size-with-int",
        ["quantize", "digits", "--out", "o", "--weights", "int4", "--block-size", "128"],
        "--block-size",
    ),
    (
        "nf4-group-size",
        ["quantize", "digits", "--out", "o", "--weights", "nf4", "--group-size", "64"],
        "NF4 takes --block-size only",
    ),
    (
        "nf4-asymmetric",
        ["quantize", "digits", "--out", "o", "--weights", "nf4", "--asymmetric"],
        "NF4 takes --block-size only",
    ),
    (
        "nf4-range-method",
        ["quantize", "digits", "--out", "o", "--weights", "nf4", "--range-method", "mse"],
        "NF4",
    ),
    ("activations-no-mode", ["quantize", "digits", "--out", "o", "--activations", "int8"], "INTn-MODE"),
    ("activations-bits", ["quantize", "digits", "--out", "o", "--activations", "int9-static"], "2..8"),
    ("model-folder-missing", ["quantize", "/nonexistent/model", "--out", "o"], "has no config.json"),
    ("info-missing", ["info", "/nonexistent/ckpt"], "missing"),
    ("efficientdm-bits", ["efficientdm", "--bits", "W4"], "--bits must look like"),
]


@pytest.mark.parametrize(("argv", "match"), [pytest.param(*c[1:], id=c[0]) for c in CLI_CASES])
def test_cli_bad_inputs_exit_2_with_a_message(tmp_path, monkeypatch, capsys, argv, match):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match.lower() in err.lower(), err


def test_cli_info_on_an_edited_checkpoint_names_the_checksum(checkpoint, capsys):
    directory, _ = checkpoint
    data = bytearray((directory / WEIGHTS_NAME).read_bytes())
    data[-3] ^= 0x10
    (directory / WEIGHTS_NAME).write_bytes(bytes(data))
    assert main(["info", str(directory)]) == 2
    assert "checksum" in capsys.readouterr().err


def test_cli_unknown_choice_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "digits", "--out", "o", "--weights", "int9"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_there_are_at_least_80_bad_input_cases():
    assert len(CONFIG_CASES) + len(QUANTIZE_CASES) + len(LOAD_CASES) + len(CLI_CASES) + 11 >= 80
