#!/usr/bin/env python3
"""Whole training runs on one GPU: time to the first step, steps per second, ms per step.

Where ``bench/bench_train.py`` times one optimiser step on a fixed batch, this runs
``torchmdx.train.run.train`` end to end (Lightning loop, data loader, EMA, metrics, validation,
checkpoints) for a wall-clock budget, once per variant, each in a fresh process, and reports
what a user feels:

- ``first step s``: from the start of ``Trainer.fit`` to the end of the first optimiser step
  (CUDA-graph warm-up, capture and any compile included);
- ``epoch 1 s`` and the steady ``steps/s`` (over the epochs after the second, validation
  included) and ``ms/step`` (1000 / steps/s);
- ``captures`` / ``replays`` / ``eager`` steps of the step runner, and where batches were made.

Workloads (``--workloads``):

- ``md17``: ``configs/et_md17.yaml`` (TorchMD-NET's ET-MD17 recipe, batch 8) on the aspirin
  sample, 700 / 50 training / validation frames;
- ``ani1x``: the same ET on the ANI-1x sample (600 conformations of 3-11 atoms, molecules of
  different sizes), batch 32, energy + force loss.

Variants (``--variants``): ``eager`` (``train.cuda_graph: false``), ``graph`` (captured step,
model's autograd, training split on the GPU), ``graph-host`` (the same with the host loader),
``graph-compiled`` (the captured step through the traced, compiled whole-model graph),
``graph-ref`` (``graph`` with ``model.backend: torch``, the reference message path; ``backend:
auto`` trains on it too since 2026-12-05), ``graph-fused`` (``model.backend: triton``: the fused
kernels in the forward and force passes),
``graph-compiled-again`` (run after ``graph-compiled``: the second start, from the compile cache),
``graph-background`` (``train.cuda_graph_compile: background``: eager captured steps while a child
process compiles, then the compiled step).
``NAME:SECONDS`` gives one variant its own budget (``--variants graph:40,graph-compiled:160``).

    python bench/bench_train_run.py --data .benchdata --seconds 60 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "eager": ["train.cuda_graph=false"],
    "graph": ["train.cuda_graph=true", "train.cuda_graph_compile=false", "data.device_resident=true"],
    "graph-host": ["train.cuda_graph=true", "train.cuda_graph_compile=false", "data.device_resident=false"],
    "graph-compiled": ["train.cuda_graph=true", "train.cuda_graph_compile=true", "data.device_resident=true"],
    # the captured eager step at once, the traced graph compiled by a child process meanwhile and
    # switched to when it is in the cache (torchmdx.train.precompile); run it first, or with
    # TORCHMDX_COMPILE_CACHE pointing at an empty folder, to measure a first start
    "graph-background": ["train.cuda_graph=true", "train.cuda_graph_compile=background", "data.device_resident=true"],
    # the same again: its compiled graphs come from the compile cache (torchmdx.nn.compile_cache),
    # so "first step s" is the second start of a compiled run
    "graph-compiled-again": ["train.cuda_graph=true", "train.cuda_graph_compile=true", "data.device_resident=true"],
    # the torch reference message path in the captured step (the fused kernels' double backward
    # is the reference anyway; 21.4 vs 24.3 ms per 32-aspirin step on an H100, 2026-11-25)
    "graph-ref": ["train.cuda_graph=true", "train.cuda_graph_compile=false", "data.device_resident=true",
                  "model.backend=torch"],
    # the fused Triton kernels in the training step's forward and force passes (``backend: auto``
    # trains on the reference path since 2026-12-05: torchmdx.nn.potential.AUTO_TRAINING_BACKEND)
    "graph-fused": ["train.cuda_graph=true", "train.cuda_graph_compile=false", "data.device_resident=true",
                    "model.backend=triton"],
}


def find(data: Path, name: str) -> Path:
    """``name`` in ``data`` or one of its sub-folders (the shared layout or a flat .benchdata)."""
    hits = sorted(data.rglob(name))
    if not hits:
        raise SystemExit(f"{data}: no {name} (give --data the folder holding the sample files)")
    return hits[0]


def workload_overrides(name: str, data: Path) -> list[str]:
    common = ["trainer.max_epochs=100000", "trainer.enable_progress_bar=false", "train.early_stopping_patience=null",
              "data.num_workers=0", "data.cache_dir=/tmp/torchmdx_bench_cache"]
    if name == "md17":
        return common + [f"data.path={find(data, 'md17_aspirin_xtb.npz')}", "data.train_size=700", "data.val_size=50",
                         "data.test_size=250", "data.seed=0"]
    if name == "ani1x":
        return common + [f"data.path={find(data, 'ani1x_xtb.h5')}", "data.format=ani1x",
                         "data.energy_key=gfn2xtb.energy", "data.forces_key=gfn2xtb.forces", "data.train_size=500",
                         "data.val_size=50", "data.test_size=50", "data.batch_size=32", "data.seed=0"]
    raise SystemExit(f"unknown workload {name!r}; choose md17 or ani1x")


def child(args) -> None:
    """One run in this process; prints one JSON line."""
    import lightning as L
    import torch

    from torchmdx.train.config import load_run_config
    from torchmdx.train.run import train

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class Clock(L.Callback):
        def __init__(self):
            self.fit_start = None
            self.first_step = None
            self.epochs = []

        def on_fit_start(self, trainer, module):
            self.fit_start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if self.first_step is None:
                sync()
                self.first_step = time.perf_counter() - self.fit_start

        def on_fit_end(self, trainer, module):
            datamodule = trainer.datamodule
            self.stats = {**(module.cuda_graph_stats or {}), "batches": datamodule.training_batches,
                          "buckets": datamodule.training_buckets}

        def on_train_epoch_start(self, trainer, module):
            self._epoch_start, self._epoch_step = time.perf_counter(), trainer.global_step

        def on_validation_epoch_end(self, trainer, module):
            if trainer.sanity_checking or not hasattr(self, "_epoch_start"):
                return
            sync()
            self.epochs.append((time.perf_counter() - self._epoch_start, trainer.global_step - self._epoch_step))

    cfg = load_run_config(ROOT / "configs" / "et_md17.yaml", args.set)
    clock = Clock()
    start = time.perf_counter()
    result = train(cfg, callbacks=[clock])
    total = time.perf_counter() - start
    steady = clock.epochs[2:] or clock.epochs[1:] or clock.epochs
    seconds = sum(t for t, _ in steady)
    steps = sum(n for _, n in steady)
    print("RESULT " + json.dumps({
        "first_step_s": clock.first_step, "epoch1_s": clock.epochs[0][0] if clock.epochs else None,
        "steps_per_s": steps / seconds if seconds else None, "epochs": len(clock.epochs),
        "global_step": result.get("global_step"), "total_s": total,
        "best": {k: v for k, v in result.items() if k.startswith("best_")},
        "stats": getattr(clock, "stats", None),
    }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--seconds", type=int, default=60, help="wall-clock budget of each run (trainer.max_time)")
    parser.add_argument("--workloads", default="md17,ani1x")
    parser.add_argument("--variants", default="eager,graph,graph-host",
                        help="comma-separated; NAME:SECONDS gives one variant its own budget")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    for spec in args.variants.split(","):  # all checked before the first run (each costs GPU minutes)
        name, _, seconds = spec.partition(":")
        if name not in VARIANTS or (seconds and not seconds.isdigit()):
            raise SystemExit(f"--variants: {spec!r} is not NAME or NAME:SECONDS with NAME one of {', '.join(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for workload in args.workloads.split(","):
        data = args.data
        for spec in args.variants.split(","):
            name, _, seconds = spec.partition(":")
            seconds = int(seconds) if seconds else args.seconds
            run_dir = Path("/tmp") / f"bench_train_run_{workload}_{name}_{os.getpid()}"
            budget = time.strftime("%H:%M:%S", time.gmtime(seconds))
            sets = workload_overrides(workload, data) + VARIANTS[name] + [f"trainer.max_time=00:{budget}",
                                                                         f"run_dir={run_dir}"]
            command = [sys.executable, __file__, "--child"] + [f"--set={s}" for s in sets]
            began = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 240)
            wall = time.perf_counter() - began
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            row = {"workload": workload, "variant": name, "seconds": seconds, "process_s": wall}
            if line is None:
                row["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
                (args.out / f"train_run_{workload}_{name}.log").write_text(proc.stdout + proc.stderr)
            else:
                row.update(json.loads(line[len("RESULT "):]))
            notes = [l for l in (proc.stdout + proc.stderr).splitlines() if "cuda_graph" in l or "device_resident" in l
                     or "packed" in l or l.startswith("epoch ")]
            row["notes"] = notes[:3] + notes[-2:]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"{'workload':8s} {'variant':15s} {'first step s':>12s} {'epoch 1 s':>10s} {'steps/s':>9s} {'ms/step':>8s} "
          f"{'steps':>7s} {'best':>30s}")
    for row in rows:
        if "error" in row:
            print(f"{row['workload']:8s} {row['variant']:15s} error: {row['error']}")
            continue
        sps = row.get("steps_per_s") or 0
        best = ", ".join(f"{k[5:]}={v:.4g}" for k, v in (row.get("best") or {}).items())
        print(f"{row['workload']:8s} {row['variant']:15s} {row['first_step_s'] or 0:12.2f} {row['epoch1_s'] or 0:10.2f} "
              f"{sps:9.1f} {1000 / sps if sps else 0:8.2f} {row['global_step'] or 0:7d} {best:>30s}")
    path = args.out / "bench_train_run.json"
    path.write_text(json.dumps(rows, indent=1))
    print(f"\nwritten {path}")


if __name__ == "__main__":
    from torchmdx.cli.main import run_script

    sys.exit(run_script(main))  # a TorchmdxError is one error line (torchmdx bench runs this file)
