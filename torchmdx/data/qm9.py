"""QM9: the original per-molecule xyz layout (a folder, a tar archive, or one file) and the ASE
database layout (SchNetPack's, with ``_property_unit_dict`` and ``atomrefs`` in its metadata).

Original xyz layout (Ramakrishnan et al., Sci. Data 1, 140022 (2014)), one molecule per file::

    N
    gdb <id>  A B C  mu alpha  homo lumo gap  r2 zpve  U0 U H G  Cv
    <symbol> x y z <Mulliken charge>          (N lines, Å and e)
    <harmonic frequencies>
    <GDB-17 SMILES> <relaxed SMILES>
    <InChI> <relaxed InChI>

Numbers may use Mathematica's ``*^`` exponent (``1.2*^-6`` = ``1.2e-6``).

All 15 properties are kept as per-structure extras under SchNetPack's names (below); those in
Hartree (homo, lumo, gap, zpve, U0, U, H, G) are converted to eV, the rest keep their published
unit (GHz, Debye, Bohr³, Bohr², cal/mol/K), recorded in ``extra_units``. ``energy`` is the
property named by ``energy_key`` (default ``energy_U0``; the short QM9 names ``U0``, ``U``,
``H``, ``G`` ... are accepted too). The xyz layout also keeps the Mulliken charges as the
per-atom extra ``mulliken_charge`` (e); frequencies, SMILES and InChI are not kept.

Atomic reference energies (the energy of each free atom at the same level of theory, B3LYP/
6-31G(2df,p)) are QM9's published ``atomref`` table, :data:`QM9_ATOMREFS`; the database layout
carries its own copy in its metadata, which is used for files of that layout.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from torchmdx import units
from torchmdx.data.structures import CHUNK_ATOMS, StructureBuilder, Structures
from torchmdx.config import key_hint
from torchmdx.errors import DataError
from torchmdx.io_utils import decode_text

#: (name used by torchmdx/SchNetPack, name in the QM9 paper, published unit), in file order.
QM9_PROPERTIES = [
    ("rotational_constant_A", "A", "GHz"),
    ("rotational_constant_B", "B", "GHz"),
    ("rotational_constant_C", "C", "GHz"),
    ("dipole_moment", "mu", "D"),
    ("isotropic_polarizability", "alpha", "a0^3"),
    ("homo", "homo", "Ha"),
    ("lumo", "lumo", "Ha"),
    ("gap", "gap", "Ha"),
    ("electronic_spatial_extent", "r2", "a0^2"),
    ("zpve", "zpve", "Ha"),
    ("energy_U0", "U0", "Ha"),
    ("energy_U", "U", "Ha"),
    ("enthalpy_H", "H", "Ha"),
    ("free_energy", "G", "Ha"),
    ("heat_capacity", "Cv", "cal/mol/K"),
]
QM9_NAMES = [p[0] for p in QM9_PROPERTIES]
_ALIASES = {short.lower(): name for name, short, _ in QM9_PROPERTIES}
_ALIASES.update({name.lower(): name for name in QM9_NAMES})

#: QM9's published atomic reference values (``atomref`` table of the QM9 distribution), per
#: element Z: property -> value in the published unit (Hartree; Cv in cal/mol/K).
QM9_ATOMREFS = {
    1: {"zpve": 0.0, "energy_U0": -0.500273, "energy_U": -0.498857, "enthalpy_H": -0.497912,
        "free_energy": -0.510927, "heat_capacity": 2.981},
    6: {"zpve": 0.0, "energy_U0": -37.846772, "energy_U": -37.845355, "enthalpy_H": -37.844411,
        "free_energy": -37.861317, "heat_capacity": 2.981},
    7: {"zpve": 0.0, "energy_U0": -54.583861, "energy_U": -54.582445, "enthalpy_H": -54.581501,
        "free_energy": -54.598897, "heat_capacity": 2.981},
    8: {"zpve": 0.0, "energy_U0": -75.064579, "energy_U": -75.063163, "enthalpy_H": -75.062219,
        "free_energy": -75.079532, "heat_capacity": 2.981},
    9: {"zpve": 0.0, "energy_U0": -99.718730, "energy_U": -99.717314, "enthalpy_H": -99.716370,
        "free_energy": -99.733544, "heat_capacity": 2.981},
}

_ATOMREF_LENGTH = 119  # Z = 0..118


def canonical_property(key: str, available=QM9_NAMES) -> str:
    name = _ALIASES.get(key.lower(), key)
    if name not in available:
        raise DataError(f"unknown QM9 property {key!r}; known: {', '.join(available)}")
    return name


def _convert(unit: Optional[str]):
    """(factor, internal unit) for a published unit: energies -> eV, others unchanged."""
    if unit is not None and unit.strip().lower() in units.ENERGY_UNITS:
        return units.energy_factor(unit), "eV"
    return 1.0, unit or "unknown"


def published_atomrefs() -> dict:
    """QM9's atomrefs as {property: list over Z=0..118} in internal units (eV for energies)."""
    out = {}
    for name, _, unit in QM9_PROPERTIES:
        if name not in QM9_ATOMREFS[1]:
            continue
        factor, _ = _convert(unit)
        table = [0.0] * _ATOMREF_LENGTH
        for z, values in QM9_ATOMREFS.items():
            table[z] = values[name] * factor
        out[name] = table
    return out


def _float(token: str) -> float:
    return float(token.replace("*^", "e"))


def parse_qm9_xyz(text: str, where: str):
    """One molecule in the original QM9 xyz layout -> (gdb id, numbers, positions [N,3] Å,
    {property: value in published unit}, Mulliken charges [N])."""
    from ase.data import atomic_numbers

    lines = text.splitlines()
    try:
        natoms = int(lines[0].split()[0])
    except (ValueError, IndexError):
        raise DataError(f"{where}: line 1: expected the number of atoms") from None
    if natoms < 1:  # was "coordinates have shape (0,) but there are 0 atomic numbers"
        raise DataError(f"{where}: line 1: announces {natoms} atoms; a QM9 molecule has at least one")
    if len(lines) < 2 + natoms:
        raise DataError(f"{where}: {natoms} atoms announced but the file has only {len(lines)} lines")
    head = lines[1].split()
    if len(head) < 2 + len(QM9_PROPERTIES) or head[0] != "gdb":
        raise DataError(
            f"{where}: line 2: expected 'gdb <id>' and {len(QM9_PROPERTIES)} properties, got {len(head)} fields"
        )
    try:
        gdb_id = int(head[1])
        props = {name: _float(tok) for (name, _, _), tok in zip(QM9_PROPERTIES, head[2:])}
    except ValueError:
        raise DataError(f"{where}: line 2: a property is not a number") from None
    bad = [(name, short) for name, short, _ in QM9_PROPERTIES if not np.isfinite(props[name])]
    if bad:  # was "non-finite energy (nan) in structure 1" of the folder
        raise DataError(f"{where}: line 2: property {bad[0][1]} ({bad[0][0]}) is {props[bad[0][0]]}; expected a "
                        "finite number")
    numbers, positions, charges = [], [], []
    for k in range(natoms):
        cols = lines[2 + k].split()
        if len(cols) < 4:
            raise DataError(f"{where}: line {3 + k}: expected 'symbol x y z charge', got {len(cols)} fields")
        try:
            numbers.append(atomic_numbers[cols[0].capitalize()])
        except KeyError:
            raise DataError(f"{where}: line {3 + k}: unknown element symbol {cols[0]!r}") from None
        try:
            positions.append([_float(c) for c in cols[1:4]])
            charges.append(_float(cols[4]) if len(cols) > 4 else np.nan)
        except ValueError:
            raise DataError(f"{where}: line {3 + k}: a coordinate is not a number") from None
        if not np.isfinite(positions[-1]).all():  # was "non-finite coordinates in structure 2" of the folder
            raise DataError(f"{where}: line {3 + k}: atom {k} ({cols[0]}) has a non-finite coordinate "
                            f"{' '.join(cols[1:4])}; expected x y z in Å")
    return gdb_id, np.asarray(numbers), np.asarray(positions), props, np.asarray(charges)


def _text(data: bytes, where: str) -> str:
    """A molecule file's bytes as text (UTF-8, or by a leading byte-order mark, dropped); one line naming the
    file and the line of the first byte that is not UTF-8 (a folder's file was named only by the folder:
    "it holds binary data where text was expected")."""
    try:
        return decode_text(data)  # UTF-16 too (Windows PowerShell's '>')
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{where}: holds binary data where text was expected (line {line}: byte "
                        f"{data[exc.start:exc.start + 1]!r} is not UTF-8); a QM9 xyz file is plain text "
                        "(wrong --format?)") from None


def _iter_xyz_texts(path: Path) -> Iterator[tuple[str, str]]:
    """(where, text) for every molecule file in a folder, a tar archive, or one file."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".xyz" and p.is_file())  # not a folder named x.xyz
        if not files:
            raise DataError(f"{path}: folder holds no .xyz files")
        for p in files:
            yield str(p), _text(p.read_bytes(), str(p))
    elif tarfile.is_tarfile(path):
        try:
            with tarfile.open(path, "r:*") as tar:
                found = False
                for member in tar:
                    if member.isfile() and member.name.endswith(".xyz"):
                        found = True
                        where = f"{path}:{member.name}"
                        yield where, _text(tar.extractfile(member).read(), where)
                if not found:
                    raise DataError(f"{path}: tar archive holds no .xyz files")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(f"{path}: damaged tar archive ({exc})") from None
    else:
        yield str(path), _text(path.read_bytes(), str(path))


def _energy_name(energy_key: Optional[str]) -> str:
    name = canonical_property(energy_key or "energy_U0")
    if dict((n, u) for n, _, u in QM9_PROPERTIES)[name] != "Ha":
        raise DataError(f"energy_key {energy_key!r} is not an energy; choose one of U0, U, H, G (or homo, lumo, ...)")
    return name


def read_qm9(path, energy_key: Optional[str] = None, energy_unit: Optional[str] = None) -> Structures:
    """QM9 from a folder of xyz files, a tar archive of them, one xyz file, or an ASE database."""
    path = Path(path)
    if path.suffix == ".db":
        return read_qm9_db(path, energy_key, energy_unit)
    from tqdm.auto import tqdm

    name = _energy_name(energy_key)
    if energy_unit is not None:
        raise DataError(f"{path}: energy_unit does not apply to QM9 xyz files (Hartree by definition)")
    molecules = []
    for where, text in tqdm(_iter_xyz_texts(path), desc="reading QM9 xyz", unit=" molecules", disable=None):
        molecules.append((where,) + parse_qm9_xyz(text, where))
    molecules.sort(key=lambda m: m[1])
    for before, after in zip(molecules, molecules[1:]):
        if before[1] == after[1]:  # the same molecule twice: it could sit in the training and the test split
            raise DataError(f"{after[0]}: gdb id {after[1]} is also the id of {before[0]}; each QM9 molecule "
                            "must appear once (a copied file?)")
    builder = StructureBuilder(str(path), format="qm9", layout="xyz", energy_key=name,
                               atomrefs=published_atomrefs(), units_in={"energy": "Ha"})
    factors = {n: _convert(u) for n, _, u in QM9_PROPERTIES}
    builder.extra_units = {n: factors[n][1] for n in QM9_NAMES}
    builder.extra_units["mulliken_charge"] = "e"
    for where, _, numbers, positions, props, charges in molecules:
        extras = {n: np.array([props[n] * factors[n][0]]) for n in QM9_NAMES}
        builder.add(numbers, positions, [extras[name][0]], extras=extras,
                    atom_extras={"mulliken_charge": charges}, where=where)
    return builder.build()


class _QM9Database:
    """A QM9 ASE database opened for reading: its units, properties and atomrefs decided from the metadata and the
    first row (as the whole read decided them), its rows fetched a page at a time (:func:`ase_format.db_rows`: the
    reader held every row of the database from ``db.select()``)."""

    def __init__(self, path: Path, energy_key: Optional[str], energy_unit: Optional[str]):
        from torchmdx.data.ase_format import connect_db, db_rows

        self.path = path
        db = connect_db(path)
        meta = db.metadata or {}
        unit_dict = meta.get("_property_unit_dict", {})
        if not isinstance(unit_dict, dict):
            raise DataError(f"{path}: metadata '_property_unit_dict' must map property names to unit names, "
                            f"got {type(unit_dict).__name__}")
        unit_dict = dict(unit_dict)
        for key, value in [("_distance_unit", meta.get("_distance_unit", "Ang"))] + [
                (f"_property_unit_dict.{n}", u) for n, u in unit_dict.items()]:
            if not isinstance(value, str):  # was AttributeError: 'int' object has no attribute 'strip'
                raise DataError(f"{path}: metadata '{key}' must be a unit name (text), got {value!r}")
        self._rows = db_rows(db)
        self.first = next(self._rows, None)
        if self.first is None:
            raise DataError(f"{path}: database holds no rows")
        first = {**self.first.key_value_pairs, **(self.first.data or {})}
        available = [n for n in first if np.asarray(first[n]).dtype.kind in "fiu"]
        try:
            name = canonical_property(energy_key or "energy_U0", available)
        except DataError:
            given = energy_key or "energy_U0"
            hint = key_hint(given, available)
            if not hint and given.strip() != given:  # 'U0 ': a stray space around a QM9 short name
                try:
                    canonical_property(given.strip(), available)
                    hint = f" (did you mean {given.strip()!r}?)"
                except DataError:
                    pass
            raise DataError(
                f"{path}: no QM9 property {given!r} in the rows{hint}; "
                f"properties found: {', '.join(sorted(available)) or 'none'}"
            ) from None
        if energy_unit is not None:
            unit_dict[name] = energy_unit
        if name not in unit_dict:
            raise DataError(
                f"{path}: the unit of '{name}' cannot be determined (no _property_unit_dict in the metadata); "
                "pass energy_unit"
            )
        try:
            self.length = units.length_factor(meta.get("_distance_unit", "Ang"))
            self.factors = {n: _convert(unit_dict.get(n)) for n in available}
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from None
        if self.factors[name][1] != "eV":
            raise DataError(f"{path}: energy_key '{name}' has unit {unit_dict[name]!r}, which is not an energy")
        self.atomrefs = {}
        for prop, table in (meta.get("atomrefs") or {}).items():
            self.atomrefs[prop] = _atomref_table(path, prop, table, self.factors.get(prop, (1.0, ""))[0])
        self.name, self.available, self.energy_unit = name, available, unit_dict[name]

    def rows(self):
        """Every row in id order (the first one read already, then the rest a page at a time)."""
        yield self.first
        yield from self._rows

    def builder(self) -> StructureBuilder:
        builder = StructureBuilder(str(self.path), format="qm9", layout="ase-db", energy_key=self.name,
                                   atomrefs=self.atomrefs, units_in={"energy": self.energy_unit})
        builder.extra_units = {n: self.factors[n][1] for n in self.available}
        return builder

    def add(self, builder: StructureBuilder, row) -> None:
        values = {**row.key_value_pairs, **(row.data or {})}
        missing = [n for n in self.available if n not in values]
        if missing:
            noun = "properties" if len(missing) > 1 else "property"
            raise DataError(f"{self.path}: row {row.id} lacks {noun} {', '.join(missing)}")
        extras = {}
        for n in self.available:
            value = np.asarray(values[n], dtype=np.float64) * self.factors[n][0]
            extras[n] = value.reshape(1) if value.size == 1 else value.reshape(1, -1)
        builder.add(row.numbers, row.positions * self.length, extras[self.name],
                    cell=np.asarray(row.cell) * self.length, pbc=row.pbc, extras=extras,
                    where=f"{self.path}: row {row.id}")


def read_qm9_db(path, energy_key: Optional[str] = None, energy_unit: Optional[str] = None) -> Structures:
    """QM9 as an ASE database: properties in each row's ``data`` (or key-value pairs), units in
    the metadata's ``_property_unit_dict``, distances in ``_distance_unit``, atomrefs in
    ``atomrefs`` (lists over Z in the properties' units). Every row held (:func:`iter_qm9_db` streams)."""
    reading = _QM9Database(Path(path), energy_key, energy_unit)
    builder = reading.builder()
    for row in reading.rows():
        reading.add(builder, row)
    return builder.build()


def iter_qm9_db(path, energy_key: Optional[str] = None, energy_unit: Optional[str] = None,
                chunk_atoms: int = CHUNK_ATOMS) -> Iterator[Structures]:
    """:func:`read_qm9_db`'s structures as validated chunks of about ``chunk_atoms`` atoms (a chunk ends after the
    row that reaches it), the rows fetched a page at a time: memory does not grow with the database. One pass (the
    properties kept are decided by the first row, as the whole read decides them); the chunks, concatenated, are
    the whole read's structures."""
    reading = _QM9Database(Path(path), energy_key, energy_unit)
    builder = reading.builder()
    for row in reading.rows():
        reading.add(builder, row)
        if builder.pending_atoms >= chunk_atoms:
            yield builder.take_chunk()
    chunk = builder.take_chunk()
    if chunk is not None:
        yield chunk


def _atomref_table(path, prop: str, table, factor: float) -> list:
    """One ``atomrefs`` table of a QM9 database's metadata as a list over Z = 0..118, in internal
    units: one finite number per element, at most 119 of them (a NaN table gave NaN reference
    energies; a 2-D one a list of arrays; text a ValueError)."""
    try:
        values = np.asarray(table, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: metadata 'atomrefs.{prop}' must be a list of numbers (one per atomic number), "
                        f"got {str(table)[:60]}") from None
    if values.ndim != 1 or values.size > _ATOMREF_LENGTH:
        raise DataError(f"{path}: metadata 'atomrefs.{prop}' has shape {values.shape}; expected one number per "
                        f"atomic number 0..{_ATOMREF_LENGTH - 1} (at most {_ATOMREF_LENGTH})")
    bad = np.nonzero(~np.isfinite(values))[0]
    if bad.size:
        raise DataError(f"{path}: metadata 'atomrefs.{prop}' holds the non-finite value {values[bad[0]]} for "
                        f"Z={int(bad[0])}")
    return list(values * factor) + [0.0] * (_ATOMREF_LENGTH - values.size)


def looks_like_qm9_xyz(text_head: str) -> bool:
    lines = text_head.splitlines()
    return len(lines) > 1 and re.match(r"^\s*gdb\s+\d+", lines[1]) is not None
