"""Smoke test of ``benchmarks/latency.py --quick`` (tiny PixArt, three rows, two DDIM steps)."""

import importlib.util
import json
from pathlib import Path

import torch

from diffquant.kernels import cpu_isa

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "latency.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("latency_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_every_column(tmp_path):
    threads = torch.get_num_threads()
    try:
        code = _load_script().main(
            ["--quick", "--models", "pixart", "--rows", "fp32", "w8a8-static", "nf4", "--out", str(tmp_path)]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    result = json.loads((tmp_path / "latency.json").read_text())
    assert result["machine"]["isa"] == cpu_isa().name
    rows = {r["row"]: r for r in result["models"][0]["rows"]}
    assert list(rows) == ["fp32", "w8a8-static", "nf4"]
    assert rows["fp32"]["ratio"] == 1.0
    static = rows["w8a8-static"]
    assert static["step_ms"] > 0 and static["reference_ratio"] > 0
    assert static["psnr_db"] > 20 and abs(static["psnr_db"] - static["psnr_reference_db"]) < 0.5
    assert static["checkpoint_bytes"] < rows["fp32"]["checkpoint_bytes"]
    assert sum(static["kernel_paths"].values()) > 0
    assert "| pixart" in (tmp_path / "latency.md").read_text()
