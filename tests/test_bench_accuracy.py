"""bench/bench_accuracy.py without TorchMD-NET: the scorer, the split files of both sides, the
report's time-to-reach interpolation and table, and the wall-clock checkpoints (EMA weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch



# ----------------------------------------------------------------------------------- scorer
def test_errors_against_hand_computed_values(bench):
    e_pred, e_ref = np.array([1.0, 2.0]), np.array([[1.5], [1.0]])        # |ΔE| = 0.5, 1.0 eV
    f_ref = np.array([[[1.0, -2.0, 3.0]], [[0.0, 0.0, -0.6]]])            # 2 frames x 1 atom
    f_pred = np.zeros((2, 3))                                              # flat [A, 3] is accepted too
    out = bench.errors(e_pred, e_ref, f_pred, f_ref)
    assert out["energy_mae"] == pytest.approx(750.0)                       # (0.5 + 1.0) / 2 eV -> meV
    assert out["energy_rmse"] == pytest.approx(1000 * np.sqrt((0.25 + 1.0) / 2))
    assert out["forces_mae"] == pytest.approx(1100.0)                      # 6.6 / 6 eV/Å -> meV/Å
    assert out["forces_rmse"] == pytest.approx(1000 * np.sqrt((1 + 4 + 9 + 0.36) / 6))
    with pytest.raises(ValueError):
        bench.errors(e_pred, e_ref[:1], f_pred, f_ref)


# ----------------------------------------------------------------------------------- split files
def test_split_file_reaches_both_formats(bench, shared_data, tmp_path):
    from torchmdx.data.datamodule import TorchmdxDataModule
    from torchmdx.data.splits import load_split

    source = shared_data / "md17" / "md17_aspirin_xtb.npz"
    frames = bench.load_frames(source, tmp_path / "cache")
    n = len(frames["energy"])
    assert n == 1000 and frames["pos"].shape == (1000, 21, 3) and frames["forces"].shape == (1000, 21, 3)
    # eV: the raw file is kcal/mol
    raw = np.load(source)
    assert frames["energy"][:3] == pytest.approx(raw["E"][:3, 0] * 0.0433641, rel=1e-5)
    split_file = tmp_path / "split.npz"
    bench.make_split_file(n, (700, 50, 250), 0, split_file, frames["hash"])
    idx = bench.write_torchmdnet_splits(split_file, n, frames["hash"], tmp_path / "tmdnet_splits.npz")

    # independent reference: the permutation of default_rng(0), cut 700 / 50 / 250, each part sorted
    perm = np.random.default_rng(0).permutation(n)
    expected = {"train": np.sort(perm[:700]), "val": np.sort(perm[700:750]), "test": np.sort(perm[750:1000])}
    on_disk = np.load(tmp_path / "tmdnet_splits.npz")
    split = load_split(split_file, n, frames["hash"])
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(on_disk[f"idx_{part}"], expected[part])
        np.testing.assert_array_equal(idx[f"idx_{part}"], expected[part])
        np.testing.assert_array_equal(split[part], expected[part])
    assert set(on_disk.files) == {"idx_train", "idx_val", "idx_test"}

    # torchmdx's data module given data.split_file uses exactly these indices
    dm = TorchmdxDataModule({"path": str(source), "format": "md17", "cache_dir": str(tmp_path / "cache"),
                             "split_file": str(split_file), "train_size": 700, "val_size": 50, "test_size": 250})
    dm.setup("fit")
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(dm.split[part], expected[part])
    # and its dataset holds the same numbers the scorer compares against
    test = expected["test"][:3]
    batch = dm.dataset.collate(test)
    np.testing.assert_allclose(batch.energy.numpy(), frames["energy"][test], rtol=0, atol=1e-9)
    np.testing.assert_allclose(batch.forces.numpy().reshape(3, 21, 3), frames["forces"][test], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------- report
def test_time_to_reach_interpolates_the_first_crossing(bench):
    t, y = [0.0, 10.0, 20.0, 30.0], [100.0, 80.0, 40.0, 20.0]
    assert bench.time_to_reach(t, y, 60.0) == pytest.approx(15.0)   # halfway from 80 to 40
    assert bench.time_to_reach(t, y, 30.0) == pytest.approx(25.0)
    assert bench.time_to_reach(t, y, 100.0) == 0.0                  # already there at the start
    assert bench.time_to_reach(t, y, 10.0) is None                  # never reached
    # not monotonic: the first crossing counts (100 -> 50 crosses 60 at 0.8 of the interval)
    assert bench.time_to_reach(t, [100.0, 50.0, 70.0, 30.0], 60.0) == pytest.approx(8.0)


def _scores(side, params, points, **extra):
    return {"side": side, "label": {"torchmdnet": "TorchMD-NET 3.0.0", "torchmdx": "torchmdx"}[side],
            "data": "aspirin", "parameters": params, "split_digest": "abc", "data_hash": "h", "budget_s": 60.0,
            "device": "test", "date": "2026-12-05", "sizes": [700, 50, 250], **extra,
            "points": [{"t": t, "t_train": t, "step": s, "forces_mae": f, "energy_mae": e} for t, s, f, e in points]}


def test_report_table_png_and_loud_parameter_mismatch(bench, tmp_path, capsys):
    ref = _scores("torchmdnet", 1339906, [(0, 0, 1000, 300), (30, 300, 200, 60), (60, 600, 100, 40)], steps_per_s=10.0)
    new = _scores("torchmdx", 1339906, [(0, 0, 1000, 300), (20, 800, 300, 50), (40, 1600, 50, 20), (60, 2400, 40, 10)],
                  steps_per_s=40.0)
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "nested").mkdir(parents=True)
    (tmp_path / "a" / "scores_torchmdnet.json").write_text(json.dumps(ref))
    (tmp_path / "b" / "nested" / "scores_torchmdx.json").write_text(json.dumps(new))
    assert bench.main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out
    table = (tmp_path / "r" / "accuracy_aspirin.md").read_text()
    assert (tmp_path / "r" / "accuracy_aspirin.png").stat().st_size > 10_000
    # torchmdx reaches 100 meV/Å between (20 s, 300) and (40 s, 50): 20 + 20 * 200/250 = 36 s
    assert "| 36 s (0.6 min) | 0.60× |" in table
    assert "| final test force MAE (meV/Å) | 100.0 | 40.0 | 0.40× |" in table
    assert "| steps/s (since train start) | 10.00 | 40.00 | 4.00× |" in table
    assert "DIFFER" not in printed
    assert "best-validation" not in table  # scores without the best-validation checkpoint: no such rows
    # the model each side hands its user (its lowest-validation checkpoint) gets rows of its own
    ref["best_validation"] = dict(ref["points"][1], forces_mae=80.0, step=300)
    new["best_validation"] = dict(new["points"][2], forces_mae=20.0, step=1600)
    (tmp_path / "a" / "scores_torchmdnet.json").write_text(json.dumps(ref))
    (tmp_path / "b" / "nested" / "scores_torchmdx.json").write_text(json.dumps(new))
    assert bench.main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "r")]) == 0
    table = (tmp_path / "r" / "accuracy_aspirin.md").read_text()
    assert "| best-validation checkpoint: test force MAE (meV/Å) | 80.0 | 20.0 | 0.25× |" in table
    assert "| best-validation checkpoint (the model handed to the user): step | 300 | 1,600 |" in table
    # unequal parameter counts are said loudly
    new["parameters"] = 1339905
    (tmp_path / "b" / "nested" / "scores_torchmdx.json").write_text(json.dumps(new))
    bench.main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "r")])
    assert "!!! PARAMETER COUNTS DIFFER: TorchMD-NET 1339906, torchmdx 1339905" in capsys.readouterr().out
    # a folder without scores: one-line error, status 2
    (tmp_path / "empty").mkdir()
    assert bench.main(["report", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.startswith("error: no scores_<side>.json")


def test_report_with_a_second_torchmdx_model(bench, tmp_path, capsys):
    """A third run (torchmdx's Equiformer, --label equiformer) is a column of its own, compared with
    the reference run (TorchMD-NET) by force-error ratio, step-rate ratio and time to reach."""
    ref = _scores("torchmdnet", 1339906, [(0, 0, 1000, 300), (30, 300, 200, 60), (60, 600, 100, 40)], steps_per_s=10.0)
    et = _scores("torchmdx", 1339906, [(0, 0, 1000, 300), (20, 800, 300, 50), (40, 1600, 50, 20), (60, 2400, 40, 10)],
                 steps_per_s=40.0)
    eq = _scores("torchmdx", 2_000_000, [(0, 0, 900, 300), (30, 100, 150, 30), (60, 200, 80, 20)], steps_per_s=5.0,
                 run="equiformer", label="torchmdx equiformer")
    for name, payload in (("torchmdnet", ref), ("torchmdx", et), ("equiformer", eq)):
        (tmp_path / f"scores_{name}.json").write_text(json.dumps(payload))
    assert bench.main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    table = (tmp_path / "r" / "accuracy_aspirin.md").read_text()
    assert "| | TorchMD-NET 3.0.0 | torchmdx | torchmdx equiformer |" in table
    assert "| final test force MAE (meV/Å) | 100.0 | 40.0 | 80.0 |" in table
    assert "| force MAE / TorchMD-NET 3.0.0's | – | 0.40× | 0.80× |" in table
    assert "| steps/s / TorchMD-NET 3.0.0's | – | 4.00× | 0.50× |" in table
    # equiformer reaches 100 meV/Å between (30 s, 150) and (60 s, 80): 30 + 30 * 50/70 = 51.4 s
    assert "| time to reach TorchMD-NET 3.0.0's final force MAE | 60 s | 36 s (0.6 min) | 51 s (0.9 min) |" in table
    assert "DIFFER" not in capsys.readouterr().out
    # without TorchMD-NET, the ET run is the reference
    (tmp_path / "scores_torchmdnet.json").unlink()
    assert bench.main(["report", str(tmp_path), "--out", str(tmp_path / "r2")]) == 0
    table = (tmp_path / "r2" / "accuracy_aspirin.md").read_text()
    assert "| force MAE / torchmdx's | – | 2.00× |" in table
    # --config/--label are refused for TorchMD-NET, and a bad label is one line
    assert bench.main(["run", "--side", "torchmdx", "--label", "a b", "--out", str(tmp_path / "x")]) == 2
    assert "--label 'a b'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- checkpoints
def test_wall_clock_checkpoints_hold_the_ema_weights(bench, tmp_path):
    """A full checkpoint carries torchmdx's EMA weights in state_dict (a weights_only one would
    carry the raw training weights): checked against an EMA computed here from the raw weights."""
    import lightning as L

    from torchmdx.train.ema import EMA, warmed_up_decay

    class Toy(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = torch.nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return ((self.model(x) - y) ** 2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Recorder(L.Callback):  # raw weights after each optimiser step, before the EMA sees them
        def __init__(self):
            self.raw = []

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.raw.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    recorder, decay = Recorder(), 0.9
    saver = bench.WallClockCheckpoints("torchmdx", tmp_path / "ckpt", tmp_path / "log.json", every=0.0,
                                       expected_parameters=4)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[recorder, EMA(decay), saver])
    trainer.fit(Toy(), loader)

    log = json.loads((tmp_path / "log.json").read_text())
    assert saver.parameters == log["parameters"] == 4
    kinds = [r["kind"] for r in log["checkpoints"]]
    steps = [r["step"] for r in log["checkpoints"]]
    assert kinds == ["start", "periodic", "periodic", "periodic", "end"] and steps == [0, 1, 2, 3, 3]
    assert log["checkpoints"][-1]["file"] == log["checkpoints"][-2]["file"]   # no step in between: same file
    times = [r["t"] for r in log["checkpoints"]]
    assert times == sorted(times) and all(r["t"] >= r["t_train"] >= 0 for r in log["checkpoints"])

    ema = None
    for n, raw in enumerate(recorder.raw):
        ema = {k: v.clone() for k, v in raw.items()} if ema is None else \
            {k: ema[k] + (raw[k] - ema[k]) * (1 - warmed_up_decay(decay, n)) for k in raw}
        checkpoint = torch.load(log["checkpoints"][n + 1]["file"], weights_only=True)
        for key in raw:
            torch.testing.assert_close(checkpoint["state_dict"][key], ema[key], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(checkpoint["current_model_state"][key], raw[key])
        if n > 0:
            assert not torch.allclose(checkpoint["state_dict"]["model.weight"], raw["model.weight"])
