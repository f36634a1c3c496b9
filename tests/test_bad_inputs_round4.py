"""Bad inputs, round 4 (docs/bad_inputs.md, "Round 4"): nothing lost, nothing silent.

ASE-format energies/forces checked like the other readers (naming the frame or row), caches
that no longer match their source or their own checksums, ``md --restart`` with another
``--atom-order``, ``--grid`` values holding commas, an empty slmc config, slmc lattices too large
for the machine, and atoms on top of each other through a periodic cell.

Table rows: a setup ``(tmp_path, shared_data) -> CLI arguments`` and the fragments the one
``error:`` line must hold; every file under ``tmp_path`` must come out unchanged. Each row was a
traceback, silently accepted, or named only "structure k" before. Tests of behaviour follow.
"""

from __future__ import annotations

import itertools
import os
import shutil

import numpy as np
import pytest
import yaml

from torchmdx.cli.main import main

from test_bad_inputs_md import one_error_line, snapshot
from test_bad_inputs_more import ETHANOL, _config, _write_argon, refused_without_writes
from test_bad_inputs_round3 import _slmc_config

H2 = "2\nProperties=species:S:1:pos:R:3{columns} energy={energy}{info}\nH 0 0 0{f0}\nH 0.7 0 0{f1}\n"


def _extxyz(t, frames, name="frames.extxyz"):
    (t / name).write_text("".join(frames))
    return ["data", "info", t / name, "--cache-dir", t / "cache"]


def _frame(energy="-1.0", info="", forces=None):
    if forces is None:
        return H2.format(columns="", energy=energy, info=info, f0="", f1="")
    return H2.format(columns=":forces:R:3", energy=energy, info=info, f0=" " + forces[0], f1=" " + forces[1])


def _db(t, name="frames.db", energy_key="e", **columns):
    import ase
    import ase.db

    db = ase.db.connect(str(t / name))
    for k in range(2):
        db.write(ase.Atoms("H2", positions=[[0, 0, 0], [0.7 + 0.01 * k, 0, 0]]), **columns)
    return ["data", "info", t / name, "--cache-dir", t / "cache", "--energy-key", energy_key]


# ---------------------------------------------------------------------------------- ASE format
def extxyz_nan_energy_in_frame_1(t, s):
    # was 'non-finite energy (nan) in structure 1': the frame was named by the dataset check only
    return _extxyz(t, [_frame(), _frame("nan")])


def extxyz_inf_forces(t, s):
    return _extxyz(t, [_frame(forces=["0 0 0", "0 0 0"]), _frame(forces=["0 0 0", "0 inf 0"])])


def db_nan_forces(t, s):
    return _db(t, e=-1.0, data={"forces": np.full((2, 3), np.nan)})


def db_text_forces(t, s):
    # ASE's row.data raised TypeError ("data type 'str32' not understood"): a traceback
    return _db(t, e=-1.0, data={"forces": np.array([["a", "b", "c"], ["d", "e", "f"]])})


def traj_nan_energy(t, s):
    import ase
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    atoms = ase.Atoms("H2", positions=[[0, 0, 0], [0.7, 0, 0]])
    atoms.calc = SinglePointCalculator(atoms, energy=float("nan"))
    write(t / "frames.traj", atoms)
    return ["data", "info", t / "frames.traj", "--cache-dir", t / "cache"]


def db_text_stress(t, s):
    import ase
    import ase.db

    db = ase.db.connect(str(t / "frames.db"))
    atoms = ase.Atoms("H2", positions=[[0, 0, 0], [0.7, 0, 0]], cell=[5, 5, 5], pbc=True)
    db.write(atoms, e=-1.0, data={"stress": list("abcdef")})  # was "must have 6 (Voigt) or 9 components, got [.a. ..."
    return ["data", "info", t / "frames.db", "--cache-dir", t / "cache", "--energy-key", "e"]


# ---------------------------------------------------------------------------------- coincident atoms
def periodic_image_of_an_atom(t, s):
    # atom 2 sits on atom 0 shifted by one cell vector: the same site of the crystal (was accepted;
    # training then named 'atoms 0 and 2' of a batch, or the model gave an infinite energy)
    text = ('3\nLattice="4 0 0 0 4 0 0 0 4" Properties=species:S:1:pos:R:3 energy=-1.0 pbc="T T T"\n'
            "Ar 0 0 0\nAr 2 2 2\nAr 4 0 0\n")
    (t / "box.extxyz").write_text(text)
    return ["data", "info", t / "box.extxyz", "--cache-dir", t / "cache"]


def periodic_image_across_a_triclinic_corner(t, s):
    cell = np.array([[4.0, 0, 0], [1.0, 4.0, 0], [0.5, 0.7, 4.0]])
    pos = np.array([[0.1, 0.2, 0.3], [2.0, 2.0, 2.0], [0.1, 0.2, 0.3] - cell.sum(0) + [3e-6, 0, 0]])
    lattice = " ".join(f"{v:.17g}" for v in cell.ravel())
    rows = "".join(f"Ar {x:.17g} {y:.17g} {z:.17g}\n" for x, y, z in pos)
    (t / "box.extxyz").write_text(f'3\nLattice="{lattice}" Properties=species:S:1:pos:R:3 energy=-1.0 '
                                  f'pbc="T T T"\n{rows}')
    return ["data", "info", t / "box.extxyz", "--cache-dir", t / "cache"]


# ---------------------------------------------------------------------------------- caches
def damaged_cache_given_as_data(t, s):
    from torchmdx.data import build_cache

    shutil.copy(s.joinpath(*ETHANOL), t / "ethanol.npz")
    cache = build_cache(t / "ethanol.npz", cache_dir=t / "cache")
    _flip_byte(cache, "energy")
    return ["data", "info", cache]


def data_info_with_a_damaged_cache(t, s):
    # the cache's bytes read fine as HDF5 but a value changed: data info printed the wrong numbers
    from torchmdx.data import build_cache

    shutil.copy(s.joinpath(*ETHANOL), t / "ethanol.npz")
    _flip_byte(build_cache(t / "ethanol.npz", cache_dir=t / "cache"), "forces", at=77)
    return ["data", "info", t / "ethanol.npz", "--cache-dir", t / "cache"]


# ---------------------------------------------------------------------------------- sweep
def sweep_grid_unclosed_bracket(t, s):
    # '[16' and '32' were two values, '[16' kept as text
    return ["sweep", _config(t, s), "--grid", "model.embedding_dimension=[16,32", "--out", t / "sweep", "--dry-run"]


def sweep_grid_bad_flow_value(t, s):
    return ["sweep", _config(t, s), "--grid", "data.test_groups=[a: b: c],[d]", "--out", t / "sweep", "--dry-run"]


def sweep_grid_key_twice(t, s):
    # the second --grid of a key silently replaced the first: one point (max_epochs 3) instead of three
    return ["sweep", _config(t, s), "--grid", "trainer.max_epochs=1,2", "--grid", "trainer.max_epochs=3",
            "--out", t / "sweep", "--dry-run"]


def sweep_empty_out(t, s):
    # --out '' wrote the plan to sweeps/config/ instead
    return ["sweep", _config(t, s), "--grid", "model.num_layers=1,2", "--out", "", "--dry-run"]


# ---------------------------------------------------------------------------------- slmc
def slmc_empty_config(t, s):
    (t / "slmc.yaml").write_text("")  # ran the whole default study (L = 4, three transformers) silently
    return ["slmc", t / "slmc.yaml", "--run-dir", t / "run", "--no-progress"]


def slmc_config_without_lattice(t, s):
    (t / "slmc.yaml").write_text(yaml.safe_dump({"slmc": {"steps": 10}, "run_dir": str(t / "run")}))
    return ["slmc", t / "slmc.yaml", "--no-progress"]


def slmc_empty_run_dir(t, s):
    # run_dir '' wrote checkpoint.pt, data.csv, summary.json, ... into the working folder
    return ["slmc", _slmc_config(t), "--run-dir", "", "--no-progress"]


def slmc_more_chains_than_configurations(t, s):
    # refused only after the exact Monte Carlo had run (and written the run folder)
    return ["slmc", _slmc_config(t, slmc__chains=9), "--no-progress"]


def slmc_init_from_missing_folder(t, s):
    # refused only after the exact Monte Carlo and the linear model's SLMC run
    return ["slmc", _slmc_config(t, effective__init_from=str(t / "missing")), "--no-progress"]


def md_restart_with_replicas(t, s):
    from torchmdx.nn.analytic import LennardJones

    LennardJones(0.0104, 3.4).save(t / "lj.pt")
    assert main(["md", str(_write_argon(t)), "--model", str(t / "lj.pt"), "--steps", "4", "--no-progress",
                 "--out", str(t / "a.extxyz")]) == 0
    # --replicas 2 without a structure file was silently ignored: the file's one structure ran once
    return ["md", "--model", t / "lj.pt", "--steps", 8, "--no-progress", "--out", t / "a.extxyz",
            "--restart", t / "a.restart.pt", "--replicas", 2]


CASES = [
    (extxyz_nan_energy_in_frame_1, ["frames.extxyz: frame 1: non-finite energy (nan)"]),
    (extxyz_inf_forces, ["frames.extxyz: frame 1: non-finite forces 'forces' (inf) on atom 1"]),
    (db_nan_forces, ["frames.db: row 1: non-finite forces 'forces' (nan) on atom 0"]),
    (db_text_forces, ["frames.db: row 1: ASE cannot read the row's data (TypeError"]),
    (traj_nan_energy, ["frames.traj: frame 0: non-finite energy (nan)"]),
    (db_text_stress, ["frames.db: row 1: stress 'stress' must be real numbers, got text values"]),
    (periodic_image_of_an_atom, ["box.extxyz: atoms 0 and 2 of structure 0 are at the same position",
                                 "one is a periodic image of the other"]),
    (periodic_image_across_a_triclinic_corner, ["atoms 0 and 2 of structure 0 are at the same position",
                                                "periodic image"]),
    (damaged_cache_given_as_data, ["this cache is damaged (the values of dataset 'energy' do not match the "
                                   "checksum written with them"]),
    (data_info_with_a_damaged_cache, ["this cache is damaged (the values of dataset 'forces' do not match",
                                      "data prepare --force"]),
    (md_restart_with_replicas, ["--replicas 2 copies the structure files, and none is given:",
                                "a.restart.pt continues its own 1 structure(s)"]),
    (sweep_grid_unclosed_bracket, ["--grid 'model.embedding_dimension=[16,32'", "missing its closing ']'"]),
    (sweep_grid_bad_flow_value, ["value '[a: b: c]' is not valid YAML"]),
    (sweep_grid_key_twice, ["--grid 'trainer.max_epochs=3': key 'trainer.max_epochs' is given twice"]),
    (sweep_empty_out, ["--out is empty"]),
    (slmc_empty_config, ["slmc.yaml: no 'lattice' section"]),
    (slmc_config_without_lattice, ["slmc.yaml: no 'lattice' section"]),
    (slmc_empty_run_dir, ["config key 'run_dir' (or --run-dir) is empty"]),
    (slmc_more_chains_than_configurations, ["config key 'slmc.chains' is 9 but the exact run keeps only 8 "
                                            "configurations (data.chains 2 x data.sweeps 4 / data.every 1)"]),
    (slmc_init_from_missing_folder, ["config key 'effective.init_from':", "missing is not a folder"]),
]


@pytest.fixture(autouse=True)
def _fresh_cache_checks():
    """Caches verified by an earlier test are remembered per process: forget them."""
    from torchmdx.data import cache_file

    cache_file._VERIFIED.clear()
    yield
    cache_file._VERIFIED.clear()


@pytest.mark.parametrize("setup, fragments", CASES, ids=[c[0].__name__ for c in CASES])
def test_refused_with_one_line_and_nothing_written(tmp_path, shared_data, capsys, monkeypatch, setup, fragments):
    refused_without_writes(tmp_path, shared_data, capsys, monkeypatch, setup, fragments)


# ---------------------------------------------------------------------------------- 1. ASE energies
def test_ase_frames_with_finite_values_still_load(tmp_path):
    """The new checks refuse only non-finite values: forces and stress that are finite numbers
    load as before (the stress in eV/Å³ as a 3 x 3 extra)."""
    from torchmdx.data import read_structures

    frames = [_frame("-1.5", ' stress="0.1 0 0 0 0.2 0 0 0 0.3"', ["0.1 0 0", "-0.1 0 0"]),
              _frame("-1.25", ' stress="0.1 0 0 0 0.2 0 0 0 0.3"', ["0.2 0 0", "-0.2 0 0"])]
    periodic = 'Lattice="5 0 0 0 5 0 0 0 5" pbc="T T T" energy='
    (tmp_path / "ok.extxyz").write_text("".join(frames).replace("energy=", periodic))
    st = read_structures(tmp_path / "ok.extxyz")
    np.testing.assert_array_equal(st.energy, [-1.5, -1.25])
    np.testing.assert_array_equal(st.forces[:, 0], [0.1, -0.1, 0.2, -0.2])
    np.testing.assert_allclose(st.extras["stress"][0].reshape(3, 3), np.diag([0.1, 0.2, 0.3]))


# ---------------------------------------------------------------------------------- 7. coincident atoms
def _brute_force_pair(pos, offsets, cell, pbc, tol):
    """Every pair of every structure, minimum image through the nearest image (fractional
    rounding) and its 26 neighbours: the reference for coincident_atoms."""
    for s in range(len(offsets) - 1):
        periodic = pbc[s].any() and abs(np.linalg.det(cell[s])) > 1e-12
        shifts = [np.zeros(3)]
        if periodic:
            shifts = [np.array(n) @ cell[s] for n in itertools.product(*[(-1, 0, 1) if p else (0,) for p in pbc[s]])]
        for a in range(offsets[s], offsets[s + 1]):
            for b in range(a + 1, offsets[s + 1]):
                v = pos[b] - pos[a]
                if periodic:
                    f = v @ np.linalg.inv(cell[s])
                    v = np.where(pbc[s], f - np.round(f), f) @ cell[s]
                if min(np.linalg.norm(v + shift) for shift in shifts) < tol:
                    return a, b
    return None


def test_coincident_atoms_matches_brute_force_on_small_boxes():
    """Random batches of molecules and orthorhombic/triclinic boxes (periodic in some or all
    directions), atoms on faces and corners and given as images several cells away, pairs planted
    at 0.3-2 x the tolerance through random images: the sort-based check finds a pair exactly when
    the all-pairs reference does, and the pair it names is closer than the tolerance."""
    from torchmdx.data.structures import coincident_atoms

    rng = np.random.default_rng(1)
    tol = 1e-5
    found = 0
    for _ in range(600):
        counts = rng.integers(1, 10, rng.integers(1, 4))
        offsets = np.r_[0, np.cumsum(counts)]
        cell = np.zeros((len(counts), 3, 3))
        pbc = np.zeros((len(counts), 3), dtype=bool)
        pos = np.empty((offsets[-1], 3))
        for s, n in enumerate(counts):
            kind = rng.integers(0, 3)
            if kind:
                cell[s] = np.diag(rng.uniform(3, 6, 3)) + (kind == 2) * rng.uniform(-1.5, 1.5, (3, 3)) * (1 - np.eye(3))
                pbc[s] = rng.random(3) < 0.8
            frac = rng.random((n, 3))
            frac[rng.random((n, 3)) < 0.3] = rng.choice([0.0, 1.0 - 1e-9, 1e-9, 1.0])
            p = frac @ (cell[s] if kind else np.eye(3) * 5) + (rng.integers(-2, 3, (n, 3)) * pbc[s]) @ cell[s]
            if n >= 2 and rng.random() < 0.5:
                i, j = rng.choice(n, 2, replace=False)
                d = rng.normal(size=3)
                d *= rng.choice([0.3, 0.9, 0.99, 1.01, 2.0]) * tol / np.linalg.norm(d)
                p[j] = p[i] + d + (rng.integers(-1, 2, 3) * pbc[s]) @ cell[s]
            pos[offsets[s]:offsets[s + 1]] = p
        got = coincident_atoms(pos, offsets, cell, pbc, tol)
        ref = _brute_force_pair(pos, offsets, cell, pbc, tol)
        assert (got is None) == (ref is None), (got, ref)
        if got is not None:
            found += 1
            a, b, _ = got
            s = int(np.searchsorted(offsets, a, side="right") - 1)
            assert offsets[s] <= a < b < offsets[s + 1]
            assert _brute_force_pair(pos[[a, b]], np.array([0, 2]), cell[[s]], pbc[[s]], tol) == (0, 1)
    assert 100 < found < 500  # both outcomes were exercised


def test_coincident_atoms_in_a_100k_atom_periodic_box():
    """A 100 000-atom periodic box (a jittered grid) passes, and one atom moved onto another's
    periodic image is found: sorting, no N x N array (the check itself takes ~0.1 s on one core;
    bench, not asserted)."""
    from torchmdx.data.structures import Structures, coincident_atoms

    rng = np.random.default_rng(0)
    m = 47  # 47**3 = 103 823 grid points
    grid = np.stack(np.meshgrid(*[np.arange(m)] * 3, indexing="ij"), -1).reshape(-1, 3)[:100_000] * 2.2
    pos = grid + rng.normal(0, 0.05, grid.shape)
    box = np.diag([m * 2.2] * 3)
    offsets = np.array([0, len(pos)])
    assert coincident_atoms(pos, offsets, box[None], np.ones((1, 3), bool)) is None
    pos[70_000] = pos[123] + box[1] - box[2]
    assert coincident_atoms(pos, offsets, box[None], np.ones((1, 3), bool)) == (123, 70_000, True)
    st = Structures(z=np.full(len(pos), 18), pos=pos, energy=np.zeros(1), offsets=offsets, cell=box[None],
                    pbc=np.ones((1, 3), bool), metadata={"source": "box"})
    from torchmdx.errors import DataError

    with pytest.raises(DataError, match=r"^box: atoms 123 and 70000 of structure 0 are at the same position .* "
                                        r"\(one is a periodic image of the other\) \(a duplicated atom\?\)$"):
        st.validate()


# ---------------------------------------------------------------------------------- 2. caches
def _flip_byte(cache, dataset, at=3):
    """XOR one byte inside ``dataset``'s stored values (a contiguous dataset)."""
    import h5py

    with h5py.File(cache, "r") as h5:
        offset = h5[dataset].id.get_offset()
    with open(cache, "r+b") as handle:
        handle.seek(offset + at)
        byte = handle.read(1)[0]
        handle.seek(offset + at)
        handle.write(bytes([byte ^ 0x10]))


def test_damaged_cache_is_rebuilt_with_one_line(tmp_path, shared_data):
    """A byte of the cache's positions overwritten on disk (HDF5 stores no checksum: the number was
    read as a wrong position) is found by the cache's own checksums; build_cache says so in one
    line naming the dataset and rebuilds it, and the rebuilt cache holds the source's values."""
    from torchmdx.data import build_cache, read_cache
    from torchmdx.data import cache_file

    source = tmp_path / "ethanol.npz"
    shutil.copy(shared_data.joinpath(*ETHANOL), source)
    cache = build_cache(source, cache_dir=tmp_path / "cache")
    good = read_cache(cache).pos.copy()
    _flip_byte(cache, "pos", at=8 * 31 + 5)
    cache_file._VERIFIED.clear()  # a new process
    assert not np.array_equal(_raw(cache, "pos"), good)  # read as a wrong number, as HDF5 does
    said = []
    again = build_cache(source, cache_dir=tmp_path / "cache", say=said.append)
    assert again == cache
    assert len(said) == 1 and said[0].startswith(f"rebuilding {cache}: it is damaged (the values of dataset 'pos' "
                                                 "do not match the checksum written with them"), said
    np.testing.assert_array_equal(read_cache(cache).pos, good)
    assert build_cache(source, cache_dir=tmp_path / "cache", say=said.append) == cache and len(said) == 1


def _raw(cache, name):
    import h5py

    with h5py.File(cache, "r") as h5:
        return h5[name][()]


def test_damaged_cache_attributes_are_found(tmp_path, shared_data):
    """The attributes (statistics, metadata) are under the checksums too."""
    import h5py

    from torchmdx.data import build_cache
    from torchmdx.data.cache import damage

    source = tmp_path / "ethanol.npz"
    shutil.copy(shared_data.joinpath(*ETHANOL), source)
    cache = build_cache(source, cache_dir=tmp_path / "cache")
    assert damage(cache) == ""
    with h5py.File(cache, "r+") as h5:
        h5.attrs["statistics"] = h5.attrs["statistics"].replace('"atoms_max": 9', '"atoms_max": 8')
    assert damage(cache).startswith("(its attributes do not match the checksum")


def test_stale_source_with_the_same_size_and_time_is_rebuilt(tmp_path, shared_data):
    """The source rewritten with other values of the same size, its modification time put back
    (cp -p, rsync -t, a restored backup): the size and mtime matched, so the old cache was used
    silently; the hash of the source's first and last MiB now differs, the content hash is
    compared and the cache is rebuilt, saying why."""
    from torchmdx.data import build_cache, read_cache

    source = tmp_path / "ethanol.npz"
    with np.load(shared_data.joinpath(*ETHANOL)) as npz:
        arrays = dict(npz)
    np.savez(source, **arrays)
    cache = build_cache(source, cache_dir=tmp_path / "cache")
    before = os.stat(source)
    arrays["E"] = arrays["E"] + 1.0  # kcal/mol
    np.savez(source, **arrays)
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(source).st_size == before.st_size
    said = []
    assert build_cache(source, cache_dir=tmp_path / "cache", say=said.append) == cache
    assert said == [f"rebuilding {cache}: the source changed"]
    from torchmdx.units import KCAL_PER_MOL_TO_EV

    np.testing.assert_allclose(read_cache(cache).energy[:3], arrays["E"].reshape(-1)[:3] * KCAL_PER_MOL_TO_EV,
                               rtol=1e-12)


# ---------------------------------------------------------------------------------- 3. md restart
def test_restart_with_another_atom_order_continues_correctly(tmp_path, capsys):
    """A run sorted along the Hilbert curve, continued from its restart file with --atom-order
    input: the order asked for is used (it was silently replaced by the file's), a note says so,
    and the continuation follows the uninterrupted sorted run: positions and velocities came back
    per input atom (a mix-up would scatter the atoms at once)."""
    from ase.io import read

    from torchmdx.nn.analytic import LennardJones

    LennardJones(0.0104, 3.4).save(tmp_path / "lj.pt")
    structure = _write_argon(tmp_path)
    common = ["md", str(structure), "--model", str(tmp_path / "lj.pt"), "--dtype", "float64", "--dt", "2",
              "--temperature", "60", "--every", "5", "--no-progress", "--seed", "3"]
    assert main([*common, "--steps", "20", "--atom-order", "hilbert", "--out", str(tmp_path / "full.extxyz")]) == 0
    assert main([*common, "--steps", "10", "--atom-order", "hilbert", "--out", str(tmp_path / "part.extxyz")]) == 0
    from torchmdx.md.io import load_restart

    assert load_restart(tmp_path / "part.restart.pt")["atom_order"] is not None  # the file's run was sorted
    capsys.readouterr()
    assert main(["md", *common[2:], "--steps", "20", "--atom-order", "input", "--out",
                 str(tmp_path / "part.extxyz"), "--restart", str(tmp_path / "part.restart.pt")]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note: --atom-order input")]
    assert len(notes) == 1 and "was run in a space-filling-curve order; continuing in the input order" in notes[0]
    full, part = read(tmp_path / "full.extxyz", ":"), read(tmp_path / "part.extxyz", ":")
    assert len(full) == len(part) == 5
    for a, b in zip(full, part):
        np.testing.assert_allclose(b.positions, a.positions, rtol=0, atol=1e-9)
        np.testing.assert_allclose(b.get_velocities(), a.get_velocities(), rtol=0, atol=1e-9)
    # the restart file written by the continuation: input order, the order it ran in (none)
    assert load_restart(tmp_path / "part.restart.pt")["atom_order"] is None


def test_restart_keeps_the_files_order_by_default(tmp_path, capsys):
    """Without --atom-order (auto) the continued run keeps its file's order, bit for bit, no note."""
    from ase.io import read

    from torchmdx.nn.analytic import LennardJones

    LennardJones(0.0104, 3.4).save(tmp_path / "lj.pt")
    structure = _write_argon(tmp_path)
    common = ["md", str(structure), "--model", str(tmp_path / "lj.pt"), "--dtype", "float64", "--dt", "2",
              "--temperature", "60", "--every", "5", "--no-progress", "--seed", "3", "--atom-order", "morton"]
    assert main([*common, "--steps", "10", "--out", str(tmp_path / "full.extxyz")]) == 0
    assert main([*common, "--steps", "5", "--out", str(tmp_path / "part.extxyz")]) == 0
    capsys.readouterr()
    assert main(["md", "--model", str(tmp_path / "lj.pt"), "--dtype", "float64", "--dt", "2", "--temperature", "60",
                 "--every", "5", "--no-progress", "--seed", "3", "--steps", "10",
                 "--out", str(tmp_path / "part.extxyz"),
                 "--restart", str(tmp_path / "part.restart.pt")]) == 0
    assert "note:" not in capsys.readouterr().err
    np.testing.assert_array_equal(read(tmp_path / "part.extxyz", -1).positions,
                                  read(tmp_path / "full.extxyz", -1).positions)


# ---------------------------------------------------------------------------------- 4. sweep grid
def test_grid_values_with_commas():
    """Values are split at the commas outside brackets, braces and quotes (docs/sweep.md)."""
    from torchmdx.train.sweep import parse_grid

    assert parse_grid(["data.test_groups=[PE,PP],[PS]"]) == {"data.test_groups": [["PE", "PP"], ["PS"]]}
    assert parse_grid(["data.test_groups=[PE,PP]"]) == {"data.test_groups": [["PE", "PP"]]}
    assert parse_grid(["a.b={x: 1, y: 2},{x: 3}"]) == {"a.b": [{"x": 1, "y": 2}, {"x": 3}]}
    assert parse_grid(['a.b="u,v", w']) == {"a.b": ["u,v", "w"]}
    assert parse_grid(["a.b=it's,0.001, 64"]) == {"a.b": ["it's", 0.001, 64]}  # an apostrophe inside a word


def test_sweep_plan_with_list_values():
    """One point per bracketed value (three points with the text values '[a', 'b]', '[c]' before)."""
    from torchmdx.train.sweep import parse_grid, plan_points

    points = plan_points(parse_grid(["data.test_groups=[a,b],[c]", "model.num_layers=1,2"]), {})
    assert sorted((str(p.overrides["data.test_groups"]), p.overrides["model.num_layers"]) for p in points) == [
        ("['a', 'b']", 1), ("['a', 'b']", 2), ("['c']", 1), ("['c']", 2)]


# ---------------------------------------------------------------------------------- 5/6. slmc
def test_slmc_set_lattice_on_an_empty_file_is_enough(tmp_path):
    """The lattice section may come from --set: only a study that names no lattice is refused."""
    from torchmdx.lattice.config import load_slmc_config

    (tmp_path / "slmc.yaml").write_text("")
    cfg = load_slmc_config(tmp_path / "slmc.yaml", ["lattice.L=6"])
    assert cfg.lattice.L == 6


def test_slmc_lattice_too_large_for_memory_is_refused(tmp_path, shared_data, capsys, monkeypatch):
    """L = 16 needs about 0.6 GB (16 complex 512 x 512 matrices at once and the lattice tables): on
    a machine of 0.3 GB it is refused in one line naming L, the estimate and the machine's memory,
    before anything is written (it ran into the allocator or the out-of-memory killer)."""
    from torchmdx.lattice import config as lattice_config

    monkeypatch.setattr(lattice_config, "memory_bytes", lambda: (300_000_000, 200_000_000))

    def setup(t, s):
        return ["slmc", _slmc_config(t, lattice__L=16), "--no-progress"]

    refused_without_writes(tmp_path, shared_data, capsys, monkeypatch, setup,
                           ["config key 'lattice.L' is 16: the study needs about 0.", "GB of memory",
                            "but this machine has 0.3 GB"])


def test_slmc_size_estimate_and_warning(tmp_path, monkeypatch):
    """The estimate follows the documented formula; a study estimated above an hour of
    diagonalisations (or above the memory available now) gets one warning line, small ones none."""
    from torchmdx.lattice import config as lattice_config
    from torchmdx.lattice.config import (EIGH_SECONDS_PER_M3, cost_estimate, load_slmc_config, shell_count,
                                         size_warning)
    from torchmdx.lattice.geometry import SquareLattice

    for L in (4, 6, 8, 10):
        assert shell_count(L) == len(SquareLattice(L).shell_d2)
    small = load_slmc_config(_slmc_config(tmp_path))
    cost = cost_estimate(small)
    n = 16
    assert cost["size"] == 32 and cost["matrices"] == 2 * (1 + 4) * n + 2 * 2 * (4 + 1)
    assert cost["seconds"] == pytest.approx(cost["matrices"] * EIGH_SECONDS_PER_M3 * 32 ** 3)
    assert cost["bytes"] == 16 * 32 * 32 * (1 + 2 * 64) + 40 * n * n + 16 * n * n * (shell_count(4) + 1 + 3)
    assert size_warning(small) is None
    big = load_slmc_config(_slmc_config(tmp_path, lattice__L=16, data__sweeps=150, data__chains=16))
    line = size_warning(big)
    assert line.startswith("lattice.L = 16: ") and "512 x 512 complex matrix each: at least" in line
    assert "\n" not in line
    monkeypatch.setattr(lattice_config, "memory_bytes", lambda: (10**12, 10**6))
    assert "of memory and 0.001 GB is available now" in size_warning(small)


def test_slmc_cli_prints_the_size_warning(tmp_path, capsys, monkeypatch):
    """The warning is one 'warning:' line on stderr before the study starts."""
    from torchmdx.lattice import config as lattice_config
    import torchmdx.lattice.run as lattice_run

    monkeypatch.setattr(lattice_config, "WARN_SECONDS", 0.0)

    def stop(*args, **kwargs):
        raise SystemExit(7)

    monkeypatch.setattr(lattice_run, "run_slmc", stop)
    with pytest.raises(SystemExit):
        main(["slmc", str(_slmc_config(tmp_path)), "--no-progress"])
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: lattice.L = 4: ") and "on one core" in lines[0]
