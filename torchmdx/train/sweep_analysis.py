"""Scaling-law analysis of a finished (or partly finished) sweep: fits, frontiers, plots, table.

Families: points are grouped by model family, the architecture with what changes its symmetry
or algebra (``gatr:projective``, ``transformer+aug`` when trained with ``train.augment``).

- Power law: log y = log a + b log x by least squares on the log-log points; the exponent's
  uncertainty is its standard error, s / sqrt(Σ (log x - mean)²), s² = Σ residual² / (n - 2)
  (needs at least 3 points; with 2 the line is drawn and the error is not defined).
- Compute-optimal frontier: the points that no other point beats with less or equal compute
  (the lower envelope of error against training FLOPs), per family and over all families. The
  error-vs-compute power law of a family is fitted to its frontier points (where more compute
  was spent well), and the parameters along the frontier show the compute-optimal model size.
- Error against training-set size: per family and size, the best point (over model sizes and
  steps); the data-scaling power law is fitted to those.

Outputs in the sweep folder: ``error_vs_compute.png``, ``error_vs_data.png``,
``frontier_parameters.png``, ``results.md`` (table + fits), ``fits.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from torchmdx.io_utils import atomic_write, jsonable

ERROR_KEY = "test_forces_mae"


def family(row: dict) -> str:
    name = str(row.get("family") or row.get("architecture") or "et")
    if not row.get("family"):
        if row.get("algebra"):
            name += f":{row['algebra']}"
        if row.get("augment") not in (None, "", "none"):
            name += "+aug" if row["augment"] == "rotations" else "+aug(O3)"
    return name


def power_law(x, y) -> dict:
    """Fit y = a x^b on positive values: {'exponent', 'exponent_err', 'prefactor', 'points'}."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    x, y = np.log(x[keep]), np.log(y[keep])
    n = len(x)
    out = {"exponent": math.nan, "exponent_err": math.nan, "prefactor": math.nan, "points": n}
    if n < 2 or np.ptp(x) == 0:
        return out
    design = np.stack([np.ones(n), x], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    out.update(exponent=float(coef[1]), prefactor=float(math.exp(coef[0])))
    if n > 2:
        residual = y - design @ coef
        s2 = float(residual @ residual) / (n - 2)
        out["exponent_err"] = math.sqrt(s2 / float(((x - x.mean()) ** 2).sum()))
    return out


def frontier(points: list[tuple]) -> list[tuple]:
    """The lower envelope: (x, y, ...) tuples sorted by x whose y beats every point with x' <= x."""
    best = math.inf
    out = []
    for point in sorted(points, key=lambda p: (p[0], p[1])):
        if point[1] < best:
            out.append(point)
            best = point[1]
    return out


def analyse(rows: list[dict], sweep_dir, label_keys: Optional[list] = None, missing: Optional[list] = None) -> dict:
    """Fits, frontiers, plots and the markdown table for ``rows`` (sweep_result.json contents); ``missing``: the
    planned points without a result (failed or not run yet), named under the table."""
    sweep_dir = Path(sweep_dir)
    usable = [r for r in rows if r.get(ERROR_KEY) not in (None, "") and r.get("training_flops")]
    families = sorted({family(r) for r in usable})
    fits = {"compute": {}, "data": {}, "frontier_parameters": {}, "frontier": []}
    by_family = {f: [r for r in usable if family(r) == f] for f in families}
    for name, members in by_family.items():
        front = frontier([(r["training_flops"], r[ERROR_KEY], r) for r in members])
        fits["compute"][name] = {**power_law([p[0] for p in front], [p[1] for p in front]),
                                 "frontier": [p[2]["point"] for p in front]}
        fits["frontier_parameters"][name] = power_law([p[0] for p in front], [p[2]["parameters"] for p in front])
        best = {}
        for r in members:
            size = r.get("train_size")
            if size and (size not in best or r[ERROR_KEY] < best[size][ERROR_KEY]):
                best[size] = r
        sizes = sorted(best)
        fits["data"][name] = {**power_law(sizes, [best[s][ERROR_KEY] for s in sizes]),
                              "best": {str(s): best[s]["point"] for s in sizes}}
    overall = frontier([(r["training_flops"], r[ERROR_KEY], r) for r in usable])
    fits["frontier"] = [{"point": p[2]["point"], "family": family(p[2]), "training_flops": p[0], ERROR_KEY: p[1],
                         "parameters": p[2].get("parameters"), "steps": p[2].get("steps")} for p in overall]
    with atomic_write(sweep_dir / "fits.json", "w") as handle:
        json.dump(jsonable(fits), handle, indent=2)
    if usable:
        _plots(by_family, fits, overall, sweep_dir)
    _markdown(rows, fits, sweep_dir, label_keys or [], missing or [])
    return fits


def _fit_label(fit: dict) -> str:
    if math.isnan(fit["exponent"]):
        return ""
    err = "" if math.isnan(fit["exponent_err"]) else f" ± {fit['exponent_err']:.2f}"
    return f", slope {fit['exponent']:.2f}{err}"


def _plots(by_family: dict, fits: dict, overall: list, sweep_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def figure(name, xlabel, ylabel, draw_family, finish=None):
        """One log-log figure written to ``name``: ``draw_family(ax, family, members, colour)``
        for each family in turn (its colour from the cycle), then ``finish(ax)``."""
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        for k, (fam, members) in enumerate(by_family.items()):
            draw_family(ax, fam, members, colours[k % len(colours)])
        if finish is not None:
            finish(ax)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        with atomic_write(sweep_dir / name) as handle:
            fig.savefig(handle, format="png", dpi=130)
        plt.close(fig)

    def fit_line(ax, fit, lo, hi, colour):
        """The power law ``fit`` from x = lo to hi (nothing when the fit is undefined)."""
        if not math.isnan(fit["exponent"]):
            xs = np.geomspace(lo, hi, 50)
            ax.plot(xs, fit["prefactor"] * xs ** fit["exponent"], color=colour, lw=1.2)

    # error against compute, with each family's frontier fit and the overall frontier
    def compute_family(ax, fam, members, colour):
        fit = fits["compute"][fam]
        ax.scatter([r["training_flops"] for r in members], [r[ERROR_KEY] for r in members], color=colour, alpha=0.6,
                   s=22, label=f"{fam}{_fit_label(fit)}")
        front = [r["training_flops"] for r in members if r["point"] in fit["frontier"]]
        if front:
            fit_line(ax, fit, min(front), max(front), colour)

    def overall_frontier(ax):
        if overall:
            ax.step([p[0] for p in overall], [p[1] for p in overall], where="post", color="black", lw=1.0, ls="--",
                    label="compute-optimal frontier")

    figure("error_vs_compute.png", "training compute (FLOPs)", "test force MAE (meV/Å)", compute_family,
           overall_frontier)

    # error against training-set size (best point per size), with fits
    def data_family(ax, fam, members, colour):
        fit = fits["data"][fam]
        ax.scatter([r["train_size"] for r in members], [r[ERROR_KEY] for r in members], color=colour, alpha=0.25, s=14)
        best = sorted(((r["train_size"], r[ERROR_KEY]) for r in members if r["point"] in fit["best"].values()))
        if best:
            ax.plot([b[0] for b in best], [b[1] for b in best], "o", color=colour, label=f"{fam}{_fit_label(fit)}")
            fit_line(ax, fit, best[0][0], best[-1][0], colour)

    figure("error_vs_data.png", "training structures", "test force MAE (meV/Å)", data_family)

    # parameters of the frontier points against compute: the compute-optimal model size
    def parameters_family(ax, fam, members, colour):
        front = [r for r in members if r["point"] in fits["compute"][fam]["frontier"]]
        if front:
            ax.plot([r["training_flops"] for r in front], [r["parameters"] for r in front], "o-", color=colour,
                    label=f"{fam}{_fit_label(fits['frontier_parameters'][fam])}")

    figure("frontier_parameters.png", "training compute (FLOPs)", "parameters of the frontier points", parameters_family)


def _fmt(value, digits=4):
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}g}"
    return str(value)


def _markdown(rows: list[dict], fits: dict, sweep_dir: Path, label_keys: list, missing: list = ()) -> None:
    columns = ["point", "family"] + label_keys + ["parameters", "train_size", "steps", "training_flops",
                                                  "device_seconds", "test_energy_mae", ERROR_KEY]
    lines = ["# Sweep results", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        values = {**row.get("labels", {}), **row, "family": family(row)}
        lines.append("| " + " | ".join(_fmt(values.get(c)) for c in columns) + " |")
    if missing:  # the table read as the whole sweep when a point had failed (round 34)
        lines += ["", f"Not in this table (no result: failed, or not run yet): {len(missing)} of the "
                      f"{len(rows) + len(missing)} planned points, {', '.join(missing)}; `torchmdx sweep` again runs "
                      "them."]
    lines += ["", "Errors in meV (energy) and meV/Å (forces) on the sweep's common test set; compute in FLOPs "
              "(counted, torchmdx.train.flops).", "", "## Power laws (test force MAE ∝ x^slope, ± standard error)", "",
              "| family | vs compute (frontier) | vs training structures | frontier parameters vs compute |",
              "|---|---|---|---|"]
    for name in fits["compute"]:
        cells = []
        for kind in ("compute", "data", "frontier_parameters"):
            fit = fits[kind][name]
            err = "" if math.isnan(fit["exponent_err"]) else f" ± {fit['exponent_err']:.2f}"
            cells.append("n/a" if math.isnan(fit["exponent"]) else f"{fit['exponent']:.2f}{err} ({fit['points']} pts)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if fits["frontier"]:
        lines += ["", "## Compute-optimal frontier (all families)", "", "| point | family | FLOPs | parameters | steps | "
                  "force MAE |", "|---|---|---|---|---|---|"]
        for p in fits["frontier"]:
            lines.append(f"| {p['point']} | {p['family']} | {_fmt(p['training_flops'])} | {_fmt(p['parameters'])} | "
                         f"{_fmt(p['steps'])} | {_fmt(p[ERROR_KEY])} |")
    with atomic_write(sweep_dir / "results.md", "w") as handle:
        handle.write("\n".join(lines) + "\n")
