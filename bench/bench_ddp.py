#!/usr/bin/env python3
"""One GPU against two (DDP) at the same global batch: throughput, scaling efficiency, test errors.

Issue 20. Each (workload, devices, seed, mode) is a fresh ``python -m torchmdx.cli train
configs/et_md17.yaml --set ...`` process (Lightning's DDP launcher re-executes that command for
rank 1), for a fixed number of epochs, in its own run folder, with the same split file for every
run of a workload (drawn once, ``data.split_file``). Then ``torchmdx evaluate`` on the test split.

What is measured, per run:

- ``steps/s``: optimiser steps per second after the first epoch (start-up, warm-up, captures and
  compiles excluded). The epoch summary line that rank 0 prints for epoch k (``epoch k/N | ... |
  T s``) comes out when epoch k+1 starts (after epoch k's validation and checkpoint), the one of
  the last epoch when training ends; this script stamps every output line as it arrives
  (``stdout.log`` in the run folder: ``seconds<TAB>line``). The window is from the line of epoch
  1 to the line of the last epoch; the optimiser steps in it come from Lightning's CSV log
  (``logs/csv/metrics.csv``: the ``step`` of each epoch's ``train_loss`` row; under DDP every
  rank steps once per global batch, so this counts global steps). Validation and checkpoints
  are inside the window: what a user waits for.
- ``structures/s`` = steps/s x the global batch (per-device batch x devices). Every workload's
  training split is a multiple of the global batch (checked), so each step is a full batch and
  this is exact.
- ``efficiency`` (2-GPU rows) = 2-GPU throughput / (2 x 1-GPU throughput) at the same global
  batch, against the 1-GPU run of the same mode, workload and seed: ``eager`` rows against the
  1-GPU eager run (``train.cuda_graph: false``), ``captured`` rows (``train.cuda_graph: true``,
  compile off: the captured step, which under DDP all-reduces the gradients inside the graph;
  docs/training.md) against the 1-GPU captured run. ``graph`` (``auto``, the recipe's
  background compile) is run on one GPU only: ``auto`` resolves to eager with several devices.
  ``vs 1-GPU graph`` is the 2-GPU throughput over the 1-GPU ``graph`` run's (what one GPU gives
  a user).
- ``test F MAE`` (meV/Å) and ``test E MAE/atom`` (meV/atom): ``torchmdx evaluate`` of the run's
  ``model.pt`` (EMA weights of the best validation epoch) on the test split.

Workloads: ``md17``: the ET-MD17 recipe on the aspirin sample, 704 / 50 / 246 frames, global
batch 8; ``ani1x``: the same ET on the ANI-1x sample (molecules of 3-11 atoms), 480 / 50 / 70,
global batch 32 (bench_train_run.py's ``ani1x`` overrides).

DDP strategy: ``--strategy auto`` uses ``ddp`` when every parameter receives a gradient in a
training step, else ``ddp_find_unused_parameters_true`` with a note (checked on the CPU before
any run; the recipe's gated-equivariant head used to leave its last block's ``vec2_proj``
without a gradient, which plain ``ddp`` refuses at the first step: the head now gives it a zero
gradient, as TorchMD-NET's does). The throughput, efficiency and report code: ``bench_ddp_report.py``.

    python bench/bench_ddp.py --data .benchdata --epochs 40 --workloads md17 --out $OUT

Outputs (``--out``, each rewritten after every run, temporary name then rename):
``bench_ddp.json``, ``bench_ddp.md``, ``bench_ddp.png``, ``split_<workload>.npz``; run folders
under ``--runs-dir`` (default ``--out/runs``; elsewhere, their logs, CSV and test errors are copied
to ``--out/logs/<run>``: checkpoints are tens of MB each).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ddp_report import (  # noqa: E402, F401 - the report half, beside this script (its names re-exported)
    GRAPH_UNDER_DDP,
    BenchError,
    add_comparisons,
    efficiency,
    epoch_stamps,
    epoch_steps,
    markdown,
    summarise,
    throughput,
    write_outputs,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "et_md17.yaml"

#: training step modes: bench name -> overrides
MODES = {
    "eager": ["train.cuda_graph=false"],
    # what one GPU gives a user of the recipe: captured step, the recipe's background compile
    # (auto resolves to eager with several devices: not run there)
    "graph": ["train.cuda_graph=auto"],
    # the captured step on any number of devices (under DDP it all-reduces the gradients inside
    # the graph; docs/training.md "Under DDP"), with the model's autograd (no compile: not
    # available under DDP), so that its 1-GPU run is the like-for-like baseline of its 2-GPU run
    "captured": ["train.cuda_graph=true", "train.cuda_graph_compile=false"],
}
#: why the graph mode is not run with several devices (the table says it)

WORKLOADS = {
    "md17": {"file": "md17_aspirin_xtb.npz", "global_batch": 8,
             "sets": ["data.format=md17", "data.train_size=704", "data.val_size=50", "data.test_size=246"]},
    "ani1x": {"file": "ani1x_xtb.h5", "global_batch": 32,
              "sets": ["data.format=ani1x", "data.energy_key=gfn2xtb.energy", "data.forces_key=gfn2xtb.forces",
                       "data.train_size=480", "data.val_size=50", "data.test_size=70"]},
}
COMMON = ["trainer.enable_progress_bar=false", "train.early_stopping_patience=null", "data.num_workers=0",
          "data.seed=0", "trainer.log_every_n_steps=50"]

#: NCCL / PyTorch / NVSHMEM NVLink multicast off in every run (where not set already)
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}



def find(data: Path, name: str) -> Path:
    hits = sorted(data.rglob(name))
    if not hits:
        raise BenchError(f"{data}: no {name} (give --data the folder holding the sample files)")
    return hits[0]


def parse_list(text: str, what: str, choices=None, cast=str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = [cast(t) for t in items]
    except ValueError:
        raise BenchError(f"--{what}: {text!r} is not a comma-separated list of {cast.__name__}s") from None
    if not values:
        raise BenchError(f"--{what} is empty")
    if choices is not None:
        bad = [v for v in values if v not in choices]
        if bad:
            raise BenchError(f"--{what}: {bad[0]!r} is not one of {', '.join(map(str, choices))}")
    return values


def global_batches(text: str, workloads: list) -> dict:
    out = {w: WORKLOADS[w]["global_batch"] for w in workloads}
    for item in [t for t in (text or "").split(",") if t.strip()]:
        name, _, value = item.partition("=")
        if name not in WORKLOADS or not value.isdigit() or int(value) < 1:
            raise BenchError(f"--global-batch: {item!r} is not WORKLOAD=N (N >= 1, WORKLOAD one of {', '.join(WORKLOADS)})")
        out[name] = int(value)
    return out


def draw_split(sets: list, path: Path) -> dict:
    """Draw the workload's split once (its config's sizes and data.seed) into ``path``; build the cache."""
    import hashlib

    from torchmdx.data import H5Dataset, build_cache
    from torchmdx.data.splits import make_split, save_split
    from torchmdx.train.config import load_run_config

    cfg = load_run_config(RECIPE, sets).data_config
    cache = build_cache(cfg.path, cfg.format, cfg.cache_dir, **cfg.reader_options())
    dataset = H5Dataset(cache)
    split = make_split(dataset.structures, cfg)
    save_split(split, path, dataset.info["fingerprint"].get("hash", ""))
    digest = hashlib.blake2b(b"".join(split[p].astype("int64").tobytes() for p in ("train", "val", "test")),
                             digest_size=8).hexdigest()
    return {"path": str(path), "sizes": split.sizes(), "digest": digest}


def unused_parameters(sets: list) -> list:
    """Parameters without a gradient after one training step of the configured model on two tiny
    molecules (CPU): plain DDP refuses such a model at its first step."""
    import dataclasses

    import torch
    from torch_geometric.data import Batch, Data

    from torchmdx.config import to_dict
    from torchmdx.train.config import load_run_config
    from torchmdx.train.module import PotentialModule

    cfg = load_run_config(RECIPE, sets, check_data=False)
    dtype = torch.float64 if cfg.model_config.dtype == "float64" else torch.float32
    module = PotentialModule(model=to_dict(cfg.model_config), train=to_dict(dataclasses.replace(cfg.train, cuda_graph=False)))
    gen = torch.Generator().manual_seed(0)
    items = []
    for z in ([8, 1, 1], [6, 1, 1, 1, 8]):
        n = len(z)
        pos = (torch.randn(n, 3, generator=gen) * 0.8 + torch.arange(n)[:, None] * 0.7).to(dtype)
        items.append(Data(z=torch.tensor(z), pos=pos, energy=torch.zeros(1, dtype=dtype),
                          forces=torch.randn(n, 3, generator=gen).to(dtype)))
    loss = module._step(Batch.from_data_list(items), "train")
    loss.backward()
    return [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]


# ---------------------------------------------------------------------------- one run
def run_training(command: list, run_dir: Path, timeout: float, env: dict) -> dict:
    """Run ``command`` (in its own process group: rank 1 is rank 0's child) with every output line
    stamped into ``run_dir/stdout.log``; stderr to ``stderr.log``. Returns rc, wall seconds, timed_out."""
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(run_dir / "stderr.log", "w") as err, open(run_dir / "stdout.log", "w") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=run_dir,
                                start_new_session=True, bufsize=1)

        def pump():
            for line in proc.stdout:
                log.write(f"{time.monotonic() - start:.4f}\t{line}")
                log.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        reader.join(timeout=10)
    return {"rc": proc.returncode, "wall_s": time.monotonic() - start, "timed_out": timed_out}


def captured_step(run_dir: Path):
    """Whether the run trained through the CUDA-graph step: ``train.cuda_graph`` as the run resolved
    it (``auto`` -> true/false), saved in the last checkpoint's hyper-parameters; None if unreadable."""
    try:
        import torch

        ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        return bool(ckpt["hyper_parameters"]["train"]["cuda_graph"])
    except Exception:  # noqa: BLE001 - no checkpoint (a failed run): unknown
        return None


KEPT = ("stdout.log", "stderr.log", "evaluate.log", "config.resolved.yaml", "logs/csv/metrics.csv",
        "evaluate_test/errors.json", "learning_curve.png")


def keep_logs(run_dir: Path, dest: Path, copy: bool) -> None:
    """The small files of a run folder into ``dest`` (when the run folders live elsewhere)."""
    import shutil

    if not copy:
        return
    for name in KEPT:
        if (run_dir / name).is_file():
            target = dest / Path(name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / name, target)


def evaluate(run_dir: Path, device: str) -> dict:
    """``torchmdx evaluate model.pt`` on the run's test split (in this process); the errors."""
    from torchmdx.cli.main import main

    out = run_dir / "evaluate_test"
    args = [str(run_dir / "model.pt"), "--data", str(run_dir / "config.resolved.yaml"), "--run", str(run_dir),
            "--split", "test", "--out", str(out), "--device", device, "--no-progress"]
    with open(run_dir / "evaluate.log", "w") as log, contextlib.redirect_stdout(log):
        rc = main(["evaluate", *args])
    if rc != 0:
        raise BenchError(f"torchmdx evaluate exited {rc}")
    metrics = json.loads((out / "errors.json").read_text())["metrics"]
    return {"test_forces_mae": metrics.get("forces_mae"), "test_energy_mae": metrics.get("energy_mae"),
            "test_energy_per_atom_mae": metrics.get("energy_per_atom_mae"), "test_structures": metrics.get("n_structures"),
            "evaluate_command": "torchmdx evaluate " + " ".join(args)}


def one_run(plan: dict, args, env: dict) -> dict:
    row = {k: plan[k] for k in ("workload", "devices", "mode", "seed", "global_batch")}
    row["per_device_batch"] = plan["global_batch"] // plan["devices"]
    run_dir = plan["run_dir"]
    command = [sys.executable, "-m", "torchmdx.cli", "train", str(RECIPE)] + [f"--set={s}" for s in plan["sets"]]
    row["command"] = " ".join(command)
    row["run_dir"] = str(run_dir)
    result = run_training(command, run_dir, plan["timeout"], env)
    row.update(process_s=result["wall_s"], rc=result["rc"])
    stderr = (run_dir / "stderr.log").read_text(errors="replace").splitlines()
    notes = [line for line in stderr if line.startswith("warning:") or "cuda_graph" in line]
    stdout = (run_dir / "stdout.log").read_text(errors="replace").splitlines() if (run_dir / "stdout.log").is_file() else []
    notes += [line.partition("\t")[2] for line in stdout if "cuda_graph" in line or line.partition("\t")[2].startswith("compiled ")]
    row["notes"] = list(dict.fromkeys(notes))[:8]
    row["captured"] = captured_step(run_dir)
    if result["timed_out"]:
        row["error"] = f"timed out after {plan['timeout']:.0f} s"
    elif result["rc"] != 0:
        tail = [line for line in stderr if line.strip()]
        row["error"] = (tail[-1] if tail else f"exit {result['rc']}")[:300]
    try:
        stamps = epoch_stamps((run_dir / "stdout.log").read_text().splitlines())
        steps = epoch_steps(run_dir / "logs" / "csv" / "metrics.csv")
        row.update(throughput(stamps, steps, plan["global_batch"]))
        row["epochs_done"] = max(stamps) if stamps else 0
        expected = plan["train_size"] // plan["global_batch"]
        if row["steps_per_epoch"] != [expected]:
            row.setdefault("warnings", []).append(f"steps per epoch {row['steps_per_epoch']}, expected {expected}")
    except (BenchError, OSError, ValueError, KeyError) as exc:
        row.setdefault("error", f"no throughput: {exc}")
    if "error" not in row:
        try:
            row.update(evaluate(run_dir, args.eval_device))
        except Exception as exc:  # noqa: BLE001 - one failed evaluation must not end the bench
            row["error"] = f"evaluate: {type(exc).__name__}: {exc}"[:300]
    return row


# ---------------------------------------------------------------------------- main
def build_plans(workloads, devices, seeds, modes, batches, runs) -> tuple:
    plans, notes = [], []
    for workload in workloads:
        gb = batches[workload]
        for n in devices:
            if gb % n:
                raise BenchError(f"{workload}: global batch {gb} is not divisible by {n} devices")
        for seed in seeds:  # seed by seed: both sides of an efficiency come early
            for n in devices:
                for mode in modes:
                    if n > 1 and mode == "graph":
                        note = f"{workload} {n} GPUs graph: not run ({GRAPH_UNDER_DDP})"
                        if note not in notes:
                            notes.append(note)
                        continue
                    plans.append({"workload": workload, "devices": n, "mode": mode, "seed": seed, "global_batch": gb,
                                  "run_dir": runs / f"{workload}_{n}gpu_{mode}_seed{seed}"})
    return plans, notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                        help="folder holding md17_aspirin_xtb.npz / ani1x_xtb.h5 (searched recursively)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    parser.add_argument("--workloads", default="md17,ani1x")
    parser.add_argument("--devices", default="1,2")
    parser.add_argument("--seeds", default="0,1", help="train.seed of the runs (weights and shuffling)")
    parser.add_argument("--modes", default="graph,captured,eager",
                        help="graph (train.cuda_graph auto: captured on one GPU; not run with several), captured "
                             "(true, compile off: captured on every device count, DDP included), eager (false); "
                             "runs go seed by seed, devices ascending, modes in this order")
    parser.add_argument("--epochs", type=int, default=20, help="trainer.max_epochs of every run (>= 2)")
    parser.add_argument("--accelerator", choices=("auto", "cpu"), default="auto")
    parser.add_argument("--strategy", choices=("auto", "ddp", "ddp_find_unused_parameters_true"), default="auto",
                        help="auto: ddp unless a parameter gets no gradient (then ddp_find_unused_parameters_true)")
    parser.add_argument("--global-batch", default="", help="WORKLOAD=N,... (default md17=8, ani1x=32)")
    parser.add_argument("--run-timeout-s", type=float, default=540.0, help="per run")
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="start no run whose estimated time would pass this budget (from the start); say which")
    parser.add_argument("--estimate-s", type=float, default=120.0,
                        help="time assumed for a run before one of its kind has finished")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="run folders (default OUT/runs; checkpoints are large: on a GPU machine give /tmp/...); "
                             "their logs, CSV and errors.json are copied to OUT/logs/<run>")
    parser.add_argument("--cache-dir", type=Path, default=None, help="HDF5 caches of the data (default OUT/cache)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra override for every run (e.g. a smaller model); repeatable")
    args = parser.parse_args(argv)
    try:
        return _main(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(args) -> int:
    began = time.monotonic()
    workloads = parse_list(args.workloads, "workloads", WORKLOADS)
    devices = parse_list(args.devices, "devices", cast=int)
    seeds = parse_list(args.seeds, "seeds", cast=int)
    modes = parse_list(args.modes, "modes", MODES)
    if min(devices) < 1:
        raise BenchError(f"--devices: counts must be >= 1, got {args.devices!r}")
    if args.epochs < 2:
        raise BenchError(f"--epochs must be >= 2 (the first epoch is not timed), got {args.epochs}")
    batches = global_batches(args.global_batch, workloads)
    data = args.data
    for w in workloads:
        find(data, WORKLOADS[w]["file"])  # every input found before any run
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs = (args.runs_dir or out / "runs").resolve()
    plans, notes = build_plans(workloads, devices, seeds, modes, batches, runs)
    for plan in plans:
        if plan["run_dir"].exists() and any(plan["run_dir"].iterdir()):
            raise BenchError(f"{plan['run_dir']} exists: give another --out (runs are never mixed)")

    import torch

    cuda = args.accelerator != "cpu" and torch.cuda.is_available()
    args.eval_device = "cuda" if cuda else "cpu"
    device = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if cuda else "CPU") + \
        f", torch {torch.__version__}"
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    for key, value in NO_MULTICAST.items():  # the lent machines keep NVLink multicast off; so do these runs
        env.setdefault(key, value)
    report = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device,
                       "epochs": args.epochs, "argv": sys.argv, "recipe": str(RECIPE.relative_to(ROOT)),
                       "commands": [" ".join([sys.executable] + sys.argv)], "splits": {}, "notes": notes},
              "rows": [], "skipped": []}

    # splits (once per workload) and the DDP strategy
    workload_sets, train_sizes = {}, {}
    for w in workloads:
        spec = WORKLOADS[w]
        cache = (args.cache_dir or out / "cache").resolve()
        sets = [f"data.path={find(data, spec['file'])}", f"data.cache_dir={cache}"] + spec["sets"] + COMMON + args.set
        split_path = out / f"split_{w}.npz"
        info = draw_split(sets, split_path)
        report["meta"]["splits"][w] = info
        train_sizes[w] = info["sizes"]["train"]
        if train_sizes[w] % batches[w]:
            raise BenchError(f"{w}: {train_sizes[w]} training structures is not a multiple of the global batch "
                             f"{batches[w]} (a partial batch would make structures/s inexact)")
        workload_sets[w] = sets + [f"data.split_file={split_path}"]
    strategy, note = args.strategy, None
    if max(devices) > 1:
        unused = unused_parameters(workload_sets[workloads[0]])
        report["meta"]["unused_parameters"] = unused
        if args.strategy == "auto":
            strategy = "ddp_find_unused_parameters_true" if unused else "ddp"
        if unused:
            note = (f"parameters without a gradient in a training step: {', '.join(unused)}; plain ddp refuses them"
                    + ("" if strategy == "ddp" else "; find_unused_parameters costs an autograd-graph walk per step"))
            print(f"note: {note}; strategy {strategy}", flush=True)
    report["meta"].update(strategy_used=strategy if max(devices) > 1 else None, strategy_note=note)

    accelerator = "cpu" if args.accelerator == "cpu" else "auto"
    estimates = {}
    for plan in plans:
        key = (plan["workload"], plan["devices"], plan["mode"])
        estimate = estimates.get(key, max(estimates.get(k) or 0 for k in estimates) if estimates else args.estimate_s)
        elapsed = time.monotonic() - began
        remaining = None if args.time_limit_s is None else args.time_limit_s - elapsed
        label = f"{plan['workload']} {plan['devices']} GPU {plan['mode']} seed {plan['seed']}"
        if remaining is not None and estimate > remaining:
            report["skipped"].append(f"{label} (needs ~{estimate:.0f} s, {max(remaining, 0):.0f} s left)")
            print(f"skipped: {report['skipped'][-1]}", flush=True)
            write_outputs(report, out)
            continue
        n = plan["devices"]
        plan["sets"] = workload_sets[plan["workload"]] + MODES[plan["mode"]] + [
            f"trainer.max_epochs={args.epochs}", f"trainer.accelerator={accelerator}", f"trainer.devices={n}",
            f"trainer.strategy={strategy if n > 1 else 'auto'}", f"data.batch_size={plan['global_batch'] // n}",
            f"train.seed={plan['seed']}", f"run_dir={plan['run_dir']}"]
        plan["train_size"] = train_sizes[plan["workload"]]
        plan["timeout"] = args.run_timeout_s if remaining is None else min(args.run_timeout_s, remaining)
        print(f"=== {label} {time.strftime('%H:%M:%S')}", flush=True)
        row = one_run(plan, args, env)
        estimates[key] = row["process_s"]
        keep_logs(plan["run_dir"], out / "logs" / plan["run_dir"].name, runs != out / "runs")
        report["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("command", "evaluate_command", "notes")}), flush=True)
        write_outputs(report, out)
    write_outputs(report, out)
    print(markdown(report))
    print(f"written {out / 'bench_ddp.json'}, {out / 'bench_ddp.md'}, {out / 'bench_ddp.png'}")
    return 0 if all("error" not in r for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
