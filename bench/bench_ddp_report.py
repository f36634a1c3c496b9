"""The report half of ``bench/bench_ddp.py`` (issue 20): epoch timing from the stamped logs and
Lightning's CSV, throughput, scaling efficiency, the summary over seeds, and the JSON / markdown
/ PNG outputs (written to a temporary name, then renamed). The run half (processes, splits,
evaluation) is ``bench_ddp.py``; its docstring says what is measured."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

GRAPH_UNDER_DDP = ("mode graph (train.cuda_graph auto) does not run under DDP: auto resolves to eager with several "
                   "devices; mode captured (train.cuda_graph true, compile off) runs the captured step under DDP "
                   "(gradients all-reduced inside the graph; docs/training.md, 'Under DDP'); efficiency is against "
                   "the 1-GPU run of the same mode")

EPOCH_LINE = re.compile(r"^epoch (\d+)(?:/\d+)? \|.* \| ([0-9.]+) s\s*$")


class BenchError(Exception):
    """A bad argument or input: one line, no traceback."""


# ---------------------------------------------------------------------------- parsing (pure)
def epoch_stamps(log_lines) -> dict:
    """``{epoch (1-based): (arrival seconds, printed epoch seconds)}`` from ``stdout.log`` lines
    (``seconds<TAB>text``); the last line of an epoch wins."""
    out = {}
    for line in log_lines:
        stamp, sep, text = line.rstrip("\n").partition("\t")
        if not sep:
            continue
        match = EPOCH_LINE.match(text.strip())
        if match:
            out[int(match.group(1))] = (float(stamp), float(match.group(2)))
    return out


def epoch_steps(metrics_csv) -> dict:
    """``{epoch (1-based): global step at its end}`` from Lightning's CSV log: the ``step`` column
    of the rows carrying the epoch's ``train_loss`` (logged at the epoch's end; Lightning writes
    global_step - 1 there, a constant offset that differences cancel)."""
    out = {}
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("train_loss") not in (None, "") and row.get("epoch") not in (None, ""):
                epoch = int(float(row["epoch"])) + 1
                out[epoch] = max(out.get(epoch, -1), int(float(row["step"])))
    return out


def throughput(stamps: dict, steps: dict, global_batch: int, skip: int = 1) -> dict:
    """Steps and structures per second over the epochs after the first ``skip`` (see the module
    docstring): from the line of epoch ``skip`` to the line of the last epoch present in both
    ``stamps`` and ``steps``. Also the same from the printed per-epoch seconds (a check)."""
    common = sorted(set(stamps) & set(steps))
    if skip not in common or not common or common[-1] <= skip:
        raise BenchError(f"need epoch lines and CSV rows for epoch {skip} and a later epoch; have epochs {common}")
    last = common[-1]
    seconds = stamps[last][0] - stamps[skip][0]
    n_steps = steps[last] - steps[skip]
    if seconds <= 0 or n_steps <= 0:
        raise BenchError(f"empty timing window: {n_steps} steps in {seconds:.3f} s")
    printed = sum(stamps[e][1] for e in range(skip + 1, last + 1) if e in stamps)
    steps_per_epoch = sorted({steps[e] - steps[e - 1] for e in common if e - 1 in steps})
    rate = n_steps / seconds
    return {"steps_per_s": rate, "structures_per_s": rate * global_batch, "timed_epochs": last - skip,
            "timed_s": seconds, "timed_steps": n_steps, "steps_per_epoch": steps_per_epoch,
            "steps_per_s_printed": n_steps / printed if printed > 0 else None, "global_batch": global_batch}


def efficiency(two: float, one: float):
    """Scaling efficiency: two-device throughput / (2 x one-device throughput)."""
    return two / (2.0 * one) if one and two else None


def add_comparisons(rows: list) -> None:
    """Fill ``efficiency`` (against the one-device row of the same mode) and ``vs_1gpu_graph`` of
    the several-device rows from the one-device rows of the same workload and seed (structures
    per second)."""
    def find(workload, seed, mode):
        for row in rows:
            if (row["workload"], row["seed"], row["devices"], row["mode"]) == (workload, seed, 1, mode) \
                    and row.get("structures_per_s"):
                return row["structures_per_s"]
        return None

    for row in rows:
        if row["devices"] < 2 or not row.get("structures_per_s"):
            continue
        base = find(row["workload"], row["seed"], row["mode"])
        graph = find(row["workload"], row["seed"], "graph")
        row["efficiency"] = (row["structures_per_s"] / (row["devices"] * base)) if base else None
        row["vs_1gpu_graph"] = row["structures_per_s"] / graph if graph else None


def summarise(rows: list) -> dict:
    """Per workload: mean efficiency over seeds (``efficiency_mean``: the eager rows;
    ``efficiency_by_mode``: every mode's), and the test force MAE per configuration (mean, seed
    spread) with the difference between 2-GPU and 1-GPU eager against that spread."""
    out = {}
    for workload in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == workload]
        by_mode = {}
        for r in mine:
            if r.get("efficiency"):
                by_mode.setdefault(r["mode"], []).append(r["efficiency"])
        effs = by_mode.get("eager", [])
        configs = {}
        for r in mine:
            if r.get("test_forces_mae") is not None:
                configs.setdefault(f"{r['devices']}gpu-{r['mode']}", []).append(r["test_forces_mae"])
        spread = max((max(v) - min(v) for v in configs.values() if len(v) > 1), default=None)
        entry = {"efficiency_mean": sum(effs) / len(effs) if effs else None, "efficiency_runs": len(effs),
                 "test_forces_mae": {k: {"mean": sum(v) / len(v), "values": v} for k, v in configs.items()},
                 "seed_spread": spread,
                 "efficiency_by_mode": {m: {"mean": sum(v) / len(v), "runs": len(v)} for m, v in by_mode.items()}}
        several = [k for k in configs if not k.startswith("1gpu")]
        two_key = next((k for k in several if k.endswith("-eager")), several[0] if several else None)
        one, two = configs.get("1gpu-eager"), configs.get(two_key) if two_key else None
        if one and two:
            diff = abs(sum(two) / len(two) - sum(one) / len(one))
            entry["ddp_minus_1gpu_eager"] = diff
            entry["agree_within_noise"] = None if spread is None else diff <= spread
        out[workload] = entry
    return out


# ---------------------------------------------------------------------------- outputs
def _fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def markdown(report: dict) -> str:
    meta, rows = report["meta"], report["rows"]
    lines = [f"# DDP scaling (issue 20), {meta['date']}", "",
             f"Device: {meta.get('device')}; {meta['epochs']} epochs per run; steps/s after epoch 1; "
             f"strategy {meta.get('strategy_used')}" + (f" ({meta['strategy_note']})" if meta.get("strategy_note") else ""),
             "", "| workload | devices | mode | seed | global batch | steps/s | structures/s | efficiency | "
             "vs 1-GPU graph | test F MAE (meV/Å) | test E MAE/atom (meV) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['workload']} | {r['devices']} | {r['mode']} | {r['seed']} | {r.get('global_batch')} | "
                         f"error: {r['error'][:120]} | | | | | |")
            continue
        mode = r["mode"] + (" (not captured)" if r["mode"] == "graph" and r.get("captured") is False else "")
        lines.append(f"| {r['workload']} | {r['devices']} | {mode} | {r['seed']} | {r.get('global_batch')} | "
                     f"{_fmt(r.get('steps_per_s'))} | {_fmt(r.get('structures_per_s'))} | {_fmt(r.get('efficiency'))} | "
                     f"{_fmt(r.get('vs_1gpu_graph'))} | {_fmt(r.get('test_forces_mae'))} | "
                     f"{_fmt(r.get('test_energy_per_atom_mae'))} |")
    lines.append("")
    for workload, s in report.get("summary", {}).items():
        maes = ", ".join(f"{k} {_fmt(v['mean'])} ({', '.join(_fmt(x) for x in v['values'])})"
                         for k, v in s["test_forces_mae"].items())
        others = "".join(f" ({m}: {_fmt(v['mean'])} over {v['runs']})"
                         for m, v in s.get("efficiency_by_mode", {}).items() if m != "eager")
        lines.append(f"- {workload}: mean efficiency {_fmt(s['efficiency_mean'])} over {s['efficiency_runs']} seed(s)"
                     f"{others}; "
                     f"test F MAE {maes or '-'}; largest seed spread {_fmt(s['seed_spread'])}"
                     + (f"; |2-GPU - 1-GPU eager| {_fmt(s['ddp_minus_1gpu_eager'])}, within the seed spread: "
                        f"{s['agree_within_noise']}" if "ddp_minus_1gpu_eager" in s else ""))
    lines.append(f"- {GRAPH_UNDER_DDP}.")
    if report.get("skipped"):
        lines.append("- not run (time limit): " + "; ".join(report["skipped"]))
    lines += ["", "Commands:", "", "```", *meta.get("commands", []), "```", ""]
    return "\n".join(lines)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r.get("structures_per_s")]
    if not rows:
        return
    labels = list(dict.fromkeys(f"{r['workload']}\n{r['devices']} GPU {r['mode']}" for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(labels) * 2), 4.5))
    for ax, key, title in ((axes[0], "structures_per_s", "throughput (structures/s)"),
                           (axes[1], "test_forces_mae", "test force MAE (meV/Å)")):
        for i, label in enumerate(labels):
            values = [(r["seed"], r.get(key)) for r in rows
                      if f"{r['workload']}\n{r['devices']} GPU {r['mode']}" == label and r.get(key) is not None]
            if not values:
                continue
            mean = sum(v for _, v in values) / len(values)
            ax.bar(i, mean, color="C0" if "1 GPU" in label else "C1", alpha=0.6)
            for j, (seed, v) in enumerate(values):
                ax.plot(i + 0.12 * (j - (len(values) - 1) / 2), v, "ko", ms=4)
                ax.annotate(f"s{seed}", (i + 0.12 * (j - (len(values) - 1) / 2), v), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(title)
    fig.suptitle(f"DDP scaling, {report['meta'].get('device')} ({report['meta']['date']})", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_outputs(report: dict, out: Path) -> None:
    add_comparisons(report["rows"])
    report["summary"] = summarise(report["rows"])
    _atomic_text(out / "bench_ddp.json", json.dumps(report, indent=1))
    _atomic_text(out / "bench_ddp.md", markdown(report))
    try:
        plot(report, out / "bench_ddp.png")
    except Exception as exc:  # noqa: BLE001 - a plot must not lose the numbers
        print(f"plot not written: {type(exc).__name__}: {exc}", flush=True)


# ---------------------------------------------------------------------------- set-up
