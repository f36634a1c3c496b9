"""Labels far beyond physical: an energy of 1e30 eV or a force of 1e10 eV/Å (a unit or parsing
error, a diverged calculation written out) trains into NaN or garbage without a word. Checked
once per dataset before the references and statistics are fitted
(:meth:`torchmdx.data.datamodule.TorchmdxDataModule.setup`, so training, sweeps and evaluate);
``data.check_labels: false`` turns the check off. Each limit is far beyond what any physical
structure gives, so data that pass nothing-is-silent checks elsewhere are never refused here
(docs/bad_inputs.md, round 7, has the reasoning):

1. **Forces**: a component above :data:`MAX_FORCE` = 1e4 eV/Å. Two protons 0.04 Å apart repel
   with 14.4 eV·Å / (0.04 Å)² = 9000 eV/Å; DFT/xTB data of real structures stay below about
   100 eV/Å (crystal structures under hundreds of GPa, close-contact scans: a few hundred).
2. **Energy per structure**: |E| above :data:`ENERGY_BOUND_FACTOR` = 10 times the magnitude of
   the Thomas-Fermi total energies of its atoms, Σ_i 0.7687 Z_i^(7/3) Hartree. Thomas-Fermi
   overestimates the magnitude of an atom's all-electron energy (H: 0.77 against 0.5 Eh; U:
   29,400 against about 28,000 Eh, relativistic included), a structure's energy differs from
   the sum of its atoms' by chemical binding (a few eV per atom), and energies with a reference
   subtracted (formation, atomisation, pseudopotential totals) are smaller still: an energy above
   ten times that bound (hydrogen: 209 eV per atom) is not an energy of these atoms in eV.
3. **Energy per atom against the dataset**: with per-element reference energies fitted by least
   squares on the whole dataset, the residual per atom ε_s = (E_s − Σ_e n_{s,e} r_e) / N_s of a
   structure further than max(:data:`RESIDUAL_Z` · 1.4826 · MAD, :data:`RESIDUAL_FLOOR`) from
   the median residual, MAD the median absolute deviation (robust z-score above 1000, and at
   least 100 eV/atom from the median: chemistry moves the residual by a few eV/atom at most;
   isolated atoms next to molecules by their atomisation energy, < 10 eV/atom). The structure
   with the largest deviation is named.

4. **Stress**: the virial per atom |σ| V / N (eV/atom; V the cell volume, so a slab's vacuum does
   not matter) above :data:`MAX_VIRIAL_PER_ATOM` = 1000 eV/atom in any component. At 1 TPa a
   solid has V/N of about 3 Å³ (19 eV/atom), at 10 TPa under 100 eV/atom; a stress written in
   bar (LAMMPS), in Pa, or in kbar beyond about 50 kbar (VASP's OUTCAR) instead of eV/Å³ is above
   it. Structures without a cell volume are left to the training's cell checks.

Memory is bounded as in :mod:`torchmdx.data.atomref` (chunks of atoms; memory-mapped caches are
never read whole).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from torchmdx.data.structures import MAX_ATOMIC_NUMBER, Structures
from torchmdx.errors import DataError
from torchmdx.units import HARTREE_TO_EV

#: force components above this (eV/Å) are refused
MAX_FORCE = 1.0e4
#: |E| above this many times the Thomas-Fermi energies of a structure's atoms is refused
ENERGY_BOUND_FACTOR = 10.0
#: Thomas-Fermi total energy of a neutral atom: -THOMAS_FERMI * Z^(7/3) Hartree
THOMAS_FERMI = 0.7687
#: robust z-score of the per-atom residual above which a structure is refused ...
RESIDUAL_Z = 1000.0
#: ... when it is also this far (eV/atom) from the median residual
RESIDUAL_FLOOR = 100.0
#: |stress| x volume / atoms (eV/atom) above this is refused
MAX_VIRIAL_PER_ATOM = 1.0e3
#: atoms per chunk
CHUNK_ATOMS = 1 << 21


def max_atom_energy() -> float:
    """|E| (eV) no single atom reaches: the energy bound of check 2 for the heaviest element (1.4e7 eV),
    the bound of a per-atom energy given in a config (``train.shift``, ``train.scale``)."""
    return ENERGY_BOUND_FACTOR * THOMAS_FERMI * MAX_ATOMIC_NUMBER ** (7 / 3) * HARTREE_TO_EV


OVERRIDE = "set data.check_labels: false to train on them anyway"


def energy_bounds(structures: Structures, chunk_atoms: int = CHUNK_ATOMS) -> np.ndarray:
    """[S] the largest |E| (eV) accepted for each structure (item 2 of the module docstring)."""
    st = structures
    table = ENERGY_BOUND_FACTOR * THOMAS_FERMI * HARTREE_TO_EV * np.arange(MAX_ATOMIC_NUMBER + 1.0) ** (7.0 / 3.0)
    offsets = np.asarray(st.offsets, dtype=np.int64)
    out = np.zeros(len(offsets) - 1)
    for first, last in _structure_blocks(offsets, chunk_atoms):
        a0, a1 = int(offsets[first]), int(offsets[last])
        z = np.clip(np.asarray(st.z[a0:a1], dtype=np.int64), 0, MAX_ATOMIC_NUMBER)
        out[first:last] = np.add.reduceat(table[z], offsets[first:last] - a0)
    return out


def _structure_blocks(offsets: np.ndarray, chunk_atoms: int):
    """(first, last) structure ranges of at most ``chunk_atoms`` atoms (at least one structure)."""
    n, first = len(offsets) - 1, 0
    while first < n:
        last = min(n, max(first + 1, int(np.searchsorted(offsets, offsets[first] + chunk_atoms, side="right")) - 1))
        yield first, last
        first = last


#: keys of the datasets that passed in this process (a sweep sets up the same data several times)
_PASSED: set = set()


def check_labels(data, chunk_atoms: int = CHUNK_ATOMS, key=None, check_forces: bool = True) -> None:
    """One-line DataError naming the source file, the structure (and atom) of the first label far
    beyond physical (module docstring), else nothing. ``data``: an H5Dataset or a Structures;
    ``key`` (hashable: a cache's path and content fingerprint): checked once per process. ``check_forces``
    False: the forces were checked already, chunk by chunk (:func:`force_problem`; ``data info`` on a raw file,
    whose summary keeps no forces)."""
    if key is not None and key in _PASSED:
        return
    st = data if isinstance(data, Structures) else data.structures
    src = st.source
    offsets = np.asarray(st.offsets, dtype=np.int64)
    if check_forces and st.forces is not None:
        problem = force_problem(st, chunk_atoms)
        if problem is not None:
            raise DataError(problem)
    _check_stress(st, offsets)
    energy = np.asarray(st.energy, dtype=np.float64)
    bounds = energy_bounds(st, chunk_atoms)
    beyond = np.flatnonzero(np.abs(energy) > bounds)
    if beyond.size:
        s = int(beyond[0])
        raise DataError(f"{src}: structure {s}: energy {energy[s]:.6g} eV, beyond any energy of its "
                        f"{int(offsets[s + 1] - offsets[s])} atoms (|E| <= {bounds[s]:.3g} eV: ten times their "
                        f"Thomas-Fermi energy; wrong units, or a broken calculation?); fix or drop it, or {OVERRIDE}")
    _check_residuals(st, energy, offsets, chunk_atoms)
    if key is not None:
        _PASSED.add(key)


def force_problem(st: Structures, chunk_atoms: int = CHUNK_ATOMS, first: int = 0) -> Optional[str]:
    """The line for the first force component of ``st`` beyond :data:`MAX_FORCE` (item 1 of the module docstring),
    naming its structure as ``first`` + its index in ``st`` (a chunk of a streamed read); None when there is none."""
    if st.forces is None:
        return None
    offsets = np.asarray(st.offsets, dtype=np.int64)
    for start, last in _structure_blocks(offsets, chunk_atoms):
        a0, a1 = int(offsets[start]), int(offsets[last])
        forces = np.abs(np.asarray(st.forces[a0:a1], dtype=np.float64))
        if forces.size and forces.max() > MAX_FORCE:
            atom = a0 + int(np.argmax(forces.max(axis=1) > MAX_FORCE))
            s = int(np.searchsorted(offsets, atom, side="right") - 1)
            value = np.asarray(st.forces[atom], dtype=np.float64)
            return (f"{st.source}: structure {first + s} (atom {atom - offsets[s]}): force {value.tolist()} eV/Å, "
                    f"beyond the {MAX_FORCE:.0e} eV/Å of any physical structure (wrong units, or a broken "
                    f"calculation?); fix or drop it, or {OVERRIDE}")
    return None


def _check_stress(st: Structures, offsets: np.ndarray) -> None:
    """Item 4 of the module docstring."""
    stress = st.extras.get("stress") if isinstance(getattr(st, "extras", None), dict) else None
    if stress is None or st.cell is None:
        return
    counts = np.diff(offsets)
    for start in range(0, len(counts), 1 << 16):
        sigma = np.abs(np.asarray(stress[start:start + (1 << 16)], dtype=np.float64).reshape(-1, 9))
        volume = np.abs(np.linalg.det(np.nan_to_num(np.asarray(st.cell[start:start + len(sigma)], dtype=np.float64))))
        with np.errstate(invalid="ignore"):
            per_atom = np.nanmax(np.where(np.isfinite(sigma), sigma, 0.0), axis=1) * volume / np.maximum(
                counts[start:start + len(sigma)], 1)
        beyond = np.flatnonzero(per_atom > MAX_VIRIAL_PER_ATOM)
        if beyond.size:
            s = start + int(beyond[0])
            value = np.asarray(stress[s], dtype=np.float64).reshape(-1)
            raise DataError(
                f"{st.source}: structure {s}: stress {np.round(value, 6).tolist()} eV/Å³ times its cell volume "
                f"({volume[s - start]:.4g} Å³) is {per_atom[s - start]:.4g} eV per atom, beyond the "
                f"{MAX_VIRIAL_PER_ATOM:.0e} eV/atom of any physical structure (a stress in bar, kbar, GPa or Pa "
                f"rather than eV/Å³?); fix or drop it, or {OVERRIDE}")


def _check_residuals(st: Structures, energy: np.ndarray, offsets: np.ndarray, chunk_atoms: int) -> None:
    """Item 3 of the module docstring."""
    from torchmdx.data.atomref import fit_atomic_references

    if len(energy) < 3:
        return
    refs = fit_atomic_references(st, None, MAX_ATOMIC_NUMBER + 1, chunk_atoms=chunk_atoms).numpy()
    residual = np.empty(len(energy))
    for first, last in _structure_blocks(offsets, chunk_atoms):
        a0, a1 = int(offsets[first]), int(offsets[last])
        z = np.asarray(st.z[a0:a1], dtype=np.int64)
        reference = np.add.reduceat(refs[z], offsets[first:last] - a0)
        residual[first:last] = (energy[first:last] - reference) / np.diff(offsets[first:last + 1])
    median = float(np.median(residual))
    deviation = np.abs(residual - median)
    mad = float(np.median(deviation))
    limit = max(RESIDUAL_Z * 1.4826 * mad, RESIDUAL_FLOOR)
    s = int(np.argmax(deviation))
    if deviation[s] > limit:
        n = int(offsets[s + 1] - offsets[s])
        raise DataError(
            f"{st.source}: structure {s}: energy {energy[s]:.6g} eV ({n} atoms) is {deviation[s]:.4g} eV/atom from "
            f"the dataset's per-element fit (median residual {median:.3g} eV/atom, spread (MAD) {mad:.3g} eV/atom; "
            f"refused beyond {limit:.3g} eV/atom: wrong units, or a broken calculation?); fix or drop it, or {OVERRIDE}")


__all__ = ["MAX_FORCE", "MAX_VIRIAL_PER_ATOM", "ENERGY_BOUND_FACTOR", "RESIDUAL_Z", "RESIDUAL_FLOOR", "check_labels",
           "energy_bounds", "force_problem"]
