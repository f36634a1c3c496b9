"""Bad inputs, round 25 (branch bad25): PDB atoms without an element column (ASE took 'CA' for calcium), xyz
species columns of atom labels ('C1'), a resumed run with another architecture, ``data clean --cache-dir``,
unit keys naming eV and Å, MD17 npz files with a ``z`` row per frame; see docs/bad_inputs.md, round 25.
"""

from __future__ import annotations

import numpy as np

from torchmdx.cli.main import main
from bad_inputs_common import lj_file, refused_exactly as _exact  # the helpers rounds 17-25 share
from test_bad_inputs_round23 import _train_config, _water_frames

# a glycine's first atoms as packmol and older tools write them: no element symbol in columns 77-78
NO_ELEMENTS = """\
ATOM      1  N   GLY A   1      -0.966   0.493   1.500  1.00  0.00
ATOM      2  CA  GLY A   1       0.257   0.418   0.692  1.00  0.00
ATOM      3  C   GLY A   1      -0.094   0.017  -0.716  1.00  0.00
ATOM      4  O   GLY A   1      -1.056  -0.682  -0.923  1.00  0.00
END
"""
CA = ("prot.pdb: line 2 (atom 1, name 'CA' of GLY A 1) has no element symbol in columns 77-78, and ASE would take Ca "
      "(calcium) from the atom name; an atom name is not an element ('CA' is a protein's alpha carbon): put each "
      "atom's element symbol in columns 77-78 (e.g. with pdbfixer or Open Babel), or give the structure as extxyz")


# ---------------------------------------------------------------------------------- PDB atom names as elements
def test_pdb_atom_names_without_element_column_are_refused(tmp_path, capsys, monkeypatch):
    """ASE reads an ATOM line without columns 77-78 by its atom name, two letters first: the alpha carbon 'CA'
    became calcium, and md, label and export --openmm ran on it without a word."""
    monkeypatch.chdir(tmp_path)
    lj_file(tmp_path)
    (tmp_path / "prot.pdb").write_text(NO_ELEMENTS)
    _exact(capsys, ["md", "prot.pdb", "--model", "lj.pt", "--steps", "2"], f"error: {CA}", tmp_path)
    _exact(capsys, ["label", "prot.pdb", "--method", "model:lj.pt", "-o", "o.extxyz"], f"error: {CA}", tmp_path)
    _exact(capsys, ["export", "--openmm", "lj.pt", "--structure", "prot.pdb", "-o", "om.pt"],
           f"error: --structure: {CA}", tmp_path)
    _exact(capsys, ["data", "info", "prot.pdb", "--cache-dir", "c"], f"error: {CA}", tmp_path)


def test_pdb_files_with_element_columns_or_one_letter_names_are_read(tmp_path, shared_data):
    """The check stops nothing ASE reads right: the element column, one-letter names, an ion named as its residue."""
    from torchmdx.data.ase_text import pdb_name_as_element
    from torchmdx.md.structure_files import read_structures

    caffeine = shared_data / "systems" / "caffeine.pdb"
    assert pdb_name_as_element(caffeine) is None
    trimmed = "\n".join(line[:66] for line in caffeine.read_text().splitlines())  # no element columns: O, N, C, H
    (tmp_path / "c.pdb").write_text(trimmed + "\n")
    assert read_structures([tmp_path / "c.pdb"])[0].get_chemical_formula() == "C8H10N4O2"
    (tmp_path / "zn.pdb").write_text("HETATM    1 ZN   ZN  A   1       0.000   0.000   0.000  1.00  0.00\n"
                                     "HETATM    2  O   HOH A   2       2.000   0.000   0.000  1.00  0.00\nEND\n")
    assert read_structures([tmp_path / "zn.pdb"])[0].get_chemical_symbols() == ["Zn", "O"]
    columns = NO_ELEMENTS.replace("1.00  0.00\n", "1.00  0.00           X\n")
    (tmp_path / "e.pdb").write_text("".join(line[:76] + line[12:16].strip()[0] + "\n" if line.startswith("ATOM") else
                                            line + "\n" for line in columns.splitlines()))
    assert read_structures([tmp_path / "e.pdb"])[0].get_chemical_symbols() == ["N", "C", "C", "O"]


# ---------------------------------------------------------------------------------- xyz atom labels
def test_xyz_atom_labels_in_the_species_column_are_named(tmp_path, capsys, monkeypatch):
    """``C1 0.0 0.0 0.0`` (labels as crystallography programs write them) was "cannot read a structure with ASE
    ('C1')"; 'CA1' (C or Ca?) gets no guess."""
    monkeypatch.chdir(tmp_path)
    lj_file(tmp_path)
    (tmp_path / "l.xyz").write_text("3\n\nO1 0 0 0\nH1 0.96 0 0\nH2 -0.24 0.93 0\n")
    why = ("l.xyz: line 3: the species column holds 'O1', an atom label, not an element symbol (O?); write element "
           "symbols (H, C, O, ...) in that column")
    _exact(capsys, ["md", "l.xyz", "--model", "lj.pt", "--steps", "2"], f"error: {why}", tmp_path)
    _exact(capsys, ["data", "info", "l.xyz"], f"error: {why}", tmp_path)
    (tmp_path / "l.xyz").write_text("2\n\nCA1 0 0 0\nCA2 3.8 0 0\n")
    _exact(capsys, ["label", "l.xyz", "--method", "model:lj.pt", "-o", "o.extxyz"],
           "error: l.xyz: line 3: the species column holds 'CA1', an atom label, not an element symbol; write element "
           "symbols (H, C, O, ...) in that column", tmp_path)
    (tmp_path / "l.xyz").write_text("2\n\nAr 0 0 0\nDu 3.8 0 0\n")  # a dummy atom: md said "... with ASE ('Du')"
    _exact(capsys, ["md", "l.xyz", "--model", "lj.pt", "--steps", "2"],
           "error: l.xyz: line 4: unknown element symbol 'Du' in the species column; write element symbols (H, C, O, "
           "...) there", tmp_path)


# ---------------------------------------------------------------------------------- --resume, another architecture
def test_resume_with_another_architecture_names_model_architecture(tmp_path, capsys, monkeypatch):
    """``--set model.architecture=transformer`` on an ET run said "config key 'model.activation' is None but the run
    ... was started with 'silu'", the first key the two sections differ in by name."""
    monkeypatch.chdir(tmp_path)
    _train_config(tmp_path)
    cache = ["--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["train", "t.yaml", *cache]) == 0
    _exact(capsys, ["train", "t.yaml", "--resume", *cache, "--set", "model.architecture=transformer"],
           "error: --resume: config key 'model.architecture' is 'transformer' but the run in runs/t was started with "
           "'et'; a resumed run keeps its model and data (train a new run with --run-dir for another architecture)",
           tmp_path)
    _exact(capsys, ["train", "t.yaml", "--resume", *cache, "--set", "model.seed=3"],
           "error: --resume: config key 'model.seed' is 3 but the run in runs/t was started with null; a resumed run "
           "keeps its model and data", tmp_path)  # was "started with None"


# ---------------------------------------------------------------------------------- data clean --cache-dir
def test_data_clean_takes_cache_dir_as_the_other_data_commands(tmp_path, capsys, monkeypatch):
    """``data clean --cache-dir d`` was "unrecognized arguments: --cache-dir" (d taken as the folder); ``data clean
    ''`` (an unset shell variable) cleaned the current folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    capsys.readouterr()
    assert main(["data", "clean", "--cache-dir", "d", "--dry-run"]) == 0
    assert capsys.readouterr().out.strip() == "nothing to remove in d"
    (tmp_path / "e").mkdir()
    _exact(capsys, ["data", "clean", "e", "--cache-dir", "d"],
           "error: data clean got two cache folders, e and --cache-dir d; give one", tmp_path)
    _exact(capsys, ["data", "clean", ""],
           "error: the cache folder is empty (''); give the cache folder, or leave it out for data/cache", tmp_path)
    _exact(capsys, ["data", "clean", "--cache-dir", ""],
           "error: --cache-dir is empty (''); give the cache folder, or leave it out for data/cache", tmp_path)


# ---------------------------------------------------------------------------------- unit keys naming eV and Å
def test_unit_keys_naming_the_default_units_are_taken(tmp_path):
    """``energy_unit=eV`` was refused unless --energy-unit eV confirmed it (round 22's decision; round 24's
    leftover), though eV is what the values are read in; a key naming other units is refused as before."""
    import pytest

    from torchmdx.data.ase_format import read_ase
    from torchmdx.errors import DataError

    structures = read_ase(_water_frames(tmp_path, "energy_unit=eV force_unit=eV/Ang"))
    assert structures.energy.tolist() == [-1.0, -2.0]
    with pytest.raises(DataError, match="energy_unit=eV is an ordinary key .* read in Hartree, as"):
        read_ase(_water_frames(tmp_path, "energy_unit=eV"), energy_unit="Hartree")
    with pytest.raises(DataError, match="length_unit=Bohr is an ordinary key"):
        read_ase(_water_frames(tmp_path, "length_unit=Bohr"))


# ---------------------------------------------------------------------------------- npz z per frame
def test_md17_npz_with_a_z_row_per_frame(tmp_path, capsys, monkeypatch):
    """A ``z`` of shape (frames, atoms) was "z has shape (3, 3) but R has 3 atoms per frame"; rows of one molecule
    are read, rows that differ name the frame and atom."""
    from torchmdx.data.md17 import read_md17

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    R = np.array([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]) + rng.normal(0, 0.02, (3, 3, 3))
    z = np.tile([8, 1, 1], (3, 1))
    np.savez(tmp_path / "w.npz", R=R, z=z, E=rng.normal(0, 1, 3), F=rng.normal(0, 1, (3, 3, 3)))
    assert read_md17(tmp_path / "w.npz").z.tolist() == [8, 1, 1] * 3
    z[2, 1] = 9
    np.savez(tmp_path / "w.npz", R=R, z=z, E=rng.normal(0, 1, 3), F=rng.normal(0, 1, (3, 3, 3)))
    _exact(capsys, ["data", "info", "w.npz", "--cache-dir", str(tmp_path / "c")],
           "error: w.npz: z has a row per frame, and frame 2's atom 1 is Z=9 where frame 0's is Z=1; this layout holds "
           "one molecule per file (the same atoms in the same order in every frame): split the frames by molecule, "
           "or convert them to extxyz", tmp_path)


def test_md_warns_that_a_charged_structure_runs_as_neutral(tmp_path, capsys, monkeypatch):
    """A structure with atoms.info['charge'] (or initial charges) ran as if neutral without a word (round 25's
    leftover): md now says so in one warning line per structure, naming the file, and runs."""
    from ase import Atoms
    from ase.io import write

    from bad_inputs_common import lj_file
    from torchmdx.cli.main import main

    monkeypatch.chdir(tmp_path)
    lj_file(tmp_path)
    ion = Atoms("Ar3", positions=[[0, 0, 0], [3.8, 0, 0], [0, 3.8, 0]], info={"charge": 1})
    write(tmp_path / "ion.extxyz", ion)
    charged = Atoms("Ar3", positions=[[0, 0, 0], [3.8, 0, 0], [0, 3.8, 0]], charges=[0.5, 0.5, 0.0])
    write(tmp_path / "charges.extxyz", charged)
    neutral = Atoms("Ar3", positions=[[0, 0, 0], [3.8, 0, 0], [0, 3.8, 0]])
    write(tmp_path / "neutral.xyz", neutral)
    warnings = {}
    for name in ("ion.extxyz", "charges.extxyz", "neutral.xyz"):
        capsys.readouterr()
        assert main(["md", name, "--model", "lj.pt", "--steps", "2", "--out", f"run_{name}.extxyz"]) == 0
        warnings[name] = [line for line in capsys.readouterr().err.splitlines() if "charge" in line]
    assert warnings["ion.extxyz"] == ["warning: ion.extxyz: atoms.info['charge'] is 1, but the model takes no charge: "
                                      "the run treats the structure as if it were neutral"]
    assert warnings["charges.extxyz"] == ["warning: charges.extxyz: its initial charges sum to 1, but the model takes "
                                          "no charge: the run treats the structure as if it were neutral"]
    assert warnings["neutral.xyz"] == []


def test_the_calculator_warns_once_that_a_charged_structure_is_computed_as_neutral():
    import warnings

    import pytest
    from ase import Atoms

    from torchmdx import Calculator
    from torchmdx.nn.analytic import LennardJones

    calc = Calculator(LennardJones(0.0104, 3.4))
    ion = Atoms("Ar3", positions=[[0, 0, 0], [3.8, 0, 0], [0, 3.8, 0]], info={"charge": -1})
    with pytest.warns(UserWarning, match=r"^Calculator: atoms.info\['charge'\] is -1, but the model takes no charge"):
        ion.calc = calc
        ion.get_potential_energy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ion.positions[0, 0] += 0.1
        ion.get_potential_energy()  # said once per calculator
        neutral = Atoms("Ar3", positions=[[0, 0, 0], [3.8, 0, 0], [0, 3.8, 0]])
        neutral.calc = Calculator(LennardJones(0.0104, 3.4))
        neutral.get_potential_energy()
