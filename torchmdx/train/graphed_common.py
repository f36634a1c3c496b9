"""What the captured training and validation steps share: batch shapes, capacities, unusable cells.

A captured step (:class:`torchmdx.train.graphed.GraphedTrainStep`,
:class:`torchmdx.train.graphed_eval.GraphedEvalStep`) keeps one graph per batch shape: a
:class:`BatchShape` (atoms, structures, the all-pairs bound Σ_b n_b (n_b - 1), periodic) is
what its graph cache is keyed on, computed from the CPU batch (:func:`batch_shape`,
:func:`shape_from_counts`, :func:`packed_shape`) so that no host read is needed on the GPU.
Neighbor capacities are rounded by :func:`round_capacity`. :class:`BadCells` counts, on the
device, the periodic batches whose cell the neighbor list could not use, for the step's
one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: capacities are multiples of this (Triton specialises integer arguments on divisibility by 16)
CAPACITY_ROUNDING = 64
#: attribute of a batch object holding its :class:`BatchShape` (set on the CPU batch)
SHAPE_ATTRIBUTE = "_torchmdx_shape"


@dataclass(frozen=True)
class BatchShape:
    """Host-side description of a batch: what the graph cache is keyed on.

    atoms N, structures B, pair_bound Σ_b n_b (n_b - 1) (the most pairs a full list can hold: under
    minimum image a pair (i, j) occurs at most once and no atom meets its own image), periodic:
    the batch carries cells (the step takes ``cell`` and ``pbc`` inputs)."""

    atoms: int
    structures: int
    pair_bound: int
    periodic: bool = False
    #: under DDP (:meth:`torchmdx.train.graphed.GraphedTrainStep.step`): every rank's (atoms,
    #: structures, periodic), the same tuple on every rank; ``pair_bound`` is then the largest
    #: rank's. Empty for one process.
    ranks: tuple = ()

    @property
    def key(self) -> tuple:
        """What a graph is kept under: (atoms, structures, periodic); under DDP every rank's."""
        return self.ranks or (self.atoms, self.structures, self.periodic)


def round_capacity(pairs: int) -> int:
    """``pairs`` rounded up to a multiple of :data:`CAPACITY_ROUNDING` (at least one block)."""
    return max(CAPACITY_ROUNDING, -(-int(pairs) // CAPACITY_ROUNDING) * CAPACITY_ROUNDING)


def shape_from_counts(counts, periodic: bool = False) -> BatchShape:
    """:class:`BatchShape` from the atom counts of the structures (host integers)."""
    counts = [int(n) for n in counts]
    return BatchShape(atoms=sum(counts), structures=len(counts), pair_bound=sum(n * (n - 1) for n in counts),
                      periodic=bool(periodic))


def packed_shape(packed) -> BatchShape:
    """:class:`BatchShape` of a :class:`~torchmdx.data.packing.PackedBatch` (host fields only):
    its capacities, and the pair bound of its real structures."""
    return BatchShape(atoms=packed.atom_capacity, structures=packed.num_structures, pair_bound=packed.pair_bound,
                      periodic=packed.periodic)


def batch_shape(batch) -> BatchShape:
    """The :class:`BatchShape` of a PyG batch, remembered on the batch object.

    Free on a CPU batch (what ``on_before_batch_transfer`` sees); on a GPU batch it costs one
    host read (``ptr`` and ``pbc``)."""
    cached = getattr(batch, "__dict__", {}).get(SHAPE_ATTRIBUTE)
    if cached is not None:
        return cached
    ptr = getattr(batch, "ptr", None)
    if ptr is not None:
        counts = (ptr[1:] - ptr[:-1]).long()
    else:
        counts = torch.zeros(int(batch.num_graphs), dtype=torch.long, device=batch.batch.device)
        counts.index_add_(0, batch.batch, torch.ones_like(batch.batch))
    cell, pbc = getattr(batch, "cell", None), getattr(batch, "pbc", None)
    periodic = pbc.reshape(-1).any().reshape(1).long() if (pbc is not None and cell is not None) else counts.new_zeros(1)
    values = torch.cat([counts.reshape(-1), periodic.to(counts.device)]).tolist()
    shape = shape_from_counts(values[:-1], bool(values[-1]))
    if hasattr(batch, "__dict__"):
        batch.__dict__[SHAPE_ATTRIBUTE] = shape
    return shape


class BadCells:
    """The periodic batches a captured step met whose cell cannot be used
    (``Neighbors.cell_error``), counted on the device with the first one's code, cell and pbc
    kept for the one-line error; nothing is read on the host until :attr:`state` is.

    state [2] long: [batches seen with an unusable cell, 4 * structure + code of the first, -1
    while none]."""

    def __init__(self, device):
        self.state = torch.tensor([0, -1], dtype=torch.long, device=device)
        self.cell = torch.zeros(3, 3, dtype=torch.float64, device=device)
        self.pbc = torch.zeros(3, dtype=torch.bool, device=device)

    def record(self, cell_error: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor) -> torch.Tensor:
        """Count this batch if its cell is unusable (kept if it is the first); returns that as a
        0-d bool tensor. Capturable."""
        code = cell_error.reshape(())
        bad = code >= 0
        first = bad & (self.state[0] == 0)
        index = (code.clamp(min=0) // 4).reshape(1)
        self.cell.copy_(torch.where(first, cell.index_select(0, index)[0].to(torch.float64), self.cell))
        self.pbc.copy_(torch.where(first, pbc.index_select(0, index)[0], self.pbc))
        self.state.copy_(torch.stack([self.state[0] + bad.long(), torch.where(first, code, self.state[1])]))
        return bad

    def describe(self, code: int, cutoff: float, label: str) -> str:
        """What is wrong with the kept cell (host; ``code`` read from :attr:`state`)."""
        from torchmdx.kernels.cell_geometry import describe_problem

        return describe_problem(code % 4, self.cell.unsqueeze(0), self.pbc.unsqueeze(0), cutoff, label=label)
