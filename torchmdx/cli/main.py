"""``torchmdx`` entry point: one sub-command per module in this package.

Each sub-command module ``torchmdx/cli/<name>_cmd.py`` defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Modules import heavy libraries (torch,
lightning) inside ``run`` so that ``torchmdx --help`` is instant.

Predictable mistakes raise :class:`torchmdx.errors.TorchmdxError`; they are printed as one
``error: ...`` line on stderr with exit status 2, never as a traceback. Set
``TORCHMDX_TRACEBACK=1`` to see the traceback anyway (for bug reports).
"""

from __future__ import annotations

import argparse
import errno
import contextlib
import importlib
import os
import re
import signal
import sys
import threading

from torchmdx import __version__
from torchmdx.config import closest_choice
from torchmdx.errors import TorchmdxError, one_line_warnings, requested_gigabytes, traceback_wanted

COMMANDS = ["train", "md", "evaluate", "data", "export", "bench", "slmc", "sweep", "label"]


#: commands whose SIGTERM Lightning (train) or the sweep's own worker handling already turn into a
#: clean shutdown; every other command gets :func:`sigterm_as_interrupt`
_OWN_SIGTERM = {"train", "sweep"}

#: errno values of a write the system refused (disk full, quota, read-only file system, permissions)
_WRITE_REFUSED = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


_INVALID_CHOICE = re.compile(r"invalid choice: '(?P<given>[^']*)' \(choose from (?P<choices>.*)\)$")


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose "invalid choice" line says which choice was probably meant (``torchmdx trian``,
    ``data inof``, ``evaluate --split TEST``: Python 3.11's argparse only lists them; round 35). The sub-commands'
    parsers are of this class too (``add_subparsers`` makes them of the parent's class)."""

    def error(self, message):
        found = _INVALID_CHOICE.search(message)
        if found:
            given = found["given"]
            close = closest_choice(given, re.findall(r"'([^']*)'", found["choices"]), cutoff=0.6)
            if close is not None:
                message = message[:found.start()] + (f"invalid choice: '{given}' (did you mean '{close}'?; "
                                                     f"choose from {found['choices']})")
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="torchmdx",
        description="Train, evaluate and run molecular dynamics with equivariant-transformer potentials.",
    )
    parser.add_argument("--version", action="version", version=f"torchmdx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name in COMMANDS:
        module = importlib.import_module(f"torchmdx.cli.{name}_cmd")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def run_script(function, *args) -> int:
    """Run a ``bench/`` script's ``main`` (``torchmdx bench NAME`` starts the script in its own process)
    under the command line's rule: a TorchmdxError (a missing model file, an unknown device) is one
    ``error:`` line and exit status 2, not a traceback (unless ``TORCHMDX_TRACEBACK`` is set)."""
    try:
        return int(function(*args) or 0)
    except TorchmdxError as exc:
        if traceback_wanted():
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def _innermost(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The (sub-)command parser that ``args`` were parsed by: ``torchmdx data info``'s for ``data info ...``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None) or "")
            if chosen is not None:
                return _innermost(chosen, args)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # under the sub-command's usage line, not "usage: torchmdx [-h] [--version] command ..." (round 24)
        _innermost(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 1
    # the command line (arguments from sys.argv): one line per warning; main([...]) from Python keeps Python's
    # warnings, and leaves the caller's hook as it was
    with one_line_warnings(on=argv is None):
        return _run(args)


def _stdout_to_devnull() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor (pytest's capture)
        pass


class _Terminated(KeyboardInterrupt):
    """SIGTERM, taken as Ctrl-C (:func:`sigterm_as_interrupt`)."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (``kill``, a job scheduler's time limit) handled as Ctrl-C while the block runs: a
    KeyboardInterrupt, so that every ``finally`` and :func:`torchmdx.io_utils.atomic_path` runs and
    no temporary file or half-written output is left (Python's default ends the process at once).
    Only where SIGTERM still has its default action and in the main thread: a handler the caller
    installed is left alone."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        raise _Terminated()

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run(args) -> int:
    """The command, with its errors as one line each (see :func:`main`)."""
    guard = sigterm_as_interrupt() if args.command not in _OWN_SIGTERM else contextlib.nullcontext()
    try:
        with guard:
            return int(args._module.run(args) or 0)
    except TorchmdxError as exc:
        if traceback_wanted():
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # the reader of the output went away (`torchmdx data info x | head -3`): not a failure of the command,
        # and no traceback (was one); stdout points at /dev/null so that Python's flush at exit stays quiet
        _stdout_to_devnull()
        return 128 + signal.SIGPIPE
    except OSError as exc:
        # the disk or the folder refused a write (full, quota, read-only, permissions): a fact about
        # the machine, not a bug; anything else stays a traceback worth a bug report
        if exc.errno not in _WRITE_REFUSED or traceback_wanted():
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc} (the system refused the file operation: a full disk, a quota, "
              "a read-only file system or missing permissions)", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:  # numpy's _ArrayMemoryError included: a size the machine cannot hold
        # torch's CPU allocator raises RuntimeError ("DefaultCPUAllocator: can't allocate memory"),
        # CUDA torch.OutOfMemoryError (a RuntimeError); any other RuntimeError stays a traceback
        out_of_memory = isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" \
            or "can't allocate memory" in str(exc)
        if not out_of_memory or traceback_wanted():
            raise
        detail = (str(exc).splitlines() or [""])[0][:200]
        gigabytes = requested_gigabytes(detail)
        if gigabytes is not None:  # torch's allocator message: the size is what helps
            detail = f"one array of {gigabytes:.3g} GB"
        print(f"error: ran out of memory ({detail or 'MemoryError'}): check the sizes asked for (--replicas, batch "
              "sizes, model sizes, the number of structures)", file=sys.stderr)
        return 2
    except _Terminated:
        print("interrupted (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
