"""PNG plots (matplotlib, Agg backend: no display needed): parity plots, learning curves and
MD thermo logs.

Files are drawn to a temporary name beside the target and renamed (no half-written PNG).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional

import numpy as np

from torchmdx.io_utils import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, path: Path, title: Optional[str]) -> Path:
    """Title, layout, then the PNG written atomically (temporary name, rename); the figure is
    closed whatever happens."""
    plt = _pyplot()
    path = Path(path)
    try:
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        with atomic_path(path, fsync=False) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        return path
    finally:
        plt.close(fig)


def _parity_panel(ax, reference, predicted, label, unit, mae, rmse):
    reference, predicted = np.asarray(reference, dtype=float), np.asarray(predicted, dtype=float)
    lo = float(min(reference.min(), predicted.min()))
    hi = float(max(reference.max(), predicted.max()))
    pad = 0.03 * (hi - lo if hi > lo else 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", lw=1, zorder=1)
    size = 4 if reference.size > 2000 else 8
    ax.scatter(reference, predicted, s=size, alpha=0.5, lw=0, zorder=2)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_aspect("equal")
    ax.set_xlabel(f"reference {label} ({unit})")
    ax.set_ylabel(f"predicted {label} ({unit})")
    ax.set_title(f"{label}: MAE {mae:.4g}, RMSE {rmse:.4g} m{unit}")


def parity_plot(predictions: dict, errors: dict, path, title: Optional[str] = None) -> Path:
    """Predicted vs reference: energy per atom relative to the mean reference (eV/atom), force
    components (eV/Å) and stress components (eV/Å³, when present), one panel each; the titles
    give MAE/RMSE (meV/atom, meV/Å, meV/Å³)."""
    plt = _pyplot()
    panels = []
    n_atoms = predictions["n_atoms"].astype(float)
    e_ref = predictions["energy_ref"] / n_atoms
    e_pred = predictions["energy_pred"] / n_atoms
    offset = float(e_ref.mean())
    panels.append(("energy per atom − mean", e_ref - offset, e_pred - offset, "eV/atom",
                   errors["energy_per_atom_mae"], errors["energy_per_atom_rmse"]))
    if predictions.get("forces_ref") is not None:
        panels.append(("force component", predictions["forces_ref"].ravel(), predictions["forces_pred"].ravel(), "eV/Å",
                       errors["forces_mae"], errors["forces_rmse"]))
    if predictions.get("stress_ref") is not None and "stress_mae" in errors:
        known = np.isfinite(predictions["stress_ref"])
        panels.append(("stress component", predictions["stress_ref"][known], predictions["stress_pred"][known],
                       "eV/Å³", errors["stress_mae"], errors["stress_rmse"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.0), squeeze=False)
    for ax, (label, ref, pred, unit, mae, rmse) in zip(axes[0], panels):
        _parity_panel(ax, ref, pred, label, unit, mae, rmse)
    return _finish(fig, path, title)


def read_epoch_metrics(metrics_csv) -> dict[str, dict[int, float]]:
    """Lightning's CSV log -> {metric: {epoch: value}} (last value logged for each epoch)."""
    out: dict[str, dict[int, float]] = {}
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            epoch = row.get("epoch")
            if epoch in (None, ""):
                continue
            e = int(float(epoch))
            for key, value in row.items():
                if key in ("epoch", "step") or value in (None, ""):
                    continue
                try:
                    number = float(value)
                except ValueError:
                    continue
                if math.isfinite(number):
                    out.setdefault(key, {})[e] = number
    return out


def learning_curve(metrics_csv, path, title: Optional[str] = None) -> Optional[Path]:
    """Train/val force, energy and (when logged) stress MAE (log scale) and the learning rate per
    epoch; None when the log holds no epoch metrics yet."""
    metrics = read_epoch_metrics(metrics_csv)
    names = {"forces_mae": "force", "energy_mae": "energy", "stress_mae": "stress"}
    panels = [(q, unit) for q, unit in (("forces_mae", "meV/Å"), ("energy_mae", "meV"), ("stress_mae", "meV/Å³"))
              if f"train_{q}" in metrics or f"val_{q}" in metrics]
    if not panels:
        return None
    plt = _pyplot()
    has_lr = "lr" in metrics
    fig, axes = plt.subplots(1, len(panels) + has_lr, figsize=(5.0 * (len(panels) + has_lr), 4.0), squeeze=False)
    for ax, (quantity, unit) in zip(axes[0], panels):
        for stage, style in (("train", "-"), ("val", "-o")):
            series = metrics.get(f"{stage}_{quantity}")
            if series:
                epochs = sorted(series)
                ax.plot([e + 1 for e in epochs], [series[e] for e in epochs], style, ms=3, label=stage)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{names[quantity]} MAE ({unit})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if has_lr:
        ax = axes[0][-1]
        series = metrics["lr"]
        epochs = sorted(series)
        ax.plot([e + 1 for e in epochs], [series[e] for e in epochs])
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("learning rate")
        ax.grid(True, which="both", alpha=0.3)
    return _finish(fig, path, title)


def thermo_plot(rows: list, path, title: Optional[str] = None) -> Path:
    """MD thermo log as a PNG: energies (potential, kinetic, conserved; eV, relative to their
    first value) and temperature (K) against time (ps), one line per structure.

    ``rows``: dicts with ``time_ps``, ``potential_eV``, ``kinetic_eV``, ``temperature_K`` and
    optionally ``conserved_eV`` and ``structure`` (as :func:`torchmdx.md.io.read_thermo` gives).
    A third panel shows the density (g/cm³) when it changes (constant-pressure runs).
    """
    plt = _pyplot()
    densities = [r["density_g_cm3"] for r in rows if "density_g_cm3" in r]
    with_density = len(densities) > 1 and max(densities) > min(densities)
    fig, axes = plt.subplots(3 if with_density else 2, 1, figsize=(7, 8.5 if with_density else 6), sharex=True)
    ax_e, ax_t = axes[0], axes[1]
    structures = sorted({int(r.get("structure", 0)) for r in rows})
    for b in structures:
        mine = [r for r in rows if int(r.get("structure", 0)) == b]
        t = np.array([r["time_ps"] for r in mine])
        tag = f" [{b}]" if len(structures) > 1 else ""
        for key, label in (("potential_eV", "potential"), ("kinetic_eV", "kinetic"), ("conserved_eV", "conserved")):
            if key in mine[0]:
                values = np.array([r[key] for r in mine])
                ax_e.plot(t, values - values[0], lw=1, label=label + tag)
        ax_t.plot(t, [r["temperature_K"] for r in mine], lw=1, label=f"structure {b}" if tag else None)
        if with_density:
            axes[2].plot(t, [r.get("density_g_cm3", np.nan) for r in mine], lw=1)
    ax_e.set_ylabel("energy - initial (eV)")
    ax_e.legend(fontsize=8, ncol=3)
    ax_t.set_ylabel("temperature (K)")
    if with_density:
        axes[2].set_ylabel("density (g/cm³)")
    axes[-1].set_xlabel("time (ps)")
    if len(structures) > 1:
        ax_t.legend(fontsize=8)
    return _finish(fig, path, title)
