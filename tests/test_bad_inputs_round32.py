"""Bad inputs, round 32 (branch bad32): round 31's leftovers (sweep points whose units differ only in spelling, a
file kind given as --format) and the md / evaluate options at their edges; see docs/bad_inputs.md, round 32.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from bad_inputs_common import refused_exactly, sweep_config as _sweep_config, tiny_model, water_npz as _water_npz


# ------------------------------------------------------------------------------ sweep units spelled two ways
@pytest.mark.parametrize("grid, line", [
    ("data.energy_unit=eV,ev",
     "error: the sweep points (data.energy_unit=eV) and (data.energy_unit=ev) are the same training (the config reads "
     "data.energy_unit 'eV' and 'ev' alike); list each value once"),
    ("data.energy_unit=Hartree,Ha",
     "error: the sweep points (data.energy_unit=Hartree) and (data.energy_unit=Ha) are the same training (the config "
     "reads data.energy_unit 'Hartree' and 'Ha' alike); list each value once"),
    ("data.length_unit=Bohr,a0",
     "error: the sweep points (data.length_unit=Bohr) and (data.length_unit=a0) are the same training (the config "
     "reads data.length_unit 'Bohr' and 'a0' alike); list each value once"),
    ("data.energy_unit=eV,foo",  # passed --dry-run; the sweep stopped at 'foo' after 'eV' had trained
     "error: sweep point (data.energy_unit=foo): config key 'data.energy_unit': unknown energy unit 'foo'; known: eh, "
     "ev, ha, hartree, kcal/mol, kj/mol, mev, ry, rydberg"),  # round 33: names the key (checked as the config is read)
])
def test_sweep_units_compare_as_the_unit_table_reads_them(tmp_path, capsys, monkeypatch, grid, line):
    """``--grid data.energy_unit=eV,ev`` planned two points of the same training (units compared as written)."""
    monkeypatch.chdir(tmp_path)
    config = _sweep_config(tmp_path)
    refused_exactly(capsys, ["sweep", config, "--dry-run", "--out", tmp_path / "out", "--grid", grid], line, tmp_path)


def test_sweep_units_that_differ_still_plan(tmp_path, capsys, monkeypatch):
    from torchmdx.cli.main import main

    monkeypatch.chdir(tmp_path)
    config = _sweep_config(tmp_path)
    assert main(["sweep", str(config), "--dry-run", "--out", str(tmp_path / "out"), "--grid",
                 "data.energy_unit=eV,meV,kcal/mol"]) == 0
    assert "3 points" in capsys.readouterr().out


# ------------------------------------------------------------------------------ a file kind as --format
def test_file_kind_as_format_names_the_format(tmp_path, capsys, monkeypatch):
    """``--format npz`` listed the known formats and did not say that md17 reads an npz file."""
    from torchmdx.data import read_structures
    from torchmdx.errors import DataError

    monkeypatch.chdir(tmp_path)
    config = _sweep_config(tmp_path)
    tiny_model().save(tmp_path / "m.pt")
    known = "md17, rmd17, md17-xyz, qm9, ani1, ani1x, ase, cache"
    refused_exactly(capsys, ["evaluate", "m.pt", "--data", "e.npz", "--format", "npz"],
                    f"error: --format must be one of {known}, got 'npz'; an npz file is read by the md17 format, or "
                    "rmd17 for revised-MD17 files", tmp_path)
    refused_exactly(capsys, ["train", config, "--set", "data.format=h5"],
                    f"error: config key 'data.format' must be one of {known}, got 'h5'; an HDF5 file is read by the "
                    "ani1 or ani1x format, or cache for a torchmdx cache", tmp_path)
    with pytest.raises(DataError) as info:
        read_structures(tmp_path / "e.npz", format="xyz")
    assert str(info.value) == (f"unknown format 'xyz'; known formats: {known}; an xyz file is read by the ase format "
                               "(extxyz), or md17-xyz for MD17's plain xyz, qm9 for QM9's")
    refused_exactly(capsys, ["evaluate", "m.pt", "--data", "e.npz", "--format", "xyz9"],  # no file kind: as before
                    f"error: --format must be one of {known}, got 'xyz9'", tmp_path)


# ------------------------------------------------------------------------------ md --index with a slice step of 0
def test_md_index_slice_step_zero_names_the_option(tmp_path, capsys, monkeypatch):
    """``md --index ::0`` blamed the file: "ar.xyz: cannot read a structure with ASE (slice step cannot be zero)"."""
    from bad_inputs_common import argon_file, lj_file

    monkeypatch.chdir(tmp_path)
    lj_file(tmp_path)
    argon_file(tmp_path)
    refused_exactly(capsys, ["md", "ar.xyz", "--model", "lj.pt", "--steps", "2", "--out", "t.extxyz", "--index",
                             "::0"],
                    "error: --index '::0' has a slice step of 0; the step is >= 1 ('::2' every second frame) or "
                    "negative ('::-1' backwards)", tmp_path)


# ------------------------------------------------------------------------------ evaluate --split of an empty split
def test_evaluate_empty_split_says_why(tmp_path, capsys, monkeypatch):
    """``evaluate --split test`` of a config whose test split is empty (fractions adding up to 1, test_size 0, a run
    split without test structures) said "e.npz: the test split is empty", not why nor what to choose."""
    from torchmdx.data.splits import Split, save_split

    monkeypatch.chdir(tmp_path)
    _water_npz(tmp_path)
    tiny_model().save(tmp_path / "m.pt")
    cache = tmp_path.parent / f"{tmp_path.name}_cache"  # the cache is written before the split is looked at
    (tmp_path / "f.yaml").write_text(yaml.safe_dump({"data": {"path": "e.npz", "train_size": 0.8, "val_size": 0.2,
                                                              "cache_dir": str(cache)}}))
    refused_exactly(capsys, ["evaluate", "m.pt", "--data", "f.yaml", "--split", "test", "--out", "o"],
                    "error: e.npz: the test split is empty: f.yaml (data.train_size 0.8, val_size 0.2, test_size null "
                    "(the rest)) splits its 20 structures into train 16, val 4, test 0; choose --split val, train or "
                    "all", tmp_path)
    run = tmp_path.parent / f"{tmp_path.name}_run"  # setting up the data writes the run's data_state.json
    run.mkdir()
    save_split(Split(np.arange(16), np.array([], int), np.arange(16, 20), 20), run / "splits.npz")
    refused_exactly(capsys, ["evaluate", "m.pt", "--data", "e.npz", "--run", run, "--split", "val", "--out", "o",
                             "--cache-dir", cache],
                    f"error: e.npz: the val split is empty: the run's {run}/splits.npz splits its 20 structures into "
                    "train 16, val 0, test 4; choose --split test, train or all", tmp_path)
