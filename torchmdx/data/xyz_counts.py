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
    scan does (:func:`_walk_frames`), a line at a time: called only once a read ran past the end."""
    try:
        with opener(path, "rb") as handle:
            for frame, start, count, present in _walk_frames(_text_lines(handle)):
                if frame is not None and present < count:
                    return (f"line {start}: frame {frame}'s atom count is {count}, but only {present} line(s) "
                            f"follow its comment line: the count is too large (make it {present}?), or the file "
                            "is cut short")
    except DataError:
        raise
    except Exception:  # noqa: BLE001 - unreadable now: the generic line below
        return None
    return None


def _walk_frames(handle):
    """The frames of xyz text ``handle`` (lines of bytes or of text) as ASE's index scan walks them: yields
    (frame, line of its atom count, count, atom lines present after its comment line) for each, and last
    (None, line number, that line, None) for the first line that is no atom count (a blank or non-numeric line,
    or '' at the end of the file); a frame cut short (present < count) ends the walk. Line numbers are 1-based;
    a UTF-8 byte-order mark on the first line is skipped."""
    number, frame = 0, 0
    while True:
        line = handle.readline()
        number += 1
        if number == 1 and isinstance(line, bytes):
            line = line.removeprefix(codecs.BOM_UTF8)
        try:
            count = int(line) if line.strip() else None
        except ValueError:
            count = None
        if count is None:
            yield None, number, line, None
            return
        start, present = number, 0
        comment = handle.readline()
        number += 1
        if comment:
            while present < count:
                if not handle.readline():
                    break
                present += 1
            number += present
        yield frame, start, count, present
        if present < count:
            return
        frame += 1


def _text_lines(handle):
    """``handle`` (a file opened "rb") to read a line at a time: itself (lines of bytes), or, for a file with a
    UTF-16/32 byte-order mark, its text in the mark's codec (round 37: the bytes' lines were never a count)."""
    from torchmdx.io_utils import byte_order_mark

    mark = byte_order_mark(handle.read(4))
    handle.seek(0)
    if mark is not None and mark[0] != codecs.BOM_UTF8:
        return io.TextIOWrapper(handle, encoding=mark[1], newline="\n")
    return handle


def blank_line_frames(path, opener=open) -> Optional[str]:
    """Where xyz/extxyz ``path`` has a blank line where a frame's atom count belongs with more text after it, in
    words (1-based lines), else None. ASE's frame scan stops at such a line: the frames after it were dropped
    without a word (round 38: ``data info`` counted 1 structure of 2, ``md`` ran the frame before it as the last).
    Walks the frames as :func:`late_atom_count` does; called only once text was found after ASE's last frame."""
    try:
        with opener(path, "rb") as handle:
            handle = _text_lines(handle)
            frames = 0
            for frame, number, line_or_count, present in _walk_frames(handle):
                if frame is not None:  # a frame: (frame, line of its count, count, present)
                    if present < line_or_count:  # cut short: not this check's
                        return None
                    frames += 1
                    continue
                line = line_or_count  # the first line that is no count
                if not line or line.strip():  # the end of the file, or text
                    return None
                blank = number
                for line in iter(handle.readline, b"" if isinstance(line, bytes) else ""):
                    number += 1
                    if line.strip():
                        text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
                        return (f"line {blank} is blank where frame {frames}'s atom count belongs, and the file "
                                f"goes on (line {number}, {text.strip()[:40]!r}): ASE stops reading at a blank "
                                f"line, so only the {frames} frame(s) before it would be read and the rest "
                                "dropped without a word; remove the blank line(s)")
                return None
    except DataError:
        raise
    except Exception:  # noqa: BLE001 - unreadable now: the generic line of check_rest
        return None
    return None


def check_rest(stream) -> None:
    """After ASE read the frames of :func:`guarded_text` ``stream`` to its last: one line (a DataError) when text
    other than blank lines follows (ASE's frame scan stops at a blank line where an atom count belongs and drops the
    rest without a word; round 38). Reads only what follows the last frame read (nothing, or blank lines, in a
    good file); walks the file (:func:`blank_line_frames`) only when text is found there. Any other stream: nothing
    to check."""
    if not is_guarded(stream):
        return
    guard = stream.buffer.raw
    path = guard._path
    try:
        while True:
            block = stream.read(COUNT_BLOCK_BYTES)
            if not block:
                return
            if block.strip():
                break
    except (OSError, ValueError, UnicodeDecodeError):  # closed or undecodable: nothing to say here
        return
    problem = blank_line_frames(path, guard._opener)
    raise DataError(f"{path}: " + (problem or "text follows the last frame ASE read (after a blank line?), and ASE "
                                               "drops it without a word; remove the blank line(s) between frames"))


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
