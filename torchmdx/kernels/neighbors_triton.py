"""Triton neighbor lists (backend ``"triton"``): brute force and cell list, batched, periodic.

Files: this module (entry points, launch configuration, host side), the kernels in
:mod:`~torchmdx.kernels.neighbors_triton_brute`, :mod:`~torchmdx.kernels.neighbors_triton_cell`
and :mod:`~torchmdx.kernels.neighbors_triton_common` (shared device helpers, the fill pass, the
skin check), the cell geometry in :mod:`~torchmdx.kernels.cell_geometry`, direct launches in
:mod:`~torchmdx.kernels.triton_launch`.

Same contract and results as :mod:`torchmdx.kernels.neighbors_ref` (see the conventions in
:mod:`torchmdx.kernels.neighbors`): receiver ``i``, neighbor ``j``, integer image shifts
``n_ij`` with

    vectors_ij = pos[j] - pos[i] + n_ij @ cell[batch[i]]        (Å)
    kept:  cutoff_lower <= |vectors_ij| < cutoff,  never i == j

rows sorted by ``i`` (brute force: then by ``j``). Runs on CUDA tensors, and on CPU tensors under the Triton
interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is imported).

Minimum image
-------------
Each structure's cell is *completed* (rows of non-periodic directions replaced by an
orthonormal complement of the periodic rows) and inverted on the device
(:mod:`torchmdx.kernels.cell_geometry`); by default it is checked on the host once per cell
tensor (cached by tensor identity and version), with ``cell_check="device"`` rebuilt and checked
on the device at every call (``Neighbors.cell_error``; for CUDA graphs). For a pair, s = (pos_j - pos_i) @ inv(cell) and
n = -round(s) along periodic directions. When the cutoff is at most half of every periodic
perpendicular width d_k = V / |a_l x a_m| this is exact for triclinic cells too: a vector r with
|r| < cutoff has |r . b_k| <= |r| / d_k < 1/2 for every reciprocal vector b_k, so r is the
rounded image, and it is the only image within the cutoff (any two images differ by a lattice
vector of length >= min d_k). Larger cutoffs are refused with the reference's
:class:`NeighborListError` (structure and widths named).

Kernels
-------
``brute``: a 2-D grid of programs (block of ``BLOCK_I`` receivers) x (chunk of neighbors); a
batch uses one chunk spanning the structures of the block's receivers (contiguous ranges, as
``batch`` is sorted), so a batch of small molecules costs O(N * molecule size). Counts are kept
per (receiver, chunk) and j runs in increasing order, so rows come out sorted by (i, j).

``cell``: atoms are binned on a grid in fractional coordinates (periodic directions, cells at
least ``cutoff`` thick) or along the orthonormal complement (open directions, grid spanning the
structure's extent, from device-side atomics); a structure of n atoms gets at most n cells, so
the key space of all structures is [0, N) and no size is read back. Atoms are put in cell order
by a counting sort: the binning kernel counts atoms per cell (atomics), ``torch.cumsum`` gives
the cell starts, a scatter kernel places every atom (atomics: any order within a cell), and the
count pass writes each cell back in atom order (deterministic). Persistent programs loop over
(cell, part) items: the atoms of the cell are the receivers, the candidates the 9 neighbouring
rows of cells along x, each a contiguous run in cell order (plus one wrapped cell at a periodic
boundary), split over ``PARTS`` items (1, 3 or 9; more for small systems); all geometry is per
cell (scalars), and orthorhombic cells skip the off-diagonal products (``ORTHO``). A tile is
(receivers x candidates) with one of the two on the lanes and the other in registers, laid out
so that Triton needs no shared-memory shuffles inside the loop. Rows are sorted by ``i``;
within one ``i`` they follow the cell scan (deterministic), not ``j`` (sort by ``i * N + j`` if
you need the reference's order).

Output without a host read in the middle: a count pass writes the number of neighbors of
every receiver (per chunk / part), an exclusive scan (``torch.cumsum``) gives each receiver's
first row, and a write pass recomputes the pairs and stores only a packed index pair per row
(``i << 32 | j``, the cell list in cell order) into edge_index row 1; a fill pass then writes
edge_index, shifts, vectors and distances of every row, coalesced (and the padding, ``mask``
and ``overflow`` in fixed-capacity mode). With ``max_pairs`` the outputs have that many rows,
``overflow`` (device bool) is set when more pairs exist, ``num_pairs`` holds the number found
(so the caller can grow the buffer to fit: :func:`grow_to_fit`), and nothing is read on the
host: the call can be captured in a CUDA graph once the geometry cache holds the cell (call it
once outside the graph first). Without ``max_pairs`` the write pass goes into a capacity
estimated from the previous call (pairs per atom), the total is read once at the end, and only
the write and fill passes are re-run if it was short.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from torchmdx.errors import NeighborListError
from torchmdx.kernels.cell_geometry import (
    GEO_WIDTH,
    KernelGeometry,
    cached_geometry,
    cell_geometry,
    check_widths,
    first_bad_structure,
)
from torchmdx.kernels.neighbors import Neighbors
from torchmdx.kernels.neighbors_triton_common import HAVE_TRITON, triton
from torchmdx.kernels.triton_launch import interpreting, launch

#: largest structure (atoms) for which ``method="auto"`` uses the brute-force kernel (H100:
#: brute force is faster up to ~2.5 k atoms in a CUDA graph and up to ~6 k atoms eagerly)
BRUTE_FORCE_MAX_ATOMS = 4096
#: relative margin added to the cutoff when sizing cells (float rounding of fractional coordinates)
_CELL_MARGIN = 1e-4

#: launch parameters: chosen by ``bench/bench_neighbors.py --tune`` on an H100 (docs/kernels.md);
#: the write pass has its own tiles (it needs ~2x the registers of the count pass)
CONFIG = {
    "brute_block_i": 16,
    "brute_block_j": 64,
    "brute_block_j_write": 16,
    "brute_warps": 4,
    "brute_warps_write": 4,
    "brute_chunk": 512,
    "cell_block_i": 16,
    "cell_block_j": 8,
    "cell_warps": 1,
    "cell_block_i_write": 8,
    "cell_block_j_write": 8,
    "cell_warps_write": 1,
    "cell_block_o": 16,
    "cell_programs": 8448,
    "cell_parts": 0,
    "cell_parts9_max_atoms": 20000,
    "cell_parts3_max_atoms": 200000,
    "fill_block": 512,
    "fill_warps": 4,
    "fast_launch": True,
    "bin_block": 256,
}

#: numbers per structure in the geometry rows (:mod:`torchmdx.kernels.cell_geometry`)
_GEO_WIDTH = GEO_WIDTH


def available(device: torch.device | str) -> bool:
    """Whether this backend can run on ``device``: CUDA with triton, or the CPU interpreter."""
    if not HAVE_TRITON:
        return False
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


if HAVE_TRITON:
    from torchmdx.kernels.neighbors_triton_brute import _brute_kernel
    from torchmdx.kernels.neighbors_triton_cell import _bin_kernel, _cell_pairs_kernel, _extent_kernel, _scatter_kernel
    from torchmdx.kernels.neighbors_triton_common import _displacement_kernel, _fill_kernel


_PARAM_CACHE: dict = {}


def _launch(kernel, grid, args, num_warps, **constexprs):
    """:func:`torchmdx.kernels.triton_launch.launch` (direct launches unless ``CONFIG["fast_launch"]`` is off)."""
    launch(kernel, grid, args, num_warps, CONFIG.get("fast_launch", True), **constexprs)


def _params(cutoff: float, cutoff_lower: float, dtype, device) -> torch.Tensor:
    """[cutoff^2, cutoff_lower^2] on the device in the positions' dtype (cached: no copy per call)."""
    key = (cutoff, cutoff_lower, dtype, str(device))
    out = _PARAM_CACHE.get(key)
    if out is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise NeighborListError("neighbor list: call once with this cutoff before CUDA-graph capture")
        if len(_PARAM_CACHE) > 64:
            _PARAM_CACHE.clear()
        out = torch.tensor([cutoff * cutoff, cutoff_lower * cutoff_lower], dtype=dtype).to(device)
        _PARAM_CACHE[key] = out
    return out


def _require(pos: torch.Tensor) -> None:
    if not HAVE_TRITON:
        raise NeighborListError("the triton neighbor-list backend needs the 'triton' package (Linux); use backend='torch'")
    if pos.device.type == "cuda":
        return
    if pos.device.type == "cpu" and interpreting():
        return
    raise NeighborListError(
        f"the triton neighbor-list backend runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1), "
        f"got positions on {pos.device}; use backend='torch'"
    )


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
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
    method: str = "auto",
    cell_check: str = "host",
) -> Neighbors:
    """All pairs with ``cutoff_lower <= |r_ij| < cutoff`` (Å) under minimum image, on the GPU.

    pos [N, 3] Å (float32 or float64; other float types are computed in float32); batch [N]
    long, sorted (PyG convention; None: one structure); cell [B, 3, 3] or [3, 3] Å (rows are
    lattice vectors); pbc [B, 3] or [3] bool. ``full``: both (i, j) and (j, i), else i < j only.
    ``max_pairs``: fixed-capacity output, no host synchronisation (see the module docstring).
    ``method``: ``"brute"``, ``"cell"`` or ``"auto"`` (brute force for structures of at most
    :data:`BRUTE_FORCE_MAX_ATOMS` atoms). ``cell_check``: ``"host"`` validates each new cell once
    on the host (cached) and raises; ``"device"`` builds the geometry from ``cell`` and ``pbc`` on
    the device at every call (capturable, for static buffers rewritten between CUDA-graph replays)
    and reports a bad cell in ``Neighbors.cell_error`` instead of raising (the list is then
    unusable; :func:`torchmdx.kernels.cell_geometry.describe_problem` says why).
    Returns :class:`torchmdx.kernels.neighbors.Neighbors`.
    """
    cutoff = float(cutoff)
    cutoff_lower = float(cutoff_lower)
    if not (cutoff > 0 and math.isfinite(cutoff)):
        raise NeighborListError(f"cutoff must be a positive number of Å, got {cutoff}")
    if not (0 <= cutoff_lower < cutoff):
        raise NeighborListError(f"cutoff_lower must satisfy 0 <= cutoff_lower < cutoff ({cutoff} Å), got {cutoff_lower}")
    if method not in ("auto", "brute", "cell"):
        raise NeighborListError(f"unknown neighbor-list method {method!r}; choose auto, brute or cell")
    if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[1] != 3:
        raise NeighborListError(f"positions must have shape [N, 3], got {list(getattr(pos, 'shape', []))}")
    if max_pairs is not None:
        max_pairs = int(max_pairs)
        if max_pairs < 0:
            raise NeighborListError(f"max_pairs must be >= 0, got {max_pairs}")
    if cell_check not in ("host", "device"):
        raise NeighborListError(f"unknown cell_check {cell_check!r}; choose host or device")
    _require(pos)
    out_dtype = pos.dtype
    work = pos.detach()
    if work.dtype not in (torch.float32, torch.float64):
        work = work.float()
    work = work.contiguous()
    device, dtype = work.device, work.dtype
    n_atoms = work.shape[0]
    capacity_mode = max_pairs is not None

    if batch is not None:
        batch = torch.as_tensor(batch, device=device)
        if batch.shape != (n_atoms,):
            raise NeighborListError(f"batch must have shape [{n_atoms}] (one entry per atom), got {list(batch.shape)}")
        batch = batch.long().contiguous()
    cell_error = None
    if cell_check == "device" and cell is not None and pbc is not None:
        # every call, on the device: a captured step sees the cell of the batch it replays on
        found = cell_geometry(torch.as_tensor(cell, device=device), torch.as_tensor(pbc, device=device), dtype)
        cell_error = first_bad_structure(found, cutoff)
        geometry = KernelGeometry(found.geo, found.geo.shape[0], True, True, True, None, None)
    else:
        geometry = cached_geometry(cell, pbc, device, dtype)

    structures = None
    largest = n_atoms
    has_batch = batch is not None
    if has_batch:
        start = torch.searchsorted(batch, batch)
        end = torch.searchsorted(batch, batch, right=True)
    if has_batch and not capacity_mode and n_atoms > 0:
        # one host read for the checks the exact path can afford (the capacity path trusts its input)
        unsorted = (batch[1:] < batch[:-1]).any() if n_atoms > 1 else torch.zeros((), dtype=torch.bool, device=device)
        stats = torch.stack([batch.min(), batch.max(), unsorted.long(), (end - start).max()]).tolist()
        if stats[0] < 0:
            raise NeighborListError("batch holds a negative structure index")
        structures = stats[1] + 1
        largest = stats[3]
        if geometry.rows > 1 and geometry.rows < structures:
            raise NeighborListError(
                f"cell must have shape [3, 3] or [{structures}, 3, 3] (rows are lattice vectors, Å), got {list(cell.shape)}"
            )
        if stats[2]:
            return _unsorted_batch(pos, cutoff, batch, cell, pbc, cutoff_lower, full, method)
    elif not has_batch:
        structures = 1
    if cell_error is None:
        check_widths(geometry, cutoff, structures)

    if n_atoms == 0:
        result = _empty(max_pairs, device, out_dtype)
        result.cell_error = cell_error
        return result
    if not has_batch:
        start = end = batch = work  # placeholders, never read (HAS_BATCH=False)
    if method == "auto":
        method = "brute" if largest <= BRUTE_FORCE_MAX_ATOMS else "cell"

    params = _params(cutoff, cutoff_lower, dtype, device)
    geo = geometry.geo if geometry.periodic else params
    flags = dict(HAS_BATCH=has_batch, PERIODIC=geometry.periodic, ORTHO=not geometry.triclinic)
    half = 0 if full else 1

    if method == "brute":
        status = torch.zeros(1, dtype=torch.int32, device=device)
        bi, bj, warps = CONFIG["brute_block_i"], CONFIG["brute_block_j"], CONFIG["brute_warps"]
        if has_batch:
            n_chunks, chunk = 1, 0
        else:
            step = max(bj, CONFIG["brute_block_j_write"])
            chunk = max(step, CONFIG["brute_chunk"] // step * step)
            n_chunks = triton.cdiv(n_atoms, chunk)
        grid = (triton.cdiv(n_atoms, bi), n_chunks)
        total_index = n_atoms * n_chunks
        counts = torch.empty(total_index + 1, dtype=torch.long, device=device)
        _launch(_brute_kernel, grid, (work, start, end, batch, geo, geometry.rows, params, counts, counts, status,
                                      counts, 0, n_atoms, n_chunks, chunk, half, 0),
                warps, WRITE=False, BLOCK_I=bi, BLOCK_J=bj, **flags)
        offsets = torch.cumsum(counts, 0)
        fill_pos, fill_perm = work, counts  # pairs hold atom indices (fill_perm unused)

        def write_pairs(pairs, capacity, packed):
            _launch(_brute_kernel, grid, (work, start, end, batch, geo, geometry.rows, params, counts, offsets,
                                          status, pairs, capacity, n_atoms, n_chunks, chunk, half, int(packed)),
                    CONFIG["brute_warps_write"], WRITE=True, BLOCK_I=bi, BLOCK_J=CONFIG["brute_block_j_write"],
                    **flags)
    else:
        slots = n_atoms if has_batch else 1
        block = CONFIG["bin_block"]
        grid_bin = (triton.cdiv(n_atoms, block),)
        # one zeroed int32 buffer (one launch): status flag, atoms per cell, cell starts (the
        # first 0); the three parts start 16-byte aligned
        aligned = triton.cdiv(n_atoms, 4) * 4
        scratch = torch.zeros(4 + aligned + n_atoms + 1, dtype=torch.int32, device=device)
        status = scratch[0:1]
        cell_count = scratch[4:4 + n_atoms]
        cell_start = scratch[4 + aligned:]
        if geometry.has_open:
            ext = torch.full((slots, 6), float("-inf"), dtype=torch.float32, device=device)
            _launch(_extent_kernel, grid_bin, (work, start, batch, geo, geometry.rows, ext, n_atoms), 4,
                    BLOCK=block, HAS_BATCH=has_batch, PERIODIC=geometry.periodic)
        else:
            ext = status
        keys = torch.empty(n_atoms, dtype=torch.int32, device=device)
        cells = torch.empty(slots * 3, dtype=torch.int32, device=device)
        _launch(_bin_kernel, grid_bin, (work, start, end, batch, geo, geometry.rows, ext, keys, cells, cell_count,
                                        status, cutoff * (1.0 + _CELL_MARGIN), n_atoms),
                4, HAS_OPEN=geometry.has_open, BLOCK=block, HAS_BATCH=has_batch, PERIODIC=geometry.periodic)
        # counting sort by cell: starts = scan of the counts, then every atom takes a place
        torch.cumsum(cell_count, 0, dtype=torch.int32, out=cell_start[1:])
        atom_pos = torch.empty(n_atoms, 3, dtype=dtype, device=device)
        atom_index = torch.empty(n_atoms, dtype=torch.int32, device=device)
        _launch(_scatter_kernel, grid_bin, (work, keys, cell_count, cell_start[1:], atom_pos, atom_index, n_atoms),
                4, BLOCK=block)
        sorted_pos = torch.empty(n_atoms, 3, dtype=dtype, device=device)
        sorted_index = torch.empty(n_atoms, dtype=torch.int32, device=device)
        bi, warps = CONFIG["cell_block_i"], CONFIG["cell_warps"]
        parts = _cell_parts(n_atoms)
        programs = max(1, min(n_atoms * parts, CONFIG["cell_programs"]))
        total_index = n_atoms * parts
        counts = torch.empty(total_index + 1, dtype=torch.long, device=device)
        _launch(_cell_pairs_kernel, (programs,),
                (atom_pos, atom_index, sorted_pos, sorted_index, cell_start, cells, start, batch, geo, geometry.rows,
                 params, counts, counts, counts, 0, n_atoms, programs, half, 0),
                warps, WRITE=False, BLOCK_I=bi, BLOCK_J=CONFIG["cell_block_j"], BLOCK_O=CONFIG["cell_block_o"],
                PARTS=parts, **flags)
        offsets = torch.cumsum(counts, 0)
        fill_pos, fill_perm = sorted_pos, sorted_index  # pairs hold indices in cell order

        def write_pairs(pairs, capacity, packed):
            _launch(_cell_pairs_kernel, (programs,),
                    (sorted_pos, sorted_index, sorted_pos, sorted_index, cell_start, cells, start, batch, geo,
                     geometry.rows, params, counts, offsets, pairs, capacity, n_atoms, programs, half, int(packed)),
                    CONFIG["cell_warps_write"], WRITE=True, BLOCK_I=CONFIG["cell_block_i_write"],
                    BLOCK_J=CONFIG["cell_block_j_write"], BLOCK_O=CONFIG["cell_block_o"], PARTS=parts, **flags)

    fill_block = CONFIG["fill_block"]

    def write(out, capacity, packed, mask=None, overflow=None):
        """Packed pairs into edge_index row 1 (write pass), then every row expanded (fill)."""
        ei, shifts, vectors, distances = out
        write_pairs(ei, capacity, packed)
        has_mask = mask is not None
        _launch(_fill_kernel, (max(1, triton.cdiv(capacity, fill_block)),),
                (fill_pos, fill_perm, batch, geo, geometry.rows, offsets, ei, shifts, vectors, distances,
                 mask.view(torch.int8) if has_mask else ei, overflow.view(torch.int8) if has_mask else ei,
                 capacity, total_index, max(n_atoms - 1, 0), int(packed)),
                CONFIG["fill_warps"], SORTED=method == "cell", HAS_MASK=has_mask, BLOCK=fill_block, **flags)

    num_pairs = offsets[total_index]
    if capacity_mode:
        out = _allocate(max_pairs, device, dtype)
        mask = torch.empty(max_pairs, dtype=torch.bool, device=device)
        overflow = torch.empty((), dtype=torch.bool, device=device)
        write(out, max_pairs, False, mask, overflow)
        ei, shifts, vectors, distances = out
        ei = ei.view(2, max_pairs)
    else:
        # exact size without a read-back in the middle: write into an estimated capacity, read
        # the total once at the end, and re-run only the write passes if the estimate was short
        ratio_key = (cutoff, full, method)
        estimate = _PAIRS_PER_ATOM.get(ratio_key)
        if estimate is None:
            total, bad = torch.stack([num_pairs, status[0].long()]).tolist()
            out = None
        else:
            capacity = int(n_atoms * estimate * 1.1) + 1024
            out = _allocate(capacity, device, dtype)
            write(out, capacity, True)
            total, bad = torch.stack([num_pairs, status[0].long()]).tolist()
            if total > capacity:
                out = None
        if bad:
            row = int((~torch.isfinite(work)).any(-1).nonzero()[0, 0])
            raise NeighborListError(f"atom {row} has a non-finite position {work[row].tolist()}")
        if out is None:
            out = _allocate(total, device, dtype)
            write(out, total, True)
        if len(_PAIRS_PER_ATOM) > 64:
            _PAIRS_PER_ATOM.clear()
        _PAIRS_PER_ATOM[ratio_key] = total / n_atoms
        ei, shifts, vectors, distances = out
        ei = ei[: 2 * total].view(2, total)
        shifts, vectors, distances = shifts[:total], vectors[:total], distances[:total]
        mask = None
        overflow = torch.zeros((), dtype=torch.bool, device=device)
    if out_dtype != dtype:
        shifts, vectors, distances = shifts.to(out_dtype), vectors.to(out_dtype), distances.to(out_dtype)
    return Neighbors(edge_index=ei, shifts=shifts, vectors=vectors, distances=distances,
                     num_pairs=num_pairs, overflow=overflow, mask=mask, cell_error=cell_error)


def _cell_parts(n_atoms: int) -> int:
    """Work items per cell of the cell-list kernels (1, 3 or 9): more for small systems, whose
    few cells would leave most of the GPU idle (``CONFIG["cell_parts"]`` overrides)."""
    parts = CONFIG.get("cell_parts")
    if parts:
        return int(parts)
    if n_atoms <= CONFIG["cell_parts9_max_atoms"]:
        return 9
    return 3 if n_atoms <= CONFIG["cell_parts3_max_atoms"] else 1


#: pairs per atom of the last exact list per (cutoff, full, method): sizes the next one
_PAIRS_PER_ATOM: dict = {}


def _allocate(capacity, device, dtype):
    """Output buffers; edge_index is flat (2 * capacity) so an exact list can be packed [2, total]."""
    ei = torch.empty(2 * capacity, dtype=torch.long, device=device)
    shifts = torch.empty(capacity, 3, dtype=dtype, device=device)
    vectors = torch.empty(capacity, 3, dtype=dtype, device=device)
    distances = torch.empty(capacity, dtype=dtype, device=device)
    return ei, shifts, vectors, distances


def _empty(max_pairs, device, dtype) -> Neighbors:
    rows = 0 if max_pairs is None else max_pairs
    zeros3 = torch.zeros(rows, 3, dtype=dtype, device=device)
    return Neighbors(
        edge_index=torch.zeros(2, rows, dtype=torch.long, device=device),
        shifts=zeros3,
        vectors=zeros3.clone(),
        distances=torch.zeros(rows, dtype=dtype, device=device),
        num_pairs=torch.zeros((), dtype=torch.long, device=device),
        overflow=torch.zeros((), dtype=torch.bool, device=device),
        mask=None if max_pairs is None else torch.zeros(rows, dtype=torch.bool, device=device),
    )


def _unsorted_batch(pos, cutoff, batch, cell, pbc, cutoff_lower, full, method) -> Neighbors:
    """Exact path for a batch vector that is not sorted: group the atoms, then map back."""
    order = torch.argsort(batch, stable=True)
    nb = neighbor_list(pos[order], cutoff, batch[order], cell, pbc, cutoff_lower=cutoff_lower,
                       full=full, method=method)
    i = order[nb.edge_index[0]]
    j = order[nb.edge_index[1]]
    n = pos.shape[0]
    perm = torch.sort(i * n + j, stable=True).indices
    return Neighbors(edge_index=torch.stack([i[perm], j[perm]]), shifts=nb.shifts[perm],
                     vectors=nb.vectors[perm], distances=nb.distances[perm], num_pairs=nb.num_pairs,
                     overflow=nb.overflow)


# --------------------------------------------------------------------------------------------
# Verlet skin
# --------------------------------------------------------------------------------------------
def needs_rebuild(
    pos: torch.Tensor,
    reference_pos: torch.Tensor,
    skin: float,
    batch: Optional[torch.Tensor] = None,
    cell: Optional[torch.Tensor] = None,
    pbc: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """0-d bool tensor on the device: did any atom move more than ``skin / 2`` (Å)?

    The displacement pos - reference_pos is taken under minimum image (an atom wrapped back
    into the box has not moved). A list built with cutoff + skin at ``reference_pos`` holds every
    pair within ``cutoff`` as long as this is False. No host synchronisation (one kernel on CUDA;
    plain torch elsewhere). A non-finite displacement counts as moved.
    """
    if pos.shape != reference_pos.shape:
        raise NeighborListError(
            f"needs_rebuild: positions {list(pos.shape)} and reference positions {list(reference_pos.shape)} differ in shape"
        )
    skin = float(skin)
    if not skin >= 0:
        raise NeighborListError(f"skin must be >= 0 Å, got {skin}")
    work = pos.detach()
    if work.dtype not in (torch.float32, torch.float64):
        work = work.float()
    work = work.contiguous()
    ref = reference_pos.detach().to(work.dtype).contiguous()
    device, dtype = work.device, work.dtype
    geometry = cached_geometry(cell, pbc, device, dtype)
    limit2 = (0.5 * skin) ** 2
    n_atoms = work.shape[0]
    if n_atoms == 0:
        return torch.zeros((), dtype=torch.bool, device=device)
    if available(device):
        flag = torch.zeros(1, dtype=torch.int32, device=device)
        has_batch = batch is not None
        b = torch.as_tensor(batch, device=device).long().contiguous() if has_batch else work
        geo = geometry.geo if geometry.periodic else work
        block = 1024
        _launch(_displacement_kernel, (triton.cdiv(n_atoms, block),),
                (work, ref, b, geo, geometry.rows, flag, limit2, n_atoms), 4, HAS_BATCH=has_batch,
                PERIODIC=geometry.periodic, BLOCK=block)
        return flag[0] > 0
    delta = work - ref
    if geometry.periodic:
        geo = geometry.geo
        if geometry.rows > 1 and batch is not None:
            rows = torch.as_tensor(batch, device=device).long().clamp(max=geometry.rows - 1)
            g = geo[rows]
        else:
            g = geo[0].expand(n_atoms, _GEO_WIDTH)
        h = g[:, 0:9].reshape(-1, 3, 3)
        inv = g[:, 9:18].reshape(-1, 3, 3)
        per = g[:, 18:21]
        s = torch.einsum("nd,ndl->nl", delta, inv)
        shift = torch.floor(0.5 - s) * per
        delta = delta + torch.einsum("nk,nkd->nd", shift, h)
    d2 = (delta * delta).sum(-1)
    return ((d2 > limit2) | torch.isnan(d2)).any()


def grow_to_fit(build, max_pairs: int, growth: float = 1.25):
    """Run ``build(max_pairs) -> Neighbors`` until it does not overflow; returns (nb, max_pairs).

    For fixed-capacity callers (e.g. an MD loop captured in a CUDA graph): check ``overflow``
    outside the graph, grow to ``growth * num_pairs`` rows and build again. This reads two
    device scalars on the host, so call it outside graph capture.
    """
    while True:
        nb = build(max_pairs)
        overflow, found = torch.stack([nb.overflow.long(), nb.num_pairs.long()]).tolist()
        if not overflow:
            return nb, max_pairs
        max_pairs = max(int(math.ceil(found * growth)), max_pairs + 1)
