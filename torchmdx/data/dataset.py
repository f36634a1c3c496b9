"""The PyG dataset over an HDF5 cache.

``H5Dataset(path)[i]`` is a :class:`torch_geometric.data.Data` with

=========== ============ =========================================================
key          shape        meaning (unit, dtype)
=========== ============ =========================================================
z            [N]          atomic numbers (long)
pos          [N, 3]       positions (Å, ``dtype``)
energy       [1]          total energy (eV, ``energy_dtype``, float64 by default)
forces       [N, 3]       forces (eV/Å, ``dtype``), when the dataset has forces
cell         [1, 3, 3]    cell vectors as rows (Å, ``dtype``); zeros for molecules
pbc          [1, 3]       periodic directions (bool)
group        [1]          group label index (long), when the dataset has groups
idx          [1]          index of the structure in the dataset (long)
<extra>      [1] / [1,k]  per-structure extras, e.g. QM9's ``homo`` (``energy_dtype``)
<atom extra> [N] / [N,k]  per-atom extras, e.g. QM9's ``mulliken_charge`` (``dtype``)
=========== ============ =========================================================

Energies stay float64 by default: a total energy of -4000 eV in float32 has a resolution of
0.5 meV, the size of a good model's error; subtract atomic references in float64 first.

The whole cache is read into memory with one read per array when the dataset is created (the
arrays stay as stored: float64 positions and forces, uint8 atomic numbers; items and batches are
gathered from them and cast to ``dtype``; ``mmap=True`` instead memory-maps the per-atom arrays and the cells, for datasets larger than
RAM or shared by several DDP ranks on one host; ``mmap="auto"`` does so above
:data:`MMAP_AUTO_BYTES`); items are slices of those arrays, so ``__getitem__`` does no file
I/O. Batch with ``torch_geometric.loader.DataLoader``, or faster with
:class:`~torchmdx.data.loader.BatchLoader` (:meth:`H5Dataset.collate`: one gather per array).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch_geometric.data import Batch, Data
from torch_geometric.data import Dataset as PygDataset

from torchmdx.data.cache import cache_info
from torchmdx.data.structures import Structures
from torchmdx.dtypes import torch_dtype
from torchmdx.errors import DataError

def as_torch_dtype(dtype) -> torch.dtype:
    """torch dtype of a dataset's tensors: float32, float64, float16 or bfloat16 (or a name of
    :data:`torchmdx.dtypes.FLOAT_DTYPES`)."""
    return torch_dtype(dtype, (torch.float32, torch.float64, torch.float16, torch.bfloat16), DataError)


#: ``mmap="auto"`` memory-maps a cache whose per-atom arrays take more bytes than this
MMAP_AUTO_BYTES = 1 << 30


def per_atom_bytes(info: dict) -> int:
    """Bytes of a cache's per-atom arrays (z, positions, forces) as stored."""
    return int(info["n_atoms"]) * (1 + 24 * (2 if info["has_forces"] else 1))


def resolve_mmap(mmap, info: dict) -> bool:
    """``mmap`` as a bool: ``"auto"`` memory-maps above :data:`MMAP_AUTO_BYTES` of per-atom arrays."""
    if mmap == "auto":
        return per_atom_bytes(info) > MMAP_AUTO_BYTES
    if not isinstance(mmap, bool):
        raise DataError(f"mmap must be true, false or 'auto', got {mmap!r}")
    return mmap


def _take(tensor: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """``tensor[index]`` gathered by numpy (single-threaded: no thread-pool start-up per batch,
    which dominates small gathers on a busy CPU); torch for dtypes numpy lacks."""
    if tensor.dtype in (torch.bfloat16,):
        return tensor[torch.from_numpy(index)]
    return torch.from_numpy(tensor.numpy()[index])


class H5Dataset(PygDataset):
    """Structures of a torchmdx HDF5 cache as PyG ``Data`` objects (see the module docstring).

    Args:
        path: the cache file (:func:`torchmdx.data.build_cache` makes it).
        dtype: floating dtype of positions, forces and cell.
        energy_dtype: dtype of energies and per-structure extras (float64 keeps sub-meV precision).
        mmap: memory-map the per-atom arrays and the cells instead of reading them into memory
            (batches then gather from the page cache, which DDP ranks on one host share);
            ``"auto"``: when the per-atom arrays take more than :data:`MMAP_AUTO_BYTES`.
            Batches are the same, bit for bit, either way.
        extras: include per-structure and per-atom extras (True), none (False), or the named ones.
        transform: optional PyG transform applied to each item.
    """

    def __init__(self, path, dtype=torch.float32, energy_dtype=torch.float64, mmap="auto",
                 extras=True, transform=None):
        super().__init__(None, transform)
        from torchmdx.data.ani import open_h5
        from torchmdx.data.cache import memory_map

        self.path = Path(path)
        if not self.path.is_file():
            from torchmdx.io_utils import missing_file_reason

            raise DataError(f"{self.path}: {missing_file_reason(self.path)}")
        self.dtype = as_torch_dtype(dtype)
        self.energy_dtype = as_torch_dtype(energy_dtype)
        self.info = cache_info(self.path)
        mmap = resolve_mmap(mmap, self.info)
        names = self.info["extras"] if extras is True else [] if extras is False else list(extras)
        atom_names = self.info["atom_extras"] if extras is True else [] if extras is False else \
            [n for n in extras if n in self.info["atom_extras"]]
        missing = [n for n in names if n not in self.info["extras"] and n not in self.info["atom_extras"]]
        if missing:
            raise DataError(f"{self.path}: no extra {', '.join(missing)}; available: "
                            f"{', '.join(self.info['extras'] + self.info['atom_extras']) or 'none'}")
        names = [n for n in names if n in self.info["extras"]]
        with open_h5(self.path) as h5:
            big = (lambda n: memory_map(h5, n, self.path)) if mmap else (lambda n: h5[n][()])
            z = big("z")
            pos = big("pos")
            forces = big("forces") if "forces" in h5 else None
            atom_extras = {n: big(f"atom_extras/{n}") for n in atom_names}
            cell = big("cell")
            pbc = big("pbc")
            group = big("group") if "group" in h5 else None
            energy = h5["energy"][()]
            offsets = h5["offsets"][()]
            extra_values = {n: h5[f"extras/{n}"][()] for n in names}
        metadata = dict(self.info["metadata"], source=self.info["source"], cache=str(self.path))
        #: the arrays as numpy (eV, Å), for statistics and fitting without iterating items
        #: (memory-mapped with ``mmap``: use them in chunks)
        self.structures = Structures(
            z=z, pos=pos, energy=energy, offsets=offsets, forces=forces, cell=cell, pbc=pbc, group=group,
            group_names=self.info["group_names"], extras=extra_values, atom_extras=atom_extras,
            extra_units={k: v for k, v in self.info["extra_units"].items() if k in names or k in atom_names},
            metadata=metadata,
        )
        self.mmap = mmap
        self._offsets = offsets.astype(np.int64)
        self._counts = np.diff(self._offsets)
        self._energy = torch.from_numpy(energy).to(self.energy_dtype)
        self._extras = {n: torch.from_numpy(np.asarray(v)).to(self.energy_dtype) for n, v in extra_values.items()}

    # -- PyG Dataset interface --------------------------------------------------------------------
    def len(self) -> int:
        return len(self._energy)

    def get(self, idx: int) -> Data:
        a, b = int(self._offsets[idx]), int(self._offsets[idx + 1])
        s = slice(idx, idx + 1)
        st = self.structures
        atoms = slice(a, b)
        one = np.array([idx], dtype=np.int64)
        data = Data(z=self._atom_values("z", st.z, atoms), pos=self._atom_values("pos", st.pos, atoms),
                    energy=self._energy[s], cell=self._structure_values("cell", one),
                    pbc=self._structure_values("pbc", one), idx=torch.tensor([idx]))
        if st.forces is not None:
            data.forces = self._atom_values("forces", st.forces, atoms)
        if st.group is not None:
            data.group = self._structure_values("group", one)
        for name, values in self._extras.items():
            data[name] = values[s]
        for name, values in st.atom_extras.items():
            data[name] = self._atom_values(name, values, atoms)
        return data

    def collate(self, indices) -> Batch:
        """The PyG ``Batch`` of structures ``indices``, built directly from the concatenated arrays
        (vectorised gathers; the same keys, shapes, ``batch`` and ``ptr`` as
        ``Batch.from_data_list([self[i] for i in indices])``, without making one ``Data`` per
        structure). ``transform`` is not applied here."""
        # index arithmetic in numpy: small, and free of thread start-up costs
        idx_np = (indices.numpy() if torch.is_tensor(indices) else np.asarray(indices)).astype(np.int64).reshape(-1)
        outside = (idx_np < 0) | (idx_np >= len(self._counts))
        if outside.any():  # -1 gathered the wrong atoms ("index 270 is out of bounds"), 100 an IndexError
            raise DataError(f"{self.structures.source}: structure index {int(idx_np[outside][0])} is outside "
                            f"0..{len(self._counts) - 1} (the dataset's {len(self._counts)} structures)")
        counts = self._counts[idx_np]
        ptr_np = np.zeros(len(idx_np) + 1, dtype=np.int64)
        np.cumsum(counts, out=ptr_np[1:])
        n_total = int(ptr_np[-1])
        atoms_np = np.repeat(self._offsets[idx_np] - ptr_np[:-1], counts) + np.arange(n_total)
        idx, ptr = torch.from_numpy(idx_np), torch.from_numpy(ptr_np)
        batch_vector = torch.from_numpy(np.repeat(np.arange(len(idx_np)), counts))
        st = self.structures
        per_atom = {"z": self._atom_values("z", st.z, atoms_np), "pos": self._atom_values("pos", st.pos, atoms_np)}
        if st.forces is not None:
            per_atom["forces"] = self._atom_values("forces", st.forces, atoms_np)
        per_atom.update({n: self._atom_values(n, v, atoms_np) for n, v in st.atom_extras.items()})
        per_structure = {"energy": _take(self._energy, idx_np), "cell": self._structure_values("cell", idx_np),
                         "pbc": self._structure_values("pbc", idx_np), "idx": idx}
        if self.structures.group is not None:
            per_structure["group"] = self._structure_values("group", idx_np)
        per_structure.update({n: _take(v, idx_np) for n, v in self._extras.items()})
        batch = Batch(batch=batch_vector, ptr=ptr, **per_atom, **per_structure)
        # what Batch.from_data_list records, so that batch.to_data_list() / batch[i] work
        graph_ptr = torch.arange(len(idx) + 1)
        batch._num_graphs = len(idx)
        batch._slice_dict = {**{k: ptr for k in per_atom}, **{k: graph_ptr for k in per_structure}}
        zeros = torch.zeros(len(idx), dtype=torch.long)
        batch._inc_dict = {k: zeros for k in batch._slice_dict}
        return batch

    def _atom_values(self, name: str, array: np.ndarray, index) -> torch.Tensor:
        """Rows ``index`` (indices or a slice) of a per-atom array as a tensor: atomic numbers as
        long, the rest in ``dtype`` (gathered from the stored float64, then cast: the same values
        as casting the whole array first)."""
        values = np.asarray(array[index])
        if name == "z":
            return torch.from_numpy(values.astype(np.int64))
        if not values.flags.writeable:  # a slice of a read-only map: the tensor gets its own copy
            values = values.copy()
        return torch.from_numpy(np.ascontiguousarray(values)).to(self.dtype)

    def _structure_values(self, name: str, index: np.ndarray) -> torch.Tensor:
        """cell, pbc or group of structures ``index``."""
        values = np.asarray(getattr(self.structures, name)[index])
        if name == "cell":
            return torch.from_numpy(values).to(self.dtype)
        if name == "pbc":
            return torch.from_numpy(values.astype(bool))
        return torch.from_numpy(values.astype(np.int64))

    # -- what the rest of torchmdx asks about ----------------------------------------------------
    @property
    def n_structures(self) -> int:
        return self.len()

    @property
    def n_atoms(self) -> int:
        return int(self._offsets[-1])

    @property
    def has_forces(self) -> bool:
        return self.structures.forces is not None

    @property
    def has_stress(self) -> bool:
        """Whether the data hold stress labels (the per-structure extra ``stress``, ASE files)."""
        return "stress" in self.info.get("extras", [])

    @property
    def elements(self) -> list[int]:
        """Atomic numbers present, sorted (from the cache's build statistics)."""
        counts = (self.info.get("statistics") or {}).get("element_counts")
        if counts is not None:
            return sorted(int(z) for z, c in counts.items() if c)
        return [int(v) for v in np.flatnonzero(np.bincount(np.asarray(self.structures.z, dtype=np.int64)))]

    @property
    def group_names(self) -> list[str]:
        return list(self.structures.group_names)

    @property
    def metadata(self) -> dict:
        return self.structures.metadata

    @property
    def source(self) -> str:
        return self.structures.source

    def published_atomrefs(self, key: Optional[str] = None) -> Optional[np.ndarray]:
        """The dataset's own atomic reference energies for its energy (eV per atom over Z),
        e.g. QM9's; None when it carries none."""
        refs = self.metadata.get("atomrefs") or {}
        key = key or self.metadata.get("energy_key")
        return np.asarray(refs[key], dtype=np.float64) if key in refs else None

    def to_atoms(self, idx: int):
        """Structure ``idx`` as an ``ase.Atoms`` (with a SinglePointCalculator holding its energy
        and forces)."""
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator

        st = self.structures
        a, b = int(self._offsets[idx]), int(self._offsets[idx + 1])
        atoms = Atoms(numbers=np.asarray(st.z[a:b]), positions=np.asarray(st.pos[a:b]), cell=st.cell[idx],
                      pbc=st.pbc[idx])
        results = {"energy": float(st.energy[idx])}
        if st.forces is not None:
            results["forces"] = np.asarray(st.forces[a:b])
        atoms.calc = SinglePointCalculator(atoms, **results)
        return atoms
