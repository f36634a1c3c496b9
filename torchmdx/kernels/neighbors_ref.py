"""Reference neighbor list in plain torch (brute force and cell list), batched and periodic.

This is the backend ``"torch"`` of :func:`torchmdx.kernels.neighbors.neighbor_list`; the
conventions (receiver ``i``, neighbor ``j``, integer image shifts ``n_ij``, sorting, padding
rows of fixed-capacity lists) are those of that module's docstring:

    vectors_ij = pos[j] - pos[i] + n_ij @ cell[batch[i]]        (Å)
    kept:  cutoff_lower <= |vectors_ij| < cutoff,  never (i == j and n_ij == 0)

Method
------
1. Per structure, the cell is *completed*: a row of a non-periodic direction is replaced by an
   orthonormal complement of the periodic rows (it is only used to compute fractional
   coordinates; shifts along it are always 0), so slabs and wires with a zero or arbitrary cell
   row work. Fractional coordinates s = pos @ cell^-1 are wrapped into [0, 1) along periodic
   directions: pos = wrapped + w @ cell with integer w (atoms may lie any number of images away).
2. Perpendicular widths of the cell, d_k = V / |a_l x a_m|, bound the images to visit: a pair
   within the cutoff has |s_j - s_i + m|_k * d_k <= r < cutoff, so |m_k| <= floor(cutoff / d_k) + 1.
3. ``"brute"``: every pair of atoms of a structure against every candidate image m (O(N^2) per
   image, chunked). ``"cell"``: the wrapped atoms plus their periodic images that lie within the
   cutoff of the box faces ("ghosts") are binned on a Cartesian grid of spacing >= cutoff and
   each atom is compared with the 27 surrounding bins (O(N)).
4. The shift returned is n_ij = m - w_j + w_i, so vectors are computed from the positions as
   given; both methods compute vectors, and filter on them, with the same expression, so they
   return identical lists.

Minimum image: a cutoff larger than half the perpendicular width of a periodic direction is
refused (:class:`NeighborListError` naming the structure and its widths): then an atom could
see two images of the same neighbor, which most potentials (and TorchMD-NET) do not expect.
``allow_multiple_images=True`` lifts the check and enumerates every image within the cutoff,
including an atom's own periodic images (i, i, n != 0), as needed for very small cells.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from torchmdx.errors import NeighborListError
from torchmdx.kernels.neighbors import Neighbors

#: largest structure (atoms) for which ``method="auto"`` uses brute force
BRUTE_FORCE_MAX_ATOMS = 384
#: number of candidate pairs processed at once (memory bound of the reference)
_CHUNK_PAIRS = 1 << 21


# --------------------------------------------------------------------------------------------
# input normalisation and cell geometry
# --------------------------------------------------------------------------------------------
def _as_structure_tensors(pos, batch, cell, pbc):
    """Return batch [N], B, cell [B,3,3] (or None) and pbc [B,3] bool on pos' device/dtype."""
    n = pos.shape[0]
    device, dtype = pos.device, pos.dtype
    if batch is None:
        batch = torch.zeros(n, dtype=torch.long, device=device)
    else:
        batch = torch.as_tensor(batch, device=device).long()
        if batch.shape != (n,):
            raise NeighborListError(f"batch must have shape [{n}] (one entry per atom), got {list(batch.shape)}")
        if n > 0 and int(batch.min()) < 0:
            raise NeighborListError("batch holds a negative structure index")
    num_structures = int(batch.max().item()) + 1 if n > 0 else 1
    if cell is not None:
        cell = torch.as_tensor(cell, device=device, dtype=dtype)
        if cell.dim() == 2:
            cell = cell.unsqueeze(0).expand(num_structures, 3, 3)
        if cell.dim() != 3 or cell.shape[1:] != (3, 3) or cell.shape[0] < num_structures:
            raise NeighborListError(
                f"cell must have shape [3, 3] or [{num_structures}, 3, 3] (rows are lattice vectors, Å), got {list(cell.shape)}"
            )
    if pbc is not None:
        pbc = torch.as_tensor(pbc, device=device).bool()
        if pbc.dim() == 1:
            pbc = pbc.unsqueeze(0).expand(num_structures, 3)
        if pbc.dim() != 2 or pbc.shape[1] != 3 or pbc.shape[0] < num_structures:
            raise NeighborListError(f"pbc must have shape [3] or [{num_structures}, 3], got {list(pbc.shape)}")
        pbc = pbc[:num_structures]
        if bool(pbc.any()) and cell is None:
            raise NeighborListError("periodic boundary conditions were given without a cell")
    else:
        pbc = torch.zeros(num_structures, 3, dtype=torch.bool, device=device)
    if cell is not None:
        cell = cell[:num_structures]
    return batch, num_structures, cell, pbc


def _complete_cell(cell: torch.Tensor, periodic: torch.Tensor) -> torch.Tensor:
    """Cell [3,3] whose non-periodic rows are replaced by an orthonormal complement."""
    rows = [cell[k] for k in range(3)]
    per = [bool(p) for p in periodic]
    if all(per):
        return cell
    basis = []  # orthonormal basis of the span of the periodic rows
    for k in range(3):
        if per[k]:
            v = rows[k].clone()
            for b in basis:
                v = v - (v @ b) * b
            norm = v.norm()
            if norm > 0:
                basis.append(v / norm)
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device)
    complement = []
    for e in eye:  # Gram-Schmidt of the Cartesian axes against the periodic span
        v = e.clone()
        for b in basis + complement:
            v = v - (v @ b) * b
        norm = v.norm()
        if norm > 1e-6:
            complement.append(v / norm)
    out = list(rows)
    c = 0
    for k in range(3):
        if not per[k]:
            out[k] = complement[c]
            c += 1
    return torch.stack(out)


def perpendicular_widths(cell: torch.Tensor) -> torch.Tensor:
    """Distances between opposite faces of the cell [..., 3, 3]: d_k = V / |a_l x a_m| (Å), in the cell's dtype.

    Computed in float64: in float32 the squares inside the norms of the cross products overflow for a cell of
    about 1e18 Å or more (``cell=[1e30, 10, 10]`` gave widths "b 0, c 0" and was refused as too narrow)."""
    wide = cell.to(torch.float64)
    a, b, c = wide[..., 0, :], wide[..., 1, :], wide[..., 2, :]
    volume = torch.linalg.det(wide).abs()
    areas = torch.stack(
        [torch.linalg.cross(b, c).norm(dim=-1), torch.linalg.cross(c, a).norm(dim=-1), torch.linalg.cross(a, b).norm(dim=-1)],
        dim=-1,
    )
    return (volume.unsqueeze(-1) / areas).to(cell.dtype)


def _structure_geometry(b, cell_b, pbc_b, cutoff, allow_multiple_images):
    """Completed cell, its inverse and the image range [3] (long) of structure ``b``."""
    periodic_rows = cell_b[pbc_b.bool()]
    if not bool(torch.isfinite(periodic_rows).all()):  # was called "singular" (the Triton path's message)
        raise NeighborListError(f"structure {b}: the cell holds non-finite values (rows {cell_b.tolist()} Å)")
    completed = _complete_cell(cell_b, pbc_b)
    volume = torch.linalg.det(completed).abs()
    if not torch.isfinite(volume) or float(volume) <= 1e-12:
        raise NeighborListError(
            f"structure {b}: the cell of the periodic directions is singular (rows {cell_b.tolist()} Å)"
        )
    widths = perpendicular_widths(completed)
    if not allow_multiple_images:
        too_small = pbc_b & (widths < 2.0 * cutoff)
        if bool(too_small.any()):
            names = "abc"
            listed = ", ".join(
                f"{names[k]} {float(widths[k]):.4g}" for k in range(3) if bool(pbc_b[k])
            )
            raise NeighborListError(
                f"structure {b}: cutoff {cutoff:g} Å is larger than half the perpendicular width of the "
                f"periodic box (widths {listed} Å); minimum image needs widths >= {2 * cutoff:g} Å "
                f"(use a larger box or a smaller cutoff)"
            )
    images = torch.where(
        pbc_b,
        torch.floor(cutoff / widths).long() + 1,
        torch.zeros(3, dtype=torch.long, device=cell_b.device),
    )
    return completed, torch.linalg.inv(completed), widths, images


def _image_offsets(images: torch.Tensor, dtype, device) -> torch.Tensor:
    """All integer offsets m with |m_k| <= images[k]: [M, 3]."""
    ranges = [torch.arange(-int(images[k]), int(images[k]) + 1, device=device) for k in range(3)]
    grid = torch.cartesian_prod(*ranges).reshape(-1, 3)
    return grid.to(dtype)


# --------------------------------------------------------------------------------------------
# pair candidates
# --------------------------------------------------------------------------------------------
def _filter_pairs(pos, cell_b, i, j, shift, cutoff, cutoff_lower, full):
    """Keep candidate (i, j, shift) rows that are in range; returns (i, j, shift, vectors)."""
    vectors = pos[j] - pos[i]
    if cell_b is not None:
        vectors = vectors + shift @ cell_b
    dist2 = (vectors * vectors).sum(-1)
    keep = dist2 < cutoff * cutoff
    if cutoff_lower > 0:
        keep &= dist2 >= cutoff_lower * cutoff_lower
    self_same_image = (i == j) & (shift == 0).all(-1)
    keep &= ~self_same_image
    if not full:
        keep &= (i < j) | ((i == j) & _first_nonzero_positive(shift))
    return i[keep], j[keep], shift[keep], vectors[keep]


def _first_nonzero_positive(shift: torch.Tensor) -> torch.Tensor:
    """For each row, True if its first non-zero component is positive (picks one of n, -n)."""
    s0, s1, s2 = shift[:, 0], shift[:, 1], shift[:, 2]
    return (s0 > 0) | ((s0 == 0) & (s1 > 0)) | ((s0 == 0) & (s1 == 0) & (s2 > 0))


def _brute_structure(pos, atoms, cell_b, inv_b, pbc_b, images, cutoff, cutoff_lower, full):
    """All pairs of ``atoms`` (global indices) against all candidate images."""
    device, dtype = pos.device, pos.dtype
    n = atoms.numel()
    if cell_b is None or not bool(pbc_b.any()):
        wrap = torch.zeros(n, 3, dtype=dtype, device=device)
        offsets = torch.zeros(1, 3, dtype=dtype, device=device)
        cell_used = None
    else:
        frac = pos[atoms] @ inv_b
        wrap = torch.where(pbc_b, torch.floor(frac), torch.zeros_like(frac))
        offsets = _image_offsets(images, dtype, device)
        cell_used = cell_b
    out = []
    # upper bound of pairs per chunk of receivers
    rows_per_chunk = max(1, _CHUNK_PAIRS // max(1, n))
    local = torch.arange(n, device=device)
    for m in offsets:
        for start in range(0, n, rows_per_chunk):
            li = local[start:start + rows_per_chunk]
            ii = li.repeat_interleave(n)
            jj = local.repeat(li.numel())
            shift = m.unsqueeze(0) - wrap[jj] + wrap[ii]
            gi, gj = atoms[ii], atoms[jj]
            out.append(_filter_pairs(pos, cell_used, gi, gj, shift, cutoff, cutoff_lower, full))
    return out


def _close_bin_gaps(g_bin: torch.Tensor, r_bin: torch.Tensor) -> tuple:
    """Renumber the occupied bins of each axis (starting at 1) so that bins 1 apart stay 1 apart and farther
    ones become 2 apart: the same neighbour bins, but a grid of at most 2 × (occupied bins) + 3 per axis. One
    atom 1e14 Å from the others made a grid of 1e40 bins, whose key overflowed int64 (a ValueError from
    ``predict``)."""
    g_out, r_out = torch.empty_like(g_bin), torch.empty_like(r_bin)
    for axis in range(3):
        values = torch.unique(torch.cat([g_bin[:, axis], r_bin[:, axis]]))  # sorted
        renumbered = torch.cat([values.new_ones(1), 1 + values.diff().clamp(max=2).cumsum(0)])
        g_out[:, axis] = renumbered[torch.searchsorted(values, g_bin[:, axis].contiguous())]
        r_out[:, axis] = renumbered[torch.searchsorted(values, r_bin[:, axis].contiguous())]
    return g_out, r_out


def _cell_list_structure(pos, atoms, cell_b, inv_b, pbc_b, widths, images, cutoff, cutoff_lower, full):
    """Cell-list search for one structure: wrapped atoms + ghost images binned by cutoff."""
    device, dtype = pos.device, pos.dtype
    n = atoms.numel()
    p = pos[atoms]
    periodic = cell_b is not None and bool(pbc_b.any())
    if periodic:
        frac = p @ inv_b
        wrap = torch.where(pbc_b, torch.floor(frac), torch.zeros_like(frac))
        frac_w = frac - wrap
        offsets = _image_offsets(images, dtype, device)  # [M,3]
        margin = torch.where(pbc_b, cutoff / widths + 1e-6, torch.full_like(widths, math.inf))
        # ghost candidates: every atom in every image whose fractional coordinates lie within
        # the cutoff of the box (periodic directions only)
        g_frac = frac_w.unsqueeze(0) + offsets.unsqueeze(1)  # [M, n, 3]
        inside = ((g_frac > -margin) & (g_frac < 1.0 + margin)).all(-1)
        m_idx, a_idx = inside.nonzero(as_tuple=True)
        ghost_atom = a_idx
        ghost_image = offsets[m_idx]
        ghost_pos = (p[a_idx] - wrap[a_idx] @ cell_b) + ghost_image @ cell_b
        recv_pos = p - wrap @ cell_b
    else:
        wrap = torch.zeros(n, 3, dtype=dtype, device=device)
        ghost_atom = torch.arange(n, device=device)
        ghost_image = torch.zeros(n, 3, dtype=dtype, device=device)
        ghost_pos = p
        recv_pos = p
    bin_size = cutoff * (1.0 + 1e-6) + 1e-9
    origin = ghost_pos.min(0).values - bin_size
    g_bin, r_bin = _close_bin_gaps(torch.floor((ghost_pos - origin) / bin_size).long(),
                                   torch.floor((recv_pos - origin) / bin_size).long())
    dims = [int(v) for v in torch.maximum(g_bin.max(0).values, r_bin.max(0).values) + 3]
    if dims[0] * dims[1] * dims[2] >= 2**62:
        from torchmdx.errors import NeighborListError

        raise NeighborListError(f"the atoms span {dims[0]} x {dims[1]} x {dims[2]} occupied cutoff-sized bins, more "
                                "than a 64-bit bin key holds; check for atoms far from the others")
    stride = torch.tensor([dims[1] * dims[2], dims[2], 1], device=device)
    g_key = (g_bin * stride).sum(-1)
    order = torch.argsort(g_key)
    sorted_key = g_key[order]
    neighbour_bins = torch.cartesian_prod(*[torch.arange(-1, 2, device=device)] * 3)  # [27, 3]
    out = []
    # candidates per receiver ~ 27 * density; choose receivers per chunk to bound memory
    mean_per_bin = max(1.0, ghost_pos.shape[0] / max(1, torch.unique(sorted_key).numel()))
    rows_per_chunk = max(1, int(_CHUNK_PAIRS / (27 * mean_per_bin)))
    for start in range(0, n, rows_per_chunk):
        li = torch.arange(start, min(n, start + rows_per_chunk), device=device)
        q_key = ((r_bin[li].unsqueeze(1) + neighbour_bins.unsqueeze(0)) * stride).sum(-1)  # [R, 27]
        lo = torch.searchsorted(sorted_key, q_key.reshape(-1), right=False)
        hi = torch.searchsorted(sorted_key, q_key.reshape(-1), right=True)
        counts = hi - lo
        total = int(counts.sum())
        if total == 0:
            continue
        recv = li.repeat_interleave(27).repeat_interleave(counts)
        first = torch.cumsum(counts, 0) - counts
        within = torch.arange(total, device=device) - first.repeat_interleave(counts)
        g = order[lo.repeat_interleave(counts) + within]
        jj = ghost_atom[g]
        shift = ghost_image[g] - wrap[jj] + wrap[recv]
        out.append(
            _filter_pairs(pos, cell_b if periodic else None, atoms[recv], atoms[jj], shift, cutoff, cutoff_lower, full)
        )
    return out


def _sort_pairs(i, j, shifts):
    """Permutation sorting rows by i, then j, then shift components (stable sorts, last key first)."""
    perm = torch.arange(i.numel(), device=i.device)
    for key in (shifts[:, 2], shifts[:, 1], shifts[:, 0], j, i):
        idx = torch.sort(key[perm], stable=True).indices
        perm = perm[idx]
    return perm


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
    allow_multiple_images: bool = False,
    cell_check: str = "host",
) -> Neighbors:
    """All pairs with ``cutoff_lower <= |r_ij| < cutoff`` (Å); see the module docstring.

    pos [N, 3] Å; batch [N] long (None: one structure); cell [B, 3, 3] or [3, 3] Å (rows are
    lattice vectors); pbc [B, 3] or [3] bool; ``full`` gives both (i, j) and (j, i), otherwise
    only i < j (and one of n / -n for periodic self-images); ``max_pairs`` turns on the
    fixed-capacity output (padding rows i = j = N-1, ``mask``, ``overflow``); ``method`` is
    ``"brute"``, ``"cell"`` or ``"auto"`` (brute force when every structure has at most
    :data:`BRUTE_FORCE_MAX_ATOMS` atoms). The neighbor list carries no gradient.
    ``cell_check="device"``: a bad cell does not raise; it is reported in ``cell_error`` (as the
    Triton backend does, :mod:`torchmdx.kernels.neighbors`) and its structure is treated as open.
    """
    cutoff = float(cutoff)
    cutoff_lower = float(cutoff_lower)
    if not (cutoff > 0 and math.isfinite(cutoff)):
        raise NeighborListError(f"cutoff must be a positive number of Å, got {cutoff}")
    if not (0 <= cutoff_lower < cutoff):
        raise NeighborListError(f"cutoff_lower must satisfy 0 <= cutoff_lower < cutoff ({cutoff} Å), got {cutoff_lower}")
    if method not in ("auto", "brute", "cell"):
        raise NeighborListError(f"unknown neighbor-list method {method!r}; choose auto, brute or cell")
    if pos.dim() != 2 or pos.shape[1] != 3:
        raise NeighborListError(f"positions must have shape [N, 3], got {list(pos.shape)}")
    pos = pos.detach()
    device, dtype = pos.device, pos.dtype
    n_atoms = pos.shape[0]
    if n_atoms > 0:
        finite = torch.isfinite(pos).all(-1)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0])
            raise NeighborListError(f"atom {bad} has a non-finite position {pos[bad].tolist()}")
    if cell_check not in ("host", "device"):
        raise NeighborListError(f"unknown cell_check {cell_check!r}; choose host or device")
    batch, num_structures, cell, pbc = _as_structure_tensors(pos, batch, cell, pbc)
    cell_error = None
    if cell_check == "device" and cell is not None:
        from torchmdx.kernels.cell_geometry import cell_geometry, first_bad_structure, narrow

        found = cell_geometry(cell, pbc)
        cell_error = first_bad_structure(found, cutoff)
        if int(cell_error) >= 0:  # this backend is host code: drop the periodicity of bad cells
            pbc = pbc & (found.periodic & ~narrow(found, cutoff)).unsqueeze(-1)

    # atoms of each structure (global indices), in input order
    order = torch.argsort(batch, stable=True)
    counts = torch.bincount(batch, minlength=num_structures) if n_atoms > 0 else torch.zeros(1, dtype=torch.long)
    starts = torch.cumsum(counts, 0) - counts
    if method == "auto":
        method = "brute" if n_atoms == 0 or int(counts.max()) <= BRUTE_FORCE_MAX_ATOMS else "cell"

    pieces = []
    with torch.no_grad():
        for b in range(num_structures):
            count = int(counts[b])
            if count == 0:
                continue
            atoms = order[int(starts[b]):int(starts[b]) + count]
            pbc_b = pbc[b]
            if cell is not None and bool(pbc_b.any()):
                cell_b = cell[b]
                _, inv_b, widths, images = _structure_geometry(b, cell_b, pbc_b, cutoff, allow_multiple_images)
            else:
                cell_b, inv_b, widths, images = None, None, None, None
            if method == "brute":
                pieces += _brute_structure(pos, atoms, cell_b, inv_b, pbc_b, images, cutoff, cutoff_lower, full)
            else:
                pieces += _cell_list_structure(
                    pos, atoms, cell_b, inv_b, pbc_b, widths, images, cutoff, cutoff_lower, full
                )
    if pieces:
        i = torch.cat([p[0] for p in pieces])
        j = torch.cat([p[1] for p in pieces])
        shifts = torch.cat([p[2] for p in pieces])
        vectors = torch.cat([p[3] for p in pieces])
    else:
        i = j = torch.zeros(0, dtype=torch.long, device=device)
        shifts = vectors = torch.zeros(0, 3, dtype=dtype, device=device)
    perm = _sort_pairs(i, j, shifts)
    i, j, shifts, vectors = i[perm], j[perm], shifts[perm], vectors[perm]
    distances = vectors.norm(dim=-1)
    num = i.numel()
    edge_index = torch.stack([i, j]).long()
    if max_pairs is None:
        return Neighbors(
            edge_index=edge_index,
            shifts=shifts,
            vectors=vectors,
            distances=distances,
            num_pairs=torch.tensor(num, dtype=torch.long, device=device),
            overflow=torch.tensor(False, device=device),
            cell_error=cell_error,
        )
    out = pad_neighbors(edge_index, shifts, vectors, distances, int(max_pairs), n_atoms)
    out.cell_error = cell_error
    return out


def pad_neighbors(edge_index, shifts, vectors, distances, max_pairs: int, n_atoms: int) -> Neighbors:
    """Fixed-capacity form: exactly ``max_pairs`` rows, padding rows i = j = N-1 and mask False.

    Rows beyond ``max_pairs`` are dropped (the list stays sorted) and ``overflow`` is set.
    """
    if max_pairs < 0:
        raise NeighborListError(f"max_pairs must be >= 0, got {max_pairs}")
    device, dtype = vectors.device, vectors.dtype
    num = edge_index.shape[1]
    kept = min(num, max_pairs)
    pad = max_pairs - kept
    fill = max(n_atoms - 1, 0)
    edge_out = torch.cat([edge_index[:, :kept], torch.full((2, pad), fill, dtype=torch.long, device=device)], 1)
    zeros3 = torch.zeros(pad, 3, dtype=dtype, device=device)
    mask = torch.cat([torch.ones(kept, dtype=torch.bool, device=device), torch.zeros(pad, dtype=torch.bool, device=device)])
    return Neighbors(
        edge_index=edge_out,
        shifts=torch.cat([shifts[:kept], zeros3]),
        vectors=torch.cat([vectors[:kept], zeros3]),
        distances=torch.cat([distances[:kept], torch.zeros(pad, dtype=dtype, device=device)]),
        num_pairs=torch.tensor(num, dtype=torch.long, device=device),
        overflow=torch.tensor(num > max_pairs, device=device),
        mask=mask,
    )
