"""Any file ASE can read (extxyz, ASE database, .traj, ...) with energies and, optionally, forces.

Per structure:

- ``energy``: ``atoms.info[energy_key]`` or the calculator's result of that name (extxyz puts
  ``energy=`` of the comment line there); for a database, the row's column/key of that name.
- ``forces``: ``atoms.arrays[forces_key]`` or the calculator's result; absent in every frame
  means an energy-only dataset; absent in some frames is an error.
- group label (polymer family, molecule): ``atoms.info[group_key]`` (database: key-value pair)
  when ``group_key`` is given; a frame without it is an error.
- ``stress`` (the training target of periodic data): ``atoms.info[stress_key]`` or the
  calculator's result (default key ``stress``: ASE's sign, σ = (1/V) ∂E/∂ε, positive under
  tension), as 6 Voigt components (xx, yy, zz, yz, xz, xy) or 9 (a 3 x 3 matrix); without it,
  a ``virial`` W (energy; 6 or 9 values) gives σ = −W / V. A ``stress_key`` whose name holds
  "virial" (``virial``, ``REF_virial``, ``virials``: MACE's and NequIP's names) is read as such a
  virial too (it was taken for a stress: eV read as eV/Å³, sign flipped). Stored as the per-structure extra
  ``stress`` [9] (the 3 x 3 matrix, row-major) in eV/Å³. Frames that are not periodic may lack
  it (isolated atoms or molecules for reference energies: NaN, no stress term for them); a
  periodic frame without one, when others have one, is an error.
- further numeric ``info`` entries (and calculator results) present in every frame become
  per-structure extras, numeric per-atom arrays per-atom extras, kept as in the file.

Units are ASE's (eV, Å) unless ``energy_unit`` / ``length_unit`` say otherwise; they apply to
positions, cell, energy, forces (energy_unit/length_unit) and stress (energy_unit/length_unit³).
An ASE database that names its units in its metadata (SchNetPack's ``_property_unit_dict`` and
``_distance_unit``) is read in those units (:func:`torchmdx.data.unit_keys.db_declared_units`); an option naming another
unit is refused.

:func:`read_ase` reads the file once, holding every frame; the cache is built from
:func:`torchmdx.data.ase_stream.iter_ase` (two passes over one parse, bounded memory, the same structures; an ASE
database's rows are fetched a page at a time: :func:`db_rows`).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from torchmdx.data.md17 import unit_factors
from torchmdx.data.structures import Structures, numeric_values
from torchmdx.data.unit_keys import check_unit_keys, db_units as _db_units
from torchmdx.config import key_hint
from torchmdx.data.xyz_counts import check_rest
from torchmdx.errors import DataError
from torchmdx.data.ase_text import (ase_source, label_as_symbol, number_as_symbol, number_key as _number_key,
                                    open_ase_source, short_atom_count)
from torchmdx.io_utils import is_torch_file

# ase_source and open_ase_source live in torchmdx.data.ase_text; md and export import ase_source from here


def all_frames(path) -> list:
    """Every frame of ``path``: ``ase.io.read`` with index ':' of :func:`ase_source`'s source."""
    import ase.io

    source, options = ase_source(path)
    frames = ase.io.read(source, index=":", **options)
    check_rest(source)  # a blank line between frames: ASE read the frames before it only (round 38)
    return frames


def ends_early(exc: BaseException) -> bool:
    """ASE's xyz/extxyz reader on a frame whose atom-count line has no atom lines after it (a file of
    only "3", a last frame cut after its count): a StopIteration inside its generator, which Python
    turns into "RuntimeError: generator raised StopIteration" (a traceback in ``data info``, else a
    line quoting those words)."""
    return isinstance(exc, RuntimeError) and "generator raised StopIteration" in str(exc)


#: what :func:`ends_early` means, for the line naming the file
ENDS_EARLY = ("the file ends early: a frame's atom-count line has no atom lines after it (truncated, e.g. an "
              "interrupted write or copy?)")


class ReadFailureKind(enum.Enum):
    """Why ASE could not read a structure file (:func:`classify_read_failure`)."""

    ENDS_EARLY = "ends_early"  # a frame cut after its atom-count line (:func:`ends_early`; say ENDS_EARLY)
    TORCH_FILE = "torch_file"  # a file torch.save wrote (a model, checkpoint or MD restart) given as a structure
    NUMBER_AS_SYMBOL = "number_as_symbol"  # a species column of atomic numbers ('8'): say ReadFailure.explanation
    SHORT_COUNT = "short_count"  # an xyz atom-count line too small or large (ASE's "Expected xyz header", "Frame has
    # 1 atoms, expected 5"): say .explanation
    LABEL_AS_SYMBOL = "label_as_symbol"  # a species column of atom labels ('C1', ASE's KeyError): say .explanation
    DATASET_FILE = "dataset_file"  # an npz or HDF5 dataset (or a cache) given as a structure: say .explanation
    OTHER = "other"  # anything else: quote the reader's error (:attr:`ReadFailure.detail`)


@dataclass(frozen=True)
class ReadFailure:
    """A failed read of a structure file: its kind and the reader's error, for the caller's line."""

    kind: ReadFailureKind
    error_type: str  # the exception's class name ("UnknownFileTypeError")
    message: str  # str() of the exception, possibly empty or several lines
    reason: str = ""  # SHORT_COUNT: which count line is too small; LABEL_AS_SYMBOL: which label; in words

    @property
    def first_line(self) -> str:
        """The first line of the reader's message ('' when it has none)."""
        return self.message.splitlines()[0] if self.message else ""

    @property
    def detail(self) -> str:
        """The first line of the reader's message, or its class name when the message is empty."""
        return self.first_line if self.message else self.error_type

    @property
    def explanation(self) -> Optional[str]:
        """Why, in words, for the kinds that have one (NUMBER_AS_SYMBOL, SHORT_COUNT, LABEL_AS_SYMBOL), else None."""
        if self.kind is ReadFailureKind.NUMBER_AS_SYMBOL:
            return number_as_symbol(self.message.strip("'\""))
        if self.kind in (ReadFailureKind.SHORT_COUNT, ReadFailureKind.LABEL_AS_SYMBOL, ReadFailureKind.DATASET_FILE):
            return self.reason
        return None

    def words(self, torch_file: str) -> Optional[str]:
        """The line's text after "<file>: " for every kind but OTHER (whose words each command chooses, quoting
        :attr:`detail`): the file ends early, the :attr:`explanation`, or, for a torch file, "a torch file (a
        model, checkpoint or MD restart file), " + ``torch_file`` (the command's advice)."""
        if self.kind is ReadFailureKind.ENDS_EARLY:  # was "(generator raised StopIteration)"
            return ENDS_EARLY
        if self.kind is ReadFailureKind.TORCH_FILE:  # `md model.pt`: ASE's "(pt)" said nothing
            return f"a torch file (a model, checkpoint or MD restart file), {torch_file}"
        return self.explanation


def classify_read_failure(exc: BaseException, path) -> ReadFailure:
    """Why reading structure file ``path`` with ASE raised ``exc``: it ends early (checked first),
    it is a torch file (``md model.pt``: ASE's "(pt)" said nothing), or something else. The commands
    that read structures (md, label, export --structure) word the line and the advice themselves."""
    if ends_early(exc):
        kind = ReadFailureKind.ENDS_EARLY
    elif is_torch_file(path):
        kind = ReadFailureKind.TORCH_FILE
    elif dataset_file(path):  # `md e.npz`: "cannot read a structure with ASE (npz)" (round 34)
        return ReadFailure(ReadFailureKind.DATASET_FILE, type(exc).__name__, str(exc),
                           f"{dataset_file(path)}, not a structure file ASE reads; give a structure file (xyz, "
                           "extxyz, pdb, traj, ...)")
    elif _number_key(exc) is not None:
        kind = ReadFailureKind.NUMBER_AS_SYMBOL
    else:
        label = label_as_symbol(path, exc.args[0]) if isinstance(exc, KeyError) and exc.args else None
        if label:  # the file is read once for it
            return ReadFailure(ReadFailureKind.LABEL_AS_SYMBOL, type(exc).__name__, str(exc), label)
        short = short_atom_count(path) if "Expected xyz header" in str(exc) else None
        if short is None and re.search(r"Frame has \d+ atoms, expected \d+", str(exc)):  # a last frame's count too
            # large (a first frame's is long_atom_count's, before ASE reads; round 36)
            from torchmdx.data.xyz_counts import late_atom_count
            from torchmdx.io_utils import open_compressed

            short = late_atom_count(path, open_compressed)
        if short:
            return ReadFailure(ReadFailureKind.SHORT_COUNT, type(exc).__name__, str(exc), short)
        kind = ReadFailureKind.OTHER
    return ReadFailure(kind, type(exc).__name__, str(exc))


def dataset_file(path) -> Optional[str]:
    """What a dataset file given where a structure file goes is, in words (an npz archive of arrays, a torchmdx
    cache, another HDF5 file), else None. ASE said only "(npz)" or "(h5)" for them (``md e.npz``, ``label a.h5``,
    ``export --openmm --structure e.npz``)."""
    import zipfile

    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError:
        return None
    if head == b"\x89HDF\r\n\x1a\n":
        try:
            import h5py

            with h5py.File(path, "r") as h5:
                cache = "torchmdx_cache_version" in h5.attrs
        except (OSError, ValueError):
            cache = False
        if cache:
            return "a torchmdx data cache (HDF5: the structures of a dataset, read by data, train and evaluate)"
        return "an HDF5 file (a dataset: torchmdx reads the ANI-1 and ANI-1x layouts with --format ani1 or ani1x)"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (OSError, zipfile.BadZipFile):
            return None
        if names and all(name.endswith(".npy") for name in names):
            return ("an npz file of arrays (a dataset: torchmdx reads the MD17 layouts with --format md17 or rmd17 "
                    "in data, train and evaluate)")
    return None


def nonfinite_position(atoms) -> Optional[str]:
    """The first atom of ``atoms`` (an ase.Atoms) whose position is NaN or infinite, in words
    ("atom 4 (H) has a non-finite position [nan, 0.0, 1.2]"); None when all are finite. Callers
    put where (file, frame) before it and what to do after it."""
    finite = np.isfinite(atoms.positions).all(axis=1)
    if finite.all():
        return None
    i = int(np.flatnonzero(~finite)[0])
    return f"atom {i} ({atoms.get_chemical_symbols()[i]}) has a non-finite position {atoms.positions[i].tolist()}"


def disordered_site(atoms) -> Optional[str]:
    """A site of a CIF read with partial occupancies (ASE's ``atoms.info['occupancy']``: site -> {symbol:
    fraction}) holding several species or less than one atom, in words; None for an ordered structure. ASE
    keeps one atom of one species at such a site, so a disordered Na0.5K0.5Cl was simulated as KCl without a
    word (round 20). Callers put where (file, frame) before it."""
    occupancy = atoms.info.get("occupancy")
    if not isinstance(occupancy, dict):
        return None
    tags = np.asarray(atoms.get_tags())
    for key, species in occupancy.items():
        if not isinstance(species, dict) or not species:
            continue
        try:
            fractions = {str(symbol): float(value) for symbol, value in species.items()}
        except (TypeError, ValueError):
            continue
        if len(fractions) == 1 and sum(fractions.values()) >= 1 - 1e-3:
            continue
        shown = ", ".join(f"{symbol} {value:g}" for symbol, value in fractions.items())
        kept = ""
        try:
            first = np.flatnonzero(tags == int(key))
            if first.size:
                kept = f"; ASE kept atom {int(first[0])} as {atoms.get_chemical_symbols()[int(first[0])]}"
        except ValueError:
            pass
        what = "disordered" if len(fractions) > 1 else "partly occupied"
        return (f"site {key} is {what} (occupancy {shown}{kept}): a model computes one ordered structure, so this "
                "one is not the material the file describes; give an ordered structure (one species per site, e.g. "
                "a supercell with that ratio)")
    return None


#: Per-atom arrays of an Atoms object that are inputs or bookkeeping, not targets.
_SKIP_ARRAYS = {"numbers", "positions", "momenta", "masses", "tags", "initial_magmoms", "initial_charges"}
#: Calculator results that hold one value per atom.
_PER_ATOM_RESULTS = {"forces", "charges", "magmoms", "energies", "stresses"}


def connect_db(path: Path):
    import sqlite3

    import ase.db

    try:
        db = ase.db.connect(str(path), type="db", create_indices=False)
        db.count()  # opens and checks the schema
        return db
    except (sqlite3.DatabaseError, OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: not a readable ASE database ({exc})") from None


def _numeric(value) -> Optional[np.ndarray]:
    if isinstance(value, (bool, np.bool_)):
        return None
    arr = np.asarray(value)
    return arr.astype(np.float64) if arr.dtype.kind in "fiu" and arr.size > 0 else None


class _Frame:
    __slots__ = ("theory", "numbers", "positions", "energy", "forces", "stress", "cell", "pbc", "group", "extras",
                 "atom_extras", "where")


def finite_values(values, what: str, where: str) -> np.ndarray:
    """``values`` as float64 real numbers that are all finite, else a one-line DataError naming
    ``where`` (file and frame), ``what`` and the atom (row) of the first bad value: the checks of
    :func:`torchmdx.data.structures.numeric_values` plus NaN/inf, so that an ASE frame's energy,
    forces and stress are refused naming the frame (not only the structure's index)."""
    arr = np.asarray(numeric_values(values, what, where), dtype=np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        atom = f" on atom {index[0]}" if arr.ndim == 2 else ""
        raise DataError(f"{where}: non-finite {what} ({arr[index]}){atom}")
    return arr


def _full_tensor(value, where: str, what: str) -> np.ndarray:
    """A symmetric 3 x 3 tensor from 6 Voigt components (xx, yy, zz, yz, xz, xy) or 9 values."""
    arr = _numeric(value)
    if arr is None and np.asarray(value).size in (6, 9):
        numeric_values(value, what, where)  # text, true/false, complex: say which
    if arr is None or arr.size not in (6, 9):
        raise DataError(f"{where}: {what} must have 6 (Voigt) or 9 components, got {np.asarray(value).reshape(-1)[:12]}")
    if arr.size == 9:
        return arr.reshape(3, 3)
    xx, yy, zz, yz, xz, xy = arr.reshape(6)
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def _frame_stress(info, results, cell, stress_key, where) -> Optional[np.ndarray]:
    """The frame's stress [3, 3] in the file's energy/length³ (see the module docstring), or None."""
    stress = None
    virial_key = "virial"
    if "virial" in str(stress_key).lower():  # a virial W (energy), not a stress
        stress_key, virial_key = None, stress_key
    for source in (info, results):
        if stress is None and stress_key in source:
            stress = _full_tensor(source[stress_key], where, f"stress '{stress_key}'")
    for source in (info, results):
        if stress is None and virial_key in source:
            volume = abs(float(np.linalg.det(np.asarray(cell, dtype=np.float64))))
            if not volume > 0:
                raise DataError(f"{where}: a virial '{virial_key}' but no cell volume to turn it into a stress")
            stress = -_full_tensor(source[virial_key], where, f"virial '{virial_key}'") / volume
    if stress is not None and not np.isfinite(stress).all():
        raise DataError(f"{where}: non-finite stress {stress.ravel().tolist()}")
    return stress


def _energy_advice(path: Path, bare: bool) -> str:
    """What to do about a frame without the energy key: name the key that holds it, or, for a frame of no info
    keys and no calculator results (a structure file), label the structures first (was "set energy_key" for
    both, an option evaluate and train do not have; round 23)."""
    from torchmdx.config import key_name

    if bare:
        return (f"the file holds structures without energies: label them first (e.g. torchmdx label {path.name} "
                "-o labelled.extxyz), or give a file with reference energies")
    return f"set {key_name('data.energy_key')} (--energy-key) to the key that holds the energies"


def _iter_atoms_frames(path: Path, energy_key, forces_key, group_key, stress_key="stress", energy_unit=None,
                       length_unit=None, desc: Optional[str] = None, total: Optional[int] = None):
    import ase.io
    from ase.io.formats import UnknownFileTypeError
    from tqdm.auto import tqdm

    k = -1
    try:
        with open_ase_source(path) as (source, options):  # a marked text file: decoded as it is read
            iterator = ase.io.iread(source, index=":", **options)
            for k, atoms in enumerate(tqdm(iterator, desc=desc or f"reading {path.name}", total=total, unit=" frames",
                                           disable=None)):
                results = dict(atoms.calc.results) if atoms.calc is not None else {}
                where = f"{path}: frame {k}"
                frame = _Frame()
                frame.where = where
                frame.numbers = atoms.numbers
                frame.positions = atoms.positions
                frame.cell = atoms.cell.array
                frame.pbc = atoms.pbc
                check_unit_keys(atoms.info, where, energy_unit, length_unit)  # energy_unit=Hartree: rounds 22, 23
                if energy_key in atoms.info:
                    frame.energy = atoms.info[energy_key]
                elif energy_key in results:
                    frame.energy = results[energy_key]
                else:
                    raise DataError(f"{where}: no energy '{energy_key}'"
                                    f"{key_hint(energy_key, list(atoms.info) + list(results))} (info keys: "
                                    f"{', '.join(sorted(atoms.info)) or 'none'}; "
                                    f"calculator results: {', '.join(sorted(results)) or 'none'}); "
                                    + _energy_advice(path, not atoms.info and not results))
                if forces_key in atoms.arrays:
                    frame.forces = atoms.arrays[forces_key]
                else:
                    frame.forces = results.get(forces_key)
                frame.group = _group(atoms.info, group_key, where)
                frame.theory = atoms.info.get("theory")
                frame.stress = _frame_stress(atoms.info, results, frame.cell, stress_key, where)
                extras, atom_extras = {}, {}
                for key, value in list(atoms.info.items()) + [(r, v) for r, v in results.items()
                                                              if r not in atoms.info]:
                    arr = _numeric(value)
                    if key in (energy_key, group_key, forces_key, stress_key, "virial") or arr is None:
                        continue
                    if key in _PER_ATOM_RESULTS and key in results:
                        atom_extras[key] = arr
                    else:
                        extras[key] = arr.reshape(-1)
                for key, value in atoms.arrays.items():
                    arr = _numeric(value)
                    if key not in _SKIP_ARRAYS and key != forces_key and arr is not None:
                        atom_extras[key] = arr
                frame.extras = extras
                frame.atom_extras = atom_extras
                yield frame
            check_rest(source)  # a blank line between frames: ASE read the frames before it only (round 38)
    except DataError:
        raise
    except KeyError as exc:
        explanation = classify_read_failure(exc, path).explanation
        if explanation:  # a species column of atomic numbers was "ASE cannot read it (KeyError: '8')"
            raise DataError(f"{path}: {explanation}") from None
        key = exc.args[0] if exc.args else None
        if isinstance(key, str) and key.isalpha() and len(key) <= 3:  # ASE's lookup of a chemical symbol
            raise DataError(f"{path}: unknown element symbol {key!r} (ASE cannot read the file)") from None
        raise DataError(f"{path}: ASE cannot read it (KeyError: {exc})") from None
    except RuntimeError as exc:
        if not ends_early(exc):
            raise
        raise DataError(f"{path}: frame {k + 1}: {ENDS_EARLY}") from None
    except (OSError, ValueError, IndexError, StopIteration, UnknownFileTypeError) as exc:
        explanation = classify_read_failure(exc, path).explanation
        if explanation:  # a short count was ASE's "Expected xyz header but got: invalid literal for int() ..."
            raise DataError(f"{path}: {explanation}") from None
        raise DataError(f"{path}: ASE cannot read it ({type(exc).__name__}: {exc})") from None


def _group(info, group_key, where):
    if group_key is None:
        return None
    if group_key not in info:
        raise DataError(
            f"{where}: group key '{group_key}' not found{key_hint(group_key, info)}; keys present: "
            f"{', '.join(sorted(info)) or 'none'}"
        )
    return group_label(info[group_key], f"{where}: group key '{group_key}'")


def group_label(value, what: str) -> str:
    """A group label (one name or number per structure) as text; a list or array (an extxyz
    ``polymer="1 2"``, read by ASE as two numbers) is a one-line DataError naming ``what`` (it
    became the label text "[1 2]", silently)."""
    if isinstance(value, (str, bytes)) or np.ndim(value) == 0:
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    shown = np.asarray(value).reshape(-1)[:6].tolist()
    raise DataError(f"{what} holds {np.size(value)} values ({shown}); expected one name or number per structure "
                    "(a per-structure label of shape ())")


#: the most rows, and about the most atoms, one query of :func:`db_rows` fetches (ASE's SQLite backend fetches
#: a whole selection at once: ``cur.fetchall()``)
DB_PAGE_ROWS = 4096
DB_PAGE_ATOMS = 1 << 18
#: rows of the first query, before the rows' sizes are known
DB_FIRST_PAGE_ROWS = 256


def db_rows(db):
    """Every row of ASE database ``db`` in id order (the order of ``db.select()``), fetched a page at a time with
    ASE's own API (``db.select([('id', '>', last)], limit=n)``: SQLite's range search on the row id, so a page
    costs its own rows, not those before it). ``db.select()`` alone fetches every row of the database into
    memory before it yields the first; a page here holds at most :data:`DB_PAGE_ROWS` rows and, after the first
    page, about :data:`DB_PAGE_ATOMS` atoms (its row count set by the largest row seen so far). The query has no
    ``ORDER BY``: SQLite's plan is the rowid range search, which returns rows in id order (ASE's ``sort='id'``
    adds an ``IS NULL`` term, and SQLite then sorts every remaining row for each page: ``USE TEMP B-TREE FOR ORDER
    BY``); rows out of id order would be one line, not rows skipped."""
    last, rows, largest = 0, DB_FIRST_PAGE_ROWS, 1
    while True:
        fetched = 0
        for row in db.select([("id", ">", last)], limit=rows):
            if row.id <= last:
                raise DataError(f"{db.filename}: ASE returned row {row.id} after row {last}, out of id order; the "
                                "rows cannot be read a page at a time")
            fetched += 1
            last = row.id
            largest = max(largest, int(row.natoms))
            yield row
        if fetched < rows:
            return
        rows = max(1, min(DB_PAGE_ROWS, DB_PAGE_ATOMS // largest))


def _iter_db_frames(path: Path, energy_key, forces_key, group_key, stress_key="stress", desc: Optional[str] = None):
    from tqdm.auto import tqdm

    db = connect_db(path)
    for row in tqdm(db_rows(db), total=db.count(), desc=desc or f"reading {path.name}", unit=" rows", disable=None):
        where = f"{path}: row {row.id}"
        try:
            data = row.data or {}
        except (TypeError, ValueError, KeyError, AttributeError) as exc:  # ASE cannot decode it (a text array: 'str32')
            raise DataError(f"{where}: ASE cannot read the row's data ({type(exc).__name__}: {exc})") from None
        frame = _Frame()
        frame.where = where
        frame.numbers = row.numbers
        frame.positions = row.positions
        frame.cell = np.asarray(row.cell)
        frame.pbc = row.pbc
        energy = row.get(energy_key)
        if energy is None:
            energy = data.get(energy_key)
        if energy is None and energy_key == "energy" and row.get("calculator"):
            # the row was written with a calculator, but its energy column is empty: SQLite stores
            # no NaN (a NaN energy becomes NULL), so a non-finite energy reads back as none
            raise DataError(
                f"{where}: no energy 'energy', though the row was written with a calculator "
                f"({row.get('calculator')!r}): ASE databases store a NaN energy as an empty value (SQLite "
                "has no NaN), so the energy was probably not finite (or the calculator gave none); "
                "drop the row or write a finite energy"
            )
        if energy is None:
            # a row of bare structures (no keys, no data, no calculator) gets the label advice an extxyz frame of
            # bare structures gets: "set data.energy_key" named a key no row has (round 33)
            bare = not row.key_value_pairs and not data and not row.get("calculator")
            raise DataError(
                f"{where}: no energy '{energy_key}'{key_hint(energy_key, list(row.key_value_pairs) + list(data))} "
                f"(keys: {', '.join(sorted(row.key_value_pairs)) or 'none'}; "
                f"data: {', '.join(sorted(data)) or 'none'}); {_energy_advice(path, bare)}"
            )
        frame.energy = energy
        forces = row.get(forces_key)
        frame.forces = forces if forces is not None else data.get(forces_key)
        frame.group = _group(row.key_value_pairs, group_key, where)
        frame.theory = row.key_value_pairs.get("theory")
        results = {key: row.get(key) for key in (stress_key, "virial") if row.get(key) is not None}
        frame.stress = _frame_stress(data, results, frame.cell, stress_key, where)
        frame.extras = {}
        for key, value in row.key_value_pairs.items():
            arr = _numeric(value)
            if key not in (energy_key, group_key, stress_key, "virial") and arr is not None:
                frame.extras[key] = arr.reshape(-1)
        frame.atom_extras = {}
        yield frame


def read_ase(path, energy_key: Optional[str] = None, forces_key: Optional[str] = None,
             group_key: Optional[str] = None, energy_unit: Optional[str] = None,
             length_unit: Optional[str] = None, stress_key: Optional[str] = None) -> Structures:
    """Read every frame of an ASE-readable file (see the module docstring) in one pass, every frame held in
    memory; :func:`torchmdx.data.ase_stream.iter_ase` gives the same structures in chunks (two passes over one
    parse, bounded memory: what :func:`torchmdx.data.cache.build_cache` uses)."""
    from torchmdx.data.ase_stream import read_whole

    return read_whole(ase_reading(path, energy_key, forces_key, group_key, energy_unit, length_unit, stress_key))


@dataclass(frozen=True)
class AseReading:
    """The checked options of one read of an ASE file (:func:`ase_reading`), and its frames."""

    path: Path
    energy_key: str
    forces_key: str
    stress_key: str
    group_key: Optional[str]
    explicit_forces: bool  # forces_key was given: forces in no frame is an error
    explicit_stress: bool  # stress_key was given: a stress (or virial) in no frame is an error
    energy_unit: Optional[str]  # the unit the file's energies are read in (a database's own included); None: eV
    length_unit: Optional[str]  # None: Å
    factors: tuple  # (energy, length, forces) factors to eV, Å, eV/Å (md17.unit_factors)

    def frames(self, desc: Optional[str] = None, total: Optional[int] = None):
        """The file's frames, one at a time, each checked on its own (``_Frame``: values in the file's units),
        with a progress bar saying ``desc`` (default "reading <name>") out of ``total`` frames (if known)."""
        if self.path.suffix == ".db":  # ASE's database: the row count is known (``total`` not needed)
            return _iter_db_frames(self.path, self.energy_key, self.forces_key, self.group_key, self.stress_key,
                                   desc=desc)
        return _iter_atoms_frames(self.path, self.energy_key, self.forces_key, self.group_key, self.stress_key,
                                  self.energy_unit, self.length_unit, desc=desc, total=total)


def ase_reading(path, energy_key: Optional[str] = None, forces_key: Optional[str] = None,
                group_key: Optional[str] = None, energy_unit: Optional[str] = None,
                length_unit: Optional[str] = None, stress_key: Optional[str] = None) -> AseReading:
    """The options of :func:`read_ase`, with their defaults, checked before any frame is read (a forces or stress
    key naming one of ASE's own per-atom arrays; a database's declared units; unknown unit names)."""
    path = Path(path)
    energy_key = energy_key or "energy"
    explicit_forces = forces_key is not None
    forces_key = forces_key or "forces"
    if forces_key in _SKIP_ARRAYS:  # 'positions' was read as the forces, silently
        raise DataError(f"{path}: forces key '{forces_key}' names ASE's own per-atom {forces_key}, not forces; give "
                        "the array or calculator result that holds the forces (e.g. forces)")
    explicit_stress = stress_key is not None
    stress_key = stress_key or "stress"
    if stress_key == forces_key or stress_key in _PER_ATOM_RESULTS | _SKIP_ARRAYS:
        # '--stress-key forces' read a 3-atom frame's forces (9 values) as its stress, silently
        what = "the forces key" if stress_key == forces_key else f"ASE's per-atom {stress_key}"
        raise DataError(f"{path}: stress key '{stress_key}' names {what}, one value per atom, not a stress (6 or 9 "
                        "values per structure); give the info key or calculator result that holds the stress "
                        "(e.g. stress), or a virial")
    if path.suffix == ".db":
        energy_unit, length_unit = _db_units(path, energy_key, forces_key, energy_unit, length_unit)
    factors = unit_factors(path, energy_unit, length_unit, "eV")
    return AseReading(path, energy_key, forces_key, stress_key, group_key, explicit_forces, explicit_stress,
                      energy_unit, length_unit, factors)
