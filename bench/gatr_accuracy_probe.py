"""Learning curves of single sweep variants on the CPU: why GATr trails (docs/sweep.md,
"Why GATr trails here").

Trains one variant of configs/sweep_equivariance.yaml on a small training set (validation every
epoch), then prints the validation force MAE per epoch (EMA weights, meV/Å) and the test errors
of the exported (best) model, and appends one JSON line to --log::

    python bench/gatr_accuracy_probe.py --variant gatr_s --epochs 30 --tag base
    python bench/gatr_accuracy_probe.py --variant gatr_s --set train.lr=1e-3 --tag lr1e-3

The rows of docs/sweep.md's table "Why GATr trails here" (2026-12-06): GATr as swept then is
``--set train.lr=5e-4 --set model.distance_normalised=false --set model.join_reference=block``
(the config's GATr variants now train at 1e-3 with both keys on); ``--set train.seed=2`` for the
second seed.

``--set`` takes the config's dotted keys (model.*, train.*, trainer.*, data.*), applied after the
variant's. One thread (``--threads``); the data split is the config's (seed 1), not the sweep's
nested split files, so the numbers compare with each other, not with the GPU sweep's table.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "sweep_equivariance.yaml"))
    parser.add_argument("--variant", required=True)
    parser.add_argument("--train-size", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--tag", default="")
    parser.add_argument("--log", default=str(ROOT / "bench" / "results" / "gatr_accuracy_probe.jsonl"))
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from torchmdx.config import apply_overrides
    from torchmdx.train.config import build_run_config
    from torchmdx.train.run import METRICS_CSV, train
    from torchmdx.train.sweep import test_errors
    from torchmdx.train.sweep_plan import _set, load_base

    base, _, variants = load_base(args.config)
    if args.variant not in variants:
        parser.error(f"unknown variant {args.variant!r}; the config has {', '.join(variants)}")
    values = base
    for key, value in variants[args.variant].items():
        _set(values, key, value)
    values["data"].update(train_size=args.train_size, num_workers=0)
    values["train"]["lr_warmup_steps"] = args.warmup
    values["trainer"].update(max_epochs=args.epochs, check_val_every_n_epoch=1, accelerator="cpu",
                             num_threads=args.threads)
    values = apply_overrides(values, list(args.overrides))
    tmp = Path(tempfile.mkdtemp(prefix="gatr_probe_"))
    try:
        values["run_dir"] = str(tmp / "run")
        cfg = build_run_config(values, "probe")
        start = time.perf_counter()
        outcome = train(cfg)
        seconds = time.perf_counter() - start
        curve = []
        with open(Path(outcome["run_dir"]) / METRICS_CSV) as handle:
            for row in csv.DictReader(handle):
                if row.get("val_forces_mae"):
                    curve.append(round(float(row["val_forces_mae"]), 1))
        test = test_errors(cfg, Path(outcome["model"]), "cpu")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record = {"variant": args.variant, "tag": args.tag, "overrides": args.overrides, "train_size": args.train_size,
              "epochs": args.epochs, "warmup": args.warmup, "steps": outcome.get("global_step"),
              "seconds": round(seconds, 1), "val_forces_mae": curve,
              "test_forces_mae": round(test.get("forces_mae", float("nan")), 1),
              "test_energy_mae": round(test.get("energy_mae", float("nan")), 1)}
    print(json.dumps(record), flush=True)
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
