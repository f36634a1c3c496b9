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

from torchmdx.data.structures import MAX_ATOMIC_NUMBER, Structures, atom_indices, check_max_z
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


def index_chunks(offsets: np.ndarray, indices: np.ndarray, chunk_atoms: int = CHUNK_ATOMS):
    """``indices`` cut into consecutive pieces of at most ``chunk_atoms`` atoms (at least one
    structure each)."""
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size == 0:
        return
    cum = np.cumsum(np.diff(offsets)[idx])
    start = 0
    while start < idx.size:
        before = int(cum[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(cum, before + chunk_atoms, side="right")))
        yield idx[start:stop]
        start = stop


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
    idx = np.arange(len(st)) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(idx) == 0:
        raise DataError(f"{st.source}: cannot fit atomic reference energies on an empty training split")
    energy = np.asarray(st.energy)
    if _total_atoms(st, idx) <= chunk_atoms:
        counts = element_counts(st, idx, max_z)
        present = np.flatnonzero(counts.sum(axis=0) > 0)
        solution, *_ = np.linalg.lstsq(counts[:, present], energy[idx], rcond=None)
    else:
        columns = np.asarray([e for e in _dataset_elements(data, st) if e < max_z], dtype=np.int64)
        r = np.zeros((0, columns.size + 1))
        totals = np.zeros(columns.size)
        for chunk in index_chunks(st.offsets, idx, chunk_atoms):
            counts = element_counts(st, chunk, max_z)[:, columns]
            totals += counts.sum(axis=0)
            block = np.concatenate([r, np.column_stack([counts, energy[chunk]])])
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
    seen = np.zeros(max_z, dtype=np.int64)
    for chunk in index_chunks(st.offsets, np.asarray(indices, dtype=np.int64)):
        z = np.asarray(st.z[atom_indices(st.offsets, chunk)], dtype=np.int64)
        if z.size and z.max() >= max_z:
            _raise_beyond(st, chunk, z, np.diff(st.offsets)[chunk], max_z)
        seen += np.bincount(z, minlength=max_z)
    return sorted(set(_dataset_elements(data, st)) - set(np.flatnonzero(seen).tolist()))


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
    idx = np.arange(len(st)) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(idx) == 0:
        raise DataError(f"{st.source}: cannot compute energy statistics of an empty split")
    energy = np.asarray(st.energy, dtype=np.float64)[idx]
    natoms = np.diff(st.offsets)[idx]
    chunks = list(index_chunks(st.offsets, idx, chunk_atoms))
    if atomic_references is not None:
        refs = np.asarray(atomic_references, dtype=np.float64)
        reference = np.concatenate([element_counts(st, chunk, len(refs)) @ refs for chunk in chunks])
        residual = energy - reference
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
        if len(chunks) == 1:
            forces = np.asarray(st.forces[atom_indices(st.offsets, idx)], dtype=np.float64)
            out["force_rms"] = float(np.sqrt(np.mean(forces ** 2)))
            out["force_max"] = float(np.linalg.norm(forces, axis=1).max())
        else:
            total, largest = 0.0, 0.0
            for chunk in chunks:
                forces = np.asarray(st.forces[atom_indices(st.offsets, chunk)], dtype=np.float64)
                total += float(np.sum(forces ** 2))
                largest = max(largest, float(np.linalg.norm(forces, axis=1).max()))
            out["force_rms"] = float(np.sqrt(total / (3 * natoms.sum())))
            out["force_max"] = largest
    return out
