"""Energies per atom given as energies of whole structures (round 28).

Some datasets and conversion scripts write the energy per atom (E / N); torchmdx, like TorchMD-NET, MACE and
NequIP, trains on total energies (the model sums its atoms' energies), so such labels trained without a word into
a model whose energies do not grow with the structure. Over structures of different sizes the two kinds of label
are told apart by which linear model fits them: total energies are close to a sum of per-element energies times
the atom counts (E ≈ Σ_e n_e r_e + c), energies per atom to the same with the atom fractions (E ≈ Σ_e (n_e / N) r_e
+ c). On the sample data the fit of the right kind leaves 16 to 3000 times less (RMS) than the other (ANI-1x: 1.0
against 67 eV for total energies, 0.19 against 3.1 eV for the same energies per atom; QM9: 0.40 against 1177 eV).
When the fractions fit :data:`RATIO` times better than the counts, with sizes differing by at least
:data:`SIZE_SPREAD` and more structures than :data:`MIN_EXCESS` beyond the unknowns, one warning line. Structures
of one size (a single molecule's frames) cannot tell the two apart: nothing is said. The forces of a trajectory tell
it too (:mod:`torchmdx.data.force_consistency`). At most :data:`MAX_STRUCTURES` structures, spread evenly, are read.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

MAX_STRUCTURES = 20000
RATIO = 5.0
SIZE_SPREAD = 1.5
MIN_EXCESS = 5


def fit_residuals(structures, max_structures: int = MAX_STRUCTURES):
    """(structures used, smallest and largest atom count, RMS residual of the count fit, of the fraction fit) in the
    energy unit; the residuals are None when the data cannot tell the two fits apart."""
    st = structures
    offsets = np.asarray(st.offsets, dtype=np.int64)
    n = len(offsets) - 1
    if n < 2:
        return n, 0, 0, None, None
    chosen = np.unique(np.linspace(0, n - 1, min(max_structures, n)).astype(np.int64))
    counts = (offsets[chosen + 1] - offsets[chosen]).astype(np.float64)
    rows, columns, elements = [], [], {}
    for row, s in enumerate(chosen):
        values, many = np.unique(np.asarray(st.z[offsets[s]:offsets[s + 1]]), return_counts=True)
        for z, k in zip(values.tolist(), many.tolist()):
            rows.append((row, elements.setdefault(int(z), len(elements)), k))
    lo, hi = int(counts.min()), int(counts.max())
    energy = np.asarray(st.energy, dtype=np.float64)[chosen]
    if lo < 1 or hi < SIZE_SPREAD * lo or len(chosen) < len(elements) + 1 + MIN_EXCESS or not np.all(np.isfinite(energy)):
        return len(chosen), lo, hi, None, None
    composition = np.zeros((len(chosen), len(elements) + 1))
    for row, col, k in rows:
        composition[row, col] = k
    composition[:, -1] = 1.0
    fraction = composition.copy()
    fraction[:, :-1] /= counts[:, None]
    residuals = []
    for design in (composition, fraction):
        solution, *_ = np.linalg.lstsq(design, energy, rcond=None)
        residuals.append(float(np.sqrt(np.mean((design @ solution - energy) ** 2))))
    return len(chosen), lo, hi, residuals[0], residuals[1]


def per_atom_energy_line(structures, source: str) -> Optional[str]:
    """One line when the energies of ``structures`` (read from ``source``) look like energies per atom (module
    docstring), else None."""
    used, lo, hi, by_count, by_fraction = fit_residuals(structures)
    if by_count is None or not by_fraction * RATIO < by_count:
        return None
    return (f"{source}: the energies look like energies per atom, not of whole structures: over {used} structures of "
            f"{lo} to {hi} atoms, per-element energies times the atom fractions fit them to {by_fraction:.3g} eV (RMS), "
            f"times the atom counts only to {by_count:.3g} eV; torchmdx trains on total energies (the model sums its "
            "atoms' energies): multiply each energy by its structure's atom count")
