import copy

import pytest
import torch
from torch import nn

from diffquant.finetune.conditioning import class_conditioning
from diffquant.finetune.distill import distill
from diffquant.models.tiny import scheduler_for_tests, tiny_unet2d

STEPS = 4  # sampling steps per trajectory


class Recorder(nn.Module):
    """Calls a denoiser with ``class_labels=cond`` and records every call's inputs."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, cond=None):
        self.calls.append((x.detach().clone(), t.detach().clone(), cond.detach().clone()))
        return self.inner(x, t, class_labels=cond)


def run(
    student, teacher, iterations, lr=1e-3, classes=range(9), null_class=9, cond_kwarg="class_labels", **kwargs
):
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    kwargs = {
        "batch_size": 4,
        "num_sampling_steps": STEPS,
        "conditioning": {cond_kwarg: torch.as_tensor(list(classes), dtype=torch.long)},
        "unconditional": {cond_kwarg: torch.tensor([null_class])},
        **kwargs,
    }
    return distill(
        student,
        teacher,
        optimizer,
        scheduler=scheduler_for_tests(),
        iterations=iterations,
        progress=False,
        **kwargs,
    )


def test_student_equal_to_teacher_has_zero_loss_and_teacher_is_untouched():
    teacher = tiny_unet2d(seed=0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    losses = run(copy.deepcopy(teacher), teacher, iterations=2 * STEPS + 1)
    assert len(losses) == 2 * STEPS + 1
    assert all(loss == 0.0 for loss in losses)
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in teacher.parameters())


def test_loss_decreases_for_a_perturbed_copy():
    teacher = tiny_unet2d(seed=0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    losses = run(student, teacher, iterations=6 * STEPS, lr=5e-3)
    first, last = sum(losses[:STEPS]) / STEPS, sum(losses[-STEPS:]) / STEPS  # whole trajectories
    assert last < 0.7 * first  # measured: 0.56
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_student_predicts_on_the_teacher_trajectory_with_per_sample_timesteps():
    torch.manual_seed(0)
    teacher = Recorder(tiny_unet2d(seed=0))
    student = Recorder(tiny_unet2d(seed=1))
    iterations = STEPS + 2  # the second trajectory restarts from fresh noise
    run(student, teacher, iterations=iterations, cond_kwarg="cond", batch_size=3)
    assert len(student.calls) == len(teacher.calls) == iterations
    for (xs, ts, cs), (xt, tt, ct) in zip(student.calls, teacher.calls, strict=True):
        assert torch.equal(xs, xt) and torch.equal(ts, tt) and torch.equal(cs, ct)
        assert xs.shape == (6, 1, 8, 8) and ts.shape == (6,)  # [cond, uncond] batch, one t per sample
        assert torch.equal(cs[3:], torch.full((3,), 9)) and bool((cs[:3] < 9).all())
    timesteps = [int(t[0]) for _, t, _ in teacher.calls]
    assert timesteps[:STEPS] == sorted(timesteps[:STEPS], reverse=True)
    assert timesteps[STEPS] == timesteps[0]  # restarted
    assert not torch.equal(teacher.calls[STEPS][0], teacher.calls[0][0])  # from new noise
    # the trajectory advances: consecutive inputs differ
    assert not torch.equal(teacher.calls[1][0], teacher.calls[0][0])


def test_no_guidance_runs_the_conditional_batch_only():
    teacher = Recorder(tiny_unet2d(seed=0))
    run(Recorder(tiny_unet2d(seed=1)), teacher, iterations=2, guidance_scale=1.0, cond_kwarg="cond")
    assert teacher.calls[0][0].shape[0] == 4
    assert bool((teacher.calls[0][2] < 9).all())


def test_min_snr_weighting_scales_each_step_by_its_weight():
    from diffusers import DDIMScheduler

    teacher = tiny_unet2d(seed=0)
    student = tiny_unet2d(seed=1)
    plain = run(student, teacher, iterations=STEPS, lr=0.0)  # lr 0: the student stays the same
    weighted = run(student, teacher, iterations=STEPS, lr=0.0, snr_gamma=5.0)
    sampler = DDIMScheduler.from_config(scheduler_for_tests().config)
    sampler.set_timesteps(STEPS)
    snr = [float(sampler.alphas_cumprod[t] / (1 - sampler.alphas_cumprod[t])) for t in sampler.timesteps]
    expected = [loss * min(r, 5.0) / r for loss, r in zip(plain, snr, strict=True)]
    assert weighted == pytest.approx(expected, rel=1e-5)
    assert weighted[0] == pytest.approx(plain[0]) and weighted[-1] < 0.1 * plain[-1]  # t=999 vs t≈0


def test_errors():
    teacher = tiny_unet2d(seed=0)
    frozen = copy.deepcopy(teacher).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        distill(frozen, teacher, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0),
                scheduler=scheduler_for_tests(), iterations=1, guidance_scale=1.0, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="iterations"):
        run(copy.deepcopy(teacher), teacher, iterations=0)
    with pytest.raises(ValueError, match="snr_gamma"):
        run(copy.deepcopy(teacher), teacher, iterations=1, snr_gamma=0.0)
    with pytest.raises(ValueError, match="conditioning is empty"):
        run(copy.deepcopy(teacher), teacher, iterations=1, classes=[])
    with pytest.raises(ValueError, match="needs `unconditional`"):
        run(copy.deepcopy(teacher), teacher, iterations=1, unconditional=None)
    assert class_conditioning(3)["class_labels"].shape == (1,)
