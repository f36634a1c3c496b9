"""Two atoms of one structure at the same position (a duplicated line, a bad conversion): found for any number of
atoms and structures, periodic images included (:func:`coincident_atoms`), and the one line the data readers, md
and label say about them (:func:`coincident_words`, :func:`atoms_coincidence`). Moved out of
:mod:`torchmdx.data.structures` (round 23)."""

from __future__ import annotations

from typing import Optional, Union

import numpy as np

#: atoms of one structure closer than this (Å, minimum image) are refused as one atom given twice
COINCIDENT_DISTANCE = 1e-5
#: coordinates beyond this (Å, 1 m) are refused: float64 holds them only to 2e-6 Å and coarser further out
FAR_COORDINATE = 1e10
#: a far atom with another atom of its structure closer than this (Å) is refused (:func:`far_atom`)
FAR_NEIGHBOUR = 1e6
#: primes that mix (structure, grid cell) into one 64-bit key (collisions are only candidates:
#: every candidate pair's distance is checked)
_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5], dtype=np.uint64)


def coincident_words(a: int, b: int, position, image: bool, structure: Union[int, str, None] = None) -> str:
    """"atoms a and b [of structure s] are at the same position [x, y, z] Å (a duplicated atom?)": the data
    readers' line, which md and label say too (without a structure number: they name the file and frame).
    ``structure`` a string names it in the reader's own terms ("conformation 1": "of conformation 1")."""
    which = "" if structure is None else f" of {structure}" if isinstance(structure, str) else \
        f" of structure {structure}"
    how = " (one is a periodic image of the other)" if image else ""
    return (f"atoms {a} and {b}{which} are at the same position {np.asarray(position).round(6).tolist()} Å{how} "
            "(a duplicated atom?)")


def far_atom(pos, offsets=None) -> Optional[int]:
    """The first atom (row of ``pos`` [A, 3]) with a finite coordinate beyond :data:`FAR_COORDINATE` and another
    atom of its structure near it (closer than :data:`FAR_NEIGHBOUR`, or than 8 steps of float64 at its
    coordinates: a molecule moved out, whose distances float64 no longer holds), or None. ``offsets``: the
    structures' first rows, as :func:`coincident_atoms` (None: one structure). An atom far from all the others
    (one atom at 1e14 Å beside a cluster at the origin) has no neighbour to lose: its energy is an isolated atom's."""
    pos = np.asarray(pos, dtype=np.float64).reshape(-1, 3)
    offsets = np.asarray(offsets if offsets is not None else [0, len(pos)], dtype=np.int64)
    with np.errstate(invalid="ignore"):
        far = (np.abs(pos) > FAR_COORDINATE).any(axis=1) & np.isfinite(pos).all(axis=1)
    for a in np.flatnonzero(far):  # in order: the first far atom with a neighbour is named
        s = int(np.searchsorted(offsets, a, side="right") - 1)
        start, end = int(offsets[s]), int(offsets[s + 1])
        others = np.delete(pos[start:end], a - start, axis=0)
        if not len(others):
            continue
        with np.errstate(invalid="ignore", over="ignore"):
            distances = np.linalg.norm(others - pos[a], axis=1)
        distances = distances[np.isfinite(distances)]
        nearest = distances.min() if len(distances) else np.inf
        if nearest < max(FAR_NEIGHBOUR, 8 * float(np.spacing(np.abs(pos[a]).max()))):
            return int(a)
    return None


def far_atom_line(pos) -> Optional[str]:
    """:func:`far_coordinate_words` for the :func:`far_atom` of one structure's positions ``pos`` [A, 3] (Å), or
    None: the check the Calculator, ``model(atoms)``, md and label make before anything runs."""
    pos = np.asarray(pos, dtype=np.float64).reshape(-1, 3)
    far = far_atom(pos)
    return None if far is None else far_coordinate_words(far, pos[far])


def far_coordinate_words(a: int, position, structure: Union[int, str, None] = None, dtype=np.float64) -> str:
    """"atom a [of structure s] is at [x, y, z] Å, beyond 1e+10 Å: ...": coordinates so large that the float type
    holds them only to a coarse spacing, so the distances between atoms come out wrong (1e15 Å: 0.125 Å apart, a
    wrong energy without a word) or zero (1e30 Å: "atoms 0 and 1 are on top of each other", round 34's leftover)."""
    which = "" if structure is None else f" of {structure}" if isinstance(structure, str) else \
        f" of structure {structure}"
    position = np.asarray(position, dtype=np.float64)
    spacing = float(np.spacing(np.asarray(np.abs(position).max(), dtype=dtype)))
    name = np.dtype(dtype).name
    return (f"atom {a}{which} is at [{', '.join(f'{x:.6g}' for x in position)}] Å, beyond {FAR_COORDINATE:g} Å from the "
            f"origin: {name} coordinates that large are {spacing:.3g} Å apart, so the distances between atoms come "
            "out wrong; give coordinates near the origin (move the structure there)")


def atoms_coincidence(atoms) -> Optional[str]:
    """:func:`coincident_words` for two atoms of one ``ase.Atoms`` closer than :data:`COINCIDENT_DISTANCE`
    (minimum image where periodic), or None; atoms with non-finite positions are not compared. Coordinates beyond
    :data:`FAR_COORDINATE` are :func:`far_coordinate_words` (round 35: at 1e30 Å the atoms "were at the same
    position", which they are in float64, but the coordinates are what is wrong)."""
    pos = np.asarray(atoms.positions, dtype=np.float64)
    if len(pos) < 2 or not np.isfinite(pos).all():
        return None
    far = far_atom_line(pos)
    if far is not None:
        return far
    found = coincident_atoms(pos, [0, len(pos)], np.asarray(atoms.cell.array)[None], np.asarray(atoms.pbc)[None])
    return None if found is None else coincident_words(found[0], found[1], pos[found[0]], found[2])


def coincident_atoms(pos, offsets, cell, pbc, tol: float = COINCIDENT_DISTANCE):
    """(a, b, image) for two atoms a < b of one structure (indices into the concatenated
    ``pos`` [A, 3]) closer than ``tol`` Å, minimum image for periodic structures (``image``: the
    pair is close only through the cell, not as given), or None. The pair of the lowest structure and atom is
    named when there are several.

    Sort-based, O(A log A) time and O(A) memory, for any number of atoms: periodic positions are
    wrapped into the cell, and atoms within ``tol`` of an upper face get an image on the other
    side (any two atoms within ``tol`` of each other, images included, are then within ``tol``
    among these points). Two points closer than ``tol`` share a cell of a cubic grid of spacing
    h = 2.5 ``tol`` or of one of the grids shifted by h/2 along some axes (8 grids: in each
    direction an interval shorter than h/2 holds no boundary of the plain or of the shifted
    grid), so the atoms are sorted by (structure, cell) for each grid and only atoms sharing a
    cell are compared."""
    pos = np.asarray(pos, dtype=np.float64)
    offsets = np.asarray(offsets, dtype=np.int64)
    owner = np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))
    points, origin = pos, np.arange(len(pos), dtype=np.int64)
    pbc = np.asarray(pbc, dtype=bool).reshape(-1, 3)
    cell = np.asarray(cell, dtype=np.float64).reshape(-1, 3, 3)
    volume = np.abs(np.linalg.det(cell)) if len(cell) else np.zeros(0)
    periodic = pbc.any(axis=1) & (volume > 1e-12)
    if periodic.any():
        points, origin, owner = _with_images(pos, owner, cell, pbc, periodic, volume, tol)
    h = 2.5 * tol
    for shift in np.array(np.meshgrid([0.0, 0.5], [0.0, 0.5], [0.0, 0.5], indexing="ij")).reshape(3, -1).T:
        keys = np.floor(np.clip(points / h + shift, -1e18, 1e18)).astype(np.int64).view(np.uint64)
        mixed = owner.view(np.uint64) * _MIX[0]
        for axis in range(3):
            mixed = (mixed ^ keys[:, axis]) * _MIX[axis + 1]
        order = np.argsort(mixed, kind="stable")
        sorted_keys = mixed[order]
        same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
        if same.size == 0:
            continue
        pairs = _run_pairs(order, sorted_keys, same)
        i, j = pairs[:, 0], pairs[:, 1]
        close = (origin[i] != origin[j]) & (owner[i] == owner[j]) \
            & (np.sum((points[i] - points[j]) ** 2, axis=1) < tol * tol)
        if close.any():
            a, b = np.minimum(origin[i], origin[j])[close], np.maximum(origin[i], origin[j])[close]
            k = int(np.lexsort((b, a))[0])
            a, b = int(a[k]), int(b[k])
            return a, b, bool(np.sum((pos[a] - pos[b]) ** 2) >= tol * tol)
    return None


def _run_pairs(order: np.ndarray, sorted_keys: np.ndarray, same: np.ndarray) -> np.ndarray:
    """[P, 2] point indices of every pair inside the runs of equal keys (``same``: positions k
    with sorted_keys[k] == sorted_keys[k + 1]). Runs are one or two points but for atoms given
    many times over; a run's pairs are capped at its first 2048 points."""
    starts = same[np.r_[True, same[1:] != same[:-1] + 1]]
    pairs = []
    for start in starts:
        stop = start + 1
        while stop < len(sorted_keys) and sorted_keys[stop] == sorted_keys[start] and stop - start < 2048:
            stop += 1
        members = order[start:stop]
        first, second = np.triu_indices(len(members), 1)
        pairs.append(np.stack([members[first], members[second]], axis=1))
    return np.concatenate(pairs)


def _with_images(pos, owner, cell, pbc, periodic, volume, tol):
    """Positions of periodic structures wrapped into their cell, plus an image (shifted by minus
    a cell vector) of every point within ``tol`` of an upper face of a periodic direction, faces
    of faces included: (points, origin atom, owner)."""
    inverse = np.zeros_like(cell)
    inverse[periodic] = np.linalg.inv(cell[periodic])
    on = periodic[owner]
    frac = _rows_times(pos[on], inverse, owner[on])
    wrap = pbc[owner[on]]
    frac = np.where(wrap, frac - np.floor(frac), frac)
    # perpendicular widths: volume / |b x c| etc.
    areas = np.linalg.norm(np.cross(cell[:, [1, 2, 0]], cell[:, [2, 0, 1]]), axis=-1)
    margin = np.zeros_like(areas)
    margin[periodic] = tol * areas[periodic] / volume[periodic, None]  # tol / width, in fractions of the cell
    atoms = np.flatnonzero(on)
    own = owner[on]
    shift = np.zeros_like(frac)
    for axis in range(3):
        near = wrap[:, axis] & (frac[:, axis] + shift[:, axis] > 1.0 - margin[own, axis])
        if near.any():
            extra = shift[near].copy()
            extra[:, axis] -= 1.0
            frac, wrap, own, atoms = (np.concatenate([frac, frac[near]]), np.concatenate([wrap, wrap[near]]),
                                      np.concatenate([own, own[near]]), np.concatenate([atoms, atoms[near]]))
            shift = np.concatenate([shift, extra])
    inside = _rows_times(frac + shift, cell, own)
    off = np.flatnonzero(~on)
    return np.concatenate([pos[off], inside]), np.concatenate([off, atoms]), np.concatenate([owner[off], own])


def _rows_times(rows: np.ndarray, matrices: np.ndarray, which: np.ndarray, block: int = 1 << 18) -> np.ndarray:
    """rows[a] @ matrices[which[a]] for every a, in blocks (the gathered 3 x 3 matrices of a block
    only: bounded memory for millions of atoms)."""
    out = np.empty_like(rows)
    for start in range(0, len(rows), block):
        stop = start + block
        out[start:stop] = np.einsum("ai,aij->aj", rows[start:stop], matrices[which[start:stop]])
    return out
