"""QLISA: NF4 frozen layers, layerwise sampling, optimizer in backward, finalize + checkpoint round trip."""

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffquant.finetune import class_conditioning, denoising_loss, fit_denoiser
from diffquant.io import load_quantized, save_quantized
from diffquant.models.tiny import example_inputs, scheduler_for_tests, tiny_unet2d
from diffquant.nn.qmodules import QuantConv2d, QuantLinear
from diffquant.qlisa import (
    LayerSampler,
    OptimizerInBackward,
    QLISAConv2d,
    QLISADiffusion,
    QLISALinear,
)
from diffquant.quant.nf4 import dequantize_nf4, quantize_nf4


def _mlp(depth: int = 8, width: int = 16) -> nn.Sequential:
    """``depth`` Linear layers of equal shape with Tanh between (every layer gets a non-zero gradient)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _train_step(model: nn.Module, qlisa: QLISADiffusion, gen: torch.Generator) -> float:
    x = torch.randn(8, 16, generator=gen)
    loss = (model(x) - x.flip(-1)).pow(2).mean()
    loss.backward()
    qlisa.step()
    return loss.item()


def _optimizer_state_tensors(qlisa: QLISADiffusion) -> list[torch.Tensor]:
    return [
        t
        for opt in qlisa.named_optimizers().values()
        for state in opt.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    ]


# ---- layers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [nn.Linear(96, 40), nn.Conv2d(6, 8, 3, padding=1)])
def test_frozen_weight_is_nf4_with_double_quant_block_64(module):
    layer = QLISALinear(module) if isinstance(module, nn.Linear) else QLISAConv2d(module)
    codes = quantize_nf4(module.weight.detach(), block_size=64, double_quant=True)  # bitsandbytes' codes
    assert not layer.active and layer.trainable_weight is None
    assert layer.qweight.block_size == 64 and layer.qweight.double_quant
    assert torch.equal(layer.qweight.qdata, codes.packed)
    assert torch.equal(layer.qweight.absmax_q, codes.absmax_q)
    assert torch.equal(layer.qweight.absmax_scale, codes.absmax_scale)
    torch.testing.assert_close(layer.weight, dequantize_nf4(codes, torch.float32), atol=0, rtol=0)
    assert not any(p.requires_grad for p in layer.parameters())


def test_frozen_forward_computes_in_bf16_and_returns_input_dtype():
    torch.manual_seed(0)
    lin, conv = nn.Linear(64, 32), nn.Conv2d(4, 8, 3, padding=1)
    q_lin, q_conv = QLISALinear(lin), QLISAConv2d(conv)
    x, img = torch.randn(5, 64), torch.randn(2, 4, 6, 6)
    w, b = q_lin.weight, q_lin.bias
    out = q_lin(x)
    assert out.dtype == torch.float32
    # exactly the bf16 computation on the bf16 dequantization
    expected = F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()).float()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    # and close to the fp32 forward with the same NF4 weight
    ref = F.linear(x, w, b)
    assert (out - ref).norm() / ref.norm() < 1e-2
    ref_conv = F.conv2d(img, q_conv.weight, q_conv.bias, padding=1)
    out_conv = q_conv(img)
    assert out_conv.dtype == torch.float32 and (out_conv - ref_conv).norm() / ref_conv.norm() < 1e-2


def test_activate_trains_in_fp32_and_freeze_requantizes():
    torch.manual_seed(0)
    layer = QLISALinear(nn.Linear(64, 32))
    nf4_weight = layer.weight
    layer.activate()
    assert layer.qweight is None and layer.trainable_weight.dtype == torch.float32
    assert layer.trainable_weight.requires_grad and layer.bias.requires_grad
    torch.testing.assert_close(layer.trainable_weight.detach(), nf4_weight, atol=0, rtol=0)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), F.linear(x, nf4_weight, layer.bias), atol=0, rtol=0)
    with torch.no_grad():
        layer.trainable_weight.add_(0.05)
    trained = layer.trainable_weight.detach().clone()
    layer.freeze()
    assert layer.trainable_weight is None and not layer.bias.requires_grad
    assert torch.equal(layer.qweight.qdata, quantize_nf4(trained, 64, True).packed)


# ---- sampling -----------------------------------------------------------------------------------


def test_gamma_larger_than_middle_layers_is_clamped_with_a_warning():
    with pytest.warns(UserWarning, match="gamma=7 is more than the 6 layers"):
        assert QLISADiffusion(_mlp(8), gamma=7).sampler.gamma == 6
    with pytest.raises(ValueError, match="gamma"):
        LayerSampler(5, gamma=-1)
    QLISADiffusion(_mlp(8), gamma=6)  # all middle layers: allowed


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="nothing to train"):
        QLISADiffusion(nn.Sequential(nn.Tanh(), nn.LayerNorm(4)))
    with pytest.raises(ValueError, match="nothing to train"):
        QLISADiffusion(_mlp(3), exclude=[".*"])
    circular = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"), nn.Conv2d(2, 1, 1))
    with pytest.raises(ValueError, match=r"exclude=\['0'\]"):
        QLISADiffusion(circular, gamma=0)
    assert QLISADiffusion(circular, gamma=0, exclude=["0"]).register().layer_names == ("1",)
    assert isinstance(circular[0], nn.Conv2d)  # nothing converted by the failed attempt
    with pytest.raises(ValueError, match="wrap it"):
        QLISADiffusion(nn.Linear(4, 4), gamma=0)
    with pytest.raises(ValueError, match="already quantized"):
        QLISADiffusion(QLISADiffusion(_mlp(3), gamma=1).register().finalize(), gamma=1)
    with pytest.raises(ValueError, match="interval"):
        QLISADiffusion(_mlp(3), gamma=1, interval=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        QLISADiffusion(_mlp(3), gamma=1, max_grad_norm=0.0)


def test_first_and_last_always_active_and_sampling_is_seeded():
    model = _mlp(8)
    qlisa = QLISADiffusion(model, gamma=2, interval=1, seed=3).register().insert_hook()
    first, last = qlisa.layer_names[0], qlisa.layer_names[-1]
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(25):
        active = qlisa.active_layers
        assert active[0] == first and active[-1] == last and len(active) == 4
        assert all(qlisa.layers[name].active == (name in active) for name in qlisa.layer_names)
        seen.update(active)
        _train_step(model, qlisa, gen)
    assert seen == set(qlisa.layer_names)  # every middle layer got its turn
    draws = [LayerSampler(8, 2, seed=3).sample() for _ in range(2)]
    assert draws[0] == draws[1] and LayerSampler(8, 0).sample() == (0, 7)


# ---- optimizer in backward: the three reference defects -----------------------------------------


def test_every_sampled_layer_changes_while_active_and_frozen_ones_do_not():
    """Defect 1: hooks registered only on the layers active at the start."""
    model = _mlp(8)
    interval = 3
    qlisa = QLISADiffusion(model, gamma=2, interval=interval, lr=1e-2, seed=1).register().insert_hook()
    layers, gen = qlisa.layers, torch.Generator().manual_seed(0)
    start = {name: layers[name].weight.detach().clone() for name in qlisa.active_layers}
    initially_active, trained = set(qlisa.active_layers), set()
    for i in range(1, 13 * interval + 1):
        frozen_codes = {n: layers[n].qweight.qdata.clone() for n in layers if n not in qlisa.active_layers}
        x = torch.randn(8, 16, generator=gen)
        (model(x) - x.flip(-1)).pow(2).mean().backward()
        for name, codes in frozen_codes.items():
            assert torch.equal(layers[name].qweight.qdata, codes), f"frozen {name} changed"
        if i % interval == 0:  # the period ends: every active layer must have moved
            for name in qlisa.active_layers:
                assert not torch.equal(layers[name].weight.detach(), start[name]), f"{name} never updated"
                trained.add(name)
        qlisa.step()
        for name in qlisa.active_layers:
            start.setdefault(name, layers[name].weight.detach().clone())
        start = {n: w for n, w in start.items() if n in qlisa.active_layers}
    assert trained - initially_active, "no layer was activated after the start"
    assert trained == set(qlisa.layer_names)


def test_refrozen_layers_free_their_named_optimizers():
    """Defect 2: optimizer states of re-frozen layers never freed."""
    model = _mlp(8)
    qlisa = QLISADiffusion(model, gamma=2, interval=2, lr=1e-2).register().insert_hook()
    gen = torch.Generator().manual_seed(0)
    old_optimizers, old_weights = [], []
    for _ in range(2 * 10):
        active_before = set(qlisa.active_layers)
        opts_before = qlisa.named_optimizers()
        _train_step(model, qlisa, gen)
        left = active_before - set(qlisa.active_layers)
        for name in left:
            old_optimizers += [weakref.ref(o) for k, o in opts_before.items() if k.startswith(name + ".")]
            assert model.get_submodule(name).bias._post_accumulate_grad_hooks in (None, {})
        active_params = {
            f"{n}.{p}" for n in qlisa.active_layers for p in ("trainable_weight", "bias")
        }  # every Linear has a bias
        assert set(qlisa.named_optimizers()) == active_params
        old_weights += [weakref.ref(qlisa.layers[n].trainable_weight) for n in qlisa.active_layers]
    assert old_optimizers, "no layer was re-frozen"
    # freed by reference counting alone (no cycles keep optimizer state alive)
    assert all(ref() is None for ref in old_optimizers)
    alive = {id(ref()) for ref in old_weights if ref() is not None}
    assert alive == {id(qlisa.layers[n].trainable_weight) for n in qlisa.active_layers}


def test_optimizers_are_built_for_the_current_active_set():
    """Defect 3: an optimizer built once from the initial requires_grad set."""
    model = _mlp(8)
    qlisa = QLISADiffusion(model, gamma=1, interval=1, lr=1e-2, seed=2).register().insert_hook()
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 9):
        _train_step(model, qlisa, gen)
        for name in qlisa.active_layers:
            layer = qlisa.layers[name]
            opts = qlisa.named_optimizers()
            assert opts[f"{name}.trainable_weight"].param_groups[0]["params"][0] is layer.trainable_weight
            assert opts[f"{name}.bias"].param_groups[0]["params"][0] is layer.bias
        # the always-active first layer has stepped once per backward, never twice
        first_opt = qlisa.named_optimizers()[f"{qlisa.layer_names[0]}.trainable_weight"]
        assert int(next(iter(first_opt.state.values()))["step"]) == step
    assert all(p.grad is None for p in model.parameters())  # gradients freed right after each step


def test_memory_stays_constant_over_30_resamplings():
    model = _mlp(8)  # equal-shape layers: the same number of active layers holds the same bytes
    qlisa = QLISADiffusion(model, gamma=2, interval=1, lr=1e-2).register().insert_hook()
    gen = torch.Generator().manual_seed(0)
    held = []
    for _ in range(30):
        x = torch.randn(8, 16, generator=gen)
        (model(x) - x.flip(-1)).pow(2).mean().backward()  # every active parameter has stepped once
        tensors = [*model.parameters(), *model.buffers(), *_optimizer_state_tensors(qlisa)]
        held.append(sum(t.numel() * t.element_size() for t in tensors))
        active_numel = sum(p.numel() for n in qlisa.active_layers for p in qlisa.layers[n].parameters())
        n_params = 2 * len(qlisa.active_layers)
        assert len(qlisa.optimizers) == n_params
        # AdamW: exp_avg and exp_avg_sq per element plus one step counter per parameter
        assert sum(t.numel() for t in _optimizer_state_tensors(qlisa)) == 2 * active_numel + n_params
        qlisa.step()  # re-sample
    assert len(set(held)) == 1, f"bytes held changed across re-samplings: {sorted(set(held))}"


# ---- lifecycle, clipping, schedulers ------------------------------------------------------------


def test_lifecycle_order_and_idempotence():
    model = _mlp(4)
    qlisa = QLISADiffusion(model, gamma=1, interval=2)
    with pytest.raises(RuntimeError, match="register"):
        qlisa.insert_hook()
    qlisa.register()
    with pytest.raises(RuntimeError, match="insert_hook"):
        qlisa.step()
    layers = qlisa.layers
    assert qlisa.register().layers == layers  # no re-conversion
    qlisa.insert_hook().insert_hook()
    assert len(qlisa.optimizers) == 2 * len(qlisa.active_layers)
    for name in qlisa.active_layers:
        assert len(model.get_submodule(name).bias._post_accumulate_grad_hooks) == 1
    qlisa.finalize()
    assert all(isinstance(m, QuantLinear) for m in model if not isinstance(m, nn.Tanh))
    with pytest.raises(RuntimeError, match="after finalize"):
        qlisa.step()


def test_per_parameter_clipping_and_scheduler_follow_global_step():
    w = nn.Parameter(torch.zeros(10))
    opt = OptimizerInBackward(lambda ps: torch.optim.SGD(ps, lr=1.0), max_grad_norm=1e-3)
    opt.attach(w)
    (w * 5.0).sum().backward()
    assert w.grad is None and abs(w.detach().norm().item() - 1e-3) < 1e-7  # clipped |g| = 1e-3, lr 1
    opt.detach(w)
    (w * 5.0).sum().backward()  # hook removed: nothing steps any more
    assert w.grad is not None and abs(w.detach().norm().item() - 1e-3) < 1e-7

    model = _mlp(6)

    def halving(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5**s)

    qlisa = QLISADiffusion(model, gamma=2, interval=3, lr=1.0, lr_scheduler=halving).register().insert_hook()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        _train_step(model, qlisa, gen)
    lrs = {name: opt.param_groups[0]["lr"] for name, opt in qlisa.named_optimizers().items()}
    assert lrs and all(lr == 0.5**3 for lr in lrs.values()), lrs  # late layers start at the global lr


# ---- finalize, checkpoint, training -------------------------------------------------------------


def test_finalize_save_load_round_trip_is_exact(tmp_path):
    model = tiny_unet2d()
    qlisa = QLISADiffusion(model, gamma=2, interval=2, lr=1e-3).register().insert_hook()
    sched, gen = scheduler_for_tests(), torch.Generator().manual_seed(0)
    x0, labels = torch.randn(4, 1, 8, 8, generator=gen), torch.arange(4)
    for _ in range(4):
        denoising_loss(model, x0, sched, class_conditioning(labels), generator=gen).backward()
        qlisa.step()
    model = qlisa.finalize().eval()
    assert {type(m) for m in model.modules()} & {QuantLinear, QuantConv2d} == {QuantLinear, QuantConv2d}
    assert not any(isinstance(m, QLISALinear | QLISAConv2d) for m in model.modules())
    inputs = example_inputs(model, batch_size=3, timesteps=[999, 500, 3])
    with torch.no_grad():
        expected = model(**inputs).sample
    save_quantized(model, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt")
    with torch.no_grad():
        out = loaded(**inputs).sample
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert loaded.conv_in.qweight.meta() == {"format": "nf4", "shape": [8, 1, 3, 3], "block_size": 64,
                                             "double_quant": True}  # fmt: skip


def test_sequential_round_trip_with_given_model(tmp_path):
    model = _mlp(3)
    qlisa = QLISADiffusion(model, gamma=1).register().insert_hook()
    model = qlisa.finalize()
    x = torch.randn(2, 16)
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path, model=_mlp(3))
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_short_training_on_tiny_unet_lowers_the_loss():
    model = tiny_unet2d()
    sched = scheduler_for_tests()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 1, 8, 8, generator=gen).clamp(-1, 1)
    labels = torch.randint(0, 10, (16,), generator=gen)

    def held_out_loss() -> float:
        with torch.no_grad():
            g = torch.Generator().manual_seed(123)
            return denoising_loss(model, x0, sched, class_conditioning(labels), generator=g).item()

    qlisa = QLISADiffusion(model, gamma=2, interval=5, lr=3e-3).register().insert_hook()
    before = held_out_loss()
    sampled = set()

    def after_step() -> None:
        sampled.update(qlisa.active_layers)
        qlisa.step()

    fit_denoiser(
        model,
        None,
        x0,
        class_conditioning(labels),
        sched,
        steps=40,
        batch_size=16,
        after_step=after_step,
        progress=False,
    )
    assert qlisa.global_step == 40
    model = qlisa.finalize()
    after = held_out_loss()
    assert after < 0.7 * before, (before, after)
    assert len(sampled) >= 2 + 2 * 4  # first, last and fresh middle layers in several periods


# ---- the seed's usage: register(), insert_hook(), a plain loop without step() ---------------------


def test_seed_usage_without_step_resamples_and_matches_a_loop_with_step():
    def train(call_step: bool):
        model = _mlp(8)
        qlisa = QLISADiffusion(model, gamma=1, interval=3, lr=1e-2, seed=4)
        qlisa.register()
        qlisa.insert_hook()
        gen, seen = torch.Generator().manual_seed(0), []
        for _ in range(12):
            x = torch.randn(8, 16, generator=gen)
            (model(x) - x.flip(-1)).pow(2).mean().backward()
            if call_step:
                qlisa.step()
            seen.append(qlisa.active_layers)
        assert qlisa.global_step == 12
        return qlisa.finalize().state_dict(), seen

    without, seen_without = train(call_step=False)
    with_step, seen_with = train(call_step=True)
    middle = {layers[1] for layers in seen_without}
    assert len(middle) > 1, "a plain loop trained one fixed set of layers"
    assert without.keys() == with_step.keys() and all(torch.equal(without[k], with_step[k]) for k in without)
    # re-sampled at step() (right after backward) or before the next forward: one step apart
    assert seen_without[1:] == seen_with[:-1]


def test_seed_000_minimal_example_clamps_an_explicit_gamma():
    class SimpleModel(nn.Module):
        def __init__(self, in_features, out_features):
            super().__init__()
            self.linear = nn.Linear(in_features, out_features)

        def forward(self, x):
            return self.linear(x)

    with pytest.warns(UserWarning, match="gamma=2 is more than the 0 layers"):
        qlisa = QLISADiffusion(SimpleModel(10, 2), gamma=2)
    assert qlisa.sampler.gamma == 0 and qlisa.register().active_layers == ("linear",)
