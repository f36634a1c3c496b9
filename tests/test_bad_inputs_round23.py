"""Bad inputs, round 23 (branch bad23): round 22's leftovers (``export`` of a model file, unit-like info keys other
than ``energy_unit``/``length_unit``), then ``trainer.max_epochs: null``, a run folder's leftover split, ``label -o``
in a new folder, atoms at one position in md and label, and ``sweep --devices`` with GPUs that are not there; see
docs/bad_inputs.md, round 23.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.io import write

from torchmdx.cli.main import main
from bad_inputs_common import (  # the helpers rounds 17-23 share
    lj_file as _lj,
    refused_exactly as _exact,
    water as _water,
)
from test_bad_inputs_md import snapshot


# ---------------------------------------------------------------------------------- export of a model file
def test_export_of_a_model_file_says_it_is_one(tmp_path, capsys, monkeypatch):
    """``export model.pt -o m2.pt`` said "not a torchmdx training checkpoint (no model hyper-parameters and
    weights)": a model file holds both; it is usable as it is."""
    monkeypatch.chdir(tmp_path)
    _lj(tmp_path)
    _exact(capsys, ["export", "lj.pt", "-o", "m2.pt"],
           "error: lj.pt: is a torchmdx model file already (lennard_jones), not a training checkpoint; use it as it is "
           "(torchmdx md --model, torchmdx evaluate, Calculator(\"lj.pt\")), or copy it; export writes a model file "
           "from a checkpoint (e.g. RUN_DIR/checkpoints/best.ckpt)", tmp_path)
    assert main(["export", "--openmm", "lj.pt", "-o", "om.pt"]) == 0  # an OpenMM export takes a model file, as before


# ---------------------------------------------------------------------------------- unit-like info keys
def _water_frames(tmp_path, entry: str):
    """w.extxyz: two water frames with energies and forces, ``entry`` on the first comment line."""
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for k in range(2):
        atoms = _water()
        atoms.positions[1, 0] += 0.01 * k
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0 - k, forces=np.full((3, 3), 0.1))
        frames.append(atoms)
    write(tmp_path / "w.extxyz", frames)
    lines = (tmp_path / "w.extxyz").read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace("energy=", f"{entry} energy=", 1)
    (tmp_path / "w.extxyz").write_text("".join(lines))
    return tmp_path / "w.extxyz"


ORDINARY = "is an ordinary key to ASE and torchmdx (no reader takes units from it), and"
BOTH = "config key 'data.energy_unit' (--energy-unit) and config key 'data.length_unit' (--length-unit)"


@pytest.mark.parametrize("entry, line", [
    ("energy_units=Hartree", f"energy_units=Hartree {ORDINARY} the values are read in eV; set config key "
     "'data.energy_unit' (--energy-unit) to Hartree if that is their unit (the key is then checked against it), or "
     "convert the values and drop the key"),
    ("Length-Unit=Bohr", f"Length-Unit=Bohr {ORDINARY} the values are read in Å; set config key 'data.length_unit' "
     "(--length-unit) to Bohr if that is their unit (the key is then checked against it), or convert the values and "
     "drop the key"),
    ("force_unit=Hartree/Bohr", f"force_unit=Hartree/Bohr {ORDINARY} the forces are read in eV/Å; set {BOTH} to the "
     "file's units if Hartree/Bohr is what they are (the key is then checked against them), or convert the values "
     "and drop the key"),
    ("units=kcal/mol", f"units=kcal/mol {ORDINARY} the values are read in eV and Å; set {BOTH} to the file's units if "
     "kcal/mol is what they are (the key is then checked against them), or convert the values and drop the key"),
    ("stress_unit=GPa", f"stress_unit=GPa {ORDINARY} a stress is read in eV/Å³; set {BOTH} to the file's units if GPa "
     "is what they are (the key is then checked against them), or convert the values and drop the key"),
])
def test_unit_like_info_keys_are_checked_as_energy_unit_is(tmp_path, capsys, monkeypatch, entry, line):
    """``units=``, ``energy_units=``, ``force_unit=`` ... were ordinary keys: the values read in eV and Å without a
    word (round 22 checked ``energy_unit``/``length_unit`` only)."""
    monkeypatch.chdir(tmp_path)
    _water_frames(tmp_path, entry)
    _exact(capsys, ["data", "info", "w.extxyz"], f"error: w.extxyz: frame 0: {line}", tmp_path)


def test_unit_like_info_keys_that_the_options_confirm_are_read():
    from torchmdx.data.unit_keys import check_unit_keys, unit_key_quantity

    assert [unit_key_quantity(k) for k in ("energy_units", "E_UNIT", "forces-unit", "positions_unit", "units",
                                           "charge_unit", "community", "unit_cell")] == \
        ["energy", "energy", "forces", "length", "any", None, None, None]
    for entry in ({"force_unit": "Hartree/Bohr"}, {"units": "Ha, a0"}, {"stress_units": "hartree/bohr^3"},
                  {"energy_units": "Eh", "length_unit": "Bohr"}, {"charge_unit": "e"}):
        check_unit_keys(entry, "w.extxyz: frame 0", "Hartree", "Bohr")  # the options say the same: taken


def test_a_force_unit_the_options_confirm_converts_the_values(tmp_path):
    from torchmdx.data.ase_format import read_ase
    from torchmdx.data.unit_keys import unit_key_quantity

    assert unit_key_quantity("force_unit") == "forces"  # a key that was ordinary before round 23
    structures = read_ase(_water_frames(tmp_path, "force_unit=Hartree/Bohr"), energy_unit="Hartree",
                          length_unit="Bohr")
    assert float(structures.forces[0, 0]) == pytest.approx(0.1 * 27.211386 / 0.529177, rel=1e-5)


# ---------------------------------------------------------------------------------- a structure file as data
def test_data_without_energies_says_what_to_do(tmp_path, capsys, monkeypatch):
    """A structure file (no info keys, no calculator results) given as data ended "...; set energy_key", an option
    that evaluate and train do not have, and no key would help: it holds no energies at all."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "s.xyz", _water())
    _exact(capsys, ["data", "info", "s.xyz"],
           "error: s.xyz: frame 0: no energy 'energy' (info keys: none; calculator results: none); the file holds "
           "structures without energies: label them first (e.g. torchmdx label s.xyz -o labelled.extxyz), or give a "
           "file with reference energies", tmp_path)
    _water_frames(tmp_path, "")
    (tmp_path / "w.extxyz").write_text((tmp_path / "w.extxyz").read_text().replace(" energy=", " E="))
    _exact(capsys, ["data", "info", "w.extxyz"],
           "error: w.extxyz: frame 0: no energy 'energy' (info keys: E; calculator results: forces); set config key "
           "'data.energy_key' (--energy-key) to the key that holds the energies", tmp_path)


# ---------------------------------------------------------------------------------- trainer.max_epochs: null
def _train_config(tmp_path, trainer="{max_epochs: 1}", train_size=12):
    rng = np.random.default_rng(0)
    if not (tmp_path / "e.npz").exists():
        np.savez(tmp_path / "e.npz", R=_water().positions + rng.normal(0, 0.02, (20, 3, 3)), z=np.array([8, 1, 1]),
                 E=rng.normal(0, 1, 20), F=rng.normal(0, 1, (20, 3, 3)))
    (tmp_path / "t.yaml").write_text(f"data: {{path: e.npz, train_size: {train_size}, val_size: 4}}\n"
                                     "model: {embedding_dimension: 8, num_layers: 1, num_heads: 2, num_rbf: 4}\n"
                                     f"trainer: {trainer}\nrun_dir: runs/t\n")
    return tmp_path / "t.yaml"


def test_train_without_an_end_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    """``trainer.max_epochs: null`` was refused when the Trainer was built: after the data were read and the run
    folder's splits.npz, config.resolved.yaml and data_summary.json were written (a later run reused that split)."""
    monkeypatch.chdir(tmp_path)
    _train_config(tmp_path, "{max_epochs: null}")
    line = ("error: config key 'trainer.max_epochs' is null and no trainer.max_steps / max_time is set: the run would "
            "never end")
    _exact(capsys, ["train", "t.yaml"], line, tmp_path)
    _exact(capsys, ["sweep", "t.yaml", "--grid", "data.train_size=8,12", "--out", "sw", "--dry-run"],
           line.replace("error: ", "error: sweep point (data.train_size=8): "), tmp_path)  # was passed by --dry-run
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sw").exists()


# ---------------------------------------------------------------------------------- a run folder's leftover split
def test_a_leftover_split_of_another_config_is_refused(tmp_path, monkeypatch):
    """A run stopped before its first checkpoint leaves splits.npz and config.resolved.yaml; a new run in that
    folder with other split sizes (or seed) trained on the old split, silently. (``check_run_dir``, the first step
    of ``train`` after the config: the CLI's line is this one.)"""
    from torchmdx.errors import ConfigError
    from torchmdx.train.config import load_run_config, resolved_yaml
    from torchmdx.train.run import check_run_dir

    monkeypatch.chdir(tmp_path)
    _train_config(tmp_path)
    folder = tmp_path / "runs" / "t"
    folder.mkdir(parents=True)
    (folder / "config.resolved.yaml").write_text(resolved_yaml(load_run_config(tmp_path / "t.yaml")))
    np.savez(folder / "splits.npz", train=np.arange(12), val=np.arange(12, 16), test=np.arange(16, 20))
    before = snapshot(tmp_path)
    assert check_run_dir(load_run_config("t.yaml"), resume=False) == folder.relative_to(tmp_path)  # the same: reused
    _train_config(tmp_path, train_size=8)
    with pytest.raises(ConfigError) as info:
        check_run_dir(load_run_config("t.yaml"), resume=False)
    assert str(info.value) == ("runs/t/splits.npz: left by an earlier run in runs/t that wrote no checkpoint, with "
                               "config key 'data.train_size' 12 (this config: 8); this run would train on that split, "
                               "not the one its config draws: delete the file (or the folder), or give another "
                               "--run-dir")
    assert snapshot(tmp_path) == {**before, "t.yaml": snapshot(tmp_path)["t.yaml"]}


# ---------------------------------------------------------------------------------- label -o in a new folder
def test_label_into_a_folder_that_does_not_exist_yet(tmp_path, capsys, monkeypatch):
    """``label s.xyz -o new/sub/x.extxyz`` was open()'s FileNotFoundError traceback; the folder is made (as md's
    outputs' folders are), and removed again when nothing was labelled."""
    from torchmdx.md.label import LabelError, LabelOptions, label

    monkeypatch.chdir(tmp_path)
    _lj(tmp_path)
    write(tmp_path / "w.xyz", _water())
    assert main(["label", "w.xyz", "--method", "model:lj.pt", "-o", "new/sub/x.extxyz", "--no-progress"]) == 0
    assert "label_method=model:lj.pt" in (tmp_path / "new" / "sub" / "x.extxyz").read_text()

    def fails(atoms):
        raise RuntimeError("SCF did not converge")

    with pytest.raises(LabelError, match="no frame was labelled, nothing written$"):
        label(["w.xyz"], "other/x.extxyz", LabelOptions(method="model:lj.pt"), labeler=fails, progress=False)
    assert not (tmp_path / "other").exists()


# ---------------------------------------------------------------------------------- empty names
@pytest.mark.parametrize("argv, line", [
    (["md", "ar.xyz", "--model", "lj.pt", "--restart", ""],  # started a new run instead of continuing, silently
     "--restart must name the restart file to continue from, or be left out for a new run, got ''"),
    (["md", "ar.xyz", "--model", "lj.pt", "--summary", ""],  # the default, silently
     "--summary must name a file, or be left out for the default next to md.out, got ''"),
    (["md", "ar.xyz", "--model", "lj.pt", "--out", ""],  # "--out : no file extension to tell the trajectory format"
     "--out must name the trajectory file (e.g. md.extxyz), or be left out for md.extxyz, got ''"),
    (["label", "ar.xyz", "--method", "model:lj.pt", "-o", ""],  # "-o .: the labelled frames are written as ..."
     "-o is empty; give the file for the labelled frames, e.g. labelled.extxyz"),
    (["evaluate", "lj.pt", "--data", "ar.xyz", "--out", ""],  # the default folder, silently
     "--out is empty; give the output folder (or leave --out out for <model folder>/evaluate_<split>)"),
    (["evaluate", "lj.pt", "--data", "ar.xyz", "--run", " "],  # no run, silently
     "--run is empty; give the run folder of torchmdx train (or leave --run out)"),
])
def test_an_empty_file_or_folder_name_is_refused(tmp_path, capsys, monkeypatch, argv, line):
    """An unset shell variable (``--restart $R``) gave an empty name."""
    from bad_inputs_common import argon_file

    monkeypatch.chdir(tmp_path)
    _lj(tmp_path)
    argon_file(tmp_path)
    _exact(capsys, argv, f"error: {line}", tmp_path)


# ---------------------------------------------------------------------------------- atoms at one position
def test_md_refuses_atoms_at_one_position_naming_the_file(tmp_path, capsys, monkeypatch):
    """md warned of a 0 Å contact and then, with an analytic model, stopped at step 1 on non-finite forces after
    writing its outputs; with a network it said "atoms 1 and 2 are on top of each other", naming no file."""
    monkeypatch.chdir(tmp_path)
    _lj(tmp_path)
    write(tmp_path / "same.xyz", Atoms("Ar3", positions=[[0, 0, 0], [3.8, 0, 0], [3.8, 0, 0]]))
    write(tmp_path / "box.extxyz", Atoms("Ar2", positions=[[0, 0, 0], [24, 0, 0]], cell=[24, 24, 24], pbc=True))
    _exact(capsys, ["md", "same.xyz", "--model", "lj.pt", "--steps", "2"],
           "error: same.xyz: atoms 1 and 2 are at the same position [3.8, 0.0, 0.0] Å (a duplicated atom?)", tmp_path)
    _exact(capsys, ["md", "box.extxyz", "--model", "lj.pt", "--steps", "2", "--engine", "ase"],
           "error: box.extxyz: atoms 0 and 1 are at the same position [0.0, 0.0, 0.0] Å (one is a periodic image of "
           "the other) (a duplicated atom?)", tmp_path)


def test_label_refuses_atoms_at_one_position(tmp_path, capsys, monkeypatch):
    """``label --method model:lj.pt`` wrote energy 0 and zero forces for two atoms at one position: a frame the data
    readers then refuse."""
    monkeypatch.chdir(tmp_path)
    _lj(tmp_path)
    write(tmp_path / "same.xyz", Atoms("Ar2", positions=[[0, 0, 0], [0, 0, 0]]))
    write(tmp_path / "ar.xyz", Atoms("Ar2", positions=[[0, 0, 0], [3.8, 0, 0]]))
    _exact(capsys, ["label", "same.xyz", "--method", "model:lj.pt", "-o", "o.extxyz"],
           "error: frame 0 (same.xyz:0): model:lj.pt cannot label it (atoms 0 and 1 are at the same position "
           "[0.0, 0.0, 0.0] Å (a duplicated atom?)); remove such frames, or pass --skip-failed to leave them out",
           tmp_path)
    assert main(["label", "same.xyz", "ar.xyz", "--method", "model:lj.pt", "-o", "o.extxyz", "--skip-failed",
                 "--no-progress"]) == 0
    assert "1 of 2 frames labelled" in capsys.readouterr().out  # left out and counted


# ---------------------------------------------------------------------------------- sweep --devices
def test_sweep_devices_that_are_not_visible_are_refused_before_the_plan(tmp_path, capsys, monkeypatch):
    """``--devices 0,1`` without GPUs printed "GPU 0: <point>" and trained on the CPU; ``--devices 2`` was refused
    after sweep.json and the split files were written."""
    from torchmdx.train import sweep as sweep_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep_module, "gpu_count", lambda: 0)
    _train_config(tmp_path)
    argv = ["sweep", "t.yaml", "--grid", "data.train_size=8,12", "--out", "sw", "--devices"]
    _exact(capsys, argv + ["0,1"], "error: --devices 0,1: GPU 0 is not among the 0 GPU(s) visible; leave --devices out "
           "to train on the CPU", tmp_path)
    _exact(capsys, argv + ["2"], "error: --devices 2: only 0 GPU(s) visible", tmp_path)
    monkeypatch.setattr(sweep_module, "gpu_count", lambda: 2)
    _exact(capsys, argv + ["1,2"], "error: --devices 1,2: GPU 2 is not among the 2 GPU(s) visible (ids 0 to 1)",
           tmp_path)
    assert not (tmp_path / "sw").exists()


def test_sweep_workers_keep_to_the_gpus_this_process_was_given(monkeypatch):
    """Under CUDA_VISIBLE_DEVICES=2,3 (a SLURM job's GPUs) a worker on GPU 0 got CUDA_VISIBLE_DEVICES=0: the
    machine's GPU 0, outside the allocation."""
    from torchmdx.train.sweep import worker_visible_devices

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert [worker_visible_devices(g) for g in ("0", "1")] == ["2", "3"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert worker_visible_devices("1") == "1"

