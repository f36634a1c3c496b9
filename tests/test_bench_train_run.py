"""bench/bench_train_run.py: the variant list is checked before any run starts."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_train_run.py"


@pytest.mark.parametrize("variants, bad", [("graph:40,nope", "'nope'"), ("graph:4x", "'graph:4x'")])
def test_bad_variant_is_one_line_before_any_run(tmp_path, variants, bad):
    done = subprocess.run([sys.executable, str(SCRIPT), "--variants", variants, "--workloads", "md17",
                           "--data", str(tmp_path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"--variants: {bad} is not NAME or NAME:SECONDS")
    assert "graph-fused" in lines[0] and done.stdout == ""
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written
