#!/usr/bin/env python3
"""The report of bench/bench_accuracy.py (``python bench/bench_accuracy.py report DIR [DIR ...]``):
reads and checks the ``scores_<side>.json`` files of both sides (a one-line error for any file it
cannot use), the time each curve takes to reach a force error (:func:`time_to_reach`), the
comparison table (two sides, or several torchmdx runs against the reference run) and
``accuracy_<data>.png`` / ``.md``. CPU only; the training and the scorer are in
bench/bench_accuracy.py."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from torchmdx.errors import ConfigError, DataError  # noqa: E402
from torchmdx.io_utils import atomic_path, atomic_write  # noqa: E402

SIDES = ("torchmdnet", "torchmdx")
LABELS = {"torchmdnet": "TorchMD-NET 3.0.0", "torchmdx": "torchmdx"}
COLORS = {"torchmdnet": "tab:blue", "torchmdx": "tab:red"}


#: the recipe named in a report's plot title, per data kind (other kinds: the variable-size one)
RECIPE_TITLES = {
    "md17": "ET-MD17 recipe",
    "polymer": "force-only ET (energy weight 0), batch 16, families held out (val PVA, test PMMA)",
}


def time_to_reach(times: Sequence[float], values: Sequence[float], target: float) -> Optional[float]:
    """First time the curve (times ascending) is at or below ``target``, interpolated linearly
    between the two points around the crossing; None if it never gets there."""
    t, y = np.asarray(times, dtype=np.float64), np.asarray(values, dtype=np.float64)
    for i in range(len(t)):
        if y[i] <= target:
            if i == 0 or y[i] == y[i - 1]:
                return float(t[i])
            frac = (y[i - 1] - target) / (y[i - 1] - y[i])
            return float(t[i - 1] + frac * (t[i] - t[i - 1]))
    return None


def read_scores_files(paths: Sequence[str]):
    """(path, scores) of every scores_<run>.json in the given folders (searched recursively) or
    given directly, each read and checked (:func:`check_scores`); bad ones are one-line errors."""
    found = []
    for entry in paths:
        p = Path(entry)
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(p.rglob("scores_*.json")))
        else:
            raise DataError(f"{p}: no such file or folder")
    if not found:
        raise DataError(f"no scores_<side>.json in {', '.join(paths)}")
    for p in found:
        try:
            s = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{p}: not a readable scores file ({exc})") from None
        if not isinstance(s, dict) or s.get("side") not in SIDES or "points" not in s:
            raise DataError(f"{p}: not a scores file of this benchmark (no side/points)")
        check_scores(s, p)
        yield p, s


def load_scores(paths: Sequence[str]) -> dict:
    """{data: {side: scores}} from scores_<side>.json files in the given folders (searched
    recursively) or given directly."""
    runs: dict = {}
    for p, s in read_scores_files(paths):
        key, run = s.get("data", "?"), s.get("run", s["side"])
        if run in runs.setdefault(key, {}):
            raise DataError(f"two {run} runs for {key}: {runs[key][run]['_path']} and {p}; "
                            "pass the folders of one comparison")
        s["_path"] = str(p)
        s.setdefault("label", LABELS.get(run, run))
        runs[key][run] = s
    return runs


def _is_number(value, whole: bool = False) -> bool:
    return isinstance(value, int if whole else (int, float)) and not isinstance(value, bool)


def check_scores(s: dict, p) -> None:
    """A one-line DataError for a scores file whose fields the report cannot use (a hand-edited or
    foreign file: the table and plot would stop with a traceback, or a 'data' name with a '/'
    would put accuracy_<data>.png outside the report folder)."""
    for key in ("data", "run", "label"):
        value = s.get(key)
        if value is not None and not (isinstance(value, str) and value.strip()):
            raise DataError(f"{p}: '{key}' must be a name, got {value!r}")
    data = s.get("data")
    if data is not None and (any(c in data for c in "/\\\0") or data in (".", "..")):
        raise DataError(f"{p}: 'data' {data!r} must be a data set name, not a path")
    if not isinstance(s["points"], list):
        raise DataError(f"{p}: 'points' must be a list of scored checkpoints, got {type(s['points']).__name__}")
    for k, point in enumerate(s["points"]):
        fields = ("t", "step", "forces_mae", "energy_mae")
        if not isinstance(point, dict) or not all(_is_number(point.get(f), whole=f == "step") for f in fields):
            raise DataError(f"{p}: point {k} needs numbers t, step (whole), forces_mae and energy_mae, got {point!r}"[:300])
    for key in ("parameters", "budget_s", "steps_per_s", "fit_to_train_s", "save_seconds"):
        value = s.get(key)
        if value is not None and not _is_number(value, whole=key == "parameters"):
            raise DataError(f"{p}: '{key}' must be a {'whole ' if key == 'parameters' else ''}number or null, got {value!r}")



def reference_warnings(runs: dict, keys) -> list[str]:
    """A warning when runs of a race with shared reference energies (``energy_references:
    fit``, e.g. ANI-1x) trained with different tables (each run's ``info.atomic_references``,
    {Z: eV}: what its model held; TorchMD-NET's in float32). MD17 races keep each recipe's own."""
    if any(runs[k].get("energy_references") != "fit" for k in keys if k in runs):
        return []
    infos = {k: runs[k].get("info") for k in keys if k in runs}
    tables = {k: info.get("atomic_references") for k, info in infos.items() if isinstance(info, dict)}
    tables = {k: {str(z): v for z, v in t.items()} for k, t in tables.items() if isinstance(t, dict)}
    if len(tables) < 2:
        return []
    (first, ref), *others = tables.items()
    out = []
    for k, table in others:
        same = set(table) == set(ref) and all(abs(float(table[z]) - float(ref[z])) <= 1e-4 * max(1.0, abs(float(ref[z])))
                                               for z in ref)
        if not same:
            out.append(f"THE ENERGY REFERENCES DIFFER between {runs[first].get('label', first)} ({ref}) and "
                       f"{runs[k].get('label', k)} ({table})")
    return out


def ordered_runs(runs: dict) -> list[str]:
    """TorchMD-NET first, then torchmdx's default run, then the other torchmdx runs by name."""
    return [k for k in SIDES if k in runs] + sorted(k for k in runs if k not in SIDES)


def summarise(s: dict) -> dict:
    pts = s["points"]
    out = {"parameters": s.get("parameters"), "steps": None, "steps_per_s": s.get("steps_per_s"),
           "t_end": None, "final_f": None, "final_e": None, "best_f": None, "best_f_t": None, "best_e": None,
           "final_e_atom": None, "best_e_atom": None, "val_f": None, "val_e": None, "val_e_atom": None,
           "val_step": None}
    if pts:
        last = pts[-1]
        best = min(pts, key=lambda p: p["forces_mae"])
        out.update(steps=last["step"], t_end=last["t"], final_f=last["forces_mae"], final_e=last["energy_mae"],
                   best_f=best["forces_mae"], best_f_t=best["t"], best_e=min(p["energy_mae"] for p in pts))
        per_atom = [p.get("energy_mae_per_atom") for p in pts]
        if all(_is_number(v) for v in per_atom):  # scores written before the per-atom error have none
            out.update(final_e_atom=per_atom[-1], best_e_atom=min(per_atom))
    chosen = s.get("best_validation")  # the side's own lowest-validation checkpoint (scores from 2026-12-06 on)
    if chosen:
        out.update(val_f=chosen.get("forces_mae"), val_e=chosen.get("energy_mae"),
                   val_e_atom=chosen.get("energy_mae_per_atom"), val_step=chosen.get("step"))
    return out


def _fmt(value, spec: str = ".1f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:{spec}}{suffix}"


def comparison(runs: dict) -> tuple[str, dict]:
    """The markdown table of one data set's runs and the derived numbers (TorchMD-NET against
    torchmdx; with more runs, each against the reference run: :func:`comparison_many`)."""
    if set(runs) - set(SIDES):
        return comparison_many(runs)
    sides = [side for side in SIDES if side in runs]
    sums = {side: summarise(runs[side]) for side in sides}
    derived: dict = {"warnings": []}
    if len(sides) == 2:
        a, b = (runs[s] for s in SIDES)
        if a.get("parameters") != b.get("parameters"):
            derived["warnings"].append(f"PARAMETER COUNTS DIFFER: TorchMD-NET {a.get('parameters')}, torchmdx "
                                       f"{b.get('parameters')}: the two sides did not train the same model")
        if a.get("split_digest") != b.get("split_digest"):
            derived["warnings"].append("THE SPLITS DIFFER between the two runs (split digests "
                                       f"{a.get('split_digest')} vs {b.get('split_digest')})")
        if a.get("data_hash") != b.get("data_hash"):
            derived["warnings"].append("THE DATA FILES DIFFER between the two runs (content hashes)")
        if a.get("budget_s") != b.get("budget_s"):
            derived["warnings"].append(f"THE BUDGETS DIFFER: {a.get('budget_s')} s vs {b.get('budget_s')} s")
        if a.get("device") != b.get("device"):
            derived["warnings"].append(f"different devices: {a.get('device')} vs {b.get('device')}")
        derived["warnings"] += reference_warnings(runs, SIDES)
        ref, new = sums["torchmdnet"], sums["torchmdx"]
        if ref["final_f"] and new["final_f"] is not None:  # a reference MAE of 0 has no ratio
            pts = runs["torchmdx"]["points"]
            derived["time_to_reach"] = time_to_reach([p["t"] for p in pts], [p["forces_mae"] for p in pts],
                                                     ref["final_f"])
            derived["f_ratio"] = new["final_f"] / ref["final_f"]
            derived["e_ratio"] = new["final_e"] / ref["final_e"] if ref["final_e"] else None
            if ref["final_e_atom"] and new["final_e_atom"] is not None:
                derived["e_atom_ratio"] = new["final_e_atom"] / ref["final_e_atom"]
            if ref["steps_per_s"] and new["steps_per_s"]:
                derived["rate_ratio"] = new["steps_per_s"] / ref["steps_per_s"]
            if derived["time_to_reach"] is not None and ref["t_end"]:
                derived["reach_fraction"] = derived["time_to_reach"] / ref["t_end"]
    header = "| | " + " | ".join(LABELS[s] for s in sides) + (" | torchmdx / TorchMD-NET |" if len(sides) == 2 else " |")
    lines = [header, "|---" * (len(sides) + 1 + (len(sides) == 2)) + "|"]

    def row(label, key, spec=".1f", suffix="", ratio=None):
        cells = [_fmt(sums[s][key], spec, suffix) for s in sides]
        extra = [_fmt(derived.get(ratio), ".2f", "×") if ratio else ""] if len(sides) == 2 else []
        lines.append(f"| {label} | " + " | ".join(cells + extra) + " |")

    row("parameters", "parameters", ",d")
    row("optimiser steps", "steps", ",d")
    row("steps/s (since train start)", "steps_per_s", ".2f", "", "rate_ratio")
    row("last checkpoint at (s since fit start)", "t_end", ".0f")
    row("final test force MAE (meV/Å)", "final_f", ".1f", "", "f_ratio")
    row("final test energy MAE (meV)", "final_e", ".1f", "", "e_ratio")
    row("final test energy MAE per atom (meV/atom)", "final_e_atom", ".2f", "", "e_atom_ratio")
    row("best test force MAE (meV/Å)", "best_f", ".1f")
    row("best test energy MAE (meV)", "best_e", ".1f")
    row("best test energy MAE per atom (meV/atom)", "best_e_atom", ".2f")
    if any(sums[side].get("val_f") is not None for side in sides):  # the model each project hands its user
        if len(sides) == 2 and sums["torchmdnet"].get("val_f") and sums["torchmdx"].get("val_f") is not None:
            derived["val_f_ratio"] = sums["torchmdx"]["val_f"] / sums["torchmdnet"]["val_f"]
        row("best-validation checkpoint (the model handed to the user): step", "val_step", ",d")
        row("best-validation checkpoint: test force MAE (meV/Å)", "val_f", ".1f", "", "val_f_ratio")
        row("best-validation checkpoint: test energy MAE (meV)", "val_e", ".1f")
        row("best-validation checkpoint: test energy MAE per atom (meV/atom)", "val_e_atom", ".2f")
    if len(sides) == 2:
        reach = derived.get("time_to_reach")
        text = "not reached" if reach is None else f"{reach:.0f} s ({reach / 60:.1f} min)"
        frac = _fmt(derived.get("reach_fraction"), ".2f", "×")
        lines.append(f"| time for torchmdx to reach TorchMD-NET's final force MAE | {_fmt(sums['torchmdnet']['t_end'], '.0f', ' s')} "
                     f"| {text} | {frac} |")
    return "\n".join(lines), derived


def comparison_many(runs: dict) -> tuple[str, dict]:
    """Several runs (e.g. TorchMD-NET, torchmdx's ET, torchmdx's Equiformer): one column each,
    then each run's force MAE ratio, step-rate ratio and time to reach against the reference run
    (TorchMD-NET's when present, else the first)."""
    keys = ordered_runs(runs)
    reference = keys[0]
    sums = {k: summarise(runs[k]) for k in keys}
    derived: dict = {"warnings": [], "reference": reference, "per_run": {}}
    ref = runs[reference]
    for k in keys[1:]:
        other = runs[k]
        for field, what in (("split_digest", "SPLITS"), ("data_hash", "DATA FILES"), ("budget_s", "BUDGETS")):
            if other.get(field) != ref.get(field):
                derived["warnings"].append(f"THE {what} DIFFER between {ref['label']} and {other['label']}")
        if other.get("device") != ref.get("device"):
            derived["warnings"].append(f"different devices: {ref.get('device')} vs {other.get('device')}")
        per = {}
        a, b = sums[reference], sums[k]
        if a["final_f"] and b["final_f"] is not None:
            per["f_ratio"] = b["final_f"] / a["final_f"]
            pts = other["points"]
            per["time_to_reach"] = time_to_reach([p["t"] for p in pts], [p["forces_mae"] for p in pts], a["final_f"])
        if a["final_e"] and b["final_e"] is not None:
            per["e_ratio"] = b["final_e"] / a["final_e"]
        if a["steps_per_s"] and b["steps_per_s"]:
            per["rate_ratio"] = b["steps_per_s"] / a["steps_per_s"]
        derived["per_run"][k] = per
    derived["warnings"] += reference_warnings(runs, keys)
    labels = [runs[k]["label"] for k in keys]
    lines = ["| | " + " | ".join(labels) + " |", "|---" * (len(keys) + 1) + "|"]

    def row(label, cells):
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    for label, key, spec in (("parameters", "parameters", ",d"), ("optimiser steps", "steps", ",d"),
                             ("steps/s (since train start)", "steps_per_s", ".2f"),
                             ("last checkpoint at (s since fit start)", "t_end", ".0f"),
                             ("final test force MAE (meV/Å)", "final_f", ".1f"),
                             ("final test energy MAE (meV)", "final_e", ".1f"),
                             ("final test energy MAE per atom (meV/atom)", "final_e_atom", ".2f"),
                             ("best test force MAE (meV/Å)", "best_f", ".1f"),
                             ("best test energy MAE (meV)", "best_e", ".1f"),
                             ("best test energy MAE per atom (meV/atom)", "best_e_atom", ".2f")):
        row(label, [_fmt(sums[k][key], spec) for k in keys])
    name = runs[reference]["label"]
    for label, field, spec, suffix in ((f"force MAE / {name}'s", "f_ratio", ".2f", "×"),
                                       (f"energy MAE / {name}'s", "e_ratio", ".2f", "×"),
                                       (f"steps/s / {name}'s", "rate_ratio", ".2f", "×")):
        row(label, ["–"] + [_fmt(derived["per_run"][k].get(field), spec, suffix) for k in keys[1:]])
    reach = []
    for k in keys[1:]:
        t = derived["per_run"][k].get("time_to_reach")
        reach.append("not reached" if t is None else f"{t:.0f} s ({t / 60:.1f} min)")
    row(f"time to reach {name}'s final force MAE", [_fmt(sums[reference]["t_end"], ".0f", " s")] + reach)
    return "\n".join(lines), derived


def plot(runs: dict, name: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - matplotlib.ticker.FuncFormatter below

    per_atom = any(p.get("energy_mae_per_atom") is not None for s in runs.values() for p in s["points"])
    fig, axes = plt.subplots(1, 3 if per_atom else 2, figsize=(16 if per_atom else 11, 4.2))
    others = iter(("tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:gray"))
    for side in ordered_runs(runs):
        if not runs[side]["points"]:
            continue
        pts = runs[side]["points"]
        t = [p["t"] / 60 for p in pts]
        label = f"{runs[side].get('label', LABELS.get(side, side))} ({pts[-1]['step']:,} steps)"
        color = COLORS.get(side) or next(others, None)
        axes[0].plot(t, [p["forces_mae"] for p in pts], "o-", ms=3, color=color, label=label)
        axes[1].plot(t, [p["energy_mae"] for p in pts], "o-", ms=3, color=color, label=label)
        if per_atom and all(p.get("energy_mae_per_atom") is not None for p in pts):
            axes[2].plot(t, [p["energy_mae_per_atom"] for p in pts], "o-", ms=3, color=color, label=label)
    if "torchmdnet" in runs and runs["torchmdnet"]["points"]:
        axes[0].axhline(runs["torchmdnet"]["points"][-1]["forces_mae"], color=COLORS["torchmdnet"], ls=":", lw=1)
    plain = matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}")
    # minor ticks: label 2, 3 and 5 x 10^k only (the others would crowd the axis)
    some = matplotlib.ticker.FuncFormatter(
        lambda v, _pos: f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v)), 6) in (2, 3, 5) else "")
    for ax, what in zip(axes, ("test force MAE (meV/Å)", "test energy MAE per structure (meV)",
                               "test energy MAE per atom (meV/atom)")):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(some)
        ax.set_xlabel("wall-clock since fit start (min)")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    any_run = next(iter(runs.values()))
    sizes = any_run.get("sizes", [])
    recipe = RECIPE_TITLES.get(any_run.get("kind", "md17"),
                               "ET-MD17 recipe, batch 32, the same per-element reference energies")
    fig.suptitle(f"{name}: {recipe}, split {'/'.join(map(str, sizes))}, budget "
                 f"{any_run.get('budget_s', 0) / 60:.1f} min, {any_run.get('device', '')}, {str(any_run.get('date', ''))[:10]}",
                 fontsize=10)
    fig.tight_layout()
    with atomic_path(path, fsync=False) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def cmd_report(args) -> int:
    runs = load_scores(args.dirs)
    out = Path(args.out) if args.out else (Path(args.dirs[0]) if Path(args.dirs[0]).is_dir() else Path(args.dirs[0]).parent)
    from torchmdx.io_utils import unwritable_folder

    problem = unwritable_folder(out)
    if problem:
        raise ConfigError(f"--out {out}: {problem}")
    out.mkdir(parents=True, exist_ok=True)
    for name, by_side in sorted(runs.items()):
        table, derived = comparison(by_side)
        any_run = next(iter(by_side.values()))
        heading = (f"## {name}: budget {any_run.get('budget_s', 0) / 60:.1f} min per side, "
                   f"{any_run.get('device')}, {str(any_run.get('date', ''))[:10]}")
        print(heading)
        for side, s in by_side.items():
            print(f"- {s['label']}: {s.get('version') or ''} ({s['_path']}); fit start -> train start "
                  f"{_fmt(s.get('fit_to_train_s'), '.1f', ' s')}, checkpoint saving {_fmt(s.get('save_seconds'), '.1f', ' s')}")
        for warning in derived["warnings"]:
            print(f"!!! {warning} !!!")
        print(table)
        png = plot(by_side, name, out / f"accuracy_{name}.png")
        with atomic_write(out / f"accuracy_{name}.md", "w") as handle:
            handle.write(heading + "\n\n" + "".join(f"**{w}**\n\n" for w in derived["warnings"]) + table + "\n")
        print(f"-> {png}, {out / f'accuracy_{name}.md'}\n")
    return 0
