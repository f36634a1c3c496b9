"""bench/bench_ddp.py (issue 20): the throughput and efficiency arithmetic on fabricated logs, and
a CPU run of the whole bench (tiny ET, one process against two gloo processes at the same global
batch) whose rows are checked against the run folders and by hand."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_ddp.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_ddp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


METRICS = """epoch,lr,step,train_forces_mae,train_loss,val_forces_mae,val_loss
0,,24,,,900.0,1.5
0,0.0001,24,950.0,1.7,,
1,,49,,,800.0,1.2
1,,49,,,,
1,0.0002,49,850.0,1.3,,
2,,74,,,700.0,1.1
2,0.0003,74,750.0,1.2,,
3,0.0004,99,650.0,1.0,,
3,,99,,,600.0,0.9
"""
# a step row in the middle of epoch 2 (train_loss_step only) must not count as an epoch end
METRICS_STEP_ROW = "epoch,step,train_loss_step,train_loss\n1,30,1.4,\n"

STDOUT = """1.0000\tbefore training: val F MAE 1000 meV/Å
2.5000\tmodel: ETPotential, 8,866 parameters; data: 200 training / 8 validation structures
9.0000\tepoch 1/4 | train: F MAE 950 meV/Å | val: F MAE 900 meV/Å | lr 0.0001 | 6.2 s
11.5000\tepoch 2/4 | train: F MAE 850 meV/Å | val: F MAE 800 meV/Å | lr 0.0002 | 2.4 s
14.0000\tepoch 3/4 | train: F MAE 750 meV/Å | val: F MAE 700 meV/Å | lr 0.0003 | 2.4 s
16.5000\tepoch 4/4 | train: F MAE 650 meV/Å | val: F MAE 600 meV/Å | lr 0.0004 | 2.2 s
16.6000\trun folder      /tmp/x
"""


def test_throughput_from_fabricated_logs(tmp_path):
    bench = _bench()
    (tmp_path / "metrics.csv").write_text(METRICS)
    stamps = bench.epoch_stamps(STDOUT.splitlines())
    assert stamps == {1: (9.0, 6.2), 2: (11.5, 2.4), 3: (14.0, 2.4), 4: (16.5, 2.2)}
    steps = bench.epoch_steps(tmp_path / "metrics.csv")
    assert steps == {1: 24, 2: 49, 3: 74, 4: 99}
    out = bench.throughput(stamps, steps, global_batch=8)
    # epochs 2-4: 75 steps between the line of epoch 1 (9.0 s) and that of epoch 4 (16.5 s)
    assert out["timed_steps"] == 75 and out["timed_s"] == pytest.approx(7.5) and out["timed_epochs"] == 3
    assert out["steps_per_s"] == pytest.approx(10.0)
    assert out["structures_per_s"] == pytest.approx(80.0)
    assert out["steps_per_epoch"] == [25]
    assert out["steps_per_s_printed"] == pytest.approx(75 / 7.0)  # 2.4 + 2.4 + 2.2 s printed
    # only the first epoch: nothing to time
    with pytest.raises(bench.BenchError, match="epoch 1 and a later epoch"):
        bench.throughput({1: (9.0, 6.2)}, {1: 24}, 8)
    (tmp_path / "steps.csv").write_text(METRICS_STEP_ROW)
    assert bench.epoch_steps(tmp_path / "steps.csv") == {}


def test_efficiency_and_mae_summary():
    bench = _bench()
    rows = [
        {"workload": "ani1x", "devices": 1, "mode": "eager", "seed": 0, "structures_per_s": 1000.0, "test_forces_mae": 50.0},
        {"workload": "ani1x", "devices": 1, "mode": "graph", "seed": 0, "structures_per_s": 2500.0, "test_forces_mae": 51.0},
        {"workload": "ani1x", "devices": 2, "mode": "eager", "seed": 0, "structures_per_s": 1700.0, "test_forces_mae": 52.0},
        {"workload": "ani1x", "devices": 1, "mode": "eager", "seed": 1, "structures_per_s": 1100.0, "test_forces_mae": 53.0},
        {"workload": "ani1x", "devices": 2, "mode": "eager", "seed": 1, "structures_per_s": 2000.0, "test_forces_mae": 49.0},
        {"workload": "ani1x", "devices": 2, "mode": "eager", "seed": 2, "structures_per_s": 2000.0},  # no 1-GPU partner
    ]
    bench.add_comparisons(rows)
    assert rows[2]["efficiency"] == pytest.approx(1700 / 2000)
    assert rows[2]["vs_1gpu_graph"] == pytest.approx(1700 / 2500)
    assert rows[4]["efficiency"] == pytest.approx(2000 / 2200) and rows[4]["vs_1gpu_graph"] is None
    assert rows[5]["efficiency"] is None
    assert "efficiency" not in rows[0]
    assert bench.efficiency(1700.0, 1000.0) == pytest.approx(0.85)
    s = bench.summarise(rows)["ani1x"]
    assert s["efficiency_mean"] == pytest.approx((0.85 + 2000 / 2200) / 2) and s["efficiency_runs"] == 2
    assert s["seed_spread"] == pytest.approx(3.0)  # 1-GPU eager 50 vs 53 (2-GPU 52 vs 49 is also 3)
    assert s["ddp_minus_1gpu_eager"] == pytest.approx(1.0) and s["agree_within_noise"] is True
    text = bench.markdown({"meta": {"date": "d", "device": "x", "epochs": 3}, "rows": rows, "summary": {"ani1x": s},
                           "skipped": ["ani1x 2 GPU eager seed 3 (needs ~100 s, 5 s left)"]})
    assert "| ani1x | 2 | eager | 0 |" in text and "0.85" in text and "not run (time limit)" in text


def test_captured_rows_are_compared_with_the_captured_one_gpu_run():
    """Mode ``captured`` (train.cuda_graph true, compile off) runs on two GPUs too: its efficiency
    is against the 1-GPU captured run, ``vs 1-GPU graph`` against the 1-GPU auto run; the eager
    summary is unchanged and the captured one is reported beside it."""
    bench = _bench()
    assert bench.MODES["captured"] == ["train.cuda_graph=true", "train.cuda_graph_compile=false"]
    rows = [
        {"workload": "md17", "devices": 1, "mode": "graph", "seed": 0, "structures_per_s": 1200.0},
        {"workload": "md17", "devices": 1, "mode": "captured", "seed": 0, "structures_per_s": 1000.0},
        {"workload": "md17", "devices": 1, "mode": "eager", "seed": 0, "structures_per_s": 400.0},
        {"workload": "md17", "devices": 2, "mode": "captured", "seed": 0, "structures_per_s": 1800.0},
        {"workload": "md17", "devices": 2, "mode": "eager", "seed": 0, "structures_per_s": 700.0},
    ]
    bench.add_comparisons(rows)
    assert rows[3]["efficiency"] == pytest.approx(1800 / 2000) and rows[3]["vs_1gpu_graph"] == pytest.approx(1.5)
    assert rows[4]["efficiency"] == pytest.approx(700 / 800)
    s = bench.summarise(rows)["md17"]
    assert s["efficiency_mean"] == pytest.approx(700 / 800) and s["efficiency_runs"] == 1
    assert s["efficiency_by_mode"]["captured"] == {"mean": pytest.approx(0.9), "runs": 1}
    text = bench.markdown({"meta": {"date": "d", "device": "x", "epochs": 3}, "rows": rows, "summary": {"md17": s}})
    assert "| md17 | 2 | captured | 0 |" in text and "(captured: 0.9 over 1)" in text
    plans, notes = bench.build_plans(["md17"], [1, 2], [0], ["graph", "captured", "eager"], {"md17": 8},
                                     Path("/tmp/runs"))
    assert [(p["devices"], p["mode"]) for p in plans] == [(1, "graph"), (1, "captured"), (1, "eager"),
                                                          (2, "captured"), (2, "eager")]
    assert notes and "does not run under DDP" in notes[0]


TINY = ["--set", "data.train_size=32", "--set", "data.val_size=8", "--set", "data.test_size=16",
        "--set", "model.embedding_dimension=16", "--set", "model.num_layers=1", "--set", "model.num_heads=2",
        "--set", "model.num_rbf=8", "--set", "trainer.num_threads=1"]


def _run_bench(tmp_path, shared_data, *extra, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, str(SCRIPT), "--accelerator", "cpu", "--data", str(shared_data / "md17"),
                           "--workloads", "md17", "--out", str(tmp_path / "out"), *extra, *TINY],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


@pytest.mark.slow
def test_cpu_one_process_against_two_gloo_processes(tmp_path, shared_data):
    import torch

    done = _run_bench(tmp_path, shared_data, "--devices", "1,2", "--seeds", "0", "--modes", "eager", "--epochs", "3",
                      "--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    out = tmp_path / "out"
    report = json.loads((out / "bench_ddp.json").read_text())
    rows = {r["devices"]: r for r in report["rows"]}
    assert sorted(rows) == [1, 2] and all("error" not in r for r in rows.values())
    assert rows[1]["per_device_batch"] == 8 and rows[2]["per_device_batch"] == 4
    for row in rows.values():
        assert row["steps_per_s"] > 0
        assert row["structures_per_s"] == pytest.approx(row["steps_per_s"] * 8)
        assert row["steps_per_epoch"] == [4] and row["timed_steps"] == 8  # 32 / 8 per epoch, epochs 2-3 timed
        assert 0 < row["timed_s"] < row["process_s"]
        ckpt = torch.load(Path(row["run_dir"]) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == 12  # every rank steps once per global batch
        errors = json.loads((Path(row["run_dir"]) / "evaluate_test" / "errors.json").read_text())
        assert errors["metrics"]["n_structures"] == 16
        assert row["test_forces_mae"] == errors["metrics"]["forces_mae"] > 0
        assert row["captured"] is False  # eager mode (and the CPU)
        assert Path(row["run_dir"]).parent == tmp_path / "runs"
        kept = out / "logs" / Path(row["run_dir"]).name  # the small files come back to --out
        assert (kept / "metrics.csv").read_text() == (Path(row["run_dir"]) / "logs" / "csv" / "metrics.csv").read_text()
        assert {"stdout.log", "errors.json", "config.resolved.yaml"} <= {p.name for p in kept.iterdir()}
    # the efficiency by hand; the global batch was the same, so the two trainings were the same
    assert rows[2]["efficiency"] == pytest.approx(rows[2]["steps_per_s"] / (2 * rows[1]["steps_per_s"]))
    assert rows[2]["test_forces_mae"] == pytest.approx(rows[1]["test_forces_mae"], rel=1e-4)
    # the same split file for both runs, given to both
    split = report["meta"]["splits"]["md17"]
    assert split["sizes"] == {"train": 32, "val": 8, "test": 16}
    for row in rows.values():
        assert f"data.split_file={split['path']}" in row["command"]
    assert report["meta"]["strategy_used"] in ("ddp", "ddp_find_unused_parameters_true")
    text = (out / "bench_ddp.md").read_text()
    assert "| md17 | 2 | eager | 0 | 8 |" in text and "does not run under DDP" in text
    assert (out / "bench_ddp.png").stat().st_size > 0
    assert not list(out.glob("*.tmp")) and not list(out.rglob("*.ckpt"))


def test_time_limit_skips_runs_and_says_so(tmp_path, shared_data):
    done = _run_bench(tmp_path, shared_data, "--devices", "1", "--seeds", "0,1", "--modes", "eager", "--epochs", "2",
                      "--time-limit-s", "1", "--estimate-s", "60")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "bench_ddp.json").read_text())
    assert report["rows"] == [] and len(report["skipped"]) == 2
    assert report["skipped"][0].startswith("md17 1 GPU eager seed 0 (needs ~60 s")
    assert "skipped: md17 1 GPU eager seed 1" in done.stdout


@pytest.mark.parametrize("args, message", [(["--epochs", "1"], "--epochs must be >= 2"),
                                           (["--global-batch", "md17=3", "--devices", "1,2"], "not divisible by 2"),
                                           (["--modes", "compiled"], "'compiled' is not one of eager, graph")])
def test_bad_arguments_are_one_line_before_any_run(tmp_path, shared_data, args, message):
    done = _run_bench(tmp_path, shared_data, *args, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not (tmp_path / "out" / "runs").exists()
