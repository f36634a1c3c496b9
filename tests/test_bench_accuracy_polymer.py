"""bench/bench_accuracy.py's force-only (PolyGET) race (``--data polymer``): the polymer frames
against the raw extxyz, the split that holds whole families out, the per-element refit and the
within-family energies against hand-computed values, the TorchMD-NET side's inputs and recipe
(energy weight 0, force weight 1, the torchmdx config's settings), and a short CPU race (torchmdx;
TorchMD-NET too where it is importable)."""

from __future__ import annotations

import json
import math
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SYMBOLS = {"H": 1, "C": 6, "N": 7, "O": 8, "Cl": 17}
FAMILIES = ["PE", "PEO", "PVC", "PVA", "PAN", "PMMA"]


@pytest.fixture(scope="module")
def sample(shared_data):
    return shared_data / "polymer" / "polymers_xtb.extxyz"


@pytest.fixture(scope="module")
def raw(sample):
    """The extxyz parsed by hand (no ASE, no torchmdx): per frame z, pos, forces, energy, family."""
    lines = sample.read_text().splitlines()
    frames, i = [], 0
    while i < len(lines) and lines[i].strip():
        n = int(lines[i])
        info = lines[i + 1]
        rows = [line.split() for line in lines[i + 2:i + 2 + n]]
        frames.append({"z": np.array([SYMBOLS[r[0]] for r in rows]),
                       "pos": np.array([[float(v) for v in r[1:4]] for r in rows]),
                       "forces": np.array([[float(v) for v in r[4:7]] for r in rows]),
                       "energy": float(re.search(r"(?:^|\s)energy=(\S+)", info).group(1)),
                       "family": re.search(r"polymer=(\S+)", info).group(1)})
        i += 2 + n
    return frames


@pytest.fixture(scope="module")
def frames(bench, sample, tmp_path_factory):
    return bench.load_frames(sample, tmp_path_factory.mktemp("cache"))


def _families(frames):
    return np.asarray(frames["group_names"])[frames["group"]]


# ----------------------------------------------------------------------------------- data
def test_polymer_frames_equal_the_raw_file(bench, sample, frames, raw):
    assert bench.data_kind(sample) == "polymer" and bench.data_name(sample) == "polymer" and frames["kind"] == "polymer"
    assert bench.resolve_data("polymer").name == "polymers_xtb.extxyz"
    counts = np.diff(frames["offsets"])
    assert len(counts) == len(raw) == 900 and counts.min() == 19 and counts.max() == 35
    fams = _families(frames)
    assert sorted(set(fams)) == sorted(FAMILIES) and all((fams == f).sum() == 150 for f in FAMILIES)
    for s in (0, 151, 899):  # a PE, a later family and the last frame, from the text file
        lo, hi = frames["offsets"][s], frames["offsets"][s + 1]
        np.testing.assert_array_equal(frames["z"][lo:hi], raw[s]["z"])
        np.testing.assert_allclose(frames["pos"][lo:hi], raw[s]["pos"], rtol=0, atol=1e-7)
        np.testing.assert_allclose(frames["forces"][lo:hi], raw[s]["forces"], rtol=1e-7, atol=1e-9)
        assert frames["energy"][s] == pytest.approx(raw[s]["energy"], rel=1e-12)  # eV in the file and the race
        assert fams[s] == raw[s]["family"]


# ----------------------------------------------------------------------------------- split
def test_family_split_holds_out_pva_and_pmma_whole(bench, frames, tmp_path):
    from torchmdx.data.splits import load_split

    fams = _families(frames)
    path = tmp_path / "split.npz"
    split = bench.make_split_file(900, (None, 0, 0), 0, path, frames["hash"], groups=bench.split_groups(frames),
                                  held_out=bench.held_out_groups(frames))
    assert set(fams[split.val]) == {"PVA"} and len(split.val) == 150
    assert set(fams[split.test]) == {"PMMA"} and len(split.test) == 150
    assert set(fams[split.train]) == {"PE", "PEO", "PVC", "PAN"} and len(split.train) == 600
    # no structure twice, none left out; the file reads back the same
    assert len(np.unique(np.concatenate([split.train, split.val, split.test]))) == 900
    back = load_split(path, 900, frames["hash"])
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(back[part], split[part])
    # --train N: N random frames of the training families only, the held-out families unchanged
    small = bench.make_split_file(900, (40, 0, 0), 3, tmp_path / "s.npz", frames["hash"],
                                  groups=bench.split_groups(frames), held_out=bench.held_out_groups(frames))
    assert len(small.train) == 40 and not set(fams[small.train]) & {"PVA", "PMMA"}
    np.testing.assert_array_equal(small.test, split.test)
    again = bench.make_split_file(900, (40, 0, 0), 3, tmp_path / "t.npz", frames["hash"],
                                  groups=bench.split_groups(frames), held_out=bench.held_out_groups(frames))
    np.testing.assert_array_equal(again.train, small.train)


def test_family_split_by_hand_and_a_missing_family(bench):
    import bench_accuracy_data as d  # on sys.path once the bench fixture has loaded bench_accuracy
    from torchmdx.errors import DataError

    groups = np.array([0, 1, 2, 0, 1, 2, 0])  # names A B C
    split = d.family_split(groups, ["A", "B", "C"], None, ["B"], ["C"], seed=0)
    np.testing.assert_array_equal(split.train, [0, 3, 6])
    np.testing.assert_array_equal(split.val, [1, 4])
    np.testing.assert_array_equal(split.test, [2, 5])
    with pytest.raises(DataError, match="no group 'D'"):
        d.family_split(groups, ["A", "B", "C"], None, ["B"], ["D"], seed=0)


def test_pmma_composition_is_outside_the_training_span(frames, bench):
    """Why the headline energy is the within-family one (bench_accuracy_data's docstring): the
    per-element references fitted on PE, PEO, PVC, PAN cannot fix PMMA's absolute energy."""
    fams = _families(frames)
    rows = {}
    for fam in FAMILIES:
        s = int(np.flatnonzero(fams == fam)[0])
        z = frames["z"][frames["offsets"][s]:frames["offsets"][s + 1]]
        rows[fam] = np.array([(z == e).sum() for e in (1, 6, 7, 8, 17)], dtype=float)
    assert rows["PMMA"].tolist() == [20, 11, 0, 4, 0]  # C11H20O4
    basis = np.array([rows[f] for f in ("PE", "PEO", "PVC", "PAN")]).T
    coef, *_ = np.linalg.lstsq(basis, rows["PMMA"], rcond=None)
    assert np.linalg.norm(basis @ coef - rows["PMMA"]) == pytest.approx(1.3895, abs=1e-3)


# ----------------------------------------------------------------------------------- scoring
def test_refit_energies_by_hand(bench):
    import bench_accuracy_data as d

    # structures: H2, O, H2O (test), H2 again; flat layout
    frames = {"z": np.array([1, 1, 8, 8, 1, 1, 1, 1]), "pos": np.zeros((8, 3)), "forces": np.zeros((8, 3)),
              "offsets": np.array([0, 2, 3, 6, 8]), "energy": np.array([-1.0, -5.0, -7.0, -1.2])}
    train = np.array([0, 1, 3])
    pred_train = np.array([-0.5, -4.0, -0.9])  # residuals 0 -> -0.5, 1 -> -1.0, 3 -> -0.3
    # δ_H: mean of the H2 residuals / 2 = (-0.5 - 0.3) / 2 / 2 = -0.2; δ_O = -1.0
    corrected, delta = d.refit_energies(frames, train, pred_train, np.array([2]), np.array([-6.0]), max_z=10)
    assert delta[1] == pytest.approx(-0.2) and delta[8] == pytest.approx(-1.0)
    assert np.count_nonzero(delta) == 2
    assert corrected[0] == pytest.approx(-6.0 + 2 * -0.2 + -1.0)  # -7.4 against the reference -7.0


def test_family_centred_energies_by_hand(bench):
    import bench_accuracy_data as d

    pred = np.array([1.0, 2.0, 4.0, 10.0, 13.0])
    ref = np.array([0.0, 0.0, 0.0, 11.0, 11.0])
    groups = np.array([5, 5, 5, 2, 2])
    # group 5: errors 1, 2, 4 -> mean 7/3; group 2: errors -1, 2 -> mean 0.5
    out = d.family_centred_energies(pred, ref, groups)
    np.testing.assert_allclose(out, [1 - 7 / 3, 2 - 7 / 3, 4 - 7 / 3, 9.5, 12.5])
    # a constant per family vanishes: the errors are those of the relative energies
    np.testing.assert_allclose(d.family_centred_energies(ref + np.array([3, 3, 3, -8, -8.0]), ref, groups), ref)


def test_force_only_scorer_with_a_made_up_model(bench, frames, monkeypatch):
    """A 'model' that predicts every energy 2 eV too high and every force component 1 meV/Å too
    high: forces 1 meV/Å; within-family energies exact; as predicted 2 000 meV; after the refit on
    the training energies the offset the training compositions cannot carry over to PMMA, by a
    least-squares solve written out here."""
    fams = _families(frames)
    test = np.flatnonzero(fams == "PMMA")[:3]
    train = np.concatenate([np.flatnonzero(fams == f)[:2] for f in ("PE", "PEO", "PVC", "PAN")])

    def made_up(path, frames_, idx, device):
        flat = bench.flat_structures(frames_)
        return (frames_["energy"][idx] + 2.0, flat["forces"][bench.atom_index(flat["offsets"], idx)] + 1e-3, 7)

    monkeypatch.setitem(bench.PREDICTORS, "made_up", made_up)
    records = [{"t": 1.0, "t_train": 0.5, "step": 3, "epoch": 0, "kind": "end", "save_s": 0.0, "file": "x.ckpt"}]
    (point,) = bench.score_checkpoints_force_only("made_up", records, frames, test, train, "cpu")
    assert point["forces_mae"] == pytest.approx(1.0, rel=1e-9) and point["parameters"] == 7
    assert point["energy_mae"] == pytest.approx(0.0, abs=1e-6)
    assert point["energy_mae_raw"] == pytest.approx(2000.0, rel=1e-9)
    # by hand: δ = minimum-norm solution of counts(train) δ = -2 eV; PMMA then gets 2 + n_PMMA·δ
    elements = [1, 6, 7, 8, 17]

    def counts(s):
        z = frames["z"][frames["offsets"][s]:frames["offsets"][s + 1]]
        return [(z == e).sum() for e in elements]

    delta = np.linalg.pinv(np.array([counts(s) for s in train], dtype=float)) @ np.full(len(train), -2.0)
    expected = abs(2.0 + np.array(counts(test[0]), dtype=float) @ delta) * 1000.0
    assert expected > 100.0  # far from zero: the reason the refit is not the headline
    assert point["energy_mae_refit"] == pytest.approx(expected, rel=1e-6)
    assert point["energy_mae_per_atom_refit"] == pytest.approx(expected / 35, rel=1e-6)


# ----------------------------------------------------------------------------------- TorchMD-NET's side
def test_torchmdnet_dataset_and_splits_of_the_polymers(bench, frames, raw, tmp_path):
    table = bench.reference_energies(frames, np.arange(600))
    dataset = bench.torchmdnet_dataset(frames, table)
    assert dataset.len() == 900
    s = 899  # the last frame: a PMMA of 35 atoms
    item = dataset.get(s)
    assert item.z.dtype == torch.long and item.pos.dtype == torch.float32 and item.neg_dy.dtype == torch.float32
    np.testing.assert_array_equal(item.z.numpy(), raw[s]["z"])
    np.testing.assert_allclose(item.pos.numpy(), raw[s]["pos"], rtol=0, atol=1e-5)  # float32 Å
    np.testing.assert_allclose(item.neg_dy.numpy(), raw[s]["forces"], rtol=1e-6, atol=1e-6)  # eV/Å
    assert tuple(item.y.shape) == (1, 1) and float(item.y) == pytest.approx(raw[s]["energy"], rel=1e-12)  # eV
    atomref = dataset.get_atomref()
    assert tuple(atomref.shape) == (100, 1)
    np.testing.assert_allclose(atomref.numpy().reshape(-1), table, rtol=1e-6)
    path = tmp_path / "split.npz"
    split = bench.make_split_file(900, (None, 0, 0), 0, path, frames["hash"], groups=frames["group"],
                                  held_out=bench.held_out_groups(frames))
    parts = bench.write_torchmdnet_splits(path, 900, frames["hash"], tmp_path / "tmdnet.npz")
    with np.load(tmp_path / "tmdnet.npz") as npz:
        for key, part in (("idx_train", "train"), ("idx_val", "val"), ("idx_test", "test")):
            np.testing.assert_array_equal(npz[key], split[part])
            np.testing.assert_array_equal(parts[key], split[part])


def test_torchmdnet_recipe_is_force_only_and_matches_the_torchmdx_config(bench):
    hp = bench.torchmdnet_recipe("polymer")
    assert hp["y_weight"] == 0.0 and hp["neg_dy_weight"] == 1.0 and hp["prior_model"] == "Atomref"
    cfg = yaml.safe_load((ROOT / "configs" / "polymer_forces_only.yaml").read_text())
    assert cfg["train"]["energy_weight"] == 0.0 and cfg["train"]["force_weight"] == 1.0
    m, t, data = cfg["model"], cfg["train"], cfg["data"]
    pairs = {"embedding_dimension": m["embedding_dimension"], "num_layers": m["num_layers"], "num_heads": m["num_heads"],
             "num_rbf": m["num_rbf"], "cutoff_upper": m["cutoff_upper"], "vector_cutoff": m["vector_cutoff"],
             "distance_influence": m["distance_influence"], "neighbor_embedding": m["neighbor_embedding"],
             "batch_size": data["batch_size"], "inference_batch_size": data["inference_batch_size"], "lr": t["lr"],
             "lr_warmup_steps": t["lr_warmup_steps"], "lr_factor": t["lr_factor"], "lr_patience": t["lr_patience"],
             "lr_min": t["lr_min"], "early_stopping_patience": t["early_stopping_patience"],
             "gradient_clipping": cfg["trainer"]["gradient_clip_val"]}
    for key, value in pairs.items():
        assert hp[key] == value, key
    assert hp["max_num_neighbors"] >= 35  # every atom of the largest molecule (PMMA, 35 atoms) may be a neighbour
    small = bench.torchmdnet_recipe("polymer", small=True)
    assert small["num_layers"] == 2 and small["embedding_dimension"] == 32 and small["y_weight"] == 0.0


def test_torchmdnet_argument_names_exist_in_3_0_0(bench):
    """Every key of the polymer recipe is one of TorchMD-NET 3.0.0's arguments (its get_argparse
    where importable, else the wheel's source)."""
    keys = set(bench.DATASETS["polymer"]["torchmdnet"])
    try:
        from torchmdnet.scripts.train import get_argparse

        known = set(vars(get_argparse().parse_args([])))
    except ImportError:
        wheels = sorted((ROOT / ".whl").glob("torchmd_net-3.0.0-*.whl"))
        if not wheels:
            pytest.skip("TorchMD-NET 3.0.0 neither importable nor in .whl/")
        with zipfile.ZipFile(wheels[0]) as wheel:
            source = wheel.read("torchmdnet/scripts/train.py").decode()
        known = {name.replace("-", "_") for name in re.findall(r"add_argument\('--([a-z0-9-]+)'", source)}
    assert keys <= known, sorted(keys - known)


def test_parameter_count_of_the_polymer_recipe(bench):
    from torchmdx.nn.potential import ETPotential

    cfg = yaml.safe_load((ROOT / "configs" / "polymer_forces_only.yaml").read_text())["model"]
    cfg.update(bench.DATASETS["polymer"]["torchmdx_model"])
    model = ETPotential(**cfg)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == bench.DATASETS["polymer"]["parameters"] == 943_106
    assert bench.expected_parameters("polymer", ROOT / "configs" / "polymer_forces_only.yaml", False) == 943_106
    assert bench.expected_parameters("polymer", ROOT / "configs" / "et_md17.yaml", False) is None


# ----------------------------------------------------------------------------------- a short race
def _race(bench, side, sample, out, extra=()):
    argv = ["run", "--side", side, "--data", str(sample), "--small", "--minutes", "0.05", "--every", "1",
            "--workers", "0", "--device", "cpu", "--train", "32", "--out", str(out), *extra]
    assert bench.main(argv) == 0
    return json.loads((out / f"scores_{side}.json").read_text())


def _check_scores(bench, scores, out, frames):
    from torchmdx.data.splits import load_split

    assert scores["kind"] == "polymer" and scores["data"] == "polymer" and scores["sizes"] == [32, 150, 150]
    assert scores["parameters"] == 46_722 and scores["energy_references"] == "fit"
    assert scores["held_out"]["val"] == ["PVA"] and scores["held_out"]["test"] == ["PMMA"]
    assert "within each test family" in scores["energy_scoring"]
    split = load_split(Path(scores["split_file"]), 900, frames["hash"])
    fams = _families(frames)
    parts = {p: set(fams[split[p]]) for p in ("train", "val", "test")}
    assert parts["val"] == {"PVA"} and parts["test"] == {"PMMA"}
    assert not parts["train"] & (parts["val"] | parts["test"])  # no family leak
    points = scores["points"]
    assert len(points) >= 2
    for p in points:
        for key in ("forces_mae", "energy_mae", "energy_mae_per_atom", "energy_mae_refit", "energy_mae_raw"):
            assert math.isfinite(p[key]) and p[key] > 0
        assert p["energy_mae"] == pytest.approx(35 * p["energy_mae_per_atom"])  # every PMMA frame has 35 atoms
        assert p["parameters"] == 46_722
    # the side's own lowest-validation checkpoint (the model it hands its user) is scored too (TorchMD-NET
    # saves one every 10 epochs: a short race may end before its first)
    if scores["side"] == "torchmdx" or "best_validation" in scores:
        chosen = scores["best_validation"]
        assert chosen["kind"] == "best_validation" and 0 <= chosen["step"] <= points[-1]["step"]
        assert math.isfinite(chosen["forces_mae"]) and chosen["forces_mae"] > 0 and chosen["parameters"] == 46_722
    table = scores["atomic_references"]
    assert sorted(table, key=int) == ["1", "6", "7", "8", "17"]
    for z, value in scores["info"]["atomic_references"].items():
        assert value == pytest.approx(table[z], rel=1e-6)


@pytest.mark.slow
def test_short_cpu_race_torchmdx_on_polymers(bench, sample, frames, tmp_path):
    scores = _race(bench, "torchmdx", sample, tmp_path)
    _check_scores(bench, scores, tmp_path, frames)
    assert scores["config"].endswith("polymer_forces_only.yaml")
    cfg = scores["info"]["config"]
    assert cfg["train"]["energy_weight"] == 0.0 and cfg["model"]["output_model"] == "gated_equivariant"
    assert (tmp_path / "split_polymer_seed0.npz").is_file()


def test_polymer_val_and_test_sizes_are_refused(bench, sample, tmp_path, capsys):
    argv = ["run", "--side", "torchmdx", "--data", str(sample), "--minutes", "0.05", "--test", "20", "--out", str(tmp_path)]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "whole families" in err and len(err.strip().splitlines()) == 1


def test_short_cpu_race_torchmdnet_on_polymers(bench, sample, frames, tmp_path, capsys):
    """TorchMD-NET's side (where importable: PYTHONPATH=/tmp/tmdnet-site), force only, then the
    report of both sides on the same split and references."""
    pytest.importorskip("torchmdnet")
    ref = _race(bench, "torchmdnet", sample, tmp_path / "a")
    _check_scores(bench, ref, tmp_path / "a", frames)
    hp = ref["info"]["hparams"]
    assert hp["y_weight"] == 0.0 and hp["neg_dy_weight"] == 1.0 and hp["num_layers"] == 2
    new = _race(bench, "torchmdx", sample, tmp_path / "b", ["--split", str(tmp_path / "a" / "split_polymer_seed0.npz")])
    assert new["split_digest"] == ref["split_digest"]
    capsys.readouterr()
    assert bench.main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "r")]) == 0
    assert "!!!" not in capsys.readouterr().out
