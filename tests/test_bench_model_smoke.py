"""bench/bench_model.py (split over bench/model_*.py and bench/gpu_timing.py) still runs end to end:
a reference row of a 3-atom molecule on the CPU, its JSON and table. Timings are not asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reference_row_on_the_cpu(tmp_path):
    from ase.build import molecule
    from ase.io import write

    write(tmp_path / "water.xyz", molecule("H2O"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_model.py"), "--data", str(tmp_path),
                           "--systems", "water", "--backends", "torch", "--no-train", "--device", "cpu",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| water | 3 |" in done.stdout
    payload = json.loads((tmp_path / "out" / "bench_model.json").read_text())
    rows = payload["systems"] if "systems" in payload else payload.get("rows", payload)
    text = json.dumps(rows)
    assert '"atoms": 3' in text and '"ref_ms"' in text
