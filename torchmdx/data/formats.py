"""Format registry: which reader reads a file, guessing the format from the file when not given.

======== ============================================ ============================================
format    files                                        reader options
======== ============================================ ============================================
md17      sGDML npz (R, z, E, F) or a molecule name     energy_unit, length_unit (kcal/mol, Å)
rmd17     revised-MD17 npz or a molecule name           energy_unit, length_unit (kcal/mol, Å)
md17-xyz  MD17 plain xyz (comment line = energy)        energy_unit, length_unit (kcal/mol, Å)
qm9       xyz folder, tar(.gz/.bz2/.xz) or ASE db       energy_key (energy_U0), energy_unit (db)
ani1      ANI-1 HDF5                                    energy_key (energies), energy_unit (Hartree)
ani1x     ANI-1x HDF5                                   energy_key, forces_key, energy_unit (Hartree)
ase       extxyz, ASE db, .traj, any ASE-readable file  energy_key, forces_key, stress_key, group_key, units
cache     a torchmdx HDF5 cache                         (none)
======== ============================================ ============================================
"""

from __future__ import annotations

from contextlib import contextmanager

import os
import tarfile
from pathlib import Path
from typing import Optional

from torchmdx.data.structures import Structures
from torchmdx.io_utils import (SUFFIX_COMPRESSIONS, compression, compression_name_mismatch, decode_text,
                               missing_file_reason)
from torchmdx.errors import DataError

FORMAT_OPTIONS = {
    "md17": {"energy_unit", "length_unit"},
    "rmd17": {"energy_unit", "length_unit"},
    "md17-xyz": {"energy_unit", "length_unit"},
    "qm9": {"energy_key", "energy_unit"},
    "ani1": {"energy_key", "energy_unit"},
    "ani1x": {"energy_key", "forces_key", "energy_unit"},
    "ase": {"energy_key", "forces_key", "stress_key", "group_key", "energy_unit", "length_unit"},
    "cache": set(),
}
FORMATS = tuple(FORMAT_OPTIONS)
#: every option a reader may take (the ``data:`` config keys of the same names)
READER_OPTIONS = ("energy_key", "forces_key", "stress_key", "group_key", "energy_unit", "length_unit")


def _reader(fmt: str):
    if fmt == "md17":
        from torchmdx.data.md17 import read_md17 as reader
    elif fmt == "rmd17":
        from torchmdx.data.md17 import read_rmd17 as reader
    elif fmt == "md17-xyz":
        from torchmdx.data.md17 import read_md17_xyz as reader
    elif fmt == "qm9":
        from torchmdx.data.qm9 import read_qm9 as reader
    elif fmt == "ani1":
        from torchmdx.data.ani import read_ani1 as reader
    elif fmt == "ani1x":
        from torchmdx.data.ani import read_ani1x as reader
    elif fmt == "ase":
        from torchmdx.data.ase_format import read_ase as reader
    else:
        from torchmdx.data.cache import read_cache as reader
    return reader


#: file kinds given as a format (``--format npz``), and the formats that read them
FILE_KIND_FORMATS = {
    "npz": "an npz file is read by the md17 format, or rmd17 for revised-MD17 files",
    "xyz": "an xyz file is read by the ase format (extxyz), or md17-xyz for MD17's plain xyz, qm9 for QM9's",
    "extxyz": "an extxyz file is read by the ase format",
    "h5": "an HDF5 file is read by the ani1 or ani1x format, or cache for a torchmdx cache",
    "hdf5": "an HDF5 file is read by the ani1 or ani1x format, or cache for a torchmdx cache",
    "db": "an ASE database is read by the ase format, or qm9 for a QM9 database",
    "traj": "an ASE trajectory is read by the ase format",
}


def unknown_format_hint(fmt) -> str:
    """'' or '; an npz file is read by the md17 format, ...' for a format name that is a file kind: ``--format npz``
    listed the known formats without saying which reads an npz file."""
    hint = FILE_KIND_FORMATS.get(str(fmt).strip().lower().lstrip("."))
    return f"; {hint}" if hint else ""


def check_format(fmt: Optional[str]) -> Optional[str]:
    if fmt is None:
        return None
    if not isinstance(fmt, str):  # read_structures(path, format=5): "AttributeError: 'int' object has no attribute 'strip'"
        raise DataError(f"format must be the name of a format ({', '.join(FORMATS)}) or None to guess it from the "
                        f"file, got {fmt!r} ({type(fmt).__name__})")
    key = fmt.strip().lower()
    if key not in FORMAT_OPTIONS:
        raise DataError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}{unknown_format_hint(fmt)}")
    return key


def resolve_source(path, fmt: Optional[str] = None) -> Path:
    """The file or folder to read: ``path`` itself, or for md17/rmd17 a molecule name."""
    if isinstance(path, str) and not path.strip():  # Path('') is '.': ". cannot guess the format of this folder"
        raise DataError(f"the data path is empty ({path!r}); give a data file or folder")
    if not isinstance(path, (str, os.PathLike)):  # read_structures(None): pathlib's TypeError traceback
        raise DataError(f"expected the path of a data file or folder, got {path!r}")
    p = Path(path).expanduser()
    if p.exists():
        return p
    if fmt in ("md17", "rmd17") and p.suffix == "" and len(p.parts) == 1:
        from torchmdx.data.md17 import resolve_md17_name

        return resolve_md17_name(str(path), fmt)
    if fmt is None and p.suffix == "" and len(p.parts) == 1:
        # "ethanol: file not found" while an md17 file of that molecule was in the data folders
        from torchmdx.data.md17 import resolve_md17_name

        try:
            found = resolve_md17_name(str(path), "md17")
        except DataError:
            found = None
        if found is not None:
            raise DataError(f"{path}: file not found; as an MD17 molecule name it needs the format md17 (--format md17, "
                            f"or data.format: md17), which finds {found}")
    raise DataError(f"{path}: {missing_file_reason(p)}")  # a dangling link is named as one


def _head(path: Path, nbytes: int = 4096) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(nbytes)


def guess_format(path) -> str:
    """The format of ``path`` from its content (and name); :class:`DataError` if unknown."""
    if not isinstance(path, (str, os.PathLike)):
        raise DataError(f"expected the path of a data file or folder, got {path!r}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: {missing_file_reason(path)}")
    check_not_empty(path)
    if path.is_dir():
        xyz = sorted(path.glob("*.xyz"))
        if xyz:
            from torchmdx.data.qm9 import looks_like_qm9_xyz

            if looks_like_qm9_xyz(decode_text(_head(xyz[0]), errors="replace")):
                return "qm9"
        raise DataError(f"{path}: cannot guess the format of this folder (expected QM9 .xyz files); pass --format")
    head = _head(path)
    if head.startswith(b"PK"):  # zip -> npz
        from torchmdx.data.md17 import MD17_KEYS, RMD17_KEYS, load_npz

        keys = sorted(load_npz(path))
        if set(MD17_KEYS) <= set(keys):
            return "md17"
        if set(RMD17_KEYS) <= set(keys):
            return "rmd17"
        found = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
        raise DataError(
            f"{path}: npz without the MD17 keys ({', '.join(MD17_KEYS)}) or revised-MD17 keys "
            f"({', '.join(RMD17_KEYS)}); found: {found or 'none'}"
        )
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return _guess_h5(path)
    if head.startswith(b"SQLite format 3"):
        return _guess_db(path)
    if path.suffix in (".tar", ".tgz", ".gz", ".bz2", ".xz") and tarfile.is_tarfile(path):
        return "qm9"
    suffix = path.suffix
    packed = compression(path)
    if path.suffix.lower() in SUFFIX_COMPRESSIONS and (packed is None or packed[0] != SUFFIX_COMPRESSIONS[
            path.suffix.lower()]):
        # named .gz but plain text, or bzip2: was "cannot guess the format; pass --format" (an unnamed compressed
        # file is read by its content: a gzip'd MD17 xyz named .xyz)
        raise DataError(f"{path}: {compression_name_mismatch(path)}")
    if packed is not None:  # one compressed file: its content decides (a gzip'd MD17 xyz was read as ase)
        head = _compressed_head(path, packed)
        suffix = Path(path.stem).suffix
    if suffix in (".xyz", ".extxyz", "") or suffix.startswith(".xyz"):
        from torchmdx.data.qm9 import looks_like_qm9_xyz

        text = decode_text(head, errors="replace")  # by its byte-order mark: UTF-16 from PowerShell's '>'
        if looks_like_qm9_xyz(text):
            return "qm9"
        lines = text.splitlines()
        if len(lines) > 2 and _is_single_number(lines[1]) and _md17_like(lines[2]):
            return "md17-xyz"
    from ase.io.formats import filetype, ioformats

    try:
        ase_format = filetype(str(path), guess=True)
    except Exception:
        ase_format = None
    if ase_format in ioformats:
        return "ase"
    raise DataError(f"{path}: cannot guess the format; pass --format (one of {', '.join(FORMATS[:-1])})")


def _compressed_head(path: Path, packed: tuple) -> bytes:
    """The first 4 KiB of a compressed file's content; one line for a compressed npz, HDF5 file or
    database (their readers need the file itself: "not an npz file", h5py's "file signature not
    found", "Unknown database type: gz" before) and for zstd (no reader in Python's standard library)."""
    from torchmdx.io_utils import decompress_command, open_compressed

    name, command = packed
    if name == "zstd":
        raise DataError(f"{path}: is zstd-compressed; decompress it first ({decompress_command(path, command)})")
    try:
        with open_compressed(path) as handle:
            head = handle.read(4096)
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: is {name}-compressed but cannot be decompressed ({exc}): truncated or damaged") from None
    inner = {b"PK": "npz (zip) file", b"\x89HDF": "HDF5 file", b"SQLite format 3": "ASE database"}
    for magic, kind in inner.items():
        if head.startswith(magic):
            raise DataError(f"{path}: is a {name}-compressed {kind}, which torchmdx reads uncompressed; decompress it "
                            f"first ({decompress_command(path, command)})")
    return head


def _md17_like(line: str) -> bool:
    """An atom line of the MD17 xyz layout (symbol x y z fx fy fz), or one with forces and a column too
    many or few (5, 6 or 8+ columns, all numbers after the symbol): its reader says which line differs (an
    8-column file was guessed as an ASE file: "no energy 'energy' (info keys: -97000.1 ...)"). Four
    columns (a plain xyz with a number as its comment) stay ASE's."""
    cols = line.split()
    return len(cols) >= 5 and all(_is_single_number(c) for c in cols[1:])


def _is_single_number(line: str) -> bool:
    parts = line.split()
    if len(parts) != 1:
        return False
    try:
        float(parts[0])
        return True
    except ValueError:
        return False


def _guess_h5(path: Path) -> str:
    from torchmdx.data.ani import describe_keys, molecule_groups, open_h5

    with open_h5(path) as h5:
        if "torchmdx_cache_version" in h5.attrs:
            return "cache"
        if molecule_groups(h5, "species"):
            return "ani1"
        if molecule_groups(h5, "atomic_numbers"):
            return "ani1x"
        raise DataError(
            f"{path}: HDF5 file in neither the ANI-1 layout (coordinates, species, energies) nor the ANI-1x "
            f"layout (coordinates, atomic_numbers, <method>.energy); datasets found: {describe_keys(h5)}"
        )


def _guess_db(path: Path) -> str:
    from torchmdx.data.ase_format import connect_db

    db = connect_db(path)
    units = (db.metadata or {}).get("_property_unit_dict", {})
    if "energy_U0" in units:
        return "qm9"
    return "ase"


def read_structures(path, format: Optional[str] = None, **options) -> Structures:
    """Read a dataset into memory (eV, Å), guessing the format when not given.

    ``options`` are reader options (see the table above); those set to ``None`` are ignored, and
    one that does not apply to the format is an error.
    """
    fmt = check_format(format)
    source = resolve_source(path, fmt)
    check_not_empty(source)
    fmt = fmt or guess_format(source)
    opts = normalise_options(fmt, options, source)
    with unreadable_as_data_error(source, fmt):
        return _reader(fmt)(source, **opts)


def check_not_empty(source: Path) -> None:
    """One line for an empty file (whatever its name says it is)."""
    if source.is_file() and source.stat().st_size == 0:
        raise DataError(f"{source}: the file is empty")


@contextmanager
def unreadable_as_data_error(source: Path, fmt: str):
    """A reader's low-level failure on a damaged or mislabelled file (a truncated or corrupted
    zip/npz, bytes where text was expected, a file that ends early) as one line naming the file,
    the format it was read as and what went wrong."""
    import zipfile
    import zlib

    try:
        yield
    except DataError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise DataError(f"{source}: cannot be read as {fmt}: the file is truncated or damaged "
                        f"({type(exc).__name__}: {_first_line(exc)})") from None
    except UnicodeDecodeError:
        raise DataError(f"{source}: cannot be read as {fmt}: it holds binary data where text was expected "
                        "(wrong --format?)") from None
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{source}: cannot be read as {fmt} ({type(exc).__name__}: {_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no detail"


#: formats read in chunks by :func:`iter_structures` (others are read whole, then written as one chunk)
STREAMED_FORMATS = ("ani1", "ani1x", "ase")


def streamed(fmt: str, source: Path) -> bool:
    """Whether :func:`iter_structures` streams ``source`` read as ``fmt``: ANI-1 / ANI-1x files and every ASE
    file, an ASE database (``.db``) included (its rows fetched a page at a time:
    :func:`torchmdx.data.ase_format.db_rows`), and QM9's ASE database (the same pages, one pass)."""
    return fmt in STREAMED_FORMATS or (fmt == "qm9" and Path(source).suffix == ".db")


def iter_structures(path, format: Optional[str] = None, chunk_atoms: Optional[int] = None, spill_dir=None,
                    **options):
    """The dataset as validated :class:`Structures` chunks of about ``chunk_atoms`` atoms (eV, Å):
    ANI-1 / ANI-1x files are streamed group by group, ASE files (extxyz, .traj, an ASE database, ...) frame by
    frame in two passes over one parse (:mod:`torchmdx.data.ase_stream`: the frames kept in a temporary file in
    ``spill_dir``, default the system's temporary folder), QM9's ASE database row by row in one pass
    (:func:`torchmdx.data.qm9.iter_qm9_db`), so memory does not grow with the file; other formats (MD17 and
    QM9 npz / xyz files) come as one chunk (their readers hold the whole file). Messages of a chunk name
    the structure's index in the whole dataset (or the HDF5 group and conformation, the file's frame)."""
    fmt = check_format(format)
    source = resolve_source(path, fmt)
    fmt = fmt or guess_format(source)
    opts = normalise_options(fmt, options, source)
    size = {"chunk_atoms": chunk_atoms} if chunk_atoms else {}
    if fmt in ("ani1", "ani1x"):
        from torchmdx.data import ani

        reader = ani.iter_ani1 if fmt == "ani1" else ani.iter_ani1x
        yield from reader(source, **opts, **size)
    elif streamed(fmt, source):
        if fmt == "qm9":  # its ASE database
            from torchmdx.data.qm9 import iter_qm9_db as reader
        else:
            from torchmdx.data.ase_stream import iter_ase as reader

            size["spill_dir"] = spill_dir

        check_not_empty(source)
        with unreadable_as_data_error(source, fmt):
            yield from reader(source, **opts, **size)
    else:
        check_not_empty(source)
        with unreadable_as_data_error(source, fmt):
            chunk = _reader(fmt)(source, **opts)
        yield chunk


def normalise_options(fmt: str, options: dict, source=None) -> dict:
    opts = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(opts) - FORMAT_OPTIONS[fmt])
    if unknown:
        takes = ", ".join(sorted(FORMAT_OPTIONS[fmt])) or "no options"
        where = f"{source}: " if source is not None else ""
        raise DataError(f"{where}option {', '.join(unknown)} does not apply to format '{fmt}' (it takes: {takes})")
    return opts
