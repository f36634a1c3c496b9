"""Per-step comparison of bench/bench_accuracy.py runs (``python bench/bench_accuracy.py steps DIR
[DIR ...]``): runs stopped after the same number of optimiser steps (``--max-steps``) and
checkpointed at the same steps (``--every-steps``), several seeds per side, compared step by
step instead of against the wall clock (``report``).

For each data set and each run (side or ``--label``), every seed's ``scores_<run>.json``; at each
checkpoint step that every run of the data set has, the test force MAE, the test energy MAE (for
the force-only kind: within the test family) and, where scored, the validation and training
force MAE, each as
the mean over the seeds with the seeds' own values beside it, and the ratio of a run's mean to
the reference run's (TorchMD-NET's when present, else the first run); then each seed's own
best-validation checkpoint (the model each project hands its user). Writes ``steps_<data>.md``
and ``steps_<data>.png`` (the same errors against the optimiser step, one thin line per
seed, the mean thick). Runs whose parameter counts, data files, step limits or splits (per
seed) differ are named in ``!!!`` lines, as in the report. CPU only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from torchmdx.errors import ConfigError, DataError
from torchmdx.io_utils import atomic_path, atomic_write

from bench_accuracy_report import COLORS, LABELS, ordered_runs, read_scores_files

#: (point key, what, unit) of the per-step tables, in order; a key no run has is left out
METRICS = (("forces_mae", "test force MAE", "meV/Å"), ("energy_mae", "test energy MAE", "meV"),
           ("val_forces_mae", "validation force MAE", "meV/Å"), ("train_forces_mae", "training force MAE", "meV/Å"))


def load_seed_runs(paths: Sequence[str]) -> dict:
    """{data: {run: [scores, ...] by seed}} from the scores_<run>.json files in the given folders
    (searched recursively) or given directly; a run and seed given twice is a one-line error."""
    runs: dict = {}
    for p, s in read_scores_files(paths):
        run = s.get("run", s["side"])
        seeds = runs.setdefault(s.get("data", "?"), {}).setdefault(run, [])
        for other in seeds:
            if other.get("seed") == s.get("seed"):
                raise DataError(f"two {run} runs of seed {s.get('seed')}: {other['_path']} and {p}")
        s["_path"] = str(p)
        s.setdefault("label", LABELS.get(run, run))
        seeds.append(s)
    for by_run in runs.values():
        for seeds in by_run.values():
            seeds.sort(key=lambda s: (s.get("seed") is None, s.get("seed")))
    return runs


def curve(s: dict, key: str) -> dict:
    """{step: value} of one run's wall-clock/step checkpoints (the end record repeats a step: the
    same weights, kept once)."""
    return {p["step"]: p[key] for p in s["points"] if p.get("kind") != "best_validation" and _finite(p.get(key))}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def warnings_of(by_run: dict) -> list[str]:
    out = []
    everything = [s for seeds in by_run.values() for s in seeds]
    for field, what in (("parameters", "PARAMETER COUNTS"), ("data_hash", "DATA FILES"), ("max_steps", "STEP LIMITS"),
                        ("every_steps", "CHECKPOINT STEPS")):
        values = {json.dumps(s.get(field)) for s in everything}
        if len(values) > 1:
            out.append(f"THE {what} DIFFER: {', '.join(sorted(values))}")
    by_seed: dict = {}
    for s in everything:
        by_seed.setdefault(s.get("seed"), set()).add(s.get("split_digest"))
    for seed, digests in by_seed.items():
        if len(digests) > 1:
            out.append(f"THE SPLITS OF SEED {seed} DIFFER between the runs")
    return out


def _cell(values: list) -> str:
    if not values:
        return "–"
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ({' / '.join(f'{v:.1f}' for v in values)})"


def step_tables(by_run: dict) -> tuple[str, dict]:
    """The markdown tables of one data set's runs and {metric: {run: {step: mean}}}."""
    keys = ordered_runs(by_run)
    reference = keys[0]
    lines, means = [], {}
    seeds_of = {k: [s.get("seed") for s in by_run[k]] for k in keys}
    heads = [f"{by_run[k][0]['label']} (seeds {', '.join(map(str, seeds_of[k]))})" for k in keys]
    ratio_heads = [f"{by_run[k][0]['label']} / {by_run[reference][0]['label']}" for k in keys[1:]]
    for key, what, unit in METRICS:
        curves = {k: [curve(s, key) for s in by_run[k]] for k in keys}
        steps = sorted(set.intersection(*(set(c) for k in keys for c in curves[k]))) if keys else []
        if not steps:
            continue
        means[key] = {k: {st: float(np.mean([c[st] for c in curves[k]])) for st in steps} for k in keys}
        lines += [f"**{what} ({unit})**, mean over the seeds (each seed's value in brackets)", "",
                  "| step | " + " | ".join(heads + ratio_heads) + " |", "|---" * (1 + len(heads) + len(ratio_heads)) + "|"]
        for st in steps:
            cells = [_cell([c[st] for c in curves[k]]) for k in keys]
            ref = means[key][reference][st]
            ratios = [f"{means[key][k][st] / ref:.2f}×" if ref else "–" for k in keys[1:]]
            lines.append(f"| {st:,} | " + " | ".join(cells + ratios) + " |")
        lines.append("")
    # each seed's own best-validation checkpoint: the model each project hands its user
    chosen = {k: [s.get("best_validation") for s in by_run[k]] for k in keys}
    if any(c for k in keys for c in chosen[k]):
        lines += ["**best-validation checkpoint** (each project's own choice, the model handed to the user; per seed)", "",
                  "| | " + " | ".join(heads) + " |", "|---" * (1 + len(heads)) + "|"]
        for field, label, spec in (("step", "step", "d"), ("forces_mae", "test force MAE (meV/Å)", ".1f"),
                                   ("energy_mae", "test energy MAE (meV)", ".1f"),
                                   ("val_forces_mae", "validation force MAE (meV/Å)", ".1f")):
            cells = []
            for k in keys:
                values = [c.get(field) if c else None for c in chosen[k]]
                cells.append(" / ".join(f"{v:{spec}}" if _finite(v) else "–" for v in values))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines), means


def plot_steps(by_run: dict, name: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if any(curve(s, m[0]) for seeds in by_run.values() for s in seeds)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.3 * len(metrics), 4.2), squeeze=False)
    others = iter(("tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:gray", "tab:pink", "tab:olive"))
    colors = {k: COLORS.get(k) or next(others, None) for k in ordered_runs(by_run)}
    for ax, (key, what, unit) in zip(axes[0], metrics):
        for k in ordered_runs(by_run):
            curves = [curve(s, key) for s in by_run[k]]
            for c in curves:
                if c:
                    ax.plot(sorted(c), [c[st] for st in sorted(c)], "-", lw=0.7, alpha=0.45, color=colors[k])
            common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if common:
                ax.plot(common, [np.mean([c[st] for c in curves]) for st in common], "o-", ms=3, lw=1.8,
                        color=colors[k], label=f"{by_run[k][0]['label']} ({len(curves)} seeds)")
        ax.set_yscale("log")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(f"{what} ({unit})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    any_run = next(iter(by_run.values()))[0]
    fig.suptitle(f"{name}: per optimiser step, {any_run.get('device', '')}, {str(any_run.get('date', ''))[:10]}"
                 f"{', --small' if any_run.get('small') else ''}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path, fsync=False) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def cmd_steps(args) -> int:
    runs = load_seed_runs(args.dirs)
    out = Path(args.out) if args.out else (Path(args.dirs[0]) if Path(args.dirs[0]).is_dir() else Path(args.dirs[0]).parent)
    from torchmdx.io_utils import unwritable_folder

    problem = unwritable_folder(out)
    if problem:
        raise ConfigError(f"--out {out}: {problem}")
    out.mkdir(parents=True, exist_ok=True)
    for name, by_run in sorted(runs.items()):
        tables, _ = step_tables(by_run)
        any_run = next(iter(by_run.values()))[0]
        heading = (f"## {name}: per optimiser step (max_steps {any_run.get('max_steps')}, checkpoints every "
                   f"{any_run.get('every_steps')} steps), {any_run.get('device')}, {str(any_run.get('date', ''))[:10]}"
                   f"{', --small' if any_run.get('small') else ''}")
        warnings = warnings_of(by_run)
        print(heading)
        for k in ordered_runs(by_run):
            for s in by_run[k]:
                print(f"- {s['label']} seed {s.get('seed')}: {s.get('version') or ''} ({s['_path']})")
        for warning in warnings:
            print(f"!!! {warning} !!!")
        print(tables)
        png = plot_steps(by_run, name, out / f"steps_{name}.png")
        with atomic_write(out / f"steps_{name}.md", "w") as handle:
            handle.write(heading + "\n\n" + "".join(f"**{w}**\n\n" for w in warnings) + tables)
        print(f"-> {png}, {out / f'steps_{name}.md'}\n")
    return 0
