"""Bad inputs, round 27 (branch bad27): round 26's leftovers (a checkpoint copied out of its run folder exported a
model file of no run; ``Potential.save`` dropped the run a loaded model file recorded; ``model(z, pos, cell=...)``
without ``pbc`` computed an open structure without a word), then the newest paths; see docs/bad_inputs.md,
round 27.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch

import torchmdx
from torchmdx.cli.main import main
from bad_inputs_common import refused, refused_exactly  # the helpers rounds 17-26 share
from test_bad_inputs_round23 import _train_config


# ---------------------------------------------------------------------------------- a run's record
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny one-epoch run (water, 12 training structures): its folder."""
    base = tmp_path_factory.mktemp("r27run")
    config = _train_config(base, "{max_epochs: 1, enable_progress_bar: false, num_sanity_val_steps: 0}")
    text = config.read_text().replace("path: e.npz", f"path: {base / 'e.npz'}, cache_dir: {base / 'cache'}")
    config.write_text(text.replace("run_dir: runs/t", f"run_dir: {base / 'runs' / 't'}"))
    assert main(["train", str(config)]) == 0
    return base / "runs" / "t"


def test_a_checkpoint_copied_out_of_its_run_still_records_it(run, tmp_path, capsys):
    """``export`` of a checkpoint copied out of ``RUN/checkpoints/`` wrote a model file of no run (round 26's
    leftover): ``evaluate --run`` could not check it. The checkpoint now holds its run's record."""
    from torchmdx.nn.model_file import read_training_record

    copied = tmp_path / "best.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", copied)
    capsys.readouterr()
    assert main(["export", str(copied), "-o", str(tmp_path / "m.pt")]) == 0
    assert capsys.readouterr().err == ""
    record = read_training_record(tmp_path / "m.pt")
    assert record is not None and record == read_training_record(run / "model.pt")
    # a checkpoint of this run copied into another run's checkpoints folder names its own run, not the folder's
    other = tmp_path / "other" / "checkpoints"
    other.mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "last.ckpt", other / "last.ckpt")
    shutil.copy(run / "splits.npz", tmp_path / "other" / "splits.npz")
    from torchmdx.train.provenance import checkpoint_run_record

    assert checkpoint_run_record(other / "last.ckpt")["run_dir"] == str(run)


def test_an_old_checkpoint_outside_its_run_warns_at_export(run, tmp_path, capsys):
    """A checkpoint that records no run (written before round 27) outside its run folder: export says so in one
    warning line, and evaluate's warning says why a model records no run."""
    payload = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del payload["torchmdx"]["training"]
    torch.save(payload, tmp_path / "old.ckpt")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "old.ckpt"), "-o", str(tmp_path / "m.pt")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {tmp_path / 'old.ckpt'} records no training run and lies "
                                               "outside a run folder")
    assert "evaluate --run cannot check" in err[0]
    from torchmdx.train.provenance import check_model_run

    line = check_model_run(tmp_path / "m.pt", None, run)
    assert "exported from a checkpoint that records no run and lay outside its run folder" in line
    assert "export it again from its run's checkpoints folder" in line


def test_load_model_then_save_keeps_the_run(run, tmp_path):
    """``Potential.save`` of a model loaded from a run's model.pt dropped its record (round 26's leftover)."""
    from torchmdx.nn.model_file import read_training_record

    model = torchmdx.load_model(run / "model.pt")
    model.save(tmp_path / "again.pt")
    assert read_training_record(tmp_path / "again.pt") == read_training_record(run / "model.pt")
    model.training_record = None  # a model trained further: the documented way to drop it
    model.save(tmp_path / "none.pt")
    assert read_training_record(tmp_path / "none.pt") is None


# ---------------------------------------------------------------------------------- model(z, pos, cell=...)
def test_a_cell_without_pbc_warns_once_per_model():
    """``model(z, pos, cell=...)`` without pbc computed the box as open, without a word: two argon atoms that meet
    only across the boundary, 0 eV (161 eV with pbc=True)."""
    from torchmdx.nn.analytic import LennardJones

    model = LennardJones(0.01, 2.0, cutoff=5.0)
    z, pos, cell = torch.tensor([18, 18]), torch.tensor([[0.0, 0, 0], [11.0, 0, 0]]), torch.eye(3) * 12
    with pytest.warns(UserWarning) as caught:
        open_energy = model(z, pos, cell=cell)["energy"]
    assert len(caught) == 1
    assert str(caught[0].message).startswith("model(z, pos, cell=...) got a cell but no pbc, so the structures are "
                                             "computed as open")
    assert "pbc=True" in str(caught[0].message) and caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model; pbc given or no cell: no warning
        again = model(z, pos, cell=cell)["energy"].detach()
        assert float(again) == float(open_energy.detach()) == 0.0
        assert float(model(z, pos, cell=cell, pbc=torch.tensor([True, True, True]))["energy"].detach()) > 100
        LennardJones(0.01, 2.0, cutoff=5.0)(z, pos, cell=cell, pbc=torch.tensor([False, False, False]))
        LennardJones(0.01, 2.0, cutoff=5.0)(z, pos)


# ---------------------------------------------------------------------------------- compressed files misnamed
def _water_frames(folder, name="w.extxyz"):
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    rng = np.random.default_rng(0)
    frames = []
    for i in range(4):
        atoms = Atoms("OH2", positions=np.array([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]) + rng.normal(0, 0.02, (3, 3)))
        atoms.calc = SinglePointCalculator(atoms, energy=-10 + 0.1 * i, forces=rng.normal(0, 1, (3, 3)))
        frames.append(atoms)
    write(folder / name, frames)
    return folder / name


@pytest.mark.parametrize("name, packer, line", [
    # was "ASE cannot read it (UnicodeDecodeError: 'utf-8' codec can't decode byte 0x8b in position 1: ...)"
    ("gz.extxyz", "gzip", "{path}: is gzip-compressed, but its name does not end in .gz, and ASE picks the "
                          "decompressor by the name (it read the compressed bytes as text): rename it gz.extxyz.gz, "
                          "or decompress it (gunzip -c gz.extxyz > gz-decompressed.extxyz)"),  # round 33: one that runs
    # was "cannot guess the format; pass --format (one of md17, ...)"
    ("plain.extxyz.gz", None, "{path}: is named .gz but is not gzip-compressed (plain text?), and ASE picks the "
                              "decompressor by the name: rename it plain.extxyz (without .gz), or compress it with gzip"),
    ("b.extxyz.gz", "bz2", "{path}: is named .gz but is bzip2-compressed, not gzip, and ASE picks the decompressor "
                           "by the name: rename it b.extxyz.bz2"),
])
def test_a_compressed_file_whose_name_says_otherwise(tmp_path, capsys, name, packer, line):
    import bz2
    import gzip

    text = _water_frames(tmp_path).read_bytes()
    (tmp_path / "w.extxyz").unlink()
    path = tmp_path / name
    path.write_bytes({"gzip": gzip.compress, "bz2": bz2.compress, None: lambda b: b}[packer](text))
    model = tmp_path / "lj.pt"
    from torchmdx.nn.analytic import LennardJones

    LennardJones(0.0104, 3.4).save(model)
    expected = "error: " + line.format(path=path)
    refused_exactly(capsys, ["data", "info", path], expected, tmp_path)
    refused_exactly(capsys, ["md", path, "--model", model, "--steps", "2", "--out", tmp_path / "o.extxyz"], expected,
                    tmp_path)


# ---------------------------------------------------------------------------------- evaluate --split all
def test_evaluating_every_structure_of_the_training_data_warns(run, tmp_path, capsys, monkeypatch):
    """``evaluate runs/t/model.pt --data e.npz`` (no --run: every structure) scored the model on its own training
    structures too, errors too good without a word."""
    monkeypatch.chdir(tmp_path)  # caches (data/cache under the working folder) stay out of the checkout
    data = run.parent.parent / "e.npz"
    capsys.readouterr()
    argv = ["evaluate", run / "model.pt", "--data", data, "--out", tmp_path / "r", "--no-progress"]
    assert main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: model.pt was trained on e.npz (run {run}): --split all scores the structures it was "
                   "trained on too (12 training and 4 validation structures), so the errors come out too good; give "
                   f"--run {run} to score its test split only (or --split all to score every structure without this "
                   "warning)"]
    assert main([str(a) for a in argv + ["--split", "all"]]) == 0  # asked for: nothing to say
    assert capsys.readouterr().err == ""
    # with --run, a data file's default split is the run's test split (was every structure, training ones too)
    assert main([str(a) for a in argv + ["--run", run]]) == 0
    assert capsys.readouterr().err == ""
    import json

    assert json.loads((tmp_path / "r" / "errors.json").read_text())["split"] == "test"
    np.savez(tmp_path / "other.npz", **dict(np.load(data)), extra=np.zeros(1))  # other data: nothing to say
    assert main(["evaluate", str(run / "model.pt"), "--data", str(tmp_path / "other.npz"), "--out",
                 str(tmp_path / "r2"), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_allow_other_run_without_a_run_is_refused(tmp_path, capsys):
    """``evaluate --allow-other-run`` without a run's split was ignored without a word."""
    from torchmdx.nn.analytic import LennardJones

    data = _water_frames(tmp_path)
    LennardJones(0.0104, 3.4).save(tmp_path / "lj.pt")
    refused_exactly(capsys, ["evaluate", tmp_path / "lj.pt", "--data", data, "--allow-other-run", "--out",
                             tmp_path / "r"],
                    "error: --allow-other-run applies to a model scored on a run's split (--run RUN_DIR, or a "
                    f"config's run_dir), and --split all scores every structure of {data}, of no run's split: drop "
                    "--allow-other-run", tmp_path)


# ---------------------------------------------------------------------------------- an empty structure in a file
@pytest.mark.parametrize("name, where", [("e.db", "row 4"), ("e.extxyz", "frame 3")])
def test_an_empty_structure_is_named_where_it_is(tmp_path, capsys, name, where):
    """An ASE database row without atoms (written with energy only, beside rows with forces) was "row 4: no forces
    key 'forces', although other frames have one"; energy-only rows: "structure 3 has no atoms" (row 4)."""
    import ase.db
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import read, write

    frames = read(_water_frames(tmp_path, "w.extxyz"), ":")[:3]
    (tmp_path / "w.extxyz").unlink()
    empty = Atoms()
    empty.calc = SinglePointCalculator(empty, energy=0.0)
    if name.endswith(".db"):
        db = ase.db.connect(tmp_path / name)
        for atoms in frames + [empty]:
            db.write(atoms)
    else:
        for atoms in frames:  # energy only: the forces check does not come first
            atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy())
        write(tmp_path / name, frames + [empty])
    refused_exactly(capsys, ["data", "info", tmp_path / name],
                    f"error: {tmp_path / name}: {where}: has no atoms (an empty structure); drop it from the file",
                    tmp_path)


# ---------------------------------------------------------------------------------- md options of the native engine
@pytest.mark.parametrize("options, line", [
    (["--fuse-integrator", "true"], "error: --fuse-integrator true needs the native engine (--engine ase steps with "
                                    "ASE's integrators, which are not fused); leave it out or drop --engine ase"),
    (["--compile", "whole"], "error: --compile 'whole' needs the native engine (--engine ase runs the model "
                             "uncompiled); leave it out or drop --engine ase"),
])
def test_native_engine_options_with_the_ase_engine(tmp_path, capsys, options, line):
    """``md --engine ase --fuse-integrator true`` / ``--compile whole`` ran ASE's integrators on the eager model
    without a word (``--atom-order hilbert`` with it was refused since round 13)."""
    from bad_inputs_common import argon_file, lj_file

    argv = ["md", argon_file(tmp_path), "--model", lj_file(tmp_path), "--engine", "ase", "--steps", "2",
            "--out", tmp_path / "o.extxyz", *options]
    refused_exactly(capsys, argv, line, tmp_path)


# ---------------------------------------------------------------------------------- an element outside training
def test_an_element_only_in_the_validation_or_test_split_is_said(tmp_path, capsys, monkeypatch):
    """A split by group that puts every structure of an element into validation or test (the polymer file's PVC,
    its only Cl) trained a model that never saw the element, without a word; data info's note said "energies are
    unaffected". Now one warning line in train, and data info's note says it."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    rng = np.random.default_rng(0)
    frames = []
    for i, (formula, group) in enumerate([("OH2", "a")] * 8 + [("OH2", "b")] * 8 + [("OHF", "c")] * 4):
        atoms = Atoms(formula, positions=np.array([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]) +
                      rng.normal(0, 0.02, (3, 3)))
        atoms.calc = SinglePointCalculator(atoms, energy=-10 + 0.1 * i, forces=rng.normal(0, 1, (3, 3)))
        atoms.info["family"] = group
        frames.append(atoms)
    write(tmp_path / "g.extxyz", frames)
    (tmp_path / "g.yaml").write_text(
        "data: {path: g.extxyz, group_key: family, split_by_group: true, val_groups: [b], test_groups: [c], "
        "batch_size: 4}\nmodel: {embedding_dimension: 8, num_layers: 1, num_heads: 2, num_rbf: 4}\n"
        "trainer: {max_epochs: 1, enable_progress_bar: false, num_sanity_val_steps: 0}\nrun_dir: runs/g\n")
    monkeypatch.chdir(tmp_path)
    line = ("element F (Z=9) of g.extxyz occurs in no training structure (only in structures of the validation or "
            "test split, or unused ones): the model cannot learn it (no reference energy, an untrained embedding), "
            "and the errors of those structures measure nothing it was trained on; put such structures into the "
            "training split (data.val_groups / data.test_groups, or another split seed)")
    capsys.readouterr()
    assert main(["data", "info", "g.yaml"]) == 0
    assert f"note         {line}" in capsys.readouterr().out.splitlines()
    assert main(["train", "g.yaml"]) == 0
    assert f"warning: {line}" in capsys.readouterr().err.splitlines()


def test_openmm_export_of_a_file_of_several_structures(tmp_path, capsys):
    """``export --openmm --structure`` of a file whose structures differ (a dataset given as the structure) built
    the module for the last one's atoms (ASE's read) without a word."""
    from ase.build import molecule
    from ase.io import read, write
    from bad_inputs_common import lj_file

    frames = read(_water_frames(tmp_path), ":")
    (tmp_path / "w.extxyz").unlink()
    write(tmp_path / "mix.xyz", [molecule("CH3CH2OH")] + frames)
    refused_exactly(capsys, ["export", "--openmm", lj_file(tmp_path), "-o", tmp_path / "om.pt", "--structure",
                             tmp_path / "mix.xyz"],
                    f"error: --structure: {tmp_path / 'mix.xyz'} holds structures of different atoms (the first C2H6O, "
                    "the last H2O), and the module's ML atoms come from one structure (ASE reads the last); give a "
                    "file of the one structure OpenMM simulates", tmp_path)


def test_md_with_the_ase_engine_says_a_charge_once(tmp_path, capsys):
    """``md --engine ase`` of a charged structure printed md's warning and then the Calculator's own ("warning:
    Calculator: atoms.info['charge'] is 1, ..."): two lines for one thing."""
    from ase.cluster import Icosahedron
    from ase.io import write
    from bad_inputs_common import lj_file

    atoms = Icosahedron("Ar", 2)
    atoms.info["charge"] = 1
    write(tmp_path / "q.extxyz", atoms)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:  # the CLI prints a Python warning as a warning: line
        warnings.simplefilter("always")
        assert main([str(a) for a in ["md", tmp_path / "q.extxyz", "--model", lj_file(tmp_path), "--engine", "ase",
                                      "--steps", "2", "--out", tmp_path / "o.extxyz", "--no-progress"]]) == 0
    assert [str(w.message) for w in caught if "charge" in str(w.message)] == []
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")] == [
        f"warning: {tmp_path / 'q.extxyz'}: atoms.info['charge'] is 1, but the model takes no charge: the run treats "
        "the structure as if it were neutral"]


def test_the_calculator_warns_of_atoms_far_closer_than_bonds():
    """Positions in nm given to the Calculator (two argon atoms 0.38 Å apart) gave 1.1e10 eV from Lennard-Jones
    without a word; md said so at its start (close_contacts), the Calculator did not."""
    from ase import Atoms
    from torchmdx.nn.analytic import LennardJones

    model = LennardJones(0.0104, 3.4)
    atoms = Atoms("Ar2", positions=[[0, 0, 0], [0.38, 0, 0]])
    atoms.calc = torchmdx.Calculator(model)
    with pytest.warns(UserWarning) as caught:
        atoms.get_potential_energy()
    assert [str(w.message) for w in caught] == [
        "Calculator: atoms 0 and 1 (Ar-Ar) are 0.38 Å apart, closer than 1.06 Å (half the sum of their covalent "
        "radii): no model was trained on that; check the structure (positions in Å? nm or Bohr read as Å give such "
        "distances)"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per calculator; an MD step (positions only) is not looked at
        atoms.positions[1, 0] = 0.37
        atoms.get_potential_energy()
        fine = Atoms("Ar2", positions=[[0, 0, 0], [3.8, 0, 0]])
        fine.calc = torchmdx.Calculator(model)
        fine.get_potential_energy()


def test_md_of_a_compressed_database(tmp_path, capsys):
    """``md w.db.gz``: "cannot read a structure with ASE (Unknown database type: gz)"; data info named it."""
    import gzip

    import ase.db
    from ase.io import read
    from bad_inputs_common import lj_file

    db = ase.db.connect(tmp_path / "w.db")
    for atoms in read(_water_frames(tmp_path), ":"):
        db.write(atoms)
    (tmp_path / "w.db.gz").write_bytes(gzip.compress((tmp_path / "w.db").read_bytes()))
    for name in ("w.db", "w.extxyz"):
        (tmp_path / name).unlink()
    path = tmp_path / "w.db.gz"
    refused_exactly(capsys, ["md", path, "--model", lj_file(tmp_path), "--steps", "2", "--out", tmp_path / "o.extxyz"],
                    f"error: {path}: is a gzip-compressed .db file, which is read uncompressed only; decompress it "
                    "first (gunzip w.db.gz)", tmp_path)


def test_an_energy_given_as_the_forces_key(tmp_path, capsys):
    """``data info w.extxyz --forces-key energy``: "forces have shape () but coordinates (1, 3, 3)"."""
    path = _water_frames(tmp_path)
    refused_exactly(capsys, ["data", "info", path, "--forces-key", "energy"],
                    f"error: {path}: frame 0: forces 'energy' hold one number per structure, expected a 3-vector per "
                    "atom (3, 3): is 'energy' the forces key?", tmp_path)
