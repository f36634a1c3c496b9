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
    refused as _refused,
)


def _exact(capsys, argv, line, folder):
    """``argv`` is refused with exactly ``line`` (and no traceback, ``folder`` unchanged)."""
    got = _refused(capsys, argv, [line], folder)
    assert got == line
    return got


def _argon_pair():
    return Atoms("Ar2", positions=[[0, 0, 0], [3.8, 0, 0]])


# ---------------------------------------------------------------------------------- an empty structure
EMPTY_TAIL = ("has no atoms; there is nothing to predict (md, label and the data readers refuse an empty structure "
              "too): give structures with at least one atom")


def test_predict_of_an_empty_structure_is_refused(tmp_path):
    """``predict(Atoms())`` gave energy 0.0 where md, label and the readers refuse an empty frame."""
    import torchmdx

    model = torchmdx.load_model(_lj(tmp_path))
    with pytest.raises(ModelError) as info:
        model.predict(Atoms())
    assert str(info.value) == f"Potential.predict: the structure {EMPTY_TAIL}"
    with pytest.raises(ModelError) as info:
        model.predict([_argon_pair(), Atoms()])
    assert str(info.value) == f"Potential.predict: structure 1 of the list of 2 {EMPTY_TAIL}"
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
