"""Packed batches: every training batch padded to one of a few fixed sizes, so that a captured
(CUDA-graph) training step can replay it whatever the sizes of its molecules.

Layout of a :class:`PackedBatch` with atom capacity A and structure capacity S = B + A (B the
batch size)::

    atoms 0 .. n-1          the n real atoms, structure by structure (as a PyG batch)
    atoms n .. A-1          padding atoms: atomic number ``pad_z``, position 0, force 0
    structures 0 .. b-1     the b <= B real structures
    structures b .. B-1     empty (a batch with fewer structures: the last of an epoch)
    structure B + a         holds padding atom a alone

Every padding atom is a structure of its own, so no neighbor list pairs it with anything
(pairs never cross structures) and no real atom's energy or force depends on it (periodic data:
the padding and empty structures get a zero cell and no periodic direction); the
weights ``atom_weight`` [A] and ``structure_weight`` [S] (1 real, 0 padding) take the padding
out of every loss term and error sum (:func:`torchmdx.train.module.training_objective`), so a
padded step gives the loss and the gradients of the unpadded one (tested in float64).

Size buckets (:func:`atom_buckets`): the atom capacities are a few quantiles of the atom counts
of random batches of the training split (half of them fit the smallest bucket, most the second,
all the third), so little work is spent on padding; molecules of one size give one bucket, the
exact batch size in atoms. A batch larger than every bucket (possible but rare: the quantiles
come from sampled epochs) gets the bound bucket, the B largest structures together.

:class:`DeviceBatchLoader` keeps a training split on the GPU (z, positions, forces, energies,
offsets) and assembles each shuffled batch there with a few gathers: no workers, no per-item
objects, no host synchronisation. Its epoch order is :class:`~torchmdx.data.loader.BatchLoader`'s
for the same generator state (one seed drawn from torch's generator, then numpy's permutation
of the split), so the device path and the host path see the same batches (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import numpy as np
import torch

#: bucket capacities (other than the exact size of equal molecules) are multiples of this
ATOM_ROUNDING = 8
#: quantiles of the sampled batch sizes (in atoms) that become buckets
BUCKET_QUANTILES = (0.5, 0.875, 1.0)
#: random epochs sampled to find the bucket quantiles (at most MAX_SAMPLED_BATCHES batches)
SAMPLED_EPOCHS = 8
MAX_SAMPLED_BATCHES = 20_000


@dataclass
class PackedBatch:
    """A padded training batch (module docstring). Tensors on one device; ints on the host.

    z [A] long; pos [A, 3] Å; batch [A] long (sorted); energy [S] eV; forces [A, 3] eV/Å or None;
    n_atoms [S] long (0 for padding structures); atom_weight [A], structure_weight [S] (1 real,
    0 padding; pos dtype); real_atoms n, real_structures b, pair_bound Σ_b n_b (n_b - 1) (host;
    the most pairs: under minimum image, periodic batches too). Periodic data: cell [S, 3, 3] Å and pbc
    [S, 3] bool (padding and empty structures: zero cell, not periodic), else None."""

    z: torch.Tensor
    pos: torch.Tensor
    batch: torch.Tensor
    energy: torch.Tensor
    forces: Optional[torch.Tensor]
    n_atoms: torch.Tensor
    atom_weight: torch.Tensor
    structure_weight: torch.Tensor
    real_atoms: int
    real_structures: int
    pair_bound: int
    cell: Optional[torch.Tensor] = None
    pbc: Optional[torch.Tensor] = None

    @property
    def periodic(self) -> bool:
        """The batch carries cells (the split has periodic structures; a host fact, no read)."""
        return self.pbc is not None

    @property
    def atom_capacity(self) -> int:
        return int(self.z.shape[0])

    @property
    def num_structures(self) -> int:
        """S, the structure capacity (what the model's energy vector holds)."""
        return int(self.energy.shape[0])

    @property
    def num_graphs(self) -> int:
        """Real structures (what Lightning's logging counts as the batch size)."""
        return self.real_structures

    def to(self, device, non_blocking: Optional[bool] = None) -> "PackedBatch":
        """The batch on ``device``. Copies to a GPU do not wait for it (``non_blocking`` by
        default: Lightning's batch transfer calls ``.to(device)`` on objects like this one, and a
        blocking copy would synchronise the stream at every step)."""
        if non_blocking is None:
            non_blocking = torch.device(device).type == "cuda"
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in moved.items():
            if torch.is_tensor(value):
                moved[key] = value.to(device, non_blocking=non_blocking)
        return replace(self, **moved)

    def pin_memory(self) -> "PackedBatch":
        """The batch in pinned host memory (what a DataLoader with ``pin_memory=True`` calls)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in moved.items():
            if torch.is_tensor(value):
                moved[key] = value.pin_memory()
        return replace(self, **moved)


def _round_up(value: int, multiple: int) -> int:
    return -(-int(value) // multiple) * multiple


def bound_capacity(counts: np.ndarray, batch_size: int) -> int:
    """Most atoms any batch of ``batch_size`` structures can hold: the largest structures together."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size == 0:
        return 1
    top = np.sort(counts)[-min(batch_size, counts.size):]
    return max(1, int(top.sum()))


def atom_buckets(counts: np.ndarray, batch_size: int, seed: int = 0,
                 quantiles: Sequence[float] = BUCKET_QUANTILES) -> list[int]:
    """Atom capacities of the size buckets of batches of ``batch_size`` structures drawn from
    structures with ``counts`` atoms (module docstring), ascending; the last is the bound."""
    counts = np.asarray(counts, dtype=np.int64)
    bound = bound_capacity(counts, batch_size)
    if counts.size == 0 or counts.min() == counts.max():
        # molecules of one size: every full batch has exactly this many atoms
        return [bound]
    rng = np.random.default_rng(seed)
    per_epoch = counts.size // batch_size
    epochs = max(1, min(SAMPLED_EPOCHS, MAX_SAMPLED_BATCHES // max(per_epoch, 1)))
    totals = []
    for _ in range(epochs):
        order = counts[rng.permutation(counts.size)][: per_epoch * batch_size]
        if order.size:
            totals.append(order.reshape(per_epoch, batch_size).sum(axis=1))
    if not totals:
        return [bound]
    totals = np.concatenate(totals)
    buckets = sorted({min(bound, _round_up(np.quantile(totals, q, method="higher"), ATOM_ROUNDING))
                      for q in quantiles})
    if buckets[-1] < bound:
        buckets.append(bound)
    return buckets


def bucket_for(atoms: int, buckets: Sequence[int]) -> int:
    """The smallest bucket capacity holding ``atoms`` (the last one if none does: a ValueError
    then, because the last bucket is the bound)."""
    for capacity in buckets:
        if atoms <= capacity:
            return capacity
    raise ValueError(f"a batch of {atoms} atoms exceeds the largest bucket ({buckets[-1]} atoms)")


def pair_bound(counts: np.ndarray) -> int:
    """Σ_b n_b (n_b - 1): the most ordered pairs a full list of these structures holds (periodic
    ones too under minimum image: a pair occurs at most once and no atom meets its own image)."""
    counts = np.asarray(counts, dtype=np.int64)
    return int((counts * (counts - 1)).sum())


def pack(z: torch.Tensor, pos: torch.Tensor, energy: torch.Tensor, forces: Optional[torch.Tensor],
         counts: np.ndarray, atom_capacity: int, batch_size: int, pad_z: int,
         cell: Optional[torch.Tensor] = None, pbc: Optional[torch.Tensor] = None) -> PackedBatch:
    """Pad the concatenated atoms of ``len(counts)`` structures (z [n], pos [n, 3], forces, energy
    [b]; ``counts`` the atoms per structure, on the host; periodic data also cell [b, 3, 3] and
    pbc [b, 3]) to ``atom_capacity`` atoms and ``batch_size + atom_capacity`` structures (module
    docstring). Works on any device and reads nothing back from it."""
    counts = np.asarray(counts, dtype=np.int64)
    n, b = int(counts.sum()), int(counts.size)
    if n > atom_capacity:
        raise ValueError(f"{n} atoms do not fit a capacity of {atom_capacity}")
    if b > batch_size:
        raise ValueError(f"{b} structures do not fit a batch of {batch_size}")
    A = int(atom_capacity)
    batch_np, n_atoms_np = _layout(counts, A, batch_size)
    return _assemble(z, pos, energy, forces, n, b, A, n_atoms_np.size, pad_z, pair_bound(counts),
                     _small_tensor(batch_np, pos.device), _small_tensor(n_atoms_np, pos.device), cell, pbc)


def _layout(counts: np.ndarray, atom_capacity: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(structure of every atom slot [A], atoms of every structure slot [S]) of the packed layout."""
    n, b = int(counts.sum()), int(counts.size)
    batch_np = np.concatenate([np.repeat(np.arange(b, dtype=np.int64), counts),
                               batch_size + np.arange(n, atom_capacity, dtype=np.int64)])
    n_atoms_np = np.zeros(batch_size + atom_capacity, dtype=np.int64)
    n_atoms_np[:b] = counts
    n_atoms_np[batch_size + np.arange(n, atom_capacity)] = 1
    return batch_np, n_atoms_np


def _small_tensor(array: np.ndarray, device) -> torch.Tensor:
    """A host index array on ``device`` without a stream synchronisation (pinned, non-blocking)."""
    tensor = torch.from_numpy(array)
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def _assemble(z, pos, energy, forces, n: int, b: int, A: int, S: int, pad_z: int, bound: int,
              batch: torch.Tensor, n_atoms: torch.Tensor, cell: Optional[torch.Tensor] = None,
              pbc: Optional[torch.Tensor] = None) -> PackedBatch:
    device, dtype = pos.device, pos.dtype
    z_out = torch.full((A,), int(pad_z), dtype=torch.long, device=device)
    z_out[:n] = z
    pos_out = torch.zeros(A, 3, dtype=dtype, device=device)
    pos_out[:n] = pos
    forces_out = None
    if forces is not None:
        forces_out = torch.zeros(A, 3, dtype=forces.dtype, device=device)
        forces_out[:n] = forces
    energy_out = torch.zeros(S, dtype=energy.dtype, device=device)
    energy_out[:b] = energy.reshape(-1)
    atom_weight = torch.zeros(A, dtype=dtype, device=device)
    atom_weight[:n] = 1
    structure_weight = torch.zeros(S, dtype=dtype, device=device)
    structure_weight[:b] = 1
    cell_out = pbc_out = None
    if pbc is not None:
        cell_out = torch.zeros(S, 3, 3, dtype=dtype, device=device)
        cell_out[:b] = cell.reshape(b, 3, 3)
        pbc_out = torch.zeros(S, 3, dtype=torch.bool, device=device)
        pbc_out[:b] = pbc.reshape(b, 3)
    return PackedBatch(z_out, pos_out, batch, energy_out, forces_out, n_atoms, atom_weight, structure_weight,
                       real_atoms=n, real_structures=b, pair_bound=bound, cell=cell_out, pbc=pbc_out)


def pack_pyg_batch(batch, buckets: Sequence[int], batch_size: int, pad_z: int, periodic: bool = False) -> PackedBatch:
    """:func:`pack` of a PyG batch (``z``, ``pos``, ``energy``, optional ``forces``, ``ptr``;
    ``cell`` and ``pbc`` too when ``periodic``: decided once for the split, so that every batch
    of a run has the same inputs) into the smallest bucket that holds it."""
    ptr = batch.ptr.cpu().numpy()
    counts = np.diff(ptr)
    capacity = bucket_for(int(ptr[-1]), buckets)
    forces = getattr(batch, "forces", None)
    cell = pbc = None
    if periodic:
        cell, pbc = batch.cell, batch.pbc
    return pack(batch.z, batch.pos, batch.energy, forces, counts, capacity, batch_size, pad_z, cell, pbc)


class DeviceBatchLoader:
    """Shuffled packed batches of a training split kept on ``device`` (module docstring).

    Args:
        dataset: an :class:`~torchmdx.data.H5Dataset` (in memory; its arrays are copied once).
        indices: the split's dataset indices.
        batch_size: structures per batch (the last batch of an epoch may have fewer).
        buckets: atom capacities (:func:`atom_buckets`); pad_z: atomic number of padding atoms.
        device: where the data and the batches live.
        generator: torch generator of the epoch seeds (None: torch's global one, as BatchLoader).
        shuffle: a new order every epoch (training); False: the split's order (validation).
    """

    def __init__(self, dataset, indices, batch_size: int, buckets: Sequence[int], pad_z: int, device,
                 generator: Optional[torch.Generator] = None, shuffle: bool = True):
        from torchmdx.data.loader import _BatchStream

        indices = np.asarray(indices, dtype=np.int64)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.buckets = list(buckets)
        self.pad_z = int(pad_z)
        self._generator = generator
        # the split's structures, re-numbered 0..n-1 in split order, their atoms concatenated
        counts = dataset._counts[indices]
        starts = dataset._offsets[indices]
        atom_index = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(counts.sum())
        self._counts = counts.astype(np.int64)
        offsets = np.zeros(counts.size + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        self._offsets_host = offsets
        # from the numpy arrays (in memory or memory-mapped), in the dataset's dtypes
        st = dataset.structures
        self.z = torch.from_numpy(np.asarray(st.z[atom_index]).astype(np.int64)).to(self.device)
        self.pos = torch.from_numpy(np.asarray(st.pos[atom_index])).to(dataset.dtype).to(self.device)
        self.forces = None if st.forces is None else \
            torch.from_numpy(np.asarray(st.forces[atom_index])).to(dataset.dtype).to(self.device)
        self.energy = dataset._energy[torch.from_numpy(indices)].to(self.device)
        # periodic splits: cells and flags per structure (None for molecules: no cell inputs)
        self.cell = self.pbc = None
        if np.asarray(st.pbc)[indices].any():
            self.cell = torch.from_numpy(np.asarray(st.cell[indices])).to(dataset.dtype).to(self.device)
            self.pbc = torch.from_numpy(np.asarray(st.pbc[indices])).bool().to(self.device)
        # the epoch order of the host loader over local positions 0..n-1
        self.shuffle = bool(shuffle)
        self._stream = _BatchStream(None, np.arange(counts.size), self.batch_size, self.shuffle, False, True)
        self.split_indices = indices

    @staticmethod
    def nbytes(dataset, indices) -> int:
        """Device memory the split's arrays take (bytes)."""
        indices = np.asarray(indices, dtype=np.int64)
        atoms = int(dataset._counts[indices].sum())
        float_size = torch.empty((), dtype=dataset.dtype).element_size()
        per_atom = 8 + 3 * float_size * (2 if dataset.has_forces else 1)
        per_structure = dataset._energy.element_size() + 8 + (9 * float_size + 3)  # energy, index, cell, pbc
        return atoms * per_atom + indices.size * per_structure

    def __len__(self) -> int:
        return len(self._stream)

    def epoch_batches(self) -> list[np.ndarray]:
        """This epoch's batches as positions within the split (draws the epoch seed)."""
        if self.shuffle:
            self._stream.seed = int(torch.randint(0, 2**62, (1,), generator=self._generator).item())
        # the host loader's DataLoader iterator draws its base seed next: draw it too, so that
        # torch's generator (dropout, later epochs) goes on exactly as on the host path
        torch.empty((), dtype=torch.int64).random_(generator=self._generator)
        return self._stream.batches()

    def __iter__(self):
        for local in self.epoch_batches():
            yield self.gather(local)

    def gather(self, local: np.ndarray) -> PackedBatch:
        """The packed batch of split positions ``local`` (gathers on the device, no host read)."""
        counts = self._counts[local]
        n, b = int(counts.sum()), int(counts.size)
        capacity = bucket_for(n, self.buckets)
        S = self.batch_size + capacity
        # source atom of every real atom: offset of its structure + its rank inside it
        starts = self._offsets_host[local]
        ptr = np.concatenate([[0], np.cumsum(counts)[:-1]])
        source = np.repeat(starts - ptr, counts) + np.arange(n)
        batch_np, n_atoms_np = _layout(counts, capacity, self.batch_size)
        # one pinned host buffer, one non-blocking copy: [source n | structures b | batch A | n_atoms S]
        host = np.concatenate([source, local.astype(np.int64), batch_np, n_atoms_np])
        index = _small_tensor(host, self.device)
        source_d, local_d = index[:n], index[n:n + b]
        batch_d, n_atoms_d = index[n + b:n + b + capacity], index[n + b + capacity:]
        forces = None if self.forces is None else self.forces[source_d]
        cell = None if self.cell is None else self.cell[local_d]
        pbc = None if self.pbc is None else self.pbc[local_d]
        return _assemble(self.z[source_d], self.pos[source_d], self.energy[local_d], forces, n, b, capacity, S,
                         self.pad_z, pair_bound(counts), batch_d, n_atoms_d, cell, pbc)
