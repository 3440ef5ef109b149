"""One fine-tuning surface: registered configs round-trip through JSON, aliases, errors, extension."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from diffquant.efficientdm import EfficientDMConfig, efficientdm_finetune
from diffquant.finetune import (
    FinetuneConfig,
    FinetuneSetup,
    finetune_config,
    finetune_methods,
    prepare_finetune,
    register_finetune_method,
)
from diffquant.finetune.methods import QATFinetuneConfig, TuneQDMFinetuneConfig
from diffquant.finetune.registry import _METHODS
from diffquant.models.tiny import scheduler_for_tests, tiny_unet2d
from diffquant.tuneqdm import TuneQDMConfig


@pytest.mark.parametrize("method", finetune_methods())
def test_every_config_round_trips_through_json(method):
    config = finetune_config(method)
    assert config.method == method and config.version == 1
    assert type(config).from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown"):
        type(config).from_dict({**config.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="version"):
        type(config).from_dict({**config.to_dict(), "version": 99})


def test_bits_is_the_one_name_and_the_seeds_names_are_aliases():
    assert TuneQDMConfig(n_bits=4) == TuneQDMConfig(bits=4) and TuneQDMConfig(n_bits=4).n_bits == 4
    assert EfficientDMConfig(weight_bits=2) == EfficientDMConfig(bits=2)
    assert EfficientDMConfig(weight_bits=2).weight_bits == 2
    with pytest.raises(ValueError, match="pass only one"):
        EfficientDMConfig(bits=8, weight_bits=2)
    nested = TuneQDMFinetuneConfig(tuneqdm=TuneQDMConfig(bits=2, num_experts=2), lr=1e-3)
    assert TuneQDMFinetuneConfig.from_json(nested.to_json()).tuneqdm.bits == 2
    assert QATFinetuneConfig.from_json(QATFinetuneConfig(cosine_steps=5).to_json()).quant.weights.bits == 8


def test_bad_configs_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="lr must be a positive number"):
        finetune_config("fp-full", lr=0.0)
    with pytest.raises(ValueError, match="unknown fine-tuning method"):
        finetune_config("dreambooth-xl")
    with pytest.raises(TypeError, match="not a fine-tuning method config"):
        prepare_finetune(tiny_unet2d(), TuneQDMConfig())  # the layer config, not the method's
    with pytest.raises(ValueError, match="calibrate"):
        prepare_finetune(tiny_unet2d(), EfficientDMConfig(), scheduler=scheduler_for_tests())
    with pytest.raises(ValueError, match="weight_range"):
        QATFinetuneConfig(weight_range="minmax")
    with pytest.raises(ValueError, match=r"train_data=\(images, conditioning\)"):  # no digits fallback
        efficientdm_finetune(tiny_unet2d(), scheduler=scheduler_for_tests(), calibrate=print, distill=False)


def test_a_new_method_registers_itself_and_dispatches_by_config_type():
    @dataclass(frozen=True, kw_only=True)
    class SGDConfig(FinetuneConfig):
        method: ClassVar[str] = "sgd-test"
        lr: float = 0.5

    @register_finetune_method("sgd-test", SGDConfig)
    def prepare(model, config, context):
        return FinetuneSetup(model, torch.optim.SGD(model.parameters(), lr=config.lr))

    try:
        assert "sgd-test" in finetune_methods()
        setup = prepare_finetune(nn.Linear(2, 2), finetune_config("sgd-test", lr=0.1))
        assert setup.optimizer.param_groups[0]["lr"] == 0.1 and setup.inference_model() is setup.model
        with pytest.raises(ValueError, match="already registered"):
            register_finetune_method("sgd-test", SGDConfig)(prepare)
    finally:
        _METHODS.pop("sgd-test", None)
