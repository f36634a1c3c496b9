"""bench/bench_accuracy.py per optimiser step: ``--max-steps`` stops both sides after N optimiser
steps (Lightning ``max_steps``; ``--minutes`` stays an upper bound), ``--every-steps`` checkpoints
both at the same steps, the force-only scorer also scores the validation family, and the
``steps`` table (several seeds per side) against hand-computed means and ratios."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest


@pytest.fixture(scope="module")
def sample(shared_data):
    return shared_data / "polymer" / "polymers_xtb.extxyz"


def _run(bench, side, sample, out, extra=()):
    # 32 training structures at batch 16: 2 steps an epoch; 5 minutes would allow far more than 5 steps
    argv = ["run", "--side", side, "--data", str(sample), "--small", "--minutes", "5", "--max-steps", "5",
            "--every-steps", "2", "--workers", "0", "--device", "cpu", "--train", "32", "--out", str(out), *extra]
    assert bench.main(argv) == 0
    return json.loads((out / f"scores_{side}.json").read_text())


def _check_stopped_at_five(scores, out, side):
    assert scores["max_steps"] == 5 and scores["every_steps"] == 2 and scores["steps"] == 5
    log = json.loads((out / f"checkpoints_{side}.json").read_text())
    steps = [r["step"] for r in log["checkpoints"]]
    # start, every 2nd step, then the end (step 5, 3 epochs of 2 steps: the third stopped after one)
    assert steps == [0, 2, 4, 5] and [r["kind"] for r in log["checkpoints"]] == ["start", "periodic", "periodic", "end"]
    assert log["checkpoints"][-1]["t_train"] < 5 * 60
    assert [p["step"] for p in scores["points"]] == [0, 2, 4, 5]
    # the learning rate at each checkpoint: the linear warm-up of 500 steps, lr 5e-4 · (step + 1) / 500 after
    # step k's update (the start record: the optimiser's initial value, lr / 500 on torchmdx's side)
    for record in log["checkpoints"][1:]:
        assert record["lr"] == pytest.approx(5e-4 * record["step"] / 500, rel=1e-6)
    for p in scores["points"]:
        # the validation family (PVA, 26 atoms a frame) scored by the same scorer as the test family
        for key in ("val_forces_mae", "val_energy_mae", "val_energy_mae_per_atom"):
            assert math.isfinite(p[key]) and p[key] > 0
        assert p["val_energy_mae"] == pytest.approx(26 * p["val_energy_mae_per_atom"])
        assert math.isfinite(p["train_forces_mae"]) and p["train_forces_mae"] > 0
    # training moved the weights: the scored errors change from checkpoint to checkpoint
    assert len({round(p["forces_mae"], 6) for p in scores["points"]}) == 4


@pytest.mark.slow
def test_max_steps_stops_torchmdx_after_n_steps(bench, sample, tmp_path):
    scores = _run(bench, "torchmdx", sample, tmp_path)
    _check_stopped_at_five(scores, tmp_path, "torchmdx")
    assert scores["info"]["config"]["trainer"]["max_steps"] == 5


def test_max_steps_stops_torchmdnet_after_n_steps(bench, sample, tmp_path):
    """TorchMD-NET's side (where importable: PYTHONPATH=/tmp/tmdnet-site)."""
    pytest.importorskip("torchmdnet")
    scores = _run(bench, "torchmdnet", sample, tmp_path)
    _check_stopped_at_five(scores, tmp_path, "torchmdnet")


@pytest.mark.parametrize("flag", ["--max-steps", "--every-steps"])
def test_step_options_below_one_are_refused(bench, sample, tmp_path, capsys, flag):
    argv = ["run", "--side", "torchmdx", "--data", str(sample), flag, "0", "--out", str(tmp_path / "o")]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} must be >= 1") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_force_only_scorer_scores_test_training_and_validation_apart(bench, sample, tmp_path, monkeypatch):
    """A made-up 'model' whose force error is 1 meV/Å on PMMA (test), 2 on the training families
    and 3 on PVA (validation), energies 5 eV too high on PVA: each part's error lands in its own
    key (the predictions of one pass over test + training + validation structures sliced apart)."""
    frames = bench.load_frames(sample, tmp_path / "cache")
    fams = np.asarray(frames["group_names"])[frames["group"]]
    test = np.flatnonzero(fams == "PMMA")[:3]
    train = np.concatenate([np.flatnonzero(fams == f)[:2] for f in ("PE", "PEO", "PVC", "PAN")])
    val = np.flatnonzero(fams == "PVA")[:4]
    offset = {"PMMA": 1e-3, "PVA": 3e-3}

    def made_up(path, frames_, idx, device):
        flat = bench.flat_structures(frames_)
        forces = [flat["forces"][flat["offsets"][s]:flat["offsets"][s + 1]] + offset.get(fams[s], 2e-3) for s in idx]
        energies = frames_["energy"][idx] + np.where(fams[idx] == "PVA", 5.0, 0.0)
        return energies, np.concatenate(forces), 7

    monkeypatch.setitem(bench.PREDICTORS, "made_up", made_up)
    records = [{"t": 1.0, "t_train": 0.5, "step": 3, "epoch": 0, "kind": "end", "save_s": 0.0, "file": "x.ckpt"}]
    (point,) = bench.score_checkpoints_force_only("made_up", records, frames, test, train, "cpu", val_idx=val)
    assert point["forces_mae"] == pytest.approx(1.0, rel=1e-9)
    assert point["train_forces_mae"] == pytest.approx(2.0, rel=1e-9)
    assert point["val_forces_mae"] == pytest.approx(3.0, rel=1e-9)
    assert point["val_energy_mae"] == pytest.approx(0.0, abs=1e-6)  # within the family: the 5 eV removed
    (plain,) = bench.score_checkpoints_force_only("made_up", records, frames, test, train, "cpu")
    assert "val_forces_mae" not in plain and plain["forces_mae"] == pytest.approx(1.0, rel=1e-9)


# ----------------------------------------------------------------------------------- the steps table
def _scores(side, seed, points, best=None):
    return {"side": side, "run": side, "data": "polymer", "seed": seed, "parameters": 46722, "data_hash": "h",
            "split_digest": "d", "max_steps": 200, "every_steps": 100, "device": "CPU", "date": "2026-12-06", "small": True,
            "points": [{"t": float(st), "step": st, "forces_mae": f, "energy_mae": e, "val_forces_mae": v,
                        "kind": "periodic"} for st, f, e, v in points],
            **({"best_validation": best} if best else {})}


def test_steps_table_means_over_seeds_and_ratios(bench, tmp_path, capsys):
    runs = {
        "a/scores_torchmdnet.json": _scores("torchmdnet", 0, [(0, 700, 150, 600), (100, 400, 120, 500), (200, 300, 110, 450)]),
        "b/scores_torchmdnet.json": _scores("torchmdnet", 1, [(0, 720, 160, 620), (100, 500, 140, 520), (200, 340, 130, 470)]),
        "c/scores_torchmdx.json": _scores("torchmdx", 0, [(0, 760, 190, 610), (100, 450, 150, 400), (200, 330, 120, 390)],
                                          best={"step": 150, "forces_mae": 310.0, "energy_mae": 115.0, "val_forces_mae": 380.0}),
        # seed 1 of torchmdx also has an extra step (250) that the others lack: left out of the table
        "d/scores_torchmdx.json": _scores("torchmdx", 1, [(0, 740, 170, 630), (100, 410, 130, 420), (200, 310, 100, 410),
                                                          (250, 300, 90, 400)]),
    }
    for name, s in runs.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps(s))
    assert bench.main(["steps", str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    table = (tmp_path / "r" / "steps_polymer.md").read_text()
    assert (tmp_path / "r" / "steps_polymer.png").stat().st_size > 10_000
    assert "!!!" not in capsys.readouterr().out
    # step 100, test force MAE: TorchMD-NET (400 + 500) / 2 = 450, torchmdx (450 + 410) / 2 = 430, 430 / 450 = 0.96
    assert "| 100 | 450.0 (400.0 / 500.0) | 430.0 (450.0 / 410.0) | 0.96× |" in table
    # step 200, energy: TorchMD-NET 120, torchmdx 110 -> 0.92; validation force: 460 vs 400 -> 0.87
    assert "| 200 | 120.0 (110.0 / 130.0) | 110.0 (120.0 / 100.0) | 0.92× |" in table
    assert "| 200 | 460.0 (450.0 / 470.0) | 400.0 (390.0 / 410.0) | 0.87× |" in table
    assert "| 250 |" not in table
    assert "| test force MAE (meV/Å) | – / – | 310.0 / – |" in table
    # a different step limit on one side is said loudly; the same run and seed twice is an error
    runs["d/scores_torchmdx.json"]["max_steps"] = 300
    (tmp_path / "d/scores_torchmdx.json").write_text(json.dumps(runs["d/scores_torchmdx.json"]))
    assert bench.main(["steps", str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    assert "!!! THE STEP LIMITS DIFFER" in capsys.readouterr().out
    (tmp_path / "e").mkdir()
    (tmp_path / "e/scores_torchmdx.json").write_text(json.dumps(runs["c/scores_torchmdx.json"]))
    assert bench.main(["steps", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: two torchmdx runs of seed 0") and len(err.strip().splitlines()) == 1
