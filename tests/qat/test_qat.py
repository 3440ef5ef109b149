import pytest
import torch
from torch import nn

from diffquant import (
    ActivationQuantConfig,
    QuantConfig,
    WeightQuantConfig,
    load_quantized,
    quantize_,
    save_quantized,
)
from diffquant.finetune import class_conditioning, denoising_loss, fit_denoiser
from diffquant.kernels import kernel_mode
from diffquant.models.tiny import example_inputs, scheduler_for_tests, tiny_unet2d
from diffquant.nn.act_quant import StaticActivationQuantizer
from diffquant.nn.packed import IntPackedWeight
from diffquant.nn.qmodules import QuantConv2d, QuantLinear, is_quantized_layer
from diffquant.qat import (
    QATConv2d,
    QATLinear,
    convert,
    fuse_conv_bn,
    fuse_modules,
    is_qat_layer,
    prepare_qat,
    qat_finetune,
    qat_layers,
)

W4A8 = QuantConfig(
    weights=WeightQuantConfig(bits=4, symmetric=False), activations=ActivationQuantConfig(bits=8)
)


class ConvBNNet(nn.Module):
    """Conv+BN+ReLU in a Sequential, a named conv/bn pair outside one, a plain Conv2d and a Linear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.conv = nn.Conv2d(6, 8, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.mix = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        x = self.act(self.bn(self.conv(self.features(x))))
        return self.head(self.mix(x).flatten(1))


def _net(seed=0) -> ConvBNNet:
    """An eval-mode net whose BatchNorms hold non-trivial running statistics and affine parameters."""
    torch.manual_seed(seed)
    net = ConvBNNet().train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 2, 8, 8) * 2 + 0.5)
        for bn in (net.features[1], net.bn):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net.eval()


def _fused_net(seed=0) -> ConvBNNet:
    return fuse_modules(fuse_conv_bn(_net(seed)), [["conv", "bn", "act"]])


def _train(model, steps=4, lr=1e-2):
    """A few optimizer steps so weights, ranges and step sizes move away from their initial values."""
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(torch.randn(16, 2, 8, 8, generator=gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# --- fusion -----------------------------------------------------------------------------------------


def test_fusion_matches_conv_bn_outputs():
    net = _net()
    x = torch.randn(8, 2, 8, 8)
    with torch.no_grad():
        expected = net(x)
        fused = _fused_net()
        out = fused(x)
    assert isinstance(fused.features[1], nn.Identity) and isinstance(fused.bn, nn.Identity)
    assert isinstance(fused.features[2], nn.ReLU) and isinstance(fused.act, nn.ReLU)  # ReLU kept
    assert fused.conv.bias is not None  # the bias-free conv gained the BN shift
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_fusion_errors():
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        fuse_conv_bn(_net().train())
    with pytest.raises(TypeError, match="Conv2d followed by nn.BatchNorm2d"):
        fuse_modules(_net(), [["head", "bn"]])
    with pytest.raises(ValueError, match="not a conv/bn pair"):
        fuse_modules(_net(), [["mix", "bn"]])
    with pytest.raises(TypeError, match="nn.ReLU"):
        fuse_modules(_net(), [["conv", "bn", "mix"]])
    with pytest.raises(ValueError, match="no attribute|named_modules"):
        fuse_modules(_net(), [["conv", "nope"]])
    net = _net()
    net.bn.train()
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        fuse_modules(net, [["features.0", "features.1"], ["conv", "bn"]])
    assert isinstance(net.features[1], nn.BatchNorm2d)  # nothing changed when one group is bad


# --- QAT layers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_range", ["observer", "lsq"])
def test_ste_gradients_reach_float_weights(weight_range):
    conv = QATConv2d.from_float(nn.Conv2d(3, 4, 3), W4A8.weights, W4A8.activations, weight_range=weight_range)
    lin = QATLinear.from_float(nn.Linear(16, 8), W4A8.weights, W4A8.activations, weight_range=weight_range)
    conv(torch.randn(2, 3, 6, 6)).square().sum().backward()
    lin(torch.randn(4, 16)).square().sum().backward()
    for layer in (conv, lin):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
        assert layer.bias.grad.abs().sum() > 0
    # the forward uses the fake-quantized weight: at most 16 levels per output channel
    w_hat = lin.weight_fake_quant(lin.weight)
    assert all(row.unique().numel() <= 16 for row in w_hat)
    assert not torch.equal(w_hat, lin.weight)


def test_observer_updates_in_train_mode_only():
    lin = QATLinear.from_float(nn.Linear(4, 4), W4A8.weights, W4A8.activations)
    fq = lin.input_fake_quant
    with pytest.raises(RuntimeError, match="training mode"):
        lin.eval()(torch.randn(2, 4))  # no range observed yet
    lin.train()(torch.full((2, 4), 2.0))
    assert fq.min_val.item() == 2.0 and fq.max_val.item() == 2.0  # first batch sets the range
    lin(torch.full((2, 4), -8.0))
    assert fq.min_val.item() == pytest.approx(2.0 - 0.01 * 10.0)  # moving average, constant 0.01
    before = (fq.min_val.clone(), fq.max_val.clone())
    lin.eval()(torch.full((2, 4), 100.0))
    assert torch.equal(fq.min_val, before[0]) and torch.equal(fq.max_val, before[1])


def test_lsq_step_sizes_and_zero_points_get_gradients():
    lin = QATLinear.from_float(
        nn.Linear(16, 8), W4A8.weights, W4A8.activations, weight_range="lsq", act_range="lsq"
    )
    x = torch.randn(32, 16) * 3 + 1
    lin(x)  # first training batch initialises the activation range
    step_before = lin.input_fake_quant.step.detach().clone()
    lin(x).square().sum().backward()
    wq, aq = lin.weight_fake_quant, lin.input_fake_quant
    assert wq.step.shape == (8, 1)  # per output channel
    for p in (wq.step, wq.zero_point, aq.step, aq.zero_point):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert torch.equal(aq.step.detach(), step_before)  # initialised once, not re-observed
    assert step_before.item() == pytest.approx((x.max() - x.min()).item() / 255, rel=1e-6)


# --- prepare / convert ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weight_range,act_range,bits,symmetric",
    [
        ("observer", "observer", 4, False),
        ("lsq", "lsq", 4, False),
        ("observer", "lsq", 2, True),
        ("lsq", "observer", 8, True),
    ],
)
def test_convert_reproduces_eval_mode_qat_outputs_exactly(weight_range, act_range, bits, symmetric):
    config = QuantConfig(
        weights=WeightQuantConfig(bits=bits, symmetric=symmetric), activations=ActivationQuantConfig(bits=8)
    )
    model = _train(prepare_qat(_fused_net(), config, weight_range=weight_range, act_range=act_range))
    assert set(qat_layers(model)) == {"features.0", "conv", "mix", "head"}
    x = torch.randn(8, 2, 8, 8)
    with torch.no_grad(), kernel_mode("reference"):  # the fake-quant path is exact; int8 kernels round
        expected = model(x)
        convert(model)
        out = model(x)
    assert torch.equal(out, expected)
    assert not qat_layers(model)
    assert isinstance(model.head, QuantLinear) and isinstance(model.conv, QuantConv2d)
    assert isinstance(model.conv.qweight, IntPackedWeight) and model.conv.qweight.bits == bits
    assert isinstance(model.head.input_quant, StaticActivationQuantizer) and bool(
        model.head.input_quant.calibrated
    )
    assert model.diffquant_config == config


def test_weight_only_qat_and_group_granularity_convert_exactly():
    config = QuantConfig(
        weights=WeightQuantConfig(bits=3, granularity="group", group_size=2, symmetric=False)
    )
    model = _train(prepare_qat(_fused_net(), config, weight_range="lsq"))
    x = torch.randn(4, 2, 8, 8)
    with torch.no_grad():
        expected = model(x)
        out = convert(model)(x)
    assert torch.equal(out, expected)
    assert model.head.input_quant is None and model.head.qweight.scale.shape == (5, 18)


def test_converted_model_save_load_round_trip(tmp_path):
    model = convert(_train(prepare_qat(_fused_net(), W4A8, weight_range="lsq")))
    x = torch.randn(4, 2, 8, 8)
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path, model=_fused_net(seed=5))  # fresh float weights, same fusion
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.diffquant_config == W4A8


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="2..8 bits"):
        WeightQuantConfig(bits=9)
    with pytest.raises(ValueError, match="format='int'"):
        prepare_qat(_fused_net(), QuantConfig(weights=WeightQuantConfig(format="nf4", bits=4)))
    with pytest.raises(ValueError, match="method='rtn'"):
        prepare_qat(_fused_net(), QuantConfig(weights=WeightQuantConfig(bits=4, method="gptq")))
    dynamic = QuantConfig(activations=ActivationQuantConfig(bits=8, mode="dynamic"))
    with pytest.raises(ValueError, match="mode='static'"):
        prepare_qat(_fused_net(), dynamic)
    with pytest.raises(ValueError, match="weight_range='minmax' is not supported"):
        prepare_qat(_fused_net(), W4A8, weight_range="minmax")
    with pytest.raises(TypeError, match="QuantConfig"):
        prepare_qat(_fused_net(), WeightQuantConfig(bits=4))
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        prepare_qat(nn.Sequential(nn.ReLU(), nn.GroupNorm(1, 4)), W4A8)
    with pytest.raises(ValueError, match="no QAT layer"):
        convert(_fused_net())
    group = QuantConfig(weights=WeightQuantConfig(bits=4, granularity="group", group_size=7))
    net = _fused_net()
    with pytest.raises(ValueError, match="group_size 7 does not divide"):
        prepare_qat(net, group)
    assert not qat_layers(net)  # a failed prepare leaves the model unchanged
    prepared = prepare_qat(_fused_net(), W4A8)
    with pytest.raises(ValueError, match="already prepared"):
        prepare_qat(prepared, W4A8)
    with pytest.raises(ValueError, match="no training batch"):
        convert(prepared)  # activation ranges never observed
    with pytest.raises(ValueError, match="already quantized"):
        prepare_qat(quantize_(_fused_net(), QuantConfig()), W4A8)


def test_prepare_respects_targets_and_architecture_defaults():
    model = prepare_qat(tiny_unet2d(), W4A8)
    for name in ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"):
        assert not is_qat_layer(model.get_submodule(name))  # UNet2DModel ArchSpec keep_fp defaults
    assert is_qat_layer(model.get_submodule("down_blocks.0.resnets.0.conv1"))
    only = QuantConfig(weights=W4A8.weights, include=(r".*attentions.*",), exclude=(r".*to_out\.0",))
    names = set(qat_layers(prepare_qat(tiny_unet2d(), only)))
    assert names and all("attentions" in n and not n.endswith("to_out.0") for n in names)


def test_convert_is_exact_on_a_diffusers_unet():
    model = prepare_qat(tiny_unet2d(), W4A8, weight_range="lsq", act_range="lsq")
    images, labels = torch.randn(8, 1, 8, 8), torch.arange(8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fit_denoiser(
        model,
        opt,
        images,
        class_conditioning(labels),
        scheduler_for_tests(),
        steps=2,
        batch_size=4,
        progress=False,
    )
    inputs = example_inputs(model, batch_size=3, timesteps=[999, 500, 3])
    with torch.no_grad():
        expected = model.eval()(**inputs).sample
        out = convert(model)(**inputs).sample
    assert torch.equal(out, expected)


def test_qat_finetune_lowers_the_loss_and_converts():
    torch.manual_seed(0)
    images = torch.randn(16, 1, 8, 8).clamp(-1, 1)
    labels = torch.arange(16) % 10
    scheduler = scheduler_for_tests()
    model = tiny_unet2d(class_conditional=True)

    def eval_loss(m):
        gen = torch.Generator().manual_seed(3)
        timesteps = torch.linspace(0, 999, 16).long()
        with torch.no_grad():
            return denoising_loss(
                m, images, scheduler, class_conditioning(labels), generator=gen, timesteps=timesteps
            ).item()

    before = eval_loss(model)
    out = qat_finetune(
        model,
        W4A8,
        images=images,
        conditioning=class_conditioning(labels),
        scheduler=scheduler,
        steps=20,
        batch_size=8,
        lr=3e-3,
        progress=False,
    )
    assert out is model and not qat_layers(model)
    assert sum(map(is_quantized_layer, model.modules())) > 10
    assert type(model.conv_in) is nn.Conv2d and type(model.conv_out) is nn.Conv2d  # ArchSpec keep_fp
    after = eval_loss(model)  # 1.23 -> 0.50 when measured
    assert after < 0.6 * before, (before, after)
