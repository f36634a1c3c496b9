"""Small file helpers shared by every layer (no torch import here)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file beside ``path``; on success rename it onto ``path``.

    A crash (or exception) inside the ``with`` block leaves no file at ``path`` and removes the
    temporary one, so readers never see a half-written file::

        with atomic_write("model.pt") as f:
            torch.save(obj, f)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def temporary_path(path: str | os.PathLike) -> Path:
    """A temporary name beside ``path`` for writers that need a file name (h5py): write there,
    then ``os.replace(tmp, path)``; delete it on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")
