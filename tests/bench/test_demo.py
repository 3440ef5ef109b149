import json
import math

import pytest
import torch

from diffquant.bench.demo import _check_rows, row_groups, run_demo
from diffquant.bench.report import summary_text
from diffquant.bench.rows import DEMO_ROWS, DemoRow
from diffquant.bench.settings import DemoSettings

REQUIRED = {
    "name", "weights", "activations", "method", "fd", "fd_ratio", "class_accuracy", "psnr_vs_fp",
    "bits_per_weight", "size_bytes", "step_latency_ms", "fd_ci", "fd_ratio_ci", "class_accuracy_ci",
    "psnr_vs_fp_ci", "seconds",
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


def test_rows_group_with_their_transfer_rows():
    groups = row_groups(DEMO_ROWS)
    assert sorted(row.name for group in groups for row in group) == sorted(row.name for row in DEMO_ROWS)
    for group in groups:
        assert group[0].transfer_of is None and all(row.transfer_of == group[0].name for row in group[1:])
    assert len(next(g for g in groups if g[0].name == "w4a4-qronos-logsnr")) == 2


def test_bad_worker_count_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="workers"):
        run_demo(tmp_path, workers=0)


def test_rows_do_not_depend_on_the_worker_that_ran_them(tmp_path):
    """Two worker processes and one in-process runner give the same samples, hence the same scores."""
    rows = tuple(row for row in DEMO_ROWS if row.name in ("fp32", "w8a8"))
    settings = DemoSettings(quick=True, num_samples=30, num_steps=3, latency_batch=2, latency_rounds=1,
                            bootstrap_resamples=20)  # fmt: skip
    run = {}
    for workers in (1, 2):
        out = tmp_path / str(workers)
        run[workers] = run_demo(
            out, rows=rows, settings=settings, cache_dir=tmp_path, workers=workers, progress=False
        )
    assert run[2]["workers"] == 2 and run[1]["workers"] == 1
    for one, two in zip(run[1]["rows"], run[2]["rows"], strict=True):
        for key in ("fd", "fd_ci", "fd_ratio", "class_accuracy", "psnr_vs_fp", "bits_per_weight"):
            assert one[key] == two[key], (one["name"], key)


@pytest.mark.slow
def test_quick_demo_from_scratch(tmp_path):
    """Every row through the real code from an empty cache: the packaged float model (no training),
    a freshly trained classifier, parallel row workers, intervals, report."""
    out = tmp_path / "out"
    results = run_demo(out, quick=True, cache_dir=tmp_path / "cache", progress=False)
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["benchmark"] == "digits" and results["quick"] and results["sampler"] == "ddim-10"
    assert [p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()] == ["classifier"]
    assert 0 < results["noise_floor_fd"] < 100
    assert results["machine"]["isa"] == torch.backends.cpu.get_cpu_capability()
    assert {"float_model", "classifier", "rows", "score"} <= set(results["stage_seconds"])
    rows = {row["name"]: row for row in results["rows"]}
    assert list(rows) == [row.name for row in DEMO_ROWS]
    for row in rows.values():
        assert set(row) >= REQUIRED, row["name"]
        assert math.isfinite(row["fd"]) and row["fd"] > 0
        assert 0 <= row["class_accuracy"] <= 1
        assert (out / row["grid"]).is_file()
        for key in ("fd", "fd_ratio", "class_accuracy"):
            low, high = row[f"{key}_ci"]
            assert low <= row[key] <= high, (row["name"], key)
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
    assert "Reading the table" in report and "paired-bootstrap" in report
    assert len(summary_text(results).splitlines()) <= len(DEMO_ROWS) + 5  # one screen
