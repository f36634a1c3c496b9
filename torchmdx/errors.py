"""User-facing errors.

Every predictable mistake (missing file, bad key, unknown element, NaN coordinates, neighbor
buffer overflow, an MD run that blows up) raises a subclass of :class:`TorchmdxError` whose
message is one complete line naming the file/key/atom and what was expected. The CLI prints
``error: <message>`` and exits with status 2; it never shows a traceback for these.

Warnings of a command-line process (``torchmdx ...`` and the workers it starts, such as a sweep's points) are one
``warning: <message>`` line each, a line repeated word for word shown once (:func:`one_line_warnings`).
"""

import contextlib
import os
import sys
import warnings


class TorchmdxError(Exception):
    """Base of all user-facing errors: the message is one line, shown as is."""

    exit_code = 2


class ConfigError(TorchmdxError):
    """A configuration key that does not exist, has the wrong type, or an invalid value."""


class DataError(TorchmdxError):
    """A data file that is missing, malformed, or holds values that cannot be used."""


class ModelError(TorchmdxError):
    """A model file that cannot be read, or inputs the model cannot handle (unknown element)."""


class NeighborListError(TorchmdxError):
    """Neighbor-list problems: cutoff too large for the box, buffer overflow, bad cell."""


class TrainingError(TorchmdxError):
    """A training run that cannot go on (the loss stopped being finite)."""


class SimulationError(TorchmdxError):
    """An MD run that cannot continue (NaN forces, exploding temperature)."""


class NotBuiltError(TorchmdxError):
    """A subcommand or feature that does not exist yet."""


def requested_gigabytes(text: str):
    """The size in GB that torch's CPU allocator was asked for, from its message ("... you tried
    to allocate N bytes"), or None: out-of-memory errors name that size rather than the message."""
    import re

    found = re.search(r"allocate (\d+) bytes", text)
    return int(found.group(1)) / 1e9 if found else None



def with_article(noun: str) -> str:
    """``noun`` after "a" or "an", chosen by its first sound: a vowel letter, or an initialism
    read letter by letter whose first letter's name starts with a vowel ("an MD restart file",
    "an HDF5 file", but "a model file", "a TorchScript file")."""
    first_word = noun.split(" ", 1)[0]
    initialism = len(first_word) > 1 and first_word[:2].isupper()
    vowel_sound = noun[:1].lower() in "aeiou" or (initialism and first_word[0] in "FHLMNRSX")
    return f"{'an' if vowel_sound else 'a'} {noun}"


def traceback_wanted() -> bool:
    """``TORCHMDX_TRACEBACK`` set to anything but empty, 0, false, no or off (``=0`` meant "on":
    a user turning tracebacks off got them)."""
    return os.environ.get("TORCHMDX_TRACEBACK", "").strip().lower() not in ("", "0", "false", "no", "off")


#: the warning lines this command has printed: a line repeated word for word says nothing new
_SHOWN: set = set()


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings on the command line as one ``warning:`` line each (no source line under them);
    Python callers of :func:`torchmdx.cli.main.main` (an explicit ``argv``) and the Python API keep Python's own
    format, and so does the command line with ``TORCHMDX_TRACEBACK`` set."""
    text = " ".join(str(message).split())
    if text in _SHOWN:  # PyTorch's "This DataLoader will create 8 worker processes" came once per loader
        return
    _SHOWN.add(text)
    print(f"warning: {text}", file=file if file is not None else sys.stderr)


@contextlib.contextmanager
def one_line_warnings(on: bool = True):
    """Within the block (when ``on`` and ``TORCHMDX_TRACEBACK`` is not set), warnings are printed as one
    ``warning:`` line each, once per text; the caller's hook is put back at the end."""
    shown = warnings.showwarning
    if on and not traceback_wanted():
        warnings.showwarning = _one_line_warning
        _SHOWN.clear()
    try:
        yield
    finally:
        warnings.showwarning = shown
