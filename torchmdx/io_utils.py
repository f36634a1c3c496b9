"""Small file helpers shared by every layer (no torch import here)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def names_a_folder(path, example: str):
    """For an output file name that ends in '/' (``Path`` drops it, and a file named after the
    folder was written): "ends in '/', so it names a folder; give a file name, e.g. PATHexample";
    else None. The caller names the option or file before it and raises its own error."""
    text = os.fspath(path)
    if text.endswith(("/", os.sep)):
        return f"ends in '/', so it names a folder; give a file name, e.g. {text}{example}"
    return None


def repeated_file(paths):
    """The first of ``paths`` that names a file named before it (the same name, ``./a.xyz``, or a link to it),
    in words: "a.xyz twice", or "b.xyz twice (a.xyz and b.xyz are the same file)"; None when each names a file
    of its own. Each path is resolved once. The caller says what reading a file twice would do."""
    paths = list(paths)
    seen: dict = {}
    for k, name in enumerate(paths):
        first = seen.setdefault(os.path.realpath(name), k)
        if first != k:
            earlier = paths[first]
            if str(earlier) == str(name):
                return f"{name} twice"
            return f"{name} twice ({earlier} and {name} are the same file)"
    return None


def expand_home(value):
    """``value`` with a leading ``~`` (or ``~user``) expanded as a shell would (:func:`os.path.expanduser`):
    a path in a YAML config, or given as ``--opt=~/x``, reaches the program unexpanded. Anything else
    (None, a path not starting with ``~``, a value that is not a path) is returned unchanged."""
    if isinstance(value, (str, os.PathLike)) and os.fspath(value).startswith("~"):
        expanded = os.path.expanduser(os.fspath(value))
        return Path(expanded) if isinstance(value, Path) else expanded
    return value


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file beside ``path``; on success rename it onto ``path``.

    A crash (or exception) inside the ``with`` block leaves no file at ``path`` and removes the
    temporary one, so readers never see a half-written file::

        with atomic_write("model.pt") as f:
            torch.save(obj, f)
    """
    with atomic_path(path, fsync=False) as tmp:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True):
    """:func:`atomic_write` for writers that open the file by name (h5py, matplotlib): yields a
    temporary path beside ``path``; when the block ends without an exception the file there is
    flushed to disk (``fsync``) and renamed onto ``path``, otherwise it is deleted::

        with atomic_path("cache.h5") as tmp:
            with h5py.File(tmp, "w") as h5:
                ...
    """
    tmp = temporary_path(path)
    path = Path(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def jsonable(value):
    """``value`` with numpy arrays and scalars (and tensors: anything with ``tolist``) turned into
    Python lists and numbers, dict keys into strings, recursively: ready for ``json.dump``."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def output_file_name(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` to write a file at, or a one-line ConfigError: an empty name, a name that ends in
    '/', or an existing folder, device, pipe or socket (see :func:`temporary_path`). For callers that keep a
    ``Path`` of an output before they write it (so that the check comes before the work)."""
    from torchmdx.errors import ConfigError

    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text:
        raise ConfigError("the path to write is empty (''); give the name of a file to write")
    if text.endswith(("/", os.sep)):
        raise ConfigError(f"{text}: ends in '/', so it names a folder; give the name of a file to write")
    path = Path(text)
    if path.exists() and not path.is_file():
        what = "a folder" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise ConfigError(f"{path}: is {what}; give the name of a file to write")
    # a file where a folder of the path should be: the writers' mkdir said "FileExistsError: [Errno 17] File
    # exists: 'afile'" (Potential.save('afile/m.pt'), save_split, Simulation.save_restart; round 33)
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"{path}: {blocker} is a file, not a folder, so nothing can be written under it; give "
                          "a path in a folder")
    return path


def temporary_path(path: str | os.PathLike) -> Path:
    """A temporary name beside ``path`` for writers that need a file name (h5py): write there,
    then ``os.replace(tmp, path)``; delete it on failure. A ``path`` that exists and is not a
    regular file (a folder, a device such as /dev/null, a pipe or a socket) is refused in one
    line: the rename would replace it (as root, even a device node). So is an empty name, or one that ends in
    '/' (``Path`` reads '' as the current folder, "'.: is a folder'", and drops the '/': ``save_restart('out/')``
    wrote a file named ``out``)."""
    path = output_file_name(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def unwritable_folder(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` cannot be written to (or made), or None: it is a file, or its nearest
    existing ancestor is not writable. For checks before any work starts."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return "is a file, not a folder"
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != folder and not existing.is_dir():
        return f"{existing} is a file, not a folder"  # the folder would have to be made under it
    if not os.access(existing, os.W_OK):
        return f"{existing} is not writable"
    return None


def missing_file_reason(path: str | os.PathLike, what: str = "file") -> str:
    """Why ``path`` is not a readable regular file, for a one-line error after ``Path.is_file()``
    said no: "<what> not found", "is a folder, not a <what>", "is a symbolic link that loops"
    (``is_file`` and ``exists`` say only False for a loop: it read as "not found") or "is a
    symbolic link to the missing PATH"."""
    path = Path(path)
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:  # Python < 3.13
            return "is a symbolic link that loops back on itself"
        except OSError as exc:
            if exc.errno == 40:  # ELOOP
                return "is a symbolic link that loops back on itself"
            return f"is a symbolic link to the missing {os.readlink(path)}"
    if path.is_dir():
        if what == "model file" and (path / "model.pt").is_file():  # a run folder (md --model runs/t)
            return f"is a folder, not a model file; its model file is {path / 'model.pt'}"
        return f"is a folder, not a {what}"
    if path.exists():
        return f"is not a regular {what} (a device, pipe or socket)"
    return f"{what} not found"


#: magic bytes of single-file compressors -> (name, the command that undoes it)
COMPRESSIONS = {b"\x1f\x8b": ("gzip", "gunzip"), b"BZh": ("bzip2", "bunzip2"), b"\xfd7zXZ\x00": ("xz", "unxz"),
                b"\x28\xb5\x2f\xfd": ("zstd", "unzstd")}


#: the name ending each decompressor takes (gunzip, bunzip2, unxz and unzstd refuse or rename other names)
COMMAND_SUFFIXES = {"gunzip": (".gz", ".tgz"), "bunzip2": (".bz2",), "unxz": (".xz",), "unzstd": (".zst",)}


def decompress_command(path: str | os.PathLike, command: str) -> str:
    """The shell command that decompresses ``path`` with ``command`` (``gunzip w.db.gz``). A name without the
    command's suffix gets ``command -c path > plain name``: ``gunzip w.db`` says "unknown suffix -- ignored", and
    the lines told to run it (round 33)."""
    path = Path(path)
    if path.name.lower().endswith(COMMAND_SUFFIXES.get(command, ())):
        return f"{command} {path}"
    plain = path.with_name(f"{path.stem}-decompressed{path.suffix}")
    return f"{command} -c {path} > {plain}"


def compression(path: str | os.PathLike) -> tuple[str, str] | None:
    """(name, command that decompresses it) when ``path`` is a gzip, bzip2, xz or zstd file; else None."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(6)
    except OSError:
        return None
    return next((kind for magic, kind in COMPRESSIONS.items() if head.startswith(magic)), None)


#: the names ASE opens through a decompressor (ase.io.formats.open_with_compression: by the name, not the content)
SUFFIX_COMPRESSIONS = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz"}
#: binary formats that are read uncompressed only (a compressed one is decompressed, not renamed)
BINARY_SUFFIXES = (".db", ".traj", ".h5", ".hdf5", ".npz", ".npy", ".pt", ".ckpt", ".nc")
_SUFFIX_OF = {kind: suffix for suffix, kind in SUFFIX_COMPRESSIONS.items()}


def compression_name_mismatch(path: str | os.PathLike) -> str | None:
    """Why ASE cannot read ``path`` when its name and its compression disagree (or it is a compressed binary
    format, ``w.db.gz``), in words; else None. ASE picks the decompressor by the name: a gzip file named
    ``w.extxyz`` was read as text ("'utf-8' codec can't decode byte 0x8b"), a plain file named ``w.extxyz.gz``
    was "Not a gzipped file" or "cannot guess the format" (round 27)."""
    from pathlib import Path

    path = Path(path)
    named = "gzip" if path.suffix.lower() == ".tgz" else SUFFIX_COMPRESSIONS.get(path.suffix.lower())
    kind = compression(path)
    actual = kind[0] if kind is not None else None
    inner = Path(path.stem).suffix.lower()
    if named is not None and named == actual and inner in BINARY_SUFFIXES:  # md w.db.gz: "Unknown database type: gz"
        return f"is a {actual}-compressed {inner} file, which is read uncompressed only; decompress it first " \
               f"({decompress_command(path.name, kind[1])})"
    if not path.is_file() or named == actual or (named is None and actual in (None, "zstd")):
        return None
    if named is None and path.suffix.lower() in BINARY_SUFFIXES:  # ASE reads these uncompressed only
        return (f"is {actual}-compressed, and {path.suffix} files are read uncompressed; decompress it first "
                f"({decompress_command(path.name, kind[1])})")
    if named is None:
        return (f"is {actual}-compressed, but its name does not end in {_SUFFIX_OF[actual]}, and ASE picks the "
                f"decompressor by the name (it read the compressed bytes as text): rename it "
                f"{path.name}{_SUFFIX_OF[actual]}, or decompress it ({decompress_command(path.name, kind[1])})")
    if actual is None:
        return (f"is named {path.suffix} but is not {named}-compressed (plain text?), and ASE picks the decompressor "
                f"by the name: rename it {path.stem} (without {path.suffix}), or compress it with {named}")
    other = f"rename it {path.stem}{_SUFFIX_OF[actual]}" if actual in _SUFFIX_OF \
        else f"decompress it ({decompress_command(path.name, kind[1])})"
    return (f"is named {path.suffix} but is {actual}-compressed, not {named}, and ASE picks the decompressor by the "
            f"name: {other}")


def open_compressed(path: str | os.PathLike, mode: str = "rb"):
    """``open(path, mode)``, through gzip, bz2 or lzma when the file is compressed with one of them
    (``mode`` 'rb' or 'rt'; zstd is reported, not read: Python's standard library has no reader)."""
    kind = compression(path)
    if kind is None or kind[0] == "zstd":
        return open(path, mode)
    import bz2
    import gzip
    import lzma

    return {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}[kind[0]](path, mode)


#: byte-order marks a text file may start with: (mark, the codec that reads the text and drops the mark, words).
#: UTF-16 is what Windows PowerShell 5's ``>`` and ``Out-File`` write; the UTF-32 marks come first (FF FE 00 00
#: starts with FF FE)
BYTE_ORDER_MARKS = (
    (b"\xff\xfe\x00\x00", "utf-32", "a UTF-32 byte-order mark (bytes FF FE 00 00): UTF-32 text"),
    (b"\x00\x00\xfe\xff", "utf-32", "a UTF-32 byte-order mark (bytes 00 00 FE FF): UTF-32 text"),
    (b"\xef\xbb\xbf", "utf-8-sig", "a UTF-8 byte-order mark (bytes EF BB BF)"),
    (b"\xff\xfe", "utf-16", "a UTF-16 byte-order mark (bytes FF FE): UTF-16 text"),
    (b"\xfe\xff", "utf-16", "a UTF-16 byte-order mark (bytes FE FF): UTF-16 text"),
)


def byte_order_mark(data: bytes):
    """The entry of :data:`BYTE_ORDER_MARKS` that ``data`` starts with, or None."""
    return next((m for m in BYTE_ORDER_MARKS if data.startswith(m[0])), None)


def decode_text(data: bytes, errors: str = "strict") -> str:
    """``data`` as text: by its byte-order mark (UTF-8, UTF-16 or UTF-32; the mark dropped), else UTF-8
    (a UnicodeDecodeError for other bytes unless ``errors``)."""
    mark = byte_order_mark(data)
    return data.decode(mark[1] if mark else "utf-8", errors)


def is_torch_file(path) -> bool:
    """A file ``torch.save`` wrote (a zip archive holding ``data.pkl``): a model, checkpoint or restart file."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name == "data.pkl" or name.endswith("/data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
