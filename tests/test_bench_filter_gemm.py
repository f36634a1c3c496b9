"""bench/bench_filter_gemm.py on the CPU: the Triton interpreter runs one tile of each filter
product and the error column is measured against float64 (times are not, on the CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_smoke_run_reports_float32_errors_for_each_variant(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "filter_gemm.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_filter_gemm.py"), "--device", "cpu",
                           "--edges", "70", "--json", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    variants = {(r["kernel"], r["variant"].split()[0]) for r in rows}
    assert variants == {(k, v) for k in ("preact", "rbf_grad") for v in ("triton", "precision", "cublas")}
    for row in rows:  # float32 products of [70, 32] x [32, 512] and back: float32 rounding only
        assert row["edges"] == 70 and 0 <= row["rel_error"] < 1e-5, row
    assert [p.name for p in tmp_path.iterdir()] == ["filter_gemm.json"]  # no temporary file left
    assert "| 70 | preact |" in done.stdout and "| 70 | rbf_grad |" in done.stdout
