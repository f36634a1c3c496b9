"""Bad inputs, round 9: nothing lost, nothing silent.

Tracebacks (an npz energy of shape (): ``len() of unsized object``; a QM9 database whose metadata
gives a unit that is not text: ``'int' object has no attribute 'strip'``), silent garbage (a QM9
database's NaN or 2-D atomrefs table; two QM9 xyz files of one molecule; the native MD engine
moving atoms a ``FixAtoms`` constraint holds while the trajectory, written through ASE, shows them
fixed) and messages that named the wrong thing (a NaN mass as "the temperature reached nan K", a
QM9 file announcing 0 atoms as "coordinates have shape (0,)", an ANI-1x group without atoms as
conformations "without energy / forces", md's cutoff-vs-box line without the file).

Table rows: a setup ``(tmp_path, shared_data) -> CLI arguments`` and the fragments the one
``error:`` line must hold; every file under ``tmp_path`` must come out unchanged (caches go to a
folder beside it). Tests of behaviour follow.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from ase.io import read

from test_bad_inputs_more import _ethanol, refused_without_writes
from test_bad_inputs_round7 import _cache
from test_bad_inputs_round8 import _argon_restart, _ethanol_frames, _md

QM9_DB = ("qm9", "qm9_20.db")


def _info(t, path, *options):
    return ["data", "info", path, "--cache-dir", _cache(t), *options]


# ---------------------------------------------------------------------------------- npz
def npz_energy_of_shape_nothing(t, s):
    arrays = _ethanol(s, frames=1)
    np.savez(t / "e0.npz", R=arrays["R"], z=arrays["z"], E=np.float64(arrays["E"].ravel()[0]), F=arrays["F"])
    return _info(t, t / "e0.npz")


# ---------------------------------------------------------------------------------- empty paths
def _npz_config(t, s, **data):
    import yaml

    np.savez(t / "ethanol.npz", **_ethanol(s, frames=20))
    config = {"data": {"path": str(t / "ethanol.npz"), "cache_dir": str(_cache(t)), **data},
              "run_dir": str(t / "run")}
    (t / "config.yaml").write_text(yaml.safe_dump(config))
    return t / "config.yaml"


def data_info_empty_path(t, s):  # ". cannot guess the format of this folder"
    return ["data", "info", "", "--cache-dir", _cache(t)]


def data_prepare_empty_cache_dir(t, s):  # built the cache in data/cache, silently
    np.savez(t / "ethanol.npz", **_ethanol(s, frames=5))
    return ["data", "prepare", t / "ethanol.npz", "--cache-dir", ""]


def evaluate_empty_data(t, s):  # ". cannot guess the format of this folder"
    return ["evaluate", "model.pt", "--data", "", "--out", t / "report"]


def evaluate_empty_cache_dir(t, s):  # the cache in data/cache, silently
    np.savez(t / "ethanol.npz", **_ethanol(s, frames=5))
    return ["evaluate", "model.pt", "--data", t / "ethanol.npz", "--cache-dir", "", "--out", t / "report"]


def train_empty_data_path(t, s):
    return ["train", _npz_config(t, s, path="")]


def prepare_config_empty_cache_dir(t, s):  # a cache file written into the working folder
    return ["data", "prepare", _npz_config(t, s, cache_dir="")]


def train_blank_split_file(t, s):
    return ["train", _npz_config(t, s, split_file=" ")]


# ---------------------------------------------------------------------------------- QM9
def _qm9_db(t, s, change, name="meta.db"):
    from ase.db import connect

    shutil.copy(s.joinpath(*QM9_DB), t / name)
    db = connect(t / name)
    meta = dict(db.metadata)
    change(meta)
    db.metadata = meta
    return t / name


def _qm9_xyz_text(row, gdb_id, natoms=None):
    """One molecule of the QM9 database ``row`` in the original xyz layout."""
    from ase.data import chemical_symbols

    from torchmdx.data.qm9 import QM9_NAMES

    values = {**row.key_value_pairs, **(row.data or {})}
    lines = [str(len(row.numbers) if natoms is None else natoms),
             f"gdb {gdb_id} " + " ".join(f"{float(np.ravel(values[n])[0]):.6f}" for n in QM9_NAMES)]
    lines += [f"{chemical_symbols[z]} {x:.6f} {y:.6f} {w:.6f} 0.0" for z, (x, y, w) in zip(row.numbers, row.positions)]
    return "\n".join(lines + ["1.0 2.0 3.0", "C C", "InChI=1S/C InChI=1S/C"]) + "\n"


def _qm9_folder(t, s, molecules=3, natoms=None, ids=None):
    """A folder of QM9 xyz files; ``natoms`` replaces the second file's atom count, ``ids`` the gdb ids."""
    from ase.db import connect

    folder = t / "qm9"
    folder.mkdir()
    rows = list(connect(s.joinpath(*QM9_DB)).select(limit=molecules))
    for k, row in enumerate(rows):
        gdb_id = ids[k] if ids else k + 1
        (folder / f"dsgdb9nsd_{k + 1:06d}.xyz").write_text(_qm9_xyz_text(row, gdb_id, natoms if k == 1 else None))
    return folder


def qm9_db_distance_unit_not_text(t, s):
    return _info(t, _qm9_db(t, s, lambda m: m.__setitem__("_distance_unit", 5)), "--format", "qm9")


def qm9_db_property_unit_not_text(t, s):
    return _info(t, _qm9_db(t, s, lambda m: m["_property_unit_dict"].__setitem__("energy_U0", ["Ha"])),
                 "--format", "qm9")


def qm9_db_atomrefs_nan(t, s):
    return _info(t, _qm9_db(t, s, lambda m: m["atomrefs"].__setitem__("energy_U0", [float("nan")] * 10)),
                 "--format", "qm9")


def qm9_db_atomrefs_two_columns(t, s):
    return _info(t, _qm9_db(t, s, lambda m: m["atomrefs"].__setitem__("energy_U0", [[1.0, 2.0]] * 10)),
                 "--format", "qm9")


def qm9_db_atomrefs_text(t, s):
    return _info(t, _qm9_db(t, s, lambda m: m["atomrefs"].__setitem__("energy_U0", ["a"] * 10)), "--format", "qm9")


def qm9_xyz_zero_atoms(t, s):
    return _info(t, _qm9_folder(t, s, natoms=0), "--format", "qm9")


def qm9_xyz_negative_atoms(t, s):
    return _info(t, _qm9_folder(t, s, natoms=-3), "--format", "qm9")


def qm9_xyz_same_molecule_twice(t, s):
    return _info(t, _qm9_folder(t, s, ids=[1, 2, 1]), "--format", "qm9")


# ---------------------------------------------------------------------------------- ANI
def ani1x_group_without_atoms(t, s):
    import h5py

    shutil.copy(s / "ani" / "ani1x_xtb.h5", t / "x.h5")
    with h5py.File(t / "x.h5", "a") as h5:
        group = h5[sorted(h5.keys())[0]]
        for key in ("atomic_numbers", "coordinates", "gfn2xtb.forces"):
            data = group[key][()]
            del group[key]
            group[key] = data[:, :0] if data.ndim > 1 else data[:0]
    return _info(t, t / "x.h5", "--format", "ani1x", "--energy-key", "gfn2xtb.energy")


def ani1_format_on_a_folder(t, s):  # h5py's message spans two lines ("time = <ctime>\n, filename = ...")
    (t / "folder").mkdir()
    return _info(t, t / "folder", "--format", "ani1")


# ---------------------------------------------------------------------------------- md
def md_nan_mass(t, s):
    def change(k, atoms):
        masses = atoms.get_masses()
        masses[2] = np.nan
        atoms.set_masses(masses)
        return atoms

    return _md(t, s, structure=_ethanol_frames(t, s, frames=1, change=change))


def md_native_engine_with_fixed_atoms(t, s):
    from ase.constraints import FixAtoms

    def change(k, atoms):
        atoms.set_constraint(FixAtoms(indices=[0, 1]))
        return atoms

    return _md(t, s, "--index", ":", structure=_ethanol_frames(t, s, frames=2, change=change))


def md_box_narrower_than_the_cutoff_names_the_file(t, s):
    def change(k, atoms):
        if k == 1:
            atoms.set_cell([5.0, 5.0, 5.0])
            atoms.pbc = True
        return atoms

    return _md(t, s, "--index", ":", structure=_ethanol_frames(t, s, frames=2, change=change))


def _set_row(key, row, value):
    def change(payload):
        payload[key] = payload[key].clone()
        payload[key][row, 1] = value
    return change


def md_restart_nan_velocity(t, s):  # ran two steps, then "the simulation is exploding"
    return _argon_restart(t, _set_row("velocities", 3, float("nan")))


def md_restart_infinite_position(t, s):  # "atom 3 has a non-finite position" without the file
    return _argon_restart(t, _set_row("positions", 3, float("inf")))


def md_restart_velocities_of_fewer_atoms(t, s):  # RuntimeError: the size of tensor a (13) must match ...
    return _argon_restart(t, lambda payload: payload.update(velocities=payload["velocities"][:5]))


def md_restart_counts_not_numbers(t, s):
    return _argon_restart(t, lambda payload: payload.update(counts=["13"]))


CASES = [
    (data_info_empty_path, ["the data path is empty (''); give a data file or folder"]),
    (data_prepare_empty_cache_dir, ["--cache-dir is empty (''); give a folder, or leave it out"]),
    (evaluate_empty_data, ["--data is empty (''); give a data file, a folder or a YAML config"]),
    (evaluate_empty_cache_dir, ["--cache-dir is empty (''); give a folder"]),
    (train_empty_data_path, ["config key 'data.path' is empty (''); give a file or folder"]),
    (prepare_config_empty_cache_dir, ["config key 'data.cache_dir' is empty (''); give a folder"]),
    (train_blank_split_file, ["config key 'data.split_file' is empty (' '); give a split file (.npz), or leave it out"]),
    (npz_energy_of_shape_nothing, ["e0.npz: E has shape () but R has 1 frames; expected (1,) or (1, 1)"]),
    (qm9_db_distance_unit_not_text, ["meta.db: metadata '_distance_unit' must be a unit name (text), got 5"]),
    (qm9_db_property_unit_not_text, ["meta.db: metadata '_property_unit_dict.energy_U0' must be a unit name (text), "
                                     "got ['Ha']"]),
    (qm9_db_atomrefs_nan, ["meta.db: metadata 'atomrefs.energy_U0' holds the non-finite value nan for Z=0"]),
    (qm9_db_atomrefs_two_columns, ["meta.db: metadata 'atomrefs.energy_U0' has shape (10, 2); expected one number "
                                   "per atomic number 0..118"]),
    (qm9_db_atomrefs_text, ["meta.db: metadata 'atomrefs.energy_U0' must be a list of numbers"]),
    (qm9_xyz_zero_atoms, ["dsgdb9nsd_000002.xyz: line 1: announces 0 atoms; a QM9 molecule has at least one"]),
    (qm9_xyz_negative_atoms, ["dsgdb9nsd_000002.xyz: line 1: announces -3 atoms"]),
    (qm9_xyz_same_molecule_twice, ["dsgdb9nsd_000003.xyz: gdb id 1 is also the id of", "dsgdb9nsd_000001.xyz",
                                   "each QM9 molecule must appear once"]),
    (ani1x_group_without_atoms, ["x.h5:/", ": no atoms (the atomic numbers / species dataset is empty)"]),
    (ani1_format_on_a_folder, ["folder: is a folder, not an HDF5 file"]),
    (md_nan_mass, ["frames.extxyz: atom 2 (O) has mass nan amu; masses must be finite and positive"]),
    (md_native_engine_with_fixed_atoms, ["frames.extxyz frame 0: holds constraints (FixAtoms) that the native "
                                         "engine does not apply; run it with --engine ase"]),
    (md_box_narrower_than_the_cutoff_names_the_file, ["frames.extxyz frame 1: cutoff 4 Å is larger than half the "
                                                      "perpendicular width of the periodic box"]),
    (md_restart_nan_velocity, ["edited.restart.pt: its 'velocities' of atom 3 is not finite (", "nan",
                               "the restart file was changed after torchmdx wrote it"]),
    (md_restart_infinite_position, ["edited.restart.pt: its 'positions' of atom 3 is not finite (", "inf"]),
    (md_restart_velocities_of_fewer_atoms, ["edited.restart.pt: its 'velocities' has shape (5, 3), expected (13, 3) "
                                            "for its 13 atoms"]),
    (md_restart_counts_not_numbers, ["edited.restart.pt: its atom counts ['13'] are not one whole number >= 1 per "
                                     "structure (1)"]),
]


@pytest.mark.parametrize("setup, fragments", CASES, ids=[c[0].__name__ for c in CASES])
def test_refused_with_one_line_and_nothing_written(tmp_path, shared_data, capsys, monkeypatch, setup, fragments):
    refused_without_writes(tmp_path, shared_data, capsys, monkeypatch, setup, fragments)


# ---------------------------------------------------------------------------------- behaviour
def test_qm9_folder_skips_a_subfolder_named_xyz(tmp_path, shared_data):
    """A folder ``x.xyz`` inside a QM9 xyz folder was opened as a file (IsADirectoryError); it is
    skipped like any other entry that is not a molecule file."""
    from torchmdx.data import read_structures

    folder = _qm9_folder(tmp_path, shared_data)
    (folder / "extra.xyz").mkdir()
    st = read_structures(folder, format="qm9")
    from ase.db import connect

    rows = list(connect(shared_data.joinpath(*QM9_DB)).select(limit=3))
    assert len(st) == 3 and len(st.z) == sum(len(r.numbers) for r in rows)


def test_md_system_refuses_a_nan_mass_naming_the_structure_and_atom():
    """``System.from_atoms`` (the Python API below the CLI) let a NaN mass through ``masses <= 0``."""
    from ase import Atoms

    from torchmdx.errors import DataError
    from torchmdx.md.system import System

    good = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    bad = Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]], masses=[16.0, np.nan])
    with pytest.raises(DataError, match=r"^structure 1: atom 1 has mass nan amu; masses must be finite and positive$"):
        System.from_atoms([good, bad])


def test_md_with_fixed_atoms_runs_with_the_ase_engine(tmp_path, shared_data):
    """The refusal points at a way that works: ASE's engine keeps the fixed atoms in place."""
    from ase.constraints import FixAtoms

    from torchmdx.cli.main import main

    def change(k, atoms):
        atoms.set_constraint(FixAtoms(indices=[0, 1]))
        return atoms

    structure = _ethanol_frames(tmp_path, shared_data, frames=1, change=change)
    args = _md(tmp_path, shared_data, "--engine", "ase", "--ensemble", "nve", "--every", "1", structure=structure)
    assert main([str(a) for a in args]) == 0
    first, last = read(tmp_path / "md.extxyz", index=0), read(tmp_path / "md.extxyz", index=-1)
    assert np.array_equal(first.positions[:2], last.positions[:2])
    assert np.abs(first.positions[2:] - last.positions[2:]).max() > 0


# ---------------------------------------------------------------------------------- data API
@pytest.fixture
def ethanol_dataset(tmp_path, shared_data):
    from torchmdx.data import H5Dataset, build_cache

    np.savez(tmp_path / "ethanol.npz", **_ethanol(shared_data, frames=6))
    return H5Dataset(build_cache(tmp_path / "ethanol.npz", cache_dir=tmp_path / "cache"))


@pytest.mark.parametrize("size, seed, message", [
    (float("nan"), 0, "split: train size must not be negative or NaN, got nan"),  # int(nan): ValueError
    (3, -1, "split: seed must be a whole number in 0..4294967295, got -1"),  # numpy's ValueError
    (3, 1.5, "split: seed must be a whole number in 0..4294967295, got 1.5"),
])
def test_split_nan_size_and_bad_seed_are_one_line(size, seed, message):
    import re

    from torchmdx.data.splits import group_split, random_split
    from torchmdx.errors import DataError

    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        random_split(6, size, 1, 1, seed=seed)
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        group_split(["a", "b", "c", "a", "b", "c"], size, 1, None, seed=seed)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_loaders_refuse_batch_sizes_that_are_not_counts(ethanol_dataset, batch_size):
    """0 was a ZeroDivisionError on iteration, -1 "__len__() should return >= 0", 2.5 batches of 2."""
    from torchmdx.data import BatchLoader, batches_in_order
    from torchmdx.errors import DataError

    message = rf"^batch size must be a whole number >= 1, got {batch_size!r}$".replace(".", r"\.")
    with pytest.raises(DataError, match=message):
        BatchLoader(ethanol_dataset, batch_size)
    with pytest.raises(DataError, match=message):
        list(batches_in_order(ethanol_dataset, [0, 1], batch_size))


@pytest.mark.parametrize("index", [-1, 6, 100])
def test_structure_indices_outside_the_dataset_are_one_line(ethanol_dataset, index):
    """-1 gathered atoms of the wrong structures ("index 54 is out of bounds") or, for the
    reference fit, silently the last structure; past the end numpy's IndexError."""
    from torchmdx.data import batches_in_order, energy_statistics, fit_atomic_references
    from torchmdx.errors import DataError

    message = rf"ethanol\.npz: structure index {index} is outside 0\.\.5 \(the dataset's 6 structures\)$"
    with pytest.raises(DataError, match=message):
        list(batches_in_order(ethanol_dataset, [0, index], 4))
    with pytest.raises(DataError, match=message):
        fit_atomic_references(ethanol_dataset, [0, 1, index], max_z=10)
    with pytest.raises(DataError, match=message):
        energy_statistics(ethanol_dataset, [0, index])


def test_indices_inside_the_dataset_still_batch_and_fit(ethanol_dataset):
    """The checks refuse nothing valid: the last structure by its index gathers its own atoms."""
    from torchmdx.data import batches_in_order, fit_atomic_references

    batch = next(iter(batches_in_order(ethanol_dataset, [5, 0], 2)))
    assert batch.idx.tolist() == [5, 0]
    assert torch_equal(batch.pos[:9], ethanol_dataset[5].pos)
    assert fit_atomic_references(ethanol_dataset, [0, 1, 2, 5], max_z=10).shape == (10,)


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


# ---------------------------------------------------------------------------------- models
TINY = {"embedding_dimension": 8, "num_layers": 1, "num_heads": 2, "num_rbf": 4, "cutoff_upper": 4.0,
        "backend": "torch", "seed": 0}


@pytest.mark.parametrize("dtype", ["int64", "bool"])
def test_model_file_with_integer_weights_is_refused(tmp_path, dtype):
    """A weight stored as integers was copied into the float parameter without a word: the small
    weights truncated to 0, a model of zero energies and forces."""
    import torch

    import torchmdx
    from torchmdx.errors import ModelError

    model = torchmdx.build_model(TINY)
    model.set_normalisation(elements=[1, 6, 8])
    model.save(tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["state_dict"]["head.mlp.0.weight"] = payload["state_dict"]["head.mlp.0.weight"].to(getattr(torch, dtype))
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(ModelError, match=rf"edited\.pt: weight 'head\.mlp\.0\.weight' is {dtype}, expected "
                                         r"floating-point numbers \(damaged or edited\?\)$"):
        torchmdx.load_model(tmp_path / "edited.pt")
    assert torchmdx.load_model(tmp_path / "m.pt").elements == [1, 6, 8]  # the file as written still loads


@pytest.mark.parametrize("arguments, message", [
    ({"scale": 0.0}, "scale must be a finite number > 0 (eV), got 0.0"),  # every energy and force 0
    ({"scale": -1.0}, "scale must be a finite number > 0 (eV), got -1.0"),  # energies of the wrong sign
    ({"scale": float("nan")}, "scale must be a finite number > 0 (eV), got nan"),
    ({"scale": "2"}, "scale must be a finite number > 0 (eV), got '2'"),
    ({"shift": float("inf")}, "shift must be a finite number (eV), got inf"),
    ({"energy_offset": float("nan")}, "energy_offset must be a finite number (eV), got nan"),
    ({"atomref": {1: float("nan")}}, "atomref[1] must be a finite number (eV), got nan"),
    ({"atomref": [0.0, float("nan")]}, "atomref[1] must be a finite energy (eV), got nan"),
    ({"atomref": {1.5: -13.6}}, "atomref: atomic number 1.5 is not a whole number"),  # was hydrogen
    ({"atomref": "abc"}, "atomref: expected {Z: energy} or a list of energies indexed by Z, got abc"),
    ({"elements": [6.7, 1]}, "elements: atomic number 6.7 is not a whole number"),  # was carbon
    ({"elements": []}, "elements: the list is empty; give the atomic numbers the model was trained on"),
])
def test_set_normalisation_refuses_values_that_make_garbage(arguments, message):
    import re

    import torchmdx
    from torchmdx.errors import ModelError

    model = torchmdx.build_model(TINY)
    with pytest.raises(ModelError, match=f"^{re.escape(message)}$"):
        model.set_normalisation(**arguments)


def test_set_normalisation_takes_numpy_torch_and_whole_floats():
    import torch

    import torchmdx

    model = torchmdx.build_model(TINY)
    model.set_normalisation(scale=np.float32(2.0), shift=torch.tensor(0.5), atomref={"6": -1.0, np.int64(1): -0.5},
                            elements=np.array([8, 1, 6.0]))
    assert model.elements == [1, 6, 8] and float(model.scale) == 2.0 and float(model.shift) == 0.5
    assert float(model.atomref[6]) == -1.0 and float(model.atomref[1]) == -0.5
