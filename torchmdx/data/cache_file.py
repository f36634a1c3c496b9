"""The cache file itself: its HDF5 layout, writing it, checking it against its checksums, reading it.

Which cache belongs to which source, and when it is rebuilt, is :mod:`torchmdx.data.cache`
(:func:`~torchmdx.data.cache.build_cache`); this module knows nothing of sources.

Layout (all in eV / Å; ``S`` structures, ``A`` atoms in total)::

    /z          [A]       uint8/int16 atomic numbers
    /pos        [A, 3]    float64 positions (Å)
    /forces     [A, 3]    float64 forces (eV/Å)           (only when the dataset has forces)
    /energy     [S]       float64 energies (eV)
    /offsets    [S+1]     int64 atom offsets: structure s is atoms offsets[s]:offsets[s+1]
    /cell       [S, 3, 3] float64 (Å)
    /pbc        [S, 3]    bool
    /group      [S]       int64 index into the group names             (only with group labels)
    /group_names [bytes]  uint8: the JSON list of group names (a dataset: millions of names do
                          not fit an HDF5 attribute)
    /extras/<name>       [S] or [S, k]  per-structure targets (QM9 properties, ...)
    /atom_extras/<name>  [A] or [A, k]  per-atom values
    attrs: torchmdx_cache_version, format, source, options (JSON), fingerprint (JSON),
           metadata (JSON), extra_units (JSON), statistics (JSON: element counts, force sums,
           atoms per structure; so that ``data info`` need not read the per-atom arrays),
           checksums (JSON: CRC-32 of every dataset's values and of the attributes above),
           complete (written last: a file without it is never taken for a cache)

Datasets are contiguous and uncompressed, so they can be read whole in one call or
memory-mapped (:class:`torchmdx.data.H5Dataset`).

**Writing.** :class:`CacheWriter` appends each chunk's arrays to flat spill files, then copies
them into the HDF5 file's contiguous datasets in blocks of :data:`COPY_BLOCK_BYTES`: memory
stays bounded by a chunk and a block, whatever the size of the dataset. The file is written to
``.<name>.tmp-<host>-<pid>`` (and its spill folder ``.<name>.tmp-<host>-<pid>.parts``) beside the
target (:func:`temporary_cache_path`) and renamed onto it (``os.replace``) only when complete;
any exception removes them, so no half-written cache can ever be found under the cache's name.

**Damaged caches.** HDF5 keeps no checksums of its data: a flipped byte in a dataset is read as a
wrong number. ``checksums`` holds a CRC-32 of every dataset (its values, read back from the
written file) and of the attributes; the first use of a cache in a process reads it once and
compares (:func:`damage`, about 0.7 s per GB on one core; remembered per file, size, mtime and inode).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Optional

import numpy as np

from torchmdx.data.structures import MAX_ATOMIC_NUMBER, Structures
from torchmdx.errors import DataError
from torchmdx.io_utils import jsonable

# 2: stress of ASE files as a 3 x 3 extra in eV/Å³; 3: streamed build, group names as a dataset,
# build statistics, the 'complete' attribute; 4: 'checksums' of the datasets and attributes, the
# source's 'edges' in the fingerprint; 5: the readers changed what they store (MD17-layout npz files'
# own e_unit / r_unit keys honoured, ANI-1x conformations with some NaN forces refused instead of
# dropped), so every older cache is rebuilt
CACHE_VERSION = 5
#: bytes per block when the spill files are copied into the HDF5 file
COPY_BLOCK_BYTES = 64 << 20


# ------------------------------------------------------------------------------------------------
# checksums
#: (path, inode, size, mtime_ns) of caches whose checksums matched in this process
_VERIFIED: set = set()


def _identity(path: Path) -> tuple:
    st = Path(path).stat()
    return (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


def _attrs_text(h5) -> bytes:
    return json.dumps({k: str(h5.attrs[k]) for k in sorted(h5.attrs) if k not in ("checksums", "complete")},
                      sort_keys=True).encode()


def checksums(h5) -> dict:
    """CRC-32 (hex) of the attributes (``/attrs``) and of every dataset's values, read in blocks of
    about :data:`COPY_BLOCK_BYTES` (what a reader gets back, whatever the HDF5 layout)."""
    import zlib

    import h5py

    names: list = []
    h5.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    out = {"/attrs": f"{zlib.crc32(_attrs_text(h5)):08x}"}
    for name in sorted(names):
        ds = h5[name]
        crc = zlib.crc32(repr((ds.dtype.str, ds.shape)).encode())
        row_bytes = max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64)))
        step = max(1, COPY_BLOCK_BYTES // row_bytes)
        for start in range(0, ds.shape[0] if ds.ndim else 1, step):
            block = ds[start:start + step] if ds.ndim else ds[()]
            crc = zlib.crc32(np.ascontiguousarray(block).view(np.uint8).reshape(-1), crc)
        out[name] = f"{crc:08x}"
    return out


def damage(path) -> str:
    """'' when the cache at ``path`` matches its ``checksums``, else how it is damaged, to follow
    "this cache is damaged": "(the values of dataset 'pos' do not match ...)" (the first dataset,
    or the attributes, whose values changed since they were written), "(it has no checksums)", or
    "and cannot be read (h5py's error)". A match is remembered per process for a file of unchanged
    identity (path, inode, size, mtime)."""
    import h5py

    path = Path(path)
    key = _identity(path)
    if key in _VERIFIED:
        return ""
    try:
        with h5py.File(path, "r") as h5:
            if "checksums" not in h5.attrs:
                return "(it has no checksums)"
            stored = json.loads(h5.attrs["checksums"])
            now = checksums(h5)
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
        return f"and cannot be read ({(str(exc) or type(exc).__name__).splitlines()[0]})"
    changed = [name for name in sorted(set(stored) | set(now)) if stored.get(name) != now.get(name)]
    if changed:
        what = "its attributes" if changed[0] == "/attrs" else f"the values of dataset '{changed[0]}'"
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        return f"({what}{more} do not match the checksum written with them: bytes overwritten on disk?)"
    _VERIFIED.add(key)
    return ""


# ------------------------------------------------------------------------------------------------
# temporary files
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"


def temporary_cache_path(path) -> Path:
    """``.<name>.tmp-<host>-<pid>`` beside ``path`` (its spill folder adds ``.parts``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{_host()}-{os.getpid()}")



def _remove(entry: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# ------------------------------------------------------------------------------------------------
# write
class ChunkSink:
    """Takes the chunks of a streamed read in order (:func:`torchmdx.data.formats.iter_structures`): checks that
    each has what the first had (forces, group labels, extras of the same shapes; a chunk that differs is a one-line
    :class:`DataError` naming the structure and its group), numbers the group names over all chunks (in order of
    first appearance), counts the build's statistics (element counts, force sums, atoms per structure) and hands
    each chunk to :meth:`_keep`: :class:`CacheWriter` writes it, :class:`torchmdx.data.summary_stream.
    SummaryCollector` keeps its per-structure arrays for ``data info``."""

    def __init__(self, source=None):
        self.source = str(Path(source).resolve()) if source is not None else None
        self.n_structures = self.n_atoms = 0
        self._group_index: dict[str, int] = {}
        self.group_names: list[str] = []
        self._layout: Optional[dict] = None
        self.metadata: dict = {}
        self.extra_units: dict = {}
        self._element_counts = np.zeros(MAX_ATOMIC_NUMBER + 1, dtype=np.int64)
        self._force_sq_sum, self._force_max = 0.0, 0.0
        self._atoms_min, self._atoms_max = None, 0

    def _where(self, chunk: Structures, k: int = 0) -> str:
        name = self.source or chunk.source
        group = ""
        if chunk.group is not None and len(chunk.group):
            group = f" (group {chunk.group_names[int(chunk.group[k])]})"
        return f"{name}: structure {self.n_structures + k}{group}"

    def _check_layout(self, chunk: Structures) -> None:
        layout = {
            "forces": chunk.forces is not None,
            "group": chunk.group is not None,
            "extras": {k: (np.asarray(v).dtype.str, np.asarray(v).shape[1:]) for k, v in chunk.extras.items()},
            "atom_extras": {k: (np.asarray(v).dtype.str, np.asarray(v).shape[1:]) for k, v in chunk.atom_extras.items()},
        }
        if self._layout is None:
            self._layout = layout
            return
        before = self._layout
        for key, what in (("forces", "forces"), ("group", "group labels")):
            if layout[key] != before[key]:
                have = "has" if layout[key] else "lacks"
                raise DataError(f"{self._where(chunk)}: {have} {what}, unlike the structures before it")
        for key in ("extras", "atom_extras"):
            if set(layout[key]) != set(before[key]):
                diff = ", ".join(sorted(set(layout[key]) ^ set(before[key])))
                raise DataError(f"{self._where(chunk)}: property {diff} present for some structures but not others")
            for name, (_, shape) in layout[key].items():
                if shape != before[key][name][1]:
                    raise DataError(f"{self._where(chunk)}: property '{name}' has shape {shape} per entry, "
                                    f"but {before[key][name][1]} before it (a chunk with inconsistent shapes)")

    def add(self, chunk: Structures) -> None:
        """Append a chunk (a validated :class:`Structures`; its structures follow those before)."""
        if chunk is None or len(chunk) == 0:
            return
        n, a = len(chunk), chunk.n_atoms
        counts = chunk.atoms_per_structure
        if chunk.pos.shape != (a, 3) or (chunk.forces is not None and chunk.forces.shape != (a, 3)) \
                or chunk.offsets.shape != (n + 1,) or np.any(counts <= 0):
            raise DataError(f"{self._where(chunk)}: a chunk with inconsistent shapes: {n} structures, "
                            f"{a} atoms, positions {chunk.pos.shape}, offsets {chunk.offsets.shape}")
        self._check_layout(chunk)
        z = np.asarray(chunk.z)
        if z.size and (z.min() < 0 or z.max() > MAX_ATOMIC_NUMBER):
            bad = int(np.flatnonzero((z < 0) | (z > MAX_ATOMIC_NUMBER))[0])
            k = int(np.searchsorted(chunk.offsets, bad, side="right") - 1)
            raise DataError(f"{self._where(chunk, k)}: invalid atomic number {int(z[bad])}")
        group = None
        if chunk.group is not None:
            used = np.unique(chunk.group)
            lookup = np.zeros(int(used.max()) + 1, dtype=np.int64)
            for g in used:
                name = str(chunk.group_names[int(g)])
                if name not in self._group_index:
                    self._group_index[name] = len(self.group_names)
                    self.group_names.append(name)
                lookup[g] = self._group_index[name]
            group = lookup[chunk.group]
        forces = None if chunk.forces is None else chunk.forces.astype(np.float64, copy=False)
        self._keep(chunk, z.astype(np.uint8), forces, counts.astype(np.int64), group)
        if forces is not None:
            self._force_sq_sum += float(np.sum(forces ** 2))
            self._force_max = max(self._force_max, float(np.sqrt((forces ** 2).sum(axis=1)).max(initial=0.0)))
        self._element_counts += np.bincount(z, minlength=self._element_counts.size)[: self._element_counts.size]
        self._atoms_min = int(counts.min()) if self._atoms_min is None else min(self._atoms_min, int(counts.min()))
        self._atoms_max = max(self._atoms_max, int(counts.max()))
        self.n_structures += n
        self.n_atoms += a
        self.metadata = chunk.metadata
        self.extra_units = chunk.extra_units

    def _keep(self, chunk: Structures, z: np.ndarray, forces: Optional[np.ndarray], counts: np.ndarray,
              group: Optional[np.ndarray]) -> None:
        """Keep a checked chunk: ``z`` as uint8, ``forces`` float64 (or None), ``counts`` its atoms per structure,
        ``group`` its group codes numbered over all chunks (or None)."""
        raise NotImplementedError

    def statistics(self) -> dict:
        components = 3 * self.n_atoms if self._layout is not None and self._layout["forces"] else 0
        return {
            "element_counts": {str(z): int(c) for z, c in enumerate(self._element_counts) if c},
            "atoms_min": self._atoms_min, "atoms_max": self._atoms_max,
            "force_sq_sum": self._force_sq_sum if components else None, "force_components": components,
            "force_max": self._force_max if components else None,
        }


class CacheWriter(ChunkSink):
    """Writes a cache chunk by chunk with bounded memory (module docstring: streamed build).

    ::

        with CacheWriter(path, fmt="ani1x", source=src, options=opts, fingerprint=fp) as w:
            for chunk in iter_structures(src, "ani1x"):
                w.add(chunk)
        # complete and renamed onto ``path`` here; on an exception nothing is left behind

    Every chunk must have what the first had (forces, group labels, extras of the same shapes);
    a chunk that differs is a one-line :class:`DataError` naming the structure (and its group).
    """

    def __init__(self, path, fmt: str = "", source=None, options=None, fingerprint=None):
        super().__init__(source)
        self.path = Path(path)
        self.fmt, self.options, self.fingerprint = fmt, options or {}, fingerprint or {}
        self.tmp = temporary_cache_path(self.path)
        self.parts = self.tmp.with_name(self.tmp.name + ".parts")
        self._spill: dict[str, tuple] = {}  # name -> (file, dtype, tail shape, kind 'S'|'A')

    # -- context --------------------------------------------------------------------------------
    def __enter__(self) -> "CacheWriter":
        folder = self.path.parent
        # the folders made here (deepest first): removed again, when empty, by a build that fails (round 38: a
        # refused read, "no energy 'nope'", left an empty data/cache behind in train, evaluate and data prepare)
        self._made = []
        for made in (folder, *folder.parents):
            if os.path.lexists(made):
                break
            self._made.append(made)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.parts.mkdir()
        except OSError as exc:
            blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
            if blocker is not None:
                raise DataError(f"cache folder {folder}: {blocker} is a file, not a folder (pass another "
                                "--cache-dir / data.cache_dir)") from None
            raise DataError(f"cache folder {folder}: cannot write there ({exc.strerror or exc}); pass another "
                            "--cache-dir / data.cache_dir") from None
        return self

    def __exit__(self, kind, value, tb) -> None:
        try:
            if kind is None:
                self.finish()
        finally:
            self._close_spill()
            _remove(self.parts)
            if kind is not None or self.tmp.exists():
                _remove(self.tmp)
            if kind is not None:
                for made in getattr(self, "_made", ()):
                    try:
                        made.rmdir()  # only when empty: another process's cache in it stays
                    except OSError:
                        break

    # -- chunks ---------------------------------------------------------------------------------
    def _keep(self, chunk, z, forces, counts, group) -> None:
        self._append("z", z, "A")
        self._append("pos", chunk.pos.astype(np.float64, copy=False), "A")
        if forces is not None:
            self._append("forces", forces, "A")
        self._append("energy", chunk.energy.astype(np.float64, copy=False), "S")
        self._append("counts", counts, "S")
        self._append("cell", np.asarray(chunk.cell, dtype=np.float64), "S")
        self._append("pbc", np.asarray(chunk.pbc, dtype=bool), "S")
        if group is not None:
            self._append("group", group, "S")
        for name, values in chunk.extras.items():
            self._append(f"extras/{name}", np.asarray(values), "S")
        for name, values in chunk.atom_extras.items():
            self._append(f"atom_extras/{name}", np.asarray(values), "A")

    def _append(self, name: str, array: np.ndarray, kind: str) -> None:
        if name not in self._spill:
            handle = open(self.parts / name.replace("/", "__"), "wb")
            self._spill[name] = (handle, array.dtype, array.shape[1:], kind)
        handle, dtype, _, _ = self._spill[name]
        np.ascontiguousarray(array, dtype=dtype).tofile(handle)

    def _close_spill(self) -> None:
        for handle, *_ in self._spill.values():
            handle.close()

    # -- the file -------------------------------------------------------------------------------
    def finish(self) -> Path:
        """Write the HDF5 file from the spill files and rename it onto the cache's name."""
        import h5py

        if self.n_structures == 0:
            raise DataError(f"{self.source or self.path}: contains no structures")
        self._close_spill()
        with h5py.File(self.tmp, "w") as h5:
            h5.attrs["torchmdx_cache_version"] = CACHE_VERSION
            h5.attrs["format"] = self.fmt
            source = self.source if self.source is not None else str(self.metadata.get("source", ""))
            # a file name that is not UTF-8 (bytes decoded by Python as surrogates) cannot be an HDF5
            # string: kept readable, its odd bytes written as \xNN
            h5.attrs["source"] = source.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            h5.attrs["options"] = json.dumps(self.options)
            h5.attrs["fingerprint"] = json.dumps(self.fingerprint)
            h5.attrs["metadata"] = json.dumps(jsonable({k: v for k, v in self.metadata.items()}))
            h5.attrs["extra_units"] = json.dumps(self.extra_units)
            h5.attrs["statistics"] = json.dumps(self.statistics())
            h5.create_dataset("group_names", data=np.frombuffer(json.dumps(self.group_names).encode(), dtype=np.uint8))
            for name, (_, dtype, tail, kind) in self._spill.items():
                rows = self.n_atoms if kind == "A" else self.n_structures
                if name == "counts":
                    self._copy_offsets(h5, rows)
                    continue
                self._copy(h5, name, dtype, tail, rows)
            h5.flush()
            h5.attrs["checksums"] = json.dumps(checksums(h5))  # of the values as written (read back)
            h5.attrs["complete"] = True  # last: only a finished file says it is complete
        with open(self.tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(self.tmp, self.path)
        _VERIFIED.add(_identity(self.path))
        return self.path

    def _blocks(self, name: str, dtype, tail, rows: int):
        row_bytes = int(np.dtype(dtype).itemsize * int(np.prod(tail, dtype=np.int64)))
        step = max(1, COPY_BLOCK_BYTES // max(row_bytes, 1))
        with open(self.parts / name.replace("/", "__"), "rb") as handle:
            for start in range(0, rows, step):
                count = min(step, rows - start)
                block = np.fromfile(handle, dtype=dtype, count=count * (row_bytes // np.dtype(dtype).itemsize))
                yield start, block.reshape((count,) + tuple(tail))

    def _copy(self, h5, name: str, dtype, tail, rows: int) -> None:
        ds = h5.create_dataset(name, shape=(rows,) + tuple(tail), dtype=dtype)
        for start, block in self._blocks(name, dtype, tail, rows):
            ds[start:start + len(block)] = block

    def _copy_offsets(self, h5, rows: int) -> None:
        ds = h5.create_dataset("offsets", shape=(rows + 1,), dtype=np.int64)
        ds[0] = 0
        total = 0
        for start, block in self._blocks("counts", np.int64, (), rows):
            ends = np.cumsum(block) + total
            ds[start + 1:start + 1 + len(block)] = ends
            total = int(ends[-1])


def write_cache(structures: Structures, path, fmt: str = "", source=None, options=None, fingerprint=None) -> Path:
    """Write ``structures`` to ``path`` atomically (temporary name, then rename)."""
    with CacheWriter(path, fmt=fmt, source=source, options=options, fingerprint=fingerprint) as writer:
        writer.add(structures)
        if source is None:
            writer.source = structures.source
    return Path(path)


def _group_names(h5) -> list:
    if "group_names" in h5:
        return json.loads(bytes(h5["group_names"][()]).decode())
    return json.loads(h5.attrs.get("group_names", "[]"))


@contextlib.contextmanager
def _damaged_cache_as_data_error(path: Path):
    """h5py's failures on a cache whose bytes were overwritten (a damaged link table or object
    header: RuntimeError, OSError, ...) as one line naming the cache and what to do."""
    try:
        yield
    except DataError:
        raise
    except (RuntimeError, OSError, KeyError, ValueError, UnicodeDecodeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: this cache is damaged and cannot be read ({detail}); delete it or build it again "
                        "(torchmdx data prepare --force)") from None


#: the first bytes of an HDF5 file (without a user block, as torchmdx writes its caches)
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def refuse_not_a_cache(path: Path) -> None:
    """A one-line DataError for a file given as format 'cache' that is no torchmdx cache at all
    (an npz, a database, an ANI HDF5 file): it was "this cache is damaged ...; delete it", advice
    to delete a source dataset. A cache that h5py cannot open is left to the damage messages."""
    import h5py

    try:
        with open(path, "rb") as handle:
            head = handle.read(len(HDF5_SIGNATURE))
    except OSError:
        return
    if head == HDF5_SIGNATURE:
        try:
            with h5py.File(path, "r") as h5:
                if "torchmdx_cache_version" in h5.attrs:
                    return
                what = "an HDF5 file without torchmdx's cache attributes"
        except (OSError, RuntimeError, KeyError, ValueError):
            return
    else:
        what = "not even an HDF5 file"
    raise DataError(f"{path}: read as format 'cache' but it is no torchmdx cache ({what}); a cache is the .h5 file "
                    "`torchmdx data prepare` writes: give the data file with its own format (or none: it is guessed)")


def _refuse_damaged(path: Path) -> None:
    """A one-line DataError for a cache that does not match its checksums (:func:`damage`)."""
    problem = damage(path)
    if problem:
        raise DataError(f"{path}: this cache is damaged {problem}; delete it or build it again from its source "
                        "(torchmdx data prepare SOURCE --force)")


def cache_info(path) -> dict:
    """The attributes of a cache: format, source, options, fingerprint, metadata, statistics, ...
    (a cache that does not match its checksums is a DataError: :func:`damage`)."""
    path = Path(path)
    with _damaged_cache_as_data_error(path):
        info = _cache_info(path)
    _refuse_damaged(path)
    return info


def _cache_info(path) -> dict:
    import h5py

    from torchmdx.data.ani import open_h5

    path = Path(path)
    with open_h5(path) as h5:
        if "torchmdx_cache_version" not in h5.attrs:
            raise DataError(f"{path}: not a torchmdx cache")
        if h5.attrs["torchmdx_cache_version"] != CACHE_VERSION or not h5.attrs.get("complete", False):
            why = "incomplete (its build was interrupted)" if h5.attrs["torchmdx_cache_version"] == CACHE_VERSION \
                else f"made by cache version {h5.attrs['torchmdx_cache_version']} (this is {CACHE_VERSION})"
            raise DataError(f"{path}: this cache is {why}; build it again (torchmdx data prepare --force)")
        out = {"version": int(h5.attrs["torchmdx_cache_version"]), "format": str(h5.attrs["format"]),
               "source": str(h5.attrs["source"])}
        for key in ("options", "fingerprint", "metadata", "extra_units", "statistics"):
            out[key] = json.loads(h5.attrs[key])
        out["group_names"] = _group_names(h5)
        out["n_structures"] = int(h5["energy"].shape[0])
        out["n_atoms"] = int(h5["z"].shape[0])
        out["has_forces"] = "forces" in h5
        out["extras"] = list(h5["extras"].keys()) if isinstance(h5.get("extras"), h5py.Group) else []
        out["atom_extras"] = list(h5["atom_extras"].keys()) if isinstance(h5.get("atom_extras"), h5py.Group) else []
    return out


def memory_map(h5, name: str, path: Path) -> np.ndarray:
    """Dataset ``name`` of an open cache as a read-only ``np.memmap`` (contiguous, uncompressed
    datasets), else read into memory."""
    ds = h5[name]
    offset = ds.id.get_offset()
    if offset is None or ds.chunks is not None or ds.compression is not None or ds.size == 0:
        return ds[()]
    return np.memmap(path, mode="r", dtype=ds.dtype, offset=offset, shape=ds.shape)


def read_cache(path, mmap: bool = False) -> Structures:
    """A whole cache as :class:`Structures`: read into memory (one read per array), or with
    ``mmap`` every array memory-mapped (nothing is read until used)."""
    from torchmdx.data.ani import open_h5

    path = Path(path)
    info = cache_info(path)
    with _damaged_cache_as_data_error(path), open_h5(path) as h5:
        def get(name):
            if name not in h5:
                return None
            return memory_map(h5, name, path) if mmap else h5[name][()]

        metadata = dict(info["metadata"])
        metadata.setdefault("format", info["format"])
        metadata["source"] = info["source"]
        metadata["cache"] = str(path)
        metadata["cache_statistics"] = info["statistics"]
        z = get("z")
        return Structures(
            z=z if mmap else z.astype(np.int64),
            pos=get("pos"),
            energy=get("energy"),
            offsets=get("offsets"),
            forces=get("forces"),
            cell=get("cell"),
            pbc=get("pbc"),
            group=get("group"),
            group_names=info["group_names"],
            extras={k: get(f"extras/{k}") for k in info["extras"]},
            atom_extras={k: get(f"atom_extras/{k}") for k in info["atom_extras"]},
            extra_units=info["extra_units"],
            metadata=metadata,
        )
