"""Bad inputs, round 33 (branch bad33): round 32's leftovers (unit names checked when the config is read, evaluate
read-only on the run folder), then new inputs; see docs/bad_inputs.md, round 33.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import yaml

from bad_inputs_common import refused_exactly, tiny_model, water_npz
from test_bad_inputs_md import snapshot
from test_bad_inputs_round9 import TINY


def _config(folder, **data):
    water_npz(folder)
    config = folder / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"path": "e.npz", "train_size": 12, "val_size": 4, **data},
                                      "model": dict(TINY), "trainer": {"max_epochs": 1}}))
    return config


# ------------------------------------------------------------------------------ unit names as the config is read
@pytest.mark.parametrize("argv, line", [
    (["train", "c.yaml", "--set", "data.energy_unit=foo"],
     "error: config key 'data.energy_unit': unknown energy unit 'foo'; known: eh, ev, ha, hartree, kcal/mol, kj/mol, "
     "mev, ry, rydberg"),
    (["train", "c.yaml", "--set", "data.length_unit=parsec"],
     "error: config key 'data.length_unit': unknown length unit 'parsec'; known: a, a0, ang, angstrom, bohr, nm, å"),
    (["train", "c.yaml", "--set", "data.energy_unit=MeV"],
     "error: config key 'data.energy_unit': energy unit 'MeV' is ambiguous: milli-electronvolt is 'meV' "
     "(mega-electronvolts are not a unit of molecular data)"),
    (["data", "prepare", "e.npz", "--energy-unit", "foo"],
     "error: --energy-unit: unknown energy unit 'foo'; known: eh, ev, ha, hartree, kcal/mol, kj/mol, mev, ry, "
     "rydberg"),
    (["data", "prepare", "c.yaml", "--length-unit", "foo"],
     "error: --length-unit: unknown length unit 'foo'; known: a, a0, ang, angstrom, bohr, nm, å"),
])
def test_unit_names_checked_before_anything_is_made(tmp_path, capsys, monkeypatch, argv, line):
    """Were refused when the data file was read ("e.npz: unknown energy unit 'foo'"), after an empty data/cache
    folder had been made in the working folder (round 32's leftover)."""
    monkeypatch.chdir(tmp_path)
    _config(tmp_path)
    refused_exactly(capsys, argv, line, tmp_path)
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------------------ evaluate --run is read-only
def _stamps(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_evaluate_does_not_write_into_the_run_folder(tmp_path, capsys, monkeypatch):
    """``evaluate --run RUN`` rewrote ``RUN/data_state.json`` when it set up the data, also when it then refused."""
    from torchmdx.cli.main import main
    from torchmdx.data.splits import Split, save_split

    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    water_npz(work)
    tiny_model().save(work / "m.pt")
    run = tmp_path / "run"
    run.mkdir()
    save_split(Split(np.arange(12), np.array([], int), np.arange(12, 20), 20), run / "splits.npz")
    (run / "data_state.json").write_text('{"key": "an earlier one"}')
    past = 1_000_000_000_000_000_000
    for path in run.iterdir():
        os.utime(path, ns=(past, past))
    before = _stamps(run)
    cache = tmp_path / "cache"
    argv = ["evaluate", work / "m.pt", "--data", work / "e.npz", "--run", run, "--allow-other-run", "--cache-dir",
            cache, "--no-progress"]
    assert main([str(a) for a in argv + ["--split", "test", "--out", tmp_path / "o"]]) == 0
    assert _stamps(run) == before
    capsys.readouterr()
    refused_exactly(capsys, argv + ["--split", "val", "--out", tmp_path / "o2"],
                    f"error: {work}/e.npz: the val split is empty: the run's {run}/splits.npz splits its 20 structures "
                    "into train 12, val 0, test 8; choose --split test, train or all", run)
    assert _stamps(run) == before
