"""The cache of a source: where it lives, whether it is current, building it when it is not.

The cache file itself (its HDF5 layout, :class:`~torchmdx.data.cache_file.CacheWriter`, the
checksums, reading it back) is :mod:`torchmdx.data.cache_file`; its public names are
re-exported here.

**Streamed build.** :func:`build_cache` reads the source in chunks
(:func:`torchmdx.data.formats.iter_structures`: ANI-1 / ANI-1x group by group, ASE files (ASE
databases included) frame by frame in two passes over one parse, the frames kept between them in an
unnamed temporary file in the cache's folder; other formats in one piece) and hands each chunk to :class:`~torchmdx.data.cache_file.CacheWriter`, whose memory
stays bounded by a chunk and a copy block, whatever the size of the dataset.

**When is it rebuilt?** The cache's file name is derived from the source's absolute path, the
format, the reader options and the cache version, so different options give different caches.
Inside, ``fingerprint`` records the source's size, modification time (ns), status-change time
(``ctime_ns``), a BLAKE2 hash of its first and last MiB (``edges``) and a BLAKE2 hash of its whole
content (for a folder: of every file, in name order). :func:`build_cache` reuses the cache when size,
mtime, ctime and edges are unchanged; when one changed, it hashes the content and reuses the cache if
the hash still matches (a ``touch`` or ``chmod`` does not trigger a rebuild); the source's new quick
fingerprint is then kept beside the cache (``.<cache name>.seen``, :func:`seen_path`, written under a temporary
name and renamed), so that the next use is quick again; otherwise it rebuilds, saying why. The ctime is what no copy
tool sets back: a source rewritten in its middle with the same size and ``os.utime``'s (``cp -p``'s,
``rsync -t``'s) old modification time kept its edges and was trusted (caches written before the ctime
was recorded are compared without it).

**Damaged caches.** :func:`cache_status` compares a cache with its checksums
(:func:`~torchmdx.data.cache_file.damage`, once per process and file). :func:`build_cache`
rebuilds a cache that does not match, with a line naming the dataset; a cache given directly as
the data source cannot be rebuilt and is refused in one line.

**Crash safety.** The cache is written under a temporary name beside the target and renamed onto
it only when complete (:mod:`torchmdx.data.cache_file`). A build killed outright (SIGKILL, power
loss) leaves its temporary files; the next :func:`build_cache` on that host finds them (their
process is gone), removes them and says that it rebuilds. A file under the cache's name that is
damaged, truncated or lacks the ``complete`` attribute is rebuilt, with a line saying why.

**Old caches stay until asked.** A new cache version (or new reader options) gives a new file
name, and nothing is deleted without being asked: when :func:`build_cache` writes a cache and
caches of the same source made by another cache version remain beside it, it says so in one line
(:func:`older_caches`); ``torchmdx data clean`` removes them (:func:`removable_cache_files`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional

from torchmdx.data.cache_file import (
    CACHE_VERSION,
    COPY_BLOCK_BYTES,
    CacheWriter,
    _host,
    _refuse_damaged,
    _remove,
    cache_info,
    checksums,
    damage,
    memory_map,
    read_cache,
    refuse_not_a_cache,
    temporary_cache_path,
    write_cache,
)
from torchmdx.data.formats import check_format, guess_format, iter_structures, normalise_options, resolve_source
from torchmdx.errors import ConfigError, DataError

__all__ = [
    # this module
    "EDGE_BYTES", "DEFAULT_CACHE_DIR", "quick_fingerprint", "content_hash", "fingerprint", "cache_key",
    "cache_path", "cache_status", "is_current", "find_cache", "interrupted_builds", "build_cache",
    "older_caches", "removable_cache_files", "size_of", "seen_path",
    # re-exported from torchmdx.data.cache_file (imported from here by other modules, tests, bench scripts)
    "CACHE_VERSION", "COPY_BLOCK_BYTES", "CacheWriter", "write_cache", "read_cache", "cache_info", "memory_map",
    "checksums", "damage", "temporary_cache_path",
]

def cache_folder(cache_dir, caller: str) -> Path:
    """``cache_dir`` as a Path, or a one-line ConfigError for an empty (or blank) name or None: ``Path('')`` is the
    working folder, so ``build_cache(source, cache_dir='')`` wrote the cache there (round 33's leftover; the config
    and the command line refuse an empty cache folder)."""
    if cache_dir is None or not str(os.fspath(cache_dir)).strip():
        raise ConfigError(f"{caller}: cache_dir is empty ({cache_dir!r}); give a folder, or leave it out for "
                          f"{DEFAULT_CACHE_DIR}")
    return Path(cache_dir)


#: bytes hashed at each end of a source file for the quick fingerprint
EDGE_BYTES = 1 << 20
DEFAULT_CACHE_DIR = "data/cache"


# ------------------------------------------------------------------------------------------------
# fingerprints
def _files(source: Path) -> list[Path]:
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.is_file())
    return [source]


def quick_fingerprint(source) -> dict:
    """Size (bytes) and modification time (ns) of a file, or summed/maximal over a folder, and
    ``edges``: a BLAKE2 hash of the first and last :data:`EDGE_BYTES` of each file (an edit
    that kept the size and the modification time, e.g. a copy with ``cp -p`` or ``rsync -t``,
    still changes the header or the tail of most formats)."""
    source = Path(source)
    files = _files(source)
    stats = [p.stat() for p in files]
    edges = hashlib.blake2b(digest_size=16)
    for p, st in zip(files, stats):
        with open(p, "rb") as handle:
            edges.update(handle.read(EDGE_BYTES))
            if st.st_size > EDGE_BYTES:
                handle.seek(max(EDGE_BYTES, st.st_size - EDGE_BYTES))
                edges.update(handle.read(EDGE_BYTES))
    return {
        "size": int(sum(s.st_size for s in stats)),
        "mtime_ns": int(max([s.st_mtime_ns for s in stats] + [source.stat().st_mtime_ns])),
        # set by every write, rename or utime and by nothing that copies a file: a rewrite that kept the size, the
        # edges and (os.utime, cp -p, rsync -t) the modification time still changes it
        "ctime_ns": int(max([s.st_ctime_ns for s in stats] + [source.stat().st_ctime_ns])),
        "n_files": len(files),
        "edges": edges.hexdigest(),
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
    content = {"version": CACHE_VERSION, "source": str(Path(source).resolve()), "format": fmt,
               "options": {k: options[k] for k in sorted(options)}}
    if "virial" in str(options.get("stress_key") or "").lower():
        # read as a virial since round 12 (was taken for a stress): caches built before are not reused
        content["stress_key_is_virial"] = True
    if fmt == "ase" and Path(source).suffix == ".db":
        from torchmdx.data.unit_keys import db_declared_units

        declared = db_declared_units(source)
        if declared:  # read in these units since round 14 (were ignored: eV assumed): caches built before are not reused
            content["db_units"] = declared
    payload = json.dumps(content, sort_keys=True)
    return hashlib.blake2b(payload.encode(), digest_size=8).hexdigest()


def cache_path(source, format: Optional[str] = None, cache_dir=DEFAULT_CACHE_DIR, **options) -> Path:
    """Where the cache of ``source`` read with ``format`` and ``options`` lives."""
    fmt = check_format(format)
    src = resolve_source(source, fmt)
    fmt = fmt or guess_format(src)
    opts = normalise_options(fmt, options, src)
    return cache_folder(cache_dir, "cache_path") / f"{src.name}.{fmt}.{cache_key(src, fmt, opts)}.h5"


def cache_status(cache: Path, source: Path) -> tuple[bool, str]:
    """(current?, why not) of ``cache`` for ``source``: current when it exists, is complete, has
    this version and was built from the current ``source`` (module docstring)."""
    import h5py

    cache = Path(cache)
    if not cache.is_file():
        return False, ""
    try:
        with h5py.File(cache, "r") as h5:
            version = h5.attrs.get("torchmdx_cache_version")
            if version != CACHE_VERSION:
                return False, f"it was made by cache version {version} (this is version {CACHE_VERSION})"
            if not h5.attrs.get("complete", False):
                return False, "it is incomplete (its build was interrupted)"
            stored = json.loads(h5.attrs["fingerprint"])
    except (OSError, KeyError, ValueError) as exc:
        return False, f"it is damaged or incomplete ({str(exc).splitlines()[0]})"
    problem = damage(cache)
    if problem:
        return False, f"it is damaged {problem}"
    quick = quick_fingerprint(source)
    if all(stored.get(k) == v for k, v in quick.items() if k != "ctime_ns" or "ctime_ns" in stored):
        return True, ""  # (a cache written before the ctime was recorded is compared without it)
    if stored.get("size") != quick["size"] or not stored.get("hash"):
        return False, "the source changed"
    if _seen(cache) == {**quick, "hash": stored["hash"]}:
        return True, ""  # hashed after a touch or chmod by an earlier use: the same content
    if stored["hash"] != content_hash(source):
        return False, "the source changed"
    if quick_fingerprint(source) == quick:  # not changed while it was hashed
        _remember_seen(cache, {**quick, "hash": stored["hash"]})
    return True, ""


def seen_path(cache) -> Path:
    """``.<cache name>.seen`` beside ``cache``: the source's quick fingerprint when its content was last found to
    match the cache's (after a ``touch`` or ``chmod``), so that later uses need not hash the whole source again.
    The cache file's own fingerprint stays as built (its attributes are under its checksums)."""
    cache = Path(cache)
    return cache.with_name(f".{cache.name}.seen")


def _seen(cache) -> Optional[dict]:
    try:
        seen = json.loads(seen_path(cache).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return seen if isinstance(seen, dict) else None


def _remember_seen(cache, seen: dict) -> None:
    """Write :func:`seen_path` under a temporary name and rename it (two processes at once: each renames a whole
    file of the same content); a cache folder that cannot be written is left as it is (the source is hashed at
    each use, as before)."""
    from torchmdx.io_utils import atomic_write

    try:
        with atomic_write(seen_path(cache), "w") as handle:
            json.dump(seen, handle, sort_keys=True)
    except (OSError, ConfigError):  # (ConfigError: something that is not a file under that name)
        pass


def is_current(cache: Path, source: Path) -> bool:
    """True when ``cache`` exists, is complete, has this version, and was built from the current ``source``."""
    return cache_status(cache, source)[0]


def find_cache(source, format: Optional[str] = None, cache_dir=DEFAULT_CACHE_DIR, **options) -> Optional[Path]:
    """The path of a current cache of ``source``, or None (nothing is written)."""
    cache_folder(cache_dir, "find_cache")
    path = cache_path(source, format, cache_dir, **options)
    fmt = check_format(format)
    src = resolve_source(source, fmt)
    return path if is_current(path, src) else None


# ------------------------------------------------------------------------------------------------
# interrupted builds
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


#: a cache's file name (:func:`cache_path`): <source name>.<format>.<16 hex digits>.h5
_CACHE_NAME = re.compile(r"^.+\.[a-z0-9-]+\.[0-9a-f]{16}\.h5$")
#: :func:`seen_path` of a cache
_SEEN_NAME = re.compile(r"^\.(?P<cache>.+\.h5)\.seen$")
#: a build's temporary file or spill folder (:func:`~torchmdx.data.cache_file.temporary_cache_path`)
_TEMPORARY_NAME = re.compile(r"^\.(?P<cache>.+\.[a-z0-9-]+\.[0-9a-f]{16}\.h5)\.tmp-(?P<host>.*)-(?P<pid>\d+)(\.parts)?$")


def _interrupted_cache(entry: Path) -> Optional[str]:
    """The cache name whose build left ``entry`` (a temporary file or spill folder) when that build
    ran on this host and its process is gone; None otherwise (not a temporary name, a live
    build, or another host's build: not ours to judge)."""
    match = _TEMPORARY_NAME.match(entry.name)
    if match is None or match.group("host") not in ("", _host()) or _alive(int(match.group("pid"))):
        return None
    return match.group("cache")


def interrupted_builds(path) -> list[Path]:
    """Temporary files of builds of ``path`` on this host whose process is gone (killed part-way)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(entry for entry in path.parent.iterdir() if _interrupted_cache(entry) == path.name)


def _note(line: str) -> None:
    print(f"note: {line}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# build / write / read
def build_cache(source, format: Optional[str] = None, cache_dir=DEFAULT_CACHE_DIR, force: bool = False,
                chunk_atoms: Optional[int] = None, say: Callable[[str], None] = _note, **options) -> Path:
    """Path of an up-to-date HDF5 cache of ``source``, building it if needed (see module doc).

    ``source`` may itself be a torchmdx cache, which is returned as it is. The build streams the
    source in chunks of about ``chunk_atoms`` atoms (bounded memory). ``say`` gets one line when
    an existing file is rebuilt and why (an interrupted build, a changed source, ...).
    """
    folder = cache_folder(cache_dir, "build_cache")
    fmt = check_format(format)
    src = resolve_source(source, fmt)
    fmt = fmt or guess_format(src)
    if fmt == "cache":
        normalise_options(fmt, options, src)
        refuse_not_a_cache(src)
        _refuse_damaged(src)
        return src
    opts = normalise_options(fmt, options, src)
    path = folder / f"{src.name}.{fmt}.{cache_key(src, fmt, opts)}.h5"
    current, reason = cache_status(path, src)
    if current and not force:
        return path
    leftovers = interrupted_builds(path)
    for entry in leftovers:
        _remove(entry)
    if leftovers:
        say(f"an earlier build of {path} was interrupted (removed {', '.join(p.name for p in leftovers)}); rebuilding it")
    elif reason:
        say(f"rebuilding {path}: {reason}")
    older = older_caches(path, src, fmt)
    if older:
        say(f"{len(older)} older cache file(s) of {src} remain in {path.parent} "
            f"({sum(size_of(p) for p in older) / 1e9:.1f} GB); `torchmdx data clean {path.parent}` removes them")
    if fmt == "md17-xyz" and format is None and not opts.get("energy_unit"):
        # a plain xyz whose comment lines hold one number each: MD17's layout, but also anyone's
        # energies in eV; said once, when the cache is built (round 12's leftover)
        say(f"{src}: read as MD17 plain xyz (its comment lines hold one number each): energies in kcal/mol, "
            "forces in kcal/mol/Å; if the file holds eV, set data.energy_unit: eV (--energy-unit eV)")
    before = fingerprint(src)
    with CacheWriter(path, fmt=fmt, source=src, options=opts, fingerprint=before) as writer:
        # an ASE file's frames are kept between its two passes in an unnamed temporary file beside the cache
        for chunk in iter_structures(src, fmt, chunk_atoms=chunk_atoms, spill_dir=path.parent, **opts):
            writer.add(chunk)
        after = quick_fingerprint(src)
        if any(before[k] != after[k] for k in after):
            raise DataError(f"{src}: changed while it was being read; try again")
    _remove(seen_path(path))  # of the cache replaced (a stale one would not match the new hash anyway)
    return path


# ------------------------------------------------------------------------------------------------
# old, damaged and orphaned cache files (``torchmdx data clean``)
def size_of(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return path.lstat().st_size


def _cache_attrs(path: Path) -> Optional[dict]:
    """The marker attributes of a cache file (version, source, complete), None when it is not a
    torchmdx cache (no marker), or ``{"unreadable": why}`` when HDF5 cannot open it."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            if "torchmdx_cache_version" not in h5.attrs:
                return None
            return {"version": h5.attrs["torchmdx_cache_version"], "source": str(h5.attrs.get("source", "")),
                    "complete": bool(h5.attrs.get("complete", False))}
    except Exception as exc:  # a damaged file: h5py raises OSError, RuntimeError, KeyError, ...
        return {"unreadable": (str(exc).splitlines() or [type(exc).__name__])[0]}


def older_caches(path, source, fmt: str) -> list[Path]:
    """Caches of ``source`` beside ``path`` (``<source name>.<fmt>.*.h5``) made by another cache
    version: only their attributes are read."""
    path, source = Path(path), str(Path(source).resolve())
    if not path.parent.is_dir():
        return []
    prefix = f"{Path(source).name}.{fmt}."
    found = []
    for entry in sorted(path.parent.iterdir()):
        if entry == path or not entry.name.startswith(prefix) or not _CACHE_NAME.match(entry.name) \
                or entry.is_symlink() or not entry.is_file():
            continue
        attrs = _cache_attrs(entry)
        if attrs and "version" in attrs and attrs["version"] != CACHE_VERSION and attrs["source"] == source:
            found.append(entry)
    return found


def removable_cache_files(cache_dir) -> list[tuple[Path, str]]:
    """(path, why) of each file in ``cache_dir`` that ``torchmdx data clean`` removes: caches made
    by another cache version, caches that are damaged (unreadable, incomplete, not matching their
    checksums) or whose source no longer exists, and the temporary files of interrupted builds on
    this host (their process is gone). A file without the cache marker is never listed; one that
    HDF5 cannot open at all is listed only under a cache's own name (``<name>.<format>.<hash>.h5``).
    A temporary file of a live build, or of another host's build, is left alone."""
    found, seen = [], []
    for entry in sorted(Path(cache_dir).iterdir()):
        if entry.is_symlink():
            continue
        if _SEEN_NAME.match(entry.name):
            seen.append(entry)
            continue
        if _TEMPORARY_NAME.match(entry.name):
            if _interrupted_cache(entry) is not None:
                found.append((entry, "left by an interrupted build"))
            continue
        if not entry.is_file() or entry.suffix != ".h5":
            continue
        attrs = _cache_attrs(entry)
        if attrs is None:
            continue
        if "unreadable" in attrs:
            if _CACHE_NAME.match(entry.name):
                found.append((entry, f"damaged: not a readable HDF5 file ({attrs['unreadable']})"))
            continue
        if attrs["version"] != CACHE_VERSION:
            found.append((entry, f"made by cache version {attrs['version']} (this is version {CACHE_VERSION})"))
        elif not attrs["complete"]:
            found.append((entry, "damaged: incomplete (no 'complete' attribute)"))
        elif attrs["source"] and not Path(attrs["source"]).exists():
            found.append((entry, f"its source {attrs['source']} no longer exists"))
        else:
            problem = damage(entry)
            if problem:
                found.append((entry, f"damaged {problem}"))
    removed = {path.name for path, _ in found}
    for entry in seen:  # a cache's .seen file goes with it
        cache = _SEEN_NAME.match(entry.name).group("cache")
        if cache in removed or not (entry.parent / cache).is_file():
            found.append((entry, f"the source fingerprint of {cache}, which is removed or gone"))
    return found
