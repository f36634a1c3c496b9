"""Distributed data parallel training through Lightning on the CPU (gloo, two processes): the
same command with ``trainer.devices=2 trainer.strategy=ddp`` trains, and the validation errors
it logs are those of the checkpointed EMA weights over the *whole* validation split, each
structure counted once (the sums are reduced over both ranks; 20 structures in batches of 8:
rank 0 validates 8 + 4, rank 1 8 — uneven batch counts must neither hang nor repeat a batch)."""

import csv
import os
import subprocess
import sys

import pytest
import yaml


def test_ddp_on_two_cpu_processes(tmp_path, shared_data):
    from torchmdx.data import H5Dataset, load_split
    from torchmdx.train.evaluate import error_metrics, predict
    from torchmdx.train.export import potential_from_checkpoint

    config = {
        "data": {"path": str(shared_data / "md17" / "md17_ethanol_xtb.npz"), "cache_dir": str(tmp_path / "cache"),
                 "train_size": 32, "val_size": 20, "test_size": 0, "batch_size": 8, "inference_batch_size": 8},
        "model": {"embedding_dimension": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8, "cutoff_upper": 4.0,
                  "backend": "torch", "seed": 0},
        "train": {"lr": 1e-3, "lr_warmup_steps": 2},
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "devices": 2, "strategy": "ddp",
                    "enable_progress_bar": False, "num_sanity_val_steps": 0, "num_threads": 1},
        "run_dir": str(tmp_path / "run"),
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torchmdx.cli", "train", str(tmp_path / "config.yaml")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model " in proc.stdout and (tmp_path / "run" / "model.pt").is_file()
    with open(tmp_path / "run" / "logs" / "csv" / "metrics.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val_forces_mae")]
    logged = {k: float(v) for k, v in rows[-1].items() if k.startswith("val_") and v}
    split = load_split(tmp_path / "run" / "splits.npz")
    cache = next((tmp_path / "cache").glob("*.h5"))
    ema = potential_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert len(split.val) == 20
    errors = error_metrics(predict(ema, H5Dataset(cache), split.val, batch_size=20))
    for key in ("forces_mae", "forces_rmse", "energy_mae"):
        assert logged[f"val_{key}"] == pytest.approx(errors[key], rel=2e-5), key
