"""PNG plots of an SLMC run (matplotlib, Agg backend; written to a temporary name and renamed).

- :func:`acceptance_plot`: SLMC acceptance rate against the number of attention layers (0 = the
  linear model; crosses: the acceptance predicted from the spread of the log acceptance ratios), and the model's validation error β·RMS(E_eff - E) against its parameter count.
- :func:`structure_factor_plot`: S(q) along Γ → X → M → Γ for the exact local-update reference
  and every SLMC run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torchmdx.io_utils import atomic_path
from torchmdx.lattice.geometry import SquareLattice


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, title: Optional[str]) -> Path:
    plt = _pyplot()
    path = Path(path)
    try:
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        with atomic_path(path, fsync=False) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        return path
    finally:
        plt.close(fig)


def acceptance_plot(results: list[dict], path, title: Optional[str] = None) -> Path:
    """Left: acceptance ± error against layers (linear model at 0, drawn apart); right: the
    validation β·RMS error against the number of parameters (log-log)."""
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    linear = [r for r in results if r["layers"] == 0]
    attention = sorted((r for r in results if r["layers"] > 0), key=lambda r: r["layers"])
    if attention:
        ax.errorbar([r["layers"] for r in attention], [r["acceptance"] for r in attention],
                    yerr=[r["acceptance_error"] for r in attention], marker="o", capsize=3,
                    label="equivariant transformer")
        ax2.loglog([r["parameters"] for r in attention], [r["fit"]["beta_val_rmse"] for r in attention], "o-",
                   label="equivariant transformer")
    for r in linear:
        ax.errorbar([0], [r["acceptance"]], yerr=[r["acceptance_error"]], marker="s", color="C3", capsize=3,
                    label="linear model")
        ax.axhline(r["acceptance"], color="C3", lw=0.8, ls=":")
        ax2.loglog([r["parameters"]], [r["fit"]["beta_val_rmse"]], "s", color="C3", label="linear model")
    predicted = [r for r in linear + attention if "acceptance_from_log_ratio_std" in r]
    if predicted:
        ax.plot([r["layers"] for r in predicted], [r["acceptance_from_log_ratio_std"] for r in predicted], "kx",
                label="erfc(s/2√2), s = spread of log ratios")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("attention layers (0: linear model)")
    ax.set_ylabel("SLMC acceptance rate")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    from matplotlib.ticker import FormatStrFormatter

    ax2.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))  # a narrow log range: plain numbers, not 1.3×10⁰
    ax2.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
    ax2.set_xlabel("parameters")
    ax2.set_ylabel("validation β·RMS(E_eff − E)")
    ax2.legend(fontsize=8)
    return _save(fig, path, title)


def structure_factor_plot(lattice: SquareLattice, reference: dict, results: list[dict], path,
                          title: Optional[str] = None) -> Path:
    plt = _pyplot()
    idx, labels, ticks = lattice.momentum_path()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    x = list(range(len(idx)))
    def err(r):
        return [r["structure_factor_error"][i] for i in idx] if "structure_factor_error" in r else None

    ax.errorbar(x, [reference["structure_factor"][i] for i in idx], yerr=err(reference), fmt="k-", lw=2.5, alpha=0.4,
                label="exact local MC")
    for k, r in enumerate(results):
        shift = 0.04 * (k - (len(results) - 1) / 2)  # error bars side by side
        ax.errorbar([v + shift for v in x], [r["structure_factor"][i] for i in idx], yerr=err(r),
                    fmt="o--" if r["layers"] == 0 else "o-", ms=3, capsize=2, color=f"C{k}", label=f"SLMC {r['name']}")
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels)
    ax.set_ylabel("S(q)  (error bars: spread of independent chains)")
    ax.legend(fontsize=7)
    return _save(fig, path, title)
