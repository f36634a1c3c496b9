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
    runs/<point id>/     each point's run folder (torchmdx train's), with sweep_result.json
    results.csv          one row per finished point (written to a temporary name, then renamed)
    results.md           the same as a table, and the fitted power laws
    error_vs_compute.png, error_vs_data.png   log-log plots (torchmdx.train.sweep_analysis)

Resume: a point whose ``sweep_result.json`` exists is skipped; one with a ``last.ckpt`` but no
result continues from it (``torchmdx train --resume``); others start. Every point is checked
(config keys, types, values, data file) before the first one trains, so an unknown key or a
value of the wrong type is one line naming the point.

Per point the row holds: the test errors of the run's model (energy and force MAE/RMSE, meV and
meV/Å, on the common test set), the parameter count, the FLOPs of one training step (counted,
:mod:`torchmdx.train.flops`) per structure, the training FLOPs (= per structure × optimiser
steps × batch size), the device, and the device-seconds (wall time of the training run × the
one device it ran on). With several GPUs (``--devices``), points run in parallel, one process
per GPU (``CUDA_VISIBLE_DEVICES``); otherwise one after the other in this process.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from torchmdx.errors import ConfigError, TorchmdxError
from torchmdx.io_utils import atomic_write, jsonable

PLAN = "sweep.json"
RESULT = "sweep_result.json"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
RUNS = "runs"
SPLITS = "splits"
#: keys the sweep sets itself
RESERVED_KEYS = ("run_dir", "data.split_file")

CSV_COLUMNS = [
    "point", "variant", "family", "architecture", "algebra", "parameters", "train_size", "batch_size", "steps", "epochs",
    "flops_per_structure", "training_flops", "device", "device_seconds", "test_energy_mae", "test_energy_rmse",
    "test_forces_mae", "test_forces_rmse", "test_structures", "augment",
]


@dataclass
class SweepPoint:
    """One training run of the sweep: ``overrides`` {dotted key: value}, ``labels`` the grid
    values and variant that define it (for the table), ``id`` a folder name."""

    overrides: dict
    variant: Optional[str] = None
    labels: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        parts = ([self.variant] if self.variant else []) + [f"{k.split('.')[-1]}={v}" for k, v in self.labels.items()]
        readable = re.sub(r"[^A-Za-z0-9_.=+-]", "-", "__".join(parts))[:80] or "point"
        digest = hashlib.sha1(json.dumps(jsonable(self.overrides), sort_keys=True).encode()).hexdigest()[:6]
        return f"{readable}-{digest}"

    def describe(self) -> str:
        parts = ([f"variant {self.variant}"] if self.variant else []) + [f"{k}={v}" for k, v in self.labels.items()]
        return ", ".join(parts) or "the base config"


# ---------------------------------------------------------------------------- the plan
def parse_grid(items: list[str]) -> dict:
    """``["key=v1,v2", ...]`` -> {key: [v1, v2]} (values parsed as YAML); one-line ConfigErrors."""
    import yaml

    grid: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r}: expected section.key=value1,value2,...")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+", key):
            raise ConfigError(f"--grid {item!r}: the key must be section.key (e.g. model.embedding_dimension), got {key!r}")
        if key in grid:  # the later one silently replaced the earlier
            raise ConfigError(f"--grid {item!r}: key {key!r} is given twice; list all its values in one --grid "
                              f"({key}=v1,v2,...)")
        texts = [t.strip() for t in _top_level_split(raw, item)]
        if not raw.strip() or any(t == "" for t in texts):
            raise ConfigError(f"--grid {item!r}: give one or more comma-separated values")
        values = []
        for text in texts:
            try:
                values.append(yaml.safe_load(text))
            except yaml.YAMLError as exc:
                if text[:1] in "[{'\"":  # meant as YAML flow syntax: never kept as text
                    raise ConfigError(f"--grid {item!r}: value {text!r} is not valid YAML "
                                      f"({getattr(exc, 'problem', None) or exc})") from None
                values.append(text)
        grid[key] = values
    return grid


def _top_level_split(raw: str, item: str) -> list[str]:
    """``raw`` split at the commas outside brackets, braces and quotes: ``[64,64],[128,128]`` is
    two values (YAML flow lists); an unclosed bracket or quote is a one-line ConfigError."""
    parts, depth, quote, start, previous = [], [], None, 0, ","
    pairs = {"[": "]", "{": "}"}
    for k, ch in enumerate(raw):
        if quote:
            if ch == quote:
                quote = None
            continue
        if ch in "'\"" and previous in ",[{:":  # a quote opens quoted text only where a YAML value starts
            quote = ch
        elif ch in pairs:
            depth.append(pairs[ch])
        elif ch in "]}":
            if not depth or depth.pop() != ch:
                raise ConfigError(f"--grid {item!r}: unmatched {ch!r} at character {k + 1} of the values")
        elif ch == "," and not depth:
            parts.append(raw[start:k])
            start = k + 1
        if not ch.isspace():
            previous = ch
    if quote or depth:
        missing = quote or depth[-1]
        raise ConfigError(f"--grid {item!r}: a value is missing its closing {missing!r} (a value with commas "
                          "is written in brackets or quotes: key=[64,64],[128,128])")
    parts.append(raw[start:])
    return parts


SECTIONS = ("data", "model", "train", "trainer")


def _check_key(key: str, where: str, value=None, allow_section: bool = False) -> None:
    if allow_section and key in SECTIONS and isinstance(value, dict):
        return  # a variant may replace a whole section (an architecture with its own keys)
    if not isinstance(key, str) or "." not in key:
        raise ConfigError(f"{where}: key {key!r} must be section.key (e.g. data.train_size)"
                          + (" or a whole section (model: {...})" if allow_section else ""))
    if key in RESERVED_KEYS or any(key.startswith(k + ".") for k in RESERVED_KEYS):
        raise ConfigError(f"{where}: key {key!r} is set by the sweep itself (each point gets its own run folder and split)")


def sweep_section(values: dict, source: str) -> tuple[dict, dict]:
    """(grid, variants) of a config's optional ``sweep:`` section (removed from ``values``)."""
    section = values.pop("sweep", None) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: the 'sweep' section must be a mapping with 'grid' and/or 'variants'")
    unknown = sorted(set(section) - {"grid", "variants"})
    if unknown:
        raise ConfigError(f"config key 'sweep.{unknown[0]}' does not exist; allowed: grid, variants")
    grid = section.get("grid") or {}
    variants = section.get("variants") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{source}: 'sweep.grid' must map section.key to a non-empty list of values")
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise ConfigError(f"{source}: 'sweep.variants' must map a name to a mapping of section.key: value")
    for name in variants:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{source}: variant name {name!r} of 'sweep.variants' must be a non-empty text "
                              "(e.g. et_s); quote it in YAML")
    return dict(grid), dict(variants)


def plan_points(grid: dict, variants: dict) -> list[SweepPoint]:
    """Every variant (or none) crossed with every combination of the grid values."""
    for key in grid:
        _check_key(key, "--grid / sweep.grid")
    for name, keys in variants.items():
        for key, value in keys.items():
            _check_key(key, f"sweep.variants.{name}", value, allow_section=True)
    keys = list(grid)
    combos = list(itertools.product(*(grid[k] for k in keys))) if keys else [()]
    named = list(variants.items()) or [(None, {})]
    points = []
    for name, fixed in named:
        for combo in combos:
            labels = dict(zip(keys, combo))
            overrides = {**fixed, **labels}
            points.append(SweepPoint(overrides=overrides, variant=name, labels=labels))
    ids = [p.id for p in points]
    if len(set(ids)) != len(ids):
        raise ConfigError("the sweep has two identical points; check --grid and sweep.variants for repeated values")
    return points


def _set(values: dict, dotted: str, value) -> None:
    node = values
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"sweep key {dotted!r}: '{part}' is not a section")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def point_values(base: dict, point: SweepPoint, sweep_dir: Path) -> dict:
    values = copy.deepcopy(base)
    for key, value in point.overrides.items():
        _set(values, key, value)
    values["run_dir"] = str(sweep_dir / RUNS / point.id)
    return values


def point_config(base: dict, point: SweepPoint, sweep_dir: Path, check_data: bool = True):
    """The RunConfig of ``point``; a ConfigError names the point."""
    from torchmdx.train.config import build_run_config

    try:
        return build_run_config(point_values(base, point, sweep_dir), "the config", check_data=check_data)
    except TorchmdxError as exc:
        raise type(exc)(f"sweep point ({point.describe()}): {exc}") from None


def _base_hash(base: dict) -> str:
    return hashlib.sha1(json.dumps(jsonable(base), sort_keys=True).encode()).hexdigest()[:12]


def load_base(config_path, overrides: Optional[list[str]] = None) -> tuple[dict, dict, dict]:
    """(base values, grid, variants) of a sweep config (data paths resolved next to it; --set applied)."""
    from torchmdx.config import apply_overrides, load_yaml
    from torchmdx.data.data_config import resolve_data_paths
    from torchmdx.errors import DataError

    values = load_yaml(config_path)
    grid, variants = sweep_section(values, str(config_path))
    missing = resolve_data_paths(values, Path(config_path).parent, str(config_path), overrides)
    values = apply_overrides(values, list(overrides or []))
    if missing:
        raise DataError(missing)
    values.pop("run_dir", None)
    return values, grid, variants


def sweep_folder(config_path, out: Optional[str] = None) -> Path:
    """The sweep folder: ``out``, else sweeps/<config name>."""
    if out is not None and not str(out).strip():  # --out '' silently meant sweeps/<config name>
        raise ConfigError("--out is empty; give the sweep folder (or leave --out out for sweeps/<config name>)")
    return Path(out) if out else Path("sweeps") / Path(config_path).stem


def prepare_sweep(config_path, grid_items: list[str], out: Optional[str] = None,
                  overrides: Optional[list[str]] = None) -> dict:
    """Validate every point and write the plan (and the nested splits); nothing is trained.
    Returns {'sweep_dir', 'points', 'base'}."""
    base, grid, variants = load_base(config_path, overrides)
    grid.update(parse_grid(grid_items))
    points = plan_points(grid, variants)
    sweep_dir = sweep_folder(config_path, out)
    from torchmdx.io_utils import unwritable_folder

    problem = unwritable_folder(sweep_dir)
    if problem:
        raise ConfigError(f"sweep folder {sweep_dir}: {problem}")
    # every point's data path is checked (a grid over data.path named a missing file only when it trained)
    configs = [point_config(base, p, sweep_dir) for p in points]
    plan_path = sweep_dir / PLAN
    base_hash = _base_hash(base)
    if plan_path.is_file():
        old = read_plan(sweep_dir)
        if old.get("base_hash") != base_hash:
            raise ConfigError(f"sweep folder {sweep_dir} holds a sweep of another base config (its {PLAN}); "
                              "use --out for a new folder (or the same config and --set options)")
    split_files = nested_splits(configs, points, sweep_dir)  # sizes checked before it writes anything
    sweep_dir.mkdir(parents=True, exist_ok=True)
    plan = {"config": str(config_path), "base": base, "base_hash": base_hash,
            "points": [{"id": p.id, "variant": p.variant, "labels": p.labels, "overrides": p.overrides,
                        "split_file": split_files.get(p.id)} for p in points]}
    with atomic_write(plan_path, "w") as handle:
        json.dump(jsonable(plan), handle, indent=2)
    return {"sweep_dir": sweep_dir, "points": points, "base": base, "plan": plan}


def nested_splits(configs, points, sweep_dir: Path) -> dict:
    """{point id: split file}: one validation and test set for the sweep and nested training
    sets, when every point reads the same data without its own split file or grouped split."""
    import numpy as np

    from torchmdx.data.datamodule import TorchmdxDataModule
    from torchmdx.data.splits import Split, resolve_sizes, save_split

    data = [c.data_config for c in configs]
    first = data[0]
    same = all((d.path, d.format, d.seed, d.val_size, d.test_size) == (first.path, first.format, first.seed,
                                                                         first.val_size, first.test_size) for d in data)
    if not same or any(d.split_file is not None or getattr(d, "split_by_group", False) or getattr(d, "test_groups", None)
                       or getattr(d, "val_groups", None) for d in data):
        return {}
    module = TorchmdxDataModule(first)
    module.setup("fit")
    n = module.dataset.n_structures
    content_hash = module.dataset.info["fingerprint"].get("hash", "")
    sizes = []
    for d, point in zip(data, points):
        try:
            sizes.append(resolve_sizes(n, d.train_size, first.val_size, first.test_size, source=str(first.path)))
        except TorchmdxError as exc:  # name the point, like point_config
            raise type(exc)(f"sweep point ({point.describe()}): {exc}") from None
    n_val, n_test = sizes[0][1], sizes[0][2]
    if max(s[0] for s in sizes) + n_val + n_test > n:
        raise ConfigError(f"sweep: the largest data.train_size ({max(s[0] for s in sizes)}) + val ({n_val}) + test "
                          f"({n_test}) exceed the {n} structures of {first.path}")
    perm = np.random.default_rng(first.seed).permutation(n)
    test = np.sort(perm[:n_test])
    val = np.sort(perm[n_test:n_test + n_val])
    pool = perm[n_test + n_val:]
    files = {}
    for (n_train, _, _), point in zip(sizes, points):
        path = sweep_dir / SPLITS / f"train_{n_train}.npz"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            save_split(Split(train=np.sort(pool[:n_train]), val=val, test=test, n_structures=n, seed=first.seed,
                             info={"kind": "sweep-nested"}), path, content_hash)
        files[point.id] = str(path)
    return files


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
    """Train one point (or continue it), measure it, write its sweep_result.json; returns the row."""
    import torch

    sweep_dir = Path(sweep_dir)
    plan = read_plan(sweep_dir)
    entry = _plan_point(plan, point_id)
    cfg = entry_config(plan, entry, sweep_dir)
    run_dir = Path(cfg.run_dir)
    result_path = run_dir / RESULT
    if result_path.is_file():
        return read_result(result_path)
    from torchmdx.train.run import CHECKPOINT_DIR, LAST, train

    flops = measure_step_flops(cfg)
    resume = (run_dir / CHECKPOINT_DIR / f"{LAST}.ckpt").is_file()
    device = "cuda" if (cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()) else "cpu"
    start = time.perf_counter()
    outcome = train(cfg, resume=resume)
    seconds = time.perf_counter() - start
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
        "device_seconds": seconds * (max(cfg.trainer.devices, 1) if isinstance(cfg.trainer.devices, int) else 1),
        "test_energy_mae": test.get("energy_mae"), "test_energy_rmse": test.get("energy_rmse"),
        "test_forces_mae": test.get("forces_mae"), "test_forces_rmse": test.get("forces_rmse"),
        "test_structures": test["test_structures"], "augment": cfg.train.augment,
        "resumed": resume, "run_dir": str(run_dir),
    }
    with atomic_write(result_path, "w") as handle:
        json.dump(jsonable(row), handle, indent=2)
    return row


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
def read_json(path: Path, what: str, remedy: str) -> dict:
    """A JSON object the sweep wrote (its plan, a point's result), or one line naming the file
    (a file emptied by a crash or cut short by a copy was a JSONDecodeError traceback)."""
    try:
        value = json.loads(Path(path).read_text())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: {what} cannot be read ({reason[:120]}): damaged or cut short; {remedy}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {what} holds a {type(value).__name__}, not a JSON object; {remedy}")
    return value


def read_plan(sweep_dir: Path) -> dict:
    return read_json(Path(sweep_dir) / PLAN, "the sweep's plan",
                     "delete it and run the same sweep command again (finished points are kept)")


def read_result(path: Path) -> dict:
    return read_json(path, "the point's result", "delete it and run the sweep again (the point is measured again)")


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
    analyse(rows, sweep_dir, label_keys)
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


def visible_gpus(devices) -> list[str]:
    """The GPU ids to run points on: ``devices`` 'auto' (every visible GPU), a count or a list."""
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if devices in (None, "auto"):
        return [str(i) for i in range(available)]
    check_devices(devices)
    if isinstance(devices, str) and "," in devices:
        return [d.strip() for d in devices.split(",") if d.strip()]
    count = int(devices)
    if count > available:
        raise ConfigError(f"--devices {count}: only {available} GPU(s) visible")
    return [str(i) for i in range(count)]


def run_sweep(config_path, grid_items: list[str], out: Optional[str] = None, overrides: Optional[list[str]] = None,
              devices=None, dry_run: bool = False, log=print) -> dict:
    """Plan, validate, then train every unfinished point (module docstring)."""
    check_devices(devices)
    prepared = prepare_sweep(config_path, grid_items, out, overrides)
    sweep_dir, plan = prepared["sweep_dir"], prepared["plan"]
    todo = [e["id"] for e in plan["points"] if not (sweep_dir / RUNS / e["id"] / RESULT).is_file()]
    log(f"sweep {sweep_dir}: {len(plan['points'])} points, {len(plan['points']) - len(todo)} finished, {len(todo)} to run")
    if dry_run:
        for entry in plan["points"]:
            state = "to run" if entry["id"] in todo else "finished"
            log(f"  {entry['id']}  ({state})")
        return {"sweep_dir": sweep_dir, "rows": finished_rows(sweep_dir, plan), "todo": todo}
    gpus = visible_gpus(devices) if devices not in (None, "auto") or _has_gpus() else []
    if len(gpus) > 1:
        _run_parallel(sweep_dir, plan, todo, gpus, log)
    else:
        for k, point_id in enumerate(todo):
            log(f"[{k + 1}/{len(todo)}] {point_id}")
            run_point(sweep_dir, point_id)
            write_results(sweep_dir, plan)
    rows = write_results(sweep_dir, plan)
    return {"sweep_dir": sweep_dir, "rows": rows, "todo": todo}


def _has_gpus() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 1


def _run_parallel(sweep_dir: Path, plan: dict, todo: list[str], gpus: list[str], log) -> None:
    """One worker process per GPU; the table is rewritten whenever a point finishes."""
    queue = list(todo)
    running: dict[str, tuple] = {}
    failures = []
    while queue or running:
        for gpu in gpus:
            if gpu not in running and queue:
                point_id = queue.pop(0)
                run_dir = sweep_dir / RUNS / point_id
                run_dir.mkdir(parents=True, exist_ok=True)
                logfile = open(run_dir / "sweep.log", "a")
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
                process = subprocess.Popen([sys.executable, "-m", "torchmdx.train.sweep", str(sweep_dir), point_id],
                                           env=env, stdout=logfile, stderr=subprocess.STDOUT)
                running[gpu] = (process, point_id, logfile)
                log(f"GPU {gpu}: {point_id}")
        time.sleep(2.0)
        for gpu, (process, point_id, logfile) in list(running.items()):
            if process.poll() is None:
                continue
            logfile.close()
            del running[gpu]
            if process.returncode != 0:
                failures.append(point_id)
                log(f"GPU {gpu}: {point_id} failed (exit {process.returncode}); see {sweep_dir / RUNS / point_id / 'sweep.log'}")
            write_results(sweep_dir, plan)
    if failures:
        from torchmdx.errors import TrainingError

        raise TrainingError(f"{len(failures)} sweep point(s) failed ({', '.join(failures)}); their logs are in "
                            f"{sweep_dir / RUNS}/<point>/sweep.log; run the sweep again to retry them")


def _worker(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m torchmdx.train.sweep SWEEP_DIR POINT_ID", file=sys.stderr)
        return 2
    try:
        run_point(Path(argv[0]), argv[1])
    except TorchmdxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":  # pragma: no cover - the per-GPU worker
    sys.exit(_worker(sys.argv[1:]))


__all__ = ["SweepPoint", "parse_grid", "plan_points", "prepare_sweep", "run_point", "run_sweep", "write_results"]
