"""The same code on CUDA: quantizing, saving/loading and every fine-tuning method, checked against CPU.

Skipped where no GPU is present (CI); run where one is with ``pytest tests/test_cuda.py``.
"""

import copy

import pytest
import torch

from diffquant import ActivationQuantConfig, QuantConfig, WeightQuantConfig, load_quantized, quantize_
from diffquant.bench.digits.data import load_digits_dataset
from diffquant.bench.digits.model import UNetConfig, build_unet
from diffquant.bench.digits.train import training_scheduler
from diffquant.bench.personalize import PERSONALIZATION_METHODS
from diffquant.devices import module_device
from diffquant.efficientdm.qalora import apply_qalora, merge_qalora
from diffquant.finetune import class_conditioning, fit_denoiser, prepare_finetune
from diffquant.io import save_quantized
from diffquant.models.tiny import example_inputs, scheduler_for_tests, tiny_unet2d
from diffquant.qat import convert, prepare_qat
from diffquant.tuneqdm import TuneQDMConfig, apply_tuneqdm, set_timestep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
TINY = UNetConfig(block_out_channels=(16, 32), attention_levels=(1,), attention_head_dim=8)


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    """TF32 would make CUDA-vs-CPU differences reflect the GPU's matmul precision, not our code."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _forward(model, inputs):
    device = module_device(model)
    return model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}).sample.cpu()


def _calibration(inputs):
    def calibrate(model):
        _forward(model, inputs)

    return calibrate


CONFIGS = {
    "w8-rtn": QuantConfig(weights=WeightQuantConfig(bits=8)),
    "w4-group": QuantConfig(weights=WeightQuantConfig(bits=4, granularity="group", group_size=8)),
    "nf4": QuantConfig(weights=WeightQuantConfig(bits=4, format="nf4", block_size=32)),
    "w4-gptq": QuantConfig(weights=WeightQuantConfig(bits=4, method="gptq")),
    "w8a8-static": QuantConfig(weights=WeightQuantConfig(bits=8), activations=ActivationQuantConfig(bits=8)),
    "w8a8-dynamic": QuantConfig(
        weights=WeightQuantConfig(bits=8), activations=ActivationQuantConfig(bits=8, mode="dynamic")
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_quantizing_on_cuda_matches_cpu(name):
    model = tiny_unet2d(seed=0).eval()
    inputs = example_inputs(model, 4, seed=1)
    cpu, gpu = copy.deepcopy(model), copy.deepcopy(model).to(CUDA)
    with torch.no_grad():
        quantize_(cpu, CONFIGS[name], calibrate=_calibration(inputs), schedule=scheduler_for_tests())
        quantize_(gpu, CONFIGS[name], calibrate=_calibration(inputs), schedule=scheduler_for_tests())
        expected, got = _forward(cpu, inputs), _forward(gpu, inputs)
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    assert all(b.device.type == "cuda" for b in gpu.buffers())
    # GPTQ's Cholesky and the activation rounding can flip a few borderline codes between devices.
    tolerance = 0.05 if name in ("w4-gptq", "w8a8-static", "w8a8-dynamic") else 1e-4
    assert torch.allclose(got, expected, atol=tolerance * expected.abs().max()), name


def test_checkpoint_saved_on_cuda_loads_on_cpu_and_back(tmp_path):
    model = tiny_unet2d(seed=0).eval().to(CUDA)
    inputs = example_inputs(model, 2, seed=1)
    with torch.no_grad():
        quantize_(model, CONFIGS["w4-group"])
        expected = _forward(model, inputs)
    save_quantized(model, tmp_path / "ckpt")
    on_cpu = load_quantized(tmp_path / "ckpt")
    on_gpu = load_quantized(tmp_path / "ckpt", device=CUDA)
    with torch.no_grad():
        assert torch.allclose(_forward(on_cpu, inputs), expected, atol=1e-4)
        assert torch.equal(_forward(on_gpu, inputs), expected)


@pytest.mark.parametrize("method", sorted(PERSONALIZATION_METHODS))
def test_every_finetuning_method_trains_on_cuda(method):
    torch.manual_seed(0)
    model = build_unet(TINY).eval().to(CUDA)
    setup = prepare_finetune(model, PERSONALIZATION_METHODS[method], scheduler=training_scheduler())
    trainable = [p for p in setup.model.parameters() if p.requires_grad]
    assert all(p.device.type == "cuda" for p in trainable), method
    before = [p.detach().clone() for p in trainable]
    data = load_digits_dataset()
    losses = fit_denoiser(
        setup.model,
        setup.optimizer,
        data.images[:8].to(CUDA),
        class_conditioning(data.labels[:8].to(CUDA)),
        training_scheduler(),
        steps=3,
        batch_size=4,
        lr_scheduler=setup.lr_scheduler,
        after_step=setup.after_step,
        progress=False,
    )
    assert all(torch.isfinite(torch.tensor(losses))), method
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, trainable, strict=True)), method
    final = setup.inference_model()
    x = torch.randn(2, 1, 8, 8, device=CUDA)
    out = final(
        x, torch.tensor([10, 900], device=CUDA), class_labels=torch.tensor([1, 2], device=CUDA)
    ).sample
    assert out.device.type == "cuda" and torch.isfinite(out).all()


def test_tuneqdm_per_sample_experts_match_cpu():
    config = TuneQDMConfig(n_bits=4, num_experts=4, total_denoising_steps=1000)
    cpu = apply_tuneqdm(tiny_unet2d(seed=0).eval(), config)
    for layer_params in cpu.parameters():
        if layer_params.requires_grad:
            layer_params.data.uniform_(0.5, 1.5)  # distinct experts, so the selection matters
    gpu = copy.deepcopy(cpu).to(CUDA)
    inputs = example_inputs(cpu, 4, timesteps=[5, 300, 600, 990], seed=1)
    with torch.no_grad():
        for model in (cpu, gpu):
            set_timestep(model, inputs["timestep"].to(module_device(model)))
        assert torch.allclose(_forward(gpu, inputs), _forward(cpu, inputs), atol=1e-4)


def test_qalora_merge_and_qat_convert_are_exact_on_cuda():
    model = tiny_unet2d(seed=0).eval().to(CUDA)
    inputs = example_inputs(model, 2, seed=1)
    with torch.no_grad():
        quantize_(model, CONFIGS["w4-group"])
        apply_qalora(model, rank=4)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        unmerged = _forward(model, inputs)
        assert torch.equal(_forward(merge_qalora(model), inputs), unmerged)

    qat = prepare_qat(tiny_unet2d(seed=0).to(CUDA), CONFIGS["w8a8-static"], weight_range="lsq").train()
    with torch.no_grad():
        _forward(qat, inputs)  # the activation observers see one training batch
        qat.eval()
        fake_quant = _forward(qat, inputs)
        assert torch.equal(_forward(convert(qat), inputs), fake_quant)
