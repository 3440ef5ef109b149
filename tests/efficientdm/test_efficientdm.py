import copy

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
from diffquant.bench.efficientdm_walkthrough import markdown_report
from diffquant.efficientdm import (
    QALoRALayer,
    apply_qalora,
    efficientdm_finetune,
    efficientdm_quantize_,
    enable_talsq,
    merge_qalora,
    qalora_layers,
    scale_aware_param_groups,
)
from diffquant.finetune import class_conditioning
from diffquant.models.tiny import example_inputs, scheduler_for_tests, tiny_unet2d
from diffquant.nn import QuantConv2d, QuantLinear, StepTableActivationQuantizer

CAL_T = (999, 750, 500, 250, 0)


def calibrate(model):
    for t in CAL_T:
        model(**example_inputs(model, 4, timesteps=t, seed=t))


def ptq_model(act_mode="step_table", act_bits=8):
    model = tiny_unet2d()
    config = QuantConfig(
        weights=WeightQuantConfig(bits=4, symmetric=False),
        activations=ActivationQuantConfig(bits=act_bits, mode=act_mode),
    )
    return quantize_(model, config, calibrate=calibrate, schedule=scheduler_for_tests())


def inputs(model, timesteps=(999, 500, 250, 0)):
    return example_inputs(model, len(timesteps), timesteps=list(timesteps), seed=7)


def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def ptq():
    return ptq_model()


def test_qalora_starts_exactly_at_the_ptq_model(ptq):
    model = apply_qalora(copy.deepcopy(ptq), rank=4)
    assert len(qalora_layers(model)) > 10
    x = inputs(ptq)
    with torch.no_grad():
        assert torch.equal(model(**x).sample, ptq(**x).sample)


def test_merged_model_equals_unmerged_exactly_and_round_trips(ptq, tmp_path):
    model = apply_qalora(copy.deepcopy(ptq), rank=4)
    tables = enable_talsq(model)
    with torch.no_grad():  # a trained-looking state: LoRA update, moved steps and activation tables
        for layer in qalora_layers(model).values():
            layer.lora_B.normal_(std=0.2)
            layer.weight_step.mul_(1.05)
        for table in tables.values():
            table.scale.mul_(1.1)
    x = inputs(model)
    with torch.no_grad():
        unmerged = model(**x).sample
    merge_qalora(model)
    assert not qalora_layers(model) and not trainable(model)
    with torch.no_grad():
        merged = model(**x).sample
    assert torch.equal(merged, unmerged)
    assert not torch.equal(merged, ptq(**x).sample)
    name = "down_blocks.0.resnets.0.conv1"
    codes, ptq_codes = (
        model.get_submodule(name).qweight.int_codes(),
        ptq.get_submodule(name).qweight.int_codes(),
    )
    assert not torch.equal(codes, ptq_codes)  # the LoRA update changed integer codes
    save_quantized(model, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt", schedule=scheduler_for_tests())
    with torch.no_grad():
        assert torch.equal(loaded(**x).sample, unmerged)


def test_only_adapters_steps_and_tables_are_trainable(ptq):
    model = copy.deepcopy(ptq)
    model.requires_grad_(True)
    apply_qalora(model, rank=4)
    layers = qalora_layers(model)
    expected = {f"{n}.{p}" for n in layers for p in ("lora_A", "lora_B", "weight_step")}
    assert trainable(model) == expected
    enable_talsq(model)
    tables = {f"{n}.base_layer.input_quant.scale" for n in layers}  # zero points stay calibrated
    assert trainable(model) == expected | tables
    groups = scale_aware_param_groups(model, 1e-3, act_lr=0.1)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(expected | tables)  # each param once
    name = "down_blocks.0.resnets.0.conv1"
    table = model.get_submodule(f"{name}.base_layer.input_quant")
    act = next(g for g in groups if g["name"] == f"act_step:{name}.base_layer")
    assert act["params"] == [table.scale] and act["lr"] == pytest.approx(
        0.1 * float(table.scale.detach().mean())
    )


def test_gradients_pass_frozen_activation_quantizers_to_every_adapter(ptq):
    model = apply_qalora(copy.deepcopy(ptq), rank=2)  # tables not trainable: rounding, straight-through
    model(**inputs(model)).sample.square().mean().backward()
    no_grad = [n for n, layer in qalora_layers(model).items() if not bool(layer.lora_B.grad.abs().sum() > 0)]
    assert no_grad == []


def test_lora_shapes_follow_the_layer_kind(ptq):
    model = apply_qalora(copy.deepcopy(ptq), rank=4)
    kinds = set()
    for layer in qalora_layers(model).values():
        base = layer.base_layer
        out_ch, in_ch = layer.weight_shape[:2]
        if isinstance(base, QuantConv2d):
            assert layer.lora_A.shape == (4, in_ch, *base.kernel_size)  # A: conv with the original kernel
            assert layer.lora_B.shape == (out_ch, 4, 1, 1)  # B: 1x1
            kinds.add(f"conv{base.kernel_size[0]}")
        else:
            assert isinstance(base, QuantLinear)
            assert layer.lora_A.shape == (4, in_ch) and layer.lora_B.shape == (out_ch, 4)
            kinds.add("linear")
        assert layer.delta_weight().shape == layer.weight_shape
        assert layer.weight_step.shape == base.qweight.scale.shape
    assert kinds >= {"conv3", "conv1", "linear"}


def test_qalora_keeps_no_float_weight_copy_and_saves_little_for_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256))
    quantize_(model, QuantConfig(weights=WeightQuantConfig(bits=4)))
    apply_qalora(model, rank=4)
    layer, weight_elems = model[0], 256 * 256
    assert all(b.numel() < weight_elems or not b.is_floating_point() for b in layer.buffers())
    x = torch.randn(8, 256)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    # the layer's weight and its input, plus LoRA / step tensors: LSQ's temporaries are recomputed
    weight_sized = [t for t in saved if t.is_floating_point() and t.numel() >= weight_elems]
    assert len(weight_sized) <= 1, [t.shape for t in weight_sized]
    out.square().mean().backward()
    assert layer.lora_A.grad is not None and layer.weight_step.grad.abs().sum() > 0


def test_grouped_conv_is_skipped_with_a_reason_and_stays_frozen():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.Linear(64, 3)
    )
    quantize_(model, QuantConfig(weights=WeightQuantConfig(bits=4)))
    with pytest.warns(UserWarning, match="groups=2"):
        apply_qalora(model, rank=2)
    assert isinstance(model[0], QuantConv2d) and isinstance(model[1], QALoRALayer)
    assert trainable(model) == {f"{i}.{p}" for i in (1, 3) for p in ("lora_A", "lora_B", "weight_step")}
    x = torch.randn(2, 4, 4, 4)
    merged = merge_qalora(model)
    assert merged(x).shape == (2, 3)


def test_errors_name_the_fix(ptq):
    with pytest.raises(ValueError, match="no quantized layer"):
        apply_qalora(tiny_unet2d())
    with pytest.raises(ValueError, match="apply_qalora"):
        scale_aware_param_groups(copy.deepcopy(ptq), 1e-3)
    with pytest.raises(ValueError, match="merge"):
        merge_qalora(copy.deepcopy(ptq))
    model = apply_qalora(copy.deepcopy(ptq), rank=2)
    with pytest.raises(ValueError, match="already carries"):
        apply_qalora(model)
    with pytest.raises(ValueError, match="unknown EfficientDM setting"):
        efficientdm_finetune(tiny_unet2d(), scheduler=scheduler_for_tests(), calibrate=calibrate, ranks=3)


def test_scale_aware_learning_rates():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    quantize_(model, QuantConfig(weights=WeightQuantConfig(bits=4)))
    apply_qalora(model, rank=2)
    with torch.no_grad():
        model[0].weight_step.fill_(0.01)
        model[1].weight_step.fill_(0.03)

    def lrs(**kwargs):
        return {g["name"]: g["lr"] for g in scale_aware_param_groups(model, 1e-3, **kwargs)}

    assert lrs() == pytest.approx(
        {"lora:0": 0.5e-3, "lora:1": 1.5e-3, "weight_step:0": 0.01 * 1e-3, "weight_step:1": 0.03 * 1e-3}
    )
    assert lrs(scale_aware=False, step_lr=0.1) == pytest.approx(
        {"lora:0": 1e-3, "lora:1": 1e-3, "weight_step:0": 0.001, "weight_step:1": 0.003}
    )
    assert lrs(reference_divisor=2500)["lora:1"] == pytest.approx(0.03 / 2500)
    groups = scale_aware_param_groups(model, 1e-3)
    assert groups[0]["params"] == [model[0].lora_A, model[0].lora_B]
    with pytest.raises(ValueError, match="base_lr must be positive"):
        scale_aware_param_groups(model, 0.0)


def test_talsq_needs_step_table_activations():
    with pytest.raises(ValueError, match="mode='step_table'"):
        enable_talsq(ptq_model(act_mode="static"))
    weight_only = quantize_(tiny_unet2d(), QuantConfig(weights=WeightQuantConfig(bits=4)))
    with pytest.raises(ValueError, match="no quantized layer quantizes its inputs"):
        enable_talsq(weight_only)


def test_talsq_trains_only_the_entries_of_the_timesteps_in_the_batch(ptq):
    model = apply_qalora(copy.deepcopy(ptq), rank=2)
    tables = enable_talsq(model)
    model(**inputs(model, timesteps=(750, 250, 745, 250))).sample.square().mean().backward()
    used = torch.zeros(len(CAL_T), dtype=torch.bool)
    for table in tables.values():
        assert table.timesteps.tolist() == sorted(CAL_T)
        present = torch.isin(table.timesteps, torch.tensor([250.0, 750.0]))  # 745 -> nearest 750
        assert torch.equal(table.scale.grad[~present], torch.zeros(int((~present).sum())))
        used |= table.scale.grad != 0
    assert torch.equal(
        used, torch.isin(torch.tensor(sorted(CAL_T), dtype=torch.float32), torch.tensor([250.0, 750.0]))
    )


def test_first_and_last_layers_are_w8a8():
    model = efficientdm_quantize_(
        tiny_unet2d(),
        QuantConfig(
            weights=WeightQuantConfig(bits=4, symmetric=False),
            activations=ActivationQuantConfig(bits=4, mode="step_table"),
        ),
        calibrate=calibrate,
        schedule=scheduler_for_tests(),
    )
    for name in ("conv_in", "conv_out"):
        layer = model.get_submodule(name)
        assert layer.qweight.bits == 8 and layer.input_quant.config.bits == 8
        assert isinstance(layer.input_quant, StepTableActivationQuantizer) and bool(
            layer.input_quant.calibrated
        )
    middle = model.get_submodule("down_blocks.0.resnets.0.conv1")
    assert middle.qweight.bits == 4 and middle.input_quant.config.bits == 4
    assert isinstance(model.get_submodule("time_embedding.linear_1"), nn.Linear)  # kept in float
    assert model.diffquant_config.weights.bits == 4


@pytest.mark.parametrize("distill", [True, False])
def test_end_to_end_returns_a_merged_quantized_model(distill):
    fp = tiny_unet2d()
    before = {k: v.clone() for k, v in fp.state_dict().items()}
    data = (torch.randn(16, 1, 8, 8), class_conditioning(torch.randint(0, 9, (16,))))
    model = efficientdm_finetune(
        fp,
        scheduler=scheduler_for_tests(),
        calibrate=calibrate,
        conditioning=class_conditioning(torch.arange(9)),
        unconditional=class_conditioning(9),
        train_data=data,
        act_bits=8,
        rank=4,
        iterations=3,
        batch_size=2,
        num_sampling_steps=3,
        distill=distill,
        progress=False,
    )
    assert model is not fp and all(torch.equal(before[k], v) for k, v in fp.state_dict().items())
    assert not qalora_layers(model) and not trainable(model)
    assert model.get_submodule("conv_in").qweight.bits == 8
    assert model.get_submodule("down_blocks.1.attentions.0.to_q").qweight.bits == 4
    report = model.efficientdm_report
    assert len(report.losses) == 3 and all(torch.isfinite(torch.tensor(report.losses)))
    assert report.trainable_parameters > 0 and report.finetune_seconds > 0 and report.ptq_seconds > 0
    lrs = report.learning_rates
    assert any(k.startswith("act_step:") for k in lrs) and any(k.startswith("weight_step:") for k in lrs)
    assert lrs["lora:conv_in"] < lrs["lora:down_blocks.0.resnets.0.conv1"]  # 8-bit: smaller steps
    with torch.no_grad():
        assert torch.isfinite(model(**inputs(model)).sample).all()


def test_weight_only_edge_layers_need_no_calibration():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    efficientdm_quantize_(model, QuantConfig(weights=WeightQuantConfig(bits=4)))
    assert [model[i].qweight.bits for i in (0, 2, 3)] == [8, 4, 8]
    with pytest.raises(ValueError, match="needs calibration data"):
        efficientdm_quantize_(
            tiny_unet2d(), QuantConfig(activations=ActivationQuantConfig(mode="step_table"))
        )


def test_markdown_report_has_one_line_per_step():
    settings = {"num_samples": 10, "iterations": 5, "quick": True}
    rows = [
        {"step": 1, "name": "fp32", "title": "float", "fd": 3.0, "psnr_vs_fp": None, "grid": "g1.png"},
        {"step": 2, "name": "ptq", "title": "PTQ", "fd": 4.0, "psnr_vs_fp": 20.0, "grid": "g2.png"},
    ]
    results = {"label": "W4A4", "method": "EfficientDM", "settings": settings, "sampler": "ddim-50"}
    text = markdown_report({**results, "noise_floor_fd": 1.0, "steps": rows})
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(lines) == 3 and "| 2 | ptq | PTQ |" in lines[2] and "| 20.0 |" in lines[2]
    assert "| — |" in lines[1] and "[ptq](g2.png)" in text
    assert text.startswith("# EfficientDM walkthrough (W4A4")
    embedded = markdown_report({**results, "noise_floor_fd": 1.0, "steps": rows}, title=False, grid_dir="a/")
    assert not embedded.startswith("#") and "[ptq](a/g2.png)" in embedded
