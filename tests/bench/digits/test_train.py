import pytest
import torch

from diffquant.bench.digits.data import load_digits_dataset
from diffquant.bench.digits.model import TINY_UNET
from diffquant.bench.digits.train import TrainConfig, train_fp_model, training_scheduler

TINY_TRAIN = TrainConfig(steps=60, batch_size=32, lr=3e-3, warmup_steps=5, ema_decay=0.9)
FEW_STEPS = TrainConfig(steps=5, batch_size=8, warmup_steps=1)


def test_tiny_training_is_deterministic_for_a_seed():
    a = train_fp_model(None, TINY_UNET, FEW_STEPS, seed=3, progress=False)
    b = train_fp_model(None, TINY_UNET, FEW_STEPS, seed=3, progress=False)
    c = train_fp_model(None, TINY_UNET, FEW_STEPS, seed=4, progress=False)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.losses == b.losses
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_tiny_training_reduces_the_loss():
    result = train_fp_model(None, TINY_UNET, TINY_TRAIN, seed=0, progress=False)
    assert len(result.losses) == TINY_TRAIN.steps
    first, last = result.losses[:10], result.losses[-10:]
    assert sum(last) / 10 < 0.8 * sum(first) / 10
    assert not result.model.training


def test_training_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_fp_model(None, TINY_UNET, TrainConfig(steps=1, batch_size=4, warmup_steps=0), progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_training_scheduler_is_a_1000_step_epsilon_ddpm():
    sched = training_scheduler()
    assert sched.config.num_train_timesteps == 1000
    assert sched.config.prediction_type == "epsilon"
    assert torch.all(sched.alphas_cumprod[1:] < sched.alphas_cumprod[:-1])


def test_bad_train_config_is_rejected():
    with pytest.raises(ValueError, match="label_dropout"):
        TrainConfig(label_dropout=1.0)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="image_size=8"):
        train_fp_model(load_digits_dataset(16), TINY_UNET, FEW_STEPS, progress=False)
