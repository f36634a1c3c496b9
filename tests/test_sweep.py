"""``torchmdx sweep`` (torchmdx.train.sweep, sweep_analysis, flops) on the CPU, tiny models:

- a 2 x 2 grid trains every point once, on nested training sets with one common validation and
  test set, and writes a CSV row per point (test errors, parameters, FLOPs, device-seconds);
- a second call trains nothing, a widened grid trains only the new points, a point killed after
  its checkpoint continues from it (--resume);
- the CSV is replaced atomically: a crash while writing it leaves the previous file;
- bad input (grid syntax, unknown key, value of the wrong type, unknown algebra) is one line
  before anything trains, and leaves the folder as it was;
- power-law fits and the frontier against hand-made data; FLOP counts of known operations.
"""

import json
import math
import os

import numpy as np
import pytest
import torch
import yaml

from torchmdx.cli.main import main
from torchmdx.errors import ConfigError
from torchmdx.train import sweep as sweep_module
from torchmdx.train.flops import flops_of, training_step_flops
from torchmdx.train.sweep_analysis import frontier, power_law

TINY = {"architecture": "transformer", "embedding_dimension": 8, "num_layers": 1, "num_heads": 2, "num_rbf": 4,
        "bias_hidden": 8, "cutoff_upper": 4.0}


def write_config(tmp_path, shared_data, **model):
    config = {
        "data": {"path": str(shared_data / "md17" / "md17_ethanol_xtb.npz"), "train_size": 16, "val_size": 8,
                 "test_size": 16, "batch_size": 8, "cache_dir": str(tmp_path / "cache")},
        "model": {**TINY, **model},
        "train": {"lr": 1e-3, "lr_warmup_steps": 2, "early_stopping_patience": None},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False, "num_sanity_val_steps": 0},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_csv(path):
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_sweep_trains_each_point_once_and_resumes(shared_data, tmp_path, monkeypatch):
    config = write_config(tmp_path, shared_data)
    out = tmp_path / "out"
    trained = []
    from torchmdx.train import run as run_module

    original = run_module.train

    def counting(cfg, resume=False, callbacks=None):
        trained.append((os.path.basename(cfg.run_dir), resume))
        return original(cfg, resume=resume, callbacks=callbacks)

    monkeypatch.setattr(run_module, "train", counting)  # the sweep imports it when a point runs
    args = ["sweep", str(config), "--grid", "data.train_size=8,16", "--grid", "model.embedding_dimension=4,8",
            "--out", str(out)]
    assert main(args) == 0
    assert len(trained) == 4 and not any(resume for _, resume in trained)
    rows = read_csv(out / "results.csv")
    assert len(rows) == 4
    for row in rows:
        assert row["architecture"] == "transformer" and row["device"] == "cpu"
        assert int(row["parameters"]) > 0 and float(row["training_flops"]) > 0 and float(row["device_seconds"]) > 0
        assert float(row["test_forces_mae"]) > 0 and int(row["test_structures"]) == 16
        assert int(row["steps"]) == int(row["train_size"]) // 8  # one epoch of batches of 8
        # training FLOPs = counted FLOPs per structure x steps x batch size
        assert float(row["training_flops"]) == pytest.approx(float(row["flops_per_structure"]) * int(row["steps"]) * 8,
                                                            rel=1e-5)
    sizes = {(int(r["model.embedding_dimension"]), int(r["train_size"])) for r in rows}
    assert sizes == {(4, 8), (4, 16), (8, 8), (8, 16)}
    # a bigger model has more parameters and costs more per structure
    by = {(int(r["model.embedding_dimension"]), int(r["train_size"])): r for r in rows}
    assert int(by[(8, 8)]["parameters"]) > int(by[(4, 8)]["parameters"])
    assert float(by[(8, 8)]["flops_per_structure"]) > float(by[(4, 8)]["flops_per_structure"])
    # nested training sets, one validation and one test set
    splits = {int(r["train_size"]): np.load(out / "runs" / r["point"] / "splits.npz") for r in rows}
    assert set(splits[8]["train"]) < set(splits[16]["train"])
    assert np.array_equal(splits[8]["test"], splits[16]["test"]) and np.array_equal(splits[8]["val"], splits[16]["val"])
    assert not set(splits[16]["train"]) & set(splits[16]["test"])
    for name in ("results.md", "error_vs_compute.png", "error_vs_data.png", "fits.json"):
        assert (out / name).is_file()
    before = (out / "results.csv").read_bytes()

    # again: nothing to train, the same table
    trained.clear()
    assert main(args) == 0
    assert trained == []
    assert (out / "results.csv").read_bytes() == before

    # a wider grid: only the new points; a point killed after its checkpoint continues from it
    killed = rows[0]["point"]
    (out / "runs" / killed / sweep_module.RESULT).unlink()
    assert main(args[:3] + ["data.train_size=8,16,24"] + args[4:]) == 0
    assert (killed, True) in trained
    new = [name for name, resume in trained if not resume]
    assert len(trained) == 3 and len(new) == 2 and all("train_size=24" in name for name in new)
    assert len(read_csv(out / "results.csv")) == 6


def test_results_csv_is_replaced_atomically(tmp_path, monkeypatch):
    plan = {"points": [{"id": "a", "labels": {"data.train_size": 8}}, {"id": "b", "labels": {"data.train_size": 16}}]}
    for name, size, error in (("a", 8, 50.0), ("b", 16, 30.0)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        row = {"point": name, "labels": {"data.train_size": size}, "architecture": "et", "parameters": 10,
               "train_size": size, "steps": 2, "training_flops": 1e6 * size, "test_forces_mae": error}
        (tmp_path / "runs" / name / sweep_module.RESULT).write_text(json.dumps(row))
    sweep_module.write_results(tmp_path, plan)
    good = (tmp_path / "results.csv").read_bytes()
    assert len(read_csv(tmp_path / "results.csv")) == 2
    (tmp_path / "runs" / "b" / sweep_module.RESULT).write_text(json.dumps({**row, "test_forces_mae": 20.0}))
    import csv

    calls = []

    def crash(self, rowdict):
        calls.append(rowdict)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return original(self, rowdict)

    original = csv.DictWriter.writerow
    monkeypatch.setattr(csv.DictWriter, "writerow", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        sweep_module.write_results(tmp_path, plan)
    assert (tmp_path / "results.csv").read_bytes() == good  # the previous table, whole
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # no temporary file left


@pytest.mark.parametrize("grid, message", [
    ("data.train_size", "expected section.key=value1,value2"),
    ("data.train_size=", "one or more comma-separated values"),
    ("train_size=8,16", "must be section.key"),
    ("model.embedding_dimensions=4,8", "config key 'model.embedding_dimensions' does not exist"),
    ("model.embedding_dimension=4,big", "config key 'model.embedding_dimension' must be int, got 'big'"),
    ("model.num_layers=1,2.5", "config key 'model.num_layers' must be int"),
    ("run_dir=a,b", "must be section.key"),
    ("data.split_file=a.npz", "set by the sweep itself"),
])
def test_bad_grids_are_one_line_before_any_training(shared_data, tmp_path, capsys, grid, message):
    config = write_config(tmp_path, shared_data)
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["sweep", str(config), "--grid", grid, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing trained


def test_unknown_algebra_is_one_line(shared_data, tmp_path, capsys):
    config = write_config(tmp_path, shared_data)
    code = main(["sweep", str(config), "--set", "model={architecture: gatr, channels: 4, scalar_channels: 4, num_heads: 2}",
                 "--grid", "model.algebra=projective,hyperbolic", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "model.algebra" in err[0] and "hyperbolic" in err[0], err
    assert not (tmp_path / "out").exists()


def test_power_law_fit_and_frontier_against_hand_made_data():
    x = np.geomspace(1e6, 1e10, 7)
    fit = power_law(x, 3.0 * x ** -0.35)
    assert fit["exponent"] == pytest.approx(-0.35, abs=1e-12) and fit["prefactor"] == pytest.approx(3.0, rel=1e-9)
    assert fit["exponent_err"] < 1e-12
    rng = np.random.default_rng(0)
    noisy = 3.0 * x ** -0.35 * np.exp(rng.normal(0, 0.05, size=x.size))
    fit = power_law(x, noisy)
    # the standard error by hand: s^2 / sum (log x - mean)^2
    lx, ly = np.log(x), np.log(noisy)
    slope, intercept = np.polyfit(lx, ly, 1)
    s2 = np.sum((ly - (intercept + slope * lx)) ** 2) / (len(x) - 2)
    assert fit["exponent"] == pytest.approx(slope, rel=1e-10)
    assert fit["exponent_err"] == pytest.approx(math.sqrt(s2 / np.sum((lx - lx.mean()) ** 2)), rel=1e-10)
    assert math.isnan(power_law([1.0, 2.0], [1.0, 0.5])["exponent_err"])  # two points: no error
    points = [(1, 10.0), (2, 12.0), (3, 8.0), (4, 9.0), (5, 5.0), (5, 4.0)]
    assert [p[:2] for p in frontier(points)] == [(1, 10.0), (3, 8.0), (5, 4.0)]


def test_flop_counts_of_known_operations():
    lin = torch.nn.Linear(8, 16, bias=False)
    x = torch.randn(4, 8)
    assert flops_of(lambda: lin(x)) == 2 * 4 * 8 * 16
    assert flops_of(lambda: (x * x).sum()) == 32 + 32  # one per product, one per summed element
    a, b = torch.randn(3, 5, 7), torch.randn(3, 7, 2)
    assert flops_of(lambda: torch.einsum("bij,bjk->bik", a, b)) == 2 * 3 * 5 * 7 * 2
    # a training step counts the forward, the forces (double backward) and the parameter gradients
    import torchmdx
    from torch_geometric.data import Batch, Data

    from torchmdx.train.config import TrainConfig

    model = torchmdx.build_model({**TINY, "dtype": "float64", "seed": 0})
    data = [Data(z=torch.tensor([6, 1, 1, 8]), pos=torch.randn(4, 3, dtype=torch.float64) * 1.2,
                 energy=torch.tensor([1.0], dtype=torch.float64), forces=torch.zeros(4, 3, dtype=torch.float64))
            for _ in range(2)]
    batch = Batch.from_data_list(data)
    joint = training_step_flops(model, TrainConfig(energy_weight=1.0, force_weight=1.0), batch)
    energy_only = training_step_flops(model, TrainConfig(energy_weight=1.0, force_weight=0.0), batch)
    forward = flops_of(lambda: model(batch.z, batch.pos, batch.batch, forces=False, num_structures=2))
    assert joint["structures"] == 2 and joint["matmul"] > 0 and joint["other"] > 0
    assert forward < energy_only["total"] < joint["total"]
    assert all(p.grad is None for p in model.parameters())  # gradients cleared afterwards
    with pytest.raises(ConfigError):
        sweep_module.parse_grid(["model.x"])


def test_points_run_in_worker_processes_one_per_device(shared_data, tmp_path, monkeypatch):
    """The several-GPU path (one worker process per device, CUDA_VISIBLE_DEVICES set), here with
    two CPU 'devices': both points finish in their own processes, with their logs, and the table
    has both rows. Two GPUs are said to be visible (GPU ids that are not are refused since round 23)."""
    monkeypatch.setattr(sweep_module, "gpu_count", lambda: 2)
    config = write_config(tmp_path, shared_data)
    out = tmp_path / "out"
    lines = []
    result = sweep_module.run_sweep(config, ["data.train_size=8,16"], str(out), devices="0,1", log=lines.append)
    assert any(line.startswith("GPU 0: ") for line in lines) and any(line.startswith("GPU 1: ") for line in lines)
    rows = read_csv(out / "results.csv")
    assert sorted(int(r["train_size"]) for r in rows) == [8, 16] and len(result["rows"]) == 2
    for row in rows:
        log = (out / "runs" / row["point"] / "sweep.log").read_text()
        assert "model: TransformerPotential" in log
