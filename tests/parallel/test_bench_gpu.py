"""bench/gpu.py, the GPU-readiness benchmark, runs end to end on a CPU at its tiny size."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_bench_tiny_on_cpu(tmp_path, capsys):
    bench = _gpu_bench()
    rows = bench.main(["--tiny", "--device", "cpu", "--json", str(tmp_path / "gpu.json")])
    assert len(rows) == 1
    row = rows[0]
    assert row["size"] == "debug" and row["compile"] is False and row["tokens"] == 3 * 4 * 4  # 9x64x64 -> 3x8x8 latents, 1x2x2 patches
    for key in ("step_s", "tokens_per_s", "tflops", "mfu_measured_peak", "peak_mem_gb", "planned_mem_gb"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["mfu_datasheet"] is None  # no datasheet peak for a CPU
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["rows"][0]["size"] == "debug"
    assert "MFU" in capsys.readouterr().out


def test_datasheet_peaks_by_name():
    bench = _gpu_bench()
    assert bench.datasheet_tflops("NVIDIA H200") == 989.0
    assert bench.datasheet_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.datasheet_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.datasheet_tflops("Some GPU") is None
