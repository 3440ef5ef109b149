"""The CLI offers what the registries hold: weight methods, activation modes, ranges, modes."""

import pytest

from diffquant.api import _WEIGHT_METHODS, register_weight_method, weight_methods
from diffquant.cli import build_parser, main
from diffquant.config import RANGE_METHODS, SEQUENTIAL_MODES
from diffquant.nn import ActivationQuantizer


def _choices(option: str) -> list[str]:
    quantize = build_parser()._subparsers._group_actions[0].choices["quantize"]
    return next(a.choices for a in quantize._actions if option in a.option_strings)


def test_choices_come_from_the_registries():
    assert _choices("--method") == list(weight_methods()) and {"rtn", "gptq", "qronos"} <= set(
        _choices("--method")
    )
    assert _choices("--range-method") == list(RANGE_METHODS)
    assert _choices("--sequential") == list(SEQUENTIAL_MODES)


def test_a_newly_registered_weight_method_is_offered():
    register_weight_method("rtn_again")(lambda model, layers, configs, calls: None)
    try:
        assert "rtn_again" in _choices("--method")
    finally:
        del _WEIGHT_METHODS["rtn_again"]


def test_an_unknown_activation_mode_lists_the_registered_ones(tmp_path, capsys):
    assert main(["quantize", str(tmp_path), "--out", str(tmp_path / "q"), "--activations", "int8-warp"]) == 2
    err = capsys.readouterr().err
    assert "unknown mode 'warp'" in err and all(mode in err for mode in ActivationQuantizer.registry)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "m", "--out", "o", "--method", "warp"])
