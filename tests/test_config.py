import pytest

from diffquant import ActivationQuantConfig, QuantConfig, WeightQuantConfig


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(),
        QuantConfig(weights=WeightQuantConfig(bits=4, granularity="group", group_size=64, symmetric=False)),
        QuantConfig(weights=WeightQuantConfig(format="nf4", bits=4, block_size=128, double_quant=False)),
        QuantConfig(
            weights=WeightQuantConfig(bits=2, range_method="mse"),
            activations=ActivationQuantConfig(bits=4, mode="dynamic", symmetric=True),
            include=("down_blocks.*",),
            exclude=(r".*proj_out",),
            keep_fp=(),
        ),
    ],
)
def test_json_round_trip(config):
    assert QuantConfig.from_json(config.to_json()) == config
    assert QuantConfig.from_dict(config.to_dict()) == config


def test_labels():
    assert (
        QuantConfig(weights=WeightQuantConfig(bits=4), activations=ActivationQuantConfig(bits=8)).label
        == "W4A8"
    )
    assert QuantConfig(weights=WeightQuantConfig(format="nf4", bits=4)).label == "NF4A16"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 1}, "2..8 bits"),
        ({"bits": 9}, "2..8 bits"),
        ({"bits": 4.0}, "2..8 bits"),
        ({"format": "nf4", "bits": 3}, "NF4 is a 4-bit format"),
        ({"format": "nf4", "bits": 4, "block_size": 48}, "power of two"),
        ({"format": "nf4", "bits": 4, "block_size": 8192}, "power of two"),
        ({"format": "fp8"}, "format='fp8' is not supported"),
        ({"granularity": "row"}, "granularity='row'"),
        ({"granularity": "group"}, "group_size"),
        ({"granularity": "channel", "group_size": 64}, "only used with granularity='group'"),
        ({"range_method": "kl"}, "range_method"),
    ],
)
def test_weight_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WeightQuantConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"bits": 16}, "2..8 bits"), ({"mode": ""}, "non-empty"), ({"percentile": 20}, "percentile")],
)
def test_activation_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ActivationQuantConfig(**kwargs)


def test_quant_config_validation():
    with pytest.raises(ValueError, match="version 3"):
        QuantConfig(version=3)
    with pytest.raises(ValueError, match="not a valid regex"):
        QuantConfig(include=("conv[",))
    with pytest.raises(TypeError, match="single string"):
        QuantConfig(exclude="conv_in")
    with pytest.raises(ValueError, match="unknown QuantConfig field"):
        QuantConfig.from_dict({"weights": {}, "bogus": 1})
    with pytest.raises(ValueError, match="unknown WeightQuantConfig field"):
        QuantConfig.from_dict({"weights": {"nbits": 4}})


def test_fallback_granularity():
    cfg = WeightQuantConfig(bits=4, granularity="group", group_size=64, fallback_granularity="channel")
    assert cfg.for_layer(128) is cfg
    assert cfg.for_layer(288).granularity == "channel" and cfg.for_layer(288).group_size is None
    with pytest.raises(ValueError, match="fallback_granularity='group'"):
        WeightQuantConfig(fallback_granularity="group")
