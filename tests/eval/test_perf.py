import pytest
import torch

from diffquant.eval.perf import measure_step_latency, model_size_bytes, peak_rss_bytes, track_peak_memory


class _Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.calls = 0
        self.grad_enabled = []

    def forward(self, x, scale=1.0):
        self.calls += 1
        self.grad_enabled.append(torch.is_grad_enabled())
        return self.lin(x) * scale


def test_latency_counts_warmup_and_repeats_under_inference_mode():
    model = _Counting()
    ms = measure_step_latency(model, (torch.randn(2, 4),), warmup=2, repeats=5)
    assert ms > 0
    assert model.calls == 7
    assert not any(model.grad_enabled)
    measure_step_latency(model, {"x": torch.randn(2, 4), "scale": 2.0}, warmup=0, repeats=1)
    assert model.calls == 8


def test_latency_rejects_bad_arguments():
    with pytest.raises(ValueError, match="repeats"):
        measure_step_latency(_Counting(), (torch.randn(2, 4),), repeats=0)
    with pytest.raises(TypeError, match="tuple"):
        measure_step_latency(_Counting(), [torch.randn(2, 4)])


def test_model_size_counts_parameters_and_buffers_as_stored():
    lin = torch.nn.Linear(4, 3)
    assert model_size_bytes(lin) == (12 + 3) * 4
    lin.register_buffer("packed", torch.zeros(10, dtype=torch.uint8))
    assert model_size_bytes(lin) == (12 + 3) * 4 + 10
    assert model_size_bytes(lin.half()) == (12 + 3) * 2 + 10


def test_peak_memory_sees_a_temporary_allocation():
    assert peak_rss_bytes() > 0
    size = 64 << 20
    with track_peak_memory("cpu") as mem:
        buf = torch.ones(size // 4)  # written, so resident
        del buf
    assert mem.device == "cpu" and mem.source in {"VmHWM", "ru_maxrss"}
    if mem.source == "VmHWM":  # ru_maxrss cannot see a peak below an earlier one
        assert mem.peak_bytes >= 0.9 * size
    with track_peak_memory("cpu") as idle:
        pass
    assert idle.peak_bytes < size // 2
