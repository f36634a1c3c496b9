"""Bad inputs, round 31 (branch bad31): rounds 29-30's leftovers (a quoted split size, equal sweep points, huge
float32 cells, unit attributes of other readers) and the evaluate / export / label outputs; see docs/bad_inputs.md,
round 31.
"""

from __future__ import annotations

import numpy as np
import pytest

from bad_inputs_common import refused_exactly, sweep_config as _sweep_config, tiny_model, water, water_npz as _water_npz


# ------------------------------------------------------------------------------ a split size written as text
def test_quoted_split_size_is_shown_as_written(tmp_path, capsys, monkeypatch):
    """``data.train_size: "800"`` is the float 800.0 (text read as a number) and refused as a fraction above 1; the
    line showed 800.0 where the file says "800"."""
    monkeypatch.chdir(tmp_path)
    _water_npz(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text('data:\n  path: e.npz\n  train_size: "800"\n')
    refused_exactly(capsys, ["train", config],
                    "error: config key 'data.train_size' is a fraction above 1 ('800', text read as the number 800.0); "
                    "write a count as a plain integer (800, without quotes)", tmp_path)
    config.write_text("data:\n  path: e.npz\n  train_size: 1e3\n")  # text to YAML 1.1, read as 1000.0
    refused_exactly(capsys, ["train", config],
                    "error: config key 'data.train_size' is a fraction above 1 ('1e3', text read as the number "
                    "1000.0); write a count as a plain integer (1000, without quotes)", tmp_path)
    config.write_text("data:\n  path: e.npz\n  train_size: 800.0\n")  # a float as written: as before
    refused_exactly(capsys, ["train", config],
                    "error: config key 'data.train_size' is a fraction above 1 (800.0); use an integer for a count",
                    tmp_path)


# ------------------------------------------------------------------------------ sweep points the config reads alike
def test_sweep_grid_values_read_alike_are_refused(tmp_path, capsys, monkeypatch):
    """``--grid trainer.accelerator=CPU,cpu`` planned two points of the same training (the config lower-cases the
    accelerator since round 30)."""
    monkeypatch.chdir(tmp_path)
    config = _sweep_config(tmp_path)
    refused_exactly(capsys, ["sweep", config, "--dry-run", "--out", tmp_path / "out", "--grid",
                             "trainer.accelerator=CPU,cpu"],
                    "error: the sweep points (trainer.accelerator=CPU) and (trainer.accelerator=cpu) are the same "
                    "training (the config reads trainer.accelerator 'CPU' and 'cpu' alike); list each value once",
                    tmp_path)


# ------------------------------------------------------------------------------ huge float32 cells
def test_huge_float32_cell_has_its_true_widths():
    """A float32 periodic cell of 1e30 Å along a was refused with widths "b 0, c 0" (the squares inside the cross
    products' norms overflowed float32); its widths are 1e30, 10, 10 Å, wide enough for the cutoff."""
    import torch

    from torchmdx.kernels.neighbors_ref import perpendicular_widths

    widths = perpendicular_widths(torch.tensor([[1e30, 0, 0], [0, 10, 0], [0, 0, 10]], dtype=torch.float32))
    assert widths.dtype == torch.float32
    assert widths.tolist() == pytest.approx([1e30, 10.0, 10.0], rel=1e-6)
    model = tiny_model()
    open_energy = model.predict(water())["energy"]
    atoms = water()
    atoms.cell, atoms.pbc = [1e30, 10, 10], True
    assert model.predict(atoms)["energy"] == pytest.approx(open_energy, abs=1e-5)


# ------------------------------------------------------------------------------ unit keys of an npz
@pytest.mark.parametrize("key, value, line", [
    ("energy_unit", "eV", "e.npz: energy_unit = 'eV' states a unit, and the energies are read in kcal/mol (only "
                          "sGDML's e_unit and r_unit are read); set data.energy_unit (--energy-unit) to the file's "
                          "energy unit if eV is what they are (the key is then checked against it), or convert the "
                          "values"),
    ("F_unit", "Hartree/Bohr", "e.npz: F_unit = 'Hartree/Bohr' states a unit, and the forces are read in "
                               "kcal/mol/Å (only sGDML's e_unit and r_unit are read); set data.energy_unit "
                               "(--energy-unit) and data.length_unit (--length-unit) to the file's units if "
                               "Hartree/Bohr is what they are (the key is then checked against it), or convert the "
                               "values"),
])
def test_npz_unit_keys_other_than_sgdml_are_checked(tmp_path, capsys, monkeypatch, key, value, line):
    """An MD17-layout npz with ``energy_unit='eV'`` (not sGDML's ``e_unit``, which is read) was read in kcal/mol,
    23 times too small, without a word."""
    monkeypatch.chdir(tmp_path)
    arrays = dict(np.load(_water_npz(tmp_path)))
    np.savez(tmp_path / "e.npz", **arrays, **{key: np.array(value)})
    refused_exactly(capsys, ["data", "info", "e.npz"], "error: " + line, tmp_path)


def test_npz_unit_keys_that_agree_are_taken(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from torchmdx.data import read_structures

    arrays = dict(np.load(_water_npz(tmp_path)))
    plain = read_structures(tmp_path / "e.npz")
    np.savez(tmp_path / "k.npz", **arrays, E_unit=np.array("kcal/mol"), F_unit=np.array("kcal/mol/Ang"),
             charge_unit=np.array("e"))
    assert np.allclose(read_structures(tmp_path / "k.npz").energy, plain.energy)
    np.savez(tmp_path / "k.npz", **arrays, energy_unit=np.array("eV"))
    assert np.allclose(read_structures(tmp_path / "k.npz", energy_unit="eV").energy, 23.06 * plain.energy, rtol=1e-3)


# ------------------------------------------------------------------------------ openmm-ml: createSystem's arguments
KNOWN = "known: implementation, fastPath, cudaGraph, compile, device, dtype, outputForces"


@pytest.mark.parametrize("args, line", [
    ({"atoms": [0, 5]}, "MLPotential('torchmdx').createSystem takes no atoms=: it makes every atom of the topology an "
                        "ML atom; for ML atoms inside an MM system use createMixedSystem(topology, mm_system, atoms), "
                        "or give createSystem a topology of the ML atoms only"),
    ({"dtpye": "float64"}, f"MLPotential('torchmdx'): unknown option 'dtpye' (did you mean 'dtype'?); {KNOWN}"),
    ({"cuda_graph": False}, f"MLPotential('torchmdx'): unknown option 'cuda_graph' (did you mean 'cudaGraph'?); {KNOWN}"),
    ({"precision": "double"}, "MLPotential('torchmdx'): unknown option 'precision' (torchmdx's option is "
                              f"dtype='float32' or 'float64'); {KNOWN}"),
])
def test_openmm_create_system_arguments(tmp_path, args, line):
    """``createSystem(topology, atoms=[...])`` was openmm-ml's "addForces() got multiple values for argument
    'atoms'"; an option torchmdx does not take (a typo, MACE's ``precision='double'``) was dropped without a word
    (the System ran in float32)."""
    pytest.importorskip("openmmml")
    from openmmml import MLPotential

    from test_openmm import _topology
    from torchmdx.openmm import OpenMMError

    tiny_model().save(tmp_path / "m.pt")
    potential = MLPotential("torchmdx", modelPath=str(tmp_path / "m.pt"))
    with pytest.raises(OpenMMError) as info:
        potential.createSystem(_topology([8, 1, 1]), **args)
    assert str(info.value) == line
    assert potential.createSystem(_topology([8, 1, 1]), dtype="float64", removeCMMotion=False).getNumForces() == 1
    if "atoms" not in args:  # given to MLPotential itself: the same hint ("unknown option(s) dtpye" before)
        with pytest.raises(OpenMMError) as info:
            MLPotential("torchmdx", modelPath=str(tmp_path / "m.pt"), **args)
        assert str(info.value) == line.replace("known: ", "known: modelPath, ")


def test_sweep_format_in_other_case_is_one_format(tmp_path, capsys, monkeypatch):
    """``data.format: MD17`` was read as md17 by the readers but kept as written, so ``--grid data.format=MD17,md17``
    planned two points of one training; the config now keeps the format in lower case."""
    monkeypatch.chdir(tmp_path)
    from torchmdx.config import from_dict
    from torchmdx.data.data_config import DataConfig

    assert from_dict(DataConfig, {"path": "e.npz", "format": "MD17"}, "data").format == "md17"
    config = _sweep_config(tmp_path)
    refused_exactly(capsys, ["sweep", config, "--dry-run", "--out", tmp_path / "out", "--grid",
                             "data.format=MD17,md17"],
                    "error: the sweep points (data.format=MD17) and (data.format=md17) are the same training (the "
                    "config reads data.format 'MD17' and 'md17' alike); list each value once", tmp_path)
