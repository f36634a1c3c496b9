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

In ANI-1x a NaN energy (or all forces NaN) means *not computed at that level of theory* (e.g. most
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
from torchmdx.data.structures import CHUNK_ATOMS, StructureBuilder, Structures, concat_structures, numeric_values
from torchmdx.config import key_hint
from torchmdx.errors import DataError

ANI1X_DEFAULT_METHOD = "wb97x_dz"


def _attribute_text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.size == 1:
        return _attribute_text(value.reshape(-1)[0])
    return str(value)


def check_unit_attributes(node, where: str, datasets: dict, energy_unit: Optional[str]) -> None:
    """One DataError for a unit an HDF5 file states in its attributes (``energies.attrs['units'] = 'eV'``, a file's
    ``energy_unit = 'kcal/mol'``) that is not the unit its values are read in: energies in ``energy_unit`` (else the ANI
    layouts' Hartree), forces in that per Å, coordinates in Å. Such an attribute was ignored: energies stored in eV
    were read as Hartree (27 times too large), without a word. As for an extxyz frame's unit keys
    (:mod:`torchmdx.data.unit_keys`), a stated unit is checked, not honoured: ``data.energy_unit`` (--energy-unit)
    names the file's energy unit, and the attribute must then agree. ``node``: the file (its own attributes, named
    like ``energy_unit``) or a group; ``datasets``: dataset name -> quantity ('energy', 'forces', 'length') in it."""
    from torchmdx.data.unit_keys import _agrees, unit_key_quantity

    energy = energy_unit or "Hartree"
    read_in = {"energy": energy, "forces": f"{energy}/Å", "length": "Å"}
    checks = []
    if not datasets:  # the file's attributes: the key's own name says which quantity
        checks = [(name, value, unit_key_quantity(name)) for name, value in node.attrs.items()]
    else:
        for key, quantity in datasets.items():
            if key is None or key not in node:
                continue
            for name, value in node[key].attrs.items():
                if unit_key_quantity(name) is not None:
                    checks.append((f"{key}.attrs['{name}']", value, quantity))
    for name, value, quantity in checks:
        if quantity is None:
            continue
        text = _attribute_text(value).strip()
        if quantity == "any":
            agrees = _agrees("any", text, energy, "Å")
        else:
            agrees = _agrees(quantity, text, energy, "Å")
        if agrees:
            continue
        per_length = text.rpartition("/")[2]
        if quantity == "length" or (quantity == "forces" and not _agrees("length", per_length, energy, "Å")):
            what = "coordinates are read in Å" if quantity == "length" else f"forces are read in {read_in['forces']}"
            fix = f"the ANI layouts' {what} (they take no length unit): convert them"
        else:
            given = "as data.energy_unit (--energy-unit) says" if energy_unit else "the ANI layouts' unit"
            fix = (f"set data.energy_unit (--energy-unit) to the file's energy unit if {text} is what they are (the "
                   f"attribute is then checked against it), or convert them")
            fix = f"the {'forces' if quantity == 'forces' else 'energies'} are read in " \
                  f"{read_in[quantity if quantity != 'any' else 'energy']} ({given}); {fix}"
        raise DataError(f"{where}: {name} = {text!r} states a unit, and {fix}")


def open_h5(path: Path):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: {_h5_problem(path, exc)}") from None


def _h5_problem(path: Path, exc: Exception) -> str:
    """What is wrong with an HDF5 file h5py cannot open, in words."""
    import re

    text = str(exc)
    found = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", text)
    if found:
        have, want = int(found.group(1)), int(found.group(2))
        return (f"the file ends early: {have} of its {want} bytes are there (truncated, e.g. an interrupted copy "
                "or download); copy or download it again")
    if Path(path).is_dir():
        return "is a folder, not an HDF5 file"
    from torchmdx.io_utils import compression, decompress_command

    packed = compression(path)
    if packed is not None:  # was h5py's "file signature not found"
        return (f"is {packed[0]}-compressed, not an HDF5 file: HDF5 files are read uncompressed; decompress it first "
                f"({decompress_command(path, packed[1])})")
    # h5py's message may span lines (a read failure embeds "time = <ctime>\n, filename = ..."): one line
    return f"not a readable HDF5 file ({' '.join(text.split())})"


def read_rows(group, key: str, start: int, stop: Optional[int], where: str) -> np.ndarray:
    """Rows ``start:stop`` of dataset ``key`` of an HDF5 group; a one-line DataError naming the
    group and the rows when they cannot be read (a file that ends early, a damaged block)."""
    try:
        values = group[key][()] if stop is None else group[key][start:stop]
    except (OSError, RuntimeError, ValueError) as exc:
        rows = "" if stop is None else f" conformations {start}..{stop - 1}"
        raise DataError(f"{where}: cannot read '{key}'{rows}: the file ends early or is damaged "
                        f"({str(exc).splitlines()[0]})") from None
    # bool, complex, text, compound: read as wrong numbers (True as 1.0), or a numpy traceback later
    return numeric_values(values, f"'{key}'", where)


def _first_non_finite(values: np.ndarray, what: str, where: str, start: int, per_atom: bool) -> None:
    finite = np.isfinite(values)
    if finite.all():
        return
    rows = finite.reshape(len(values), -1).all(axis=1)
    k = int(np.flatnonzero(~rows)[0])
    bad = values[k][~finite[k]].ravel()[0]
    atom = ""
    if per_atom:
        atom = f" (atom {int(np.flatnonzero(~finite[k].reshape(finite.shape[1], -1).all(axis=1))[0])})"
    raise DataError(f"{where}: non-finite {what} ({bad}) in conformation {start + k}{atom}")


def _conformation_slices(n: int, natoms: int, chunk_atoms: int):
    step = max(1, chunk_atoms // max(natoms, 1))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def molecule_groups(h5, required: str) -> list:
    """Every group (at any depth) holding a ``coordinates`` dataset and ``required``. A group that holds one of the
    two but not the other, in a file whose other groups hold both (a group written in part), is a one-line
    DataError: its conformations were dropped without a word (round 38)."""
    import h5py

    found, partial = [], []

    def visit(name, obj):
        if isinstance(obj, h5py.Group):
            if "coordinates" in obj and required in obj:
                found.append(obj)
            elif "coordinates" in obj or required in obj:
                partial.append(obj)

    _visit(h5, visit)
    _refuse_external_links(h5)
    if found and partial:
        group = partial[0]
        have, missing = ("coordinates", required) if "coordinates" in group else (required, "coordinates")
        raise DataError(f"{h5.filename}:{group.name}: holds '{have}' but no '{missing}' dataset, while "
                        f"{len(found)} other group(s) hold both (a group written in part?): the group would be left out "
                        f"without a word; give it its '{missing}', or remove it")
    return found


def _refuse_external_links(h5) -> None:
    """A file assembled from parts through external links (``f["H2O"] = h5py.ExternalLink("part2.h5",
    "/H2O")``): the linked groups were dropped without a word (the walk over the groups follows hard links
    only), and a cache of the file would not see the parts change. One line naming the first such link."""
    import h5py

    if not hasattr(h5, "visititems_links"):  # h5py < 3.11
        return
    found = []

    def visit(name, link):
        if isinstance(link, h5py.ExternalLink):
            found.append((name, link))
            return True  # stop at the first
        return None

    try:
        h5.visititems_links(visit)
    except (RuntimeError, OSError, KeyError, ValueError):
        return  # a damaged link table: _visit has said so already
    if found:
        name, link = found[0]
        raise DataError(f"{h5.filename}: '{name}' is an external link to {link.filename}:{link.path}, which is not read "
                        "(only the groups inside this file are, and its cache would not see the linked file change); "
                        "copy the linked groups into one file (e.g. h5copy), or read the linked file on its own")


def _visit(h5, visit) -> None:
    """``h5.visititems(visit)``; a damaged object header or link table (bytes overwritten inside
    the file) is a one-line DataError naming the file, not h5py's RuntimeError."""
    try:
        h5.visititems(visit)
    except (RuntimeError, OSError, KeyError, ValueError) as exc:
        raise DataError(f"{h5.filename}: the HDF5 file is damaged: its list of groups and datasets cannot be read "
                        f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); copy or download it "
                        "again") from None


def describe_keys(h5) -> str:
    import h5py

    keys = set()

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            keys.add(name.rsplit("/", 1)[-1])

    _visit(h5, visit)
    return ", ".join(sorted(keys)[:20]) or "none"


def read_ani1(path, energy_key: Optional[str] = None, energy_unit: Optional[str] = None) -> Structures:
    """ANI-1 layout: groups with ``coordinates``, ``species`` and ``energies`` (Hartree)."""
    return concat_structures(iter_ani1(path, energy_key, energy_unit), str(path))


def iter_ani1(path, energy_key: Optional[str] = None, energy_unit: Optional[str] = None,
              chunk_atoms: int = CHUNK_ATOMS):
    """:func:`read_ani1` as validated chunks of about ``chunk_atoms`` atoms (a streamed read:
    memory does not grow with the file)."""
    from ase.data import atomic_numbers
    from tqdm.auto import tqdm

    path = Path(path)
    key = energy_key or "energies"
    e, length, _ = unit_factors(path, energy_unit, None, "Hartree")
    builder = StructureBuilder(str(path), format="ani1", energy_key=key, units_in={"energy": energy_unit or "Hartree"})
    with open_h5(path) as h5:
        builder.metadata.update({k: str(v) for k, v in h5.attrs.items() if k == "theory"})
        check_unit_attributes(h5, str(path), {}, energy_unit)
        groups = molecule_groups(h5, "species")
        if not groups:
            raise DataError(
                f"{path}: not in the ANI-1 layout: no group holds both 'coordinates' and 'species'; "
                f"datasets found: {describe_keys(h5)}"
            )
        for group in tqdm(groups, desc="reading ANI-1", unit=" molecules", disable=None):
            where = f"{path}:{group.name}"
            if key not in group:
                raise DataError(f"{where}: no '{key}' dataset{key_hint(key, group.keys())}; found: "
                                f"{', '.join(sorted(group.keys()))}")
            raw = group["species"][()]
            _check_one_per_atom(raw, "species", where)
            species = [s.decode() if isinstance(s, bytes) else str(s) for s in raw]
            if np.asarray(raw).dtype.kind in "iuf":  # "unknown element symbol '8'": numbers, not symbols
                raise DataError(f"{where}: 'species' holds numbers ({', '.join(species[:4])}"
                                f"{', ...' if len(species) > 4 else ''}), not element symbols: the ANI-1 layout names "
                                "the elements (b'O', b'H'); a file of atomic numbers is the ANI-1x layout (format "
                                "ani1x, its 'atomic_numbers' dataset)")
            try:
                numbers = [atomic_numbers[s.strip().capitalize()] for s in species]
            except KeyError as exc:
                raise DataError(f"{where}: unknown element symbol {exc.args[0]!r} in 'species'") from None
            n = _check_group_shapes(group, where, len(numbers), key, None)
            check_unit_attributes(group, where, {key: "energy", "coordinates": "length"}, energy_unit)
            for a, b in _conformation_slices(n, len(numbers), chunk_atoms):
                positions = read_rows(group, "coordinates", a, b, where)
                energy = read_rows(group, key, a, b, where)
                _first_non_finite(positions, "coordinates", where, a, per_atom=True)
                _first_non_finite(energy, "energy", where, a, per_atom=False)
                builder.add(numbers, positions * length, energy * e, group=group.name.lstrip("/"), where=where,
                            conformations=np.arange(a, b))
                if builder.pending_atoms >= chunk_atoms:
                    yield builder.take_chunk()
    chunk = builder.take_chunk()
    if chunk is not None:
        yield chunk


def _check_one_per_atom(values, key: str, where: str) -> None:
    """The atoms' dataset (``species``, ``atomic_numbers``) is one value per atom: a (1, N) array was
    "'coordinates' has shape (n, N, 3) but there are 1 atomic numbers; expected (n, 1, 3)"."""
    shape = np.shape(values)
    if len(shape) != 1:
        raise DataError(f"{where}: '{key}' has shape {shape}; expected (atoms,), one entry per atom")


def _check_group_shapes(group, where: str, natoms: int, ekey: str, fkey: Optional[str]) -> int:
    """Number of conformations of an ANI group, after checking the datasets' shapes agree
    (without reading them); a one-line DataError naming the group otherwise."""
    shape = group["coordinates"].shape
    if natoms == 0:  # ANI-1x: forces of shape (n, 0, 3) are all NaN vacuously: "dropped, without forces"
        raise DataError(f"{where}: no atoms (the atomic numbers / species dataset is empty); "
                        "a molecule needs at least one")
    if len(shape) != 3 or shape[1:] != (natoms, 3):
        raise DataError(f"{where}: 'coordinates' has shape {shape} but there are {natoms} atomic numbers; "
                        f"expected (n, {natoms}, 3)")
    n = shape[0]
    e_shape = group[ekey].shape
    if len(e_shape) != 1 or e_shape[0] != n:
        ends = f"; it ends early, at conformation {e_shape[0]}" if len(e_shape) == 1 and e_shape[0] < n else ""
        ends = ends or f"; expected ({n},), one energy per conformation"  # (n, 1) said nothing of what fits
        raise DataError(f"{where}: '{ekey}' has shape {e_shape} for {n} conformations (coordinates){ends}")
    if fkey is not None:
        f_shape = group[fkey].shape
        if f_shape != shape:
            ends = f"; it ends early, at conformation {f_shape[0]}" if len(f_shape) == 3 and f_shape[0] < n \
                and f_shape[1:] == shape[1:] else ""
            raise DataError(f"{where}: '{fkey}' has shape {f_shape} but coordinates {shape}{ends}")
    return n


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
    return concat_structures(iter_ani1x(path, energy_key, forces_key, energy_unit), str(path))


def iter_ani1x(path, energy_key: Optional[str] = None, forces_key: Optional[str] = None,
               energy_unit: Optional[str] = None, chunk_atoms: int = CHUNK_ATOMS):
    """:func:`read_ani1x` as validated chunks of about ``chunk_atoms`` atoms (a streamed read:
    each group is read in slices of conformations, so memory does not grow with the file)."""
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
        check_unit_attributes(h5, str(path), {}, energy_unit)
        builder.metadata["dropped"] = 0
        dropped = 0
        for group in tqdm(groups, desc="reading ANI-1x", unit=" formulas", disable=None):
            where = f"{path}:{group.name}"
            for key in (ekey, fkey):
                if key is not None and key not in group:
                    raise DataError(f"{where}: no '{key}' dataset{key_hint(key, group.keys())}; found: "
                                    f"{', '.join(sorted(group.keys()))}")
            numbers = read_rows(group, "atomic_numbers", 0, None, where)
            _check_one_per_atom(numbers, "atomic_numbers", where)
            n = _check_group_shapes(group, where, len(numbers), ekey, fkey)
            check_unit_attributes(group, where, {ekey: "energy", fkey: "forces", "coordinates": "length"}, energy_unit)
            for a, b in _conformation_slices(n, len(numbers), chunk_atoms):
                energy = read_rows(group, ekey, a, b, where)
                positions = read_rows(group, "coordinates", a, b, where)
                forces = read_rows(group, fkey, a, b, where) if fkey else None
                keep = ~np.isnan(energy)
                if forces is not None:
                    # not computed: every force NaN; a NaN among computed forces is a damaged value, not a
                    # missing level (it was dropped and counted as "without forces")
                    nan_forces = np.isnan(forces).reshape(len(forces), -1)
                    keep &= ~nan_forces.all(axis=1)
                    partial = np.flatnonzero(keep & nan_forces.any(axis=1))
                    if len(partial):
                        row = int(partial[0])
                        try:
                            _first_non_finite(forces[row:row + 1], fkey, where, a + row, per_atom=True)
                        except DataError as exc:
                            raise DataError(f"{exc}, among finite forces (only all-NaN forces mean 'not computed')") \
                                from None
                dropped += int((~keep).sum())
                _first_non_finite(positions, "coordinates", where, a, per_atom=True)
                if not keep.any():
                    continue
                if not keep.all():
                    positions, energy = positions[keep], energy[keep]
                    forces = None if forces is None else forces[keep]
                    kept = np.flatnonzero(keep) + a
                else:
                    kept = None
                for values, what, per_atom in ((energy, "energy", False), (forces, "forces", True)):
                    if values is not None and not np.isfinite(values).all():
                        row = int(np.flatnonzero(~np.isfinite(values).reshape(len(values), -1).all(axis=1))[0])
                        first = int(kept[row]) if kept is not None else a + row
                        _first_non_finite(values[row:row + 1], what, where, first, per_atom)
                builder.add(numbers, positions * length, energy * e, None if forces is None else forces * f,
                            group=group.name.lstrip("/"), where=where,
                            conformations=np.arange(a, b) if kept is None else kept)
                if builder.pending_atoms >= chunk_atoms:
                    yield builder.take_chunk()
        builder.metadata["dropped"] = dropped
        if dropped:
            builder.metadata["notes"] = f"{dropped} conformations without {ekey}{' / ' + fkey if fkey else ''} dropped"
    chunk = builder.take_chunk()
    if chunk is not None:
        yield chunk
