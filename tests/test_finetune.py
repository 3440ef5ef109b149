"""Shared fine-tuning pieces: checks, the denoising loss, the method interface, personalization."""

import copy

import pytest
import torch

from diffquant.bench.digits.data import load_digits_dataset
from diffquant.bench.digits.model import SUBJECT_CLASS, UNetConfig, build_unet
from diffquant.bench.digits.train import training_scheduler
from diffquant.bench.personalize import (
    PersonalizeConfig,
    personalize,
    subject_fidelity,
    subject_images,
    training_set,
)
from diffquant.finetune import (
    class_conditioning,
    denoising_loss,
    finetune_methods,
    fit_denoiser,
    prepare_finetune,
    require_trainable,
)
from diffquant.finetune.methods import (
    FullFinetuneConfig,
    LoRAFinetuneConfig,
    QALoRAFinetuneConfig,
    QATFinetuneConfig,
    QLISAFinetuneConfig,
    TuneQDMFinetuneConfig,
)
from diffquant.nn.qmodules import is_quantized_layer

SMALL_CONFIGS = {
    "fp-full": FullFinetuneConfig(),
    "lora": LoRAFinetuneConfig(rank=2),
    "tuneqdm": TuneQDMFinetuneConfig(),
    "qalora": QALoRAFinetuneConfig(rank=2),
    "qlisa": QLISAFinetuneConfig(gamma=1, interval=2),
    "qat": QATFinetuneConfig(),
}
"""Every registered method that trains without calibration (efficientdm: tests/finetune/)."""

TINY = UNetConfig(block_out_channels=(16, 32), attention_levels=(1,), attention_head_dim=8)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet(TINY).eval()


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


def test_nothing_trainable_is_an_error(unet):
    frozen = copy.deepcopy(unet).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        require_trainable(frozen)
    with pytest.raises(ValueError, match="nothing to train"):
        fit_denoiser(frozen, torch.optim.SGD([torch.zeros(1, requires_grad=True)]), *_batch(), steps=1)


def _batch():
    data = load_digits_dataset()
    return data.images[:8], class_conditioning(data.labels[:8]), training_scheduler()


def test_denoising_loss_rejects_timesteps_outside_the_schedule(unet):
    images, labels, scheduler = _batch()
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        denoising_loss(unet, images, scheduler, labels, timesteps=torch.full((8,), 1000))
    loss = denoising_loss(unet, images, scheduler, labels, timesteps=torch.full((8,), 999))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_fit_denoiser_lowers_the_loss_and_calls_after_step(unet):
    model = copy.deepcopy(unet)
    calls = []
    images, labels, scheduler = _batch()
    losses = fit_denoiser(
        model,
        torch.optim.AdamW(model.parameters(), lr=2e-3),
        images,
        labels,
        scheduler,
        steps=30,
        batch_size=8,
        after_step=lambda: calls.append(1),
        progress=False,
    )
    assert len(calls) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    with pytest.raises(ValueError, match="needs `unconditional`"):
        fit_denoiser(model, None, images, labels, scheduler, steps=1, cond_dropout=0.5)


def test_every_registered_method_is_tested():
    assert set(finetune_methods()) == {*SMALL_CONFIGS, "efficientdm"}


@pytest.mark.parametrize("method", sorted(SMALL_CONFIGS))
def test_every_method_trains_only_what_it_should(unet, method):
    model = copy.deepcopy(unet)
    setup = prepare_finetune(model, SMALL_CONFIGS[method], scheduler=training_scheduler())
    trainable = [p for p in setup.model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in unet.parameters())
    assert trainable
    if method not in ("fp-full", "qat"):  # QAT trains every weight (and its LSQ ranges)
        assert sum(p.numel() for p in trainable) < total / 2, method
    before = [p.detach().clone() for p in trainable]
    images, labels, scheduler = _batch()
    fit_denoiser(
        setup.model,
        setup.optimizer,
        images,
        labels,
        scheduler,
        steps=2,
        batch_size=4,
        lr_scheduler=setup.lr_scheduler,
        after_step=setup.after_step,
        progress=False,
    )
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, trainable, strict=True)), method
    assert setup.optimizer_state_bytes() > 0
    final = setup.inference_model()
    x = torch.randn(2, 1, 8, 8)
    out = final(x, torch.tensor([10, 900]), class_labels=torch.tensor([1, 2])).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    if method in ("qalora", "qlisa", "qat"):
        assert any(is_quantized_layer(m) for m in final.modules()), method


def test_unknown_method_is_an_error(unet):
    with pytest.raises(TypeError, match="not a fine-tuning method config"):
        prepare_finetune(copy.deepcopy(unet), "dreambooth-xl")


def test_subject_is_mirrored_digits_and_fidelity_is_a_cosine(digits):
    subject = subject_images(digits, count=5, seed=0)
    assert subject.shape == (5, 1, 8, 8)
    threes = digits.images[digits.labels == 3]
    assert any(torch.equal(s.flip(-1), t) for s in subject for t in threes)
    with pytest.raises(ValueError, match="count"):
        subject_images(digits, count=0)
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8))
    classifier.features = classifier.forward
    assert subject_fidelity(classifier, subject, subject) <= 1.0 + 1e-6
    assert subject_fidelity(classifier, subject[:1], subject[:1]) == pytest.approx(1.0, abs=1e-5)


def test_personalize_teaches_the_subject_class(unet, digits):
    subject = subject_images(digits)
    config = PersonalizeConfig(steps=8, batch_size=4, prior_per_class=1, sampling_steps=2)
    with pytest.raises(ValueError, match="label_dropout"):
        PersonalizeConfig(label_dropout=1.0)
    snapshot = copy.deepcopy(unet.state_dict())
    images, labels = training_set(unet, subject, config)
    assert (labels == SUBJECT_CLASS).sum() == 10 and images.shape == (20, 1, 8, 8)
    result = personalize(unet, "tuneqdm-int8", images, labels, training_scheduler(), config, progress=False)
    assert len(result.losses) == 8 and result.seconds > 0 and result.trainable_params > 0
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in snapshot.items())  # the original is a copy
    out = result.model(images[:2], torch.tensor([5, 5]), class_labels=labels[:2]).sample
    assert torch.isfinite(out).all()
