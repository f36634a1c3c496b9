"""Bad inputs, round 38 (branch bad38): round 37's leftovers, round 35's OpenMM one, then new inputs; see
docs/bad_inputs.md, round 38."""

from __future__ import annotations

import numpy as np
import pytest
from ase.io import write
from bad_inputs_common import argon_file, lj_file, refused, refused_exactly, tiny_model, water
from test_bad_inputs_round9 import TINY


def _waters(folder, name="w.extxyz"):
    """``folder/name``: six waters with ``energy_dft`` (info) and ``forces_dft`` (per atom), no other keys."""
    frames = []
    for k in range(6):
        atoms = water()
        atoms.positions[2, 1] += 0.01 * k
        atoms.info["energy_dft"] = -1.0 * k
        atoms.arrays["forces_dft"] = np.zeros((3, 3))
        frames.append(atoms)
    write(folder / name, frames)
    return folder / name


def test_md_config_with_an_empty_model_says_the_key_is_empty(tmp_path, capsys, monkeypatch):
    """``model: ""`` (or blank, or null) in an md config, or ``--model ''``: "no model given (--model model.pt, or
    'model:' in the md config)", as if the key were missing (round 37's leftover)."""
    monkeypatch.chdir(tmp_path)
    argon_file(tmp_path)
    (tmp_path / "m.yaml").write_text('model: ""\nstructure: ar.xyz\nsteps: 2\n')
    (tmp_path / "n.yaml").write_text("md:\n  model:\n  structure: ar.xyz\n")
    advice = "give the model file (Potential.save / torchmdx export), e.g. --model model.pt"
    refused_exactly(capsys, ["md", "--config", "m.yaml"],
                    f"error: config key 'md.model' in m.yaml is empty (''): {advice}", tmp_path)
    refused_exactly(capsys, ["md", "--config", "n.yaml"],
                    f"error: config key 'md.model' in n.yaml is empty (null): {advice}", tmp_path)
    refused_exactly(capsys, ["md", "ar.xyz", "--model", " "], f"error: --model is empty (' '): {advice}", tmp_path)
    # no model at all keeps its line
    refused_exactly(capsys, ["md", "ar.xyz"],
                    "error: no model given (--model model.pt, or 'model:' in the md config)", tmp_path)


def test_a_data_key_with_a_stray_space_names_the_key_it_meant(tmp_path, capsys, monkeypatch, shared_data):
    """``evaluate --energy-key ' energy_dft'`` (``--forces-key 'forces_dft '``, ``data.energy_key: ' energy_dft'`` in a
    train config, an ANI-1x key): the line listed the file's keys without pointing at the space."""
    monkeypatch.chdir(tmp_path)
    _waters(tmp_path)
    tiny_model().save(tmp_path / "et.pt")
    refused(capsys, ["evaluate", "et.pt", "--data", "w.extxyz", "--energy-key", " energy_dft"],
            ["w.extxyz: frame 0: no energy ' energy_dft' (did you mean 'energy_dft'?)"], tmp_path)
    refused_exactly(capsys, ["evaluate", "et.pt", "--data", "w.extxyz", "--energy-key", "energy_dft", "--forces-key",
                             "forces_dft "],
                    "error: w.extxyz: forces key 'forces_dft ' not found in any frame (did you mean 'forces_dft'?)",
                    tmp_path)
    (tmp_path / "t.yaml").write_text(
        "data: {path: w.extxyz, energy_key: ' energy_dft', forces_key: forces_dft, train_size: 4, val_size: 1}\n"
        f"model: {dict(TINY)}\ntrainer: {{max_epochs: 1, accelerator: cpu}}\nrun_dir: runs/t\n")
    refused(capsys, ["train", "t.yaml"], ["no energy ' energy_dft' (did you mean 'energy_dft'?)"], tmp_path)
    ani = shared_data / "ani" / "ani1x_xtb.h5"
    refused(capsys, ["data", "info", ani, "--energy-key", "gfn2xtb.energy", "--forces-key", "gfn2xtb.forces "],
            ["no 'gfn2xtb.forces ' dataset (did you mean 'gfn2xtb.forces'?); found: "], tmp_path)
    # nothing close: no hint
    line = refused(capsys, ["evaluate", "et.pt", "--data", "w.extxyz", "--energy-key", "U0"], ["no energy 'U0'"],
                   tmp_path)
    assert "did you mean" not in line


def test_a_blank_line_between_xyz_frames_is_refused(tmp_path, capsys, monkeypatch):
    """A blank line between two frames: ASE's frame scan stops there, so `data info` counted 1 structure of 2, `md`
    ran frame 0 as the last and `--index 1` said the file "holds no structure", without a word about the blank."""
    monkeypatch.chdir(tmp_path)
    lj_file(tmp_path)
    frame = "3\nenergy=1\nAr 0 0 0\nAr 3.8 0 0\nAr 0 3.8 0\n"
    (tmp_path / "b.xyz").write_text(frame + "\n" + frame.replace("Ar 0 3.8 0", "Ar 0 3.9 0"))
    (tmp_path / "ok.xyz").write_text(frame + "\n\n  \n")  # blank lines at the end: read as before
    line = ("b.xyz: line 6 is blank where frame 1's atom count belongs, and the file goes on (line 7, '3'): ASE stops "
            "reading at a blank line, so only the 1 frame(s) before it would be read and the rest dropped without a "
            "word; remove the blank line(s)")
    refused_exactly(capsys, ["data", "info", "b.xyz"], "error: " + line, tmp_path)
    refused_exactly(capsys, ["md", "b.xyz", "--model", "lj.pt", "--steps", "2"], "error: " + line, tmp_path)
    refused_exactly(capsys, ["md", "b.xyz", "--model", "lj.pt", "--steps", "2", "--index", "1"], "error: " + line,
                    tmp_path)
    refused_exactly(capsys, ["export", "--openmm", "lj.pt", "-o", "om.pt", "--structure", "b.xyz"],
                    "error: --structure: " + line, tmp_path)
    from torchmdx.data.ase_format import read_ase

    assert len(read_ase(tmp_path / "ok.xyz")) == 1


def test_openmm_module_refuses_a_molecule_far_from_the_origin(tmp_path):
    """The OpenMM TorchScript module (a TorchForce, or ``fastPath=False``) of a water moved 1e15 Å out: -30.3 kJ/mol
    for the -15.3 of the same water at the origin, without a word (round 35's leftover; the fast path names it)."""
    import torch

    from torchmdx.openmm.export import build_module, with_atoms
    from torchmdx.openmm.forces import module_error_line

    module = with_atoms(build_module(tiny_model()), [8, 1, 1])
    pos = torch.tensor(water().positions / 10, dtype=torch.float64)  # nm
    at_origin = float(module(pos).detach())
    assert float(module(pos + 1e8).detach()) == pytest.approx(at_origin, abs=1e-3)  # 1e9 Å: still evaluates
    for shift, where, spacing in ((1e14, "1e+15", "0.125"), (-1e29, "-1e+30", "1.40737e+14")):
        with pytest.raises(torch.jit.Error) as info:
            module(pos + shift)
        assert module_error_line(info.value) == (
            f"particle 0 (an ML atom) is at [{where}, {where}, {where}] Å, beyond 1e+10 Å from the origin: float64 "
            f"coordinates that large are {spacing} Å apart, so the distances between atoms come out wrong; give "
            "coordinates near the origin (move the structure there)")
    lone = pos.clone()
    lone[2] = 1e14  # one atom far from the others: an isolated atom, evaluated as before
    assert np.isfinite(float(module(lone).detach()))


def test_an_ani_group_written_in_part_is_refused(tmp_path, capsys, monkeypatch, shared_data):
    """An ANI-1x group holding atomic_numbers but no coordinates (or an ANI-1 group without species): the group was
    left out without a word (560 structures of 600)."""
    import shutil

    import h5py

    monkeypatch.chdir(tmp_path)
    shutil.copy(shared_data / "ani" / "ani1x_xtb.h5", tmp_path / "a.h5")
    with h5py.File(tmp_path / "a.h5", "r+") as h5:
        del h5["C2H4"]["coordinates"]
    shutil.copy(shared_data / "ani" / "ani1_xtb.h5", tmp_path / "b.h5")
    with h5py.File(tmp_path / "b.h5", "r+") as h5:
        del h5["gdb_s01"]["gdb_s01-11"]["species"]
    refused_exactly(capsys, ["data", "info", "a.h5"],
                    "error: a.h5:/C2H4: holds 'atomic_numbers' but no 'coordinates' dataset, while 14 other group(s) "
                    "hold both (a group written in part?): the group would be left out without a word; give it its "
                    "'coordinates', or remove it", tmp_path)
    refused(capsys, ["data", "info", "b.h5"],
            ["b.h5:/gdb_s01/gdb_s01-11: holds 'coordinates' but no 'species' dataset"], tmp_path)


def test_a_refused_read_leaves_no_cache_folder(tmp_path, capsys, monkeypatch):
    """``data prepare`` / ``train`` / ``evaluate`` of a file refused while it is read (``--energy-key nope``) left an
    empty ``data/cache`` folder behind (the cache build made it before reading); a folder that was there stays."""
    monkeypatch.chdir(tmp_path)
    _waters(tmp_path)
    tiny_model().save(tmp_path / "et.pt")
    refused(capsys, ["data", "prepare", "w.extxyz", "--energy-key", "nope"], ["no energy 'nope'"], tmp_path)
    refused(capsys, ["evaluate", "et.pt", "--data", "w.extxyz", "--energy-key", "nope"], ["no energy 'nope'"],
            tmp_path)
    assert not (tmp_path / "data").exists()
    (tmp_path / "data").mkdir()
    refused(capsys, ["data", "prepare", "w.extxyz", "--energy-key", "nope"], ["no energy 'nope'"], tmp_path)
    assert (tmp_path / "data").is_dir() and not (tmp_path / "data" / "cache").exists()


def test_key_hint_matches_case_and_blanks_only_when_close():
    from torchmdx.config import key_hint

    assert key_hint(" energy", ["forces", "energy"]) == " (did you mean 'energy'?)"
    assert key_hint("Energy", ["energy"]) == " (did you mean 'energy'?)"
    assert key_hint("U0", ["energy_U0", "gap"]) == ""
    assert key_hint("x", []) == ""
