"""ASE files in two passes over one parse (bounded memory), and the whole read that makes the same decisions.

What a read of an ASE file (:mod:`torchmdx.data.ase_format`) decides from all its frames together
needs only each frame's keys, shapes and flags, never its positions or forces:

- the extras: the numeric info keys (and calculator results) present in every frame with one
  shape, the per-atom arrays present in every frame with one shape per atom (others are dropped, with one
  warning naming each and in how many frames it is: :func:`dropped_extras_line`);
- forces in every frame or in none (forces in some frames only is an error naming the first frame
  without them; none with an explicit ``forces_key`` too);
- stress the same way, after frames that are not periodic got a NaN stress (isolated atoms or
  molecules for reference energies) when any frame has one;
- the builder's metadata: keys, units, the first frame's ``theory``.

:class:`FrameSummary` keeps just that, frame by frame (and each frame's atom count: 8 bytes a
frame). So :func:`iter_ase` parses the file once and goes over its frames twice:

1. pass 1: every frame through the per-frame reader (``AseReading.frames``: its checks and error
   lines, in its order), summarised, and kept in a temporary file (:class:`FrameSpill`: each
   frame's fields pickled, the same arrays back), then decided (:meth:`FrameSummary.finish`: the
   same errors);
2. pass 2: the kept frames, read back one at a time, each added as the whole read adds it
   (:func:`add_frame`: the same checks, the same lines naming ``<file>: frame k``), handed out as
   validated :class:`~torchmdx.data.structures.Structures` chunks of about ``chunk_atoms`` atoms (a
   chunk ends after the frame that reaches ``chunk_atoms``: a frame larger than that is a chunk of
   its own, with any frames before it).

Memory: one frame, one chunk and the summary, whatever the file's size (ASE's extxyz reader adds
the byte offset of every frame, about 100 bytes a frame); the whole read (:func:`read_whole`,
``read_ase``) holds every frame. Disk: the spill, about an extxyz's size (binary float64
arrays), in ``spill_dir`` (``build_cache``: the cache's folder; else the system's temporary
folder), unnamed (nothing is left behind, even by a killed build) and closed when the read ends.
Time: one parse (ASE's, the bulk of it) and a pickle round trip per frame; until 2026-12-07 pass 2
parsed the file again (1.7x the time: docs/data.md, "An extxyz at scale"). The chunks,
concatenated, are the whole read's structures array for array; a file with several problems may
name another one first: the whole read checks every frame's values (energy, forces, shapes) before
it validates the structures (positions, atomic numbers, coincident atoms), the streamed read does
both chunk by chunk. A file that changes while it is read is refused by ``build_cache`` (its size,
time or edges changed: ``<file>: changed while it was being read; try again``); the frames handed
out are those of the one parse.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from collections import Counter
from array import array
from typing import Optional

import numpy as np

from torchmdx.data.ase_format import AseReading, _Frame, ase_reading, finite_values
from torchmdx.data.structures import CHUNK_ATOMS, StructureBuilder, Structures
from torchmdx.config import key_hint
from torchmdx.errors import DataError


def _common_shapes(common: Optional[dict], values: dict, per_atom: bool) -> dict:
    """Keys of ``common`` (key -> shape, None where shapes differed) that ``values`` (key -> array) has too,
    with their shape (per atom: without the atoms' axis) or None where it differs; all of ``values`` when
    ``common`` is None (the first frame)."""
    shapes = {key: arr.shape[1:] if per_atom else arr.shape for key, arr in values.items()}
    if common is None:
        return shapes
    return {key: shape if shape == shapes[key] else None for key, shape in common.items() if key in shapes}


def dropped_extras_line(path, frames: int, counts: Counter, kept: list, shapes: dict) -> Optional[str]:
    """The one warning for numeric per-frame values (info keys, calculator results, per-atom arrays) that are left
    out of the read because not every frame has them, or not with one shape, else None. They were dropped without a
    word (round 33's leftover): a dipole or a charge array in 40 of 100 frames vanished from the cache. ``counts``:
    key -> frames that had it; ``shapes``: key -> the common shape, None where the shapes differ."""
    dropped = [f"{key} ({'shapes differ' if counts[key] == frames else f'in {counts[key]} of {frames} frames'})"
               for key in sorted(counts) if key not in kept and (counts[key] < frames or shapes.get(key, 0) is None)]
    if not dropped:
        return None
    return (f"{path}: {', '.join(dropped)} left out: a per-frame value is kept only when every frame has it with one "
            "shape (no training target reads these; the energies, forces and stress are read as before)")


class FrameSummary:
    """What the first pass keeps of each frame (module docstring), and what it decides.

    After :meth:`finish`: ``extras`` / ``atom_extras`` (the sorted keys kept), ``with_forces``,
    ``with_stress`` (in every frame, or in none), ``theory`` (the first frame's)."""

    def __init__(self, reading: AseReading):
        self.reading = reading
        self.atoms = array("q")  # atom count of each frame
        self.theory = None
        self.with_forces = self.with_stress = False  # some frame has them
        self.without_forces: Optional[str] = None  # where the first frame without forces is
        self.without_stress: Optional[str] = None  # ... without a stress
        self.periodic_without_stress: Optional[str] = None  # ... periodic, without a stress (no NaN for it)
        self._extras: Optional[dict] = None  # key -> shape (None: shapes differ) of the keys every frame had
        self._atom_extras: Optional[dict] = None
        self.extras: list = []
        self.atom_extras: list = []
        self._extra_counts: Counter = Counter()  # key -> frames that had it (per-structure and per-atom keys)

    def __len__(self) -> int:
        return len(self.atoms)

    def add(self, frame) -> None:
        """Note a frame's keys, shapes and flags (its values are not kept)."""
        if not self.atoms:
            self.theory = frame.theory
        if np.size(frame.numbers) == 0:  # an ASE database's row was "structure 3" (row 4), or "no forces key
            # 'forces', although other frames have one" where the others had forces (round 27)
            raise DataError(f"{frame.where}: has no atoms (an empty structure); drop it from the file")
        self.atoms.append(int(np.size(frame.numbers)))
        if frame.forces is not None:
            self.with_forces = True
        elif self.without_forces is None:
            self.without_forces = frame.where
        if frame.stress is not None:
            self.with_stress = True
        else:
            self.without_stress = self.without_stress or frame.where
            if np.any(frame.pbc) and self.periodic_without_stress is None:
                self.periodic_without_stress = frame.where
        self._extras = _common_shapes(self._extras, frame.extras, per_atom=False)
        self._atom_extras = _common_shapes(self._atom_extras, frame.atom_extras, per_atom=True)
        self._extra_counts.update(set(frame.extras) | set(frame.atom_extras))

    def finish(self) -> "FrameSummary":
        """Decide, from the frames noted, what the whole read decides, with its error lines: no frames; forces
        (then stress) in some frames but not all, or in none though the key was given."""
        r = self.reading
        if not self.atoms:
            raise DataError(f"{r.path}: contains no structures")
        self._all_or_none(self.with_forces, self.without_forces, f"forces key '{r.forces_key}'", r.explicit_forces,
                          r.forces_key)
        # frames that are not periodic (isolated atoms for reference energies) may lack a stress: NaN (add_frame)
        without = self.periodic_without_stress if self.with_stress else self.without_stress
        self._all_or_none(self.with_stress, without, f"stress key '{r.stress_key}' (or a virial)", r.explicit_stress,
                          r.stress_key)
        # extras: keep the keys every frame has with one shape
        self.extras = sorted(key for key, shape in self._extras.items() if shape is not None)
        self.atom_extras = sorted(key for key, shape in self._atom_extras.items() if shape is not None)
        line = dropped_extras_line(r.path, len(self.atoms), self._extra_counts, self.extras + self.atom_extras,
                                   {**self._extras, **self._atom_extras})
        if line:
            warnings.warn(line, stacklevel=2)
        return self

    def _all_or_none(self, present: bool, first_without: Optional[str], what: str, explicit: bool, key: str) -> None:
        """In every frame or in none, and in some if the key was given explicitly; otherwise a one-line
        DataError naming the first frame without it (and, for a key in no frame, a close key the frames have)."""
        if explicit and not present:  # ' forces' (a stray space) said only this (round 38): the hint
            raise DataError(f"{self.reading.path}: {what} not found in any frame{key_hint(key, self._extra_counts)}")
        if present and first_without is not None:
            raise DataError(f"{first_without}: no {what}, although other frames have one")

    def builder(self) -> StructureBuilder:
        """An empty builder with the read's metadata (keys, units in, theory) and the extras' units."""
        r = self.reading
        builder = StructureBuilder(str(r.path), format="ase", energy_key=r.energy_key,
                                   forces_key=r.forces_key if self.with_forces else None, group_key=r.group_key,
                                   units_in={"energy": r.energy_unit or "eV", "length": r.length_unit or "Å"})
        builder.extra_units = {k: "as in file" for k in self.extras + self.atom_extras}
        if self.with_stress:
            builder.extra_units["stress"] = "eV/Å³"
        if isinstance(self.theory, str):
            builder.metadata["theory"] = self.theory
        return builder


def add_frame(builder: StructureBuilder, fr, summary: FrameSummary) -> None:
    """Add one frame to ``builder`` in eV, Å (energy E·e, positions and cell x·l, forces F·e/l, stress σ·e/l³
    with e, l the read's unit factors), with the extras ``summary`` kept; a one-line DataError naming the frame
    for an energy that is not one finite number or forces that are not finite."""
    r = summary.reading
    e, length, f = r.factors
    try:
        if np.asarray(fr.energy).dtype.kind in "bc":  # energy=T was read as 1.0, 1+2j lost its imaginary part
            raise TypeError
        if np.size(fr.energy) != 1 and np.asarray(fr.energy).dtype.kind in "fiu":
            raise DataError(f"{fr.where}: energy '{r.energy_key}' holds {np.size(fr.energy)} values "
                            f"({np.asarray(fr.energy).reshape(-1)[:6].tolist()}); expected one number per frame "
                            "(shape ())")
        energy = float(np.asarray(fr.energy, dtype=np.float64).reshape(()))
    except (TypeError, ValueError):
        raise DataError(f"{fr.where}: energy {fr.energy!r} is not a number") from None
    if not np.isfinite(energy):  # was named only as 'structure k' by the dataset check
        raise DataError(f"{fr.where}: non-finite energy ({energy})")
    extras = {k: fr.extras[k].reshape(1, -1) if fr.extras[k].size > 1 else fr.extras[k].reshape(1)
              for k in summary.extras}
    stress = fr.stress
    if stress is None and not np.any(fr.pbc) and summary.with_stress:
        stress = np.full((3, 3), np.nan)
    if stress is not None:
        extras["stress"] = (stress * (e / length ** 3)).reshape(1, 9)
    atom_extras = {k: fr.atom_extras[k] for k in summary.atom_extras}
    forces = None if fr.forces is None else finite_values(fr.forces, f"forces '{r.forces_key}'", fr.where) * f
    builder.add(fr.numbers, fr.positions * length, [energy * e], forces, cell=fr.cell * length, pbc=fr.pbc,
                group=fr.group, extras=extras, atom_extras=atom_extras, where=fr.where)


def read_whole(reading: AseReading) -> Structures:
    """Every frame of the file, read once and held in memory, as one validated :class:`Structures`
    (``read_ase``)."""
    frames = list(reading.frames())
    summary = FrameSummary(reading)
    for frame in frames:
        summary.add(frame)
    summary.finish()
    builder = summary.builder()
    for frame in frames:
        add_frame(builder, frame, summary)
    return builder.build()


class _Packed:
    """Marks a numeric array written as (``_Packed``, dtype, shape, axis order, bytes) in the spill."""


def _pack(value):
    """A numeric ndarray (in a dict too) as (_Packed, dtype, shape, axis order, bytes): pickled in half the time of
    the array itself (numpy's reduce); anything else as it is. The axis order (None: C order) keeps the array's
    layout (ASE's forces of a calculator are in Fortran order): a sum over the arrays built from it (the cache's
    force statistics) adds in the same order as over the array parsed."""
    if type(value) is np.ndarray and value.dtype.kind in "biufc":
        if value.flags.c_contiguous:
            return _Packed, value.dtype.str, value.shape, None, value.tobytes()
        compact = value.copy(order="K")  # the axes' memory order kept, the gaps dropped
        order = tuple(int(k) for k in np.argsort([-stride for stride in compact.strides], kind="stable"))
        return _Packed, value.dtype.str, value.shape, order, compact.transpose(order).tobytes()
    if type(value) is dict:
        return {key: _pack(item) for key, item in value.items()}
    return value


def _unpack(value):
    """What :func:`_pack` packed, back: the same dtype, shape, values and axis order (a writable copy)."""
    if type(value) is tuple and len(value) == 5 and value[0] is _Packed:
        _, dtype, shape, order, data = value
        if order is None:
            return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
        stored = np.frombuffer(data, dtype=dtype).reshape(tuple(shape[k] for k in order)).copy()
        return stored.transpose(tuple(int(k) for k in np.argsort(order)))
    if type(value) is dict:
        return {key: _unpack(item) for key, item in value.items()}
    return value


class FrameSpill:
    """The frames of pass 1, kept for pass 2 in an unnamed temporary file (module docstring): each frame's fields
    pickled one after another (numeric arrays as dtype, shape, axis order and bytes: the same arrays back), so the
    file is parsed once. Memory: one frame; disk: about an extxyz's size (2.6 kB a frame of 32 atoms, float64)."""

    def __init__(self, folder=None):
        import tempfile

        self.folder = folder if folder is not None else tempfile.gettempdir()
        # unnamed (O_TMPFILE, or created and unlinked at once): nothing is left behind, even by a killed build
        with self._failing("create"):
            self._handle = tempfile.TemporaryFile(dir=folder, prefix=".torchmdx-frames-")
        self.frames = 0

    @contextlib.contextmanager
    def _failing(self, what: str):
        """An OSError of the spill (a full disk) as a line naming the spill's folder, not the file being read."""
        try:
            yield
        except OSError as exc:
            raise DataError(f"{self.folder}: cannot {what} the temporary file that keeps the frames between the two "
                            f"passes ({exc.strerror or exc}); it needs about the size of the file read: free "
                            "space there, or set TMPDIR (data info) or the cache folder (--cache-dir) elsewhere") \
                from None

    def add(self, frame) -> None:
        with self._failing("write"):
            pickle.dump(tuple(_pack(getattr(frame, name)) for name in _Frame.__slots__), self._handle,
                        protocol=pickle.HIGHEST_PROTOCOL)
        self.frames += 1

    @property
    def bytes(self) -> int:
        return self._handle.tell()

    def read(self):
        """The frames added, in order, one at a time."""
        self._handle.seek(0)
        for _ in range(self.frames):
            frame = _Frame()
            for name, value in zip(_Frame.__slots__, pickle.load(self._handle)):
                setattr(frame, name, _unpack(value))
            yield frame

    def close(self) -> None:
        self._handle.close()


def iter_ase(path, energy_key: Optional[str] = None, forces_key: Optional[str] = None,
             group_key: Optional[str] = None, energy_unit: Optional[str] = None,
             length_unit: Optional[str] = None, stress_key: Optional[str] = None,
             chunk_atoms: int = CHUNK_ATOMS, spill_dir=None):
    """``read_ase``'s structures as validated chunks of about ``chunk_atoms`` atoms, the file parsed once, its
    frames kept for the second pass in a temporary file in ``spill_dir`` (default: the system's temporary folder;
    module docstring): memory does not grow with the file. Options as ``read_ase``'s."""
    from tqdm.auto import tqdm

    reading = ase_reading(path, energy_key, forces_key, group_key, energy_unit, length_unit, stress_key)
    name = reading.path.name
    summary = FrameSummary(reading)
    spill = FrameSpill(spill_dir)
    try:
        for frame in reading.frames(desc=f"reading {name} (pass 1 of 2: keys and shapes)"):
            summary.add(frame)
            spill.add(frame)
        summary.finish()
        builder = summary.builder()
        unit = " rows" if reading.path.suffix == ".db" else " frames"
        for frame in tqdm(spill.read(), desc=f"reading {name} (pass 2 of 2: values)", total=len(summary), unit=unit,
                          disable=None):
            add_frame(builder, frame, summary)
            if builder.pending_atoms >= chunk_atoms:
                yield builder.take_chunk()
    finally:
        spill.close()
    chunk = builder.take_chunk()
    if chunk is not None:
        yield chunk
