"""Bad inputs, round 34 (branch bad34): round 33's leftovers (an empty cache folder in Python, max_z, label's -o under
a file, copies of one-atom structures, per-frame values in some frames only), then new inputs (a sweep point that
fails, a dataset file given as a structure); see docs/bad_inputs.md, round 34.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import yaml
from ase import Atoms
from ase.io import write

from bad_inputs_common import lj_file, refused, refused_exactly, water_npz
from test_bad_inputs_md import snapshot
from test_bad_inputs_round9 import TINY


def _config(folder, model=None):
    water_npz(folder)
    config = folder / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"path": "e.npz", "train_size": 12, "val_size": 4, "batch_size": 4},
                                      "model": dict(TINY, **(model or {})), "trainer": {"max_epochs": 1},
                                      "run_dir": "run"}))
    return config


# ------------------------------------------------------------------------------ round 33's leftovers
def test_build_cache_with_an_empty_folder_writes_nothing(tmp_path, monkeypatch):
    """``build_cache(source, cache_dir='')`` wrote the cache into the working folder ('' read as '.')."""
    from torchmdx.data.cache import build_cache, find_cache
    from torchmdx.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    water_npz(tmp_path)
    before = snapshot(tmp_path)
    for call in (build_cache, find_cache):
        with pytest.raises(ConfigError) as info:
            call("e.npz", cache_dir="")
        assert str(info.value) == (f"{call.__name__}: cache_dir is empty (''); give a folder, or leave it out for "
                                   "data/cache")
    assert snapshot(tmp_path) == before


def test_data_module_max_z_is_a_whole_number(tmp_path):
    """``TorchmdxDataModule(config, max_z=1.5)`` was read as 1 (its lines then said "max_z=1")."""
    from torchmdx.data import TorchmdxDataModule
    from torchmdx.errors import ConfigError

    config = {"path": str(water_npz(tmp_path)), "cache_dir": str(tmp_path / "cache")}
    for bad in (1.5, True, "100", 1):
        with pytest.raises(ConfigError) as info:
            TorchmdxDataModule(config, max_z=bad)
        assert str(info.value) == ("TorchmdxDataModule: max_z must be a whole number >= 2 (it counts embedding rows: "
                                   f"atomic numbers 0..max_z-1 are accepted), got {bad!r}")
    assert TorchmdxDataModule(config, max_z=np.int64(10)).max_z == 10


def test_model_max_z_above_the_elements_is_refused_before_anything_is_made(tmp_path, capsys, monkeypatch):
    """``model.max_z: 1000`` trained with 881 unused embedding rows; 10**12 was "ran out of memory" after the cache
    and the run folder had been made."""
    monkeypatch.chdir(tmp_path)
    _config(tmp_path)
    for value in (1000, 10**12):
        refused_exactly(capsys, ["train", "c.yaml", "--set", f"model.max_z={value}"],
                        f"error: config key 'model.max_z' is {value}, above 119: it counts embedding rows (atomic "
                        "numbers 0..max_z-1) and elements stop at Z = 118, so the rows above would never be used; "
                        "give at most 119 (as data.max_z)", tmp_path)
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_label_output_under_a_file_names_the_file(tmp_path, capsys, monkeypatch):
    """``label -o afile/l.extxyz`` said "-o afile/l.extxyz: is a file, not a folder" (the file is afile)."""
    monkeypatch.chdir(tmp_path)
    lj_file(tmp_path)
    write(tmp_path / "ar.xyz", Atoms("Ar2", positions=[[0, 0, 0], [3.8, 0, 0]]))
    (tmp_path / "afile").write_text("x")
    refused_exactly(capsys, ["label", "ar.xyz", "-o", "afile/l.extxyz", "--method", "model:lj.pt"],
                    "error: -o afile/l.extxyz: afile is a file, not a folder, so nothing can be written under it; "
                    "give a path in a folder", tmp_path)


def _setup_warnings(path, tmp_path):
    from torchmdx.data import TorchmdxDataModule

    module = TorchmdxDataModule({"path": str(path), "cache_dir": str(tmp_path / "cache"), "train_size": 12,
                                 "val_size": 4})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.setup()
    return [str(w.message) for w in caught if "copy" in str(w.message)]


def test_copies_across_parts_compare_the_cell_and_say_when_energies_differ(tmp_path):
    """One-atom crystal cells of an equation of state (Cu fcc at 3.4..3.8 Å, the atom at the origin) were "exact
    copies" of each other; one-atom molecules with different energies read as repeated frames."""
    from ase.build import bulk

    frames = []
    for k, a in enumerate(np.linspace(3.4, 3.8, 20)):
        atoms = bulk("Cu", "fcc", a=a)
        atoms.info["energy"] = -3.0 + (a - 3.6) ** 2
        atoms.arrays["forces"] = np.zeros((1, 3))
        frames.append(atoms)
    write(tmp_path / "cu.extxyz", frames)
    assert _setup_warnings(tmp_path / "cu.extxyz", tmp_path) == []
    frames = []
    for k in range(20):
        atoms = Atoms("H" if k % 2 else "O", positions=[[0, 0, 0]])
        atoms.info["energy"] = float(k)
        atoms.arrays["forces"] = np.zeros((1, 3))
        frames.append(atoms)
    write(tmp_path / "iso.extxyz", frames)
    (line,) = _setup_warnings(tmp_path / "iso.extxyz", tmp_path)
    assert "have an exact copy of their atoms, positions and cell in the training split" in line
    assert "with other energies" in line and "the model cannot tell such structures apart" in line


def test_per_frame_values_in_some_frames_only_are_named(tmp_path, capsys, monkeypatch):
    """A dipole or a charge array in 4 of 10 frames (or values whose shapes differ) was left out without a word."""
    from torchmdx.cli.main import main

    monkeypatch.chdir(tmp_path)
    frames = []
    for k in range(10):
        atoms = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0.01 * k]])
        atoms.info["energy"] = float(k)
        atoms.arrays["forces"] = np.zeros((3, 3))
        atoms.info["gap"] = np.ones(1 if k < 5 else 2)
        atoms.info["homo"] = -0.5  # in every frame: kept, not named
        if k < 4:
            atoms.info["dipole"] = np.array([1.0, 2, 3])
            atoms.arrays["charges"] = np.zeros(3)
        frames.append(atoms)
    write(tmp_path / "ex.extxyz", frames)
    with warnings.catch_warnings(record=True) as caught:  # main() from Python keeps Python's warnings
        warnings.simplefilter("always")
        assert main(["data", "prepare", "ex.extxyz", "--cache-dir", "cache"]) == 0
    lines = sorted({str(w.message) for w in caught if "left out" in str(w.message)})
    assert lines == ["ex.extxyz: charges (in 4 of 10 frames), dipole (in 4 of 10 frames), gap (shapes "
                     "differ) left out: a per-frame value is kept only when every frame has it with one shape (no "
                     "training target reads these; the energies, forces and stress are read as before)"]


# ------------------------------------------------------------------------------ new inputs
def test_a_failing_sweep_point_does_not_stop_the_others(tmp_path, capsys, monkeypatch):
    """A point that failed (training diverged) stopped the sweep: the points after it never ran, the error line did
    not name the point and results.md read as the whole sweep."""
    from torchmdx.cli.main import main
    from torchmdx.errors import TrainingError
    from torchmdx.train import sweep as sweep_module

    monkeypatch.chdir(tmp_path)
    _config(tmp_path)
    ran = []

    def fake_run_point(sweep_dir, point_id):  # no training: the failure and the result a point would give
        ran.append(point_id)
        if point_id.startswith("lr=1e30"):
            raise TrainingError("training diverged: the validation loss is nan")
        row = {"point": point_id, "variant": "", "labels": {"train.lr": "1e-3"}, "architecture": "et",
               "algebra": None, "parameters": 2777, "train_size": 12, "batch_size": 4, "steps": 3, "epochs": 1,
               "flops_per_structure": 68259.75, "training_flops": 819117.0, "device": "cpu", "device_seconds": 3.0,
               "wall_seconds": 3.0, "concurrent_workers": 1.0, "run_devices": 1, "device_key": "h/cpu",
               "train_start": 0.0, "train_end": 3.0, "test_energy_mae": 57.8, "test_energy_rmse": 62.6,
               "test_forces_mae": 39.4, "test_forces_rmse": 48.3, "test_structures": 4, "augment": "none",
               "resumed": False, "run_dir": str(sweep_dir / "runs" / point_id)}
        (sweep_dir / "runs" / point_id).mkdir(parents=True, exist_ok=True)
        (sweep_dir / "runs" / point_id / sweep_module.RESULT).write_text(json.dumps(row))
        return row

    monkeypatch.setattr(sweep_module, "run_point", fake_run_point)
    capsys.readouterr()
    rc = main(["sweep", "c.yaml", "--grid", "train.lr=1e30,1e-3", "--out", "sw"])
    err = capsys.readouterr().err
    failed, good = ran
    assert rc == 2 and failed.startswith("lr=1e30") and good.startswith("lr=1e-3")
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: 1 of 2 sweep point(s) failed: {failed} (training diverged: the validation loss is nan); the "
        "others' results are in sw/results.csv; run the sweep again to retry them"]
    assert good in (tmp_path / "sw" / "results.csv").read_text()
    assert (f"Not in this table (no result: failed, or not run yet): 1 of the 2 planned points, {failed}; `torchmdx "
            "sweep` again runs them.") in (tmp_path / "sw" / "results.md").read_text()


def test_a_failed_sweep_point_is_marked_in_its_own_folder_until_a_retry_succeeds(tmp_path, capsys, monkeypatch):
    """Round 34 left it: a failed point's run folder did not say so (it only lacked sweep_result.json). Now
    sweep_failure.json holds its error in one line, results.md names the point with it, and a retry that
    succeeds removes the file."""
    from torchmdx.cli.main import main
    from torchmdx.errors import TrainingError
    from torchmdx.train import sweep as sweep_module

    monkeypatch.chdir(tmp_path)
    _config(tmp_path)
    outcome = {"fail": True}

    def fake_train_point(cfg, entry, point_id, run_dir):  # no training: fails, or writes the result a point would
        if outcome["fail"]:
            raise TrainingError("training diverged:\n the validation loss is nan")
        row = {"point": point_id, "variant": "", "labels": {}, "parameters": 10, "train_size": 12, "steps": 3,
               "training_flops": 1.0, "device_seconds": 1.0, "wall_seconds": 1.0, "device_key": "h/cpu",
               "train_start": 0.0, "train_end": 1.0, "test_forces_mae": 39.4, "run_dir": str(run_dir)}
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / sweep_module.RESULT).write_text(json.dumps(row))
        return row

    monkeypatch.setattr(sweep_module, "_train_point", fake_train_point)
    argv = ["sweep", "c.yaml", "--grid", "train.lr=1e-3", "--out", "sw"]
    assert main(argv) == 2
    (point,) = [p.name for p in (tmp_path / "sw" / "runs").iterdir()]
    marker = json.loads((tmp_path / "sw" / "runs" / point / sweep_module.FAILURE).read_text())
    assert marker["point"] == point and marker["type"] == "TrainingError"
    assert marker["error"] == "training diverged: the validation loss is nan"  # one line
    assert (f"1 of the 1 planned points, {point} (failed: training diverged: the validation loss is nan)"
            in (tmp_path / "sw" / "results.md").read_text())
    outcome["fail"] = False
    capsys.readouterr()
    assert main(argv) == 0
    assert not (tmp_path / "sw" / "runs" / point / sweep_module.FAILURE).exists()
    assert (tmp_path / "sw" / "runs" / point / sweep_module.RESULT).is_file()
    assert "Not in this table" not in (tmp_path / "sw" / "results.md").read_text()


@pytest.mark.parametrize("command", ["md", "label", "export"])
def test_a_dataset_file_as_structure_says_what_it_is(tmp_path, capsys, monkeypatch, command):
    """``md e.npz`` said "cannot read a structure with ASE (npz)", ``label`` "(UnknownFileTypeError: npz)", ``export
    --openmm --structure e.npz`` "cannot read e.npz (npz)"; an HDF5 dataset "(h5)"."""
    monkeypatch.chdir(tmp_path)
    water_npz(tmp_path)
    lj_file(tmp_path)
    argv = {"md": ["md", "e.npz", "--model", "lj.pt", "--steps", "2"],
            "label": ["label", "e.npz", "-o", "l.extxyz", "--method", "model:lj.pt"],
            "export": ["export", "lj.pt", "--openmm", "-o", "o.pt", "--structure", "e.npz"]}[command]
    what = ("e.npz: an npz file of arrays (a dataset: torchmdx reads the MD17 layouts with --format md17 or rmd17 in "
            "data, train and evaluate), not a structure file ASE reads; give a structure file (xyz, extxyz, pdb, "
            "traj, ...)")
    refused_exactly(capsys, argv, "error: " + ("--structure: " if command == "export" else "") + what, tmp_path)
    if command == "md":
        import h5py

        with h5py.File(tmp_path / "a.h5", "w") as h5:
            h5["x"] = np.zeros(3)
        refused(capsys, ["md", "a.h5", "--model", "lj.pt", "--steps", "2"],
                ["a.h5: an HDF5 file (a dataset: torchmdx reads the ANI-1 and ANI-1x layouts with --format ani1 or "
                 "ani1x), not a structure file ASE reads"], tmp_path)
