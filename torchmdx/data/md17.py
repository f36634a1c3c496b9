"""MD17 family readers: sGDML npz, revised-MD17 npz, and MD17's plain xyz.

Units (the published files' own): positions Å, energies kcal/mol, forces kcal/mol/Å. They are
converted to eV and eV/Å with ``torchmdx.units.KCAL_PER_MOL_TO_EV`` (``energy_unit`` /
``length_unit`` override this for npz files in the same layout but other units; an sGDML npz's
own ``e_unit`` / ``r_unit`` keys are read too).

- ``md17``: sGDML layout ``R`` [n, N, 3], ``z`` [N], ``E`` [n] or [n, 1], ``F`` [n, N, 3].
- ``rmd17``: ``nuclear_charges`` [N], ``coords`` [n, N, 3], ``energies`` [n], ``forces``
  [n, N, 3] (``old_*`` arrays, the original MD17 values, are ignored).
- ``md17-xyz``: the plain xyz of the original MD17 distribution: per frame a line with N, a line
  holding only the energy, then N lines ``symbol x y z fx fy fz``.

A molecule name instead of a path (``path: ethanol``) is looked up by :func:`resolve_md17_name`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from torchmdx import units
from torchmdx.data.structures import StructureBuilder, Structures, numeric_values
from torchmdx.errors import DataError, with_article

#: keys an npz must have to be read (and guessed) as MD17 / revised MD17
MD17_KEYS = ("R", "z", "E")
RMD17_KEYS = ("nuclear_charges", "coords", "energies")


def unit_factors(path, energy_unit, length_unit, default_energy):
    """(energy factor to eV, length factor to Å, force factor to eV/Å)."""
    try:
        e = units.energy_factor(energy_unit or default_energy)
        length = units.length_factor(length_unit or "Å")
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    return e, length, e / length


def load_npz(path: Path) -> dict:
    import zipfile
    import zlib

    if Path(path).stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if Path(path).is_file():
        with open(path, "rb") as handle:
            head = handle.read(8)
        if not head.startswith(b"PK"):  # not a zip: numpy would try to unpickle it and advise allow_pickle
            kind = _file_kind(head)
            raise DataError(f"{path}: not an npz file (npz files are zip archives; this one{kind}); "
                            "check the file or pass the right --format")
        from torchmdx.io_utils import is_torch_file

        if is_torch_file(path):  # a model.pt as --data: "npz without the MD17 keys ... found: archive/data.pkl, ..."
            raise DataError(f"{path}: a torch file (a model, checkpoint or MD restart file), not a data file; give "
                            "the data (npz, extxyz, xyz, h5, db, QM9 folder) or a config with a data: section")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise DataError(f"{path}: not a readable npz file: truncated or damaged ({exc})") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable npz file ({exc})") from None


def _file_kind(head: bytes) -> str:
    """What a file's first bytes say it is, as the tail of a sentence."""
    from torchmdx.io_utils import COMPRESSIONS

    for magic, (name, command) in COMPRESSIONS.items():
        if head.startswith(magic):
            return f" is {name}-compressed: decompress it first ({command} FILE)"
    kinds = {b"\x89HDF": "is an HDF5 file", b"SQLite f": "is an SQLite (ASE) database",
             b"\x93NUMPY": "is a single .npy array", b"\x80": "is a pickle (e.g. torch.save)"}
    for magic, kind in kinds.items():
        if head.startswith(magic):
            return " " + kind
    return " starts with " + repr(head[:8])


def require_keys(path, found, expected, layout):
    missing = [k for k in expected if k not in found]
    if missing:
        raise DataError(
            f"{path}: not in the {layout} layout: missing key(s) {', '.join(missing)}; "
            f"found: {', '.join(sorted(found)[:12]) + (f', ... ({len(found)} in all)' if len(found) > 12 else '') or 'none'}"
        )


def _theory(arrays) -> dict:
    meta = {}
    for key in ("theory", "name"):
        if key in arrays and arrays[key].ndim == 0:
            meta[key] = str(arrays[key])
    return meta


#: the unit keys of sGDML's npz layout, with the option that overrides each and its unit table
_UNIT_KEYS = (("e_unit", "energy_unit", "energy", units.energy_factor),
              ("r_unit", "length_unit", "length", units.length_factor))


def _file_units(path, arrays, energy_unit, length_unit):
    """(energy unit, length unit) for an npz that may name its own (sGDML's ``e_unit`` / ``r_unit``,
    e.g. 'eV', 'Ang'): they were ignored, so an npz in eV was read as kcal/mol (23 x too small).
    A file's unit is used when no option is given; an option naming another unit is refused (one
    line), and so is a unit torchmdx does not know unless an option says what it is."""
    given = {"energy_unit": energy_unit, "length_unit": length_unit}
    for key, option, quantity, factor in _UNIT_KEYS:
        if key not in arrays:
            continue
        value = arrays[key]
        if value.ndim != 0 or value.dtype.kind not in "US":
            raise DataError(f"{path}: {key} must be one unit name (text), got {value.dtype} of shape {value.shape}")
        name = value.item()
        name = (name.decode("utf-8", "replace") if isinstance(name, bytes) else name).strip()
        try:
            file_factor = factor(name)
        except DataError:
            if given[option] is not None:
                continue  # the option says what the file's label means
            raise DataError(f"{path}: {key} {name!r} is not {with_article(quantity)} unit torchmdx knows; set data.{option} "
                            f"(--{option.replace('_', '-')}) to the unit of the file's values") from None
        if given[option] is None:
            given[option] = name
        elif not math.isclose(factor(given[option]), file_factor, rel_tol=1e-9):
            raise DataError(f"{path}: the file says its {quantity} unit is {name!r} ({key}), but "
                            f"{option} {given[option]!r} was given; drop data.{option} (or fix the file)")
    _check_other_unit_keys(path, arrays, given["energy_unit"] or "kcal/mol", given["length_unit"] or "Å")
    return given["energy_unit"], given["length_unit"]


def _check_other_unit_keys(path, arrays, energy: str, length: str) -> None:
    """One DataError for a unit-like key other than sGDML's ``e_unit`` / ``r_unit`` (``energy_unit``, ``E_unit``,
    ``F_unit``, ``units``: names as :func:`torchmdx.data.unit_keys.unit_key_quantity` reads them) that names
    another unit than the values are read in (``energy`` / ``length``). Such keys were ignored: an npz with
    ``energy_unit='eV'`` was read in kcal/mol (23 times too small), without a word. As for an extxyz frame's unit
    keys and ANI HDF5 attributes: checked, not honoured."""
    from torchmdx.data.unit_keys import _agrees, unit_key_quantity

    read_known = {key for key, _, _, _ in _UNIT_KEYS}
    for key in arrays:
        quantity = unit_key_quantity(key)
        if key in read_known or quantity is None:
            continue
        value = arrays[key]
        if value.ndim != 0 or value.dtype.kind not in "US":
            raise DataError(f"{path}: {key} looks like a unit name, and must be one unit name (text), got "
                            f"{value.dtype} of shape {value.shape}")
        text = value.item()
        text = (text.decode("utf-8", "replace") if isinstance(text, bytes) else text).strip()
        if _agrees(quantity, text, energy, length):
            continue
        read_in = {"energy": f"the energies are read in {energy}", "length": f"the positions are read in {length}",
                   "forces": f"the forces are read in {energy}/{length}",
                   "stress": f"a stress is read in {energy}/{length}³",
                   "any": f"the values are read in {energy} and {length}"}[quantity]
        options = {"energy": "data.energy_unit (--energy-unit) to the file's energy unit",
                   "length": "data.length_unit (--length-unit) to the file's length unit"}
        option = options.get(quantity, "data.energy_unit (--energy-unit) and data.length_unit (--length-unit) to "
                                       "the file's units")
        raise DataError(f"{path}: {key} = {text!r} states a unit, and {read_in} (only sGDML's e_unit and r_unit are "
                        f"read); set {option} if {text} is what they are (the key is then checked against it), or "
                        "convert the values")


#: per npz layout: the keys of atomic numbers, positions, energies, forces; the layout's name in errors
_NPZ_LAYOUTS = {
    "md17": (("z", "R", "E", "F"), "sGDML/MD17 npz (R, z, E, F)"),
    "rmd17": (("nuclear_charges", "coords", "energies", "forces"),
              "revised-MD17 npz (nuclear_charges, coords, energies, forces)"),
}


def _read_npz_frames(path, fmt: str, energy_unit, length_unit) -> Structures:
    """One molecule's frames from an npz of layout ``fmt`` (``_NPZ_LAYOUTS``): atomic numbers
    [N], positions [n, N, 3], energies [n] or [n, 1], optional forces [n, N, 3]; kcal/mol and Å
    unless ``energy_unit`` / ``length_unit`` say otherwise; shapes checked with one-line errors
    that use the file's own key names."""
    path = Path(path)
    (z_key, r_key, e_key, f_key), layout = _NPZ_LAYOUTS[fmt]
    arrays = load_npz(path)
    require_keys(path, arrays, MD17_KEYS if fmt == "md17" else RMD17_KEYS, layout)
    energy_unit, length_unit = _file_units(path, arrays, energy_unit, length_unit)
    e, length, f = unit_factors(path, energy_unit, length_unit, "kcal/mol")
    z, R, E, F = arrays[z_key], arrays[r_key], arrays[e_key], arrays.get(f_key)
    for key in (r_key, e_key) + ((f_key,) if F is not None else ()):  # before the unit factors turn True into 1.0
        numeric_values(arrays[key], key, str(path))
    if R.ndim != 3 or R.shape[2] != 3:
        raise DataError(f"{path}: {r_key} has shape {R.shape}, expected (frames, atoms, 3)")
    if z.ndim == 2 and z.shape == R.shape[:2] and len(z):  # a row per frame (round 25: was "z has shape (10, 9)
        differ = np.flatnonzero((z != z[:1]).any(axis=1))  # but R has 9 atoms per frame", though 9 atoms it is)
        if differ.size:
            k = int(differ[0])
            i = int(np.flatnonzero(z[k] != z[0])[0])
            raise DataError(f"{path}: {z_key} has a row per frame, and frame {k}'s atom {i} is Z={z[k, i]} where frame "
                            f"0's is Z={z[0, i]}; this layout holds one molecule per file (the same atoms in the same "
                            "order in every frame): split the frames by molecule, or convert them to extxyz")
        z = z[0]
    if z.ndim != 1 or z.shape[0] != R.shape[1]:
        raise DataError(f"{path}: {z_key} has shape {z.shape} but {r_key} has {R.shape[1]} atoms per frame")
    if E.ndim == 0 or E.size != len(R) or len(E) != len(R):  # a 0-d energy has no len()
        raise DataError(f"{path}: {e_key} has shape {E.shape} but {r_key} has {len(R)} frames; "
                        f"expected ({len(R)},) or ({len(R)}, 1)")
    if F is not None and F.shape != R.shape:
        raise DataError(f"{path}: {f_key} has shape {F.shape} but {r_key} has shape {R.shape}")
    metadata = _theory(arrays) if fmt == "md17" else {}
    builder = StructureBuilder(str(path), format=fmt, units_in={"energy": energy_unit or "kcal/mol"}, **metadata)
    builder.add(z, R * length, E.reshape(-1) * e, None if F is None else F * f)
    return builder.build()


def read_md17(path, energy_unit=None, length_unit=None) -> Structures:
    """sGDML npz (``R``, ``z``, ``E``, optional ``F``); kcal/mol, kcal/mol/Å, Å by default."""
    return _read_npz_frames(path, "md17", energy_unit, length_unit)


def read_rmd17(path, energy_unit=None, length_unit=None) -> Structures:
    """Revised MD17 npz (``nuclear_charges``, ``coords``, ``energies``, ``forces``)."""
    return _read_npz_frames(path, "rmd17", energy_unit, length_unit)


def read_md17_xyz(path, energy_unit=None, length_unit=None) -> Structures:
    """Plain xyz of MD17: comment line = energy (kcal/mol), columns ``sym x y z fx fy fz``."""
    from ase.data import atomic_numbers

    path = Path(path)
    e, length, f = unit_factors(path, energy_unit, length_unit, "kcal/mol")
    builder = StructureBuilder(str(path), format="md17-xyz", units_in={"energy": energy_unit or "kcal/mol"})
    from torchmdx.io_utils import decode_text, open_compressed

    with open_compressed(path, "rb") as handle:  # MD17 xyz files are often kept gzip'd (was "binary data")
        data = handle.read()
    # a byte-order mark was "line 1: ... got '\ufeff9'" (UTF-8) or "binary data" (UTF-16: PowerShell's '>')
    lines = decode_text(data).splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        try:
            natoms = int(lines[i].split()[0])
        except ValueError:
            got = lines[i].strip()[:40]
            raise DataError(f"{path}: line {i + 1}: expected the number of atoms, got {got!r}") from None
        if natoms < 1:
            raise DataError(f"{path}: line {i + 1}: a frame must have at least one atom, got {natoms}")
        if i + 2 + natoms > len(lines):
            raise DataError(f"{path}: line {i + 1}: frame of {natoms} atoms is cut short at the end of the file")
        comment = lines[i + 1].split()
        try:
            energy = float(comment[0])
        except (ValueError, IndexError):
            raise DataError(
                f"{path}: line {i + 2}: expected the energy as a number, got {lines[i + 1].strip()[:40]!r}"
            ) from None
        if len(comment) != 1:  # "-1.0 5" took the first number silently: which one is the energy?
            raise DataError(
                f"{path}: line {i + 2}: expected the energy alone (one number, kcal/mol), got {len(comment)} "
                f"fields {lines[i + 1].strip()[:60]!r}; an extended XYZ comment (energy=...) needs --format extxyz"
            )
        symbols, values = [], []
        for k in range(natoms):
            cols = lines[i + 2 + k].split()
            if len(cols) != 7:
                raise DataError(
                    f"{path}: line {i + 3 + k}: expected 7 columns (symbol x y z fx fy fz: the MD17 xyz layout, whose "
                    f"comment line is the energy alone), got {len(cols)}"
                )
            symbols.append(cols[0])
            try:
                values.append([float(c) for c in cols[1:]])
            except ValueError:
                raise DataError(f"{path}: line {i + 3 + k}: non-numeric coordinate or force") from None
        try:
            numbers = [atomic_numbers[s.capitalize()] for s in symbols]
        except KeyError as exc:
            raise DataError(f"{path}: frame at line {i + 1}: unknown element symbol {exc.args[0]!r}") from None
        values = np.asarray(values)
        builder.add(numbers, values[:, :3] * length, [energy * e], values[:, 3:] * f, where=f"{path}: line {i + 1}")
        i += 2 + natoms
    return builder.build()


def md17_search_dirs() -> list[Path]:
    """Folders searched for a molecule name: ``$TORCHMDX_DATA_DIR`` (os.pathsep-separated),
    ``./data``, ``./data/md17``, and the project's sample folder ``../shared/data/md17``."""
    dirs = [Path(p) for p in os.environ.get("TORCHMDX_DATA_DIR", "").split(os.pathsep) if p]
    dirs += [Path("data"), Path("data/md17")]
    root = Path(__file__).resolve().parents[2]
    dirs.append(root.parent / "shared" / "data" / "md17")
    expanded = []
    for d in dirs:
        expanded += [d, d / "md17"] if d.name != "md17" else [d]
    seen, out = set(), []
    for d in expanded:
        key = str(d.resolve()) if d.exists() else str(d)
        if key not in seen and d.is_dir():
            seen.add(key)
            out.append(d)
    return out


def resolve_md17_name(name: str, fmt: str) -> Path:
    """Path of the npz for molecule ``name`` (e.g. ``ethanol``) in the MD17 (``fmt='md17'``) or
    revised-MD17 (``'rmd17'``) layout, searched in :func:`md17_search_dirs`.

    Exact names are tried first (``md17_<name>.npz``, ``<name>_dft.npz``, ``<name>.npz``; or
    ``rmd17_<name>.npz``), then ``md17_<name>_*.npz`` / ``rmd17_<name>_*.npz``; several matches
    at the same level are an error listing them.
    """
    name = name.lower()
    if fmt == "rmd17":
        exact, loose = [f"rmd17_{name}.npz"], [f"rmd17_{name}_*.npz", f"rmd17_{name}*.npz"]
    else:
        exact = [f"md17_{name}.npz", f"{name}_dft.npz", f"{name}.npz"]
        loose = [f"md17_{name}_*.npz", f"md17_{name}*.npz"]
    dirs = md17_search_dirs()
    for patterns in (exact, loose):
        for d in dirs:
            found = sorted({p for pat in patterns for p in d.glob(pat)})
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise DataError(
                    f"{name}: several {fmt} files match in {d}: {', '.join(p.name for p in found)}; give the path"
                )
    raise DataError(
        f"{name}: file not found, and no {fmt} file for a molecule of that name in "
        f"{', '.join(str(d) for d in dirs) or 'the data folders'} (set TORCHMDX_DATA_DIR or give the path)"
    )
