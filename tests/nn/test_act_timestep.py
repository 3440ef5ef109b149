import json

import pytest
import torch

import diffquant
from diffquant import ActivationQuantConfig, QuantConfig, WeightQuantConfig
from diffquant.models.tiny import example_inputs, scheduler_for_tests, tiny_unet2d
from diffquant.nn import (
    LogSnrTDQActivationQuantizer,
    StaticActivationQuantizer,
    StepTableActivationQuantizer,
    TDQActivationQuantizer,
    build_activation_quantizer,
)
from diffquant.nn.act_quant import quantizer_from_meta
from diffquant.noise import NoiseSchedule, noise_level
from diffquant.quant import affine

SCHEDULE = NoiseSchedule.from_scheduler(scheduler_for_tests())
CAL_T = torch.tensor([999.0, 750.0, 500.0, 250.0, 0.0])


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: on the shared 2-core machine a second intra-op thread only adds waiting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def amplitude(t):
    """Activation range that grows with the noise level: |x| <= a(t)."""
    return 0.5 + 3.0 * (torch.as_tensor(t, dtype=torch.float32) / 999) ** 2


def sample(t, shape=(64,), seed=0):
    """One row per timestep, uniform in [-a(t), a(t)], with both ends hit exactly."""
    t = torch.as_tensor(t, dtype=torch.float32)
    a = amplitude(t).reshape(-1, *([1] * len(shape)))
    x = (torch.rand(t.numel(), *shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * a
    x.view(t.numel(), -1)[:, 0] = a.reshape(-1)
    x.view(t.numel(), -1)[:, 1] = -a.reshape(-1)
    return x


def calibrated(mode, timesteps=CAL_T, bits=4, schedule=None, **kwargs):
    """Calibrate on mixed-timestep batches (each timestep appears in several batches)."""
    quantizer = build_activation_quantizer(
        ActivationQuantConfig(bits=bits, mode=mode, **kwargs), channel_dim=-1
    )
    quantizer.start_calibration("blk.0")
    for seed in range(3):
        t = timesteps[torch.randperm(len(timesteps), generator=torch.Generator().manual_seed(seed))]
        x = sample(t, seed=seed)
        with noise_level(t, schedule=schedule):
            assert torch.equal(quantizer(x), x)  # observing: values pass through unchanged
    quantizer.finish_calibration()
    return quantizer


def reference(x, timesteps, bits=4):
    """Per-sample fake quantization with the range a(t) of each sample's own timestep."""
    a = amplitude(timesteps)
    scale, zp = affine.qparams_from_range(-a, a, bits, symmetric=False)
    qmin, qmax = affine.int_range(bits, False)
    shape = (-1,) + (1,) * (x.ndim - 1)
    return affine.fake_quantize(x, scale.reshape(shape), zp.float().reshape(shape), qmin, qmax)


# --- step table -------------------------------------------------------------------------------------


def test_step_table_has_one_entry_per_calibrated_timestep():
    quantizer = calibrated("step_table")
    assert isinstance(quantizer, StepTableActivationQuantizer)
    assert torch.equal(quantizer.timesteps, CAL_T.sort().values)
    a = amplitude(quantizer.timesteps)
    expected, _ = affine.qparams_from_range(-a, a, 4, symmetric=False)
    torch.testing.assert_close(quantizer.scale, expected, rtol=1e-6, atol=0)


def test_step_table_quantizes_each_sample_of_a_mixed_batch_with_its_own_timestep():
    quantizer = calibrated("step_table")
    t = torch.tensor([0.0, 999.0, 500.0, 0.0, 250.0, 750.0])
    x = sample(t, shape=(5, 16), seed=7) * 1.1  # a little beyond the range: clipping included
    with noise_level(t):
        out = quantizer(x)
    assert torch.equal(out, reference(x, t))
    with noise_level(999):  # one range for the whole batch is a different (worse) result
        assert not torch.equal(quantizer(x), out)


def test_step_table_uses_the_nearest_calibrated_timestep():
    quantizer = calibrated("step_table")
    unseen = torch.tensor([980.0, 630.0, 370.0, 120.0, 125.0, 126.0, 3.0])
    nearest = torch.tensor([999.0, 750.0, 250.0, 0.0, 0.0, 250.0, 0.0])  # ties (125) go to the lower one
    x = sample(unseen, seed=3)
    with noise_level(unseen):
        assert torch.equal(quantizer(x), reference(x, nearest))


def test_step_table_classifier_free_guidance_and_broadcast_levels():
    quantizer = calibrated("step_table")
    t = torch.tensor([750.0, 0.0])
    x = sample(torch.cat([t, t]), shape=(3, 8), seed=1)  # cond | uncond halves at the same timesteps
    with noise_level(torch.cat([t, t])):
        assert torch.equal(quantizer(x), reference(x, torch.cat([t, t])))
    with noise_level(999):  # one timestep for the whole batch
        assert torch.equal(quantizer(x), reference(x, torch.full((4,), 999.0)))


def test_step_table_attention_batch_of_k_times_b_rows_is_batch_major():
    quantizer = calibrated("step_table")
    t = torch.tensor([999.0, 0.0, 500.0])
    heads, tokens, width = 4, 5, 8
    per_sample = sample(t, shape=(heads, tokens, width), seed=2)  # (B, heads, T, D)
    x = per_sample.reshape(len(t) * heads, tokens, width)  # head_to_batch_dim: (B * heads, T, D)
    with noise_level(t):
        out = quantizer(x)
        assert torch.equal(out.reshape(per_sample.shape), reference(per_sample, t))
        with pytest.raises(RuntimeError, match="not a multiple of 3"):
            quantizer(torch.randn(4, width))


def test_step_table_errors():
    quantizer = build_activation_quantizer(ActivationQuantConfig(bits=4, mode="step_table"), channel_dim=-1)
    with pytest.raises(RuntimeError, match="No noise level is set"):
        quantizer(torch.randn(2, 4))
    with noise_level([10, 20]), pytest.raises(RuntimeError, match="never calibrated.*calibrate=fn"):
        quantizer(torch.randn(2, 4))
    quantizer.start_calibration("blk.3")
    with pytest.raises(ValueError, match="no data through blk.3"):
        quantizer.finish_calibration()
    quantizer.start_calibration("blk.3")
    with noise_level([10]), pytest.raises(ValueError, match="NaN/Inf"):
        quantizer(torch.tensor([[1.0, float("nan")]]))


def test_step_table_state_dict_round_trip_through_meta():
    quantizer = calibrated("step_table", timesteps=torch.tensor([999.0, 500.0, 10.0]), range_method="mse")
    quantizer.resample(torch.linspace(999, 0, 20).round())  # the table changes size
    meta = json.loads(json.dumps(quantizer.meta()))
    loaded = quantizer_from_meta(meta)
    loaded.load_state_dict(quantizer.state_dict())
    t = torch.tensor([999.0, 400.0, 7.0, 650.0])
    x = sample(t, seed=5)
    with noise_level(t):
        assert torch.equal(loaded(x), quantizer(x))
    assert loaded.timesteps.numel() == 20


def test_step_table_resample_keeps_the_nearest_entries():
    quantizer = calibrated("step_table")
    dpm_steps = torch.tensor([999.0, 666.0, 333.0, 90.0])
    x = sample(dpm_steps, seed=4)
    with noise_level(dpm_steps):
        before = quantizer(x)
    quantizer.resample(dpm_steps)
    assert torch.equal(quantizer.timesteps, dpm_steps.sort().values)
    with noise_level(dpm_steps):
        assert torch.equal(quantizer(x), before)


def test_step_table_clipping_range_methods_are_per_timestep():
    minmax = calibrated("step_table")
    mse = calibrated("step_table", range_method="mse")
    assert (mse.scale <= minmax.scale).all() and (mse.scale < minmax.scale).any()
    assert mse.scale[0] < mse.scale[-1]  # still follows a(t)


def test_step_table_make_learnable_keeps_outputs_and_trains_only_the_used_entries():
    quantizer = calibrated("step_table")
    t = torch.tensor([999.0, 999.0, 0.0])
    x = sample(t, seed=6)
    with noise_level(t):
        before = quantizer(x)
        quantizer.make_learnable()
        assert isinstance(quantizer.scale, torch.nn.Parameter)
        out = quantizer(x)
    assert torch.equal(out, before)
    (out - x * 0.9).pow(2).sum().backward()
    used = torch.isin(quantizer.timesteps, t)
    assert (quantizer.scale.grad[used] != 0).all() and (quantizer.scale.grad[~used] == 0).all()
    assert quantizer_from_meta(json.loads(json.dumps(quantizer.meta()))).learnable


# --- TDQ / log-SNR TDQ -----------------------------------------------------------------------------

DDIM_T = torch.linspace(999, 0, 25).round()


def _conditions(mode, t):
    return SCHEDULE.log_snr(t) if mode == "logsnr" else t


def test_tdq_starts_at_the_static_range():
    quantizer = build_activation_quantizer(ActivationQuantConfig(bits=4, mode="tdq"), channel_dim=-1)
    quantizer.fit_steps = 0
    static = build_activation_quantizer(ActivationQuantConfig(bits=4), channel_dim=-1)
    for q in (quantizer, static):
        q.start_calibration("blk.0")
        with noise_level(DDIM_T):
            q(sample(DDIM_T) + 0.25)  # off-centre: the zero point is not a rounding tie
        q.finish_calibration()
    assert isinstance(static, StaticActivationQuantizer)
    scale, zero_point = quantizer.qparams_for(DDIM_T)
    torch.testing.assert_close(scale, static.scale.expand(25), rtol=1e-5, atol=0)
    assert torch.equal(zero_point, static.zero_point.expand(25))
    assert torch.equal(quantizer.mlp.w2, torch.zeros_like(quantizer.mlp.w2))


@pytest.mark.parametrize("mode", ["tdq", "logsnr"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_tdq_fit_matches_per_timestep_ranges_and_interpolates(mode, symmetric):
    quantizer = calibrated(mode, timesteps=DDIM_T, schedule=SCHEDULE, symmetric=symmetric)
    assert quantizer.fit_loss < 1e-3

    def relative_error(t):
        a = amplitude(t)
        expected, _ = affine.qparams_from_range(-a, a, 4, symmetric)
        scale, _ = quantizer.qparams_for(_conditions(mode, t))
        return (scale - expected).abs() / expected

    calibration, between = relative_error(DDIM_T), relative_error((DDIM_T[1:] + DDIM_T[:-1]) / 2)
    assert calibration.median() < 0.03 and calibration.max() < 0.08
    assert between.median() < 0.03 and between.max() < 0.08  # no bump in log-SNR's wide gap near t = 0


def test_tdq_fit_is_deterministic():
    def fitted():
        torch.manual_seed(torch.randint(1000, ()).item() + 1)  # the global RNG must not matter
        return calibrated("logsnr", timesteps=DDIM_T, schedule=SCHEDULE)

    first, second = fitted(), fitted()
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_tdq_runs_the_mlp_once_per_noise_level_on_unique_values():
    quantizer = calibrated("logsnr", schedule=SCHEDULE)
    sizes = []
    quantizer.mlp.register_forward_hook(lambda module, args, out: sizes.append(args[0].numel()))
    t = torch.tensor([999.0, 10.0, 999.0, 10.0, 999.0, 10.0])
    x = sample(t, shape=(4, 8))
    with noise_level(t, schedule=SCHEDULE):
        outputs = [quantizer(x) for _ in range(3)]  # three layer calls within one denoiser call
    assert sizes == [2]
    with noise_level(t, schedule=SCHEDULE):
        assert torch.equal(quantizer(x), outputs[0])
        quantizer.load_state_dict(quantizer.state_dict())  # changed tensors invalidate the cache
        quantizer(x)
    assert sizes == [2, 2, 2]
    scale, zero_point = quantizer.qparams_for(SCHEDULE.log_snr(t))
    shape = (-1, 1, 1)
    expected = affine.fake_quantize(x, scale.reshape(shape), zero_point.reshape(shape), 0, 15)
    assert torch.equal(outputs[0], expected)


def test_logsnr_needs_log_snr_in_the_context():
    quantizer = build_activation_quantizer(ActivationQuantConfig(bits=4, mode="logsnr"), channel_dim=-1)
    assert isinstance(quantizer, LogSnrTDQActivationQuantizer)
    quantizer.start_calibration("blk.0")
    with noise_level([10, 500]), pytest.raises(RuntimeError, match="no log-SNR.*schedule"):
        quantizer(torch.randn(2, 4))


def test_tdq_state_dict_round_trip_through_meta():
    config = ActivationQuantConfig(bits=4, mode="tdq")
    quantizer = TDQActivationQuantizer(config, channel_dim=1, hidden=12, num_frequencies=3)
    quantizer.start_calibration("conv")
    with noise_level(DDIM_T):
        quantizer(sample(DDIM_T, shape=(3, 4, 4)))
    quantizer.finish_calibration()
    loaded = quantizer_from_meta(json.loads(json.dumps(quantizer.meta())))
    assert loaded.mlp.w1.shape == (12, 7)
    loaded.load_state_dict(quantizer.state_dict())
    t = torch.tensor([999.0, 321.0, 5.0])
    x = sample(t, shape=(3, 4, 4), seed=9)
    with noise_level(t):
        assert torch.equal(loaded(x), quantizer(x))


# --- end to end on a tiny UNet ---------------------------------------------------------------------


def _noisy_batch(model, timesteps, seed):
    """UNet inputs x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε with binary "digit" images x0."""
    inputs = example_inputs(model, len(timesteps), timesteps=timesteps, seed=seed)
    x0 = (
        torch.rand(inputs["sample"].shape, generator=torch.Generator().manual_seed(seed + 100)) > 0.7
    ) * 2.0 - 1
    alpha_bar = SCHEDULE.alphas_cumprod[torch.as_tensor(timesteps)].float().reshape(-1, 1, 1, 1)
    inputs["sample"] = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * inputs["sample"]
    return inputs


@pytest.fixture(scope="module")
def unet_errors(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    timesteps = [999, 800, 600, 400, 200, 100, 30, 0]
    float_model = tiny_unet2d().eval()
    calibration = [_noisy_batch(float_model, [t] * 4, seed=i) for i, t in enumerate(timesteps)]
    evaluation = [_noisy_batch(float_model, timesteps, seed=50 + i) for i in range(3)]  # mixed timesteps
    with torch.no_grad():
        reference = [float_model(**b).sample for b in evaluation]
    errors, reloaded = {}, {}
    for mode in ("static", "step_table", "logsnr"):
        model = tiny_unet2d().eval()
        config = QuantConfig(
            weights=WeightQuantConfig(bits=8), activations=ActivationQuantConfig(bits=4, mode=mode)
        )
        diffquant.quantize_(
            model, config, calibrate=lambda m: [m(**b) for b in calibration], schedule=scheduler_for_tests()
        )
        with torch.no_grad():
            outputs = [model(**b).sample for b in evaluation]
        errors[mode] = sum((o - r).pow(2).sum() for o, r in zip(outputs, reference, strict=True)) / sum(
            r.pow(2).sum() for r in reference
        )
        path = diffquant.save_quantized(model, tmp_path_factory.mktemp(mode))
        loaded = diffquant.load_quantized(
            path, model=tiny_unet2d(seed=123).eval(), schedule=scheduler_for_tests()
        )
        with torch.no_grad():
            reloaded[mode] = all(
                torch.equal(loaded(**b).sample, o) for b, o in zip(evaluation, outputs, strict=True)
            )
    yield errors, reloaded
    torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", ["step_table", "logsnr"])
def test_timestep_aware_modes_beat_static_on_a_unet(unet_errors, mode):
    errors, _ = unet_errors
    assert errors["static"] < 0.5  # the comparison is between working quantizations
    assert errors[mode] < 0.95 * errors["static"]


@pytest.mark.parametrize("mode", ["static", "step_table", "logsnr"])
def test_save_load_reproduces_timestep_aware_outputs_exactly(unet_errors, mode):
    _, reloaded = unet_errors
    assert reloaded[mode]
