"""Bad inputs, round 21 (branch bad21): round 20's leftovers (a species column of atomic numbers, numeric group
names, ``train.shift: 1e30``, ``energy=`` twice on an extxyz comment line, an MD17 xyz with an extra column,
``label_source`` naming the file only, PyTorch's worker warning twice) and the hunt's further finds (see
docs/bad_inputs.md, round 21).
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.io import read, write

from torchmdx.cli.main import main
from bad_inputs_common import (  # the helpers rounds 17-21 share
    lj_file as _lj,
    argon_file as _argon,
    water as _water,
    refused_exactly as _exact,
)

WATER_OF_NUMBERS = "3\n\n8 0.0 0.0 0.0\n1 0.96 0 0\n1 -0.24 0.93 0\n"
NUMBERS_LINE = ("the species column holds '8', a number where ASE reads an element symbol (8 is O); write element "
                "symbols in that column")


def _water_frames(n=6, groups=None, seed=0):
    """``n`` displaced water molecules with energies and forces (and ``fam`` group labels)."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        atoms = _water()
        atoms.positions += rng.normal(0, 0.02, (3, 3))
        atoms.info["energy"] = -10.0 + rng.normal(0, 0.1)
        atoms.arrays["forces"] = rng.normal(0, 0.1, (3, 3))
        if groups is not None:
            atoms.info["fam"] = groups[k]
        frames.append(atoms)
    return frames


# ---------------------------------------------------------------------------------- atomic numbers as species
def test_species_column_of_atomic_numbers_says_so(tmp_path, capsys, monkeypatch):
    """"cannot read a structure with ASE ('8')" (md, export --structure), "(KeyError: '8')" (label, data info):
    the classifier names the number where ASE expects a symbol."""
    monkeypatch.chdir(tmp_path)
    _lj(tmp_path)
    (tmp_path / "num.xyz").write_text(WATER_OF_NUMBERS)
    (tmp_path / "num.extxyz").write_text(WATER_OF_NUMBERS.replace(
        "\n\n", "\nProperties=species:S:1:pos:R:3 energy=-1.0\n", 1))
    _exact(capsys, ["md", "num.xyz", "--model", "lj.pt", "--steps", "2"], f"error: num.xyz: {NUMBERS_LINE}", tmp_path)
    _exact(capsys, ["label", "num.xyz", "--method", "model:lj.pt", "-o", "o.extxyz"],
           f"error: num.xyz: {NUMBERS_LINE}", tmp_path)
    _exact(capsys, ["export", "--openmm", "lj.pt", "-o", "om.pt", "--structure", "num.xyz"],
           f"error: --structure: num.xyz: {NUMBERS_LINE}", tmp_path)
    _exact(capsys, ["data", "info", "num.extxyz"], f"error: num.extxyz: {NUMBERS_LINE}", tmp_path)


# ---------------------------------------------------------------------------------- numeric group names
def test_numeric_group_names_are_taken_as_their_text(tmp_path):
    """``data.test_groups: [3]`` for an extxyz ``fam=3`` was "must be a string, got 3 (int)"; now the group '3'
    (as the labels are stored); a boolean is still refused."""
    from torchmdx.config import from_dict
    from torchmdx.data import read_structures
    from torchmdx.data.data_config import DataConfig
    from torchmdx.data.splits import make_split
    from torchmdx.errors import ConfigError

    write(tmp_path / "fam.extxyz", _water_frames(9, groups=[1, 1, 1, 2, 2, 2, 3, 3, 3]))
    config = from_dict(DataConfig, {"path": str(tmp_path / "fam.extxyz"), "group_key": "fam", "test_groups": [3],
                                    "val_groups": [1.5]}, "data")
    assert config.test_groups == ["3"] and config.val_groups == ["1.5"]
    config.val_groups = []  # no group 1.5 here
    structures = read_structures(tmp_path / "fam.extxyz", group_key="fam")
    split = make_split(structures, config)
    assert sorted(split.test.tolist()) == [6, 7, 8]
    with pytest.raises(ConfigError, match=r"^config key 'data.test_groups\[0\]' must be str \| int \| float, got "
                                          r"True \(bool\)$"):
        from_dict(DataConfig, {"path": "x", "test_groups": [True]}, "data")


# ---------------------------------------------------------------------------------- train.shift 1e30
def test_shift_and_scale_beyond_any_atom_energy_are_refused():
    """``train.shift: 1e30`` trained (best_val_loss 1.4e30) without a word."""
    from torchmdx.config import from_dict
    from torchmdx.errors import ConfigError
    from torchmdx.train.config import TrainConfig

    for name, value in (("shift", 1e30), ("shift", -2e7), ("scale", 1e30)):
        with pytest.raises(ConfigError) as info:
            from_dict(TrainConfig, {name: value}, "train")  # validates
        assert str(info.value) == (
            f"config key 'train.{name}' is {value:g} eV per atom, beyond any atom's energy (at most 1.4e+07 eV: 10 x "
            "the Thomas-Fermi energy of element 118, the label check's bound); give it in eV, or 'auto'")
    from_dict(TrainConfig, {"shift": -1e5, "scale": 30.0}, "train")  # large, but an energy


# ---------------------------------------------------------------------------------- energy= twice
def test_extxyz_key_given_twice_is_refused(tmp_path, capsys, monkeypatch):
    """ASE kept the last of ``energy=-1.0 ... energy=-2.0``, silently; a quoted value holding '=' is one key."""
    monkeypatch.chdir(tmp_path)
    _lj(tmp_path)
    (tmp_path / "twice.extxyz").write_text(
        '3\nProperties=species:S:1:pos:R:3 energy=-1.0 comment="a b=c" energy=-2.0\nO 0 0 0\nH 0.96 0 0\n'
        "H -0.24 0.93 0\n")
    line = ("twice.extxyz: a comment line gives energy twice (energy=-1.0 and energy=-2.0); ASE would keep the last "
            "one, silently: give each key once")
    _exact(capsys, ["data", "info", "twice.extxyz"], f"error: {line}", tmp_path)
    _exact(capsys, ["md", "twice.extxyz", "--model", "lj.pt", "--steps", "2"], f"error: {line}", tmp_path)
    from torchmdx.data.ase_text import repeated_key as _repeated_key

    assert _repeated_key('energy=-1 comment="energy=2" pbc="F F F"') is None
    assert _repeated_key("a=1 flag b=2 flag") == ("flag", ("T", "T"))


# ---------------------------------------------------------------------------------- MD17 xyz, 8 columns
def test_md17_xyz_with_an_extra_column_is_read_as_md17(tmp_path, capsys, monkeypatch):
    """Guessed as an ASE file: "frame 0: no energy 'energy' (info keys: -97000.1; ...)"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "e8.xyz").write_text("3\n-97000.1\nO 0.0 0.0 0.0 0.1 0.2 0.3 9\nH 0.96 0 0 0.1 0.2 0.3 9\n"
                                     "H -0.24 0.93 0 0.1 0.2 0.3 9\n")
    _exact(capsys, ["data", "info", "e8.xyz"],
           "error: e8.xyz: line 3: expected 7 columns (symbol x y z fx fy fz: the MD17 xyz layout, whose comment line "
           "is the energy alone), got 8", tmp_path)
    from torchmdx.data.formats import guess_format

    (tmp_path / "plain.xyz").write_text("3\n-97000.1\nO 0.0 0.0 0.0\nH 0.96 0 0\nH -0.24 0.93 0\n")
    assert guess_format(tmp_path / "plain.xyz") == "ase"  # a number as the comment of a plain xyz stays ASE's


# ---------------------------------------------------------------------------------- label_source
def test_label_source_records_the_path_as_given(tmp_path, monkeypatch):
    """``label run1/traj.extxyz run2/traj.extxyz`` recorded ``traj.extxyz:0`` for both."""
    monkeypatch.chdir(tmp_path)
    _lj(tmp_path)
    for run in ("run1", "run2"):
        (tmp_path / run).mkdir()
        _argon(tmp_path / run, "traj.extxyz")
    assert main(["label", "run1/traj.extxyz", "run2/traj.extxyz", "--method", "model:lj.pt", "-o", "l.extxyz",
                 "--no-progress"]) == 0
    assert [f.info["label_source"] for f in read(tmp_path / "l.extxyz", ":")] == ["run1/traj.extxyz:0",
                                                                                "run2/traj.extxyz:0"]


# ---------------------------------------------------------------------------------- a warning twice
def test_command_line_prints_a_repeated_warning_once(capsys):
    """PyTorch's "This DataLoader will create 3 worker processes ..." came once per loader (training and
    validation): the command line's warning lines print a text once per command."""
    from torchmdx import errors as cli_main  # the command line's warning hook (torchmdx.errors since round 41)

    cli_main._SHOWN.clear()
    text = "This DataLoader will create 3 worker processes in total."
    for _ in range(2):
        cli_main._one_line_warning(UserWarning(text), UserWarning, "dataloader.py", 1)
    cli_main._one_line_warning(UserWarning("another"), UserWarning, "x.py", 1)
    assert capsys.readouterr().err.splitlines() == [f"warning: {text}", "warning: another"]
    cli_main._SHOWN.clear()


# ---------------------------------------------------------------------------------- stress key = forces
def test_stress_key_naming_per_atom_values_is_refused(tmp_path, capsys, monkeypatch):
    """``--stress-key forces`` read a 3-atom frame's forces (9 values) as its stress, silently."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "w.extxyz", _water_frames(2))
    _exact(capsys, ["data", "info", "w.extxyz", "--stress-key", "forces"],
           "error: w.extxyz: stress key 'forces' names the forces key, one value per atom, not a stress (6 or 9 values "
           "per structure); give the info key or calculator result that holds the stress (e.g. stress), or a virial",
           tmp_path)
    _exact(capsys, ["data", "info", "w.extxyz", "--stress-key", "energies"],
           "error: w.extxyz: stress key 'energies' names ASE's per-atom energies, one value per atom, not a stress (6 "
           "or 9 values per structure); give the info key or calculator result that holds the stress (e.g. stress), "
           "or a virial", tmp_path)


# ---------------------------------------------------------------------------------- device 'gpu'
def test_device_gpu_is_quoted_as_given(tmp_path):
    """``Calculator(model, device='gpu')`` without a GPU said "device 'cuda'"."""
    import torch

    from torchmdx.devices import check_device
    from torchmdx.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(ConfigError, match=r"^Calculator device 'gpu': no CUDA GPU is available here \(use cpu\)$"):
        check_device("gpu", "Calculator device")


# ---------------------------------------------------------------------------------- md --fmax without --minimize
def test_md_minimisation_options_without_minimize_are_refused(tmp_path, capsys, monkeypatch):
    """``--fmax 0.01`` / ``--minimize-steps 50`` without ``--minimize`` ran the dynamics unrelaxed, silently."""
    monkeypatch.chdir(tmp_path)
    _lj(tmp_path)
    _argon(tmp_path)
    for option, value, what in (("--fmax", "0.01", "the minimisation's force threshold"),
                                ("--minimize-steps", "50", "the minimisation's step limit")):
        _exact(capsys, ["md", "ar.xyz", "--model", "lj.pt", "--steps", "2", option, value],
               f"error: {option} sets {what}, but --minimize was not given, so it has no effect (the dynamics start "
               f"from the structure as it is): add --minimize to relax it first, or leave {option} out", tmp_path)
