"""Grids of training runs for scaling studies: ``torchmdx sweep config.yaml --grid key=v1,v2 ...``.

A sweep is a base training config, a grid (every combination of the values of each grid key:
``data.train_size``, ``model.embedding_dimension``, ``trainer.max_steps``, ``model.architecture``,
... any config key) and optional named *variants* (sets of keys that go together, such as an
architecture with its own size keys), crossed with the grid. It can live in the config::

    sweep:
      grid:
        data.train_size: [1000, 4000, 16000]
      variants:
        et_small:   {model.architecture: et, model.embedding_dimension: 64}
        gatr_small: {model.architecture: gatr, model.channels: 8, model.scalar_channels: 16}

``--grid key=v1,v2`` on the command line adds (or replaces) grid keys; values are parsed as YAML.

Sweep folder (``--out``, default ``sweeps/<config name>``)::

    sweep.json           the plan: base config (resolved), points (id, overrides, labels)
    splits/train_N.npz   nested splits: one validation and one test set for every point, the
                         training sets nested (train_N ⊂ train_M for N < M)
    runs/<point id>/     each point's run folder (torchmdx train's), with sweep_result.json, or
                         sweep_failure.json (the error, one line) while its last attempt failed
    results.csv          one row per finished point (written to a temporary name, then renamed)
    results.md           the same as a table, and the fitted power laws
    error_vs_compute.png, error_vs_data.png   log-log plots (torchmdx.train.sweep_analysis)

Resume: a point whose ``sweep_result.json`` exists is skipped; one with a ``last.ckpt`` but no
result continues from it (``torchmdx train --resume``); others start. A point that fails (training
diverged) does not stop the others: the sweep ends with one line naming every failed point, and
results.md names the planned points without a result (a failed one with its error). Every point is checked
(config keys, types, values, data file) before the first one trains, so an unknown key or a
value of the wrong type is one line naming the point.

Per point the row holds: the test errors of the run's model (energy and force MAE/RMSE, meV and
meV/Å, on the common test set), the parameter count, the FLOPs of one training step (counted,
:mod:`torchmdx.train.flops`) per structure, the training FLOPs (= per structure × optimiser
steps × batch size), the device, the wall seconds of its training run, the mean number of
points that shared its device meanwhile (``concurrent_workers``) and its device-seconds: its
fair share of the device, ∫ dt / k(t) over its training run, k(t) the number of points training
on the same device (same host, device kind and ``CUDA_VISIBLE_DEVICES``) at time t, from the
recorded start and end of every finished point (:func:`device_shares`), times the devices the
run itself used; alone on its device that is the wall time. With several GPUs (``--devices``)
or ``--workers-per-device N`` > 1, points run in worker processes, N per GPU
(``CUDA_VISIBLE_DEVICES``), or N on the CPU with its threads split between them; otherwise one
after the other in this process.

This module runs the points and collects their results; the grid, the points, their configs and
splits and the plan file are in :mod:`torchmdx.train.sweep_plan`, the fits and plots in
:mod:`torchmdx.train.sweep_analysis`.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from torchmdx.errors import ConfigError, TorchmdxError, one_line_warnings
from torchmdx.io_utils import atomic_write, jsonable
from torchmdx.train.sweep_plan import (FAILURE, PLAN, RESERVED_KEYS, RESULT, RUNS, SPLITS, SweepPoint, _set,
                                       check_workers_per_device, load_base, nested_splits, parse_grid, plan_points,
                                       point_config, point_values, prepare_sweep, read_json, read_plan, read_result,
                                       sweep_folder, sweep_section)

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"

CSV_COLUMNS = [
    "point", "variant", "family", "architecture", "algebra", "parameters", "train_size", "batch_size", "steps", "epochs",
    "flops_per_structure", "training_flops", "device", "device_seconds", "wall_seconds", "concurrent_workers",
    "test_energy_mae", "test_energy_rmse",
    "test_forces_mae", "test_forces_rmse", "test_structures", "augment",
]


# ---------------------------------------------------------------------------- one point
def _plan_point(plan: dict, point_id: str):
    for entry in plan["points"]:
        if entry["id"] == point_id:
            return entry
    raise ConfigError(f"sweep point {point_id!r} is not in the plan")


def entry_config(plan: dict, entry: dict, sweep_dir: Path):
    point = SweepPoint(overrides=entry["overrides"], variant=entry["variant"], labels=entry["labels"])
    base = copy.deepcopy(plan["base"])
    if entry.get("split_file"):
        _set(base, "data.split_file", entry["split_file"])
    return point_config(base, point, sweep_dir)


def run_point(sweep_dir: Path, point_id: str) -> dict:
    """Train one point (or continue it), measure it, write its sweep_result.json; returns the row. A point
    that fails leaves sweep_failure.json (its error in one line) in its run folder, and results.md names it."""
    sweep_dir = Path(sweep_dir)
    plan = read_plan(sweep_dir)
    entry = _plan_point(plan, point_id)
    cfg = entry_config(plan, entry, sweep_dir)
    run_dir = Path(cfg.run_dir)
    result_path = run_dir / RESULT
    if result_path.is_file():
        return read_result(result_path)
    try:
        row = _train_point(cfg, entry, point_id, run_dir)
    except Exception as exc:  # marked inside its own folder too (round 34 left it: only results.md said so);
        # an interrupted point (Ctrl-C) is not a failed one: it continues from last.ckpt
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(run_dir / FAILURE, "w") as handle:
            json.dump({"point": point_id, "error": " ".join(str(exc).split()) or type(exc).__name__,
                       "type": type(exc).__name__, "time": time.time()}, handle, indent=2)
        raise
    (run_dir / FAILURE).unlink(missing_ok=True)  # a retry that succeeded
    return row


def failure_line(sweep_dir: Path, point_id: str) -> Optional[str]:
    """The error a point's last attempt failed with (its run folder's sweep_failure.json), or None."""
    path = Path(sweep_dir) / RUNS / point_id / FAILURE
    try:
        return str(json.loads(path.read_text()).get("error", ""))
    except (OSError, ValueError, AttributeError):
        return None


def _train_point(cfg, entry: dict, point_id: str, run_dir: Path) -> dict:
    """Train, measure and score one point; write and return its row."""
    import torch

    from torchmdx.train.run import CHECKPOINT_DIR, LAST, train

    result_path = run_dir / RESULT
    flops = measure_step_flops(cfg)
    resume = (run_dir / CHECKPOINT_DIR / f"{LAST}.ckpt").is_file()
    if resume:
        adopt_moved_split(run_dir, cfg, point_id)
    device = "cuda" if (cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()) else "cpu"
    started = time.time()
    start = time.perf_counter()
    outcome = train(cfg, resume=resume)
    seconds = time.perf_counter() - start
    run_devices = max(cfg.trainer.devices, 1) if isinstance(cfg.trainer.devices, int) else 1
    test = test_errors(cfg, Path(outcome["model"]), device)
    steps = int(outcome.get("global_step", 0))
    batch_size = cfg.data_config.batch_size
    per_structure = flops["total"] / max(flops["structures"], 1)
    row = {
        "point": point_id, "variant": entry["variant"] or "", "labels": entry["labels"],
        "architecture": getattr(cfg.model_config, "architecture", "et"),
        "algebra": getattr(cfg.model_config, "algebra", None),
        "parameters": flops["parameters"], "train_size": test["train_size"], "batch_size": batch_size,
        "steps": steps, "epochs": int(outcome.get("epochs", 0)),
        "flops_per_structure": per_structure, "training_flops": per_structure * steps * batch_size,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        # device_seconds: alone on the device; write_results shares it out among overlapping points
        "device_seconds": seconds * run_devices, "wall_seconds": seconds, "concurrent_workers": 1.0,
        "run_devices": run_devices, "device_key": device_key(device), "train_start": started,
        "train_end": started + seconds,
        "test_energy_mae": test.get("energy_mae"), "test_energy_rmse": test.get("energy_rmse"),
        "test_forces_mae": test.get("forces_mae"), "test_forces_rmse": test.get("forces_rmse"),
        "test_structures": test["test_structures"], "augment": cfg.train.augment,
        "resumed": resume, "run_dir": str(run_dir),
    }
    with atomic_write(result_path, "w") as handle:
        json.dump(jsonable(row), handle, indent=2)
    return row


def device_key(device: str) -> str:
    """What points share when they train at once: this host's CPU, or its GPU(s) as this process
    sees them (``CUDA_VISIBLE_DEVICES``, set per worker by the sweep)."""
    if device == "cpu":
        return f"{socket.gethostname()}/cpu"
    return f"{socket.gethostname()}/cuda/{os.environ.get('CUDA_VISIBLE_DEVICES', '')}"


def device_shares(rows: list[dict]) -> None:
    """Set each row's ``device_seconds`` to its share of its device and ``concurrent_workers`` to
    the mean number of points training on that device during its run (wall / share): over the
    row's interval [train_start, train_end], ∫ dt / k(t), k(t) the number of finished points of
    the same ``device_key`` training at t (the row included), times ``run_devices``. Rows without
    the times (written before 2026-12-06) keep theirs. The shares of points that overlapped add
    up to the time their device was busy with them; a run killed by a timeout and resumed counts
    only its last segment (the killed segment left no record), like before."""
    timed = [r for r in rows if isinstance(r.get("train_start"), (int, float)) and isinstance(r.get("train_end"), (int, float))
             and r.get("device_key")]
    by_key: dict = {}
    for row in timed:
        by_key.setdefault(row["device_key"], []).append(row)
    for group in by_key.values():
        edges = sorted({t for r in group for t in (r["train_start"], r["train_end"])})
        for row in group:
            share = 0.0
            for a, b in zip(edges[:-1], edges[1:]):
                if b <= row["train_start"] or a >= row["train_end"]:
                    continue
                k = sum(1 for r in group if r["train_start"] < b and r["train_end"] > a)
                share += (b - a) / max(k, 1)
            wall = row["train_end"] - row["train_start"]
            row["concurrent_workers"] = wall / share if share > 0 else 1.0
            row["device_seconds"] = share * row.get("run_devices", 1)


def adopt_moved_split(run_dir: Path, cfg, point_id: str) -> None:
    """A point's run to be resumed whose saved config names another split file than the plan's:
    the sweep folder was copied or moved (the plan holds ``<sweep folder>/splits/train_N.npz``,
    recorded as given, so a copied folder, or one run from another working folder, names other
    paths). ``torchmdx train --resume`` refuses any change of ``data.split_file``; here the split
    is compared by *content*: when the plan's split file holds the same train/validation/test
    indices as the run's own ``splits.npz`` (the split it trained on), the saved config is made to
    name the plan's file (written atomically) and the run resumes, with one note line. Indices that
    differ are one line saying to delete the point's run folder (it then trains from the start)."""
    import warnings

    import numpy as np

    from torchmdx.config import load_yaml
    from torchmdx.data.datamodule import SPLIT_FILE_NAME
    from torchmdx.data.splits import PARTS, load_split
    from torchmdx.train.run import RESOLVED_CONFIG

    saved_path = run_dir / RESOLVED_CONFIG
    wanted = cfg.data_config.split_file
    if wanted is None or not saved_path.is_file():
        return
    try:
        saved = load_yaml(saved_path)
    except TorchmdxError:
        return  # train --resume names the damaged file
    data = saved.get("data") if isinstance(saved, dict) else None
    if not isinstance(data, dict) or data.get("split_file") == wanted:
        return
    recorded = data.get("split_file")
    own = run_dir / SPLIT_FILE_NAME
    remedy = f"delete {run_dir} to train the point again from the start"
    if recorded is None or not own.is_file():
        raise ConfigError(f"sweep point {point_id}: its run in {run_dir} was started with data.split_file {recorded!r}, "
                          f"the sweep's plan names {wanted!r}, and the run has no {SPLIT_FILE_NAME} to compare "
                          f"them by content; {remedy}")
    with warnings.catch_warnings():  # not asked here: "made from a dataset with different content"
        warnings.simplefilter("ignore")
        ran, planned = load_split(own), load_split(wanted)
    differ = [part for part in PARTS if not np.array_equal(np.sort(ran[part]), np.sort(planned[part]))]
    if differ or ran.n_structures != planned.n_structures:
        what = f"the {', '.join(differ)} indices" if differ else "the number of structures"
        raise ConfigError(f"sweep point {point_id}: its run in {run_dir} trained on another split than the sweep's "
                          f"{wanted} ({what} differ from its {SPLIT_FILE_NAME}); {remedy}")
    data["split_file"] = wanted
    import yaml

    with atomic_write(saved_path, "w") as handle:
        yaml.safe_dump(saved, handle, sort_keys=False)
    print(f"note: sweep point {point_id}: its run was started with data.split_file {recorded}; the sweep folder "
          f"was copied or moved, and {wanted} holds the same split: resuming with it", flush=True)


def measure_step_flops(cfg) -> dict:
    """FLOPs of one training step on the first training batch (CPU, the model untrained)."""
    from torchmdx.config import to_dict
    from torchmdx.data.datamodule import TorchmdxDataModule
    from torchmdx.data.loader import batches_in_order
    from torchmdx.nn.model_file import build_model
    from torchmdx.train.flops import parameter_count, training_step_flops

    module = TorchmdxDataModule(cfg.data_config)
    module.setup("fit")
    indices = module.split["train"][: cfg.data_config.batch_size]
    batch = next(iter(batches_in_order(module.dataset, indices, len(indices))))
    model = build_model(to_dict(cfg.model_config))
    flops = training_step_flops(model, cfg.train, batch)
    flops["parameters"] = parameter_count(model)
    return flops


def test_errors(cfg, model_path: Path, device: str) -> dict:
    """Errors of the run's model on its test split (meV, meV/Å)."""
    from torchmdx.data.datamodule import TorchmdxDataModule
    from torchmdx.nn.model_file import load_model
    from torchmdx.train.evaluate import error_metrics, predict

    module = TorchmdxDataModule(cfg.data_config, run_dir=Path(cfg.run_dir))
    module.setup("fit")
    indices = module.split["test"]
    out = {"train_size": int(len(module.split["train"])), "test_structures": int(len(indices))}
    if len(indices) == 0:
        return out
    model = load_model(model_path, device=device)
    batch_size = cfg.data_config.inference_batch_size or cfg.data_config.batch_size
    out.update(error_metrics(predict(model, module.dataset, indices, batch_size=batch_size, device=device)))
    return out


# ---------------------------------------------------------------------------- the sweep
def finished_rows(sweep_dir: Path, plan: dict) -> list[dict]:
    rows = []
    for entry in plan["points"]:
        path = sweep_dir / RUNS / entry["id"] / RESULT
        if path.is_file():
            rows.append(read_result(path))
    return rows


def write_results(sweep_dir: Path, plan: dict) -> list[dict]:
    """results.csv (atomically), results.md and the plots from the finished points."""
    from torchmdx.train.sweep_analysis import analyse, family

    rows = finished_rows(sweep_dir, plan)
    device_shares(rows)
    for row in rows:
        row["family"] = family(row)
    label_keys = sorted({k for entry in plan["points"] for k in entry["labels"]})
    columns = CSV_COLUMNS[:2] + label_keys + CSV_COLUMNS[2:]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**{k: row.get("labels", {}).get(k, "") for k in label_keys},
                         **{k: _csv_value(row.get(k)) for k in CSV_COLUMNS}})
    with atomic_write(sweep_dir / RESULTS_CSV, "w") as handle:
        handle.write(buffer.getvalue())
    done = {row["point"] for row in rows}
    missing = []
    for entry in plan["points"]:
        if entry["id"] not in done:
            error = failure_line(sweep_dir, entry["id"])
            missing.append(entry["id"] if error is None else f"{entry['id']} (failed: {error})")
    analyse(rows, sweep_dir, label_keys, missing=missing)
    return rows


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def check_devices(devices) -> None:
    """A one-line ConfigError unless ``devices`` is 'auto', a count >= 0 or a list of distinct GPU ids."""
    if devices in (None, "auto") or isinstance(devices, int) and not isinstance(devices, bool) and devices >= 0:
        return
    text = str(devices).strip()
    parts = [d.strip() for d in text.split(",")] if "," in text else [text]
    if not all(p.isdigit() for p in parts) or ("," in text and len(set(parts)) != len(parts)):
        raise ConfigError(f"--devices {devices!r}: give auto, a GPU count (e.g. 2) or distinct GPU ids (e.g. 0,1)")


def gpu_count() -> int:
    """The GPUs this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def visible_gpus(devices) -> list[str]:
    """The GPU ids to run points on: ``devices`` 'auto' (every visible GPU), a count or a list of visible ids."""
    available = gpu_count()
    if devices in (None, "auto"):
        return [str(i) for i in range(available)]
    check_devices(devices)
    if isinstance(devices, str) and "," in devices:
        ids = [d.strip() for d in devices.split(",") if d.strip()]
        missing = next((d for d in ids if int(d) >= available), None)
        if missing is not None:  # was taken: "GPU 0: <point>" lines, and the points trained on the CPU (round 23)
            raise ConfigError(f"--devices {devices}: GPU {missing} is not among the {available} GPU(s) visible"
                              + (f" (ids 0 to {available - 1})" if available else "; leave --devices out to train on "
                                 "the CPU"))
        return ids
    count = int(devices)
    if count > available:
        raise ConfigError(f"--devices {count}: only {available} GPU(s) visible")
    return [str(i) for i in range(count)]


def worker_visible_devices(gpu: str) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` of a worker on ``gpu``, an id as this process numbers its GPUs: under a
    ``CUDA_VISIBLE_DEVICES`` of this process's own (a SLURM job's or a shared machine's allocation, e.g. '2,3'),
    that list's entry, so that GPU 0 is the allocation's first; it was the machine's GPU 0, outside the
    allocation (round 23)."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    entries = [entry.strip() for entry in given.split(",") if entry.strip()] if given else []
    return entries[int(gpu)] if entries and int(gpu) < len(entries) else gpu


def run_sweep(config_path, grid_items: list[str], out: Optional[str] = None, overrides: Optional[list[str]] = None,
              devices=None, dry_run: bool = False, log=print, workers_per_device=None) -> dict:
    """Plan, validate, then train every unfinished point (module docstring). ``workers_per_device``
    (default: the config's ``sweep.workers_per_device``, else 1): points trained at once per GPU,
    or on the CPU, each in its own worker process."""
    check_devices(devices)
    if not dry_run and devices not in (None, "auto"):
        visible_gpus(devices)  # more GPUs than visible: refused before the plan is written (was after it)
    if workers_per_device is not None:
        workers_per_device = check_workers_per_device(workers_per_device)
    prepared = prepare_sweep(config_path, grid_items, out, overrides)
    sweep_dir, plan = prepared["sweep_dir"], prepared["plan"]
    if workers_per_device is None:
        workers_per_device = prepared.get("settings", {}).get("workers_per_device", 1)
    todo = [e["id"] for e in plan["points"] if not (sweep_dir / RUNS / e["id"] / RESULT).is_file()]
    log(f"sweep {sweep_dir}: {len(plan['points'])} points, {len(plan['points']) - len(todo)} finished, {len(todo)} to run")
    if dry_run:
        for entry in plan["points"]:
            state = "to run" if entry["id"] in todo else "finished"
            log(f"  {entry['id']}  ({state})")
        return {"sweep_dir": sweep_dir, "rows": finished_rows(sweep_dir, plan), "todo": todo}
    gpus = visible_gpus(devices) if devices not in (None, "auto") or _has_gpus(workers_per_device) else []
    slots = worker_slots(gpus, workers_per_device)
    if len(slots) > 1 and len(todo) > 0:
        if not gpus:
            log(f"{workers_per_device} workers on the CPU, {slots[0][2]} torch thread(s) each")
        _run_parallel(sweep_dir, plan, todo, slots, log)
    else:
        # a point that fails (training diverged, a point's data refused) no longer stops the points after it,
        # as in the worker processes: its line is logged, the others run, then one line names every failure
        # (round 34: the sweep stopped at it, unnamed in the error line, and results.md did not say a point was missing)
        failures = []
        for k, point_id in enumerate(todo):
            log(f"[{k + 1}/{len(todo)}] {point_id}")
            try:
                run_point(sweep_dir, point_id)
            except TorchmdxError as exc:
                failures.append(f"{point_id} ({exc})")
                log(f"[{k + 1}/{len(todo)}] {point_id} failed: {exc}")
            write_results(sweep_dir, plan)
        if failures:
            from torchmdx.errors import TrainingError

            raise TrainingError(f"{len(failures)} of {len(todo)} sweep point(s) failed: {'; '.join(failures)}; the "
                                f"others' results are in {sweep_dir / RESULTS_CSV}; run the sweep again to retry them")
    rows = write_results(sweep_dir, plan)
    return {"sweep_dir": sweep_dir, "rows": rows, "todo": todo}


def _has_gpus(workers_per_device: int = 1) -> bool:
    """Whether 'auto' runs worker processes on GPUs: several visible, or one shared by several workers."""
    import torch

    if not torch.cuda.is_available():
        return False
    return torch.cuda.device_count() > 1 or (workers_per_device > 1 and torch.cuda.device_count() >= 1)


def worker_slots(gpus: list[str], workers_per_device: int) -> list[tuple]:
    """(GPU id or None for the CPU, worker number, torch threads) per worker process: N per GPU,
    or N on the CPU; the host's cores are split evenly between all of them."""
    devices = list(gpus) or [None]
    count = len(devices) * workers_per_device
    from torchmdx.devices import usable_cpus

    threads = max(1, usable_cpus() // count)
    return [(gpu, k, threads) for gpu in devices for k in range(workers_per_device)]


def _slot_name(slot: tuple, workers_per_device: int) -> str:
    gpu, k, _ = slot
    name = f"GPU {gpu}" if gpu is not None else "CPU"
    return name + (f" worker {k + 1}" if workers_per_device > 1 or gpu is None else "")


def _run_parallel(sweep_dir: Path, plan: dict, todo: list[str], slots: list[tuple], log) -> None:
    """One worker process per slot (N per GPU, or N on the CPU); the table is rewritten whenever
    a point finishes. If this process is stopped (SIGTERM from ``timeout``, Ctrl-C), its workers are
    stopped too; their points continue from their checkpoints next time."""
    queue = list(todo)
    running: dict[tuple, tuple] = {}
    failures = []
    per_device = 1 + max(k for _, k, _ in slots)

    def stop(signum, frame):  # turn SIGTERM into SystemExit so that the finally below stops the workers
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop) if _main_thread() else None
    try:
        while queue or running:
            for slot in slots:
                if slot not in running and queue:
                    point_id = queue.pop(0)
                    run_dir = sweep_dir / RUNS / point_id
                    run_dir.mkdir(parents=True, exist_ok=True)
                    logfile = open(run_dir / "sweep.log", "a")
                    gpu, _, threads = slot
                    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
                    if gpu is not None:
                        env["CUDA_VISIBLE_DEVICES"] = worker_visible_devices(gpu)
                    process = subprocess.Popen([sys.executable, "-m", "torchmdx.train.sweep", str(sweep_dir), point_id,
                                                "--threads", str(threads)],
                                               env=env, stdout=logfile, stderr=subprocess.STDOUT)
                    running[slot] = (process, point_id, logfile)
                    log(f"{_slot_name(slot, per_device)}: {point_id}")
            time.sleep(0.5)
            for slot, (process, point_id, logfile) in list(running.items()):
                if process.poll() is None:
                    continue
                logfile.close()
                del running[slot]
                if process.returncode != 0:
                    failures.append(point_id)
                    log(f"{_slot_name(slot, per_device)}: {point_id} failed (exit {process.returncode}); "
                        f"see {sweep_dir / RUNS / point_id / 'sweep.log'}")
                write_results(sweep_dir, plan)
    finally:
        for process, _, logfile in running.values():  # stopped early: leave no worker behind
            if process.poll() is None:
                process.terminate()
        for process, _, logfile in running.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                process.kill()
            logfile.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if failures:
        from torchmdx.errors import TrainingError

        raise TrainingError(f"{len(failures)} sweep point(s) failed ({', '.join(failures)}); their logs are in "
                            f"{sweep_dir / RUNS}/<point>/sweep.log; run the sweep again to retry them")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _worker(argv: list[str]) -> int:
    threads = None
    if len(argv) == 4 and argv[2] == "--threads" and argv[3].isdigit():
        threads, argv = int(argv[3]), argv[:2]
    if len(argv) != 2:
        print("usage: python -m torchmdx.train.sweep SWEEP_DIR POINT_ID [--threads N]", file=sys.stderr)
        return 2
    if threads:
        import torch

        torch.set_num_threads(threads)  # trainer.num_threads, when the config sets it, still wins (train())
    try:
        # a command-line process (its output is the point's sweep.log): one line per warning, as `torchmdx` prints
        # them ("split was made from a dataset with different content" had Python's two lines and source path)
        with one_line_warnings():
            run_point(Path(argv[0]), argv[1])
    except TorchmdxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":  # pragma: no cover - the per-GPU worker
    sys.exit(_worker(sys.argv[1:]))


__all__ = ["SweepPoint", "parse_grid", "plan_points", "prepare_sweep", "run_point", "run_sweep", "write_results",
           "device_shares", "device_key", "worker_slots", "check_workers_per_device",
           # re-exported from torchmdx.train.sweep_plan (imported from here by the CLI and tests)
           "PLAN", "RESULT", "RUNS", "SPLITS", "RESERVED_KEYS", "sweep_section", "point_values", "point_config",
           "load_base", "sweep_folder", "nested_splits", "read_json", "read_plan", "read_result"]
