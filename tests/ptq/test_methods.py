import pytest
import torch
from torch import nn

from diffquant import QuantConfig, WeightQuantConfig, quantize_
from diffquant.api import quantized_layers
from diffquant.models.tiny import example_inputs, scheduler_for_tests, tiny_unet2d
from diffquant.nn import QuantLinear
from diffquant.ptq.calibration import record_denoiser_calls
from diffquant.ptq.paths import calibrating
from diffquant.ptq.sequential import calibration_groups, execution_order


def _unet_and_data(seed=0):
    model = tiny_unet2d(seed=seed).eval()
    calib = [example_inputs(model, batch_size=8, seed=s) for s in range(4)]
    held_out = example_inputs(model, batch_size=16, seed=99)
    return model, calib, held_out


def _output_error(model, reference, inputs):
    with torch.no_grad():
        out = model(**inputs).sample
    return ((out - reference).pow(2).mean() / reference.pow(2).mean()).item()


@pytest.mark.parametrize("sequential", ["block", "layer", "off"])
def test_gptq_and_qronos_beat_rtn_on_held_out_inputs(sequential):
    errors = {}
    for method in ("rtn", "gptq", "qronos"):
        model, calib, held_out = _unet_and_data()
        with torch.no_grad():
            reference = model(**held_out).sample
        weights = WeightQuantConfig(bits=3, symmetric=False, method=method, sequential=sequential)
        quantize_(
            model,
            QuantConfig(weights=weights),
            calibrate=lambda m, calib=calib: [m(**c) for c in calib],
            schedule=scheduler_for_tests(),
        )
        errors[method] = _output_error(model, reference, held_out)
        if method != "rtn":
            report = model.diffquant_calibration
            assert set(report["layers"]) == set(quantized_layers(model))
            assert all(v["loss"] >= 0 and v["retries"] >= 0 for v in report["layers"].values())
    assert errors["gptq"] < errors["rtn"]
    assert errors["qronos"] < errors["rtn"]


def test_second_order_methods_need_calibration_and_int_weights():
    with pytest.raises(ValueError, match="weight method 'gptq' needs calibration data"):
        quantize_(tiny_unet2d(), QuantConfig(weights=WeightQuantConfig(bits=4, method="gptq")))
    model, calib, _ = _unet_and_data()
    with pytest.raises(ValueError, match="quantizes INT weights"):
        quantize_(
            model,
            QuantConfig(weights=WeightQuantConfig(format="nf4", bits=4, method="qronos")),
            calibrate=lambda m: m(**calib[0]),
        )
    assert not quantized_layers(model)  # the float model is left as it was


def test_sequential_statistics_come_from_the_quantized_earlier_block():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    x = torch.randn(64, 16)
    layers = {"0": model[0], "2": model[2]}
    assert calibration_groups(model, layers) == [("0", ["0"]), ("2", ["2"])]
    seen = {}
    import diffquant.ptq.methods as methods

    original = methods._solve_layer

    def spy(algorithm, name, layer, stats, config):
        seen[name] = stats.H.clone()
        return original(algorithm, name, layer, stats, config)

    methods._solve_layer = spy
    try:
        quantize_(
            model,
            QuantConfig(weights=WeightQuantConfig(bits=2, method="gptq"), keep_fp=()),
            calibrate=lambda m: m(x),
        )
    finally:
        methods._solve_layer = original
    with torch.no_grad():
        hidden = torch.tanh(model[0](x))  # the first layer is quantized now
    expected = 2 / x.shape[0] * hidden.T @ hidden
    torch.testing.assert_close(seen["2"], expected, rtol=1e-4, atol=1e-6)


def test_recorded_calls_keep_uniform_steps_and_spread_rows():
    model = tiny_unet2d().eval()
    from diffquant.config import CalibrationConfig

    def sampler(m):
        for t in range(0, 1000, 100):
            inputs = example_inputs(m, batch_size=8)
            inputs["timestep"] = torch.full((8,), float(t))
            m(**inputs)

    calls = record_denoiser_calls(
        model, sampler, CalibrationConfig(num_steps=4, samples_per_step=4, merge_batch=None)
    )
    assert [float(c.kwargs["timestep"][0]) for c in calls] == [0.0, 300.0, 600.0, 900.0]
    assert all(c.kwargs["sample"].shape[0] == 4 for c in calls)


def test_layer_groups_follow_execution_order_not_registration_order():
    class Swapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Linear(4, 4)  # registered first, runs second
            self.early = nn.Linear(4, 4)

        def forward(self, x):
            return self.late(self.early(x))

    model = Swapped()
    calls = record_denoiser_calls(model, lambda m: m(torch.randn(2, 4)))
    float_weights = {}
    for name in ("late", "early"):
        layer = QuantLinear.from_float(model.get_submodule(name), WeightQuantConfig())
        float_weights[layer] = model.get_submodule(name).weight
        model.set_submodule(name, layer)
    layers = {"late": model.late, "early": model.early}
    with calibrating(float_weights):
        assert execution_order(model, layers, calls[0]) == ["early", "late"]


def test_merged_calls_concatenate_batched_arguments_only():
    from diffquant.ptq.calibration import DenoiserCall, merge_calls

    def call(t, n=4, flag=1.0):
        return DenoiserCall(
            (torch.randn(n, 2),), {"timestep": torch.full((n,), t), "scale": torch.tensor(flag)}
        )

    calls = [call(900.0), call(500.0), call(100.0, flag=2.0), call(50.0, flag=2.0), call(10.0, n=3, flag=2.0)]
    merged = merge_calls(calls, max_batch=8)
    assert [c.args[0].shape[0] for c in merged] == [8, 8, 3]  # a differing scalar starts a new call
    assert merged[0].kwargs["timestep"].tolist() == [900.0] * 4 + [500.0] * 4
    assert torch.equal(merged[1].args[0], torch.cat([calls[2].args[0], calls[3].args[0]]))
    assert merged[1].kwargs["scale"] == 2.0
