import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from PIL import Image

from diffquant.bench.digits.model import NULL_CLASS, TINY_UNET, build_unet
from diffquant.bench.digits.sampling import balanced_labels, make_grid, sample_digits, save_sample_grid
from diffquant.bench.digits.train import training_scheduler


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_unet(TINY_UNET).eval()


LABELS = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11])


def _manual_ddim(model, labels, guidance, steps, seed):
    """Reference loop: separate conditional and unconditional calls."""
    sched = DDIMScheduler.from_config(training_scheduler().config)
    sched.set_timesteps(steps)
    x = torch.randn((labels.shape[0], 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for t in sched.timesteps:
            tb = torch.full((labels.shape[0],), int(t))
            eps = model(x, tb, class_labels=labels).sample
            if guidance != 1.0:
                eps_u = model(x, tb, class_labels=torch.full_like(labels, NULL_CLASS)).sample
                eps = eps_u + guidance * (eps - eps_u)
            x = sched.step(eps, t, x).prev_sample
    return x.clamp(-1, 1)


def test_same_seed_same_samples_and_other_seed_differs(model):
    a = sample_digits(model, LABELS, num_steps=5, seed=7, progress=False)
    b = sample_digits(model, LABELS, num_steps=5, seed=7, progress=False)
    c = sample_digits(model, LABELS, num_steps=5, seed=8, progress=False)
    assert a.shape == (11, 1, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_batch_size_does_not_change_samples(model):
    whole = sample_digits(model, LABELS, num_steps=5, batch_size=11, progress=False)
    split = sample_digits(model, LABELS, num_steps=5, batch_size=3, progress=False)
    torch.testing.assert_close(whole, split, atol=1e-5, rtol=0)


def test_timesteps_reach_the_model_per_sample(model):
    seen = []

    def probe(module, args, kwargs):
        seen.append((args[1], kwargs["class_labels"], args[0].shape[0]))

    handle = model.register_forward_pre_hook(probe, with_kwargs=True)
    try:
        sample_digits(model, LABELS[:4], num_steps=3, guidance_scale=2.0, progress=False)
    finally:
        handle.remove()
    assert len(seen) == 3
    for t, c, batch in seen:
        assert isinstance(t, torch.Tensor) and t.shape == (batch,) == (8,)
        assert torch.all(t == t[0])
        assert torch.equal(c[4:], torch.full((4,), NULL_CLASS))  # [cond, uncond] in one call
    assert [int(t[0]) for t, _, _ in seen] == sorted({int(t[0]) for t, _, _ in seen}, reverse=True)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_guidance_matches_reference_loop(model, guidance):
    ours = sample_digits(model, LABELS, num_steps=4, guidance_scale=guidance, seed=2, progress=False)
    ref = _manual_ddim(model, LABELS, guidance, steps=4, seed=2)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_guidance_changes_samples(model):
    plain = sample_digits(model, LABELS, num_steps=4, guidance_scale=1.0, progress=False)
    guided = sample_digits(model, LABELS, num_steps=4, guidance_scale=4.0, progress=False)
    assert (plain - guided).abs().max() > 1e-4


def test_other_schedulers_work_and_are_not_mutated(model):
    dpm = DPMSolverMultistepScheduler.from_config(training_scheduler().config)
    before = dict(dpm.config)
    out = sample_digits(model, LABELS, scheduler=dpm, num_steps=6, progress=False)
    assert out.shape == (11, 1, 8, 8) and torch.isfinite(out).all()
    assert dict(dpm.config) == before
    assert dpm.num_inference_steps is None  # the template itself was never set up


def test_bad_sampler_inputs_are_rejected(model):
    with pytest.raises(ValueError, match="class ids"):
        sample_digits(model, torch.zeros(3), progress=False)
    with pytest.raises(ValueError, match=r"0\.\.11"):
        sample_digits(model, torch.tensor([12]), progress=False)
    with pytest.raises(ValueError, match="num_steps"):
        sample_digits(model, LABELS, num_steps=0, progress=False)
    with pytest.raises(ValueError, match="guidance_scale"):
        sample_digits(model, LABELS, guidance_scale=-1.0, progress=False)


def test_balanced_labels():
    labels = balanced_labels(3)
    assert labels.tolist() == [c for c in range(10) for _ in range(3)]


def test_grid_and_png_are_written_atomically(tmp_path):
    images = torch.linspace(-1, 1, 20 * 64).reshape(20, 1, 8, 8)
    grid = make_grid(images, nrow=5)
    assert grid.shape == (4 * 9 + 1, 5 * 9 + 1) and grid.dtype == np.uint8
    assert grid[1, 1] == 0 and grid[-2, -2] == 255
    path = save_sample_grid(images, torch.arange(20) % 4, tmp_path / "sub" / "grid.png", per_class=5, scale=2)
    with Image.open(path) as img:
        assert img.size == ((5 * 9 + 1) * 2, (4 * 9 + 1) * 2)
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]
    with pytest.raises(ValueError, match="labels must be"):
        save_sample_grid(images, torch.arange(3), tmp_path / "bad.png")
