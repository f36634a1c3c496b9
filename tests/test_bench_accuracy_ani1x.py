"""bench/bench_accuracy.py on variable-size molecules (``--data ani1x``): the split by structure
and its file, the race's ANI-1x arrays against torchmdx's own reader and the raw file, the shared
per-element reference energies, TorchMD-NET's in-memory dataset, the per-atom scorer and a short
CPU race (torchmdx; TorchMD-NET too where it is importable)."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch

HARTREE_EV = 27.211386  # 1 Eh in eV (CODATA), written out here rather than taken from torchmdx


@pytest.fixture(scope="module")
def sample(shared_data):
    return shared_data / "ani" / "ani1x_xtb.h5"


@pytest.fixture(scope="module")
def frames(bench, sample, tmp_path_factory):
    return bench.load_frames(sample, tmp_path_factory.mktemp("cache"))


# ----------------------------------------------------------------------------------- data
def test_ani1x_frames_equal_torchmdx_reader_and_the_raw_file(bench, sample, frames):
    from torchmdx.data.ani import read_ani1x

    assert frames["kind"] == "ani1x" and bench.data_name(sample) == "ani1x"
    st = read_ani1x(sample)
    np.testing.assert_array_equal(frames["offsets"], np.asarray(st.offsets))
    np.testing.assert_array_equal(frames["z"], np.asarray(st.z))
    np.testing.assert_allclose(frames["pos"], np.asarray(st.pos), rtol=0, atol=0)
    np.testing.assert_allclose(frames["energy"], np.asarray(st.energy), rtol=1e-12, atol=0)
    np.testing.assert_allclose(frames["forces"], np.asarray(st.forces), rtol=1e-12, atol=0)
    counts = np.diff(frames["offsets"])
    assert len(counts) == 600 and counts.min() == 3 and counts.max() == 11  # 15 formulas x 40, H2O .. C3H8

    # by hand, from the file (README: coordinates Å, gfn2xtb.energy Hartree, gfn2xtb.forces Hartree/Å):
    # conformation 7 of C2H4O, found in the race's arrays by its coordinates
    with h5py.File(sample, "r") as h5:
        group = h5["C2H4O"]
        numbers = group["atomic_numbers"][()]
        xyz = group["coordinates"][7].astype(np.float64)
        e_hartree = float(group["gfn2xtb.energy"][7])
        f_hartree = group["gfn2xtb.forces"][7]
    hits = [s for s in range(600) if counts[s] == len(numbers)
            and np.array_equal(frames["pos"][frames["offsets"][s]:frames["offsets"][s + 1]], xyz)]
    assert len(hits) == 1
    a, b = frames["offsets"][hits[0]], frames["offsets"][hits[0] + 1]
    np.testing.assert_array_equal(frames["z"][a:b], numbers)
    assert frames["energy"][hits[0]] == pytest.approx(e_hartree * HARTREE_EV, rel=1e-7)
    np.testing.assert_allclose(frames["forces"][a:b], f_hartree * HARTREE_EV, rtol=1e-7, atol=1e-9)
    # the sample resolves by name (from ../shared/data/ani or .benchdata)
    assert bench.resolve_data("ani1x").name == "ani1x_xtb.h5"


def test_split_by_structure_disjoint_reproducible_round_trip(bench, frames, tmp_path):
    from torchmdx.data.splits import load_split
    from torchmdx.errors import DataError

    n = len(frames["energy"])
    split = bench.make_split_file(n, (450, 50, 100), 0, tmp_path / "split.npz", frames["hash"])
    parts = {p: np.asarray(split[p]) for p in ("train", "val", "test")}
    # structures, not atoms: indices below the number of structures, each structure in one part only
    assert [len(v) for v in parts.values()] == [450, 50, 100]
    every = np.concatenate(list(parts.values()))
    assert every.min() >= 0 and every.max() < n and len(np.unique(every)) == 600
    # independent reference: the permutation of default_rng(0), cut 450 / 50 / 100, each part sorted
    perm = np.random.default_rng(0).permutation(n)
    expected = {"train": np.sort(perm[:450]), "val": np.sort(perm[450:500]), "test": np.sort(perm[500:600])}
    # the same seed again gives the same split; another seed another one
    again = bench.make_split_file(n, (450, 50, 100), 0, tmp_path / "again.npz", frames["hash"])
    other = bench.make_split_file(n, (450, 50, 100), 1, tmp_path / "other.npz", frames["hash"])
    back = load_split(tmp_path / "split.npz", n, frames["hash"])
    tmdnet = bench.write_torchmdnet_splits(tmp_path / "split.npz", n, frames["hash"], tmp_path / "tmdnet.npz")
    on_disk = np.load(tmp_path / "tmdnet.npz")
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(parts[part], expected[part])
        np.testing.assert_array_equal(again[part], expected[part])
        np.testing.assert_array_equal(back[part], expected[part])
        np.testing.assert_array_equal(on_disk[f"idx_{part}"], expected[part])
        np.testing.assert_array_equal(tmdnet[f"idx_{part}"], expected[part])
    assert not np.array_equal(other.test, parts["test"])
    assert back.seed == 0 and back.n_structures == 600
    # a split file belongs to its data: another size is refused in one line
    with pytest.raises(DataError, match="600"):
        load_split(tmp_path / "split.npz", 599)
    # the atoms of a structure list: structure by structure, in the order given
    idx = np.array([5, 0])
    atoms = bench.atom_index(frames["offsets"], idx)
    o = frames["offsets"]
    np.testing.assert_array_equal(atoms, np.r_[np.arange(o[5], o[6]), np.arange(o[0], o[1])])


def test_shared_references_are_torchmdx_fit_and_a_hand_least_squares(bench, sample, frames, tmp_path):
    from torchmdx.data.datamodule import TorchmdxDataModule

    n = len(frames["energy"])
    split = bench.make_split_file(n, (450, 50, 100), 0, tmp_path / "split.npz", frames["hash"])
    table = bench.reference_energies(frames, split.train)
    assert table.shape == (100,)
    # by hand: least squares of the training energies on the element counts (H, C, N, O)
    elements = [1, 6, 7, 8]
    counts = np.array([[np.sum(frames["z"][frames["offsets"][s]:frames["offsets"][s + 1]] == e) for e in elements]
                       for s in split.train], dtype=np.float64)
    solution, *_ = np.linalg.lstsq(counts, frames["energy"][split.train], rcond=None)
    np.testing.assert_allclose(table[elements], solution, rtol=1e-10)
    assert np.count_nonzero(table) == 4
    # what torchmdx's own data module fits for the same split (data.atomref: fit, the race's torchmdx side)
    dm = TorchmdxDataModule({"path": str(sample), "format": "ani1x", "cache_dir": str(tmp_path / "cache"),
                             "split_file": str(tmp_path / "split.npz"), "train_size": 450, "val_size": 50,
                             "test_size": 100, "atomref": "fit"})
    dm.setup("fit")
    np.testing.assert_allclose(dm.atomic_references.numpy(), table, rtol=1e-12, atol=1e-12)


def test_torchmdnet_dataset_has_its_keys_units_and_references(bench, frames):
    pytest.importorskip("torch_geometric")
    table = np.zeros(100)
    table[[1, 6, 7, 8]] = [-13.7, -57.6, -78.7, -110.3]
    dataset = bench.torchmdnet_dataset(frames, table)
    assert len(dataset) == 600
    o = frames["offsets"]
    for s in (0, 123, 599):
        item = dataset[s]
        assert set(item.keys()) == {"z", "pos", "y", "neg_dy"}
        assert item.z.dtype == torch.long and item.pos.dtype == torch.float32 and item.neg_dy.dtype == torch.float32
        assert item.y.shape == (1, 1) and item.pos.shape == item.neg_dy.shape == (o[s + 1] - o[s], 3)
        np.testing.assert_array_equal(item.z.numpy(), frames["z"][o[s]:o[s + 1]])
        np.testing.assert_allclose(item.pos.numpy(), frames["pos"][o[s]:o[s + 1]], rtol=1e-6)
        np.testing.assert_allclose(item.neg_dy.numpy(), frames["forces"][o[s]:o[s + 1]], rtol=1e-6, atol=1e-6)
        assert float(item.y) == frames["energy"][s]                 # eV, not converted again
    atomref = dataset.get_atomref()
    assert atomref.shape == (100, 1)
    np.testing.assert_allclose(atomref.numpy().reshape(-1), table, rtol=1e-6)
    assert bench.torchmdnet_dataset(frames, None).get_atomref() is None


def test_errors_per_atom_by_hand(bench):
    e_pred, e_ref = np.array([1.0, 2.0, 0.0]), np.array([1.3, 1.0, 0.0])      # |ΔE| = 0.3, 1.0, 0 eV
    atoms = np.array([3, 10, 4])
    f = np.zeros((17, 3))
    out = bench.errors(e_pred, e_ref, f, f, atoms)
    assert out["energy_mae"] == pytest.approx(1000 * 1.3 / 3)
    assert out["energy_mae_per_atom"] == pytest.approx(1000 * (0.1 + 0.1 + 0.0) / 3)   # 0.3/3, 1.0/10, 0/4
    assert out["energy_rmse_per_atom"] == pytest.approx(1000 * math.sqrt((0.01 + 0.01) / 3))
    assert "energy_mae_per_atom" not in bench.errors(e_pred, e_ref, f, f)
    with pytest.raises(ValueError):
        bench.errors(e_pred, e_ref, f, f, atoms[:2])


def test_report_says_when_the_energy_references_differ(bench, tmp_path, capsys):
    def scores(side, table):
        return {"side": side, "data": "ani1x", "kind": "ani1x", "energy_references": "fit", "parameters": 10, "split_digest": "s", "data_hash": "h",
                "budget_s": 6.0, "device": "test", "date": "2026-12-05", "sizes": [60, 10, 30],
                "info": {"atomic_references": table},
                "points": [{"t": 1.0, "t_train": 1.0, "step": 1, "forces_mae": 9.0, "energy_mae": 40.0,
                            "energy_mae_per_atom": 5.0}]}

    same = {"1": -13.7326421, "6": -57.616422}
    (tmp_path / "scores_torchmdnet.json").write_text(json.dumps(scores("torchmdnet", same)))
    (tmp_path / "scores_torchmdx.json").write_text(json.dumps(scores("torchmdx", {"1": -13.73264218, "6": -57.6164221})))
    assert bench.main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out
    assert "DIFFER" not in printed                                   # float32 rounding of one table is the same table
    assert "| final test energy MAE per atom (meV/atom) | 5.00 | 5.00 | 1.00× |" in printed
    (tmp_path / "scores_torchmdx.json").write_text(json.dumps(scores("torchmdx", {"1": -13.0, "6": -57.616422})))
    bench.main(["report", str(tmp_path), "--out", str(tmp_path / "r")])
    assert "!!! THE ENERGY REFERENCES DIFFER between TorchMD-NET 3.0.0" in capsys.readouterr().out
    # an MD17 race keeps each recipe's own treatment: nothing to compare
    for side in ("torchmdnet", "torchmdx"):
        payload = json.loads((tmp_path / f"scores_{side}.json").read_text())
        payload["energy_references"] = "own"
        (tmp_path / f"scores_{side}.json").write_text(json.dumps(payload))
    bench.main(["report", str(tmp_path), "--out", str(tmp_path / "r")])
    assert "DIFFER" not in capsys.readouterr().out


# ----------------------------------------------------------------------------------- a short race
def _race(bench, side, sample, out, extra=()):
    argv = ["run", "--side", side, "--data", str(sample), "--small", "--minutes", "0.1", "--every", "2",
            "--workers", "0", "--device", "cpu", "--train", "60", "--val", "10", "--test", "30", "--out", str(out),
            *extra]
    assert bench.main(argv) == 0
    return json.loads((out / f"scores_{side}.json").read_text())


def _check_scores(scores):
    assert scores["kind"] == "ani1x" and scores["data"] == "ani1x" and scores["sizes"] == [60, 10, 30]
    assert scores["parameters"] == 46_722 and scores["energy_references"] == "fit"
    points = scores["points"]
    assert len(points) >= 2 and points[-1]["step"] > 0
    for p in points:
        for key in ("forces_mae", "energy_mae", "energy_mae_per_atom", "energy_rmse_per_atom"):
            assert math.isfinite(p[key]) and p[key] > 0
        # per structure / per atom: between the smallest (3) and the largest (11) molecule's factor
        assert 3 * p["energy_mae_per_atom"] <= p["energy_mae"] <= 11 * p["energy_mae_per_atom"]
        assert p["parameters"] == 46_722
    # the references the model trained with are the table fitted here for both sides
    table = scores["atomic_references"]
    assert sorted(table) == ["1", "6", "7", "8"]
    for z, value in scores["info"]["atomic_references"].items():
        assert value == pytest.approx(table[z], rel=1e-6)


def test_short_cpu_race_torchmdx_on_ani1x(bench, sample, tmp_path, capsys):
    scores = _race(bench, "torchmdx", sample, tmp_path)
    _check_scores(scores)
    assert (tmp_path / "split_ani1x_seed0.npz").is_file()
    assert bench.main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    table = (tmp_path / "r" / "accuracy_ani1x.md").read_text()
    assert "| final test energy MAE per atom (meV/atom) |" in table
    assert (tmp_path / "r" / "accuracy_ani1x.png").stat().st_size > 10_000


def test_short_cpu_race_torchmdnet_on_ani1x(bench, sample, tmp_path, capsys):
    """TorchMD-NET's side (when it is importable: PYTHONPATH=/tmp/tmdnet-site, see
    docs/benchmarks/accuracy.md), then the report of both sides: same split, same references."""
    pytest.importorskip("torchmdnet")
    ref = _race(bench, "torchmdnet", sample, tmp_path / "a")
    _check_scores(ref)
    assert ref["info"]["hparams"]["prior_args"] == [{"max_z": 100, "trainable": False, "enable": True}]
    new = _race(bench, "torchmdx", sample, tmp_path / "b", ["--split", str(tmp_path / "a" / "split_ani1x_seed0.npz")])
    assert new["split_digest"] == ref["split_digest"]
    capsys.readouterr()
    assert bench.main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "r")]) == 0
    assert "DIFFER" not in capsys.readouterr().out
