"""Distributed data parallel training through Lightning on the CPU (gloo, two processes): the
same command with ``trainer.devices=2 trainer.strategy=ddp`` trains, and the validation errors
it logs are those of the checkpointed EMA weights over the *whole* validation split, each
structure counted once (the sums are reduced over both ranks; 20 structures in batches of 8:
rank 0 validates 8 + 4, rank 1 8 — uneven batch counts must neither hang nor repeat a batch)."""

import csv
import json
import os
import subprocess
import sys

import pytest
import yaml


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path, shared_data):
    from torchmdx.data import H5Dataset, load_split
    from torchmdx.train.evaluate import error_metrics, predict
    from torchmdx.train.export import potential_from_checkpoint

    config = {
        "data": {"path": str(shared_data / "md17" / "md17_ethanol_xtb.npz"), "cache_dir": str(tmp_path / "cache"),
                 "train_size": 32, "val_size": 20, "test_size": 0, "batch_size": 8, "inference_batch_size": 8},
        # the ET-MD17 recipe's head: its last block's vector output is unused, which plain DDP
        # refused at the first step before the head gave it a zero gradient
        "model": {"embedding_dimension": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8, "cutoff_upper": 4.0,
                  "backend": "torch", "seed": 0, "output_model": "gated_equivariant"},
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


def _ddp_config(shared_data, tmp_path, name, devices, batch_size, mmap=False, accelerator="cpu"):
    return {
        "data": {"path": str(shared_data / "md17" / "md17_ethanol_xtb.npz"), "cache_dir": str(tmp_path / "cache"),
                 "train_size": 44, "val_size": 8, "test_size": 0, "batch_size": batch_size, "inference_batch_size": 8,
                 "dtype": "float64", "seed": 3, "mmap": mmap},
        # model.seed left out: the weights come from the global generator (the default), which makes
        # the shuffle depend on Lightning re-seeding it when DDP starts
        "model": {"embedding_dimension": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8, "cutoff_upper": 4.0,
                  "backend": "torch", "dtype": "float64"},
        "train": {"lr": 2e-3, "lr_warmup_steps": 2, "energy_weight": 0.3, "force_weight": 0.7},
        "trainer": {"max_epochs": 2, "accelerator": accelerator, "devices": devices, "enable_progress_bar": False,
                    "num_threads": 1, "log_every_n_steps": 1, **({"strategy": "ddp"} if devices > 1 else {})},
        "run_dir": str(tmp_path / name),
    }


@pytest.mark.slow
def test_ddp_equals_one_process_with_the_same_global_batch(tmp_path, shared_data):
    """Two gloo processes with batches of 4 train exactly as one process with batches of 8: the
    same global batches every step (each structure once per epoch over the ranks; 44 training
    structures: 5 rounds of 2 x 4, then the last 4 dealt 2 + 2), DDP's averaged gradients equal
    the one-process gradient (molecules of one size: every rank's mean is over as many atoms),
    the references and normalisation fitted once by rank 0 and shared; the DDP run reads the
    cache memory-mapped, the other in memory. Weights, EMA weights, optimiser moments and logged
    epoch losses agree to float64 rounding."""
    _ddp_against_one_process(tmp_path, shared_data, "cpu", rtol=1e-9, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.slow
def test_ddp_equals_one_process_on_two_gpus(tmp_path, shared_data):
    """The same on two GPUs (NCCL): equal to the rounding of GPU scatter-adds, whose order varies."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    _ddp_against_one_process(tmp_path, shared_data, "gpu", rtol=1e-6, atol=1e-9)


def _ddp_against_one_process(tmp_path, shared_data, accelerator, rtol, atol):
    import numpy as np
    import torch

    from torchmdx.train.config import build_run_config
    from torchmdx.train.run import train

    # the DDP run reads the cache memory-mapped, the one-process run in memory
    ddp = _ddp_config(shared_data, tmp_path, "ddp", devices=2, batch_size=4, mmap=True, accelerator=accelerator)
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(ddp))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the same cache for both (built once here, so the runs do not race to build it)
    from torchmdx.data import build_cache

    build_cache(ddp["data"]["path"], cache_dir=ddp["data"]["cache_dir"])
    proc = subprocess.Popen([sys.executable, "-m", "torchmdx.cli", "train", str(tmp_path / "ddp.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    single = train(build_run_config(_ddp_config(shared_data, tmp_path, "one", devices=1, batch_size=8,
                                                accelerator=accelerator)))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "waiting" not in out  # Lightning's launcher starts rank 1 after rank 0 has fitted
    states = {name: torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
              for name in ("ddp", "one")}
    assert states["ddp"]["global_step"] == states["one"]["global_step"] == 12  # 6 steps x 2 epochs
    a, b = states["ddp"]["state_dict"], states["one"]["state_dict"]
    assert a.keys() == b.keys() and any("atomref" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)
    # the optimiser's first moments too (the state_dict holds the EMA average of the weights)
    moments = [s["exp_avg"] for s in states["ddp"]["optimizer_states"][0]["state"].values()]
    reference = [s["exp_avg"] for s in states["one"]["optimizer_states"][0]["state"].values()]
    assert len(moments) == len(reference) > 0
    for x, y in zip(moments, reference):
        torch.testing.assert_close(x, y, rtol=10 * rtol, atol=atol)
    logged = {}
    for name in ("ddp", "one"):
        with open(tmp_path / name / "logs" / "csv" / "metrics.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        logged[name] = {key: [float(r[key]) for r in rows if r.get(key)] for key in ("train_loss", "val_loss",
                                                                                      "val_forces_mae")}
    for key, values in logged["one"].items():
        assert len(values) == 2 and np.allclose(logged["ddp"][key], values, rtol=rtol, atol=0), key
    shared = [json.loads((tmp_path / name / "data_state.json").read_text()) for name in ("ddp", "one")]
    assert shared[0]["atomic_references"] == shared[1]["atomic_references"]
    assert single["global_step"] == 12
