"""The noise-level context on plain modules, and `NoiseSchedule` against diffusers schedulers."""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from torch import nn

from diffquant.noise import (
    NoiseLevel,
    NoiseSchedule,
    attach_noise_context,
    current_noise_level,
    detach_noise_context,
    noise_level,
    require_noise_level,
)


def _reference_log_snr(scheduler, t) -> torch.Tensor:
    ac = scheduler.alphas_cumprod.double()
    return torch.log(ac / (1 - ac))[torch.as_tensor(t)].float()


class Toy(nn.Module):
    """A denoiser with the timestep as second argument and an inner Linear to probe."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 3)

    def forward(self, x, timestep=None, scale: float = 1.0):
        return self.inner(x) * scale


class Recorder:
    """Forward pre-hook on an inner module that records the noise level it sees."""

    def __init__(self, module: nn.Module) -> None:
        self.seen: list[NoiseLevel | None] = []
        module.register_forward_pre_hook(lambda m, args: self.seen.append(current_noise_level()))

    @property
    def last(self) -> NoiseLevel:
        assert self.seen, "the probe was never called"
        level = self.seen[-1]
        assert level is not None, "the probe saw no noise level"
        return level


@pytest.fixture
def ddpm() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000)


@pytest.fixture
def toy() -> tuple[Toy, Recorder]:
    torch.manual_seed(0)
    model = Toy()
    return model, Recorder(model.inner)


def test_mixed_per_sample_timesteps_and_log_snr(toy, ddpm):
    model, probe = toy
    attach_noise_context(model, ddpm)
    t = torch.tensor([999, 10, 500, 10])
    model(torch.randn(4, 3), t)
    assert probe.last.timestep.dtype == torch.float32
    assert torch.equal(probe.last.timestep, t.float())
    torch.testing.assert_close(probe.last.log_snr, _reference_log_snr(ddpm, t), rtol=1e-6, atol=1e-6)
    assert current_noise_level() is None


@pytest.mark.parametrize("t", [7, torch.tensor(7), torch.tensor([7]), 7.0])
def test_single_timestep_broadcasts_to_batch(toy, ddpm, t):
    model, probe = toy
    attach_noise_context(model, ddpm)
    model(torch.randn(5, 3), timestep=t)
    assert torch.equal(probe.last.timestep, torch.full((5,), 7.0))
    torch.testing.assert_close(probe.last.log_snr, _reference_log_snr(ddpm, [7] * 5))


def test_without_schedule_log_snr_is_none(toy):
    model, probe = toy
    attach_noise_context(model)  # generic spec: falls back to the argument named "timestep"
    model(torch.randn(2, 3), torch.tensor([3, 4]))
    assert probe.last.log_snr is None
    assert torch.equal(probe.last.timestep, torch.tensor([3.0, 4.0]))


def test_nested_calls_restore_outer_level(ddpm):
    class Student(nn.Module):
        def __init__(self, teacher: nn.Module) -> None:
            super().__init__()
            self.teacher = teacher
            self.pre = nn.Linear(3, 3)
            self.post = nn.Linear(3, 3)

        def forward(self, x, timestep):
            h = self.pre(x)
            self.teacher(x, timestep=torch.full((x.shape[0],), 900))
            return self.post(h)

    torch.manual_seed(0)
    teacher = Toy()
    student = Student(teacher)
    attach_noise_context(teacher, ddpm)
    attach_noise_context(student, ddpm)
    in_teacher, before, after = Recorder(teacher.inner), Recorder(student.pre), Recorder(student.post)
    student(torch.randn(2, 3), torch.tensor([5, 6]))
    assert torch.equal(before.last.timestep, torch.tensor([5.0, 6.0]))
    assert torch.equal(in_teacher.last.timestep, torch.tensor([900.0, 900.0]))
    assert torch.equal(after.last.timestep, torch.tensor([5.0, 6.0]))
    assert current_noise_level() is None


def test_exception_in_forward_restores_previous_level(ddpm):
    class Failing(Toy):
        def forward(self, x, timestep=None, scale: float = 1.0):
            self.inner(x)
            raise RuntimeError("boom")

    torch.manual_seed(0)
    model = Failing()
    probe = Recorder(model.inner)
    attach_noise_context(model, ddpm)
    with noise_level(1, batch_size=2) as outer:
        with pytest.raises(RuntimeError, match="boom"):
            model(torch.randn(2, 3), torch.tensor([100, 200]))
        assert current_noise_level() is outer
    assert torch.equal(probe.last.timestep, torch.tensor([100.0, 200.0]))
    assert current_noise_level() is None


def test_missing_timestep_raises_and_restores(toy, ddpm):
    model, _ = toy
    attach_noise_context(model, ddpm)
    with noise_level(3) as outer:
        with pytest.raises(ValueError, match=r"'timestep'.*timestep_arg"):
            model(torch.randn(2, 3))
        assert current_noise_level() is outer
    # the failed call left nothing behind: the next call works and restores to None
    model(torch.randn(2, 3), 4)
    assert current_noise_level() is None


def test_wrong_length_timestep_vector_raises(toy, ddpm):
    model, _ = toy
    attach_noise_context(model, ddpm)
    with pytest.raises(ValueError, match="3 values but the batch has 4"):
        model(torch.randn(4, 3), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="1-D"):
        model(torch.randn(4, 3), torch.ones(4, 1, dtype=torch.long))
    assert current_noise_level() is None


def test_attach_twice_keeps_one_hook_pair_and_remove_detaches(toy, ddpm):
    model, probe = toy
    attach_noise_context(model)
    handle = attach_noise_context(model, ddpm)
    assert len(model._forward_pre_hooks) == 1
    assert len(model._forward_hooks) == 1
    model(torch.randn(2, 3), 10)
    assert probe.last.log_snr is not None  # the second attach (with schedule) is the live one
    handle.remove()
    assert len(model._forward_pre_hooks) == 0
    assert len(model._forward_hooks) == 0
    model(torch.randn(2, 3), 10)
    assert probe.seen[-1] is None


def test_other_pre_hooks_on_the_denoiser_see_the_level(toy):
    model, _ = toy
    seen: list[NoiseLevel | None] = []
    model.register_forward_pre_hook(lambda m, args: seen.append(current_noise_level()))
    attach_noise_context(model)  # registered later, but runs first
    model(torch.randn(2, 3), torch.tensor([1, 2]))
    assert seen[0] is not None and torch.equal(seen[0].timestep, torch.tensor([1.0, 2.0]))


def test_handle_as_context_manager_and_detach(toy):
    model, probe = toy
    with attach_noise_context(model):
        model(torch.randn(2, 3), 1)
    model(torch.randn(2, 3), 1)
    assert probe.seen[0] is not None and probe.seen[1] is None
    attach_noise_context(model)
    detach_noise_context(model)
    detach_noise_context(model)  # no-op when nothing is attached
    assert len(model._forward_pre_hooks) == 0 and len(model._forward_hooks) == 0


def test_deepcopy_of_attached_model_is_independent(toy, ddpm):
    model, _ = toy
    attach_noise_context(model, ddpm)
    clone = copy.deepcopy(model)
    clone_probe = Recorder(clone.inner)
    clone(torch.randn(2, 3), torch.tensor([1, 2]))
    assert torch.equal(clone_probe.last.timestep, torch.tensor([1.0, 2.0]))
    detach_noise_context(clone)
    assert len(clone._forward_pre_hooks) == 0
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1


def test_custom_rule_callable(ddpm):
    class CondNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(3, 3)

        def forward(self, x, cond):
            return self.inner(x)

    torch.manual_seed(0)
    model = CondNet()
    probe = Recorder(model.inner)
    attach_noise_context(model, ddpm, timestep_arg=lambda args, kwargs: kwargs["cond"]["t"])
    model(torch.randn(3, 3), cond={"t": 20})
    assert torch.equal(probe.last.timestep, torch.full((3,), 20.0))
    with pytest.raises(ValueError, match="rule returned None"):
        model(torch.randn(3, 3), cond={"t": None})


def test_named_argument(ddpm):
    class SigmaNet(Toy):
        def forward(self, x, noise_t):
            return self.inner(x)

    torch.manual_seed(0)
    model = SigmaNet()
    probe = Recorder(model.inner)
    with pytest.raises(ValueError, match="Cannot tell which argument"):
        attach_noise_context(model, ddpm)
    with pytest.raises(ValueError, match="no argument 'sigma'"):
        attach_noise_context(model, ddpm, timestep_arg="sigma")
    with pytest.raises(TypeError, match="timestep_arg"):
        attach_noise_context(model, ddpm, timestep_arg=3)
    attach_noise_context(model, ddpm, timestep_arg="noise_t")
    model(torch.randn(2, 3), torch.tensor([0, 999]))
    torch.testing.assert_close(probe.last.log_snr, _reference_log_snr(ddpm, [0, 999]))


def test_attach_rejects_bad_schedule_and_model(toy):
    model, _ = toy
    with pytest.raises(TypeError, match="NoiseSchedule"):
        attach_noise_context(model, schedule="ddpm")
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        attach_noise_context(lambda x: x)


def test_levels_are_per_thread():
    seen_in_thread: list[NoiseLevel | None] = []
    with noise_level(5):
        worker = threading.Thread(target=lambda: seen_in_thread.append(current_noise_level()))
        worker.start()
        worker.join()
        assert current_noise_level() is not None
    assert seen_in_thread == [None]


# --- noise_level / require_noise_level ------------------------------------------------------------


def test_noise_level_by_hand(ddpm):
    assert current_noise_level() is None
    with noise_level(torch.tensor(3), batch_size=4) as outer:
        assert torch.equal(outer.timestep, torch.full((4,), 3.0)) and outer.log_snr is None
        with noise_level([1, 2], log_snr=0.5) as inner:
            assert current_noise_level() is inner
            assert torch.equal(inner.log_snr, torch.tensor([0.5, 0.5]))
        assert current_noise_level() is outer
        with noise_level([999, 0], schedule=ddpm) as lvl:
            torch.testing.assert_close(lvl.log_snr, _reference_log_snr(ddpm, [999, 0]))
    assert current_noise_level() is None
    with noise_level(8) as single:
        assert single.timestep.shape == (1,)


def test_noise_level_rejects_inconsistent_input(ddpm):
    with pytest.raises(ValueError, match="not both"), noise_level(1, log_snr=0.0, schedule=ddpm):
        pass
    with pytest.raises(ValueError, match="2 values but the batch has 3"), noise_level([1, 2], batch_size=3):
        pass
    with pytest.raises(ValueError, match="timestep"):
        NoiseLevel(torch.zeros(2, 1), None)
    with pytest.raises(ValueError, match="log_snr"):
        NoiseLevel(torch.zeros(2), torch.zeros(3))


def test_require_noise_level():
    with pytest.raises(RuntimeError, match="attach_noise_context"):
        require_noise_level()
    with noise_level(1):
        assert require_noise_level().batch_size == 1
        with pytest.raises(RuntimeError, match="log-SNR"):
            require_noise_level(need_log_snr=True)
    with noise_level(1, log_snr=2.0):
        assert require_noise_level(need_log_snr=True).log_snr.item() == 2.0


# --- NoiseSchedule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedule_is_sampler_independent(beta_schedule):
    kw = {"num_train_timesteps": 1000, "beta_schedule": beta_schedule}
    t = torch.tensor([0, 1, 250, 999])
    ref = NoiseSchedule.from_scheduler(DDPMScheduler(**kw)).log_snr(t)
    for cls in (DDIMScheduler, DPMSolverMultistepScheduler):
        other = NoiseSchedule.from_scheduler(cls(**kw))
        assert other.num_train_timesteps == 1000
        assert torch.equal(other.log_snr(t), ref)
    # log-SNR decreases monotonically with t for every standard schedule
    full = NoiseSchedule.from_scheduler(DDPMScheduler(**kw)).log_snr(torch.arange(1000))
    assert (full[1:] < full[:-1]).all()


def test_log_snr_values_dtype_device_and_shape(ddpm):
    sched = NoiseSchedule.from_scheduler(ddpm)
    t = torch.tensor([[0, 10, 999], [1, 2, 3]])
    out = sched.log_snr(t)
    assert out.shape == (2, 3) and out.dtype == torch.float32 and out.device == t.device
    torch.testing.assert_close(out, _reference_log_snr(ddpm, t), rtol=1e-6, atol=1e-6)
    ac = ddpm.alphas_cumprod.double()
    assert out[0, 0].item() == pytest.approx(math.log(ac[0] / (1 - ac[0])), rel=1e-6)
    assert sched.log_snr(torch.tensor([], dtype=torch.long)).shape == (0,)
    with pytest.raises(TypeError, match="bool"):
        sched.log_snr(torch.tensor([True]))


def test_fractional_timesteps_interpolate_log_snr(ddpm):
    sched = NoiseSchedule.from_scheduler(ddpm)
    table = sched.log_snr(torch.arange(1000)).double()
    got = sched.log_snr(torch.tensor([10.25, 998.5, 999.0, 0.0]))
    expected = torch.stack(
        [0.75 * table[10] + 0.25 * table[11], 0.5 * table[998] + 0.5 * table[999], table[999], table[0]]
    ).float()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # integral float timesteps give exactly the integer lookup
    assert torch.equal(sched.log_snr(torch.tensor([5.0, 999.0])), sched.log_snr(torch.tensor([5, 999])))


@pytest.mark.parametrize("bad", [-1, 1000, 999.5, -0.01, float("nan")])
def test_timestep_out_of_range_raises(ddpm, bad):
    sched = NoiseSchedule.from_scheduler(ddpm)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        sched.log_snr(torch.tensor([10, bad]))


def test_out_of_range_in_hook_restores(toy, ddpm):
    model, _ = toy
    attach_noise_context(model, ddpm)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        model(torch.randn(2, 3), torch.tensor([1, 1000]))
    assert current_noise_level() is None


def test_schedule_validation():
    with pytest.raises(ValueError, match="1-D"):
        NoiseSchedule(torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="1-D"):
        NoiseSchedule(torch.tensor([]))
    with pytest.raises(ValueError, match=r"ᾱ\[2\] = 0.0"):
        NoiseSchedule(torch.tensor([0.9, 0.5, 0.0]))
    with pytest.raises(ValueError, match=r"ᾱ\[0\] = 1.0"):
        NoiseSchedule(torch.tensor([1.0, 0.5]))
    with pytest.raises(TypeError, match="alphas_cumprod"):
        NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler())


def test_zero_terminal_snr_schedule_is_made_finite():
    scheduler = DDIMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=True)
    assert scheduler.alphas_cumprod[-1] == 0
    sched = NoiseSchedule.from_scheduler(scheduler)
    last = sched.log_snr(torch.tensor([999])).item()
    assert last == pytest.approx(math.log(2.0**-24 / (1 - 2.0**-24)), rel=1e-6)
    assert torch.isfinite(sched.log_snr(torch.arange(1000))).all()
