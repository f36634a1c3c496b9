"""``torchmdx sweep --workers-per-device N`` (torchmdx.train.sweep) on the CPU, tiny models:

- two CPU workers train a 2 x 2 grid at once and give the rows of one worker in this process
  (same parameters, steps, FLOPs and test errors within float tolerance: fixed seeds);
- their device-seconds are their shares of the shared CPU: each point's ∫ dt / k(t), which add up
  to the time the CPU was busy with them (checked against the union of the recorded intervals);
- a sweep stopped by SIGTERM (as ``timeout`` stops it) stops its workers; the next call skips
  the finished points and continues the others from their checkpoints;
- bad values of --workers-per-device and of sweep.workers_per_device are one line, before
  anything is written.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from torchmdx.cli.main import main
from torchmdx.train import sweep as sweep_module

TINY = {"architecture": "transformer", "embedding_dimension": 8, "num_layers": 1, "num_heads": 2, "num_rbf": 4,
        "bias_hidden": 8, "cutoff_upper": 4.0}
GRID = ["data.train_size=8,16", "model.embedding_dimension=4,8"]
ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path, shared_data, epochs=1, sweep=None):
    config = {
        "data": {"path": str(shared_data / "md17" / "md17_ethanol_xtb.npz"), "train_size": 16, "val_size": 8,
                 "test_size": 16, "batch_size": 8, "cache_dir": str(tmp_path / "cache")},
        "model": dict(TINY),
        "train": {"lr": 1e-3, "lr_warmup_steps": 2, "early_stopping_patience": None, "seed": 3},
        "trainer": {"max_epochs": epochs, "accelerator": "cpu", "enable_progress_bar": False,
                    "num_sanity_val_steps": 0},
    }
    if sweep is not None:
        config["sweep"] = sweep
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_csv(path):
    import csv

    with open(path, newline="") as handle:
        return {row["point"]: row for row in csv.DictReader(handle)}


def union_length(intervals):
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


@pytest.mark.slow
def test_two_cpu_workers_give_the_rows_of_one(shared_data, tmp_path):
    config = write_config(tmp_path, shared_data)
    one, two = tmp_path / "one", tmp_path / "two"
    lines_one, lines_two = [], []
    sweep_module.run_sweep(config, GRID, str(one), workers_per_device=1, log=lines_one.append)
    sweep_module.run_sweep(config, GRID, str(two), workers_per_device=2, log=lines_two.append)
    assert not any(line.startswith("CPU worker") for line in lines_one)  # one worker: this process, one after another
    started = [line for line in lines_two if line.startswith("CPU worker ")]
    assert len(started) == 4 and {line.split(":")[0] for line in started} == {"CPU worker 1", "CPU worker 2"}
    rows_one, rows_two = read_csv(one / "results.csv"), read_csv(two / "results.csv")
    assert sorted(rows_one) == sorted(rows_two) and len(rows_one) == 4
    for point, a in rows_one.items():
        b = rows_two[point]
        for key in ("parameters", "train_size", "steps", "epochs", "test_structures"):
            assert a[key] == b[key], (point, key)
        assert float(a["flops_per_structure"]) == pytest.approx(float(b["flops_per_structure"]), rel=1e-6)
        for key in ("test_energy_mae", "test_energy_rmse", "test_forces_mae", "test_forces_rmse"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4), (point, key)
        assert float(a["concurrent_workers"]) == pytest.approx(1.0)  # alone: device-seconds = wall seconds
        assert float(a["device_seconds"]) == pytest.approx(float(a["wall_seconds"]), rel=1e-4)
    # two at once: each point's share of the CPU; the shares add up to the busy time
    import json

    results = [json.loads((two / "runs" / p / sweep_module.RESULT).read_text()) for p in rows_two]
    assert len({r["device_key"] for r in results}) == 1 and results[0]["device_key"].endswith("/cpu")
    intervals = [(r["train_start"], r["train_end"]) for r in results]
    shares = [float(rows_two[r["point"]]["device_seconds"]) for r in results]
    assert sum(shares) == pytest.approx(union_length(intervals), rel=1e-3)
    concurrent = [float(rows_two[r["point"]]["concurrent_workers"]) for r in results]
    assert all(1.0 <= c <= 2.0 + 1e-9 for c in concurrent)  # two workers: never more than two at once
    for r, c in zip(results, concurrent):  # shared exactly when another point's training overlapped
        others = [(a, b) for a, b in intervals if (a, b) != (r["train_start"], r["train_end"])]
        overlap = sum(max(0.0, min(b, r["train_end"]) - max(a, r["train_start"])) for a, b in others)
        assert (c > 1.0 + 1e-6) == (overlap > 1e-6), (c, overlap)
    for r, share in zip(results, shares):
        assert share <= r["wall_seconds"] * (1 + 1e-5)  # the CSV keeps 6 significant digits


def test_device_shares_against_hand_made_intervals():
    rows = [{"device_key": "h/cuda/0", "train_start": 0.0, "train_end": 10.0},
            {"device_key": "h/cuda/0", "train_start": 5.0, "train_end": 15.0},
            {"device_key": "h/cuda/0", "train_start": 6.0, "train_end": 8.0, "run_devices": 1},
            {"device_key": "h/cuda/1", "train_start": 0.0, "train_end": 10.0, "run_devices": 2},
            {"device_seconds": 7.0}]  # an old row without times keeps its value
    sweep_module.device_shares(rows)
    # [0,5) alone, [5,6) two, [6,8) three, [8,10) two, [10,15) alone
    assert rows[0]["device_seconds"] == pytest.approx(5 + 0.5 + 2 / 3 + 1)
    assert rows[1]["device_seconds"] == pytest.approx(0.5 + 2 / 3 + 1 + 5)
    assert rows[2]["device_seconds"] == pytest.approx(2 / 3)
    assert rows[2]["concurrent_workers"] == pytest.approx(3.0)
    assert rows[3]["device_seconds"] == pytest.approx(20.0) and rows[3]["concurrent_workers"] == pytest.approx(1.0)
    assert rows[4] == {"device_seconds": 7.0}
    assert sum(r["device_seconds"] for r in rows[:3]) == pytest.approx(15.0)


def _processes_naming(text):
    """Pids of live processes whose command line holds ``text`` (this test's unique folder)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(int(entry))
    return found


@pytest.mark.slow
def test_sigterm_stops_the_workers_and_the_next_call_resumes(shared_data, tmp_path, monkeypatch):
    config = write_config(tmp_path, shared_data, epochs=40)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    parent = subprocess.Popen([sys.executable, "-m", "torchmdx.cli.main", "sweep", str(config),
                               "--grid", "data.train_size=8,16", "--workers-per-device", "2", "--out", str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = []
    deadline = time.time() + 240
    while time.time() < deadline and parent.poll() is None:
        checkpoints = list((out / "runs").glob("*/checkpoints/last.ckpt")) if (out / "runs").is_dir() else []
        if checkpoints:
            break
        time.sleep(0.5)
    assert checkpoints and parent.poll() is None, "no checkpoint before the sweep ended"
    parent.send_signal(signal.SIGTERM)
    parent.wait(timeout=60)
    assert parent.returncode != 0
    time.sleep(0.5)
    assert _processes_naming(str(out)) == []  # the workers went with it
    finished = {p.parent.name for p in (out / "runs").glob(f"*/{sweep_module.RESULT}")}
    assert len(finished) < 2

    trained = []
    from torchmdx.train import run as run_module

    original = run_module.train

    def counting(cfg, resume=False, callbacks=None):
        trained.append((os.path.basename(cfg.run_dir), resume))
        return original(cfg, resume=resume, callbacks=callbacks)

    monkeypatch.setattr(run_module, "train", counting)
    lines = []
    sweep_module.run_sweep(config, ["data.train_size=8,16"], str(out), workers_per_device=1, log=lines.append)
    assert f"{len(finished)} finished, {2 - len(finished)} to run" in lines[0]
    assert {name for name, _ in trained} == {p.name for p in (out / "runs").iterdir()} - finished
    with_checkpoint = {p.parents[1].name for p in checkpoints}
    assert all(resume for name, resume in trained if name in with_checkpoint)
    assert len(read_csv(out / "results.csv")) == 2


@pytest.mark.parametrize("value", ["0", "-1", "2.5", "two", ""])
def test_bad_workers_per_device_is_one_line(shared_data, tmp_path, capsys, value):
    config = write_config(tmp_path, shared_data)
    out = tmp_path / "out"
    assert main(["sweep", str(config), "--grid", "data.train_size=8,16", "--workers-per-device", value,
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --workers-per-device") and "whole number >= 1" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("value", [0, -2, 1.5, "x", True])
def test_bad_sweep_workers_per_device_key_is_one_line(shared_data, tmp_path, capsys, value):
    config = write_config(tmp_path, shared_data, sweep={"grid": {"data.train_size": [8, 16]},
                                                        "workers_per_device": value})
    out = tmp_path / "out"
    assert main(["sweep", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config key 'sweep.workers_per_device'" in err[0] and "whole number >= 1" in err[0], err
    assert not out.exists()


def test_sweep_workers_per_device_key_is_used_and_the_option_wins(shared_data, tmp_path, monkeypatch):
    config = write_config(tmp_path, shared_data, sweep={"grid": {"data.train_size": [8, 16]}, "workers_per_device": 2})
    seen = []
    monkeypatch.setattr(sweep_module, "_run_parallel", lambda sweep_dir, plan, todo, slots, log: seen.append(slots))
    sweep_module.run_sweep(config, [], str(tmp_path / "a"), log=lambda line: None)
    assert [(gpu, k) for gpu, k, _ in seen[0]] == [(None, 0), (None, 1)]
    assert all(threads == max(1, len(os.sched_getaffinity(0)) // 2) for _, _, threads in seen[0])
    seen.clear()
    sweep_module.run_sweep(config, [], str(tmp_path / "a"), workers_per_device="3", log=lambda line: None)
    assert len(seen[0]) == 3
