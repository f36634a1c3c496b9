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
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from torchmdx.data.structures import Structures, atom_indices, check_max_z
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


def element_counts(structures: Structures, indices, max_z: int) -> np.ndarray:
    """[len(indices), max_z] number of atoms of each element (column = Z) in the selected
    structures; DataError for an atomic number >= max_z."""
    idx = np.asarray(indices, dtype=np.int64)
    st = structures
    counts = np.diff(st.offsets)[idx]
    z = np.asarray(st.z[atom_indices(st.offsets, idx)], dtype=np.int64)
    if z.size and z.max() >= max_z:
        check_max_z(np.asarray(st.z), st.offsets, max_z, st.source)
    rows = np.repeat(np.arange(len(idx)), counts)
    out = np.zeros((len(idx), max_z))
    np.add.at(out, (rows, z), 1.0)
    return out


def fit_atomic_references(data, indices=None, max_z: int = 100) -> torch.Tensor:
    """Least-squares reference energy of each element, eV per atom, as a float64 tensor
    [max_z] (index = atomic number 0 .. max_z - 1; zero for elements absent from ``indices``).

    ``data``: an :class:`~torchmdx.data.H5Dataset`, a :class:`Structures`, or a dict with
    ``z``, ``offsets`` and ``energy`` (eV). ``indices``: the training structures (all if None).
    """
    st = _structures(data)
    idx = np.arange(len(st)) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(idx) == 0:
        raise DataError(f"{st.source}: cannot fit atomic reference energies on an empty training split")
    counts = element_counts(st, idx, max_z)
    present = np.flatnonzero(counts.sum(axis=0) > 0)
    solution, *_ = np.linalg.lstsq(counts[:, present], np.asarray(st.energy)[idx], rcond=None)
    refs = np.zeros(max_z)
    refs[present] = solution
    return torch.from_numpy(refs)


def elements_without_reference(data, indices, max_z: int = 100) -> list[int]:
    """Elements of the dataset that do not occur in the structures ``indices``."""
    st = _structures(data)
    in_split = set(np.flatnonzero(element_counts(st, indices, max_z).sum(axis=0)).tolist())
    return sorted(set(int(v) for v in np.unique(st.z)) - in_split)


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


def energy_statistics(data, indices=None, atomic_references=None, max_z: int = 100) -> dict:
    """Mean and std (eV/atom) of the residual per-atom energy, and force RMS (eV/Å), on ``indices``.

    Also the plain energy mean/std (eV per structure) for summaries.
    """
    st = _structures(data)
    idx = np.arange(len(st)) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(idx) == 0:
        raise DataError(f"{st.source}: cannot compute energy statistics of an empty split")
    energy = np.asarray(st.energy, dtype=np.float64)[idx]
    natoms = np.diff(st.offsets)[idx]
    if atomic_references is not None:
        refs = np.asarray(atomic_references, dtype=np.float64)
        counts = element_counts(st, idx, len(refs))
        residual = energy - counts @ refs
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
