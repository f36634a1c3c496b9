"""Do a dataset's forces belong to its energies? (round 28)

Forces in Hartree/Bohr read as eV/Å (51 times too small), gradients written as forces (+dE/dR), or energies per
atom beside forces of the whole structure trained without a word: the label checks (:mod:`torchmdx.data.label_check`)
bound each label's size, not how energies and forces relate. For two structures a and b of the same atoms a small
step apart (consecutive frames of a trajectory: MD17, a labelled MD run), the energy change is the work of the
forces along the step, to second order (the trapezoid rule):

    E_b - E_a = -1/2 (F_a + F_b) . (R_b - R_a)

Over the pairs of consecutive structures whose atoms moved at most :data:`MAX_SHIFT` Å, the slope s of the energy
changes against that work (a least-squares line through the origin) is 1 for consistent labels: 0.985 to 0.99 for
the MD17 (ethanol, aspirin) and polymer files of the sample data, correlation above 0.99. A slope outside
[:data:`LOW`, :data:`HIGH`] with a correlation above :data:`MIN_CORRELATION` (the pairs are close enough for the
rule) over at least :data:`MIN_PAIRS` pairs is one warning line naming the factor and what it looks like. Data
without such pairs (single conformers, shuffled or widely spaced frames) say nothing: the check needs trajectories.
At most :data:`MAX_PAIRS` pairs are read, spread over the dataset (memory-mapped caches are read a pair at a time).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

#: pairs of consecutive structures looked at, spread evenly over the dataset
MAX_PAIRS = 2000
#: the largest displacement (Å, any coordinate) of a pair for the trapezoid rule
MAX_SHIFT = 0.15
#: pairs needed, and the correlation of energy changes and work that shows the rule holds
MIN_PAIRS = 10
MIN_CORRELATION = 0.9
#: slopes taken as consistent
LOW, HIGH = 0.5, 2.0

#: factors a slope is compared with: (factor, what it looks like)
_KNOWN = (
    (51.422, "forces in Hartree/Bohr read as eV/Å"),
    (27.211, "forces in Hartree/Å read as eV/Å, or energies in eV beside forces in Hartree/Å"),
    (23.061, "forces in eV/Å beside energies in kcal/mol, or energies converted and forces not"),
    (1 / 23.061, "forces in kcal/mol/Å read as eV/Å beside energies in eV"),
    (-1.0, "the forces hold the energy gradient +dE/dR, not the forces -dE/dR"),
)


def consistency_slope(structures, max_pairs: int = MAX_PAIRS, max_shift: float = MAX_SHIFT):
    """(pairs used, slope, correlation) of the energy changes against the work of the forces over close pairs of
    consecutive structures (module docstring); slope and correlation are None with fewer than two pairs."""
    st = structures
    n = len(st)
    if st.forces is None or n < 2:
        return 0, None, None
    offsets = np.asarray(st.offsets)
    starts = np.unique(np.linspace(0, n - 2, min(max_pairs, n - 1)).astype(np.int64))
    d_energy, work = [], []
    for s in starts:
        a0, a1, a2 = int(offsets[s]), int(offsets[s + 1]), int(offsets[s + 2])
        if a1 - a0 != a2 - a1 or a1 == a0 or not np.array_equal(st.z[a0:a1], st.z[a1:a2]):
            continue
        if np.any(np.asarray(st.cell[s]) != np.asarray(st.cell[s + 1])):
            continue  # a cell that changed (NPT) moves the atoms by the strain too
        step = np.asarray(st.pos[a1:a2], dtype=np.float64) - np.asarray(st.pos[a0:a1], dtype=np.float64)
        if not np.all(np.isfinite(step)) or np.abs(step).max() > max_shift:
            continue
        forces = np.asarray(st.forces[a0:a1], dtype=np.float64) + np.asarray(st.forces[a1:a2], dtype=np.float64)
        work.append(-0.5 * float(np.sum(forces * step)))
        d_energy.append(float(st.energy[s + 1]) - float(st.energy[s]))
    if len(work) < 2:
        return len(work), None, None
    d_energy, work = np.asarray(d_energy), np.asarray(work)
    if not (work @ work > 0 and np.std(work) > 0 and np.std(d_energy) > 0):
        return len(work), None, None
    slope = float(d_energy @ work / (work @ work))
    correlation = float(np.corrcoef(d_energy, work)[0, 1])
    return len(work), slope, correlation


def matching_factor(slope: float, known) -> Optional[str]:
    """The description of the first (factor, description) of ``known`` that ``slope`` matches within 10 % (same
    sign), else None: what a consistency slope looks like (this module's and :mod:`torchmdx.data.stress_consistency`)."""
    for factor, what in known:
        if factor * slope > 0 and abs(slope / factor - 1.0) < 0.1:
            return what
    return None


def _looks_like(slope: float, atoms: float) -> Optional[str]:
    """What a slope looks like: a known unit factor, or 1/N (energies per atom), within 10 %."""
    known = list(_KNOWN)
    if atoms > 1.5:
        known.append((1.0 / atoms, f"energies per atom beside forces of the whole structure ({atoms:g} atoms)"))
    return matching_factor(slope, known)


def force_energy_line(structures, source: str) -> Optional[str]:
    """One line when the forces of ``structures`` (read from ``source``) disagree with their energies by a factor
    (module docstring), else None."""
    pairs, slope, correlation = consistency_slope(structures)
    if slope is None or pairs < MIN_PAIRS or abs(correlation) < MIN_CORRELATION or LOW <= slope <= HIGH:
        return None
    counts = np.diff(np.asarray(structures.offsets))
    guess = _looks_like(slope, float(np.median(counts)) if len(counts) else 0.0)
    hint = f" ({guess}?)" if guess else ""
    return (f"{source}: the forces do not fit the energies: over {pairs} pairs of consecutive structures a small step "
            f"apart, the energy changes by {slope:.4g} times the work of the forces along the step (1 for forces "
            f"-dE/dR in the energy unit per Å; correlation {correlation:.3f}){hint}; check the units and sign of "
            "the forces and energies (data.energy_unit, data.length_unit, the file's keys)")
