"""In-memory form of a dataset: every reader returns a :class:`Structures`.

The layout is the one of the HDF5 cache (``torchmdx.data.cache``): atoms of all structures are
concatenated and ``offsets`` marks where each structure starts, so structure ``s`` is the atom
range ``offsets[s]:offsets[s+1]``. Everything is already in torchmdx's units:

========== ============ ======================================================
name        shape        meaning (unit)
========== ============ ======================================================
z           [A] int64     atomic numbers
pos         [A, 3] f8     positions (Å)
forces      [A, 3] f8     forces (eV/Å), or ``None`` when the dataset has none
energy      [S] f8        total energy (eV)
offsets     [S+1] int64   atom offsets, ``offsets[0] = 0``, ``offsets[-1] = A``
cell        [S, 3, 3] f8  cell vectors as rows (Å); zeros for molecules
pbc         [S, 3] bool   periodic directions
group       [S] int64     index into ``group_names`` (molecule, polymer family), or ``None``
extras      name -> [S] or [S, k]  further per-structure targets (QM9 properties, ...)
atom_extras name -> [A] or [A, k]  further per-atom values (e.g. QM9 Mulliken charges)
========== ============ ======================================================

``extra_units`` names the unit of each extra; ``metadata`` carries the provenance (format,
source, level of theory, published atomic reference energies, notes about dropped entries).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from torchmdx.data.coincident import coincident_atoms, coincident_words, far_atom, far_coordinate_words
from torchmdx.errors import DataError

#: The largest atomic number torchmdx knows (oganesson).
MAX_ATOMIC_NUMBER = 118

#: atoms per chunk of a streamed read (ANI, ASE files; about 50 MB of positions and forces in float64)
CHUNK_ATOMS = 1 << 20


def element_symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z={z}"


def element_label(z: int) -> str:
    """An element for a message: its symbol and atomic number, ``C (Z=6)``, or ``Z=200`` alone where there is no
    symbol (``element_symbol(z) (Z=z)`` read "element Z=200 (Z=200)")."""
    from ase.data import chemical_symbols

    z = int(z)
    return f"{chemical_symbols[z]} (Z={z})" if 0 <= z < len(chemical_symbols) else f"Z={z}"


@dataclass
class Structures:
    z: np.ndarray
    pos: np.ndarray
    energy: np.ndarray
    offsets: np.ndarray
    forces: Optional[np.ndarray] = None
    cell: Optional[np.ndarray] = None
    pbc: Optional[np.ndarray] = None
    group: Optional[np.ndarray] = None
    group_names: list = field(default_factory=list)
    extras: dict = field(default_factory=dict)
    atom_extras: dict = field(default_factory=dict)
    extra_units: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.energy)
        if self.cell is None:
            self.cell = np.zeros((n, 3, 3))
        if self.pbc is None:
            self.pbc = np.zeros((n, 3), dtype=bool)

    # -- sizes -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(len(self.energy))

    @property
    def n_atoms(self) -> int:
        return int(len(self.z))

    @property
    def atoms_per_structure(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def structure_index(self) -> np.ndarray:
        """[A] index of the structure each atom belongs to."""
        return np.repeat(np.arange(len(self)), self.atoms_per_structure)

    @property
    def elements(self) -> list[int]:
        return [int(v) for v in np.unique(self.z)]

    @property
    def source(self) -> str:
        return str(self.metadata.get("source", "<dataset>"))

    def group_labels(self) -> Optional[np.ndarray]:
        """[S] group names (strings) or None."""
        if self.group is None:
            return None
        return np.asarray(self.group_names, dtype=object)[self.group]

    # -- checks ----------------------------------------------------------------------------------
    def validate(self, first: int = 0, names=None) -> "Structures":
        """Check shapes and values; raise :class:`DataError` naming the file and the problem.

        ``first``: the index of this block's first structure in the whole dataset (a chunk of a
        streamed read), so that messages name the structure's index in the dataset. ``names(s)``: for
        structure ``s`` of this block, (where, what) in the reader's own terms (an ANI group and "conformation
        1"), or None for "<source>: ... structure <first + s>" (:meth:`StructureBuilder.add`'s ``conformations``)."""
        src = self.source
        n, a = len(self), self.n_atoms
        if n == 0:
            raise DataError(f"{src}: contains no structures")
        off = self.offsets
        if off.shape == (n + 1,) and off[0] == 0 and off[-1] == a and np.any(np.diff(off) == 0):
            empty = int(np.flatnonzero(np.diff(off) == 0)[0])
            raise DataError(f"{src}: structure {first + empty} has no atoms")
        if off.shape != (n + 1,) or off[0] != 0 or off[-1] != a or np.any(np.diff(off) <= 0):
            raise DataError(f"{src}: atom offsets do not match the {n} structures and {a} atoms")
        if self.pos.shape != (a, 3):
            raise DataError(f"{src}: positions have shape {self.pos.shape}, expected ({a}, 3)")
        if self.forces is not None and self.forces.shape != (a, 3):
            raise DataError(f"{src}: forces have shape {self.forces.shape}, expected ({a}, 3)")
        if self.cell.shape != (n, 3, 3) or self.pbc.shape != (n, 3):
            raise DataError(f"{src}: cell/pbc shapes {self.cell.shape}/{self.pbc.shape} do not match {n} structures")
        for name, arr in self.extras.items():
            if len(arr) != n:
                raise DataError(f"{src}: property '{name}' has {len(arr)} values for {n} structures")
        for name, arr in self.atom_extras.items():
            if len(arr) != a:
                raise DataError(f"{src}: per-atom property '{name}' has {len(arr)} values for {a} atoms")
        if self.group is not None and (len(self.group) != n or (n and self.group.max() >= len(self.group_names))):
            raise DataError(f"{src}: group labels do not match the {n} structures")
        bad = np.flatnonzero((self.z < 1) | (self.z > MAX_ATOMIC_NUMBER))
        if bad.size:
            s = int(np.searchsorted(off, bad[0], side="right") - 1)
            raise DataError(
                f"{src}: invalid atomic number {int(self.z[bad[0]])} in structure {first + s} (atom {bad[0] - off[s]}); "
                f"expected 1..{MAX_ATOMIC_NUMBER}"
            )
        self._check_finite(self.pos, "coordinates", per_atom=True, first=first)
        self._check_finite(self.energy, "energy", per_atom=False, first=first)
        if self.forces is not None:
            self._check_finite(self.forces, "forces", per_atom=True, first=first)
        self._check_finite(self.cell, "cell", per_atom=False, first=first)
        self._check_coincident_atoms(first, names)
        return self

    def _check_coincident_atoms(self, first: int = 0, names=None) -> None:
        """Two atoms of one structure at the same position (a duplicated line, a bad conversion)
        give zero distances no model can use: the error names the file, structure and atoms here,
        where the model would only name atom indices of a batch. Exact for atoms closer than
        :data:`~torchmdx.data.coincident.COINCIDENT_DISTANCE`, periodic images included (:func:`coincident_atoms`:
        sorting, O(A log A) time and O(A) memory)."""
        if self.n_atoms < 2:
            return
        far = far_atom(self.pos, self.offsets)
        if far is not None:
            s = int(np.searchsorted(self.offsets, far, side="right") - 1)
            where, which = (names(s) if names is not None else None) or (self.source, first + s)
            raise DataError(f"{where}: {far_coordinate_words(far - int(self.offsets[s]), self.pos[far], which)}")
        found = coincident_atoms(self.pos, self.offsets, self.cell, self.pbc)
        if found is None:
            return
        a, b, image = found
        s = int(np.searchsorted(self.offsets, a, side="right") - 1)
        start = int(self.offsets[s])
        where, which = (names(s) if names is not None else None) or (self.source, first + s)
        raise DataError(f"{where}: {coincident_words(a - start, b - start, self.pos[a], image, which)}")

    def _check_finite(self, arr: np.ndarray, what: str, per_atom: bool, first: int = 0) -> None:
        finite = np.isfinite(arr)
        if finite.all():
            return
        row = np.flatnonzero(~finite.reshape(len(arr), -1).all(axis=1))[0]
        value = arr[row].ravel()[~finite[row].ravel()][0]
        if per_atom:
            s = int(np.searchsorted(self.offsets, row, side="right") - 1)
            where = f"structure {first + s} (atom {row - self.offsets[s]})"
        else:
            where = f"structure {first + row}"
        raise DataError(f"{self.source}: non-finite {what} ({value}) in {where}")

    def check_max_z(self, max_z: int) -> None:
        """Raise if an element lies beyond a model's embedding rows: atomic numbers must be
        below ``max_z`` (TorchMD-NET's meaning: ``max_z`` rows embed Z = 0 .. max_z - 1)."""
        check_max_z(self.z, self.offsets, max_z, self.source)

    # -- selection -------------------------------------------------------------------------------
    def select(self, indices) -> "Structures":
        """A new :class:`Structures` with the given structures (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        counts = self.atoms_per_structure[idx]
        atom_idx = atom_indices(self.offsets, idx)
        return dataclasses.replace(
            self,
            z=self.z[atom_idx],
            pos=self.pos[atom_idx],
            forces=None if self.forces is None else self.forces[atom_idx],
            energy=self.energy[idx],
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            cell=self.cell[idx],
            pbc=self.pbc[idx],
            group=None if self.group is None else self.group[idx],
            extras={k: v[idx] for k, v in self.extras.items()},
            atom_extras={k: v[atom_idx] for k, v in self.atom_extras.items()},
        )


def atom_indices(offsets: np.ndarray, indices) -> np.ndarray:
    """Indices of the atoms of structures ``indices`` (in that order) in the concatenated arrays."""
    idx = np.asarray(indices, dtype=np.int64)
    counts = np.diff(offsets)[idx]
    first = np.repeat(offsets[idx] - (np.cumsum(counts) - counts), counts)
    return first + np.arange(counts.sum())


def structure_indices(indices, n: int, what: str) -> np.ndarray:
    """``indices`` (a sequence, array or tensor of structure numbers) as int64 [k], or a one-line DataError naming
    ``what``. A boolean mask of length ``n`` selects as numpy indexing does (it was cast to 0 and 1: structures 0
    and 1 over and over, without a word; round 33); a mask of another length and fractional numbers (2.7 was
    structure 2) are refused. The range 0..n-1 is the caller's check."""
    arr = indices.detach().cpu().numpy() if hasattr(indices, "detach") else np.asarray(indices)
    arr = arr.reshape(-1)
    if arr.dtype.kind == "b":
        if arr.size != n:
            raise DataError(f"{what}: a boolean mask of {arr.size} entries for {n} structures; give one entry per "
                            "structure, or the structure indices (np.flatnonzero(mask))")
        return np.flatnonzero(arr).astype(np.int64)
    if arr.dtype.kind in "iu" or arr.size == 0:
        return arr.astype(np.int64)
    whole = np.isfinite(arr) & (arr == np.round(arr)) if arr.dtype.kind == "f" else np.zeros(arr.shape, bool)
    if whole.all():
        return arr.astype(np.int64)  # 2.0 is structure 2
    bad = arr[~whole][0]
    raise DataError(f"{what}: structure indices must be whole numbers, got {bad.item() if hasattr(bad, 'item') else bad!r}"
                    f" ({arr.dtype} values)")


def check_max_z(z: np.ndarray, offsets: np.ndarray, max_z: int, source: str, first: int = 0) -> None:
    """DataError naming the first atom whose atomic number is not below ``max_z`` (the number of
    embedding rows: Z = 0 .. max_z - 1 are accepted); ``first``: index of the first structure."""
    bad = np.flatnonzero(z >= max_z)
    if bad.size:
        s = first + int(np.searchsorted(offsets, bad[0], side="right") - 1)
        zz = int(z[bad[0]])
        raise DataError(
            f"{source}: element {element_label(zz)} in structure {s} is beyond the model's range "
            f"(max_z={max_z}: atomic numbers below {max_z})"
        )


class StructureBuilder:
    """Collects blocks of structures from a reader, then concatenates them once.

    A *block* is ``n`` structures of the same ``N`` atoms (an MD17 trajectory, an ANI molecule
    group); :meth:`add` takes positions ``[n, N, 3]`` and per-structure arrays ``[n, ...]``.
    Values must already be converted to eV / Å.
    """

    def __init__(self, source: str, **metadata: Any):
        self.source = source
        self.metadata = {"source": source, **metadata}
        self._z, self._pos, self._forces, self._energy, self._counts = [], [], [], [], []
        self._cell, self._pbc, self._group = [], [], []
        self._extras: dict[str, list] = {}
        self._atom_extras: dict[str, list] = {}
        self.extra_units: dict[str, str] = {}
        self.group_names: list[str] = []
        self._group_index: dict[str, int] = {}
        self._has_forces: Optional[bool] = None
        self._has_group: Optional[bool] = None
        self._blocks = 0  # blocks added in all (chunks taken included)
        self._names: list = []  # per block since the last chunk: (structures, where, conformation numbers or None)
        self._taken = 0  # structures already handed out by take_chunk
        self.pending_atoms = 0  # atoms added since the last chunk

    def __len__(self):
        return self._taken + sum(len(e) for e in self._energy)

    def add(
        self,
        numbers,
        positions,
        energy,
        forces=None,
        cell=None,
        pbc=None,
        group: Optional[str] = None,
        extras: Optional[dict] = None,
        atom_extras: Optional[dict] = None,
        where: str = "",
        conformations=None,
    ) -> None:
        """``conformations``: the block's structures' numbers in ``where`` (an ANI group's conformations), so that
        a check of :meth:`Structures.validate` names "where: ... of conformation k", not the running number of
        the structure in the file (round 24)."""
        where = where or self.source
        self._blocks += 1
        numbers = _atomic_numbers(numbers, where)
        positions = np.asarray(numeric_values(positions, "coordinates", where), dtype=np.float64)
        if positions.ndim == 2:
            positions = positions[None]
        n, natoms = positions.shape[0], numbers.shape[0]
        if positions.shape[1:] != (natoms, 3):
            raise DataError(
                f"{where}: coordinates have shape {tuple(positions.shape)} but there are {natoms} atomic numbers; "
                f"expected ({n}, {natoms}, 3)"
            )
        energy = np.asarray(numeric_values(energy, "energies", where), dtype=np.float64).reshape(-1)
        if energy.shape[0] != n:
            raise DataError(f"{where}: {energy.shape[0]} energies for {n} structures (coordinates)")
        has_forces = forces is not None
        if self._has_forces is None:
            self._has_forces = has_forces
        elif self._has_forces != has_forces:
            raise DataError(f"{where}: forces are given for some structures but not for others")
        if has_forces:
            forces = np.asarray(numeric_values(forces, "forces", where), dtype=np.float64)
            if forces.ndim == 2:
                forces = forces[None]
            if forces.shape != positions.shape:
                key = self.metadata.get("forces_key")
                named = f" '{key}'" if isinstance(key, str) and key else ""
                if forces.size == n:  # one number per structure: an energy read as the forces (round 27: "forces
                    # have shape () but coordinates (1, 3, 3)")
                    raise DataError(f"{where}: forces{named} hold one number per structure, expected a 3-vector per "
                                    f"atom ({natoms}, 3): is{named or ' it'} the forces key?")
                raise DataError(
                    f"{where}: forces have shape {tuple(forces.shape)} but coordinates {tuple(positions.shape)}"
                )
            self._forces.append(forces.reshape(-1, 3))
        self._names.append((n, where, None if conformations is None else np.asarray(conformations).reshape(n)))
        self._z.append(np.tile(numbers, n))
        self._pos.append(positions.reshape(-1, 3))
        self._energy.append(energy)
        self._counts.append(np.full(n, natoms, dtype=np.int64))
        self.pending_atoms += n * natoms
        if cell is None:
            cell = np.zeros((n, 3, 3))
        cell = np.broadcast_to(np.asarray(cell, dtype=np.float64), (n, 3, 3))
        self._cell.append(cell)
        if pbc is None:
            pbc = np.zeros((n, 3), dtype=bool)
        self._pbc.append(np.broadcast_to(np.asarray(pbc, dtype=bool), (n, 3)))
        has_group = group is not None
        if self._has_group is None:
            self._has_group = has_group
        elif self._has_group != has_group:
            raise DataError(f"{where}: group label missing for some structures")
        if has_group:
            if not isinstance(group, (str, bytes)) and np.ndim(group) != 0:  # became the text "[1 2]"
                raise DataError(f"{where}: group label {np.asarray(group).reshape(-1)[:6].tolist()} holds "
                                f"{np.size(group)} values; expected one name or number per structure")
            key = str(group)
            if key not in self._group_index:
                self._group_index[key] = len(self.group_names)
                self.group_names.append(key)
            self._group.append(np.full(n, self._group_index[key], dtype=np.int64))
        self._add_extras(self._extras, extras or {}, n, where, "property")
        self._add_extras(self._atom_extras, atom_extras or {}, n * natoms, where, "per-atom property")

    def _add_extras(self, store, values, expected, where, what):
        first_block = self._blocks == 1
        if set(values) != set(store) and not (first_block and not store):
            missing = sorted(set(store) ^ set(values))
            raise DataError(f"{where}: {what} {', '.join(missing)} present for some structures but not others")
        for name, value in values.items():
            arr = np.asarray(value)
            if arr.ndim == 0 or arr.shape[0] != expected:
                if arr.size % expected:
                    raise DataError(f"{where}: {what} '{name}' has {arr.size} values for {expected} entries")
                arr = arr.reshape(expected, -1)
                if arr.shape[1] == 1:
                    arr = arr[:, 0]
            store.setdefault(name, []).append(arr)

    def build(self) -> Structures:
        """All the structures added, validated (the whole dataset in memory)."""
        if not self._energy:
            raise DataError(f"{self.source}: contains no structures")
        return self._assemble(dict(self.metadata), list(self.group_names)).validate(names=self._namer())

    def take_chunk(self) -> Optional[Structures]:
        """The structures added since the last chunk, validated (messages name their index in the
        whole dataset), then forgotten: a streamed read holds one chunk at a time (None when
        nothing was added). Group labels index the builder's growing ``group_names`` (the chunk
        shares that list and the live ``metadata`` dict, final once the reader is done)."""
        if not self._energy:
            return None
        chunk = self._assemble(self.metadata, self.group_names).validate(first=self._taken, names=self._namer())
        self._taken += len(chunk)
        self.pending_atoms = 0
        for store in (self._z, self._pos, self._forces, self._energy, self._counts, self._cell, self._pbc,
                      self._group, self._names):
            store.clear()
        for store in (self._extras, self._atom_extras):
            for parts in store.values():
                parts.clear()
        return chunk

    def _namer(self):
        """``names`` of :meth:`Structures.validate` for the blocks since the last chunk (None: none has
        conformation numbers)."""
        blocks = list(self._names)
        if all(numbers is None for _, _, numbers in blocks):
            return None
        ends = np.cumsum([n for n, _, _ in blocks])

        def names(s: int):
            k = int(np.searchsorted(ends, s, side="right"))
            _, where, numbers = blocks[k]
            return None if numbers is None else (where, f"conformation {int(numbers[s - (ends[k] - blocks[k][0])])}")

        return names

    def _assemble(self, metadata: dict, group_names: list) -> Structures:
        counts = np.concatenate(self._counts)
        structures = Structures(
            z=np.concatenate(self._z),
            pos=np.concatenate(self._pos),
            energy=np.concatenate(self._energy),
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            forces=np.concatenate(self._forces) if self._has_forces else None,
            cell=np.concatenate(self._cell),
            pbc=np.concatenate(self._pbc),
            group=np.concatenate(self._group) if self._has_group else None,
            group_names=group_names,
            extras={k: _concat(v, k, self.source) for k, v in self._extras.items()},
            atom_extras={k: _concat(v, k, self.source) for k, v in self._atom_extras.items()},
            extra_units=dict(self.extra_units),
            metadata=metadata,
        )
        return structures


#: names of numpy dtype kinds that are not numbers, for :func:`numeric_values`
_NOT_NUMBERS = {"b": "true/false", "c": "complex", "S": "text", "U": "text", "O": "object", "V": "compound"}


def numeric_values(values, what: str, where: str) -> np.ndarray:
    """``values`` as an array of real numbers (float, int or unsigned), else a one-line DataError
    naming ``what`` (``astype(float)`` reads True as 1.0 and drops imaginary parts; text fails
    with a numpy traceback)."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu":
        first = arr.reshape(-1)[0] if arr.size else None
        first = first.item() if hasattr(first, "item") else first
        raise DataError(f"{where}: {what} must be real numbers, got {_NOT_NUMBERS.get(arr.dtype.kind, 'other')} "
                        f"values ({arr.dtype}; first: {first!r})")
    if arr.dtype == np.float16:  # read without a word: about 3 significant digits, the rest already lost
        raise DataError(f"{where}: {what} holds float16 values, which keep about 3 significant digits "
                        f"({_float16_step(arr)}); expected float32 or float64: write the file at full precision "
                        "(or, if these rounded values are meant, convert them with .astype(numpy.float32))")
    return arr


def _float16_step(arr: np.ndarray) -> str:
    """How coarse float16 ``arr`` is: the spacing of float16 numbers at its largest finite magnitude."""
    finite = np.abs(arr[np.isfinite(arr)]).astype(np.float64)
    if finite.size == 0:
        return "no finite values"
    largest = float(finite.max())
    return f"steps of {float(np.spacing(np.float16(largest))):.2g} at its largest magnitude, {largest:.4g}"


def _atomic_numbers(numbers, where: str) -> np.ndarray:
    """[N] int64 atomic numbers; a value that is not a whole number (6.5, NaN, a string) is a
    DataError naming the atom (``astype`` would silently truncate 6.5 to carbon)."""
    raw = np.asarray(numbers).reshape(-1)
    if raw.dtype.kind in "iu":
        return raw.astype(np.int64)
    try:
        if raw.dtype.kind in "bc":  # True would be hydrogen; 6+1j carbon
            raise TypeError
        values = raw.astype(np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: atomic numbers must be whole numbers, got {raw.dtype} values "
                        f"(first: {raw[0]!r})") from None
    bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
    if bad.size:
        value = raw[bad[0]]
        value = value.item() if hasattr(value, "item") else value
        raise DataError(f"{where}: atomic number {value!r} of atom {int(bad[0])} is not a whole number")
    return values.astype(np.int64)


def _concat(parts, name, source):
    try:
        return np.concatenate(parts)
    except ValueError:
        raise DataError(f"{source}: property '{name}' has different shapes in different structures") from None


def concat_structures(chunks, source: str = "<dataset>") -> Structures:
    """One :class:`Structures` of the chunks of a streamed read, in order (group labels merged
    by name, in order of first appearance; metadata of the last chunk)."""
    parts = [c for c in chunks if c is not None and len(c)]
    if not parts:
        raise DataError(f"{source}: contains no structures")
    first, last = parts[0], parts[-1]
    counts = np.concatenate([c.atoms_per_structure for c in parts])
    names: list = []
    index: dict = {}
    groups = None
    if first.group is not None:
        groups = []
        for c in parts:
            used = np.unique(c.group)
            lookup = np.zeros(int(used.max()) + 1 if used.size else 1, dtype=np.int64)
            for g in used:
                name = c.group_names[int(g)]
                if name not in index:
                    index[name] = len(names)
                    names.append(name)
                lookup[g] = index[name]
            groups.append(lookup[c.group])
    return Structures(
        z=np.concatenate([c.z for c in parts]),
        pos=np.concatenate([c.pos for c in parts]),
        energy=np.concatenate([c.energy for c in parts]),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        forces=None if first.forces is None else np.concatenate([c.forces for c in parts]),
        cell=np.concatenate([c.cell for c in parts]),
        pbc=np.concatenate([c.pbc for c in parts]),
        group=None if groups is None else np.concatenate(groups),
        group_names=names,
        extras={k: _concat([c.extras[k] for c in parts], k, source) for k in first.extras},
        atom_extras={k: _concat([c.atom_extras[k] for c in parts], k, source) for k in first.atom_extras},
        extra_units=dict(last.extra_units),
        metadata=dict(last.metadata),
    )
