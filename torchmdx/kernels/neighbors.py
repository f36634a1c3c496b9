"""Neighbor lists: the one entry point and its result type.

Conventions (shared by every backend, the model and the MD engine)
------------------------------------------------------------------
- ``edge_index[0] = i`` is the receiving (centre) atom, ``edge_index[1] = j`` its neighbor;
  pairs are sorted by ``i`` so message aggregation is a segment reduction (the torch backend
  and the Triton brute force also sort by ``j`` within one ``i``; the Triton cell list keeps a
  deterministic order there: sort by ``i * N + j`` if you need it).
- ``shifts`` are the *integer* periodic image offsets n_ij (stored in the positions' dtype),
  so that the distance vector is

      vectors_ij = pos[j] - pos[i] + n_ij @ cell[batch[i]]          (Å)

  Keeping n_ij (not the Cartesian shift) lets the model differentiate through the cell for
  stress, and lets MD reuse a list while atoms move (Verlet skin).
- ``distances = |vectors|``; only pairs with ``cutoff_lower <= r < cutoff`` are kept, and
  never an atom with itself in the same image (i == j with n == 0).
- full list: both (i, j) and (j, i); half list: only i < j (same-image self pairs excluded; a
  periodic self-image pair (i, i, n) is kept for one of n / -n).
- Batched structures: ``batch[a]`` is the structure of atom ``a``; pairs never cross
  structures; ``cell`` is ``[B, 3, 3]`` (rows are lattice vectors, ASE's convention) and
  ``pbc`` is ``[B, 3]`` bool. A structure with no periodic direction ignores its cell.
- Fixed-capacity mode (``max_pairs`` given): outputs have exactly ``max_pairs`` rows; rows at
  and beyond ``num_pairs`` are padding: ``i = j = N - 1`` (so rows stay sorted by ``i``),
  shifts, vectors and distances 0, and ``mask`` False. Consumers multiply by ``mask`` (the
  model sets the cutoff function to 0 there and never divides by a padded distance); ``overflow`` is a device bool tensor set when more pairs existed than
  fit. Nothing in that mode synchronises with the host, so it can live inside a CUDA graph;
  the caller checks ``overflow`` outside the graph and grows the buffer.

Backends: ``"torch"`` (reference, :mod:`torchmdx.kernels.neighbors_ref`, runs everywhere) and
``"triton"`` (:mod:`torchmdx.kernels.neighbors_triton`, CUDA, or the Triton interpreter on the
CPU under ``TRITON_INTERPRET=1``). ``backend="auto"`` picks Triton on CUDA, torch otherwise.
Both return the same set of pairs, sorted by ``i``; only the order within one ``i`` may differ
(under minimum image a pair (i, j) occurs at most once, so ``(i, j)`` identifies a row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Neighbors:
    """A neighbor list; see the module docstring for conventions.

    edge_index: [2, E] long (i receiver, j neighbor), sorted by i
    shifts:     [E, 3] integer image offsets n_ij (positions' dtype)
    vectors:    [E, 3] pos[j] - pos[i] + n_ij @ cell   (Å)
    distances:  [E]    |vectors|                       (Å)
    num_pairs:  0-d long tensor, number of pairs found (== E unless fixed capacity; on overflow
                it exceeds ``max_pairs`` and tells the caller how far to grow the buffer)
    overflow:   0-d bool tensor, True if more pairs existed than ``max_pairs``
    mask:       [E] bool, valid rows (None when every row is valid)
    cell_error: 0-d long tensor with ``cell_check="device"``: -1 when every cell is usable, else
                ``4 * structure + code`` of the first bad one (the list is then unusable;
                :func:`torchmdx.kernels.cell_geometry.describe_problem`); None when cells were
                checked on the host (a bad cell raised)
    """

    edge_index: torch.Tensor
    shifts: torch.Tensor
    vectors: torch.Tensor
    distances: torch.Tensor
    num_pairs: torch.Tensor
    overflow: torch.Tensor
    mask: Optional[torch.Tensor] = None
    cell_error: Optional[torch.Tensor] = None


def neighbor_list(
    pos: torch.Tensor,
    cutoff: float,
    batch: Optional[torch.Tensor] = None,
    cell: Optional[torch.Tensor] = None,
    pbc: Optional[torch.Tensor] = None,
    *,
    cutoff_lower: float = 0.0,
    full: bool = True,
    max_pairs: Optional[int] = None,
    backend: str = "auto",
    method: str = "auto",
    cell_check: str = "host",
) -> Neighbors:
    """All pairs with ``cutoff_lower <= |r_ij| < cutoff`` (Å), under minimum image.

    pos [N, 3] Å; batch [N] long (None: one structure); cell [B, 3, 3] or [3, 3] Å (rows are
    lattice vectors); pbc [B, 3] or [3] bool. ``method`` is ``"brute"``, ``"cell"`` or
    ``"auto"`` (brute force for small structures, cell list for large ones). ``cell_check``:
    ``"host"`` (each new cell validated once on the host; a bad one raises) or ``"device"``
    (checked on the device at every call, reported in ``Neighbors.cell_error``; for CUDA graphs
    whose cell buffer changes between replays).
    Raises :class:`torchmdx.errors.NeighborListError` when the cutoff exceeds half the
    perpendicular width of a periodic box (minimum image would miss pairs).
    """
    if backend == "auto":
        backend = "triton" if pos.is_cuda else "torch"
    if backend == "torch":
        from torchmdx.kernels import neighbors_ref

        return neighbors_ref.neighbor_list(
            pos, cutoff, batch, cell, pbc, cutoff_lower=cutoff_lower, full=full,
            max_pairs=max_pairs, method=method, cell_check=cell_check,
        )
    if backend == "triton":
        from torchmdx.kernels import neighbors_triton

        return neighbors_triton.neighbor_list(
            pos, cutoff, batch, cell, pbc, cutoff_lower=cutoff_lower, full=full,
            max_pairs=max_pairs, method=method, cell_check=cell_check,
        )
    from torchmdx.errors import NeighborListError

    raise NeighborListError(f"unknown neighbor-list backend {backend!r}; choose auto, torch or triton")


def needs_rebuild(
    pos: torch.Tensor,
    reference_pos: torch.Tensor,
    skin: float,
    batch: Optional[torch.Tensor] = None,
    cell: Optional[torch.Tensor] = None,
    pbc: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Verlet skin: 0-d bool device tensor, True if an atom moved more than ``skin / 2`` Å
    (minimum-image displacement) since ``reference_pos``. No host synchronisation (one Triton
    kernel on CUDA, plain torch elsewhere); see :func:`torchmdx.kernels.neighbors_triton.needs_rebuild`."""
    from torchmdx.kernels import neighbors_triton

    return neighbors_triton.needs_rebuild(pos, reference_pos, skin, batch, cell, pbc)
