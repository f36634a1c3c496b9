"""Per-structure cell geometry for the Triton neighbor lists, computed on the device.

For structure b with lattice rows a_0, a_1, a_2 (Å, ASE's convention) and periodic flags p_k:

1. *Completed cell* C: the periodic rows, with every non-periodic row replaced by a unit vector
   of an orthonormal basis of the complement of the periodic rows' span:
   - 3 periodic rows: C = cell;
   - 2 periodic rows a, b: the open row is (a x b) / |a x b|;
   - 1 periodic row a: the open rows are u = (a x e) / |a x e| (e the coordinate axis least
     aligned with a) and v = (a / |a|) x u, in that order;
   - none: the identity (the structure is not periodic; its cell is ignored).
   Fractional coordinates s = r @ C^-1 then measure the periodic directions exactly, and
   along the open ones they are Cartesian coordinates orthogonal to the periodic span.
2. C^-1 by the adjugate: the columns of C^-1 are (a_1 x a_2, a_2 x a_0, a_0 x a_1) / V with
   V = a_0 . (a_1 x a_2) (exact for orthogonal cells, no LU pivoting, no host synchronisation).
3. Perpendicular widths d_k = |V| / |a_l x a_m| (Å); minimum image is exact for a cutoff r_c
   when d_k >= 2 r_c along every periodic direction.

Everything is torch on the cell's device, in float64, with no host read, so a CUDA graph can
capture it (training steps on periodic batches rebuild the geometry of every batch inside the
graph, :func:`torchmdx.kernels.neighbors_triton.neighbor_list` with ``cell_check="device"``).
Problems are reported as data, not exceptions: :attr:`CellGeometry.problem` (per structure) and
:func:`first_bad_structure`; the host path turns them into one-line errors.

Row layout of :attr:`CellGeometry.geo` (``GEO_WIDTH`` = 33 numbers per structure, read by the
kernels): h = the cell with open rows zeroed (9), C^-1 (9), pbc flags (3), widths d of C (3; 1 for a
structure that is not periodic),
C^-1 with the columns of open directions zeroed (9; the minimum-image shift
n = -round(d @ that) needs no pbc flags). A structure with a problem gets the row of a
non-periodic structure (so no kernel sees a NaN or an infinite width).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from torchmdx.errors import NeighborListError

#: numbers per structure in :attr:`CellGeometry.geo`
GEO_WIDTH = 33
#: problem codes of :attr:`CellGeometry.problem`
OK, NON_FINITE, SINGULAR, NARROW = 0, 1, 2, 3
#: smallest |V| (Å^3) of a completed periodic cell
MIN_VOLUME = 1e-12


@dataclass
class CellGeometry:
    """geo [B, 33] (module docstring) in the requested dtype; widths [B, 3] float64 (Å; inf for
    open directions and problem structures); problem [B] long (OK, NON_FINITE, SINGULAR);
    periodic [B] bool (some direction periodic and no problem)."""

    geo: torch.Tensor
    widths: torch.Tensor
    problem: torch.Tensor
    periodic: torch.Tensor


def _unit(v: torch.Tensor) -> torch.Tensor:
    norm = v.norm(dim=-1, keepdim=True)
    return v / torch.where(norm > 0, norm, torch.ones_like(norm))


def completed_cells(cell: torch.Tensor, pbc: torch.Tensor) -> torch.Tensor:
    """C [B, 3, 3] (float64) of ``cell`` [B, 3, 3] Å and ``pbc`` [B, 3] bool (module docstring, 1)."""
    cell = cell.to(torch.float64)
    pbc = pbc.bool()
    B = cell.shape[0]
    eye = torch.eye(3, dtype=torch.float64, device=cell.device).expand(B, 3, 3)
    h = torch.where(pbc.unsqueeze(-1), cell, torch.zeros_like(cell))
    count = pbc.sum(-1)
    # two periodic rows: the normal of their plane (h has the open row zeroed, so summing the
    # three pairwise cross products leaves the one of the two periodic rows)
    normal = _unit(torch.linalg.cross(h[:, 1], h[:, 2]) + torch.linalg.cross(h[:, 2], h[:, 0])
                   + torch.linalg.cross(h[:, 0], h[:, 1]))
    # one periodic row a (the sum of h's rows): u ⊥ a from the coordinate axis least aligned with a
    a = h.sum(1)
    axis = torch.nn.functional.one_hot(a.abs().argmin(-1), 3).to(torch.float64)
    u = _unit(torch.linalg.cross(a, axis))
    v = torch.linalg.cross(_unit(a), u)
    # rank of each open row among the open rows (1 or 2)
    rank = torch.cumsum((~pbc).long(), -1)
    open_row = torch.where((count == 2).view(B, 1, 1), normal.unsqueeze(1).expand(B, 3, 3),
                           torch.where((rank == 1).unsqueeze(-1), u.unsqueeze(1), v.unsqueeze(1)))
    completed = torch.where(pbc.unsqueeze(-1), cell, open_row)
    return torch.where((count == 0).view(B, 1, 1), eye, completed)


def cell_geometry(cell: torch.Tensor, pbc: torch.Tensor, dtype: torch.dtype = torch.float64) -> CellGeometry:
    """:class:`CellGeometry` of ``cell`` [B, 3, 3] or [3, 3] (Å) and ``pbc`` [B, 3] or [3] (bool),
    broadcast against each other, on their device; ``geo`` in ``dtype``. No host read."""
    cell = torch.as_tensor(cell)
    pbc = torch.as_tensor(pbc, device=cell.device).bool()
    if cell.dim() == 2:
        cell = cell.unsqueeze(0)
    if pbc.dim() == 1:
        pbc = pbc.unsqueeze(0)
    B = max(cell.shape[0], pbc.shape[0])
    cell = cell.to(torch.float64).expand(B, 3, 3)
    pbc = pbc.expand(B, 3)
    any_periodic = pbc.any(-1)
    # only the periodic rows count (a slab's open row may hold anything, NaN included)
    h = torch.where(pbc.unsqueeze(-1), cell, torch.zeros_like(cell))
    finite = torch.isfinite(h).all(-1).all(-1)
    safe_cell = torch.where(finite.view(B, 1, 1), cell, torch.eye(3, dtype=torch.float64, device=cell.device))
    completed = completed_cells(safe_cell, pbc)
    c0, c1, c2 = completed[:, 0], completed[:, 1], completed[:, 2]
    x12, x20, x01 = torch.linalg.cross(c1, c2), torch.linalg.cross(c2, c0), torch.linalg.cross(c0, c1)
    volume = (c0 * x12).sum(-1)
    singular = ~(torch.isfinite(volume) & (volume.abs() > MIN_VOLUME))
    problem = torch.where(any_periodic & ~finite, torch.full_like(volume, NON_FINITE, dtype=torch.long),
                          torch.where(any_periodic & singular, torch.full_like(volume, SINGULAR, dtype=torch.long),
                                      torch.zeros_like(volume, dtype=torch.long)))
    usable = any_periodic & (problem == OK)
    safe_volume = torch.where(usable, volume, torch.ones_like(volume))
    inverse = torch.stack([x12, x20, x01], -1) / safe_volume.view(B, 1, 1)
    areas = torch.stack([x12.norm(dim=-1), x20.norm(dim=-1), x01.norm(dim=-1)], -1)
    raw_widths = safe_volume.abs().unsqueeze(-1) / torch.where(areas > 0, areas, torch.ones_like(areas))
    # the kernels read the completed cell's widths (1 for a structure that is not periodic)
    raw_widths = torch.where(usable.unsqueeze(-1), raw_widths, torch.ones_like(raw_widths))
    periodic_rows = pbc & usable.unsqueeze(-1)
    widths = torch.where(periodic_rows, raw_widths, torch.full_like(raw_widths, float("inf")))
    eye = torch.eye(3, dtype=torch.float64, device=cell.device).expand(B, 3, 3)
    inverse = torch.where(usable.view(B, 1, 1), inverse, eye)
    h = torch.where(periodic_rows.unsqueeze(-1), cell, torch.zeros_like(cell))
    flags = periodic_rows.to(torch.float64)
    geo = torch.cat([
        h.reshape(B, 9),
        inverse.reshape(B, 9),
        flags,
        raw_widths,
        (inverse * flags.unsqueeze(1)).reshape(B, 9),
    ], -1)
    return CellGeometry(geo.to(dtype), widths, problem, usable)


def narrow(geometry: CellGeometry, cutoff: float) -> torch.Tensor:
    """[B] bool: a periodic width below 2 ``cutoff`` (minimum image would miss pairs)."""
    return (geometry.widths < 2.0 * float(cutoff) * (1.0 - 1e-12)).any(-1)


def first_bad_structure(geometry: CellGeometry, cutoff: float) -> torch.Tensor:
    """0-d long tensor: ``index * 4 + code`` of the first structure whose cell cannot be used with
    ``cutoff`` (code NON_FINITE, SINGULAR or NARROW), -1 when every cell is fine. No host read."""
    code = torch.where(geometry.problem != OK, geometry.problem,
                       torch.where(narrow(geometry, cutoff), torch.full_like(geometry.problem, NARROW),
                                   torch.zeros_like(geometry.problem)))
    index = torch.arange(code.shape[0], device=code.device)
    none = torch.full_like(index, torch.iinfo(torch.long).max)
    first = torch.where(code != OK, index * 4 + code, none).min()
    return torch.where(first == torch.iinfo(torch.long).max, torch.full_like(first, -1), first)


def describe_problem(value: int, cell, pbc, cutoff: float, label: str | None = None) -> str:
    """One line for a :func:`first_bad_structure` value (host; ``cell`` [B,3,3], ``pbc`` [B,3]);
    ``label`` names the structure (default "structure b")."""
    b, code = divmod(int(value), 4)
    label = f"structure {b}" if label is None else label
    cells, flags = torch.as_tensor(cell).reshape(-1, 3, 3), torch.as_tensor(pbc).reshape(-1, 3)
    cell_b, pbc_b = cells[min(b, cells.shape[0] - 1)], flags[min(b, flags.shape[0] - 1)].bool()
    rows = cell_b.detach().to("cpu", torch.float64).tolist()
    if code == NON_FINITE:
        return f"{label}: the cell holds non-finite values (rows {rows} Å)"
    if code == SINGULAR:
        return f"{label}: the cell of the periodic directions is singular (rows {rows} Å)"
    widths = cell_geometry(cell_b.to("cpu"), pbc_b.to("cpu")).widths[0]
    listed = ", ".join(f"{'abc'[k]} {float(widths[k]):.4g}" for k in range(3) if bool(pbc_b[k]))
    return (f"{label}: cutoff {cutoff:g} Å is larger than half the perpendicular width of the "
            f"periodic box (widths {listed} Å); minimum image needs widths >= {2 * cutoff:g} Å "
            f"(use a larger box or a smaller cutoff)")


# --------------------------------------------------------------------------------------------
# the Triton backend's host-checked geometry: built once per cell tensor, checked, cached
# --------------------------------------------------------------------------------------------
class KernelGeometry:
    """The Triton kernels' view of a (cell, pbc) pair: ``geo`` rows on the device, the kernel
    flags (periodic, triclinic, has_open) and host copies of the widths and pbc flags for the
    width check (:func:`check_widths`)."""

    __slots__ = ("geo", "rows", "periodic", "triclinic", "has_open", "widths", "pbc", "accepted")

    def __init__(self, geo, rows, periodic, triclinic, has_open, widths, pbc):
        self.accepted = set()  # (cutoff, structures) that passed check_widths
        self.geo, self.rows, self.periodic = geo, rows, periodic
        self.triclinic, self.has_open, self.widths, self.pbc = triclinic, has_open, widths, pbc


_GEOMETRY_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_GEOMETRY_CACHE_SIZE = 32


def build_geometry(cell, pbc, device, dtype) -> KernelGeometry:
    """Validate shapes, build the geometry on the device (:func:`cell_geometry`), read it back
    once for the checks and the kernel flags; problems raise one-line NeighborListErrors."""
    cell_t = None if cell is None else torch.as_tensor(cell).detach()
    pbc_t = None if pbc is None else torch.as_tensor(pbc).detach().bool()
    if cell_t is not None:
        if cell_t.dim() == 2:
            cell_t = cell_t.unsqueeze(0)
        if cell_t.dim() != 3 or tuple(cell_t.shape[1:]) != (3, 3):
            raise NeighborListError(f"cell must have shape [3, 3] or [B, 3, 3] (rows are lattice vectors, Å), got {list(cell.shape)}")
    if pbc_t is not None:
        if pbc_t.dim() == 1:
            pbc_t = pbc_t.unsqueeze(0)
        if pbc_t.dim() != 2 or pbc_t.shape[1] != 3:
            raise NeighborListError(f"pbc must have shape [3] or [B, 3], got {list(pbc.shape)}")
        if bool(pbc_t.any()) and cell_t is None:
            raise NeighborListError("periodic boundary conditions were given without a cell")
    if pbc_t is None or not bool(pbc_t.any()):
        return open_geometry()
    rows = max(cell_t.shape[0], pbc_t.shape[0])
    if cell_t.shape[0] not in (1, rows) or pbc_t.shape[0] not in (1, rows):
        raise NeighborListError(f"cell {list(cell.shape)} and pbc {list(pbc.shape)} disagree on the number of structures")
    geometry = cell_geometry(cell_t.to(device), pbc_t.to(device), torch.float64)
    geo, problem = geometry.geo.cpu().numpy(), geometry.problem.cpu().numpy()
    bad = np.nonzero(problem)[0]
    if bad.size:
        b = int(bad[0])
        raise NeighborListError(describe_problem(b * 4 + int(problem[b]), cell_t.expand(rows, 3, 3),
                                                 pbc_t.expand(rows, 3), 0.0))
    h, inverse = geo[:, 0:9].reshape(rows, 3, 3), geo[:, 9:18].reshape(rows, 3, 3)
    off = ~np.eye(3, dtype=bool)
    triclinic = bool(np.any(h[:, off] != 0) or np.any(inverse[:, off] != 0))
    pbcs = geo[:, 18:21] != 0
    widths = geometry.widths.cpu().numpy()
    return KernelGeometry(geometry.geo.to(dtype), rows, True, triclinic, bool((~pbcs).any()), widths, pbcs)


def open_geometry() -> KernelGeometry:
    return KernelGeometry(None, 1, False, False, True, np.full((1, 3), np.inf), np.zeros((1, 3), bool))


def cached_geometry(cell, pbc, device, dtype) -> KernelGeometry:
    """Geometry for (cell, pbc), cached by tensor identity and in-place version counter."""
    if pbc is None or cell is None:
        if pbc is not None:  # pbc without a cell: fine if nothing is periodic
            return build_geometry(None, torch.as_tensor(pbc), device, dtype)
        return open_geometry()
    cell = torch.as_tensor(cell)
    pbc = torch.as_tensor(pbc)
    key = (id(cell), cell._version, id(pbc), pbc._version, str(device), dtype)
    hit = _GEOMETRY_CACHE.get(key)
    if hit is not None:
        cell_ref, pbc_ref, geometry = hit
        if cell_ref() is cell and pbc_ref() is pbc:
            _GEOMETRY_CACHE.move_to_end(key)
            return geometry
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise NeighborListError(
            "neighbor list: a new cell/pbc tensor inside CUDA-graph capture; call neighbor_list once "
            "with these tensors before capturing (the cell is validated on the host)"
        )
    geometry = build_geometry(cell, pbc, device, dtype)
    _GEOMETRY_CACHE[key] = (weakref.ref(cell), weakref.ref(pbc), geometry)
    while len(_GEOMETRY_CACHE) > _GEOMETRY_CACHE_SIZE:
        _GEOMETRY_CACHE.popitem(last=False)
    return geometry


def check_widths(geometry: KernelGeometry, cutoff: float, structures: Optional[int]) -> None:
    """Refuse cutoffs above half a periodic perpendicular width (as the reference does)."""
    if not geometry.periodic or (cutoff, structures) in geometry.accepted:
        return
    rows = geometry.widths.shape[0]
    limit = rows if structures is None or rows == 1 else min(rows, structures)
    too_small = (geometry.widths[:limit] < 2.0 * cutoff * (1.0 - 1e-12)).any(1)
    if too_small.any():
        b = int(np.nonzero(too_small)[0][0])
        w, per = geometry.widths[b], geometry.pbc[b]
        names = "abc"
        listed = ", ".join(f"{names[k]} {w[k]:.4g}" for k in range(3) if per[k])
        raise NeighborListError(
            f"structure {b}: cutoff {cutoff:g} Å is larger than half the perpendicular width of the "
            f"periodic box (widths {listed} Å); minimum image needs widths >= {2 * cutoff:g} Å "
            f"(use a larger box or a smaller cutoff)"
        )
    if len(geometry.accepted) < 64:
        geometry.accepted.add((cutoff, structures))
