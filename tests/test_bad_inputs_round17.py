"""Bad inputs, round 17 (branch bad17): ``data info`` and a split file of another data set, md's output
collisions naming the option to change, UTF-16/UTF-32 and compressed files with a byte-order mark, the
potential called with wrong ``z``/``pos`` tensors, an error table whose columns ran together, a
``trainer.max_time`` of no time, an empty or doubled ``export --atoms``, and md thermostat/barostat options
given without the option that turns them on (see docs/bad_inputs.md, round 17).
"""

from __future__ import annotations

import bz2
import gzip
import json

import numpy as np
import pytest
import torch
import yaml

from torchmdx.cli.main import main
from torchmdx.errors import ConfigError, ModelError
from test_bad_inputs_more import _ethanol
from test_bad_inputs_round9 import TINY
from bad_inputs_common import (  # the helpers rounds 17-19 share
    lj_file as _lj,
    argon_file as _argon,
    tiny_model as _tiny_model,
    refused as _refused,
)


# ---------------------------------------------------------------------------------- data info and split files
def test_data_info_names_a_split_file_made_for_other_data_of_the_same_size(tmp_path, shared_data, capsys,
                                                                           monkeypatch):
    """``data info CONFIG`` loaded ``data.split_file`` without the content check training does: a split made
    for another data set of as many structures passed silently. It now says what training says (a warning
    line naming the split file), from the raw file and from its cache alike."""
    from torchmdx.data.cache import content_hash
    from torchmdx.data.splits import Split, save_split

    monkeypatch.chdir(tmp_path)
    arrays = _ethanol(shared_data, frames=40)
    first = {k: (v[:20] if k in "REF" else v) for k, v in arrays.items()}
    second = {k: (v[20:] if k in "REF" else v) for k, v in arrays.items()}
    np.savez("a.npz", **first)
    np.savez("b.npz", **second)
    idx = np.arange(20)
    save_split(Split(train=idx[:12], val=idx[12:16], test=idx[16:], n_structures=20, seed=0), "s.npz",
               content_hash("a.npz"))
    for name, path in (("a.yaml", "a.npz"), ("b.yaml", "b.npz")):
        (tmp_path / name).write_text(yaml.safe_dump({"data": {"path": path, "cache_dir": "cache",
                                                              "split_file": "s.npz"}}))
    capsys.readouterr()
    assert main(["data", "info", "a.yaml", "--json"]) == 0  # its own data: no word
    captured = capsys.readouterr()
    assert "warning" not in captured.err.lower() and "different content" not in captured.err
    for _ in range(2):  # the raw file, then (after prepare) its cache
        with pytest.warns(UserWarning, match=r"s\.npz: split was made from a dataset with different content"):
            assert main(["data", "info", "b.yaml", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["split"] == {"train": 12, "val": 4, "test": 4, "unused": 0}
        assert main(["data", "prepare", "b.yaml"]) == 0
        capsys.readouterr()


# ---------------------------------------------------------------------------------- md output collisions
def test_md_output_collision_names_the_option_to_change(tmp_path, capsys, monkeypatch):
    """A thermo log named after --out colliding with --summary read "the thermo log (--out) and the summary
    (--summary)", and with --log onto the derived restart file the advice was "choose another --out" (the
    option the user did not give). The derived output is named as such and the advice names the option given."""
    monkeypatch.chdir(tmp_path)
    _argon(tmp_path)
    _lj(tmp_path)
    base = ["md", "ar.xyz", "--model", "lj.pt", "--steps", "2", "--out", "o/t.extxyz", "--no-progress"]
    line = _refused(capsys, base + ["--summary", "o/t.csv"],
                    ["the thermo log (named after --out; --log sets it) and the summary (--summary) would both be "
                     "o/t.csv: choose another --summary"], tmp_path)
    assert "(--out)" not in line
    _refused(capsys, base + ["--log", "o/t.restart.pt"],
             ["the thermo log (--log) and the restart file (named after --out; --restart-out sets it) would both "
              "be o/t.restart.pt: choose another --log"], tmp_path)
    _refused(capsys, base + ["--log", "o/x.csv", "--summary", "o/x.png"],
             ["the summary (--summary) and the thermo plot (named after --log) would both be o/x.png: choose "
              "another --summary"], tmp_path)


# ---------------------------------------------------------------------------------- UTF-16 and compressed marks
def test_utf16_utf32_and_compressed_marked_structure_files_are_read(tmp_path, shared_data):
    """A structure file saved as UTF-16 (Windows PowerShell's ``>``) was "cannot read a structure with ASE
    ('utf-8' codec can't decode byte 0xff in position 0)"; a gzip'd or bzip2'd file starting with a UTF-8 mark
    "Expected xyz header ... '\\ufeff24'". They are read as their plain UTF-8 twins."""
    from torchmdx.md.structure_files import read_structures

    plain = (shared_data / "systems" / "caffeine.xyz").read_text()
    (tmp_path / "u16.xyz").write_text(plain, encoding="utf-16")
    (tmp_path / "u16be.xyz").write_bytes(b"\xfe\xff" + plain.encode("utf-16-be"))
    (tmp_path / "u32.xyz").write_text(plain, encoding="utf-32")
    with gzip.open(tmp_path / "bom.xyz.gz", "wb") as handle:
        handle.write(b"\xef\xbb\xbf" + plain.encode())
    with gzip.open(tmp_path / "u16.xyz.gz", "wb") as handle:
        handle.write(plain.encode("utf-16"))
    with bz2.open(tmp_path / "bom.xyz.bz2", "wb") as handle:
        handle.write(b"\xef\xbb\xbf" + plain.encode())
    reference = read_structures([shared_data / "systems" / "caffeine.xyz"])[0]
    for name in ("u16.xyz", "u16be.xyz", "u32.xyz", "bom.xyz.gz", "u16.xyz.gz", "bom.xyz.bz2"):
        atoms = read_structures([tmp_path / name])[0]
        assert atoms.get_chemical_symbols() == reference.get_chemical_symbols(), name
        assert np.array_equal(atoms.positions, reference.positions), name


def test_utf16_data_files_are_read_and_a_utf16_mark_before_junk_is_named(tmp_path, shared_data, capsys):
    """Training data saved as UTF-16: an MD17 xyz file was guessed as an ASE file ("frame 0: no energy 'energy'
    (info keys: -97208.4...)") or, with --format md17-xyz, "holds binary data"; an extxyz file "ASE cannot read
    it (UnicodeDecodeError ...)". Both are read; a UTF-16 mark before what no ASE reader takes is named."""
    from torchmdx.data.formats import read_structures

    md17 = (shared_data / "md17" / "ethanol_snip.xyz").read_text()
    (tmp_path / "e16.xyz").write_text(md17, encoding="utf-16")
    with gzip.open(tmp_path / "e16.xyz.gz", "wb") as handle:
        handle.write(md17.encode("utf-16"))
    reference = read_structures(shared_data / "md17" / "ethanol_snip.xyz")
    for name, fmt in (("e16.xyz", None), ("e16.xyz", "md17-xyz"), ("e16.xyz.gz", None)):
        got = read_structures(tmp_path / name, fmt)
        assert got.metadata.get("format", "md17-xyz") == "md17-xyz", name
        assert np.array_equal(np.asarray(got.energy), np.asarray(reference.energy)), name
        assert np.array_equal(np.asarray(got.pos), np.asarray(reference.pos)), name
    with open(shared_data / "polymer" / "polymers_xtb.extxyz", "rb") as handle:
        head = b"\n".join(handle.read(200_000).split(b"\n")[:2 * 28]) + b"\n"  # two 26-atom frames
    (tmp_path / "p16.extxyz").write_text(head.decode(), encoding="utf-16")
    (tmp_path / "p8.extxyz").write_bytes(head)
    got, plain = read_structures(tmp_path / "p16.extxyz"), read_structures(tmp_path / "p8.extxyz")
    assert np.array_equal(np.asarray(got.energy), np.asarray(plain.energy))
    (tmp_path / "junk.xyz").write_bytes(b"\xff\xfe" + bytes(range(256)) * 3)
    _refused(capsys, ["data", "info", tmp_path / "junk.xyz", "--format", "ase"],
             ["junk.xyz: starts with a UTF-16 byte-order mark (bytes FF FE): UTF-16 text, and what follows is not "
              "a text structure format ASE can read; save the file as plain UTF-8"], tmp_path)


# ---------------------------------------------------------------------------------- the potential's inputs
@pytest.mark.parametrize("z, pos, message", [
    (torch.tensor([6.0, 8.0]), torch.zeros(2, 3), "z must be a 1-D tensor of atomic numbers (torch.long), got shape "
                                                  "[2] of float32"),
    (torch.tensor([[6, 8]]), torch.zeros(2, 3), "z must be a 1-D tensor of atomic numbers (torch.long), got shape "
                                                "[1, 2] of int64"),
    (torch.tensor([6, 8, 1]), torch.zeros(2, 3), "z holds 3 atomic numbers but pos 2 positions; expected one "
                                                 "position per atom"),
    (torch.tensor([6, 8]), None, "no positions: call the potential as model(z, pos)"),
    (torch.tensor([6, 8]), torch.zeros(2, 3, dtype=torch.long), "pos must have shape [N, 3] of floating-point "
                                                                "positions in Å, got shape [2, 3] of int64"),
    (torch.tensor([6, 8]), [[0.0, 0, 0], [1.2, 0, 0]], "pos must be a torch tensor [N, 3] of positions in Å, got list"),
])
def test_potential_called_with_wrong_z_or_pos_is_one_line(z, pos, message):
    """``model(z, pos)`` with float atomic numbers was torch's "IndexError: tensors used as indices must be long",
    with a [1, N] z or more numbers than positions "IndexError: index out of range in self", without positions
    "AttributeError: 'NoneType' object has no attribute 'shape'"."""
    model = _tiny_model()
    with pytest.raises(ModelError) as info:
        model(z, pos)
    assert message in str(info.value) and "\n" not in str(info.value)
    out = model(torch.tensor([6, 8], dtype=torch.int32), torch.tensor([[0.0, 0, 0], [1.2, 0, 0]]))
    assert out["energy"].shape == (1,)  # int32 atomic numbers stay accepted


# ---------------------------------------------------------------------------------- evaluate's table
def test_error_table_columns_never_run_together():
    """An MAE of nine digits before the point filled its 12-character column, and the RMSE followed without a
    space: "335677267.4797338017832.3142" (one number to the eye)."""
    from torchmdx.train.evaluate import format_table

    errors = {"energy_mae": 335677267.4797, "energy_rmse": 338017832.3142, "forces_mae": 1.5, "forces_rmse": 2.25,
              "n_structures": 20, "n_atoms": 180}
    lines = format_table(errors).splitlines()
    energy = lines[1].split()
    assert energy == ["energy", "335677267.4797", "338017832.3142", "meV"]
    assert lines[2].split() == ["forces", "1.5000", "2.2500", "meV/Å"]
    assert len({len(line.rstrip().rsplit(" ", 1)[0]) for line in lines[:3]}) == 1  # the columns line up
    small = format_table({"forces_mae": 1.5, "forces_rmse": 2.25, "n_structures": 1, "n_atoms": 3}).splitlines()
    assert small[0] == f"{'quantity':<18}{'MAE':>12}{'RMSE':>12}  unit"  # the usual layout where values fit


# ---------------------------------------------------------------------------------- trainer.max_time
def test_max_time_of_no_time_is_refused_before_the_run_folder(tmp_path, shared_data, capsys, monkeypatch):
    """``trainer.max_time: 00:00:00:00`` made the run folder, stopped before the first step and ended in
    "run/checkpoints/last.ckpt: checkpoint not found"."""
    monkeypatch.chdir(tmp_path)
    np.savez("e.npz", **_ethanol(shared_data, frames=20))
    config = {"data": {"path": "e.npz", "cache_dir": "cache", "train_size": 12, "val_size": 4, "batch_size": 4},
              "model": dict(TINY), "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1,
                                               "max_time": "00:00:00:00"}, "run_dir": "run"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    _refused(capsys, ["train", "c.yaml"], ["config key 'trainer.max_time' is '00:00:00:00', no time at all",
                                           "give a time > 0, or null for no limit"], tmp_path)
    from torchmdx.train.config import load_run_config

    assert load_run_config(tmp_path / "c.yaml", ["trainer.max_time=00:00:00:01"]).trainer.max_time == "00:00:00:01"


# ---------------------------------------------------------------------------------- export --atoms
def test_export_atoms_empty_or_doubled(tmp_path, capsys, shared_data):
    """``export --openmm --atoms ''`` (an empty shell variable) exported every atom of the structure, silently;
    an atom given twice was "--atoms: an atom is given twice", naming none."""
    _tiny_model().save(tmp_path / "m.pt")
    structure = shared_data / "systems" / "caffeine.xyz"
    base = ["export", "--openmm", tmp_path / "m.pt", "-o", tmp_path / "om.pt"]
    for empty in ("", " "):
        _refused(capsys, base + ["--structure", structure, "--atoms", empty],
                 [f"--atoms is empty ({empty!r}); give 0-based atoms such as 0-21,30, or leave it out"], tmp_path)
    _refused(capsys, base + ["--atoms", ""], ["--atoms is empty"], tmp_path)
    _refused(capsys, base + ["--structure", structure, "--atoms", "0-3,2"],
             ["--atoms: atom 2 is given twice; each atom once"], tmp_path)


# ---------------------------------------------------------------------------------- md options that do nothing
@pytest.mark.parametrize("extra, fragments", [
    (["--friction", "5"], ["--friction sets the Langevin thermostat's friction, but --ensemble was not given, so "
                           "it has no effect (the default ensemble, nve, has no thermostat): add --ensemble "
                           "langevin, or leave --friction out"]),
    (["--tau", "50"], ["--tau sets the Bussi / Nosé–Hoover thermostat's time constant", "add --ensemble bussi"]),
    (["--chain-length", "4"], ["--chain-length sets the Nosé–Hoover chain", "add --ensemble nose-hoover"]),
    (["--barostat-tau", "500"], ["--barostat-tau sets the barostat's time constant, but --pressure was not given, "
                                 "so it has no effect (the volume stays constant): add --pressure BAR"]),
    (["--barostat", "anisotropic"], ["--barostat sets the barostat's kind, but --pressure was not given"]),
    (["--config", "f.yaml"], ["config key 'md.friction' in f.yaml sets the Langevin thermostat's friction"]),
])
def test_md_thermostat_options_without_their_ensemble_are_refused(tmp_path, capsys, monkeypatch, extra, fragments):
    """``--friction 5`` or ``--tau 100`` without ``--ensemble`` ran the default nve, no thermostat, without a
    word; ``--barostat-tau`` without ``--pressure`` ran at constant volume."""
    monkeypatch.chdir(tmp_path)
    _argon(tmp_path)
    _lj(tmp_path)
    (tmp_path / "f.yaml").write_text("md:\n  friction: 5\n")
    _refused(capsys, ["md", "ar.xyz", "--model", "lj.pt", "--steps", "2", "--out", "o/t.extxyz", "--no-progress",
                      *extra], fragments, tmp_path)


def test_md_thermostat_options_with_an_ensemble_given_are_taken(tmp_path):
    """An explicit ensemble (or pressure) is taken as meant: a script passing one set of options to every
    ensemble (tests/test_md_cli.py does) runs as before."""
    from torchmdx.md.config import md_config

    for values in ({"ensemble": "nve", "friction": 5.0, "tau": 50.0}, {"ensemble": "langevin", "friction": 5.0},
                   {"ensemble": "bussi", "friction": 5.0, "tau": 50.0, "chain_length": 4},
                   {"pressure": None, "barostat_tau": 500.0}, {"engine": "ase", "pressure": 1.0, "barostat_tau": 500.0,
                                                               "ensemble": "langevin"}):
        md_config(values)
    with pytest.raises(ConfigError, match=r"config key 'md\.tau' sets"):
        md_config({"tau": 50.0})
