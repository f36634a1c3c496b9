"""Helpers shared by the bad-input rounds 17-19 (``tests/test_bad_inputs_round1*.py``): small inputs and
the check that a command was refused in one line without touching its folder."""

from __future__ import annotations

import signal
from contextlib import contextmanager

import numpy as np
from ase import Atoms
from ase.cluster import Icosahedron
from ase.io import write

import torchmdx
from torchmdx.cli.main import main
from test_bad_inputs_md import one_error_line, snapshot
from test_bad_inputs_round9 import TINY


def lj_file(folder):
    """A Lennard-Jones argon model file ``folder/lj.pt``."""
    from torchmdx.nn.analytic import LennardJones

    LennardJones(0.0104, 3.4).save(folder / "lj.pt")
    return folder / "lj.pt"


def argon_file(folder, name="ar.xyz", far=None):
    """A 13-atom argon icosahedron written to ``folder/name``; ``far``: atom 3's y coordinate (Å)."""
    atoms = Icosahedron("Ar", 2)
    if far is not None:
        atoms.positions[3, 1] = far
    write(folder / name, atoms)
    return folder / name


def tiny_model():
    """A tiny ET (round 9's config) normalised for H, C, O."""
    model = torchmdx.build_model(TINY)
    model.set_normalisation(elements=[1, 6, 8])
    return model


def water():
    return Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])


def water_npz(folder, frames=20):
    """``folder/e.npz``: ``frames`` rattled waters (MD17 keys) with random energies and forces (seeded)."""
    rng = np.random.default_rng(0)
    positions = np.array([[0.0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    np.savez(folder / "e.npz", R=positions + rng.normal(0, 0.02, (frames, 3, 3)), z=np.array([8, 1, 1]),
             E=rng.normal(0, 1, frames), F=rng.normal(0, 1, (frames, 3, 3)))
    return folder / "e.npz"


def refused(capsys, argv, fragments, folder):
    """``argv`` exits 2 with one ``error:`` line holding ``fragments``, no traceback, ``folder`` unchanged."""
    before = snapshot(folder)
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    line = one_error_line(rc, captured, fragments)
    assert snapshot(folder) == before
    return line


def refused_exactly(capsys, argv, line, folder):
    """``argv`` is refused with exactly ``line`` (and no traceback, ``folder`` unchanged)."""
    got = refused(capsys, argv, [line], folder)
    assert got == line
    return got


@contextmanager
def at_most(seconds):
    """Fail (instead of hanging the test run) when the block takes longer than ``seconds`` (SIGALRM)."""
    def stop(*_):
        raise TimeoutError(f"did not end within {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def train_yaml(tmp_path, monkeypatch):
    """``tmp_path/w/t.yaml``: one CPU epoch of the TINY model on :func:`water_npz` (12 / 4 structures, batches of 4,
    the cache in ``tmp_path/cache``, run_dir runs/t), with ``tmp_path/w`` the working folder; returns that folder."""
    work = tmp_path / "w"
    work.mkdir()
    monkeypatch.chdir(work)
    water_npz(work)
    (work / "t.yaml").write_text(
        f"data: {{path: e.npz, train_size: 12, val_size: 4, batch_size: 4, cache_dir: {tmp_path / 'cache'}}}\n"
        f"model: {dict(TINY)}\n"
        "trainer: {max_epochs: 1, accelerator: cpu, enable_progress_bar: false, num_sanity_val_steps: 0}\n"
        "run_dir: runs/t\n")
    return work


def sweep_config(folder):
    """``folder/s.yaml``: the TINY model on :func:`water_npz`'s waters (12 / 4 structures), for sweep plans."""
    import yaml

    water_npz(folder)
    config = folder / "s.yaml"
    config.write_text(yaml.safe_dump({"data": {"path": "e.npz", "train_size": 12, "val_size": 4},
                                      "model": dict(TINY)}))
    return config
