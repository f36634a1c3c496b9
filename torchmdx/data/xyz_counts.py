"""An xyz/extxyz atom count larger than the lines left in the file, in any frame (round 36).

ASE's extxyz index scan skips a frame's atom lines with one ``readline()`` per atom, past the end of the file too:
a count of 10**12 in a later frame ran for hours (round 35 compared only the first frame's count with the file,
before ASE reads, in :func:`long_atom_count`, moved here from :mod:`torchmdx.data.ase_text`). A second pass over every frame would read
each file twice, so instead ASE reads through :class:`CountGuard`, which counts the reads of the file's bytes that
return nothing in a row (one per ``readline()`` at the end): a file read to its end takes a few of them (ASE's last
look for a frame, its look for VEC lines), a count past the end one per missing line. After :data:`EOF_READS` of
them the file is walked once more, only then, to name the frame (:func:`late_atom_count`)."""

from __future__ import annotations

import codecs
import io
from typing import Optional

from torchmdx.errors import DataError

#: ``readline()`` calls in a row at the end of the file (no seek between) after which the read is stopped
EOF_READS = 1000


#: bytes read at a time while counting the lines after an atom count (:func:`long_atom_count`)
COUNT_BLOCK_BYTES = 1 << 16  # small: a streamed read stays a fraction of a whole one (test_ase_stream)


def long_atom_count(path, opener=open) -> Optional[str]:
    """Where an xyz/extxyz file's first atom count is larger than the lines that follow it, in words (round 35:
    ASE's index scan calls readline() once per atom, past the end of the file, so a count of 10**12 over one atom
    line ran for hours; a count one too large was ASE's "Frame has 1 atoms, expected 2"); None when the count is
    not a number or the lines are there. Reads only as far as the first frame's lines."""
    try:
        with opener(path, "rb") as handle:
            first = handle.readline(1 << 12)
            try:
                count = int(first.strip())
            except ValueError:
                return None
            if count < 0:
                return None  # ASE's own line (a negative count)
            needed, lines, last = count + 1, 0, b"\n"  # the comment line and the atom lines
            while lines < needed:
                block = handle.read(COUNT_BLOCK_BYTES)
                if not block:
                    break
                lines += block.count(b"\n")
                last = block[-1:]
    except Exception:  # noqa: BLE001 - unreadable: ASE's own error names it
        return None
    if lines < needed and last != b"\n":
        lines += 1  # a last line without its newline
    atoms = max(lines - 1, 0)
    if lines >= needed or (atoms == 0 and count <= 10**6):  # no atom lines at all: the readers' "ends early" line
        return None
    return (f"line 1: frame 0's atom count is {count}, but only {atoms} line(s) follow its comment line: the count "
            f"is too large (make it {atoms}?), or the file is cut short")


def late_atom_count(path, opener=open) -> Optional[str]:
    """The first frame of xyz/extxyz ``path`` whose atom count is larger than the lines that follow its comment
    line, in words (the frame and the line of its count, 1-based), else None. Walks the frames as ASE's index
    scan does (a blank or non-numeric count line ends it), a line at a time: called only once a read ran past
    the end."""
    from torchmdx.io_utils import byte_order_mark

    try:
        with opener(path, "rb") as handle:
            mark = byte_order_mark(handle.read(4))
            handle.seek(0)
            if mark is not None and mark[0] != codecs.BOM_UTF8:  # UTF-16/32 (round 37: the bytes' lines were
                # never a count, so the line named no frame): its text, the mark's codec skipping the mark
                handle = io.TextIOWrapper(handle, encoding=mark[1], newline="\n")
            number, frame = 0, 0
            while True:
                line = handle.readline()
                number += 1
                if number == 1 and isinstance(line, bytes):
                    line = line.removeprefix(codecs.BOM_UTF8)  # a UTF-8 byte-order mark
                if not line.strip():
                    return None
                try:
                    count = int(line)
                except ValueError:
                    return None
                start, present = number, 0
                comment = handle.readline()
                number += 1
                if comment:
                    while present < count:
                        if not handle.readline():
                            break
                        present += 1
                    number += present
                if present < count:
                    return (f"line {start}: frame {frame}'s atom count is {count}, but only {present} line(s) "
                            f"follow its comment line: the count is too large (make it {present}?), or the file "
                            "is cut short")
                frame += 1
    except DataError:
        raise
    except Exception:  # noqa: BLE001 - unreadable now: the generic line below
        return None


class CountGuard(io.RawIOBase):
    """The bytes of an xyz/extxyz file for ASE's text stream (:func:`guarded_text`), stopping a read that runs past
    the end of the file (an atom count larger than the lines left) with one line naming the frame, a
    :class:`torchmdx.errors.DataError`. Each ``readline()`` at the end of the file asks the raw stream once more
    (the buffered layer keeps no end-of-file state); a read that returns bytes, or a seek, starts the count over.
    Python runs here once per buffer (8 KiB), not once per line."""

    def __init__(self, raw, path, opener=open):
        super().__init__()
        self._raw, self._path, self._opener, self._eof_reads = raw, path, opener, 0
        self.reads_file = isinstance(raw, io.FileIO)  # the file's own bytes (not decoded or decompressed)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._raw.seekable()

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        self._eof_reads = 0
        return self._raw.seek(offset, whence)

    def readinto(self, buffer) -> int:
        n = self._raw.readinto(buffer)
        if n:
            self._eof_reads = 0
            return n
        self._eof_reads += 1
        if self._eof_reads > EOF_READS:
            self._eof_reads = 0
            problem = late_atom_count(self._path, self._opener)
            raise DataError(f"{self._path}: " + (problem or "an atom count is larger than the lines left in the "
                                                           "file: the count is too large, or the file is cut short"))
        return n

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


def guarded_text(raw, path, opener=open, **text) -> io.TextIOWrapper:
    """``raw`` (the file's bytes: a ``FileIO``, a decompressor's window, a marked file's text as UTF-8 in a
    ``BytesIO``) as the text stream ASE opens (the locale's encoding, universal newlines; ``text``: other
    ``TextIOWrapper`` arguments), read through :class:`CountGuard`."""
    return io.TextIOWrapper(io.BufferedReader(CountGuard(raw, path, opener)), **text)


def is_guarded(stream) -> bool:
    """Whether ``stream`` is a :func:`guarded_text` stream."""
    return isinstance(getattr(getattr(stream, "buffer", None), "raw", None), CountGuard)
