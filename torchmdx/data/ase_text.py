"""Text-level checks of the structure files ASE reads (used by :mod:`torchmdx.data.ase_format`): an extxyz
comment line that gives a key twice (ASE keeps the last value, silently), a species column of atomic
numbers (ASE's KeyError '8') or of atom labels ('C1'), PDB atoms without an element symbol (ASE takes one from
the atom name: an alpha carbon 'CA' as calcium), and text files that start with a byte-order mark
(:func:`open_ase_source`: read without the mark, decoded as ASE reads them)."""

from __future__ import annotations

import io
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from torchmdx.data.xyz_counts import long_atom_count  # moved there in round 36
from torchmdx.errors import DataError


def number_as_symbol(text: str) -> str:
    """The line for an xyz/extxyz species column holding ``text``, an atomic number ('8'), where ASE reads
    element symbols (its KeyError '8' said nothing)."""
    from ase.data import chemical_symbols

    z = int(text)
    example = f" ({z} is {chemical_symbols[z]})" if 0 < z < len(chemical_symbols) else ""
    return (f"the species column holds {text!r}, a number where ASE reads an element symbol{example}; write "
            "element symbols in that column")


def number_key(exc: BaseException) -> Optional[str]:
    """The digits ASE failed to look up as a chemical symbol (KeyError('8')), else None."""
    key = exc.args[0] if isinstance(exc, KeyError) and exc.args else None
    return key if isinstance(key, str) and key.isdigit() else None


def extxyz_options(path: Path, fmt: Optional[str]) -> dict:
    """``{"format": fmt}``, with, for an extxyz file, a comment-line parser that refuses a key given twice
    (``energy=-1.0 ... energy=-2.0``: ASE kept the last value, silently)."""
    if fmt is None:
        from ase.io.formats import filetype

        try:
            fmt = filetype(str(path), read=True, guess=True)
        except Exception:  # noqa: BLE001 - ASE's own read says what is wrong
            return {}
    if fmt != "extxyz":
        return {"format": fmt}
    from ase.io.extxyz import key_val_str_to_dict

    def parse(line, sep=None):
        twice = repeated_key(line)
        if twice:
            key, values = twice
            raise DataError(f"{path}: a comment line gives {key} twice ({key}={values[0]} and {key}={values[1]}); "
                            "ASE would keep the last one, silently: give each key once")
        return key_val_str_to_dict(line, sep)

    return {"format": fmt, "properties_parser": parse}


#: a run of characters with no meaning to the comment-line split (not a quote, bracket, brace, backslash, '=' or
#: whitespace: ``\s`` of a str pattern is ``str.isspace``); closing brackets are plain characters outside quotes
_PLAIN_RUN = re.compile(r"""[^\\'"{\[=\s]+""")
#: what closes each opening quote or bracket, and a run of characters inside it (neither that nor a backslash)
_CLOSING = {"'": "'", '"': '"', "{": "}", "[": "]"}
_QUOTED_RUN = {opening: re.compile("[^" + re.escape(closing) + "\\\\]+") for opening, closing in _CLOSING.items()}


def repeated_key(line: str) -> Optional[tuple]:
    """The first key an extxyz comment line gives twice and its two values as written, else None; the
    line is split as ASE's ``key_val_str_to_dict`` splits it (quotes, brackets, backslash escapes): a
    backslash keeps the next character, quotes and brackets group what they hold, whitespace separates
    pairs, '=' a key from its value. Runs of ordinary characters are taken a run at a time (was a character
    at a time: 0.2 ms a frame of an MPtrj-like line; tests/test_ase_text_split.py holds that split as the
    reference)."""
    pairs, text, i = [[[]]], line.strip(), 0
    n = len(text)
    while i < n:
        char = text[i]
        if char == "\\":  # the next character as it is (a last backslash: nothing)
            if i + 1 < n:
                pairs[-1][-1].append(text[i + 1])
            i += 2
        elif char in _CLOSING:
            inside, i = _QUOTED_RUN[char], i + 1
            while i < n:
                run = inside.match(text, i)
                if run:
                    pairs[-1][-1].append(run.group())
                    i = run.end()
                elif text[i] == "\\":
                    if i + 1 < n:
                        pairs[-1][-1].append(text[i + 1])
                    i += 2
                else:  # the closing character
                    i += 1
                    break
        elif char.isspace():
            if pairs[-1][-1]:
                pairs.append([[]])
            i += 1
        elif char == "=":
            if pairs[-1] == [[]]:
                del pairs[-1]
            if pairs:
                pairs[-1].append([])
            else:
                pairs.append([[], []])
            i += 1
        else:
            run = _PLAIN_RUN.match(text, i)
            pairs[-1][-1].append(run.group())
            i = run.end()
    seen = {}
    for pair in pairs:
        if not pair or not pair[0]:
            continue
        key, value = "".join(pair[0]), "=".join("".join(x) for x in pair[1:]) if len(pair) > 1 else "T"
        if key in seen:
            return key, (seen[key], value)
        seen[key] = value
    return None


def _atom_line(line: str) -> bool:
    """An xyz atom line: a species and three numbers (``H -0.24 0.93 0``)."""
    parts = line.split()
    if len(parts) < 4 or not parts[0][:1].isalpha():
        return False
    try:
        [float(x) for x in parts[1:4]]
    except ValueError:
        return False
    return True


def _whole_number(line: str) -> bool:
    """A line holding one whole number (an xyz atom-count line), never an atom line."""
    try:
        int(line.strip())
    except ValueError:
        return False
    return True


def short_atom_count(path) -> Optional[str]:
    """Where an xyz/extxyz file's atom-count line is too small (``2`` over three atom lines: ASE read the third
    as the next frame's count, "Expected xyz header but got: invalid literal for int() ... 'H -0.24 0.93 0'"), or
    too large where it swallowed the next frame's count line (the same ASE error a few lines later), in
    words; None when the file's counts are not the cause (or it cannot be read as text)."""
    from torchmdx.io_utils import decode_text, open_compressed

    try:
        with open_compressed(path, "rb") as handle:
            lines = decode_text(handle.read()).splitlines()
    except Exception:  # noqa: BLE001 - not text: ASE's own line stands
        return None
    i, frame = 0, 0
    while i < len(lines):
        try:
            count = int(lines[i].strip())
        except ValueError:
            return None  # not a count where a frame starts: not a short count of the previous frame
        end = i + 2 + count
        number = next((k for k in range(i + 2, min(end, len(lines))) if _whole_number(lines[k])), None)
        if number is not None:  # a count too large swallows the next frame's count line (round 36: was "too small")
            atoms = number - i - 2
            return (f"line {i + 1}: frame {frame}'s atom count is {count}, but only {atoms} atom line(s) follow its "
                    f"comment line (line {number + 1}, {lines[number].strip()!r}, a number where an atom line "
                    f"belongs: the next frame's atom count?): the count is too large; make it {atoms}")
        if end < len(lines) and _atom_line(lines[end]):
            atoms = count
            while i + 2 + atoms < len(lines) and _atom_line(lines[i + 2 + atoms]):
                atoms += 1
            return (f"line {i + 1}: frame {frame}'s atom count is {count}, but {atoms} atom lines follow its comment "
                    f"line (line {end + 1}, {lines[end].strip()!r}, was read where the next frame's atom count "
                    f"belongs): the count may be too small; make it {atoms}")
        i, frame = end, frame + 1
        if all(not x.strip() for x in lines[i:]):  # blank lines at the end of the file
            break
    return None


def label_as_symbol(path, key: str) -> Optional[str]:
    """The line for an xyz/extxyz species column holding ``key``, an atom label such as 'C1' or 'H12' (as
    crystallography and modelling programs write them) where ASE reads element symbols (its KeyError 'C1' said
    nothing else); None when no atom line of ``path`` starts with ``key`` (the KeyError is not about a species)."""

    from ase.data import chemical_symbols

    from torchmdx.io_utils import decode_text, open_compressed

    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_+*'-]{0,15}", key):
        return None
    if key.capitalize() in chemical_symbols:
        return None
    try:
        with open_compressed(path, "rb") as handle:
            lines = decode_text(handle.read()).splitlines()
    except Exception:  # noqa: BLE001 - not text: ASE's own line stands
        return None
    for number, line in enumerate(lines, 1):
        parts = line.split()
        if parts and parts[0].lower() == key.lower() and _atom_line(line):  # ASE capitalises: 'CA1' is 'Ca1'
            key = parts[0]
            if key.isalpha():  # 'Xx', 'Du': no label, an unknown symbol (the data readers' words before)
                return (f"line {number}: unknown element symbol {key!r} in the species column; write element symbols "
                        "(H, C, O, ...) there")
            letters = re.match(r"[A-Za-z]+", key).group(0)  # 'Cl' of 'Cl2'; no guess for 'CA1' (C or Ca?)
            example = f" ({letters}?)" if letters in chemical_symbols[1:] else ""
            return (f"line {number}: the species column holds {key!r}, an atom label, not an element "
                    f"symbol{example}; write element symbols (H, C, O, ...) in that column")
    return None


#: (file, device, inode, size, modification time in ns) -> what :func:`pdb_name_as_element` said of it (the
#: dataset's streamed reads open a file several times: guess, two passes, data info; md and export once more)
_PDB_CHECKED: dict = {}
#: files remembered at most (the oldest forgotten first)
PDB_CHECKED_FILES = 64
#: a file modified less than this long (ns) before its check is not remembered: a rewrite within the file
#: system's timestamp resolution (ext4: a few ms, FAT: 2 s) could keep both its size and its mtime
PDB_SETTLED_NS = 2_000_000_000
#: bytes read (and decoded) at a time by the check
PDB_BLOCK_BYTES = 1 << 20


def pdb_name_as_element(path) -> Optional[str]:
    """The first ATOM/HETATM record of PDB file ``path`` without an element symbol (columns 77-78) whose atom
    name ASE reads as a two-letter element, in words; None when there is none. ASE falls back to the atom name
    (columns 13-16) when the element column is empty, trying its first two letters first: a protein's alpha
    carbon 'CA' became calcium, 'HG1' mercury, 'NE2' neon, 'CD1' cadmium, and md, label and export ran on
    them without a word (files written by packmol, older tools, or trimmed to 66 columns). An ion whose residue
    has its atom's name (``HETATM ... ZN ZN``) is taken as that element.

    The file is read a block at a time (:data:`PDB_BLOCK_BYTES`; it was decoded whole, and its lines listed, at
    every open), and the answer is remembered per file by its device, inode, size and modification time (as the
    cache's rebuild rule: :func:`torchmdx.data.cache.build_cache`), so the streamed reads of a dataset (the
    format's guess, two passes) check it once. A file modified in the last :data:`PDB_SETTLED_NS` is checked
    again at every open."""
    import os
    import time

    try:
        before = os.stat(path)
        key = (str(Path(path).resolve()), before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns)
    except (OSError, ValueError):
        return _pdb_scan(path)  # the scan's open says None, as before
    if key in _PDB_CHECKED:
        return _PDB_CHECKED[key]
    started = time.time_ns()
    found = _pdb_scan(path)
    try:
        after = os.stat(path)
    except OSError:
        return found
    unchanged = (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    if unchanged and started - before.st_mtime_ns > PDB_SETTLED_NS:
        while len(_PDB_CHECKED) >= PDB_CHECKED_FILES:
            _PDB_CHECKED.pop(next(iter(_PDB_CHECKED)))
        _PDB_CHECKED[key] = found
    return found


#: what an element column (columns 77-78 as written) holds -> whether it is an element symbol (filled as seen)
_ELEMENT_COLUMN: dict = {}


def _pdb_scan(path) -> Optional[str]:
    """:func:`pdb_name_as_element` of ``path``, read now (None where it is not UTF-8 text, or has no byte-order
    mark's text, or cannot be read: ASE's own read then says what is wrong)."""
    from collections import deque

    from ase.data import atomic_names, chemical_symbols

    from torchmdx.io_utils import open_compressed

    symbols = frozenset(chemical_symbols[1:])
    found, atom = None, 0
    try:
        with open_compressed(path, "rb") as handle:
            lines = _text_lines(handle)
            for number, line in enumerate(lines, 1):
                if line.startswith("MODEL"):
                    atom = 0
                    continue
                if not line.startswith(("ATOM", "HETATM")):
                    continue
                atom += 1
                column = line[76:78]
                ok = _ELEMENT_COLUMN.get(column)
                if ok is None:
                    element = column.strip()
                    ok = bool(element) and element.capitalize() in symbols
                    if len(_ELEMENT_COLUMN) < 4096:  # a file of junk in these columns: not remembered
                        _ELEMENT_COLUMN[column] = ok
                if ok:
                    continue
                name = line[12:16].strip()
                two = name[:2].capitalize()
                if name == line[17:20].strip():  # an ion, whose residue is named as its atom (ZN ZN, CL CL)
                    continue
                if len(name) >= 2 and two in symbols:
                    residue = " ".join(line[17:26].split())
                    where = f"atom {atom - 1}, name {name!r}" + (f" of {residue}" if residue else "")
                    found = (f"line {number} ({where}) has no element symbol in columns 77-78, and ASE would take "
                             f"{two} ({atomic_names[chemical_symbols.index(two)].lower()}) from the atom name; an "
                             f"atom name is not an element ('CA' is a protein's alpha carbon): put each atom's element "
                             f"symbol in columns 77-78 (e.g. with pdbfixer or Open Babel), or give the structure as "
                             f"extxyz")
                    break
            deque(lines, maxlen=0)  # the rest decoded too: a file that is not text is None, as when it was read whole
    except Exception:  # noqa: BLE001 - not text: ASE's own read says what is wrong
        return None
    return found


def _text_lines(handle):
    """The lines of binary file ``handle`` as ``decode_text(handle.read()).splitlines()`` gives them (UTF-8, or the
    codec of a byte-order mark, the mark dropped; every line break ``str.splitlines`` knows), a block at a time."""
    import codecs

    from torchmdx.io_utils import byte_order_mark

    head = handle.read(4)
    mark = byte_order_mark(head)
    decoder = codecs.getincrementaldecoder(mark[1] if mark else "utf-8")()
    rest, data = "", head
    while True:
        final = not data
        text = rest + decoder.decode(data, final=final)
        if final:
            yield from text.splitlines()
            return
        pieces = text.splitlines(keepends=True)
        # the last piece may go on in the next block (a '\r' may be half of '\r\n'): kept back, the rest given
        rest = pieces[-1] if pieces else ""
        if len(text) > len(rest):
            yield from text[:len(text) - len(rest)].splitlines()
        if len(rest) > 4096:  # a line without an end: its start (the columns read) and its last character
            rest = rest[:128] + rest[-1]
        data = handle.read(PDB_BLOCK_BYTES)


# ---------------------------------------------------------------------------------- files with a byte-order mark
#: compressed files ASE opens itself, by name (ase.io.formats.open_with_compression); the content decides
#: in io_utils.open_compressed, but ASE reads a gzip file named .xyz as text, so this follows ASE
_COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}
#: bytes of a marked file decoded at a time when it is checked (:func:`open_ase_source`)
DECODE_BLOCK_BYTES = 1 << 20


@contextmanager
def open_ase_source(path, stream_compressed: bool = True):
    """``(source, keyword arguments)`` for ``ase.io.read`` / ``iread`` of ``path`` while the ``with`` lasts: the
    path itself, or, for a text file that starts with a byte-order mark (UTF-8, or UTF-16/32: Windows PowerShell's
    ``>``), an open text stream of the file that leaves the mark out, decoded as ASE reads it (so a file of any
    size is never held whole; closed when the ``with`` ends), and the format ASE guesses for its text (ASE's
    readers took the mark for part of the first line: "Expected xyz header but got: invalid literal for int() ...
    '\\ufeff26'", and UTF-16 for a damaged UTF-8 file: "'utf-8' codec can't decode byte 0xff in position 0").
    Compressed files (.gz, .bz2, .xz) are looked into. A marked file is first decoded once, a block at a time
    (:data:`DECODE_BLOCK_BYTES`), so that one that is not text after its mark, or not a text format ASE reads,
    is one line naming the mark before ASE reads anything. With ``stream_compressed``, an unmarked compressed file
    in a text format is a text stream too, opened as ASE opens it (``gzip.open(path, 'rt')``: the locale's
    encoding, universal newlines) but through :class:`_Window` (ASE's own stream decompressed the file again from
    its start at each frame: time growing with the square of the file's size)."""
    from torchmdx.io_utils import compression_name_mismatch

    path = Path(path)
    mismatch = compression_name_mismatch(path)
    if mismatch:  # ASE's own error was a UnicodeDecodeError or "Not a gzipped file" (round 27)
        raise DataError(f"{path}: {mismatch}")
    opened = _open_marked(path)
    if opened is None:  # unreadable, or not the compression its name says: ASE's own error names it
        yield str(path), {}
        return
    opener, shown, mark = opened
    if mark is None:
        options = extxyz_options(path, None)
        if options.get("format") == "proteindatabank":  # ATOM lines without elements: 'CA' read as calcium
            problem = pdb_name_as_element(path)
            if problem:
                raise DataError(f"{path}: {problem}")
        if options.get("format") in ("xyz", "extxyz"):  # ASE skips a count's lines one by one, past the end too
            problem = long_atom_count(path, opener)
            if problem:
                raise DataError(f"{path}: {problem}")
            if opener is open or stream_compressed:  # a later frame's count: stopped as ASE reads (round 36)
                with _count_guard(path, opener) as stream:
                    yield stream, options
                return
        if not stream_compressed or opener is open or not _text_reader(options.get("format")):
            yield str(path), options
            return
        with io.TextIOWrapper(io.BufferedReader(_Window(opener(path, "rb")))) as stream:
            yield stream, options
        return
    fmt = _marked_format(path, opener, shown, mark)
    if fmt is None:  # reading failed part-way (a damaged gzip stream): ASE's own error names it
        yield str(path), {}
        return
    # the mark's codec ('utf-8-sig', 'utf-16', 'utf-32') skips the mark at the start (also after ASE's seek(0)),
    # and TextIOWrapper's tell/seek cookies keep the decoder's state (UTF-16's byte order); newline="\n" splits
    # and translates lines as io.StringIO(text) did (a "\r\n" keeps its "\r")
    binary = opener(path, "rb")
    if opener is not open:  # a decompressor: ASE's seeks a few KiB back would start it over each time
        binary = io.BufferedReader(_Window(binary))
    if fmt in ("xyz", "extxyz"):  # an atom count past the end of the file: one line, not hours (round 36)
        from torchmdx.data.xyz_counts import CountGuard

        binary = io.BufferedReader(CountGuard(binary, path, opener))
    with io.TextIOWrapper(binary, encoding=mark[1], newline="\n") as stream:
        yield stream, extxyz_options(path, fmt)


def ase_source(path) -> tuple:
    """:func:`open_ase_source`'s ``(source, keyword arguments)``, the text of a marked file read whole into an
    ``io.StringIO`` (nothing left open: for callers that read one structure, or a few, with ``ase.io.read``); a
    plain xyz/extxyz file, its :func:`~torchmdx.data.xyz_counts.guarded_text` stream, open (closed when dropped)."""
    from torchmdx.data.xyz_counts import guarded_text, is_guarded

    with open_ase_source(path, stream_compressed=False) as (source, options):
        if isinstance(source, str):
            return source, options
        if is_guarded(source) and source.buffer.raw.reads_file:  # a plain xyz/extxyz file: its guarded stream,
            # open (closed when dropped)
            return _count_guard(path, open), options
        text = source.read()
        if options.get("format") in ("xyz", "extxyz"):  # a marked one: its text, guarded as well
            return guarded_text(io.BytesIO(text.encode("utf-8")), path, encoding="utf-8", newline="\n"), options
        return io.StringIO(text), options


def _count_guard(path: Path, opener):
    """xyz/extxyz ``path`` as ASE would open it (the locale's encoding, universal newlines), through
    :class:`torchmdx.data.xyz_counts.CountGuard` (an atom count past the end of the file: one line, not hours)."""
    from torchmdx.data.xyz_counts import guarded_text

    if opener is open:
        return guarded_text(io.FileIO(path, "rb"), path, opener)
    return guarded_text(_Window(opener(path, "rb")), path, opener)  # a decompressor: see _Window


def _text_reader(fmt: Optional[str]) -> bool:
    """Whether ASE reads format ``fmt`` from a text stream."""
    from ase.io.formats import ioformats

    reader = ioformats.get(fmt) if fmt else None
    return bool(reader is not None and reader.can_read and reader.acceptsfd and not reader.isbinary)


def _open_marked(path: Path) -> Optional[tuple]:
    """``(opener, the name ASE guesses from, byte-order mark or None)`` of ``path``; None when it cannot be read."""
    import importlib

    from torchmdx.io_utils import byte_order_mark

    module = _COMPRESSED.get(path.suffix.lower())
    shown = path.with_suffix("") if module else path  # filetype() guesses from the name without .gz
    try:
        opener = importlib.import_module(module).open if module else open
        with opener(path, "rb") as handle:
            return opener, shown, byte_order_mark(handle.read(4))
    except Exception:  # noqa: BLE001 - unreadable, or not the compression its name says
        return None


def _marked_format(path: Path, opener, shown: Path, mark: tuple) -> Optional[str]:
    """The format ASE guesses for the text of a marked file (from the first ``PEEK_BYTES`` of its UTF-8, as
    ``filetype`` reads them), after decoding the whole file a block at a time; None when reading it fails. A file
    that is not text after the mark, or whose text no ASE reader takes, is one line naming the mark."""
    import codecs

    from ase.io.formats import PEEK_BYTES, filetype, ioformats

    decoder = codecs.getincrementaldecoder(mark[1])()
    head, size = [], 0
    try:
        with opener(path, "rb") as handle:
            while True:
                block = handle.read(DECODE_BLOCK_BYTES)
                if decoder is not None:
                    try:
                        text = decoder.decode(block, final=not block)
                    except UnicodeDecodeError:
                        decoder = None  # not text after the mark (read on: a failed read is ASE's to name)
                    else:
                        if size < PEEK_BYTES and text:
                            head.append(text[:PEEK_BYTES].encode("utf-8"))  # a character is 1 byte or more
                            size += len(head[-1])
                if not block:
                    break
    except Exception:  # noqa: BLE001 - a damaged compressed stream: ASE's own error names it
        return None

    class _Named(io.BytesIO):
        name = str(shown)  # filetype() takes the name's extension, then the content (without the mark)

    usable, fmt = False, None
    if decoder is not None:
        try:
            fmt = filetype(_Named(b"".join(head)), read=True, guess=True)
            usable = fmt in ioformats and _text_reader(fmt)
        except Exception:  # noqa: BLE001 - unknown format: say what the mark is
            usable = False
    if not usable:
        advice = "without the mark (plain UTF-8)" if mark[1] == "utf-8-sig" else "as plain UTF-8"
        raise DataError(f"{path}: starts with {mark[2]}, and what follows is not a text structure format ASE can "
                        f"read; save the file {advice}")
    return fmt


#: bytes :class:`_Window` keeps behind the position it has read to
WINDOW_BYTES = 4 << 20


class _Window(io.RawIOBase):
    """A decompressor's output made cheap to seek within its last :data:`WINDOW_BYTES`: ASE's extxyz reader seeks
    back to the start of each frame (and its text layer to the start of a decoded block), which a gzip, bzip2 or xz
    stream serves by decompressing again from the file's start (a 2.6 MB file of 900 frames took 24 s instead of
    1 s). A seek before the window starts over (ASE's one return to the first frame after indexing the file)."""

    def __init__(self, source, size: int = WINDOW_BYTES):
        super().__init__()
        self._source, self._size = source, size
        self._buffer, self._start, self._pos = bytearray(), 0, 0  # the window, where it starts, where we are

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("seek from the end of a decompressed stream")
        if offset < self._start:  # before the window: decompress again from the start
            self._source.seek(0)
            self._buffer, self._start = bytearray(), 0
        self._pos = max(0, offset)
        return self._pos

    def readinto(self, target) -> int:
        end = self._start + len(self._buffer)
        while self._pos >= end:
            data = self._source.read(max(len(target), 1 << 16))
            if not data:
                return 0
            self._buffer += data
            end += len(data)
            drop = min(len(self._buffer) - self._size, self._pos - self._start)
            if drop > self._size:  # trim in large steps (not at every read)
                del self._buffer[:drop]
                self._start += drop
        offset = self._pos - self._start
        n = min(len(target), end - self._pos)
        target[:n] = self._buffer[offset:offset + n]
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._source.close()
        super().close()
