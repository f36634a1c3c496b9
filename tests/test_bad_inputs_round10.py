"""Bad inputs, round 10: nothing lost, nothing silent.

Round 9's leftovers (md dropping the velocities a structure file carries; an MD17 xyz comment of
two numbers read as its first; a NaN cell called "singular"; a model file edited to scale 0
predicting zero energies) and what the hunt found in export, OpenMM, sweep, label, evaluate and
training (see docs/bad_inputs.md, round 10).

Table rows: a setup ``(tmp_path, shared_data) -> CLI arguments`` and the fragments the one
``error:`` line must hold; every file under ``tmp_path`` must come out unchanged. Tests of
behaviour follow.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.cluster import Icosahedron
from ase.io import read, write

import torchmdx
from test_bad_inputs_more import refused_without_writes
from test_bad_inputs_round7 import _cache
from test_bad_inputs_round9 import TINY


def _argon(t, name="ar.extxyz", momenta=None, **atoms_kw):
    from torchmdx.nn.analytic import LennardJones

    atoms = Icosahedron("Ar", 2)
    for key, value in atoms_kw.items():
        setattr(atoms, key, value)
    if momenta is not None:
        atoms.set_momenta(momenta)
    write(t / name, atoms, format="extxyz")
    if not (t / "lj.pt").exists():
        LennardJones(0.0104, 3.4).save(t / "lj.pt")
    return t / name


def _momenta(seed=0):
    return np.random.default_rng(seed).normal(size=(13, 3)) * 0.5


def _md(t, structure, *options):
    return ["md", *([structure] if not isinstance(structure, list) else structure), "--model", t / "lj.pt",
            "--steps", "2", "--every", "1", "--out", t / "md.extxyz", "--no-progress", "--dtype", "float64", *options]


# ---------------------------------------------------------------------------------- md velocities
def md_nan_velocity_in_the_file(t, s):  # file momenta were ignored; now they are used, so checked
    momenta = _momenta()
    momenta[3, 1] = np.nan
    return _md(t, _argon(t, momenta=momenta))


def md_velocities_file_without_any(t, s):
    return _md(t, _argon(t, "plain.xyz"), "--velocities", "file")


def md_replicas_of_file_velocities(t, s):  # every copy would start alike (auto)
    return _md(t, _argon(t, momenta=_momenta()), "--replicas", "2")


def md_some_structures_with_velocities(t, s):
    return _md(t, [_argon(t, momenta=_momenta()), _argon(t, "plain.extxyz")])


def md_nan_open_row_of_a_slab_cell(t, s):  # the engine wraps with the whole cell: NaN positions
    return _md(t, _argon(t, cell=[[30, 0, 0], [0, 30, 0], [0, 0, np.nan]], pbc=[True, True, False]))


# ---------------------------------------------------------------------------------- data
def md17_xyz_comment_of_two_numbers(t, s):  # the first number was the energy, silently
    text = (s / "md17" / "ethanol_snip.xyz").read_text().splitlines()
    n = int(text[0])
    frame2 = list(text[: n + 2])
    frame2[1] = frame2[1] + " 5"
    (t / "two.xyz").write_text("\n".join(text[: n + 2] + frame2) + "\n")
    return ["data", "info", t / "two.xyz", "--format", "md17-xyz", "--cache-dir", _cache(t)]


CASES = [
    (md_nan_velocity_in_the_file, ["ar.extxyz: atom 3 (Ar) has the non-finite velocity [", "nan",
                                   "fix the momenta in the file, or pass --velocities draw"]),
    (md_velocities_file_without_any, ["plain.xyz: carries no velocities (ASE momenta), and --velocities file needs "
                                      "them in every structure"]),
    (md_replicas_of_file_velocities, ["--replicas 2 copies would all start from the velocities in", "ar.extxyz",
                                      "pass --velocities draw"]),
    (md_some_structures_with_velocities, ["plain.extxyz: carries no velocities (ASE momenta) while", "ar.extxyz",
                                          "does; pass --velocities draw"]),
    (md_nan_open_row_of_a_slab_cell, ["ar.extxyz: the cell holds non-finite values (rows [[30.0, 0.0, 0.0], "
                                      "[0.0, 30.0, 0.0], [0.0, 0.0, nan]] Å), periodic [True, True, False]"]),
    (md17_xyz_comment_of_two_numbers, ["two.xyz: line 13: expected the energy alone (one number, kcal/mol), got 2 "
                                       "fields '-97208.40600498248 5'"]),
]


@pytest.mark.parametrize("setup, fragments", CASES, ids=[c[0].__name__ for c in CASES])
def test_refused_with_one_line_and_nothing_written(tmp_path, shared_data, capsys, monkeypatch, setup, fragments):
    refused_without_writes(tmp_path, shared_data, capsys, monkeypatch, setup, fragments)


# ---------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("engine", ["native", "ase"])
def test_md_starts_from_the_velocities_in_the_structure_file(tmp_path, capsys, engine):
    """A structure file's momenta were dropped (new Maxwell–Boltzmann velocities); both engines
    now start from them, as ASE's MD does, and say so; ``--velocities draw`` draws."""
    from torchmdx.cli.main import main

    momenta = _momenta()
    path = _argon(tmp_path, momenta=momenta)
    capsys.readouterr()
    assert main([str(a) for a in _md(tmp_path, path, "--engine", engine)]) == 0
    err = capsys.readouterr().err
    assert "note: initial velocities from the structure file (their momenta" in err
    np.testing.assert_allclose(read(tmp_path / "md.extxyz", 0).get_momenta(), momenta, atol=1e-12)
    assert main([str(a) for a in _md(tmp_path, path, "--engine", engine, "--velocities", "draw", "--force")]) == 0
    assert "--velocities draw: the velocities in the structure file are not used" in capsys.readouterr().err
    drawn = read(tmp_path / "md.extxyz", 0).get_momenta()
    assert np.abs(drawn - momenta).max() > 0.1 and np.abs(drawn.sum(0)).max() < 1e-6  # MB, zero total momentum


def test_calculator_calls_a_nan_cell_non_finite_not_singular():
    from torchmdx.errors import NeighborListError
    from torchmdx.md.calculator import Calculator
    from torchmdx.nn.analytic import LennardJones

    atoms = Icosahedron("Ar", 2)
    atoms.cell, atoms.pbc = [[30, 0, 0], [0, np.nan, 0], [0, 0, 30]], True
    atoms.calc = Calculator(LennardJones(0.0104, 3.4))
    with pytest.raises(NeighborListError, match=r"^structure 0: the cell holds non-finite values \(rows \[\[30\.0, "
                                                r"0\.0, 0\.0\], \[0\.0, nan, 0\.0\], \[0\.0, 0\.0, 30\.0\]\] Å\)$"):
        atoms.get_potential_energy()


def test_nan_in_the_open_row_of_a_slab_cell_is_ignored_not_zero_energy():
    """A slab's open row may hold anything (kernels.cell_geometry), but 0 * NaN made every pair
    vector NaN: energy 0 and forces 0, silently (Calculator and Potential)."""
    import torch

    from torchmdx.md.calculator import Calculator
    from torchmdx.nn.analytic import LennardJones

    lj = LennardJones(0.0104, 3.4)
    atoms = Icosahedron("Ar", 2)
    atoms.calc = Calculator(lj)
    reference = atoms.get_potential_energy()
    assert reference < -0.4
    slab = Icosahedron("Ar", 2)
    slab.cell, slab.pbc = [[30, 0, 0], [0, 30, 0], [0, 0, np.nan]], [True, True, False]
    slab.calc = Calculator(lj)
    assert slab.get_potential_energy() == pytest.approx(reference, abs=1e-9)
    out = lj(torch.as_tensor(slab.numbers), torch.as_tensor(slab.positions), cell=torch.as_tensor(slab.cell.array),
             pbc=torch.tensor([True, True, False]))
    assert float(out["energy"].detach()) == pytest.approx(reference, abs=1e-9)


@pytest.mark.parametrize("scale", [0.0, -2.0])
def test_model_file_with_scale_zero_or_negative_is_refused(tmp_path, scale):
    import torch

    from torchmdx.errors import ModelError

    model = torchmdx.build_model(TINY)
    model.set_normalisation(elements=[1, 6, 8], scale=2.0)
    model.save(tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["state_dict"]["scale"] = torch.tensor(scale, dtype=torch.float64)
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(ModelError, match=rf"edited\.pt: buffer 'scale' is {scale:g}, expected a positive number "):
        torchmdx.load_model(tmp_path / "edited.pt")
    assert float(torchmdx.load_model(tmp_path / "m.pt").scale) == 2.0
