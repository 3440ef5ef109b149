"""QAT range modes are strategy classes chosen once, from a registry."""

import pytest
import torch
from torch import nn

from diffquant import ActivationQuantConfig, QuantConfig, WeightQuantConfig
from diffquant.qat import (
    RANGE_MODES,
    ActivationFakeQuantizer,
    LSQActivationFakeQuantizer,
    LSQWeightFakeQuantizer,
    ObserverActivationFakeQuantizer,
    ObserverWeightFakeQuantizer,
    WeightFakeQuantizer,
    convert,
    prepare_qat,
)

CONFIG = QuantConfig(weights=WeightQuantConfig(bits=4), activations=ActivationQuantConfig(bits=8))


@pytest.mark.parametrize(
    ("weight_range", "act_range", "weight_cls", "act_cls"),
    [
        ("observer", "lsq", ObserverWeightFakeQuantizer, LSQActivationFakeQuantizer),
        ("lsq", "observer", LSQWeightFakeQuantizer, ObserverActivationFakeQuantizer),
    ],
)
def test_each_layer_gets_the_strategy_of_its_mode(weight_range, act_range, weight_cls, act_cls):
    net = prepare_qat(
        nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)),
        CONFIG,
        weight_range=weight_range,
        act_range=act_range,
    )
    for layer in net:
        assert type(layer.weight_fake_quant) is weight_cls and type(layer.input_fake_quant) is act_cls
    assert RANGE_MODES == ("observer", "lsq") == tuple(ActivationFakeQuantizer.registry)


def test_unknown_modes_name_the_registered_ones():
    with pytest.raises(
        ValueError, match="weight_range='ema' is not supported; choose one of 'observer', 'lsq'"
    ):
        WeightFakeQuantizer.create(torch.randn(4, 4), WeightQuantConfig(), "ema")
    with pytest.raises(ValueError, match="act_range='ema'"):
        prepare_qat(nn.Sequential(nn.Linear(4, 4)), CONFIG, act_range="ema")


def test_a_new_range_mode_is_a_subclass_and_needs_no_edit_elsewhere():
    class FixedUnitRange(ObserverActivationFakeQuantizer):
        """Always the range [-1, 1] (a toy strategy)."""

        range_mode = "unit"

        def _update_range(self, lo, hi):
            self.min_val.fill_(-1.0)
            self.max_val.fill_(1.0)

    try:
        net = prepare_qat(nn.Sequential(nn.Linear(4, 4)), CONFIG, act_range="unit")
        net(torch.randn(8, 4) * 10)
        assert type(net[0].input_fake_quant) is FixedUnitRange
        static = convert(net.eval())[0].input_quant
        assert torch.equal(static.scale, torch.tensor([2.0 / 255]))
    finally:
        del ActivationFakeQuantizer.registry["unit"]
