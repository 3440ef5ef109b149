"""Resumable fine-tuning: a run stopped after a checkpoint (SIGKILLed in a child process, or stopped by an
exception) and resumed ends with the same trainable tensors, optimizer state and losses, bit for bit, as
an uninterrupted run — for every fine-tuning method, on both training loops."""

from __future__ import annotations

import copy
import os
import signal
import sys

import pytest
import torch
from tiny_cases import make_case

from diffquant.bench.digits.model import NULL_CLASS, TINY_UNET, build_unet
from diffquant.bench.personalize import PersonalizeConfig, personalize
from diffquant.efficientdm import EfficientDMConfig
from diffquant.errors import CheckpointError
from diffquant.finetune import class_conditioning, fit_denoiser, model_output, prepare_finetune
from diffquant.finetune.distill import distill
from diffquant.finetune.methods import (
    FullFinetuneConfig,
    LoRAFinetuneConfig,
    QALoRAFinetuneConfig,
    QATFinetuneConfig,
    QLISAFinetuneConfig,
    TuneQDMFinetuneConfig,
)
from diffquant.finetune.resume import TrainingCheckpoints, checkpoint_files, training_tensors
from diffquant.finetune.state_file import encode_state
from diffquant.models.tiny import scheduler_for_tests, tiny_unet2d
from diffquant.tuneqdm import TuneQDMConfig

STEPS, EVERY, STOP = 7, 2, 6  # 7 steps, checkpoints after 2, 4, 6; stopped during step 6: resumes from 4
SCHED = scheduler_for_tests()
GEN = torch.Generator().manual_seed(1)
IMAGES = torch.randn(6, 1, 8, 8, generator=GEN).clamp(-1, 1)
LABELS = torch.tensor([0, 1, 2, 3, 4, 5])
BASE = tiny_unet2d().eval()

METHODS = {
    "fp-full": FullFinetuneConfig(lr=1e-3),
    "lora": LoRAFinetuneConfig(rank=2, lr=1e-3),
    "tuneqdm": TuneQDMFinetuneConfig(tuneqdm=TuneQDMConfig(bits=4, num_experts=2, train_delta_in=True)),
    "qalora": QALoRAFinetuneConfig(bits=4, rank=2),
    "efficientdm": EfficientDMConfig(
        bits=4, act_bits=8, rank=2, iterations=STEPS, weight_range="minmax", calibration_steps=None
    ),
    "qlisa": QLISAFinetuneConfig(gamma=1, interval=2, lr=1e-3),
    "qat": QATFinetuneConfig(cosine_steps=STEPS),
}


class Stop(Exception):
    """Raised by a forward hook to interrupt a run."""


def _calibrate(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for t in (900, 500, 100):
            model_output(model, IMAGES, torch.full((6,), t), class_conditioning(LABELS))


def _setup(method: str):
    torch.manual_seed(0)  # LoRA initialisation
    return prepare_finetune(copy.deepcopy(BASE), METHODS[method], scheduler=SCHED, calibrate=_calibrate)


def _train(setup, loop: str, checkpoint: TrainingCheckpoints | None) -> list[float]:
    if loop == "fit":
        return fit_denoiser(
            setup.model,
            setup.optimizer,
            IMAGES,
            class_conditioning(LABELS),
            SCHED,
            steps=STEPS,
            batch_size=4,
            unconditional=class_conditioning(9),
            cond_dropout=0.3,
            lr_scheduler=setup.lr_scheduler,
            after_step=setup.after_step,
            progress=False,
            checkpoint=checkpoint,
            method_state=setup.method_state,
        )
    return distill(
        setup.model,
        BASE,
        setup.optimizer,
        scheduler=SCHED,
        iterations=STEPS,
        conditioning=class_conditioning(LABELS),
        unconditional=class_conditioning(9),
        batch_size=2,
        num_sampling_steps=3,  # checkpoints fall inside trajectories
        lr_scheduler=setup.lr_scheduler,
        progress=False,
        checkpoint=checkpoint,
        method_state=setup.method_state,
    )


def _stop_at_forward(model: torch.nn.Module, count: int, action) -> None:
    calls = [0]

    def hook(module, args):
        calls[0] += 1
        if calls[0] == count:
            action()

    model.register_forward_pre_hook(hook)


def _snapshot(setup, losses) -> tuple[dict, dict]:
    """Every tensor training changes (model, optimizer / QLISA state) and the losses, flattened."""
    tensors = {f"model/{k}": v.detach().clone() for k, v in training_tensors(setup.model).items()}
    state = setup.method_state.state_dict() if setup.method_state is not None else {}
    if setup.optimizer is not None:
        state = {"optimizer": setup.optimizer.state_dict()}
    document = encode_state(state, tensors, "state")
    return tensors, {"state": document, "losses": losses}


def _assert_identical(a, b) -> float:
    (ta, da), (tb, db) = a, b
    assert da == db  # structure, plain values and losses
    assert ta.keys() == tb.keys()
    worst = max((ta[k].double() - tb[k].double()).abs().max().item() for k in ta if ta[k].numel())
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key
    return worst


def _uninterrupted(method: str, loop: str):
    setup = _setup(method)
    return _snapshot(setup, _train(setup, loop, None))


def _resumed(method: str, loop: str, directory) -> tuple:
    setup = _setup(method)
    losses = _train(setup, loop, TrainingCheckpoints(directory, every=EVERY, resume=True))
    return _snapshot(setup, losses)


def _kill_child_mid_run(method: str, loop: str, directory) -> None:
    """Fork; the child trains with checkpoints and SIGKILLs itself during step ``STOP``."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            setup = _setup(method)
            _stop_at_forward(setup.model, STOP, lambda: os.kill(os.getpid(), signal.SIGKILL))
            _train(setup, loop, TrainingCheckpoints(directory, every=EVERY, keep_last=1))
        finally:
            os._exit(3)  # only when not killed
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


needs_fork = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs fork")


@needs_fork
@pytest.mark.parametrize(("method", "loop"), [("tuneqdm", "fit"), ("qlisa", "fit"), ("tuneqdm", "distill")])
def test_sigkilled_run_resumes_bit_identically(method, loop, tmp_path):
    _kill_child_mid_run(method, loop, tmp_path)
    assert [p.name for p in checkpoint_files(tmp_path)] == ["step-00000004.safetensors"]  # keep_last=1
    assert not list(tmp_path.glob(".*.tmp"))
    assert _assert_identical(_resumed(method, loop, tmp_path), _uninterrupted(method, loop)) == 0


@pytest.mark.parametrize(
    ("method", "loop"),
    [
        ("fp-full", "fit"),
        ("lora", "fit"),
        ("qalora", "fit"),
        ("efficientdm", "distill"),
        ("qlisa", "distill"),
        ("qat", "fit"),
    ],
)
def test_interrupted_run_resumes_bit_identically(method, loop, tmp_path):
    setup = _setup(method)
    _stop_at_forward(setup.model, STOP, lambda: (_ for _ in ()).throw(Stop()))
    with pytest.raises(Stop):
        _train(setup, loop, TrainingCheckpoints(tmp_path, every=EVERY))
    assert [p.name for p in checkpoint_files(tmp_path)] == [
        "step-00000002.safetensors",
        "step-00000004.safetensors",
    ]
    assert _assert_identical(_resumed(method, loop, tmp_path), _uninterrupted(method, loop)) == 0


def test_personalization_benchmark_resumes_bit_identically(tmp_path):
    torch.manual_seed(0)
    fp_model = build_unet(TINY_UNET).eval()
    config = PersonalizeConfig(steps=STEPS, batch_size=4, prior_preservation=False)
    method = QLISAFinetuneConfig(gamma=1, interval=2, lr=1e-3)
    images, labels = IMAGES[:5], torch.full((5,), 11)

    def run(checkpoint, stop=False):
        handle = None
        if stop:  # the copy personalize trains inherits the hook
            calls = [0]

            def hook(module, args):
                calls[0] += 1
                if calls[0] == STOP:
                    raise Stop

            handle = fp_model.register_forward_pre_hook(hook)
        try:
            return personalize(
                fp_model,
                "qlisa",
                images,
                labels,
                SCHED,
                config,
                method,
                progress=False,
                checkpoint=checkpoint,
            )
        finally:
            if handle is not None:
                handle.remove()

    with pytest.raises(Stop):
        run(TrainingCheckpoints(tmp_path, every=EVERY), stop=True)
    resumed = run(TrainingCheckpoints(tmp_path, every=EVERY, resume=True))
    plain = run(None)
    assert resumed.losses == plain.losses
    a, b = resumed.model.state_dict(), plain.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    assert NULL_CLASS == 10  # the unconditional class personalize drops to


def test_resume_refuses_another_run(tmp_path):
    setup = _setup("tuneqdm")
    _train(setup, "fit", TrainingCheckpoints(tmp_path, every=EVERY))
    other_lr = prepare_finetune(
        copy.deepcopy(BASE),
        TuneQDMFinetuneConfig(tuneqdm=METHODS["tuneqdm"].tuneqdm, lr=1e-3),
        scheduler=SCHED,
    )
    before = {k: v.clone() for k, v in training_tensors(other_lr.model).items()}
    with pytest.raises(CheckpointError, match=r"another training run: .*lr"):
        _train(other_lr, "fit", TrainingCheckpoints(tmp_path, every=EVERY, resume=True))
    assert all(torch.equal(before[k], v) for k, v in training_tensors(other_lr.model).items())  # untouched
    other_base = prepare_finetune(tiny_unet2d(seed=5), METHODS["tuneqdm"], scheduler=SCHED)
    with pytest.raises(CheckpointError, match="frozen_sha256"):
        _train(other_base, "fit", TrainingCheckpoints(tmp_path, every=EVERY, resume=True))
    with pytest.raises(CheckpointError, match="another training run: .*settings.loop"):
        _train(_setup("tuneqdm"), "distill", TrainingCheckpoints(tmp_path, every=EVERY, resume=True))
    with pytest.raises(CheckpointError, match="no such training checkpoint"):
        _train(_setup("tuneqdm"), "fit", TrainingCheckpoints(tmp_path, every=EVERY, resume=tmp_path / "x"))
    latest = checkpoint_files(tmp_path)[-1]
    data = bytearray(latest.read_bytes())
    data[-3] ^= 0xFF
    latest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        _train(_setup("tuneqdm"), "fit", TrainingCheckpoints(tmp_path, every=EVERY, resume=True))


def test_flow_matching_distillation_resumes_mid_trajectory(tmp_path):
    case = make_case("sd3-flow")  # the tiny SD3 (flow matching) with captions

    def run(checkpoint, stop=False):
        torch.manual_seed(0)
        setup = prepare_finetune(copy.deepcopy(case.model), FullFinetuneConfig(lr=1e-3))
        if stop:
            _stop_at_forward(setup.model, STOP, lambda: (_ for _ in ()).throw(Stop()))
        losses = distill(
            setup.model,
            case.model,
            setup.optimizer,
            scheduler=case.scheduler,
            iterations=STEPS,
            conditioning=case.conditioning,
            guidance_scale=1.0,
            batch_size=2,
            num_sampling_steps=3,
            progress=False,
            checkpoint=checkpoint,
        )
        return _snapshot(setup, losses)

    with pytest.raises(Stop):
        run(TrainingCheckpoints(tmp_path, every=EVERY), stop=True)
    resumed = run(TrainingCheckpoints(tmp_path, every=EVERY, resume=True))
    assert _assert_identical(resumed, run(None)) == 0
