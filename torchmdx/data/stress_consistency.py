"""Do a dataset's stress labels belong to its energies? (sign and unit; after round 29, branch stresscheck)

A stress given with the other sign (a pressure-like tensor, positive under compression: LAMMPS' pressure, VASP's
OUTCAR; or a virial divided by the volume) or in another unit (GPa or kbar read as eV/Å³) trained without a word: the
label checks (:mod:`torchmdx.data.label_check`) refuse a stress only far beyond physical (bar, Pa), and the force
check (:mod:`torchmdx.data.force_consistency`) looks at pairs of one cell only. Stress is ASE's, σ = (1/V) ∂E/∂ε in
eV/Å³ (negative in a compressed crystal), as the readers store it.

The equation. A structure is its cell h (rows are the lattice vectors, Å) and fractional coordinates s (positions
r = s h). For two structures a and b of the same atoms (same atomic numbers in the same order) a small step apart,
take the straight path h(t) = h_a + t Δh, s(t) = s_a + t Δs (Δs to the nearest image: a wrapped atom is not a jump).
Along it dE/dt = -Σ_i F_i · (Δs_i h) + V σ : (h⁻¹ Δh), the first term the work of the forces for the move at a fixed
cell, the second the strain step G = h⁻¹ Δh (h_b = h_a (I + G); only its symmetric part counts, σ being symmetric:
a rotation costs nothing). The trapezoid rule over the step, exact to second order (its error is third order in
the step):

    E_b - E_a = -1/2 Σ_i (F_a,i · Δs_i h_a + F_b,i · Δs_i h_b) + 1/2 (V_a σ_a : h_a⁻¹ Δh + V_b σ_b : h_b⁻¹ Δh)
              =  W_F (eV)                                          + W_σ (eV)

(E eV, F eV/Å, h Å, V Å³, σ eV/Å³). Checked against ASE's EMT on rattled, strained copper: the residual falls by 8
when the step is halved (tests/test_stress_consistency.py).

Over pairs whose cell changed (the strain step at most :data:`MAX_STRAIN` in any component, the move at the fixed
cell at most :data:`MAX_SHIFT` Å), E_b - E_a is fitted as f W_F + s W_σ by least squares (through the origin): s is
1 for stress labels that belong to the energies, whatever the forces' factor f (a force mistake does not pass for a
stress one; the force check names it on pairs of one cell). Without forces only pairs whose atoms moved with the
cell (an equation-of-state scan, atoms scaled with the cell: a move at the fixed cell under :data:`STILL` Å) are
used, W_F = 0. A slope s outside [:data:`LOW`, :data:`HIGH`], determined (s at least :data:`MIN_T` standard errors
from 0) by a fit that explains the energy changes (correlation above :data:`MIN_CORRELATION`) over at least
:data:`MIN_PAIRS` pairs, is one warning line naming the factor and what it looks like: -1 the other sign, 1/160.2
GPa (1 eV/Å³ = 160.2177 GPa), 1/1602 kbar, their negatives, -1/V a virial -V σ (eV) given as the stress, 1/N
energies per atom.

Pairs: consecutive structures (an NPT trajectory, a relaxation with a variable cell, an ordered scan), at most
:data:`MAX_PAIRS` spread over the dataset (memory-mapped caches are read a pair at a time). **Decision:** where
those give fewer than :data:`MIN_PAIRS` pairs, structures of the same atoms (same count, same atomic numbers in the
same order: the pair's atoms must map one to one) are sorted by volume and neighbours in that order are paired
too: an equation-of-state set written shuffled, or interleaved with other materials, is checked as well, at the cost
of one pass over the atomic numbers; only for datasets of at most :data:`MAX_SORTED_STRUCTURES` structures (larger
sets are trajectories in practice, and the pass would read every atom). Independently rattled
structures sorted by volume are further apart than :data:`MAX_SHIFT` and are not paired. Data without pairs whose
cell changed say nothing.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from torchmdx.units import EV_PER_A3_TO_GPA

#: pairs looked at, spread evenly over the dataset
MAX_PAIRS = 2000
#: the largest move (Å, any coordinate) of a pair's atoms at a fixed cell, for the trapezoid rule
MAX_SHIFT = 0.15
#: the largest component of the strain step h_a⁻¹ Δh of a pair (2 %: an equation-of-state scan's 1-2 % steps)
MAX_STRAIN = 0.02
#: a move (Å) at the fixed cell below which a pair needs no forces (atoms scaled with the cell, as written)
STILL = 1e-4
#: pairs needed, the correlation of the fit and energy changes, and the standard errors the slope must be from 0
MIN_PAIRS = 10
MIN_CORRELATION = 0.9
MIN_T = 5.0
#: slopes taken as consistent
LOW, HIGH = 0.5, 2.0
#: datasets with at most this many structures with a stress are also paired by volume (module docstring)
MAX_SORTED_STRUCTURES = 20000

_KBAR = 10.0 * EV_PER_A3_TO_GPA
#: factors a slope is compared with: (factor, what it looks like); the volume and atom-count ones are added per set
_KNOWN = (
    (-1.0, "a stress of the other sign: positive under compression (a pressure tensor, as LAMMPS and VASP's OUTCAR "
           "write it), or a virial divided by the volume"),
    (1.0 / EV_PER_A3_TO_GPA, "a stress in GPa read as eV/Å³"),
    (-1.0 / EV_PER_A3_TO_GPA, "a pressure tensor in GPa (positive under compression) read as eV/Å³"),
    (1.0 / _KBAR, "a stress in kbar read as eV/Å³"),
    (-1.0 / _KBAR, "a pressure tensor in kbar (positive under compression: VASP's OUTCAR) read as eV/Å³"),
    (EV_PER_A3_TO_GPA, "a stress in eV/Å³ converted again as if in GPa (divided by 160.2)"),
)


def _pair_terms(st, stress, a: int, b: int, offsets, max_shift: float, max_strain: float):
    """(W_F, W_σ, E_b - E_a, V_a) of structures a and b (module docstring), or None when they are not a pair: other
    atoms, no cell change, a step too large, missing labels."""
    a0, a1 = int(offsets[a]), int(offsets[a + 1])
    b0, b1 = int(offsets[b]), int(offsets[b + 1])
    if a1 - a0 != b1 - b0 or a1 == a0 or not np.array_equal(st.z[a0:a1], st.z[b0:b1]):
        return None
    ha, hb = np.asarray(st.cell[a], dtype=np.float64), np.asarray(st.cell[b], dtype=np.float64)
    if np.array_equal(ha, hb) or not (np.isfinite(ha).all() and np.isfinite(hb).all()):
        return None  # one cell: the force check's pairs
    pbc_a, pbc_b = np.asarray(st.pbc[a], dtype=bool), np.asarray(st.pbc[b], dtype=bool)
    if not (pbc_a.all() and pbc_b.all()):
        return None
    sa = np.asarray(stress[a], dtype=np.float64).reshape(3, 3)
    sb = np.asarray(stress[b], dtype=np.float64).reshape(3, 3)
    if not (np.isfinite(sa).all() and np.isfinite(sb).all()):
        return None
    va, vb = abs(float(np.linalg.det(ha))), abs(float(np.linalg.det(hb)))
    if not (va > 1e-9 and vb > 1e-9):
        return None
    dh = hb - ha
    ga, gb = np.linalg.solve(ha, dh), np.linalg.solve(hb, dh)  # h_a⁻¹ Δh, h_b⁻¹ Δh
    if not np.abs(ga).max() <= max_strain:
        return None
    ra, rb = np.asarray(st.pos[a0:a1], dtype=np.float64), np.asarray(st.pos[b0:b1], dtype=np.float64)
    ds = np.linalg.solve(hb.T, rb.T).T - np.linalg.solve(ha.T, ra.T).T  # s = r h⁻¹
    if not np.isfinite(ds).all():
        return None
    ds -= np.round(ds)  # an atom wrapped into the cell between the frames
    da, db = ds @ ha, ds @ hb
    move = max(float(np.abs(da).max()), float(np.abs(db).max()))
    if move > max_shift:
        return None
    forces = st.forces
    fa = fb = None
    if forces is not None:
        fa, fb = np.asarray(forces[a0:a1], dtype=np.float64), np.asarray(forces[b0:b1], dtype=np.float64)
        if not (np.isfinite(fa).all() and np.isfinite(fb).all()):
            fa = fb = None
    if fa is None:
        if move > STILL:
            return None
        work_f = 0.0
    else:
        work_f = -0.5 * (float(np.sum(fa * da)) + float(np.sum(fb * db)))
    work_s = 0.5 * (va * float(np.sum(sa * ga)) + vb * float(np.sum(sb * gb)))
    d_energy = float(st.energy[b]) - float(st.energy[a])
    if not np.isfinite(d_energy):
        return None
    return work_f, work_s, d_energy, 0.5 * (va + vb)


def _consecutive(n: int, max_pairs: int):
    starts = np.unique(np.linspace(0, n - 2, min(max_pairs, n - 1)).astype(np.int64))
    return [(int(s), int(s) + 1) for s in starts]


def _by_volume(st, stress, max_pairs: int):
    """Pairs of neighbours in volume among structures of the same atoms (module docstring); [] for larger sets."""
    n = len(st)
    if n > MAX_SORTED_STRUCTURES:
        return []
    labelled = np.flatnonzero(np.isfinite(np.asarray(stress, dtype=np.float64).reshape(n, -1)).all(-1)
                              & np.asarray(st.pbc, dtype=bool).reshape(n, 3).all(-1))
    if labelled.size < 2:
        return []
    offsets = np.asarray(st.offsets, dtype=np.int64)
    volumes = np.abs(np.linalg.det(np.asarray(st.cell[labelled], dtype=np.float64).reshape(-1, 3, 3)))
    groups: dict = {}
    for index, volume in zip(labelled.tolist(), volumes.tolist()):
        atoms = np.asarray(st.z[offsets[index]:offsets[index + 1]], dtype=np.int64)
        groups.setdefault(atoms.tobytes(), []).append((volume, index))
    pairs = []
    for members in groups.values():
        members.sort()
        pairs.extend((members[k][1], members[k + 1][1]) for k in range(len(members) - 1))
    if len(pairs) > max_pairs:
        pairs = [pairs[int(k)] for k in np.unique(np.linspace(0, len(pairs) - 1, max_pairs).astype(np.int64))]
    return pairs


def _terms(st, stress, pairs, max_shift, max_strain):
    offsets = np.asarray(st.offsets)
    found = [_pair_terms(st, stress, a, b, offsets, max_shift, max_strain) for a, b in pairs]
    return [t for t in found if t is not None]


def stress_slope(structures, max_pairs: int = MAX_PAIRS, max_shift: float = MAX_SHIFT,
                 max_strain: float = MAX_STRAIN) -> dict:
    """The fit of the module docstring: ``pairs`` (used), ``slope`` s of the stress work, ``force_slope`` f,
    ``correlation`` of the fit with the energy changes, ``t`` (s over its standard error), ``volume`` (median of
    the pairs, Å³), ``paired`` ('consecutive' or 'volume'); slope and the rest None with fewer than three pairs or
    no stress work."""
    st = structures
    stress = st.extras.get("stress") if isinstance(getattr(st, "extras", None), dict) else None
    out = dict(pairs=0, slope=None, force_slope=None, correlation=None, t=None, volume=None, paired="consecutive")
    n = len(st)
    if stress is None or st.energy is None or n < 2:
        return out
    terms = _terms(st, stress, _consecutive(n, max_pairs), max_shift, max_strain)
    if len(terms) < MIN_PAIRS:
        more = _terms(st, stress, _by_volume(st, stress, max_pairs), max_shift, max_strain)
        if len(more) > len(terms):
            terms, out["paired"] = more, "volume"
    out["pairs"] = len(terms)
    if len(terms) < 3:
        return out
    work_f, work_s, d_energy, volume = (np.asarray(column) for column in zip(*terms))
    out["volume"] = float(np.median(volume))
    if not (np.std(work_s) > 0 and np.std(d_energy) > 0):
        return out
    with_forces = bool(np.any(work_f != 0.0))
    design = np.stack([work_f, work_s], axis=1) if with_forces else work_s[:, None]
    # scaled columns: a stress in kbar makes W_σ 1600 times W_F
    scale = np.sqrt((design ** 2).sum(0))
    coef, *_ = np.linalg.lstsq(design / scale, d_energy, rcond=None)
    fit = (design / scale) @ coef
    residual = d_energy - fit
    dof = len(d_energy) - design.shape[1]
    if dof < 1:
        return out
    gram = (design / scale).T @ (design / scale)
    try:
        variance = float(residual @ residual) / dof * np.linalg.inv(gram)[-1, -1]
    except np.linalg.LinAlgError:
        return out
    slope = float(coef[-1] / scale[-1])
    error = float(np.sqrt(max(variance, 0.0))) / float(scale[-1])
    out.update(slope=slope, force_slope=float(coef[0] / scale[0]) if with_forces else None,
               correlation=float(np.corrcoef(d_energy, fit)[0, 1]) if np.std(fit) > 0 else 0.0,
               t=abs(slope) / error if error > 0 else float("inf"))
    return out


def _looks_like(slope: float, volume: Optional[float], atoms: float) -> Optional[str]:
    """What a slope looks like: a known factor, within 10 %."""
    known = list(_KNOWN)
    if volume:
        known.append((-1.0 / volume, f"a virial -V σ (eV) given as the stress (the cells' volume is about {volume:.4g} "
                                     "Å³; data.stress_key naming it 'virial' reads it as one)"))
        known.append((1.0 / volume, f"the stress times the volume (eV) given as the stress (about {volume:.4g} Å³)"))
    if atoms > 1.5:
        known.append((1.0 / atoms, f"energies per atom beside a stress of the whole structure ({atoms:g} atoms)"))
    from torchmdx.data.force_consistency import matching_factor

    return matching_factor(slope, known)


def stress_energy_line(structures, source: str) -> Optional[str]:
    """One line when the stress labels of ``structures`` (read from ``source``) disagree with their energies by a
    factor or a sign (module docstring), else None."""
    fit = stress_slope(structures)
    slope, pairs = fit["slope"], fit["pairs"]
    if (slope is None or pairs < MIN_PAIRS or fit["correlation"] < MIN_CORRELATION or fit["t"] < MIN_T
            or LOW <= slope <= HIGH):
        return None
    counts = np.diff(np.asarray(structures.offsets))
    guess = _looks_like(slope, fit["volume"], float(np.median(counts)) if len(counts) else 0.0)
    hint = f" ({guess}?)" if guess else ""
    how = ("pairs of consecutive structures" if fit["paired"] == "consecutive" else
           "pairs of structures of the same atoms next in volume")
    return (f"{source}: the stress does not fit the energies: over {pairs} {how} whose cell changed a little, the "
            f"energy changes by {slope:.4g} times the work of the stress along the strain step (1 for ASE's stress "
            f"(1/V) dE/dstrain in eV/Å³, negative under compression; correlation {fit['correlation']:.3f}){hint}; "
            "check the sign and unit of the stress (data.stress_key, data.energy_unit, data.length_unit)")
