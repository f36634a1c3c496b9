"""ANI-1 and ANI-1x HDF5 files.

- ANI-1 (Smith et al., Sci. Data 4, 170193 (2017)): one HDF5 group per molecule (nested under
  ``gdb_s01`` ... ``gdb_s08``) with ``coordinates`` [n, N, 3] Å, ``species`` [N] element
  symbols as bytes, ``energies`` [n] Hartree (and ``smiles``). No forces.
- ANI-1x (Smith et al., Sci. Data 7, 134 (2020)): one group per chemical formula with
  ``atomic_numbers`` [N], ``coordinates`` [n, N, 3] Å, and per level of theory
  ``<method>.energy`` [n] Hartree and ``<method>.forces`` [n, N, 3] Hartree/Å
  (e.g. ``wb97x_dz.energy``). ``energy_key`` / ``forces_key`` choose the level of theory.
  Without ``energy_key`` the only ``*.energy`` dataset is used, or ``wb97x_dz.energy`` (ANI-1x's
  reference level) when there are several; ``forces_key`` defaults to ``<method>.forces`` of the
  same method when that exists.

In ANI-1x a NaN energy (or NaN forces) means *not computed at that level of theory* (e.g. most
conformations lack CCSD(T)); such conformations are dropped and their number is recorded in the
metadata (``dropped``), shown by ``torchmdx data info``. Any other non-finite value is an error.

Every structure's group label is its HDF5 group (molecule for ANI-1, formula for ANI-1x), so
grouped splits can hold out whole molecules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from torchmdx.data.md17 import unit_factors
from torchmdx.data.structures import StructureBuilder, Structures
from torchmdx.errors import DataError

ANI1X_DEFAULT_METHOD = "wb97x_dz"


def open_h5(path: Path):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from None


def molecule_groups(h5, required: str) -> list:
    """Every group (at any depth) holding a ``coordinates`` dataset and ``required``."""
    import h5py

    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Group) and "coordinates" in obj and required in obj:
            found.append(obj)

    h5.visititems(visit)
    return found


def describe_keys(h5) -> str:
    import h5py

    keys = set()

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            keys.add(name.rsplit("/", 1)[-1])

    h5.visititems(visit)
    return ", ".join(sorted(keys)[:20]) or "none"


def read_ani1(path, energy_key: Optional[str] = None, energy_unit: Optional[str] = None) -> Structures:
    """ANI-1 layout: groups with ``coordinates``, ``species`` and ``energies`` (Hartree)."""
    from ase.data import atomic_numbers
    from tqdm.auto import tqdm

    path = Path(path)
    key = energy_key or "energies"
    e, length, _ = unit_factors(path, energy_unit, None, "Hartree")
    builder = StructureBuilder(str(path), format="ani1", energy_key=key, units_in={"energy": energy_unit or "Hartree"})
    with open_h5(path) as h5:
        builder.metadata.update({k: str(v) for k, v in h5.attrs.items() if k == "theory"})
        groups = molecule_groups(h5, "species")
        if not groups:
            raise DataError(
                f"{path}: not in the ANI-1 layout: no group holds both 'coordinates' and 'species'; "
                f"datasets found: {describe_keys(h5)}"
            )
        for group in tqdm(groups, desc="reading ANI-1", unit=" molecules", disable=None):
            where = f"{path}:{group.name}"
            if key not in group:
                raise DataError(f"{where}: no '{key}' dataset; found: {', '.join(sorted(group.keys()))}")
            species = [s.decode() if isinstance(s, bytes) else str(s) for s in group["species"][()]]
            try:
                numbers = [atomic_numbers[s.strip().capitalize()] for s in species]
            except KeyError as exc:
                raise DataError(f"{where}: unknown element symbol {exc.args[0]!r} in 'species'") from None
            builder.add(numbers, group["coordinates"][()] * length, group[key][()] * e,
                        group=group.name.lstrip("/"), where=where)
    return builder.build()


def _choose_energy_key(path, group, energy_key):
    if energy_key is not None:
        return energy_key
    methods = sorted(k for k in group.keys() if k.endswith(".energy"))
    if len(methods) == 1:
        return methods[0]
    if f"{ANI1X_DEFAULT_METHOD}.energy" in methods:
        return f"{ANI1X_DEFAULT_METHOD}.energy"
    raise DataError(
        f"{path}: choose the level of theory with energy_key; "
        f"{'candidates' if methods else 'no *.energy datasets; found'}: "
        f"{', '.join(methods or sorted(group.keys()))}"
    )


def read_ani1x(path, energy_key: Optional[str] = None, forces_key: Optional[str] = None,
               energy_unit: Optional[str] = None) -> Structures:
    """ANI-1x layout: groups with ``atomic_numbers``, ``coordinates`` and ``<method>.energy`` /
    ``<method>.forces`` (Hartree, Hartree/Å)."""
    from tqdm.auto import tqdm

    path = Path(path)
    e, length, f = unit_factors(path, energy_unit, None, "Hartree")
    with open_h5(path) as h5:
        groups = molecule_groups(h5, "atomic_numbers")
        if not groups:
            raise DataError(
                f"{path}: not in the ANI-1x layout: no group holds both 'coordinates' and 'atomic_numbers'; "
                f"datasets found: {describe_keys(h5)}"
            )
        ekey = _choose_energy_key(path, groups[0], energy_key)
        fkey = forces_key
        if fkey is None:
            candidate = ekey[: -len(".energy")] + ".forces" if ekey.endswith(".energy") else None
            fkey = candidate if candidate and candidate in groups[0] else None
        builder = StructureBuilder(str(path), format="ani1x", energy_key=ekey, forces_key=fkey,
                                   units_in={"energy": energy_unit or "Hartree"})
        builder.metadata.update({k: str(v) for k, v in h5.attrs.items() if k == "theory"})
        dropped = 0
        for group in tqdm(groups, desc="reading ANI-1x", unit=" formulas", disable=None):
            where = f"{path}:{group.name}"
            for key in (ekey, fkey):
                if key is not None and key not in group:
                    raise DataError(f"{where}: no '{key}' dataset; found: {', '.join(sorted(group.keys()))}")
            energy = group[ekey][()]
            positions = group["coordinates"][()]
            forces = group[fkey][()] if fkey else None
            if energy.shape[0] != positions.shape[0]:
                raise DataError(f"{where}: {energy.shape[0]} energies for {positions.shape[0]} conformations")
            keep = ~np.isnan(energy)
            if forces is not None:
                if forces.shape != positions.shape:
                    raise DataError(f"{where}: '{fkey}' has shape {forces.shape} but coordinates {positions.shape}")
                keep &= ~np.isnan(forces).reshape(len(forces), -1).any(axis=1)
            dropped += int((~keep).sum())
            if not keep.any():
                continue
            builder.add(group["atomic_numbers"][()], positions[keep] * length, energy[keep] * e,
                        None if forces is None else forces[keep] * f, group=group.name.lstrip("/"), where=where)
        builder.metadata["dropped"] = dropped
        if dropped:
            builder.metadata["notes"] = f"{dropped} conformations without {ekey}{' / ' + fkey if fkey else ''} dropped"
    return builder.build()
