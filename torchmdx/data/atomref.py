"""Per-element reference energies and the energy statistics a model normalises with.

**Fit** (:func:`fit_atomic_references`). With n_{s,e} the number of atoms of element e in
training structure s and E_s its energy (eV), the references r_e (eV per atom) solve the least
squares problem

    min_r  Σ_s ( E_s − Σ_e n_{s,e} r_e )²

over the elements present in the training structures (``numpy.linalg.lstsq``: the minimum-norm
solution when the counts do not determine r, e.g. every structure of MD17 has the same
composition, so only Σ_e n_e r_e = mean(E) is fixed and r is spread over the elements in
proportion to their counts). Elements absent from the training split get r_e = 0: the model
must learn their whole energy, and a warning-free zero keeps predictions finite; the list of
such elements in the dataset is returned by :func:`elements_without_reference`.

**Table length.** Every reference table here has ``max_z`` entries, indexed by atomic number
(Z = 0 .. max_z − 1), the rows of the model's embedding and of its ``atomref`` buffer
(TorchMD-NET's ``max_z``), so a fitted table goes into the model unchanged.

**Statistics** (:func:`energy_statistics`) of the residual per-atom energy
ε_s = (E_s − Σ_e n_{s,e} r_e) / N_s on the training split: mean and standard deviation (eV/atom),
and the root mean square of the force components (eV/Å) — the usual shift and scale of an
atomwise output (MACE, NequIP).

**Bounded memory.** Both read the per-atom arrays in chunks of about :data:`CHUNK_ATOMS` atoms
(memory-mapped caches are never read whole). A training split that fits one chunk is fitted
exactly as above (one ``lstsq`` on the whole count matrix); a larger one in one pass by a
streamed QR factorisation: each chunk's rows [n_{s,e} | E_s] are stacked under the running
triangular factor R and factorised again, so R (elements + 1 square) is all that is kept, and
``lstsq(R_e, R_E)`` gives the same least-squares solution, the minimum-norm one when the counts
do not determine it (singular values are cut at the same relative level as ``lstsq`` of the
whole matrix).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from torchmdx.data.structures import (MAX_ATOMIC_NUMBER, Structures, atom_indices, check_max_z, element_label,
                                      structure_indices)
from torchmdx.errors import DataError


def _structures(data) -> Structures:
    if isinstance(data, Structures):
        return data
    if hasattr(data, "structures") and isinstance(data.structures, Structures):
        return data.structures
    if isinstance(data, dict) and {"z", "offsets", "energy"} <= set(data):
        return Structures(z=np.asarray(data["z"]), pos=np.zeros((len(data["z"]), 3)),
                          energy=np.asarray(data["energy"], dtype=np.float64),
                          offsets=np.asarray(data["offsets"], dtype=np.int64), forces=data.get("forces"))
    raise TypeError("expected an H5Dataset, a Structures or a dict with z, offsets and energy")


#: atoms per chunk when fitting references and statistics (float64 count rows and forces)
CHUNK_ATOMS = 1 << 21


def _blocks(st: Structures, indices, chunk_atoms: int, elements: list[int], max_z: int):
    """One sequential pass over the dataset in contiguous blocks of at most ``chunk_atoms`` atoms
    (blocks without a selected structure are skipped): yields ``(first, atoms, rows, counts,
    starts)``: the block's first structure, its atom slice, the positions in the block of the
    selected structures (``indices``, in ascending order), their element counts [rows,
    len(elements)] (column j = ``elements[j]``) and where each structure of the block starts in
    the atom slice. Contiguous reads of a memory-mapped cache, no gathers; a
    DataError names the first selected structure holding an atomic number >= ``max_z``."""
    idx = np.sort(np.asarray(indices, dtype=np.int64))
    offsets = np.asarray(st.offsets, dtype=np.int64)
    n = len(offsets) - 1
    lookup = np.full(max(MAX_ATOMIC_NUMBER, max(elements, default=0)) + 1, len(elements), dtype=np.int64)
    lookup[np.asarray(elements, dtype=np.int64)] = np.arange(len(elements))
    width = len(elements) + 1  # last column: elements not listed (none when the list is complete)
    first = 0
    while first < n and idx.size:
        lo = int(np.searchsorted(idx, first))
        if lo == idx.size:
            return
        first = max(first, int(idx[lo]))
        last = min(n, max(first + 1, int(np.searchsorted(offsets, offsets[first] + chunk_atoms, side="right")) - 1))
        hi = int(np.searchsorted(idx, last))
        rows = idx[lo:hi] - first
        a0, a1 = int(offsets[first]), int(offsets[last])
        per = np.diff(offsets[first:last + 1])
        z = np.asarray(st.z[a0:a1], dtype=np.int64)
        owner = np.repeat(np.arange(last - first, dtype=np.int64) * width, per)
        counts = np.bincount(owner + lookup[z], minlength=(last - first) * width).reshape(last - first, width)[rows]
        beyond = [j for j, e in enumerate(elements) if e >= max_z]
        if beyond and counts[:, beyond].any():
            row = int(np.flatnonzero(counts[:, beyond].any(axis=1))[0])
            s = first + int(rows[row])
            check_max_z(np.asarray(st.z[offsets[s]:offsets[s + 1]]), np.array([0, per[rows[row]]]), max_z,
                        st.source, first=s)
        yield first, slice(a0, a1), rows, counts[:, :-1].astype(np.float64), offsets[first:last] - a0
        first = last


def element_counts(structures: Structures, indices, max_z: int) -> np.ndarray:
    """[len(indices), max_z] number of atoms of each element (column = Z) in the selected
    structures; DataError for an atomic number >= max_z."""
    idx = np.asarray(indices, dtype=np.int64)
    st = structures
    counts = np.diff(st.offsets)[idx]
    z = np.asarray(st.z[atom_indices(st.offsets, idx)], dtype=np.int64)
    if z.size and z.max() >= max_z:
        _raise_beyond(st, idx, z, counts, max_z)
    rows = np.repeat(np.arange(len(idx), dtype=np.int64) * max_z, counts)
    return np.bincount(rows + z, minlength=len(idx) * max_z).reshape(len(idx), max_z).astype(np.float64)


def _raise_beyond(st: Structures, idx: np.ndarray, z: np.ndarray, counts: np.ndarray, max_z: int) -> None:
    """The DataError of :func:`check_max_z` for the first selected atom whose Z >= max_z."""
    first = int(np.flatnonzero(z >= max_z)[0])
    s = int(idx[np.searchsorted(np.cumsum(counts), first, side="right")])
    check_max_z(z[first:first + 1], np.array([0, 1]), max_z, st.source, first=s)


def _structure_indices(st: Structures, indices) -> np.ndarray:
    """``indices`` (all structures if None) as int64, each in 0 .. len(st) - 1: -1 picked the last
    structure silently, an index past the end was numpy's IndexError."""
    if indices is None:
        return np.arange(len(st))
    idx = structure_indices(indices, len(st), st.source)  # a boolean mask was cast to 0/1 (round 33)
    outside = (idx < 0) | (idx >= len(st))
    if outside.any():
        raise DataError(f"{st.source}: structure index {int(idx[outside][0])} is outside 0..{len(st) - 1} "
                        f"(the dataset's {len(st)} structures)")
    return idx


def _total_atoms(st: Structures, idx: np.ndarray) -> int:
    return int(np.diff(st.offsets)[idx].sum())


def fit_atomic_references(data, indices=None, max_z: int = 100, chunk_atoms: int = CHUNK_ATOMS) -> torch.Tensor:
    """Least-squares reference energy of each element, eV per atom, as a float64 tensor
    [max_z] (index = atomic number 0 .. max_z - 1; zero for elements absent from ``indices``).

    ``data``: an :class:`~torchmdx.data.H5Dataset`, a :class:`Structures`, or a dict with
    ``z``, ``offsets`` and ``energy`` (eV). ``indices``: the training structures (all if None).
    Above ``chunk_atoms`` atoms the fit streams (module docstring: bounded memory).
    """
    st = _structures(data)
    idx = _structure_indices(st, indices)
    if len(idx) == 0:
        raise DataError(f"{st.source}: cannot fit atomic reference energies on an empty training split")
    energy = np.asarray(st.energy)
    if _total_atoms(st, idx) <= chunk_atoms:
        counts = element_counts(st, idx, max_z)
        present = np.flatnonzero(counts.sum(axis=0) > 0)
        solution, *_ = np.linalg.lstsq(counts[:, present], energy[idx], rcond=None)
    else:
        columns = np.asarray(_dataset_elements(data, st), dtype=np.int64)
        r = np.zeros((0, columns.size + 1))
        totals = np.zeros(columns.size)
        for first, _, rows, counts, _ in _blocks(st, idx, chunk_atoms, columns.tolist(), max_z):
            totals += counts.sum(axis=0)
            block = np.concatenate([r, np.column_stack([counts, energy[first + rows]])])
            r = np.linalg.qr(block, mode="r")
        keep = np.flatnonzero(totals > 0)
        present = columns[keep]
        k = columns.size
        rcond = np.finfo(np.float64).eps * max(len(idx), keep.size)
        solution, *_ = np.linalg.lstsq(r[:k][:, keep], r[:k, k], rcond=rcond)
    refs = np.zeros(max_z)
    refs[present] = solution
    return torch.from_numpy(refs)


def _dataset_elements(data, st: Structures) -> list[int]:
    """Atomic numbers of the whole dataset (an H5Dataset knows them from its cache; else one
    chunked pass over z)."""
    elements = getattr(data, "elements", None) if not isinstance(data, (Structures, dict)) else None
    if elements is None:
        seen = np.zeros(MAX_ATOMIC_NUMBER + 1, dtype=np.int64)
        step = CHUNK_ATOMS * 4
        for start in range(0, len(st.z), step):
            seen += np.bincount(np.asarray(st.z[start:start + step], dtype=np.int64), minlength=seen.size)[:seen.size]
        elements = [int(z) for z in np.flatnonzero(seen)]
    return list(elements)


def elements_without_reference(data, indices, max_z: int = 100) -> list[int]:
    """Elements of the dataset that do not occur in the structures ``indices``."""
    st = _structures(data)
    elements = _dataset_elements(data, st)
    totals = np.zeros(len(elements))
    for _, _, _, counts, _ in _blocks(st, _structure_indices(st, indices), CHUNK_ATOMS, elements, max_z):
        totals += counts.sum(axis=0)
    return [e for e, total in zip(elements, totals) if total == 0]


def untrained_elements_line(elements, source) -> Optional[str]:
    """What it means that ``elements`` (atomic numbers, from :func:`elements_without_reference`) occur in no
    training structure of ``source``, in words; None where there are none. A split by group that put every
    structure of an element into the validation or test part (the polymer file's PVC, the only one with Cl)
    trained a model that never saw the element: its reference energy 0 and its embedding untrained, so the
    errors of those structures measure nothing the model learned, without a word (round 27)."""
    if not elements:
        return None
    names = ", ".join(element_label(z) for z in elements)
    element = "element" if len(elements) == 1 else "elements"
    return (f"{element} {names} of {source} occur{'s' if len(elements) == 1 else ''} in no training structure "
            "(only in structures of the validation or test split, or unused ones): the model cannot learn it (no "
            "reference energy, an untrained embedding), and the errors of those structures measure nothing it was "
            "trained on; put such structures into the training split (data.val_groups / data.test_groups, or "
            "another split seed)")


def untrained_elements(data, train_indices, max_z: int, source, missing=None) -> Optional[str]:
    """The line of :func:`untrained_elements_line` for the elements of ``data`` that occur in none of the structures
    ``train_indices`` (``source``: the file name it names), or None; ``missing``: those elements where they are
    known already (the data module's ``missing_reference_elements``, found while the references were fitted),
    else they are looked for. None for an empty training split (training refuses it; ``data info`` shows it)."""
    if len(train_indices) == 0:
        return None
    if missing is None:
        missing = elements_without_reference(data, train_indices, max_z)
    return untrained_elements_line(missing, source)


def given_references(data, table: dict, max_z: int = 100, source: str = "the dataset") -> torch.Tensor:
    """References given in the config (``data.atomref`` as a table {Z: eV per atom}, e.g. the
    energies of the isolated atoms in the dataset's level of theory) as a float64 tensor [max_z];
    :class:`DataError` naming the elements of the dataset that the table lacks (their atoms would
    otherwise get a reference of 0 eV, silently)."""
    st = _structures(data)
    missing = [z for z in _dataset_elements(data, st) if z not in table]
    if missing:
        names = ", ".join(element_label(z) for z in missing)
        raise DataError(f"{source}: data.atomref gives no reference energy for {names}, which the data contain; "
                        f"add them (eV per atom), or use atomref: fit")
    refs = torch.zeros(max_z, dtype=torch.float64)
    for z, value in table.items():
        refs[int(z)] = float(value)
    return refs


def published_atomic_references(data, max_z: int = 100, key: Optional[str] = None) -> torch.Tensor:
    """The dataset's own published references (e.g. QM9's ``atomrefs`` for U0) in eV per atom,
    as a float64 tensor [max_z] (index = atomic number); :class:`DataError` when the dataset has none."""
    st = _structures(data)
    refs = st.metadata.get("atomrefs") or {}
    key = key or st.metadata.get("energy_key")
    if key not in refs:
        have = ", ".join(sorted(refs)) or "none"
        raise DataError(
            f"{st.source}: no published atomic references for '{key or 'energy'}' (available: {have}); use atomref: fit"
        )
    table = np.asarray(refs[key], dtype=np.float64)
    out = np.zeros(max_z)
    n = min(len(table), max_z)
    out[:n] = table[:n]
    return torch.from_numpy(out)


def energy_statistics(data, indices=None, atomic_references=None, max_z: int = 100,
                      chunk_atoms: int = CHUNK_ATOMS) -> dict:
    """Mean and std (eV/atom) of the residual per-atom energy, and force RMS (eV/Å), on ``indices``.

    Also the plain energy mean/std (eV per structure) for summaries. Per-atom arrays are read in
    chunks of ``chunk_atoms`` atoms (the result is the same as in one piece up to rounding).
    """
    st = _structures(data)
    idx = _structure_indices(st, indices)
    if len(idx) == 0:
        raise DataError(f"{st.source}: cannot compute energy statistics of an empty split")
    natoms_all = np.diff(st.offsets)
    if _total_atoms(st, idx) > chunk_atoms:
        return _streamed_statistics(data, st, idx, atomic_references, chunk_atoms)
    energy = np.asarray(st.energy, dtype=np.float64)[idx]
    natoms = natoms_all[idx]
    if atomic_references is not None:
        refs = np.asarray(atomic_references, dtype=np.float64)
        residual = energy - element_counts(st, idx, len(refs)) @ refs
    else:
        residual = energy
    per_atom = residual / natoms
    out = {
        "n_structures": int(len(idx)),
        "energy_mean": float(energy.mean()),
        "energy_std": float(energy.std()),
        "energy_per_atom_mean": float(per_atom.mean()),
        "energy_per_atom_std": float(per_atom.std()),
        "force_rms": None,
        "force_max": None,
    }
    if st.forces is not None:
        forces = np.asarray(st.forces[atom_indices(st.offsets, idx)], dtype=np.float64)
        out["force_rms"] = float(np.sqrt(np.mean(forces ** 2)))
        out["force_max"] = float(np.linalg.norm(forces, axis=1).max())
    return out


def _streamed_statistics(data, st: Structures, idx: np.ndarray, atomic_references, chunk_atoms: int) -> dict:
    """:func:`energy_statistics` in one sequential pass of contiguous blocks (:func:`_blocks`)."""
    order = np.sort(idx)
    energy = np.asarray(st.energy, dtype=np.float64)[order]
    natoms = np.diff(st.offsets)[order]
    elements = _dataset_elements(data, st)
    refs = None if atomic_references is None else np.asarray(atomic_references, dtype=np.float64)
    max_z = len(refs) if refs is not None else MAX_ATOMIC_NUMBER + 1
    reference = np.zeros(len(order))
    if refs is not None:  # per column; an element beyond the table is refused by _blocks
        refs = np.array([refs[e] if e < len(refs) else 0.0 for e in elements])
    total, largest, done = 0.0, 0.0, 0
    for _, atoms, rows, counts, starts in _blocks(st, order, chunk_atoms, elements, max_z):
        if refs is not None:
            reference[done:done + len(rows)] = counts @ refs
        done += len(rows)
        if st.forces is not None:
            forces = np.asarray(st.forces[atoms], dtype=np.float64)
            squares = np.einsum("ij,ij->i", forces, forces)
            total += float(np.add.reduceat(squares, starts)[rows].sum())
            largest = max(largest, float(np.maximum.reduceat(squares, starts)[rows].max()))
    per_atom = (energy - reference) / natoms
    return {
        "n_structures": int(len(idx)),
        "energy_mean": float(energy.mean()),
        "energy_std": float(energy.std()),
        "energy_per_atom_mean": float(per_atom.mean()),
        "energy_per_atom_std": float(per_atom.std()),
        "force_rms": float(np.sqrt(total / (3 * natoms.sum()))) if st.forces is not None else None,
        "force_max": float(np.sqrt(largest)) if st.forces is not None else None,
    }
