import json
import math

import pytest
import torch

from diffquant.bench.demo import _check_rows, run_demo
from diffquant.bench.rows import DEMO_ROWS, DemoRow

REQUIRED = {
    "name", "weights", "activations", "method", "fd", "fd_ratio", "class_accuracy", "psnr_vs_fp",
    "bits_per_weight", "size_bytes", "step_latency_ms",
}  # fmt: skip


def test_row_list_is_checked():
    fp, q = DEMO_ROWS[0], DEMO_ROWS[1]
    with pytest.raises(ValueError, match="first demo row must be the float model"):
        _check_rows((q, fp))
    with pytest.raises(ValueError, match="not an earlier row"):
        _check_rows((fp, DemoRow("t", "transfer", sampler="dpm", num_steps=20, transfer_of="later")))
    with pytest.raises(ValueError, match="no earlier float row"):
        _check_rows((fp, DemoRow("q-dpm", "quantized under DPM", q.config, sampler="dpm", num_steps=20)))
    with pytest.raises(ValueError, match="sampler must be one of"):
        DemoRow("x", "unknown sampler", sampler="euler")
    _check_rows(DEMO_ROWS)


@pytest.fixture
def two_threads():
    """The end-to-end run is the longest test; the other test worker is done with its share early."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.slow
def test_quick_demo_from_scratch(tmp_path, two_threads):
    out = tmp_path / "out"
    results = run_demo(out, quick=True, cache_dir=tmp_path / "cache", progress=False)
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["benchmark"] == "digits" and results["quick"] and results["sampler"] == "ddim-50"
    assert 0 < results["noise_floor_fd"] < 100
    rows = {row["name"]: row for row in results["rows"]}
    assert list(rows) == [row.name for row in DEMO_ROWS]
    for row in rows.values():
        assert set(row) >= REQUIRED, row["name"]
        assert math.isfinite(row["fd"]) and row["fd"] > 0
        assert 0 <= row["class_accuracy"] <= 1
        assert (out / row["grid"]).is_file()
    fp = rows["fp32"]
    assert fp["fd_ratio"] == 1.0 and fp["psnr_vs_fp"] is None and fp["bits_per_weight"] == 32
    assert fp["class_accuracy"] >= 0.9
    assert rows["w8a8"]["fd_ratio"] <= 1.25
    assert rows["w8a8"]["psnr_vs_fp"] > rows["w4a8-rtn"]["psnr_vs_fp"] > 10
    assert 8 < rows["w8a8"]["bits_per_weight"] < 9.5
    for name in ("w4a8-rtn", "w4a16-rtn-g64", "nf4", "w4a8-gptq", "w4a8-qronos"):
        assert 4 < rows[name]["bits_per_weight"] < 5.5, name
        assert rows[name]["size_bytes"] < fp["size_bytes"] / 4, name
    assert rows["w4a4-qronos-logsnr-dpm20"]["transfer_of"] == "w4a4-qronos-logsnr"
    finetuned = ("w4a4-efficientdm", "w4a8-efficientdm", "w8-tuneqdm", "w4-tuneqdm", "nf4-qlisa", "w4a8-qat")
    for name in finetuned:  # a short fine-tune must leave a working quantized model
        assert rows[name]["finetune"] is not None and rows[name]["class_accuracy"] >= 0.8, name
        low, high = (8, 9.5) if name == "w8-tuneqdm" else (4, 5.5)
        assert low < rows[name]["bits_per_weight"] < high, name
    report = (out / "report.md").read_text()
    assert "| w4a8-qronos |" in report and (out / "fd_vs_bits.png").is_file()
