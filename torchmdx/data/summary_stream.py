"""``torchmdx data info`` on a raw file without a cache, in one streamed pass (bounded by the per-structure arrays).

:func:`summary_structures` reads the file as the cache build does (:func:`torchmdx.data.formats.iter_structures`:
validated chunks, here of about :data:`SUMMARY_CHUNK_ATOMS` atoms; ANI files group by group, ASE files (databases
included) in two passes over one parse) and keeps of each chunk only what the summary, the label check and a
config's split and atomic references read:

- per structure: energy, atom count, cell, pbc, group code, per-structure extras (``stress`` included);
- per atom: the atomic number, as uint8 (1 byte an atom: the element counts of the split's reference fit);
- the build's statistics a cache stores (:class:`~torchmdx.data.cache_file.ChunkSink`: element counts, force
  sums and largest force, atoms per structure), which :func:`torchmdx.data.summary.summarize` reads instead of
  the forces, as it does for a cache;
- the first force beyond physical (:func:`torchmdx.data.label_check.force_problem`, chunk by chunk: the label
  check's first item; its other items read the per-structure arrays and the atomic numbers).

Positions, forces and per-atom extras are not kept: the :class:`~torchmdx.data.structures.Structures` returned
has a :class:`NotKept` in their place (their shape, for ``n_atoms`` and "has forces"; reading one is an error).
The whole read (``read_structures``) held every array of the file, and for an ASE file every frame too (~15 kB a
frame). The summary equals the whole read's: the same numbers and lines; the force RMS is summed chunk by chunk
(as for a cache), so it may differ from the whole read's in its last digit. A file with problems in several chunks
may have another one named first (as for the streamed cache build). Time: an ASE file is parsed once, its frames
kept for the second pass in an unnamed file in the system's temporary folder (about an extxyz's size; until
2026-12-07 it was parsed twice, about 1.7x the whole read's time: ``bench/bench_data.py --synthetic-db``).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from torchmdx.data.cache_file import ChunkSink
from torchmdx.data.structures import Structures
from torchmdx.errors import DataError


class NotKept:
    """Stands for a per-atom array a streamed summary does not keep: its ``shape`` (and ``len``) only."""

    def __init__(self, name: str, shape: tuple):
        self.name, self.shape = name, tuple(shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _refuse(self, *args, **kwargs):
        raise TypeError(f"the streamed summary of a dataset does not keep its {self.name}")

    __getitem__ = __array__ = _refuse


class SummaryCollector(ChunkSink):
    """Keeps the per-structure arrays and atomic numbers of a streamed read's chunks (module docstring)."""

    def __init__(self, source=None):
        super().__init__(source)
        self._parts: dict = {name: [] for name in ("z", "energy", "counts", "cell", "pbc", "group")}
        self._extras: dict = {}
        self._atom_extras: dict = {}  # name -> (dtype, shape per atom): the names, in the chunks' order
        self.force_problem: Optional[str] = None  # the label check's line for the first force beyond physical

    def _keep(self, chunk, z, forces, counts, group) -> None:
        from torchmdx.data.label_check import force_problem

        if forces is not None and self.force_problem is None:
            self.force_problem = force_problem(chunk, first=self.n_structures)
        for name, value in (("z", z), ("energy", np.asarray(chunk.energy, dtype=np.float64)), ("counts", counts),
                            ("cell", np.asarray(chunk.cell, dtype=np.float64)),
                            ("pbc", np.asarray(chunk.pbc, dtype=bool)), ("group", group)):
            if value is not None:
                self._parts[name].append(value)
        for name, values in chunk.extras.items():
            self._extras.setdefault(name, []).append(np.asarray(values))
        for name, values in chunk.atom_extras.items():
            self._atom_extras.setdefault(name, np.asarray(values).shape[1:])

    def structures(self) -> Structures:
        """The summary's :class:`Structures` (module docstring), the statistics in ``metadata['cache_statistics']``
        as a cache's (no ``metadata['cache']``: it is not one)."""
        if self.n_structures == 0:
            raise DataError(f"{self.source}: contains no structures")
        parts = {name: np.concatenate(values) if values else None for name, values in self._parts.items()}
        a = self.n_atoms
        metadata = dict(self.metadata)
        metadata["cache_statistics"] = self.statistics()
        return Structures(
            z=parts["z"],
            pos=NotKept("positions", (a, 3)),
            energy=parts["energy"],
            offsets=np.concatenate([[0], np.cumsum(parts["counts"])]).astype(np.int64),
            forces=NotKept("forces", (a, 3)) if self._layout["forces"] else None,
            cell=parts["cell"],
            pbc=parts["pbc"],
            group=parts["group"],
            group_names=list(self.group_names),
            extras={name: np.concatenate(values) for name, values in self._extras.items()},
            atom_extras={name: NotKept(f"per-atom '{name}'", (a,) + tail) for name, tail in self._atom_extras.items()},
            extra_units=dict(self.extra_units),
            metadata=metadata,
        )


#: atoms per chunk of the summary's read: a chunk is dropped once counted, so a smaller one than the cache build's
#: (2^20) costs no time and keeps the peak low (an ASE database of 40 000 rows, 1.3 M atoms: 375 MB with 2^16, of
#: which 220 MB the command's imports, against 705 MB with 2^20)
SUMMARY_CHUNK_ATOMS = 1 << 16


def summary_structures(path, format: Optional[str] = None, chunk_atoms: Optional[int] = None, **options) -> tuple:
    """``(Structures, force problem or None)`` of a dataset for ``data info``, read in one streamed pass (module
    docstring) in chunks of about ``chunk_atoms`` atoms (default :data:`SUMMARY_CHUNK_ATOMS`); the file is checked
    as ``read_structures`` checks it (the same lines). A torchmdx cache given as the data is memory-mapped (its
    stored statistics; nothing read whole)."""
    from torchmdx.data.cache_file import read_cache
    from torchmdx.data.formats import (check_format, check_not_empty, guess_format, iter_structures,
                                       normalise_options, resolve_source, unreadable_as_data_error)

    fmt = check_format(format)
    source = resolve_source(path, fmt)
    check_not_empty(source)
    fmt = fmt or guess_format(source)
    opts = normalise_options(fmt, options, source)
    if fmt == "cache":
        with unreadable_as_data_error(source, fmt):
            return read_cache(source, mmap=True), None
    collector = SummaryCollector()
    with unreadable_as_data_error(source, fmt):
        for chunk in iter_structures(source, fmt, chunk_atoms=chunk_atoms or SUMMARY_CHUNK_ATOMS, **opts):
            collector.add(chunk)
    return collector.structures(), collector.force_problem
