"""HDF5 cache (rebuild rules, crash safety, round trip) and the PyG dataset over it."""

import os
from pathlib import Path
import shutil

import h5py
import numpy as np
import pytest
import torch
from torch_geometric.loader import DataLoader

import torchmdx.data.cache as cache_mod
from torchmdx.data import H5Dataset, build_cache, read_cache, read_structures
from torchmdx.data.cache import find_cache, is_current
from torchmdx.errors import DataError

KCAL = 0.0433641039  # eV per kcal/mol, by hand


@pytest.fixture
def md17_copy(shared_data, tmp_path):
    """A private copy of the MD17 ethanol file that a test may touch or change."""
    path = tmp_path / "raw" / "ethanol.npz"
    path.parent.mkdir()
    shutil.copy(shared_data / "md17" / "md17_ethanol_xtb.npz", path)
    return path


@pytest.fixture
def count_reads(monkeypatch):
    calls = []
    original = cache_mod.iter_structures

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "iter_structures", counting)
    return calls


def test_cache_built_once_and_reused(md17_copy, tmp_path, count_reads):
    cache_dir = tmp_path / "cache"
    path = build_cache(md17_copy, cache_dir=cache_dir)
    assert path.is_file() and path.parent == cache_dir and len(count_reads) == 1
    stat = path.stat()
    again = build_cache(md17_copy, cache_dir=cache_dir)
    assert again == path and len(count_reads) == 1
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_ino == stat.st_ino
    assert find_cache(md17_copy, cache_dir=cache_dir) == path


def test_touch_does_not_rebuild_but_new_content_does(md17_copy, tmp_path, count_reads):
    cache_dir = tmp_path / "cache"
    path = build_cache(md17_copy, cache_dir=cache_dir)
    # same content, new modification time: the content hash still matches
    st = os.stat(md17_copy)
    os.utime(md17_copy, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert is_current(path, md17_copy)
    assert build_cache(md17_copy, cache_dir=cache_dir) == path and len(count_reads) == 1
    # new content (same size): rebuilt, and the cache holds the new energy
    raw = dict(np.load(md17_copy))
    raw["E"] = raw["E"].copy()
    raw["E"][0, 0] = -1000.0
    with open(md17_copy, "wb") as handle:
        np.savez(handle, **raw)
    assert not is_current(path, md17_copy)
    assert build_cache(md17_copy, cache_dir=cache_dir) == path and len(count_reads) == 2
    with h5py.File(path) as h5:
        assert h5["energy"][0] == pytest.approx(-1000.0 * KCAL, rel=1e-9)


def test_options_give_separate_caches(shared_data, tmp_path):
    path = shared_data / "polymer" / "polymers_xtb.extxyz"
    plain = build_cache(path, cache_dir=tmp_path)
    grouped = build_cache(path, cache_dir=tmp_path, group_key="polymer")
    assert plain != grouped
    with h5py.File(plain) as a, h5py.File(grouped) as b:
        assert "group" not in a and "group" in b


def test_crash_during_write_leaves_no_cache(md17_copy, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    original = cache_mod.CacheWriter._copy
    written = []

    def crash_midway(self, h5, name, *args):
        if len(written) == 2:
            raise RuntimeError("simulated crash while writing the cache")
        written.append(name)
        original(self, h5, name, *args)

    monkeypatch.setattr(cache_mod.CacheWriter, "_copy", crash_midway)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cache(md17_copy, cache_dir=cache_dir)
    assert written == ["z", "pos"]  # it did crash midway
    assert list(cache_dir.iterdir()) == []  # neither a cache nor a temporary file or spill folder
    assert find_cache(md17_copy, cache_dir=cache_dir) is None
    # an existing good cache survives a failed rebuild untouched
    monkeypatch.setattr(cache_mod.CacheWriter, "_copy", original)
    good = build_cache(md17_copy, cache_dir=cache_dir)
    before = good.read_bytes()
    written.clear()
    monkeypatch.setattr(cache_mod.CacheWriter, "_copy", crash_midway)
    with pytest.raises(RuntimeError):
        build_cache(md17_copy, cache_dir=cache_dir, force=True)
    assert good.read_bytes() == before and sorted(p.name for p in cache_dir.iterdir()) == [good.name]


def test_cache_roundtrip_equals_reader(shared_data, tmp_path):
    for path, opts in [
        (shared_data / "qm9" / "qm9_20.db", {}),
        (shared_data / "polymer" / "polymers_xtb.extxyz", {"group_key": "polymer"}),
        (shared_data / "ani" / "ani1x_xtb.h5", {}),
    ]:
        direct = read_structures(path, **opts)
        cached = read_cache(build_cache(path, cache_dir=tmp_path, **opts))
        for name in ("z", "pos", "energy", "offsets", "cell", "pbc"):
            np.testing.assert_array_equal(getattr(cached, name), getattr(direct, name), err_msg=name)
        if direct.forces is not None:
            np.testing.assert_array_equal(cached.forces, direct.forces)
        assert cached.group_names == direct.group_names and cached.extra_units == direct.extra_units
        for name in direct.extras:
            np.testing.assert_array_equal(cached.extras[name], direct.extras[name])
        assert cached.metadata.get("atomrefs") == direct.metadata.get("atomrefs")
        assert cached.source == str(path.resolve())


def test_dataset_items_and_pyg_batches(shared_data, tmp_path):
    src = shared_data / "polymer" / "polymers_xtb.extxyz"
    st = read_structures(src, group_key="polymer")
    ds = H5Dataset(build_cache(src, cache_dir=tmp_path, group_key="polymer"))
    assert len(ds) == 900 and ds.n_atoms == st.n_atoms and ds.elements == [1, 6, 7, 8, 17]
    assert ds.group_names == ["PE", "PEO", "PVC", "PVA", "PAN", "PMMA"]
    item = ds[451]
    n = int(st.offsets[452] - st.offsets[451])
    assert item.z.dtype == torch.long and item.z.shape == (n,)
    assert item.pos.dtype == torch.float32 and item.pos.shape == (n, 3)
    assert item.forces.shape == (n, 3) and item.energy.shape == (1,) and item.energy.dtype == torch.float64
    assert item.cell.shape == (1, 3, 3) and item.pbc.shape == (1, 3) and item.pbc.dtype == torch.bool
    assert item.group.tolist() == [int(st.group[451])] and item.idx.tolist() == [451]
    assert item.energy.item() == st.energy[451]
    np.testing.assert_allclose(item.pos.numpy(), st.pos[st.offsets[451]:st.offsets[452]], rtol=1e-6)
    loader = DataLoader(ds[torch.tensor([3, 500, 899, 10])], batch_size=4, shuffle=False)
    batch = next(iter(loader))
    sizes = np.diff(st.offsets)[[3, 500, 899, 10]]
    assert batch.num_graphs == 4 and batch.energy.shape == (4,) and batch.cell.shape == (4, 3, 3)
    assert batch.pbc.shape == (4, 3) and batch.forces.shape == (sizes.sum(), 3)
    assert batch.batch.tolist() == np.repeat(np.arange(4), sizes).tolist()
    np.testing.assert_array_equal(batch.energy.numpy(), st.energy[[3, 500, 899, 10]])
    assert batch.idx.tolist() == [3, 500, 899, 10]
    # one full epoch visits every structure exactly once
    seen = torch.cat([b.idx for b in DataLoader(ds, batch_size=64, shuffle=True)])
    assert sorted(seen.tolist()) == list(range(900))


def test_dataset_float64_mmap_and_extras(shared_data, tmp_path):
    cache = build_cache(shared_data / "qm9" / "qm9_20.db", cache_dir=tmp_path)
    ds = H5Dataset(cache, dtype=torch.float64)
    mm = H5Dataset(cache, dtype=torch.float64, mmap=True)
    for k in (0, 13, 19):
        a, b = ds[k], mm[k]
        assert a.pos.dtype == torch.float64 and torch.equal(a.pos, b.pos) and torch.equal(a.z, b.z)
        assert a.homo.shape == (1,) and torch.equal(a.homo, b.homo) and torch.equal(a.energy, a.energy_U0)
    only = H5Dataset(cache, extras=["gap"])
    assert "gap" in only[0] and "homo" not in only[0]
    assert ds.published_atomrefs()[6] == pytest.approx(-37.846772 * 27.21138602, rel=1e-9)
    atoms = ds.to_atoms(0)
    assert atoms.get_chemical_formula() == "CH4"
    assert atoms.get_potential_energy() == pytest.approx(-40.47893 * 27.21138602, rel=1e-9)


def test_cache_of_a_cache_is_itself(shared_data, tmp_path):
    cache = build_cache(shared_data / "md17" / "ethanol_snip.xyz", cache_dir=tmp_path)
    assert build_cache(cache) == cache
    st = read_structures(cache)
    assert st.metadata["format"] == "md17-xyz" and len(st) == 3


def test_fast_collate_equals_pyg_collation(shared_data, tmp_path):
    from torch_geometric.data import Batch

    for src, opts in [(shared_data / "polymer" / "polymers_xtb.extxyz", {"group_key": "polymer"}),
                      (shared_data / "qm9" / "qm9_20.db", {})]:
        cache = build_cache(src, cache_dir=tmp_path, **opts)
        for mmap in (False, True):
            ds = H5Dataset(cache, mmap=mmap)
            idx = [len(ds) - 1, 0, 7, 3, 7]
            fast = ds.collate(torch.tensor(idx))
            ref = Batch.from_data_list([ds[i] for i in idx])
            assert sorted(fast.keys()) == sorted(ref.keys()) and fast.num_graphs == ref.num_graphs
            for key in ref.keys():
                assert fast[key].dtype == ref[key].dtype and torch.equal(fast[key], ref[key]), key
            back = fast.to_data_list()[2]
            assert torch.equal(back.pos, ds[7].pos) and torch.equal(back.energy, ds[7].energy)


def test_batches_in_order_match_pyg_collation(shared_data, tmp_path):
    """batches_in_order: the chosen structures in the given order, whole batches of batch_size
    and a short last one, the same Batch as PyG's collation; a dataset without ``collate`` (a
    plain list of Data) goes through Batch.from_data_list."""
    from torch_geometric.data import Batch

    from torchmdx.data import batches_in_order

    ds = H5Dataset(build_cache(shared_data / "qm9" / "qm9_20.db", cache_dir=tmp_path))
    order = np.array([7, 3, 19, 0, 11, 5, 2])
    batches = list(batches_in_order(ds, order, 3))
    assert [b.num_graphs for b in batches] == [3, 3, 1]
    assert torch.cat([b.idx for b in batches]).tolist() == order.tolist()
    as_list = [ds[int(i)] for i in range(len(ds))]
    for batch, plain, start in zip(batches, batches_in_order(as_list, order, 3), (0, 3, 6)):
        ref = Batch.from_data_list([ds[int(i)] for i in order[start:start + 3]])
        for key in ref.keys():
            assert torch.equal(batch[key], ref[key]) and torch.equal(plain[key], ref[key]), key
    assert list(batches_in_order(ds, [], 4)) == []


def test_batch_loader_epochs_workers_and_ranks(shared_data, tmp_path):
    from torchmdx.data import BatchLoader

    ds = H5Dataset(build_cache(shared_data / "md17" / "md17_aspirin_xtb.npz", cache_dir=tmp_path))
    subset = np.arange(0, 1000, 3)
    loader = BatchLoader(ds, batch_size=32, shuffle=True, indices=subset, generator=torch.Generator().manual_seed(0))
    epochs = [torch.cat([b.idx for b in loader]) for _ in range(2)]
    assert len(loader) == 11 and all(sorted(e.tolist()) == subset.tolist() for e in epochs)
    assert not torch.equal(epochs[0], epochs[1])  # a new order every epoch
    workers = BatchLoader(ds[torch.from_numpy(subset)], batch_size=50, num_workers=2)
    assert torch.cat([b.idx for b in workers]).tolist() == subset.tolist()  # in order, each once
    # three DDP ranks: disjoint shares of one order, equal lengths; 334 structures = 9 batches of
    # 32 in three whole rounds, then the last 46 dealt as 16 + 15 + 15: no structure repeats
    shares = []
    stream = loader._stream
    for rank in range(3):
        stream.seed, stream.rank, stream.world = 7, rank, 3
        shares.append([b.tolist() for b in stream.batches()])
        assert len(stream) == 4
    assert [len(s) for s in shares] == [4, 4, 4]
    assert [[len(b) for b in s] for s in shares] == [[32, 32, 32, 16], [32, 32, 32, 15], [32, 32, 32, 15]]
    flat = [i for share in shares for b in share for i in b]
    assert sorted(flat) == subset.tolist()  # each structure exactly once
    # each round of three batches is one batch of 96 of a single process with the same seed
    single = BatchLoader(ds, batch_size=96, shuffle=True, indices=subset)._stream
    single.seed = 7
    for k, big in enumerate(single.batches()):
        assert sorted(big.tolist()) == sorted(sum((shares[r][k] for r in range(3)), [])), k
    # fewer structures than ranks left over: only then do some repeat (the epoch's first ones)
    stream = BatchLoader(ds, batch_size=2, shuffle=False, indices=subset[:7])._stream
    dealt = []
    for rank in range(3):
        stream.rank, stream.world = rank, 3
        dealt.append([b.tolist() for b in stream.batches()])
    assert dealt == [[subset[0:2].tolist(), [subset[6]]], [subset[2:4].tolist(), [subset[0]]],
                     [subset[4:6].tolist(), [subset[1]]]]
    # evaluation (pad_ranks=False): each structure exactly once, counts differ by at most one
    evaluation = BatchLoader(ds, batch_size=32, indices=subset, pad_ranks=False)._stream
    shares, lengths = [], []
    for rank in range(3):
        evaluation.rank, evaluation.world = rank, 3
        shares.append([b.tolist() for b in evaluation.batches()])
        lengths.append(len(evaluation))
    assert [len(s) for s in shares] == lengths == [4, 4, 3]  # 11 batches of 32 (the last 14)
    flat = [i for share in shares for b in share for i in b]
    assert sorted(flat) == subset.tolist()
    # fewer batches than ranks: dealt into one smaller batch per rank, still each structure once
    few = BatchLoader(ds, batch_size=32, indices=subset[:40], pad_ranks=False)._stream
    dealt = []
    for rank in range(3):
        few.rank, few.world = rank, 3
        assert len(few) == 1
        dealt.append(few.batches()[0].tolist())
    assert [len(b) for b in dealt] == [14, 13, 13] and sorted(sum(dealt, [])) == subset[:40].tolist()
    two = BatchLoader(ds, batch_size=32, indices=subset[:2], pad_ranks=False)._stream
    two.rank, two.world = 0, 3
    with pytest.raises(DataError, match="2 structures cannot be shared by 3 DDP ranks without repeating some"):
        two.batches()


DDP_SCRIPT = """
import sys, json, torch, torch.distributed as dist
from torchmdx.data import H5Dataset, BatchLoader, TorchmdxDataModule
dist.init_process_group("gloo")
torch.manual_seed(0)  # what Lightning's seed_everything does on every rank
ds = H5Dataset(sys.argv[1])
workers = int(sys.argv[3])
out = {}
loader = BatchLoader(ds, batch_size=4, shuffle=True, num_workers=workers)
out["len"] = len(loader)  # asked before the first epoch, as Lightning does
out["batches"] = [b.idx.tolist() for b in loader]
evaluation = BatchLoader(ds, batch_size=4, num_workers=workers, pad_ranks=False)
out["eval_len"] = len(evaluation)
out["eval"] = [b.idx.tolist() for b in evaluation]
for kind in ("fast", "pyg"):
    dm = TorchmdxDataModule({"path": sys.argv[1], "format": "cache", "train_size": 6, "val_size": 11,
                             "test_size": None, "batch_size": 4, "loader": kind})
    dm.setup()
    val = dm.val_dataloader()
    out[kind + "_len"] = len(val)
    out[kind] = [b.idx.tolist() for b in val]
    out["val_split"] = dm.split["val"].tolist()
tiny = TorchmdxDataModule({"path": sys.argv[1], "format": "cache", "train_size": 6, "val_size": 1, "test_size": 0})
tiny.setup()
try:
    tiny.val_dataloader()
except Exception as exc:
    out["too_few"] = f"{type(exc).__name__}: {exc}"
json.dump(out, open(sys.argv[2] + f".{dist.get_rank()}", "w"))
dist.destroy_process_group()
"""


def test_batch_loader_shards_over_real_ddp_ranks(shared_data, tmp_path, workers=2):
    """Two gloo processes with two loader workers each: each rank gets its own batches, together
    every structure, equal batch counts."""
    import json
    import socket
    import subprocess
    import sys

    cache = build_cache(shared_data / "qm9" / "qm9_20.db", cache_dir=tmp_path)  # 20 = 5 batches of 4
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        procs.append(subprocess.Popen([sys.executable, str(script), str(cache), str(tmp_path / "out"),
                                       str(workers)], env=env))
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    results = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    # training: 5 batches of 4 = 2 rounds of 2 batches, the last 4 structures dealt 2 + 2:
    # 3 batches per rank, each structure once
    assert [r["len"] for r in results] == [3, 3] and [len(r["batches"]) for r in results] == [3, 3]
    assert [[len(b) for b in r["batches"]] for r in results] == [[4, 4, 2], [4, 4, 2]]
    assert sorted(i for r in results for b in r["batches"] for i in b) == list(range(20))
    # evaluation: 5 batches as 3 + 2, every structure exactly once; len() is this rank's count
    assert [r["eval_len"] for r in results] == [len(r["eval"]) for r in results] == [3, 2]
    assert sorted(i for r in results for b in r["eval"] for i in b) == list(range(20))
    # the DataModule's validation loaders (11 structures, batches of 4), both kinds: no repeats
    val_split = results[0]["val_split"]
    assert len(val_split) == 11 and results[1]["val_split"] == val_split
    for kind, lengths in (("fast", [2, 1]), ("pyg", [2, 2])):  # fast: batches 4+3 | 4; pyg: 6 | 5 structures
        assert [r[kind + "_len"] for r in results] == [len(r[kind]) for r in results] == lengths, kind
        assert sorted(i for r in results for b in r[kind] for i in b) == sorted(val_split), kind
    # one validation structure for two ranks: a clear error on both, not a repeat or a hang
    assert [r.get("too_few") for r in results] == [
        f"DataError: {cache}: the val split has 1 structures, fewer than the 2 DDP ranks; evaluation needs at "
        "least one structure per rank"] * 2
