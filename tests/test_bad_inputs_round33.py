"""Bad inputs, round 33 (branch bad33): round 32's leftovers (unit names checked when the config is read, evaluate
read-only on the run folder), then new inputs; see docs/bad_inputs.md, round 33.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import yaml

from bad_inputs_common import refused_exactly, tiny_model, water_npz
from test_bad_inputs_round9 import TINY


def _config(folder, **data):
    water_npz(folder)
    config = folder / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"path": "e.npz", "train_size": 12, "val_size": 4, **data},
                                      "model": dict(TINY), "trainer": {"max_epochs": 1}}))
    return config


# ------------------------------------------------------------------------------ unit names as the config is read
@pytest.mark.parametrize("argv, line", [
    (["train", "c.yaml", "--set", "data.energy_unit=foo"],
     "error: config key 'data.energy_unit': unknown energy unit 'foo'; known: eh, ev, ha, hartree, kcal/mol, kj/mol, "
     "mev, ry, rydberg"),
    (["train", "c.yaml", "--set", "data.length_unit=parsec"],
     "error: config key 'data.length_unit': unknown length unit 'parsec'; known: a, a0, ang, angstrom, bohr, nm, å"),
    (["train", "c.yaml", "--set", "data.energy_unit=MeV"],
     "error: config key 'data.energy_unit': energy unit 'MeV' is ambiguous: milli-electronvolt is 'meV' "
     "(mega-electronvolts are not a unit of molecular data)"),
    (["data", "prepare", "e.npz", "--energy-unit", "foo"],
     "error: --energy-unit: unknown energy unit 'foo'; known: eh, ev, ha, hartree, kcal/mol, kj/mol, mev, ry, "
     "rydberg"),
    (["data", "prepare", "c.yaml", "--length-unit", "foo"],
     "error: --length-unit: unknown length unit 'foo'; known: a, a0, ang, angstrom, bohr, nm, å"),
])
def test_unit_names_checked_before_anything_is_made(tmp_path, capsys, monkeypatch, argv, line):
    """Were refused when the data file was read ("e.npz: unknown energy unit 'foo'"), after an empty data/cache
    folder had been made in the working folder (round 32's leftover)."""
    monkeypatch.chdir(tmp_path)
    _config(tmp_path)
    refused_exactly(capsys, argv, line, tmp_path)
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------------------ evaluate --run is read-only
def _stamps(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_evaluate_does_not_write_into_the_run_folder(tmp_path, capsys, monkeypatch):
    """``evaluate --run RUN`` rewrote ``RUN/data_state.json`` when it set up the data, also when it then refused."""
    from torchmdx.cli.main import main
    from torchmdx.data.splits import Split, save_split

    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    water_npz(work)
    tiny_model().save(work / "m.pt")
    run = tmp_path / "run"
    run.mkdir()
    save_split(Split(np.arange(12), np.array([], int), np.arange(12, 20), 20), run / "splits.npz")
    (run / "data_state.json").write_text('{"key": "an earlier one"}')
    past = 1_000_000_000_000_000_000
    for path in run.iterdir():
        os.utime(path, ns=(past, past))
    before = _stamps(run)
    cache = tmp_path / "cache"
    argv = ["evaluate", work / "m.pt", "--data", work / "e.npz", "--run", run, "--allow-other-run", "--cache-dir",
            cache, "--no-progress"]
    assert main([str(a) for a in argv + ["--split", "test", "--out", tmp_path / "o"]]) == 0
    assert _stamps(run) == before
    capsys.readouterr()
    refused_exactly(capsys, argv + ["--split", "val", "--out", tmp_path / "o2"],
                    f"error: {work}/e.npz: the val split is empty: the run's {run}/splits.npz splits its 20 structures "
                    "into train 12, val 0, test 8; choose --split test, train or all", run)
    assert _stamps(run) == before


# ------------------------------------------------------------------------------ an ASE database of bare structures
def test_database_of_bare_structures_says_label_them(tmp_path, capsys, monkeypatch):
    """Rows without keys, data or a calculator said "set config key 'data.energy_key' (--energy-key) to the key that
    holds the energies", a key no row has (an extxyz of bare structures has said "label them first" since round 23)."""
    from ase.db import connect

    from bad_inputs_common import water

    monkeypatch.chdir(tmp_path)
    with connect(tmp_path / "s.db") as db:
        for _ in range(2):
            db.write(water())
    refused_exactly(capsys, ["data", "info", "s.db"],
                    "error: s.db: row 1: no energy 'energy' (keys: none; data: none); the file holds structures without "
                    "energies: label them first (e.g. torchmdx label s.db -o labelled.extxyz), or give a file with "
                    "reference energies", tmp_path)


# ------------------------------------------------------------------------------ writing under a file, or to 'x/'
def test_writers_under_a_file_and_split_to_a_folder_name(tmp_path):
    """``Potential.save('afile/m.pt')`` (and save_split, a data module's run folder that is a file) was
    "FileExistsError: [Errno 17] File exists: 'afile'"; ``save_split(split, 'x/')`` wrote a file named x."""
    from torchmdx.data import TorchmdxDataModule, random_split, save_split
    from torchmdx.errors import ConfigError
    from torchmdx.nn.analytic import LennardJones

    (tmp_path / "afile").write_text("x")
    line = f"{tmp_path}/afile/m.pt: {tmp_path}/afile is a file, not a folder, so nothing can be written under it; " \
           "give a path in a folder"
    with pytest.raises(ConfigError) as info:
        LennardJones(0.0104, 3.4).save(tmp_path / "afile" / "m.pt")
    assert str(info.value) == line
    with pytest.raises(ConfigError, match="afile is a file, not a folder"):
        save_split(random_split(10), tmp_path / "afile" / "s.npz")
    module = TorchmdxDataModule({"path": str(water_npz(tmp_path)), "cache_dir": str(tmp_path / "cache")},
                                run_dir=tmp_path / "afile")
    with pytest.raises(ConfigError, match="splits.npz: .*afile is a file, not a folder"):
        module.setup()
    with pytest.raises(ConfigError) as info:
        save_split(random_split(10), f"{tmp_path}/x/")
    assert str(info.value) == f"{tmp_path}/x/: ends in '/', so it names a folder; give the name of a file to write"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "cache", "e.npz"]


# ------------------------------------------------------------------------------ a boolean mask as structure indices
def test_boolean_mask_as_indices_selects_what_it_marks(tmp_path):
    """``fit_atomic_references(dataset, mask)``, ``batches_in_order(dataset, mask, n)``, ``BatchLoader(...,
    indices=mask)``, ``predict(model, dataset, mask)`` and ``elements_without_reference`` cast the mask to 0 and 1:
    structures 0 and 1 over and over, without a word; 2.7 was structure 2, and BatchLoader's index -1 the last
    structure."""
    from torchmdx.data import BatchLoader, H5Dataset, batches_in_order, build_cache, fit_atomic_references
    from torchmdx.errors import DataError

    dataset = H5Dataset(build_cache(water_npz(tmp_path), cache_dir=tmp_path / "cache"))
    mask = np.zeros(20, bool)
    mask[12:] = True
    assert fit_atomic_references(dataset, mask, 10).tolist() == fit_atomic_references(dataset, np.arange(12, 20),
                                                                                      10).tolist()
    assert [b.idx.tolist() for b in batches_in_order(dataset, mask, 5)] == [[12, 13, 14, 15, 16], [17, 18, 19]]
    assert [b.idx.tolist() for b in BatchLoader(dataset, 8, False, indices=mask)] == [list(range(12, 20))]
    from torchmdx.data.atomref import elements_without_reference
    from torchmdx.nn.analytic import LennardJones
    from torchmdx.train.evaluate import predict

    assert predict(LennardJones(0.0104, 3.4), dataset, mask)["indices"].tolist() == list(range(12, 20))
    assert elements_without_reference(dataset, mask, 10) == []
    with pytest.raises(DataError) as info:
        fit_atomic_references(dataset, mask[:5], 10)
    assert str(info.value).endswith("e.npz: a boolean mask of 5 entries for 20 structures; give one entry per "
                                    "structure, or the structure indices (np.flatnonzero(mask))")
    with pytest.raises(DataError) as info:
        list(batches_in_order(dataset, [2.7, 3.0], 2))
    assert str(info.value) == "batches_in_order: structure indices must be whole numbers, got 2.7 (float64 values)"
    with pytest.raises(DataError) as info:
        BatchLoader(dataset, 4, False, indices=[-1])
    assert str(info.value) == "BatchLoader: indices: index -1 is outside 0..19 (the dataset's 20 structures)"


# ------------------------------------------------------------------------------ a command that decompresses
@pytest.mark.parametrize("name, packer, advice", [
    ("w.db", "gzip", "w.db: is a gzip-compressed ASE database, which torchmdx reads uncompressed; decompress it first "
                     "(gunzip -c w.db > w-decompressed.db)"),
    ("w.db.gz", "gzip", "w.db.gz: is a gzip-compressed ASE database, which torchmdx reads uncompressed; decompress it "
                        "first (gunzip w.db.gz)"),  # the name gunzip takes: as before
    ("w.db", "bz2", "w.db: is a bzip2-compressed ASE database, which torchmdx reads uncompressed; decompress it first "
                    "(bunzip2 -c w.db > w-decompressed.db)"),
    ("w.traj", "gzip", "w.traj: is gzip-compressed, and .traj files are read uncompressed; decompress it first "
                       "(gunzip -c w.traj > w-decompressed.traj)"),
])
def test_compressed_file_advice_is_a_command_that_runs(tmp_path, capsys, monkeypatch, name, packer, advice):
    """A compressed database, trajectory, npz or HDF5 file whose name lacks the compressor's suffix was told to
    "decompress it first (gunzip w.db)": gunzip says "unknown suffix -- ignored" (unxz and unzstd too; bunzip2
    writes w.db.out); a .traj got only "(gunzip)"."""
    import bz2
    import gzip

    from ase.db import connect
    from ase.io import write

    from bad_inputs_common import water

    monkeypatch.chdir(tmp_path)
    plain = tmp_path / "plain"
    if ".db" in name:
        with connect(plain.with_suffix(".db")) as db:
            db.write(water())
        plain = plain.with_suffix(".db")
    else:
        write(plain.with_suffix(".traj"), water())
        plain = plain.with_suffix(".traj")
    (tmp_path / name).write_bytes({"gzip": gzip.compress, "bz2": bz2.compress}[packer](plain.read_bytes()))
    refused_exactly(capsys, ["data", "info", name], f"error: {advice}", tmp_path)


# ------------------------------------------------------------------------------ periodic data for GATr / transformer
GATR = {"architecture": "gatr", "channels": 2, "scalar_channels": 2, "num_layers": 1, "num_heads": 1, "num_rbf": 4,
        "cutoff_upper": 4.0}


def test_periodic_data_for_a_molecules_only_model_names_the_structure(tmp_path, capsys, monkeypatch):
    """train, evaluate and md with a GATr (or transformer) model on periodic structures said "model architecture
    'gatr' handles non-periodic structures only (molecules, clusters); this input has a periodic cell", naming
    neither the file nor the structure."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    import torchmdx
    from bad_inputs_common import water

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    frames = []
    for i in range(10):
        atoms = water()
        atoms.positions += rng.normal(0, 0.03, (3, 3))
        if i >= 2:
            atoms.cell, atoms.pbc = [12, 12, 12], True
        atoms.calc = SinglePointCalculator(atoms, energy=float(rng.normal()), forces=rng.normal(0, 1, (3, 3)))
        frames.append(atoms)
    write(tmp_path / "w.extxyz", frames)
    model = torchmdx.build_model(GATR)
    model.set_normalisation(elements=[1, 8])
    model.save(tmp_path / "gatr.pt")
    cache = tmp_path.parent / f"{tmp_path.name}_cache"  # the cache is built before the cells are looked at
    tail = ("is periodic (pbc [True, True, True]), and model architecture 'gatr' handles non-periodic structures only "
            "(molecules, clusters); periodic data need a model of architecture et or equiformer")
    refused_exactly(capsys, ["evaluate", "gatr.pt", "--data", "w.extxyz", "--cache-dir", cache, "--out", "ev"],
                    f"error: w.extxyz: structure 2 {tail}", tmp_path)
    refused_exactly(capsys, ["md", "w.extxyz", "--model", "gatr.pt", "--index", "3", "--steps", "2", "--out",
                             "t.extxyz"], f"error: w.extxyz {tail}", tmp_path)
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({"data": {"path": "w.extxyz", "train_size": 6, "val_size": 2,
                                                               "cache_dir": str(cache)},
                                                      "model": GATR, "trainer": {"max_epochs": 1}, "run_dir": "run"}))
    refused_exactly(capsys, ["train", "g.yaml"], f"error: w.extxyz: structure 2 {tail}", tmp_path)
