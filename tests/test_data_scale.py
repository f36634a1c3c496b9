"""Data at scale (issue 19): the streamed cache build and what it leaves after a crash, one-line
errors for files that end early and chunks whose shapes disagree, batches bit for bit, grouped
splits on integer codes, the streamed reference fit, and rank 0 fitting once for a DDP launch."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import torchmdx.data.cache as cache_mod
from torchmdx.data import BatchLoader, H5Dataset, Structures, build_cache, read_cache, read_structures
from torchmdx.data.atomref import energy_statistics, fit_atomic_references
from torchmdx.data.cache import CacheWriter, find_cache
from torchmdx.data.formats import iter_structures
from torchmdx.data.splits import group_split, group_split_codes
from torchmdx.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
HARTREE = 27.211386245988  # eV, CODATA 2018, by hand


def _ani1x_file(path, groups):
    """A small ANI-1x-layout file: ``groups`` maps a name to (atomic numbers, coordinates,
    energies [Hartree], forces [Hartree/Å] or None)."""
    with h5py.File(path, "w") as h5:
        for name, (z, coordinates, energy, forces) in groups.items():
            g = h5.create_group(name)
            g["atomic_numbers"] = np.asarray(z, dtype=np.uint8)
            g["coordinates"] = np.asarray(coordinates, dtype=np.float32)
            g["wb97x_dz.energy"] = np.asarray(energy, dtype=np.float64)
            if forces is not None:
                g["wb97x_dz.forces"] = np.asarray(forces, dtype=np.float32)
    return path


def _random_groups(rng, n_groups=12, conformations=(3, 9)):
    groups = {}
    for g in range(n_groups):
        natoms = int(rng.integers(2, 9))
        n = int(rng.integers(*conformations))
        z = rng.choice([1, 6, 7, 8], size=natoms)
        groups[f"f{g:02d}"] = (z, rng.normal(size=(n, natoms, 3)), -40.0 + rng.normal(size=n),
                               rng.normal(size=(n, natoms, 3)))
    return groups


# ------------------------------------------------------------------------------------------------
# streamed build
def test_streamed_build_equals_whole_read(shared_data, tmp_path):
    for name in ("ani1x_xtb.h5", "ani1_xtb.h5"):
        src = shared_data / "ani" / name
        whole = read_structures(src)
        chunks = list(iter_structures(src, chunk_atoms=64))
        # chunks of at most twice the chunk size (one group slice past the mark), in order
        assert len(chunks) > 10 and max(c.n_atoms for c in chunks) <= 128
        assert sum(len(c) for c in chunks) == len(whole)
        cache = build_cache(src, cache_dir=tmp_path / name, chunk_atoms=64)
        cached = read_cache(cache)
        for key in ("z", "pos", "energy", "offsets", "cell", "pbc", "group"):
            np.testing.assert_array_equal(getattr(cached, key), getattr(whole, key), err_msg=key)
        if whole.forces is not None:
            np.testing.assert_array_equal(cached.forces, whole.forces)
        assert cached.group_names == whole.group_names and len(cached.group_names) == 15
        assert cached.metadata.get("dropped", 0) == whole.metadata.get("dropped", 0)
        # what data info reads instead of the per-atom arrays, against numpy on the whole arrays
        stats = cache_mod.cache_info(cache)["statistics"]
        zs, counts = np.unique(whole.z, return_counts=True)
        assert stats["element_counts"] == {str(z): int(c) for z, c in zip(zs, counts)}
        assert (stats["atoms_min"], stats["atoms_max"]) == (whole.atoms_per_structure.min(),
                                                            whole.atoms_per_structure.max())
        if whole.forces is not None:
            assert stats["force_sq_sum"] == pytest.approx(float(np.sum(whole.forces ** 2)), rel=1e-12)
            assert stats["force_max"] == pytest.approx(np.linalg.norm(whole.forces, axis=1).max(), rel=1e-12)


def test_summary_of_a_mapped_cache_equals_the_whole_read(shared_data, tmp_path):
    from torchmdx.data.summary import summarize

    src = shared_data / "polymer" / "polymers_xtb.extxyz"
    direct = summarize(read_structures(src, group_key="polymer"))
    mapped = summarize(read_cache(build_cache(src, cache_dir=tmp_path, group_key="polymer"), mmap=True))
    for key, value in direct.items():
        if key in ("source", "cache"):
            continue
        if isinstance(value, float):
            assert mapped[key] == pytest.approx(value, rel=1e-12), key
        else:
            assert mapped[key] == value, key


KILL_SCRIPT = """
import os, signal, sys
import torchmdx.data.cache as c
original = c.CacheWriter._copy
def killed(self, h5, name, *args):
    if name == "pos":  # part-way through writing the HDF5 file
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, h5, name, *args)
c.CacheWriter._copy = killed
c.build_cache(sys.argv[1], cache_dir=sys.argv[2])
"""


def test_killed_build_leaves_nothing_that_looks_complete_and_is_rebuilt(shared_data, tmp_path):
    src, cache_dir = shared_data / "ani" / "ani1x_xtb.h5", tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(src), str(cache_dir)],
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = sorted(p.name for p in cache_dir.iterdir())
    target = cache_mod.cache_path(src, cache_dir=cache_dir)
    assert left and all(name.startswith(f".{target.name}.tmp-") for name in left)  # file + spill folder
    assert not target.exists() and find_cache(src, cache_dir=cache_dir) is None
    # another process's build in progress (a live pid) is left alone
    live = cache_dir / f".{target.name}.tmp-{cache_mod._host()}-{os.getppid()}"
    live.write_bytes(b"partial")
    said = []
    path = build_cache(src, cache_dir=cache_dir, say=said.append)
    assert path == target and len(said) == 1
    assert said[0].startswith(f"an earlier build of {target} was interrupted (removed ") and \
        said[0].endswith("); rebuilding it")
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([target.name, live.name])
    assert len(H5Dataset(path)) == len(read_structures(src))


def test_damaged_or_unfinished_cache_is_rebuilt_and_says_why(shared_data, tmp_path):
    src = shared_data / "md17" / "md17_ethanol_xtb.npz"
    path = build_cache(src, cache_dir=tmp_path)
    good = path.read_bytes()
    with h5py.File(path, "r+") as h5:
        del h5.attrs["complete"]
    with pytest.raises(DataError, match=r"this cache is incomplete \(its build was interrupted\); build it again"):
        H5Dataset(path)
    said = []
    assert build_cache(src, cache_dir=tmp_path, say=said.append) == path
    assert said == [f"rebuilding {path}: it is incomplete (its build was interrupted)"]
    assert len(H5Dataset(path)) == 2000
    path.write_bytes(good[: len(good) // 2])  # cut off, e.g. a copy that stopped
    said.clear()
    build_cache(src, cache_dir=tmp_path, say=said.append)
    assert len(said) == 1 and said[0].startswith(f"rebuilding {path}: it is damaged or incomplete (")
    assert path.read_bytes() != good[: len(good) // 2] and len(H5Dataset(path)) == 2000


# ------------------------------------------------------------------------------------------------
# one-line errors
def test_file_that_ends_early_is_one_line(tmp_path, capsys):
    from torchmdx.cli.main import main

    rng = np.random.default_rng(0)
    src = _ani1x_file(tmp_path / "ani.h5", _random_groups(rng))
    data = src.read_bytes()
    src.write_bytes(data[: len(data) * 2 // 3])
    assert main(["data", "info", str(src), "--format", "ani1x", "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err == (f"error: {src}: the file ends early: {len(data) * 2 // 3} of its {len(data)} bytes are there "
                   "(truncated, e.g. an interrupted copy or download); copy or download it again")


def test_group_that_ends_early_or_holds_bad_values_is_named_with_its_index(tmp_path):
    z = [6, 6, 8, 1, 1]
    rng = np.random.default_rng(1)
    xyz, forces = rng.normal(size=(6, 5, 3)), rng.normal(size=(6, 5, 3))
    cases = [
        ({"ok": (z, xyz, np.zeros(6), forces), "C2H6O": (z, xyz, np.zeros(4), forces)},
         r":/C2H6O: 'wb97x_dz.energy' has shape \(4,\) for 6 conformations \(coordinates\); "
         r"it ends early, at conformation 4$"),
        ({"C2H6O": (z, xyz, np.zeros(6), forces[:3])},
         r":/C2H6O: 'wb97x_dz.forces' has shape \(3, 5, 3\) but coordinates \(6, 5, 3\); "
         r"it ends early, at conformation 3$"),
        ({"C2H6O": (z, xyz[:, :4], np.zeros(6), forces)},
         r":/C2H6O: 'coordinates' has shape \(6, 4, 3\) but there are 5 atomic numbers; expected \(n, 5, 3\)$"),
    ]
    bad_xyz = xyz.copy()
    bad_xyz[4, 2, 1] = np.nan
    cases.append(({"C2H6O": (z, bad_xyz, np.zeros(6), forces)},
                  r":/C2H6O: non-finite coordinates \(nan\) in conformation 4 \(atom 2\)$"))
    energy, bad_forces = np.zeros(6), forces.copy()
    energy[1] = np.nan  # not computed at this level: dropped, and the index after it still counts
    bad_forces[3, 1, 0] = np.inf
    cases.append(({"C2H6O": (z, xyz, energy, bad_forces)},
                  r":/C2H6O: non-finite forces \(inf\) in conformation 3 \(atom 1\)$"))
    for k, (groups, message) in enumerate(cases):
        src = _ani1x_file(tmp_path / f"case{k}.h5", groups)
        with pytest.raises(DataError, match=message):
            build_cache(src, "ani1x", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # the folder the failed build made is gone too (round 38)  # no cache, no temporary files


def test_chunk_with_inconsistent_shapes_is_one_line(tmp_path):
    def chunk(n, natoms, forces=True, dipole_width=3, group="mol7"):
        a = n * natoms
        return Structures(z=np.full(a, 6), pos=np.zeros((a, 3)), energy=np.zeros(n),
                          offsets=np.arange(n + 1) * natoms, forces=np.zeros((a, 3)) if forces else None,
                          group=np.zeros(n, dtype=np.int64), group_names=[group],
                          extras={"dipole": np.zeros((n, dipole_width))}, metadata={"source": "src.h5"})

    for second, message in ((chunk(2, 3, forces=False), r"src.h5: structure 4 \(group mol7\): lacks forces, "
                                                         r"unlike the structures before it"),
                            (chunk(2, 3, dipole_width=2), r"src.h5: structure 4 \(group mol7\): property 'dipole' has "
                                                          r"shape \(2,\) per entry, but \(3,\) before it")):
        with pytest.raises(DataError, match=message):
            with CacheWriter(tmp_path / "c.h5") as writer:
                writer.add(chunk(4, 2))
                writer.add(second)
        assert list(tmp_path.iterdir()) == []
    with CacheWriter(tmp_path / "c.h5") as writer:  # consistent chunks: groups merged by name
        writer.add(chunk(4, 2, group="a"))
        writer.add(chunk(2, 3, group="b"))
        writer.add(chunk(1, 5, group="a"))
    st = read_cache(tmp_path / "c.h5")
    assert st.group_names == ["a", "b"] and st.group.tolist() == [0, 0, 0, 0, 1, 1, 0]
    assert st.offsets.tolist() == [0, 2, 4, 6, 8, 11, 14, 19] and st.extras["dipole"].shape == (7, 3)


# ------------------------------------------------------------------------------------------------
# batches
def _reference_batch(st: Structures, indices):
    """PyG's own collation of Data objects made from the reader's arrays (no H5Dataset code)."""
    from torch_geometric.data import Batch, Data

    items = []
    for i in indices:
        a, b = st.offsets[i], st.offsets[i + 1]
        item = Data(z=torch.from_numpy(st.z[a:b].astype(np.int64)), pos=torch.from_numpy(st.pos[a:b]).float(),
                    energy=torch.tensor([st.energy[i]], dtype=torch.float64),
                    cell=torch.from_numpy(st.cell[i:i + 1]).float(), pbc=torch.from_numpy(st.pbc[i:i + 1]),
                    idx=torch.tensor([int(i)]), forces=torch.from_numpy(st.forces[a:b]).float())
        if st.group is not None:
            item.group = torch.tensor([int(st.group[i])])
        items.append(item)
    return Batch.from_data_list(items)


def test_batches_are_todays_batches_bit_for_bit(shared_data, tmp_path, monkeypatch):
    import torchmdx.data.dataset as dataset_mod

    src = shared_data / "md17" / "md17_aspirin_xtb.npz"
    cache = build_cache(src, cache_dir=tmp_path)
    st = read_structures(src)
    subset = np.arange(0, 1000, 3)
    epochs = {}
    for mmap in (False, True, "auto"):
        ds = H5Dataset(cache, mmap=mmap)
        assert ds.mmap is (mmap is True)  # auto: 0.5 MB of per-atom arrays stay in memory
        loader = BatchLoader(ds, batch_size=32, shuffle=True, indices=subset,
                             generator=torch.Generator().manual_seed(0))
        batches = list(loader)
        epochs[mmap] = [b.idx.tolist() for b in batches]
        for batch in batches:
            ref = _reference_batch(st, batch.idx.numpy())
            assert sorted(batch.keys()) == sorted(ref.keys())
            for key in ref.keys():
                assert batch[key].dtype == ref[key].dtype and torch.equal(batch[key], ref[key]), (mmap, key)
    # the order is the one of the loader before the data-at-scale changes (recorded for seed 0)
    assert epochs[False] == epochs[True] == epochs["auto"]
    assert len(epochs[False]) == 11 and epochs[False][0][:8] == [687, 669, 882, 909, 555, 978, 381, 396]
    assert epochs[False][-1] == [771, 3, 453, 567, 633, 201, 954, 330, 711, 195, 144, 639, 282, 774]
    monkeypatch.setattr(dataset_mod, "MMAP_AUTO_BYTES", 1000)
    assert H5Dataset(cache, mmap="auto").mmap is True
    with pytest.raises(DataError, match="mmap must be true, false or 'auto', got 'yes'"):
        H5Dataset(cache, mmap="yes")


def test_periodic_grouped_batches_bit_for_bit_from_the_map(shared_data, tmp_path):
    src = shared_data / "polymer" / "polymers_xtb.extxyz"
    st = read_structures(src, group_key="polymer")
    ds = H5Dataset(build_cache(src, cache_dir=tmp_path, group_key="polymer"), mmap=True, extras=False)
    idx = np.array([899, 0, 451, 17, 451, 300])
    batch, ref = ds.collate(idx), _reference_batch(st, idx)
    for key in ref.keys():
        assert batch[key].dtype == ref[key].dtype and torch.equal(batch[key], ref[key]), key
    assert torch.equal(ds[451].cell, ref.cell[2:3]) and torch.equal(ds[451].pos, ref.to_data_list()[2].pos)


# ------------------------------------------------------------------------------------------------
# splits and references
def _group_split_before(labels, train, val, test, seed, split_by_group, val_groups=(), test_groups=()):
    """group_split as it was before it worked on integer codes (the reference for equality)."""
    labels = np.asarray([str(g) for g in labels], dtype=object)
    names = sorted(set(labels.tolist()))
    named = {"train": [], "val": list(val_groups), "test": list(test_groups)}
    sizes = [0 if named[p] else size for p, size in zip(("train", "val", "test"), (train, val, test))]
    rest = [g for g in names if g not in set(val_groups) | set(test_groups)]
    rng = np.random.default_rng(seed)
    parts = {p: [np.flatnonzero(np.isin(labels, named[p]))] if named[p] else [] for p in named}
    from torchmdx.data.splits import resolve_sizes

    if split_by_group:
        counts = resolve_sizes(len(rest), *sizes, what="groups")
        perm = [rest[i] for i in rng.permutation(len(rest))]
        start = 0
        for part, count in zip(("train", "val", "test"), counts):
            chosen = perm[start:start + count]
            start += count
            if chosen:
                parts[part].append(np.flatnonzero(np.isin(labels, chosen)))
    else:
        remaining = np.flatnonzero(np.isin(labels, rest))
        counts = resolve_sizes(len(remaining), *sizes)
        perm = remaining[rng.permutation(len(remaining))]
        start = 0
        for part, count in zip(("train", "val", "test"), counts):
            parts[part].append(perm[start:start + count])
            start += count
    return {p: np.sort(np.concatenate(v)) if v else np.zeros(0, np.int64) for p, v in parts.items()}


def test_grouped_split_on_codes_is_the_split_by_names():
    rng = np.random.default_rng(3)
    names = [f"mol{k}" for k in rng.permutation(40)]  # cache order: first appearance, not sorted
    codes = rng.integers(0, 40, size=3000)
    labels = [names[c] for c in codes]
    for seed in (0, 1, 7):
        for by_group, kwargs in ((True, {}), (False, {}), (True, {"test_groups": ["mol3", "mol11"]}),
                                 (False, {"val_groups": ["mol5"]})):
            before = _group_split_before(labels, 0.7, 0.2, None, seed, by_group, **kwargs)
            fast = group_split_codes(codes, names, 0.7, 0.2, None, seed, by_group, **kwargs)
            slow = group_split(labels, 0.7, 0.2, None, seed, by_group, **kwargs)
            for part in ("train", "val", "test"):
                np.testing.assert_array_equal(fast[part], before[part])
                np.testing.assert_array_equal(slow[part], before[part])
            assert fast.info["groups"] == slow.info["groups"]


def test_streamed_reference_fit_is_the_least_squares_solution(shared_data):
    poly = read_structures(shared_data / "polymer" / "polymers_xtb.extxyz")
    ethanol = read_structures(shared_data / "md17" / "md17_ethanol_xtb.npz")
    for st, idx, chunk in ((poly, np.arange(0, 900, 2), 500), (ethanol, np.arange(1500), 100)):
        # independent reference: the count matrix by Python loops, numpy's lstsq (minimum norm)
        elements = sorted(set(st.z.tolist()))
        counts = np.zeros((len(idx), len(elements)))
        for row, s in enumerate(idx):
            for v in st.z[st.offsets[s]:st.offsets[s + 1]]:
                counts[row, elements.index(v)] += 1
        expected, *_ = np.linalg.lstsq(counts, st.energy[idx], rcond=None)
        streamed = fit_atomic_references(st, idx, max_z=20, chunk_atoms=chunk).numpy()
        assert np.count_nonzero(streamed) == len(elements)
        np.testing.assert_allclose(streamed[elements], expected, rtol=1e-9)
        whole = energy_statistics(st, idx, streamed)
        chunked = energy_statistics(st, idx, streamed, chunk_atoms=chunk)
        for key, value in whole.items():
            assert chunked[key] == pytest.approx(value, rel=1e-11, abs=1e-12), key
    # ethanol has one composition: only H6C2O's sum is determined, r is proportional to the counts
    r = fit_atomic_references(ethanol, np.arange(1500), max_z=10, chunk_atoms=100).numpy()
    np.testing.assert_allclose(r[[1, 6, 8]] / [6, 2, 1], r[1] / 6, rtol=1e-9)
    # an element beyond the model's range in a training structure: named, as without chunks
    # (the polymers: Cl, Z = 17, first in structure 300 (PVC); structures 0..299 have none)
    message = r"element Cl \(Z=17\) in structure 300 is beyond the model's range \(max_z=17"
    with pytest.raises(DataError, match=message):
        fit_atomic_references(poly, np.arange(200, 900), max_z=17, chunk_atoms=500)
    with pytest.raises(DataError, match=message):
        energy_statistics(poly, np.arange(200, 900), np.zeros(17), chunk_atoms=500)
    assert fit_atomic_references(poly, np.arange(0, 300), max_z=17, chunk_atoms=500)[17:].numel() == 0


# ------------------------------------------------------------------------------------------------
# DDP launches: who builds, who fits
def test_ranks_from_the_launchers_environment(monkeypatch):
    from torchmdx.data.ranks import global_rank, launch_world, local_rank

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "SLURM_LOCALID",
                "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    assert (global_rank(), local_rank(), launch_world()) == (0, 0, 1)
    cases = [
        ({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}, (5, 1, 8)),  # torchrun, second host
        ({"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4"}, (3, 1, 4)),  # srun
        ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, (1, 1, 2)),  # Lightning's launcher, second process
        ({"LOCAL_RANK": "0", "NODE_RANK": "1", "WORLD_SIZE": "4"}, (1, 0, 4)),  # first process, second host
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (0, 0, 1)),  # one task in an allocation
    ]
    for env, expected in cases:
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            assert (global_rank(), local_rank(), launch_world()) == expected, env


def test_rank_zero_fits_once_and_the_other_ranks_read_it(shared_data, tmp_path, monkeypatch):
    import torchmdx.data.datamodule as dm_mod
    import torchmdx.data.ranks as ranks_mod
    from torchmdx.data import TorchmdxDataModule

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    config = {"path": str(shared_data / "polymer" / "polymers_xtb.extxyz"), "group_key": "polymer",
              "cache_dir": str(tmp_path / "cache"), "split_by_group": True, "train_size": 4, "val_size": 1,
              "test_size": 1, "max_z": 20}
    run = tmp_path / "run"
    zero = TorchmdxDataModule(config, run_dir=run)
    zero.setup()
    state = json.loads((run / dm_mod.STATE_FILE_NAME).read_text())
    assert state["atomic_references"] == zero.atomic_references.tolist()
    # rank 1 of a torchrun launch: reads rank 0's numbers, fits nothing itself
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")

    def no_fit(*args, **kwargs):
        raise AssertionError("a rank other than 0 fitted")

    monkeypatch.setattr(dm_mod, "fit_atomic_references", no_fit)
    monkeypatch.setattr(dm_mod, "energy_statistics", no_fit)
    one = TorchmdxDataModule(config, run_dir=run)
    one.setup()
    assert torch.equal(one.atomic_references, zero.atomic_references)  # bit for bit
    assert one.statistics == zero.statistics and one.missing_reference_elements == zero.missing_reference_elements
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(one.split[part], zero.split[part])
    # a file of another run (another split) is not taken: rank 1 waits for rank 0's, then gives up
    state["key"] = "0" * 32
    (run / dm_mod.STATE_FILE_NAME).write_text(json.dumps(state))
    monkeypatch.setenv("TORCHMDX_RANK_WAIT_S", "0.3")
    monkeypatch.setattr(ranks_mod, "POLL_S", 0.05)
    with pytest.raises(DataError, match=r"rank 1: gave up waiting for rank 0's split and reference fit"):
        TorchmdxDataModule(config, run_dir=run).setup()
    # a local rank other than 0 does not build the cache: it waits for local rank 0
    other = dict(config, cache_dir=str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"rank 1: gave up waiting for local rank 0 to build the cache of"):
        TorchmdxDataModule(other, run_dir=tmp_path / "run2").setup()
    assert not (tmp_path / "empty").exists()
