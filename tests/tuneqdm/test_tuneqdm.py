"""TuneQDM (Ryu et al., ECCV 2024): TQ layers, per-sample timestep-aware scales, training, checkpoints."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from diffquant import CheckpointError, WeightQuantConfig
from diffquant.models import get_arch_spec
from diffquant.models.tiny import example_inputs, scheduler_for_tests, tiny_unet2d, tiny_unet2d_condition
from diffquant.nn.qmodules import QuantConv2d, QuantLinear
from diffquant.noise import noise_level
from diffquant.tuneqdm import (
    TQConv2d,
    TQLinear,
    TuneQDMConfig,
    apply_tuneqdm,
    delta_param_groups,
    expert_index,
    load_delta_config,
    load_delta_state,
    quantize_model,
    register_tas_pre_hook,
    save_delta_state,
    set_timestep,
    trainable_delta_parameters,
    tuneqdm_layers,
)

MIXED_T = torch.tensor([0, 260, 510, 999, 260])  # experts 0, 1, 2, 3, 1 of 4


def _perturb(params, scale=0.3):
    """Move every delta away from its initial value (different per expert), reproducibly."""
    with torch.no_grad():
        for p in params:
            p.mul_(1 + scale * torch.randn_like(p))


def _linear_layer(**cfg):
    config = TuneQDMConfig(num_experts=4, train_delta_in=True, **cfg)
    layer = TQLinear.from_float(nn.Linear(12, 10), config)
    _perturb(trainable_delta_parameters(layer))
    return layer


def _conv_layer(groups=1):
    config = TuneQDMConfig(num_experts=4, train_delta_in=True)
    layer = TQConv2d.from_float(nn.Conv2d(6, 8, 3, padding=1, groups=groups), config)
    _perturb(trainable_delta_parameters(layer))
    return layer


# --- config ---------------------------------------------------------------------------------------


def test_config_json_round_trip_and_unknown_keys():
    cfg = TuneQDMConfig(n_bits=4, num_experts=4, train_delta_in=True, exclude=(r"conv_in",))
    assert TuneQDMConfig.from_dict(cfg.to_dict()) == cfg
    assert TuneQDMConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown TuneQDMConfig field.*experts"):
        TuneQDMConfig.from_dict({**cfg.to_dict(), "experts": 4})
    assert cfg.bits == cfg.n_bits == 4 and "bits" in cfg.to_dict() and "n_bits" not in cfg.to_dict()
    version_1 = {**cfg.to_dict(), "version": 1}
    version_1["n_bits"] = version_1.pop("bits")
    del version_1["keep_fp"]  # version 1 had no keep_fp and quantized every selected layer
    as_v1 = dataclasses.replace(cfg, keep_fp=())
    assert TuneQDMConfig.from_dict(version_1) == as_v1 == TuneQDMConfig(**version_1)  # the seed's format


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_bits": 3}, ValueError, r"bits in \(2, 4, 8\)"),
        ({"bits": 16}, ValueError, "bits"),
        ({"bits": 4, "n_bits": 2}, ValueError, "pass only one"),
        ({"num_experts": 0}, ValueError, r">= 1 and <= total_denoising_steps \(1000\)"),
        ({"num_experts": 11, "total_denoising_steps": 10}, ValueError, r"<= total_denoising_steps \(10\)"),
        ({"total_denoising_steps": 0}, ValueError, "total_denoising_steps must be >= 1"),
        ({"train_delta_in": False, "train_delta_out": False}, ValueError, "nothing to train"),
        ({"n_bits": 8.0}, TypeError, "bits must be an int"),
        ({"train_delta_in": 1}, TypeError, "True or False"),
        ({"exclude": "conv_in"}, TypeError, "not one string"),
        ({"include": ["("]}, ValueError, "not a valid regex"),
        ({"version": 3}, ValueError, "version"),
    ],
)
def test_config_rejects_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        TuneQDMConfig(**kwargs)


# --- layers at initialisation ---------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
def test_int8_layers_at_init_equal_the_rtn_dequantized_layers(symmetric):
    config = TuneQDMConfig(n_bits=8, num_experts=4, train_delta_in=True, symmetric=symmetric)
    wcfg = WeightQuantConfig(bits=8, granularity="channel", symmetric=symmetric)
    lin, conv = nn.Linear(32, 16), nn.Conv2d(4, 8, 3, padding=1)
    x_lin, x_conv = torch.randn(3, 5, 32), torch.randn(3, 4, 6, 6)
    for module, rtn, x in ((lin, QuantLinear, x_lin), (conv, QuantConv2d, x_conv)):
        tq = (TQConv2d if isinstance(module, nn.Conv2d) else TQLinear).from_float(module, config)
        reference = rtn.from_float(module, wcfg)
        set_timestep(tq, MIXED_T[:3])  # any expert: all start at the min-max scale
        torch.testing.assert_close(tq(x), reference(x), atol=1e-5, rtol=1e-5)
        for e in range(4):
            torch.testing.assert_close(tq.effective_weight(e), reference.weight, atol=1e-7, rtol=1e-6)
        err = (tq(x) - module(x)).norm() / module(x).norm()
        assert err < 1e-2  # INT8 per-channel: close to the float layer


@pytest.mark.parametrize("n_bits", [2, 4, 8])
def test_weights_are_stored_packed(n_bits):
    config = TuneQDMConfig(n_bits=n_bits)
    lin = TQLinear.from_float(nn.Linear(30, 7), config)
    conv = TQConv2d.from_float(nn.Conv2d(3, 5, 3), config)
    for layer, numel in ((lin, 7 * 30), (conv, 5 * 3 * 3 * 3)):
        qdata = layer.qweight.qdata
        assert qdata.dtype == torch.uint8
        assert qdata.numel() == math.ceil(numel * n_bits / 8)
        # nothing else stored is as large as the weight: no float copy is kept
        others = [t for n, t in layer.state_dict().items() if not n.endswith("qdata")]
        assert all(t.numel() < numel for t in others)
        codes = layer.qweight.int_codes()
        assert codes.min() >= 0 and codes.max() <= 2**n_bits - 1
        x = torch.randn(2, 30) if layer is lin else torch.randn(2, 3, 4, 4)
        assert torch.isfinite(layer(x)).all()


def test_frozen_delta_out_keeps_the_min_max_scale(tmp_path):
    config = TuneQDMConfig(num_experts=2, train_delta_in=True, train_delta_out=False)
    lin = nn.Linear(16, 6)
    layer = TQLinear.from_float(lin, config)
    assert layer.delta_out is None and trainable_delta_parameters(layer) == [layer.delta_in]
    x = torch.randn(4, 16)
    set_timestep(layer, torch.tensor([0, 999, 0, 999]))
    reference = QuantLinear.from_float(lin, WeightQuantConfig(bits=8, symmetric=False))
    torch.testing.assert_close(layer(x), reference(x), atol=1e-5, rtol=1e-5)
    with safe_open(str(save_delta_state(layer, tmp_path / "d.safetensors")), framework="pt") as f:
        assert list(f.keys()) == ["delta_in"]


def test_low_precision_forward_and_autocast_backward():
    layer = _linear_layer()
    x = torch.randn(5, 3, 12)
    set_timestep(layer, MIXED_T)
    y32 = layer(x)
    y16 = layer.to(torch.bfloat16)(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert (y16.float() - y32).norm() / y32.norm() < 2e-2
    layer.float()
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.delta_out.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and layer.delta_in.grad.abs().sum() > 0


# --- expert selection -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("t", "n", "total", "expected"),
    [
        ([0, 249, 250, 499, 500, 749, 750, 999], 4, 1000, [0, 0, 1, 1, 2, 2, 3, 3]),
        ([249.99, 250.0, 999.9], 4, 1000, [0, 1, 3]),
        ([0, 333, 334, 666, 667, 999], 3, 1000, [0, 0, 1, 1, 2, 2]),
        ([0, 1, 998, 999], 1000, 1000, [0, 1, 998, 999]),
        ([0, 999], 1, 1000, [0, 0]),
        ([0, 9], 2, 10, [0, 1]),
    ],
)
def test_expert_index_at_boundaries(t, n, total, expected):
    assert expert_index(torch.tensor(t), n, total).tolist() == expected


@pytest.mark.parametrize("t", [-1, 1000, 1000.0, -0.5, float("nan")])
def test_expert_index_rejects_out_of_range(t):
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        expert_index(torch.tensor([10, t]), 4, 1000)


def test_expert_index_rejects_bools():
    with pytest.raises(TypeError, match="bool"):
        expert_index(True, 4, 1000)


@pytest.mark.parametrize("make", [_linear_layer, _conv_layer, lambda: _conv_layer(groups=2)])
def test_mixed_timestep_batch_equals_each_sample_alone(make):
    layer = make()
    shape = (5, 7, 12) if isinstance(layer, TQLinear) else (5, 6, 5, 5)
    x = torch.randn(shape)
    set_timestep(layer, MIXED_T)
    batched = layer(x)
    with noise_level(MIXED_T):  # the noise-context path gives the same result as set_timestep
        set_timestep(layer, None)
        torch.testing.assert_close(layer(x), batched, atol=0, rtol=0)
    for b, t in enumerate(MIXED_T.tolist()):
        set_timestep(layer, t)
        torch.testing.assert_close(layer(x[b : b + 1]), batched[b : b + 1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("make", [_linear_layer, _conv_layer, lambda: _conv_layer(groups=2)])
def test_per_sample_form_matches_the_per_batch_weight_form_with_gradients(make):
    """Efficient form (scale inputs, integer op, scale outputs) == float op with W_e per sample."""
    layer = make()
    shape = (5, 7, 12) if isinstance(layer, TQLinear) else (5, 6, 5, 5)
    x = torch.randn(shape, requires_grad=True)
    set_timestep(layer, MIXED_T)
    y = layer(x)
    grad_out = torch.randn_like(y)
    params = [x, *trainable_delta_parameters(layer)]
    grads = torch.autograd.grad(y, params, grad_out)

    def op(xb, w):
        if isinstance(layer, TQLinear):
            return F.linear(xb, w, layer.bias)
        return F.conv2d(xb, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)

    experts = expert_index(MIXED_T, 4, 1000).tolist()
    y_ref = torch.cat([op(x[b : b + 1], layer.effective_weight(e)) for b, e in enumerate(experts)])
    grads_ref = torch.autograd.grad(y_ref, params, grad_out)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)


def test_backward_keeps_no_float_copy_of_the_weight():
    layer = TQLinear.from_float(nn.Linear(24, 40), TuneQDMConfig(num_experts=2, train_delta_in=True))
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        set_timestep(layer, torch.tensor([0, 999, 0]))
        y = layer(torch.randn(3, 24, requires_grad=True))
    y.sum().backward()
    assert saved and max(math.prod(shape) for shape in saved) < 40 * 24  # activations and scales only
    assert layer.delta_out.grad[1].abs().sum() > 0 and layer.delta_in.grad[0].abs().sum() > 0


def test_timestep_sources_and_errors():
    layer = _linear_layer()
    x = torch.randn(5, 12)
    with pytest.raises(RuntimeError, match=r"set_timestep\(model, t\).*register_tas_pre_hook"):
        layer(x)
    with noise_level(999):
        set_timestep(layer, 0)  # set_timestep wins over the noise level
        torch.testing.assert_close(layer(x), F.linear(x, layer.effective_weight(0), layer.bias))
        set_timestep(layer, None)
        torch.testing.assert_close(layer(x), F.linear(x, layer.effective_weight(3), layer.bias))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        set_timestep(layer, 1000)
    with pytest.raises(ValueError, match="scalar or a \\(B,\\) tensor"):
        set_timestep(layer, torch.zeros(2, 2))
    set_timestep(layer, MIXED_T[:3])
    with pytest.raises(ValueError, match="3 per-sample timesteps"):
        layer(x)
    with noise_level(torch.tensor([5.0, 1200.0])), pytest.raises(ValueError, match="total_denoising_steps"):
        set_timestep(layer, None)
        layer(x[:2])
    single = TQLinear.from_float(nn.Linear(12, 10), TuneQDMConfig(num_experts=1))
    assert single(x).shape == (5, 10)  # one expert: no timestep needed


# --- apply, training ------------------------------------------------------------------------------


def test_apply_tuneqdm_trains_only_the_deltas_and_reduces_the_loss():
    model = tiny_unet2d()
    keep_fp = get_arch_spec(model).is_kept_fp
    float_out_layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    config = TuneQDMConfig(num_experts=4, train_delta_in=True)
    assert apply_tuneqdm(model, config) is model
    assert list(tuneqdm_layers(model)) == [n for n in float_out_layers if not keep_fp(n)]  # arch defaults
    deltas = trainable_delta_parameters(model)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in deltas}
    frozen = {
        k: v.clone() for k, v in model.state_dict().items() if not k.endswith(("delta_out", "delta_in"))
    }

    handle = register_tas_pre_hook(model, 4, num_inference_steps=50, schedule=scheduler_for_tests())
    inputs = example_inputs(model, 8, timesteps=[0, 100, 300, 400, 600, 700, 900, 999], seed=1)
    target = torch.randn_like(inputs["sample"])
    opt = torch.optim.AdamW(deltas, lr=2e-4, weight_decay=0.0)
    losses = []
    for _ in range(8):
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(**inputs).sample, target)
        loss.backward()
        if not losses:
            assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
            conv2 = model.get_submodule("down_blocks.0.resnets.0.conv2")
            assert (conv2.delta_out.grad.abs().sum(dim=1) > 0).all()  # every expert row is used
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    handle.remove()
    with pytest.raises(RuntimeError, match="no timestep"):
        model(**inputs)


def test_delta_param_groups_scale_delta_out_rates_by_the_layer_step():
    models = {
        bits: apply_tuneqdm(tiny_unet2d(seed=0), TuneQDMConfig(n_bits=bits, train_delta_in=True))
        for bits in (8, 4)
    }
    groups = {bits: delta_param_groups(model, lr=1e-2) for bits, model in models.items()}
    for bits, model in models.items():
        grouped = [p for g in groups[bits] for p in g["params"]]
        assert [id(p) for p in grouped] == [id(p) for p in trainable_delta_parameters(model)]
        for layer in tuneqdm_layers(model).values():
            rates = {id(p): g["lr"] for g in groups[bits] for p in g["params"]}
            assert rates[id(layer.delta_in)] == 1e-2
            assert rates[id(layer.delta_out)] == pytest.approx(1e-2 * layer.qweight.scale.mean().item())
    # asymmetric INT8 steps are (max - min) / 255, INT4 ones (max - min) / 15: so are the delta_out rates
    out_rate = {bits: g[0]["lr"] for bits, g in groups.items()}
    assert out_rate[8] / out_rate[4] == pytest.approx(15 / 255, rel=1e-3)
    with pytest.raises(ValueError, match="no trainable TuneQDM deltas"):
        delta_param_groups(tiny_unet2d(), lr=1e-3)


def test_apply_include_exclude_and_errors():
    model = tiny_unet2d()
    apply_tuneqdm(model, TuneQDMConfig(exclude=(r"conv_in", r"time_embedding\..*"), keep_fp=()))
    assert type(model.conv_in) is nn.Conv2d and not model.conv_in.weight.requires_grad
    assert isinstance(model.time_embedding.linear_1, nn.Linear)
    assert isinstance(model.conv_out, TQConv2d)
    with pytest.raises(ValueError, match="already has TuneQDM layers"):
        apply_tuneqdm(model, TuneQDMConfig())
    with pytest.raises(ValueError, match="include pattern .* matches no module"):
        apply_tuneqdm(tiny_unet2d(), TuneQDMConfig(include=(r"nonexistent",)))
    with pytest.raises(ValueError, match="no Linear/Conv2d layer .* left"):
        apply_tuneqdm(tiny_unet2d(), TuneQDMConfig(exclude=(r".*",)))
    reflect = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="padding_mode='reflect'.*exclude"):
        apply_tuneqdm(reflect, TuneQDMConfig())
    assert type(reflect[0]) is nn.Conv2d  # nothing was swapped


def test_register_tas_pre_hook_validates():
    model = apply_tuneqdm(tiny_unet2d(), TuneQDMConfig(num_experts=4))
    with pytest.raises(ValueError, match=r"num_experts=2.*have 4"):
        register_tas_pre_hook(model, 2)
    with pytest.raises(ValueError, match="num_inference_steps"):
        register_tas_pre_hook(model, 4, num_inference_steps=0)
    from diffusers import DDPMScheduler

    with pytest.raises(ValueError, match="500 training timesteps"):
        register_tas_pre_hook(model, 4, schedule=DDPMScheduler(num_train_timesteps=500))
    with pytest.raises(ValueError, match="no TuneQDM layers"):
        register_tas_pre_hook(tiny_unet2d(), 4)
    set_timestep(model, 0)
    register_tas_pre_hook(model, 4)  # clears the fixed timestep
    assert all(layer.timestep_experts is None for layer in tuneqdm_layers(model).values())


def test_unet2d_condition_end_to_end():
    model = tiny_unet2d_condition()
    config = TuneQDMConfig(n_bits=4, num_experts=4, train_delta_in=True, exclude=get_arch_spec(model).keep_fp)
    apply_tuneqdm(model, config)
    assert type(model.conv_in) is nn.Conv2d and isinstance(
        model.down_blocks[0].attentions[0].proj_in, TQConv2d
    )
    register_tas_pre_hook(model, config.num_experts)
    out = model(**example_inputs(model, 4, timesteps=[3, 400, 600, 990])).sample
    assert out.shape == (4, 4, 8, 8) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable_delta_parameters(model))
    with torch.no_grad():  # classifier-free guidance: one scalar timestep for a doubled batch
        cfg_out = model(**example_inputs(model, 2, timesteps=500)).sample
    assert cfg_out.shape == (2, 4, 8, 8)


def test_gradient_checkpointing_needs_set_timestep():
    model = tiny_unet2d_condition()
    model.enable_gradient_checkpointing()
    model.train()
    apply_tuneqdm(model, TuneQDMConfig(num_experts=4))
    register_tas_pre_hook(model, 4)
    inputs = example_inputs(model, 2, timesteps=[1, 999])
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        model(**inputs).sample.sum().backward()  # recomputation runs outside the denoiser call
    set_timestep(model, inputs["timestep"])
    model(**inputs).sample.sum().backward()
    assert all(p.grad is not None for p in trainable_delta_parameters(model))


# --- checkpoints ----------------------------------------------------------------------------------


def _trained_model(config):
    model = apply_tuneqdm(tiny_unet2d(), config)
    _perturb(trainable_delta_parameters(model))
    return model


def test_save_load_round_trip_is_exact(tmp_path):
    config = TuneQDMConfig(num_experts=4, train_delta_in=True)
    model = _trained_model(config)
    path = save_delta_state(model, tmp_path / "dog.safetensors", config=config)
    deltas = trainable_delta_parameters(model)
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert len(keys) == len(deltas) and all(k.endswith(("delta_out", "delta_in")) for k in keys)

    fresh = quantize_model(tiny_unet2d(), load_delta_config(path))
    assert not any(p.requires_grad for p in trainable_delta_parameters(fresh))
    load_delta_state(fresh, path)
    for a, b in zip(deltas, trainable_delta_parameters(fresh), strict=True):
        assert torch.equal(a, b)
    inputs = example_inputs(model, 4, timesteps=[0, 300, 600, 999])
    with torch.no_grad():
        set_timestep(model, inputs["timestep"])
        set_timestep(fresh, inputs["timestep"])
        assert torch.equal(model(**inputs).sample, fresh(**inputs).sample)

    save_delta_state(model, tmp_path)  # a directory gets the default file name
    assert load_delta_config(tmp_path) == config


@pytest.mark.parametrize(
    ("other", "field"),
    [
        ({"bits": 4}, "bits: checkpoint 8, model 4"),
        ({"num_experts": 2}, "num_experts: checkpoint 4, model 2"),
        ({"train_delta_in": False}, "train_delta_in: checkpoint True, model False"),
    ],
)
def test_load_into_another_config_fails(tmp_path, other, field):
    config = TuneQDMConfig(num_experts=4, train_delta_in=True)
    path = save_delta_state(_trained_model(config), tmp_path / "d.safetensors")
    model = quantize_model(tiny_unet2d(), TuneQDMConfig(**{**config.to_dict(), **other}))
    with pytest.raises(CheckpointError, match=field):
        load_delta_state(model, path)


def test_load_into_another_architecture_fails(tmp_path):
    config = TuneQDMConfig(keep_fp=())  # conv_in quantized: it differs between the two UNets
    path = save_delta_state(_trained_model(config), tmp_path / "d.safetensors")
    with pytest.raises(CheckpointError, match="layer 'conv_in'"):
        load_delta_state(quantize_model(tiny_unet2d(in_channels=2), config), path)
    with pytest.raises(CheckpointError, match="for a UNet2DModel, but the model is a UNet2DConditionModel"):
        load_delta_state(quantize_model(tiny_unet2d_condition(), config), path)
    with pytest.raises(ValueError, match="no TuneQDM layers"):
        load_delta_state(tiny_unet2d(), path)
    with pytest.raises(ValueError, match="config differs"):
        save_delta_state(_trained_model(config), tmp_path / "e.safetensors", config=TuneQDMConfig(n_bits=4))


def test_corrupt_or_foreign_checkpoints_fail(tmp_path):
    config = TuneQDMConfig(num_experts=2)
    path = save_delta_state(_trained_model(config), tmp_path / "d.safetensors")
    model = quantize_model(tiny_unet2d(), config)
    data = path.read_bytes()

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file" * 10)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # last byte: tensor data
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(foreign))
    cases = [
        (garbage, "not a readable safetensors"),
        (truncated, "not a readable safetensors"),
        (flipped, "checksum"),
        (foreign, "not a TuneQDM delta checkpoint"),
        (tmp_path / "missing.safetensors", "does not exist"),
    ]
    for bad, match in cases:
        with pytest.raises(CheckpointError, match=match):
            load_delta_state(model, bad)
