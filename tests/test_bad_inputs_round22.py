"""Bad inputs, round 22 (branch bad22): round 21's leftovers with a clear right answer (``Potential.predict`` and
the Calculator of an empty structure, an extxyz atom count one too small, an ``energy_unit=`` entry on an extxyz
comment line, ``Calculator.calculate(properties=["bogus"])``); see docs/bad_inputs.md, round 22.
"""

from __future__ import annotations

import pytest
from ase import Atoms

from torchmdx.errors import ModelError
from bad_inputs_common import (  # the helpers rounds 17-22 share
    lj_file as _lj,
    refused_exactly as _exact,
)


def _argon_pair():
    return Atoms("Ar2", positions=[[0, 0, 0], [3.8, 0, 0]])


# ---------------------------------------------------------------------------------- an empty structure
EMPTY_TAIL = ("has no atoms; there is nothing to predict (md, label and the data readers refuse an empty structure "
              "too): give a structure with at least one atom")


def test_predict_of_an_empty_structure_is_refused(tmp_path):
    """``predict(Atoms())`` gave energy 0.0 where md, label and the readers refuse an empty frame."""
    import torchmdx

    model = torchmdx.load_model(_lj(tmp_path))
    with pytest.raises(ModelError) as info:
        model.predict(Atoms())
    assert str(info.value) == f"Potential.predict: the structure {EMPTY_TAIL}"
    assert model.predict([_argon_pair(), Atoms()])["energy"][1] == 0.0  # in a list: its 0 eV row (round 5)
    assert model.predict(_argon_pair())["forces"].shape == (2, 3)  # a structure with atoms: as before


def test_calculator_of_an_empty_structure_is_refused(tmp_path):
    import torchmdx
    from torchmdx.md.calculator import Calculator

    calc = Calculator(torchmdx.load_model(_lj(tmp_path)))
    with pytest.raises(ModelError) as info:
        calc.get_potential_energy(Atoms())
    assert str(info.value) == ("Calculator: the structure has no atoms; there is nothing to compute (md, label and the "
                               "data readers refuse an empty structure too): give a structure with at least one atom")


# ---------------------------------------------------------------------------------- unknown properties
def test_calculate_of_an_unknown_property_is_refused(tmp_path):
    """``calculate(atoms, properties=["bogus"])`` returned without a word."""
    import torchmdx
    from torchmdx.md.calculator import Calculator

    calc = Calculator(torchmdx.load_model(_lj(tmp_path)))
    with pytest.raises(ModelError) as info:
        calc.calculate(_argon_pair(), properties=["energy", "bogus"])
    assert str(info.value) == ("Calculator: unknown property 'bogus'; this calculator computes energy, free_energy, "
                               "forces, stress, energies")
    calc.calculate(_argon_pair(), properties="energy")  # one name as a string: taken, not read as its letters
    assert calc.results["energy"] == pytest.approx(-0.0103359, rel=1e-5)  # LJ argon pair at 3.8 Å


# ---------------------------------------------------------------------------------- an atom count too small
SHORT = "2\nenergy=-1.0\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\n"
FULL = "3\nenergy=-1.0\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\n"


def test_atom_count_one_too_small_names_the_count_line(tmp_path, capsys, monkeypatch):
    """ASE's "Expected xyz header but got: invalid literal for int() ... 'H -0.24 0.93 0'" did not point at the
    short count line; md, label, export --structure and data info name it now (here frame 1's, line 6)."""
    monkeypatch.chdir(tmp_path)
    _lj(tmp_path)
    (tmp_path / "s.extxyz").write_text(FULL + SHORT)
    why = ("line 6: frame 1's atom count is 2, but 3 atom lines follow its comment line (line 10, 'H -0.24 0.93 0', "
           "was read where the next frame's atom count belongs): the count may be too small; make it 3")
    _exact(capsys, ["md", "s.extxyz", "--model", "lj.pt", "--steps", "2"], f"error: s.extxyz: {why}", tmp_path)
    _exact(capsys, ["label", "s.extxyz", "--method", "model:lj.pt", "-o", "o.extxyz"], f"error: s.extxyz: {why}",
           tmp_path)
    _exact(capsys, ["export", "--openmm", "lj.pt", "-o", "om.pt", "--structure", "s.extxyz"],
           f"error: --structure: s.extxyz: {why}", tmp_path)
    _exact(capsys, ["data", "info", "s.extxyz"], f"error: s.extxyz: {why}", tmp_path)


# ---------------------------------------------------------------------------------- energy_unit= on a comment line
def test_energy_unit_entry_on_a_comment_line_is_checked(tmp_path, capsys, monkeypatch):
    """``energy_unit=Hartree`` was an ordinary info key: the energies were taken in eV without a word. Refused
    unless data.energy_unit (--energy-unit) says the same unit; then read in it."""
    from torchmdx.data.ase_format import read_ase

    monkeypatch.chdir(tmp_path)
    (tmp_path / "h.extxyz").write_text(FULL.replace("energy=-1.0", "energy=-1.0 energy_unit=Hartree"))
    key = ("frame 0: energy_unit=Hartree is an ordinary key to ASE and torchmdx (no reader takes units from it), "
           "and the values are read in ")
    tail = " to Hartree if that is their unit (the key is then checked against it), or convert the values and drop the key"
    _exact(capsys, ["data", "info", "h.extxyz"],
           f"error: h.extxyz: {key}eV; set config key 'data.energy_unit' (--energy-unit){tail}", tmp_path)
    _exact(capsys, ["data", "info", "h.extxyz", "--energy-unit", "kcal/mol"],
           f"error: h.extxyz: {key}kcal/mol, as config key 'data.energy_unit' (--energy-unit) says; set it{tail}",
           tmp_path)
    structures = read_ase(tmp_path / "h.extxyz", energy_unit="hartree")  # the same unit: taken, converted
    assert float(structures.energy[0]) == pytest.approx(-27.211386, rel=1e-6)
