"""A fast loader of PyG batches: batches of indices gathered straight from the dataset's arrays.

``torch_geometric.loader.DataLoader`` makes one ``Data`` per structure and collates them in
Python (~100 µs per structure). :class:`BatchLoader` draws batches of *indices* and lets
:meth:`H5Dataset.collate` build each ``Batch`` with a few vectorised gathers: the same ``Batch``
(keys, shapes, ``batch``, ``ptr``; tested against PyG's collation) at a fraction of the cost
(``bench/bench_data.py`` compares both).

It is a ``torch.utils.data.DataLoader`` over an ``IterableDataset`` of batches, so that

- ``num_workers`` works: worker w of W builds batches w, w+W, ... of this process's share;
- under ``torch.distributed`` (Lightning DDP) each rank takes every world_size-th batch of one
  common order (the shuffle seed is drawn from torch's global generator, which Lightning's
  ``seed_everything`` makes equal on all ranks); Lightning leaves iterable datasets alone (no
  sampler injection);
- ``pad_ranks=True`` (training): every rank has the same number of batches (DDP ranks must
  step together) and each structure is seen once per epoch over all ranks: the structures of a
  last, incomplete round of ``world_size`` batches are dealt into one smaller batch per rank (so
  each step's batches together are exactly one batch of ``world_size * batch_size`` of a single
  process with the same seed). ``pad_ranks=False``
  (validation, test): every structure is seen exactly once over all ranks, whose batch counts
  may differ by one; the epoch's error sums are reduced over the ranks once at the epoch's end
  (:class:`torchmdx.train.metrics.EpochErrors`), so repeated structures would be counted twice.
  Every rank still gets at least one batch (with fewer batches than ranks the structures are
  dealt into ``world_size`` smaller batches; fewer structures than ranks is a ``DataError``):
  a rank without a batch would skip Lightning's validation hooks and the others would wait for
  it in DDP's buffer broadcast and the metrics' all-reduce;
- ``len(loader)`` is this rank's number of batches (it asks ``torch.distributed`` when called);
- each epoch draws a new order (when ``shuffle``).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import IterableDataset, get_worker_info

from torchmdx.data.structures import structure_indices
from torchmdx.errors import DataError


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, (0, 1) when it is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _identity(batch):
    return batch


def split_base(dataset):
    """(H5Dataset, numpy indices into it) for an H5Dataset or a PyG subset ``dataset[idx]``."""
    base_indices = dataset._indices
    if base_indices is None:
        return dataset, np.arange(len(dataset))
    if torch.is_tensor(base_indices):
        return dataset, base_indices.numpy().astype(np.int64)
    return dataset, np.asarray(base_indices, dtype=np.int64)


def check_batch_size(batch_size) -> int:
    """A batch size: a whole number >= 1 (0 was a ZeroDivisionError, -1 "__len__() should return
    >= 0", 2.5 silently batches of 2)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"batch size must be a whole number >= 1, got {batch_size!r}")
    return int(batch_size)


def batches_in_order(dataset, indices, batch_size: int):
    """PyG batches of ``dataset[indices]`` in the given order, ``batch_size`` structures each, on
    this process alone (no shuffling, no sharding over workers or ranks): for evaluation loops
    that pick their own structures. Gathered by ``dataset.collate`` where the dataset has it
    (:class:`~torchmdx.data.H5Dataset`), else ``Batch.from_data_list``."""
    check_batch_size(batch_size)
    indices = structure_indices(indices, len(dataset), "batches_in_order")  # a boolean mask was cast to 0/1
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        if hasattr(dataset, "collate"):
            yield dataset.collate(chunk)
        else:
            from torch_geometric.data import Batch

            yield Batch.from_data_list([dataset[int(i)] for i in chunk])


class _BatchStream(IterableDataset):
    def __init__(self, dataset, indices: np.ndarray, batch_size: int, shuffle: bool, drop_last: bool,
                 pad_ranks: bool = True, pack: Optional[dict] = None):
        self.dataset, self.indices = dataset, indices
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.pad_ranks = pad_ranks
        self.pack = pack
        self.seed, self.rank, self.world = 0, 0, 1

    def _n_batches(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _dealt(self) -> bool:
        """Unpadded and fewer batches than ranks: the structures are dealt into one batch per rank."""
        return not self.pad_ranks and 1 < self.world and 0 < self._n_batches() < self.world

    def batches(self) -> list[np.ndarray]:
        """This rank's batches of dataset indices for the current epoch."""
        order = self.indices
        if self.shuffle:
            order = order[np.random.default_rng(self.seed).permutation(len(order))]
        if self._dealt():
            if len(order) < self.world:
                raise DataError(f"{len(order)} structures cannot be shared by {self.world} DDP ranks without "
                                "repeating some: evaluation needs at least one structure per rank")
            return [np.array_split(order, self.world)[self.rank]]
        batches = [order[k * self.batch_size:(k + 1) * self.batch_size] for k in range(self._n_batches())]
        if self.pad_ranks and self.world > 1 and batches:
            batches = self._even_rounds(batches, order)
        return batches[self.rank::self.world]

    def _even_rounds(self, batches: list[np.ndarray], order: np.ndarray) -> list[np.ndarray]:
        """Whole rounds of ``world`` batches (training: DDP ranks step together). The structures
        of a last, incomplete round are dealt into one smaller batch per rank, so each structure
        is seen once per epoch over all ranks, and every round holds exactly the structures of one
        batch of ``world * batch_size`` in one process (the same global batches). Only when fewer
        structures than ranks are left do ``world - left`` of the epoch's first ones repeat;
        ``drop_last`` drops the incomplete round instead."""
        full = (len(batches) // self.world) * self.world
        if full == len(batches):
            return batches
        if self.drop_last:
            return batches[:full]
        rest = np.concatenate(batches[full:])
        if len(rest) < self.world:
            rest = np.concatenate([rest, order[: self.world - len(rest)]])
        return batches[:full] + np.array_split(rest, self.world)

    def __len__(self) -> int:
        n = self._n_batches()
        if self.world == 1 or n == 0:
            return n
        if self._dealt():
            return 1
        if self.pad_ranks:
            return n // self.world if self.drop_last else -(-n // self.world)
        return len(range(self.rank, n, self.world))

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for j, indices in enumerate(self.batches()):
            if j % workers == worker:
                batch = self.dataset.collate(indices)
                if self.pack is not None:
                    from torchmdx.data.packing import pack_pyg_batch

                    batch = pack_pyg_batch(batch, self.pack["buckets"], self.batch_size, self.pack["pad_z"],
                                           self.pack.get("periodic", False))
                yield batch


# BatchLoader's own keyword arguments (for the "did you mean" of a typo).
_LOADER_ARGUMENTS = ("dataset", "batch_size", "shuffle", "drop_last", "indices", "generator", "num_workers",
                     "pin_memory", "pad_ranks", "pack")


def _check_options(options: dict, **flags) -> None:
    """Refuse what ``BatchLoader`` would silently ignore or misread: a keyword it does not take (``batchsize=2`` gave
    batches of 32) and flags that are not booleans (``shuffle="no"`` shuffled).

    The catch-all ``**options`` stays for Lightning: when it re-creates a loader (``trainer.predict``, overfitting,
    distributed sampler injection; ``lightning.pytorch.utilities.data._update_dataloader``) it calls the class again with
    the arguments it was made with plus ``sampler=None`` and ``batch_sampler=None`` (an iterable dataset takes no
    sampler). Those two are taken when they are None; anything else is one ``DataError``."""
    import difflib

    for key, value in options.items():
        if key in ("sampler", "batch_sampler"):
            if value is None:
                continue
            raise DataError(f"BatchLoader: {key}= is not taken (it draws its own batches of indices; "
                            f"use shuffle=, generator= and indices=), got {type(value).__name__}")
        close = difflib.get_close_matches(str(key), _LOADER_ARGUMENTS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise DataError(f"BatchLoader: unknown keyword argument '{key}'{hint}; it takes "
                        + ", ".join(_LOADER_ARGUMENTS[1:]))
    for name in ("shuffle", "drop_last", "pin_memory", "pad_ranks"):
        value = flags[name]
        if not isinstance(value, (bool, np.bool_)):
            raise DataError(f"BatchLoader: {name} must be True or False, got {value!r}")
    workers = flags["num_workers"]
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0:
        raise DataError(f"BatchLoader: num_workers must be a whole number >= 0, got {workers!r}")


class BatchLoader(TorchDataLoader):
    """PyG batches of an :class:`~torchmdx.data.H5Dataset` or a subset ``dataset[indices]``.

    Args:
        dataset: the dataset or a subset of it; ``indices`` (optional) select within it.
        batch_size, shuffle, drop_last: as for a DataLoader (a new order each epoch when shuffling,
            seeded from ``generator`` or torch's global generator).
        pad_ranks: under DDP, every rank gets as many batches, the last round dealt evenly
            (training); False: batch counts may differ by one (evaluation). Either way each
            structure is seen once per epoch over all ranks.
        num_workers, pin_memory: passed to ``torch.utils.data.DataLoader`` (workers are started
            per epoch, so they see the epoch's order).
        pack: ``{"buckets": [...], "pad_z": int, "periodic": bool}``: yield :class:`~torchmdx.data.packing.PackedBatch`
            objects padded to those atom capacities (captured training) instead of PyG batches.
    """

    def __init__(self, dataset, batch_size: int = 32, shuffle: bool = False, drop_last: bool = False,
                 indices=None, generator: Optional[torch.Generator] = None, num_workers: int = 0,
                 pin_memory: bool = False, pad_ranks: bool = True, pack: Optional[dict] = None, **options):
        _check_options(options, shuffle=shuffle, drop_last=drop_last, pin_memory=pin_memory, pad_ranks=pad_ranks,
                       num_workers=num_workers)
        base, base_indices = split_base(dataset)
        if indices is not None:
            chosen = structure_indices(indices, len(base_indices), "BatchLoader: indices")
            outside = (chosen < 0) | (chosen >= len(base_indices))  # -1 took the last structure, 99 an IndexError
            if outside.any():
                raise DataError(f"BatchLoader: indices: index {int(chosen[outside][0])} is outside 0.."
                                f"{len(base_indices) - 1} (the dataset's {len(base_indices)} structures)")
            base_indices = base_indices[chosen]
        self._stream = _BatchStream(base, base_indices, check_batch_size(batch_size), shuffle, drop_last, pad_ranks, pack)
        self._shuffle_generator = generator
        super().__init__(self._stream, batch_size=None, collate_fn=_identity, num_workers=num_workers,
                         pin_memory=pin_memory)

    @property
    def subset_indices(self) -> np.ndarray:
        return self._stream.indices

    def __len__(self) -> int:
        """This rank's number of batches (Lightning asks before the first epoch)."""
        self._stream.rank, self._stream.world = rank_and_world()
        return len(self._stream)

    def __iter__(self):
        stream = self._stream
        if stream.shuffle:
            stream.seed = int(torch.randint(0, 2**62, (1,), generator=self._shuffle_generator).item())
        stream.rank, stream.world = rank_and_world()
        if stream.world > 1 and not stream.pad_ranks:
            stream.batches()  # a DataError now, in this process, rather than in a worker
        return super().__iter__()
