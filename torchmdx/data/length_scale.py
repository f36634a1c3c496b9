"""Positions in another length unit than the one they are read in (round 39).

MD17 coordinates in Å read with ``data.length_unit: Bohr`` (every distance 0.53 times what it is: C-H bonds of
0.58 Å), coordinates in Bohr read as Å (1.89 times: C-H 2.06 Å), or in nm read as Å (0.1 times) trained without a
word: the forces are converted with the same length unit, so they still fit the energies
(:mod:`torchmdx.data.force_consistency` sees nothing), and no label is out of bounds. The distances tell it. Each
atom's nearest neighbour is, in a molecule or a solid, a bonded atom, at about the sum of the two covalent radii
(ASE's table): the median over the atoms of (nearest distance) / (sum of covalent radii) is 0.94 to 1.01 on every
sample file (MD17 ethanol and aspirin, polymers, QM9, ANI-1x, the solvated and protein systems; 5th percentile
0.79, 95th 1.18). Compressed solids at 100 GPa come to about 0.8. A median below :data:`LOW` over all atoms is one
warning line. Far apart is not wrong in itself (noble gases, molecular crystals of vdW contacts: argon 1.75), so the
other direction looks at hydrogen only, whose nearest neighbour is its covalent partner in any molecule or hydride
(H2 1.19, LiH 1.28): a median above :data:`HIGH` over the hydrogen atoms is the line. At most :data:`MAX_STRUCTURES`
structures spread over the data and :data:`MAX_ATOMS` atoms are looked at: a molecule of up to :data:`WHOLE` atoms
pair by pair, anything else (periodic cells, large systems) within :data:`SEARCH` Å, where an atom with no
neighbour that near does not count (nor do one-atom structures).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

MAX_STRUCTURES = 200
MAX_ATOMS = 20000
#: Å: the neighbour search radius (Bohr read as Å puts an O-H bond at 1.8 Å, a C-C bond at 2.9 Å)
SEARCH = 6.0
#: molecules of up to this many atoms (not periodic) are looked at pair by pair, without the search radius
WHOLE = 300
#: medians of nearest distance / covalent sum taken as right
LOW, HIGH = 0.7, 1.5
#: atoms needed before a median says anything
MIN_ATOMS = 20

_KNOWN = ((0.529177, "positions in Å read as Bohr"), (1.889726, "positions in Bohr read as Å"),
          (0.1, "positions in nm read as Å"), (10.0, "positions in Å read as nm"))


def nearest_ratios(structures, max_structures: int = MAX_STRUCTURES, max_atoms: int = MAX_ATOMS):
    """(atomic numbers, nearest-neighbour distance / sum of covalent radii) of the atoms looked at (module
    docstring); atoms without a neighbour within :data:`SEARCH` Å are left out."""
    from ase import Atoms
    from ase.data import covalent_radii
    from ase.neighborlist import neighbor_list

    st = structures
    n = len(st)
    offsets = np.asarray(st.offsets)
    numbers, ratios = [], []
    used = 0
    for s in np.unique(np.linspace(0, n - 1, min(max_structures, n)).astype(np.int64)) if n else []:
        a0, a1 = int(offsets[s]), int(offsets[s + 1])
        if a1 - a0 < 2:
            continue
        z = np.asarray(st.z[a0:a1], dtype=np.int64)
        pos = np.asarray(st.pos[a0:a1], dtype=np.float64)
        cell = np.asarray(st.cell[s], dtype=np.float64)
        pbc = np.asarray(st.pbc[s], dtype=bool)
        if (not np.all(np.isfinite(pos)) or np.abs(pos).max() > 1e8 or np.any(z < 1) or np.any(z >= len(covalent_radii))
                or (pbc.any() and not abs(np.linalg.det(cell)) > 1e-6)):
            continue  # refused elsewhere (non-finite, far or unknown atoms, a flat cell): nothing to learn here
        radii = covalent_radii[z]
        if not pbc.any() and len(z) <= WHOLE:  # every pair: no search radius (Å read as nm puts bonds at 10 Å)
            d = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1) / (radii[:, None] + radii[None, :])
            np.fill_diagonal(d, np.inf)
            nearest = d.min(axis=1)
        else:
            try:
                i, j, d = neighbor_list("ijd", Atoms(numbers=z, positions=pos, cell=cell, pbc=pbc), SEARCH)
            except Exception:  # noqa: BLE001 - a cell ASE cannot use: the training's own checks name it
                continue
            nearest = np.full(len(z), np.inf)
            np.minimum.at(nearest, i, d / (radii[i] + radii[j]))
        found = np.isfinite(nearest)
        numbers.append(z[found])
        ratios.append(nearest[found])
        used += a1 - a0
        if used >= max_atoms:
            break
    if not ratios:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    return np.concatenate(numbers), np.concatenate(ratios)


def length_unit_line(structures, source: str, unit: Optional[str] = None) -> Optional[str]:
    """One line when the distances of ``structures`` (read from ``source``; ``unit``: the ``data.length_unit``
    given, None for the format's own) look like positions in another length unit (module docstring), else None."""
    z, ratio = nearest_ratios(structures)
    median, which = None, None
    if len(ratio) >= MIN_ATOMS and np.median(ratio) < LOW:
        median, which = float(np.median(ratio)), f"{len(ratio)} atoms"
    hydrogen = ratio[z == 1]
    if median is None and len(hydrogen) >= MIN_ATOMS and np.median(hydrogen) > HIGH:
        median, which = float(np.median(hydrogen)), f"{len(hydrogen)} hydrogen atoms"
    if median is None:
        return None
    guess = next((what for factor, what in _KNOWN if abs(median / factor - 1.0) < 0.15), None)
    hint = f" ({guess}?)" if guess else ""
    given = f"data.length_unit {unit}" if unit else "the format's own length unit"
    return (f"{source}: the atoms are {median:.3g} times as far from their nearest neighbours as bonds are (median "
            f"over {which} of nearest distance / sum of covalent radii, read in {given}; 0.9 to 1.0 in molecules and "
            f"solids){hint}: every distance is scaled, and the forces with them; check data.length_unit")
