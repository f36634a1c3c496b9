"""SIGTERM (``kill``, a job scheduler's time limit) on the commands Lightning does not handle: the
Ctrl-C path (every ``finally`` runs, temporary files are removed, the command says so in one
line) with exit status 143, instead of Python's default of ending at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ase.build import bulk
from ase.io import write

from torchmdx.cli.main import sigterm_as_interrupt
from torchmdx.io_utils import atomic_write

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def default_sigterm():
    """SIGTERM's default action for the test (another test in this process may have left its own
    handler: bench_openmm's main() sets one), the process's handler back afterwards."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_inside_an_atomic_write_leaves_neither_file(tmp_path, default_sigterm):
    target = tmp_path / "out.bin"
    with pytest.raises(KeyboardInterrupt):
        with sigterm_as_interrupt():
            with atomic_write(target) as handle:
                handle.write(b"half")
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises before this ends
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored


def test_a_handler_the_caller_installed_is_left_alone(default_sigterm):
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *a: seen.append("mine"))
    try:
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        assert seen == ["mine"]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_md_stopped_by_sigterm_says_so_and_leaves_no_temporary_file(tmp_path):
    from torchmdx.nn.analytic import LennardJones

    LennardJones(0.0104, 3.4, cutoff=5.0).save(tmp_path / "lj.pt")
    write(tmp_path / "ar.extxyz", bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 2, 2))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torchmdx.cli", "md", "ar.extxyz", "--model", "lj.pt", "--steps",
                             "100000000", "--every", "10", "--restart-every", "50", "--no-progress", "--out",
                             "o.extxyz"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "o.extxyz").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # well inside the run
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted (SIGTERM)"
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert (tmp_path / "o.extxyz").stat().st_size > 0
