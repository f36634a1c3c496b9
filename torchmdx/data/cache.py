"""The one on-disk dataset format: an HDF5 cache built once from a raw file, then reused.

Layout (all in eV / Å; ``S`` structures, ``A`` atoms in total)::

    /z          [A]       uint8/int16 atomic numbers
    /pos        [A, 3]    float64 positions (Å)
    /forces     [A, 3]    float64 forces (eV/Å)           (only when the dataset has forces)
    /energy     [S]       float64 energies (eV)
    /offsets    [S+1]     int64 atom offsets: structure s is atoms offsets[s]:offsets[s+1]
    /cell       [S, 3, 3] float64 (Å)
    /pbc        [S, 3]    bool
    /group      [S]       int64 index into attrs['group_names']   (only with group labels)
    /extras/<name>       [S] or [S, k]  per-structure targets (QM9 properties, ...)
    /atom_extras/<name>  [A] or [A, k]  per-atom values
    attrs: torchmdx_cache_version, format, source, options (JSON), fingerprint (JSON),
           metadata (JSON), group_names (JSON), extra_units (JSON)

Datasets are contiguous and uncompressed, so they can be read whole in one call or
memory-mapped (:class:`torchmdx.data.H5Dataset`).

**When is it rebuilt?** The cache's file name is derived from the source's absolute path, the
format, the reader options and the cache version, so different options give different caches.
Inside, ``fingerprint`` records the source's size, modification time (ns) and a BLAKE2 hash of
its content (for a folder: of every file, in name order). :func:`build_cache` reuses the cache
when size and mtime are unchanged; when either changed, it hashes the content and reuses the
cache if the hash still matches (a ``touch`` does not trigger a rebuild); otherwise it rebuilds.

**Crash safety.** The cache is written to ``.<name>.tmp-<pid>`` beside the target and renamed
onto it (``os.replace``) only when complete; any exception removes the temporary file, so no
half-written cache can ever be found under the cache's name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np

from torchmdx.data.formats import check_format, guess_format, normalise_options, read_structures, resolve_source
from torchmdx.data.structures import Structures
from torchmdx.errors import DataError
from torchmdx.io_utils import atomic_path, jsonable

CACHE_VERSION = 2  # 2: stress of ASE files as a 3 x 3 extra in eV/Å³
DEFAULT_CACHE_DIR = "data/cache"


# ------------------------------------------------------------------------------------------------
# fingerprints
def _files(source: Path) -> list[Path]:
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.is_file())
    return [source]


def quick_fingerprint(source) -> dict:
    """Size (bytes) and modification time (ns) of a file, or summed/maximal over a folder."""
    source = Path(source)
    files = _files(source)
    stats = [p.stat() for p in files]
    return {
        "size": int(sum(s.st_size for s in stats)),
        "mtime_ns": int(max([s.st_mtime_ns for s in stats] + [source.stat().st_mtime_ns])),
        "n_files": len(files),
    }


def content_hash(source) -> str:
    """BLAKE2b of the content (a folder: of each file's relative name and content, in order)."""
    source = Path(source)
    digest = hashlib.blake2b(digest_size=20)
    for p in _files(source):
        if source.is_dir():
            digest.update(str(p.relative_to(source)).encode() + b"\0")
        with open(p, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def fingerprint(source) -> dict:
    return {**quick_fingerprint(source), "hash": content_hash(source)}


# ------------------------------------------------------------------------------------------------
# names and validity
def cache_key(source: Path, fmt: str, options: dict) -> str:
    payload = json.dumps(
        {"version": CACHE_VERSION, "source": str(Path(source).resolve()), "format": fmt,
         "options": {k: options[k] for k in sorted(options)}},
        sort_keys=True,
    )
    return hashlib.blake2b(payload.encode(), digest_size=8).hexdigest()


def cache_path(source, format: Optional[str] = None, cache_dir=DEFAULT_CACHE_DIR, **options) -> Path:
    """Where the cache of ``source`` read with ``format`` and ``options`` lives."""
    fmt = check_format(format)
    src = resolve_source(source, fmt)
    fmt = fmt or guess_format(src)
    opts = normalise_options(fmt, options, src)
    return Path(cache_dir) / f"{src.name}.{fmt}.{cache_key(src, fmt, opts)}.h5"


def _read_attrs(path: Path) -> Optional[dict]:
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            if h5.attrs.get("torchmdx_cache_version") != CACHE_VERSION:
                return None
            return {"fingerprint": json.loads(h5.attrs["fingerprint"])}
    except (OSError, KeyError, ValueError):
        return None


def is_current(cache: Path, source: Path) -> bool:
    """True when ``cache`` exists, has this version, and was built from the current ``source``."""
    attrs = _read_attrs(cache) if cache.is_file() else None
    if attrs is None:
        return False
    stored = attrs["fingerprint"]
    quick = quick_fingerprint(source)
    if all(stored.get(k) == v for k, v in quick.items()):
        return True
    if stored.get("size") != quick["size"]:
        return False
    return stored.get("hash") == content_hash(source)


def find_cache(source, format: Optional[str] = None, cache_dir=DEFAULT_CACHE_DIR, **options) -> Optional[Path]:
    """The path of a current cache of ``source``, or None (nothing is written)."""
    path = cache_path(source, format, cache_dir, **options)
    fmt = check_format(format)
    src = resolve_source(source, fmt)
    return path if is_current(path, src) else None


# ------------------------------------------------------------------------------------------------
# build / write / read
def build_cache(source, format: Optional[str] = None, cache_dir=DEFAULT_CACHE_DIR, force: bool = False,
                **options) -> Path:
    """Path of an up-to-date HDF5 cache of ``source``, building it if needed (see module doc).

    ``source`` may itself be a torchmdx cache, which is returned as it is.
    """
    fmt = check_format(format)
    src = resolve_source(source, fmt)
    fmt = fmt or guess_format(src)
    if fmt == "cache":
        normalise_options(fmt, options, src)
        return src
    opts = normalise_options(fmt, options, src)
    path = Path(cache_dir) / f"{src.name}.{fmt}.{cache_key(src, fmt, opts)}.h5"
    if not force and is_current(path, src):
        return path
    before = fingerprint(src)
    structures = read_structures(src, fmt, **opts)
    after = quick_fingerprint(src)
    if any(before[k] != after[k] for k in after):
        raise DataError(f"{src}: changed while it was being read; try again")
    write_cache(structures, path, fmt=fmt, source=src, options=opts, fingerprint=before)
    return path


def _write_dataset(h5, name: str, array: np.ndarray) -> None:
    """One dataset, contiguous and uncompressed (memory-mappable)."""
    h5.create_dataset(name, data=np.ascontiguousarray(array))


def _z_dtype(z: np.ndarray):
    return np.uint8 if z.max(initial=0) < 256 else np.int16


def write_cache(structures: Structures, path, fmt: str = "", source=None, options=None, fingerprint=None) -> Path:
    """Write ``structures`` to ``path`` atomically (temporary name, then rename)."""
    import h5py

    path = Path(path)
    s = structures
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.attrs["torchmdx_cache_version"] = CACHE_VERSION
            h5.attrs["format"] = fmt
            h5.attrs["source"] = str(Path(source).resolve()) if source is not None else s.source
            h5.attrs["options"] = json.dumps(options or {})
            h5.attrs["fingerprint"] = json.dumps(fingerprint or {})
            h5.attrs["metadata"] = json.dumps(jsonable(s.metadata))
            h5.attrs["group_names"] = json.dumps(list(s.group_names))
            h5.attrs["extra_units"] = json.dumps(s.extra_units)
            _write_dataset(h5, "z", s.z.astype(_z_dtype(s.z)))
            _write_dataset(h5, "pos", s.pos.astype(np.float64))
            _write_dataset(h5, "energy", s.energy.astype(np.float64))
            _write_dataset(h5, "offsets", s.offsets.astype(np.int64))
            _write_dataset(h5, "cell", s.cell.astype(np.float64))
            _write_dataset(h5, "pbc", s.pbc.astype(bool))
            if s.forces is not None:
                _write_dataset(h5, "forces", s.forces.astype(np.float64))
            if s.group is not None:
                _write_dataset(h5, "group", s.group.astype(np.int64))
            for name, arr in s.extras.items():
                _write_dataset(h5, f"extras/{name}", arr)
            for name, arr in s.atom_extras.items():
                _write_dataset(h5, f"atom_extras/{name}", arr)
    return path


def cache_info(path) -> dict:
    """The attributes of a cache: format, source, options, fingerprint, metadata, ..."""
    import h5py

    from torchmdx.data.ani import open_h5

    path = Path(path)
    with open_h5(path) as h5:
        if "torchmdx_cache_version" not in h5.attrs:
            raise DataError(f"{path}: not a torchmdx cache")
        out = {"version": int(h5.attrs["torchmdx_cache_version"]), "format": str(h5.attrs["format"]),
               "source": str(h5.attrs["source"])}
        for key in ("options", "fingerprint", "metadata", "group_names", "extra_units"):
            out[key] = json.loads(h5.attrs[key])
        out["n_structures"] = int(h5["energy"].shape[0])
        out["n_atoms"] = int(h5["z"].shape[0])
        out["has_forces"] = "forces" in h5
        out["extras"] = list(h5["extras"].keys()) if isinstance(h5.get("extras"), h5py.Group) else []
        out["atom_extras"] = list(h5["atom_extras"].keys()) if isinstance(h5.get("atom_extras"), h5py.Group) else []
    return out


def read_cache(path) -> Structures:
    """Load a whole cache into memory as :class:`Structures` (one read per array)."""
    from torchmdx.data.ani import open_h5

    path = Path(path)
    info = cache_info(path)
    with open_h5(path) as h5:
        def get(name):
            return h5[name][()] if name in h5 else None

        metadata = dict(info["metadata"])
        metadata.setdefault("format", info["format"])
        metadata["source"] = info["source"]
        metadata["cache"] = str(path)
        return Structures(
            z=get("z").astype(np.int64),
            pos=get("pos"),
            energy=get("energy"),
            offsets=get("offsets"),
            forces=get("forces"),
            cell=get("cell"),
            pbc=get("pbc"),
            group=get("group"),
            group_names=info["group_names"],
            extras={k: h5[f"extras/{k}"][()] for k in info["extras"]},
            atom_extras={k: h5[f"atom_extras/{k}"][()] for k in info["atom_extras"]},
            extra_units=info["extra_units"],
            metadata=metadata,
        )
