"""Atom locality: an order of the atoms along a space-filling curve, and measures of locality.

Why
---
The fused message kernels (:mod:`torchmdx.kernels.message_triton`) walk the edges of each
receiver i and gather k_j, v_j, vec_j of its neighbours j (7 F floats per neighbour: 3.5 KiB at
F = 128). In a PDB-ordered protein in water, a water molecule's neighbours are scattered over the
whole index range, so every gather touches a row that no nearby program has loaded. Sorting the
atoms along a 3-D space-filling curve puts atoms that are close in space close in index: the
receivers that run at the same time share most of their neighbours, which then come from L2
(or L1) instead of HBM, and the neighbour list's edges of a block of receivers span a narrow
band of senders.

The order changes only where atoms are stored, never a result: energies are sums over atoms
and the forces are mapped back to the input order (:class:`AtomOrder`), so any permutation
gives the same numbers up to floating-point summation order.

Curve codes
-----------
Coordinates are scaled into the unit cube of each structure (its bounding box, the same scale
on the three axes so that the grid cells are cubes), quantised to ``bits`` bits per axis
(cells 0 .. 2^bits - 1), and each cell gets a code in [0, 2^(3 bits)):

- Morton (Z-order): the bits of x, y and z interleaved, x most significant in each triple.
  Cheap, but the curve jumps between distant cells at every power-of-two boundary.
- Hilbert: Skilling's transform ("Programming the Hilbert curve", AIP Conf. Proc. 707, 381
  (2004)): for each bit level Q from the top, an inverse "undo excess work" step swaps or
  inverts lower bits of the axes (x_0 ^= Q-1 if x_i has bit Q, else the lower bits of x_0 and
  x_i are exchanged), then a Gray code across axes; the transposed result, interleaved like a
  Morton code, is the Hilbert index. Consecutive codes are face-adjacent cells (the curve
  never jumps), which is what the tests check.

Both are vectorised over atoms (a Python loop over the ``bits`` levels only), run on the
positions' device and read nothing back to the host, so they can sit inside a CUDA graph.
Periodic structures: positions are first wrapped into the cell (fractional coordinates into
[0, 1) along periodic directions), so an atom and its periodic image get the same code.

The order is then ``argsort`` of the codes (stable), followed by a stable sort by structure,
so that the atoms of each structure stay together and in the batch's order (the PyG layout).

When the input is already local
-------------------------------
A protein in PDB order is already local: residues are compact and consecutive, and 32
consecutive atoms (two or three residues) form a tighter group than 32 consecutive atoms of
the Hilbert curve (measured on dhfr and factor IX: block spread 3.8 Å input vs 4.5-4.9 Å
Hilbert, and 13 vs 18-19 sender blocks per receiver block). ``auto`` therefore keeps the
input order unless the curve makes the atoms' blocks clearly tighter: :func:`block_spread`
(mean RMS distance of the atoms of each block of 32 consecutive atoms to their centroid) of
the curve order below :data:`AUTO_MARGIN` times the input's. The choice is made on the
device (``torch.where`` between the two permutations), so it reads nothing back either; on
the sample systems it ranks the orders as the neighbour-list measures do.
"""

from __future__ import annotations

from typing import Optional

import torch

#: allowed values of ``Potential.atom_order`` and ``md.atom_order``
ATOM_ORDERS = ("auto", "input", "hilbert", "morton")
#: ``auto`` considers sorting a structure of at least this many atoms (docs/kernels_message.md,
#: "Locality": below it the gathered features of the whole structure, 7 F floats = 3.5 KiB an
#: atom at F = 128, take < 17 MiB, a third of an H100/H200's 50 MiB L2, and stay cached in any
#: order; to be confirmed by bench/bench_locality.py on a GPU)
LOCALITY_MIN_ATOMS = 5000
#: the curve ``auto`` uses
AUTO_CURVE = "hilbert"
#: ``auto`` takes the curve only if its :func:`block_spread` is below this fraction of the input's
AUTO_MARGIN = 0.9
#: atoms per block of :func:`block_spread` (and of the measures below)
BLOCK = 32
#: most bits per axis: 3 * 21 = 63 bits fit a signed 64-bit code
MAX_BITS = 21


def check_atom_order(value, error=None, name: str = "atom_order") -> str:
    """``value`` if it is one of :data:`ATOM_ORDERS`, else a one-line ``error`` (default
    :class:`torchmdx.errors.ModelError`) naming ``name`` and the allowed values."""
    if isinstance(value, str) and value in ATOM_ORDERS:
        return value
    if error is None:
        from torchmdx.errors import ModelError as error
    raise error(f"{name} must be one of {', '.join(repr(a) for a in ATOM_ORDERS)}, got {value!r}")


# ---------------------------------------------------------------------------- codes on the grid
def _spread3(x: torch.Tensor) -> torch.Tensor:
    """Bits b of ``x`` (int64, < 2^21) moved to bit 3 b (two zero bits after each)."""
    x = x & 0x1FFFFF
    x = (x | (x << 32)) & 0x1F00000000FFFF
    x = (x | (x << 16)) & 0x1F0000FF0000FF
    x = (x | (x << 8)) & 0x100F00F00F00F00F
    x = (x | (x << 4)) & 0x10C30C30C30C30C3
    x = (x | (x << 2)) & 0x1249249249249249
    return x


def _interleave(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Bits interleaved as ... x_b y_b z_b x_{b-1} y_{b-1} z_{b-1} ... (x most significant)."""
    return (_spread3(x) << 2) | (_spread3(y) << 1) | _spread3(z)


def morton_code(cells: torch.Tensor, bits: int) -> torch.Tensor:
    """Morton (Z-order) codes [N] int64 of integer grid cells [N, 3] in [0, 2^bits)."""
    _check_bits(bits)
    cells = cells.long()
    return _interleave(cells[:, 0], cells[:, 1], cells[:, 2])


def hilbert_code(cells: torch.Tensor, bits: int) -> torch.Tensor:
    """Hilbert codes [N] int64 of integer grid cells [N, 3] in [0, 2^bits) (Skilling 2004,
    ``AxestoTranspose``, then the transposed index interleaved; see the module docstring)."""
    _check_bits(bits)
    x = [cells[:, 0].long(), cells[:, 1].long(), cells[:, 2].long()]
    m = 1 << (bits - 1)
    # inverse undo excess work
    q = m
    while q > 1:
        p = q - 1
        for i in range(3):
            has = (x[i] & q) != 0
            if i == 0:
                x[0] = torch.where(has, x[0] ^ p, x[0])
                continue
            t = (x[0] ^ x[i]) & p
            x[0] = torch.where(has, x[0] ^ p, x[0] ^ t)
            x[i] = torch.where(has, x[i], x[i] ^ t)
        q >>= 1
    # Gray encode
    x[1] = x[1] ^ x[0]
    x[2] = x[2] ^ x[1]
    t = torch.zeros_like(x[2])
    q = m
    while q > 1:
        t = torch.where((x[2] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    return _interleave(x[0] ^ t, x[1] ^ t, x[2] ^ t)


def _check_bits(bits: int) -> None:
    if not 1 <= int(bits) <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")


# ---------------------------------------------------------------------------- positions -> cells
def _wrapped(pos: torch.Tensor, batch: torch.Tensor, cell, pbc) -> torch.Tensor:
    """Positions with periodic directions wrapped into the cell (fractional coordinates in
    [0, 1)), back in Cartesian coordinates; a structure whose cell has no volume is left as is."""
    cell = torch.as_tensor(cell, dtype=pos.dtype, device=pos.device)
    if cell.dim() == 2:
        cell = cell.unsqueeze(0)
    n_struct = cell.shape[0]
    if pbc is None:
        pbc = torch.ones(n_struct, 3, dtype=torch.bool, device=pos.device)
    pbc = torch.as_tensor(pbc, dtype=torch.bool, device=pos.device)
    if pbc.dim() == 1:
        pbc = pbc.unsqueeze(0)
    pbc = pbc.expand(n_struct, 3)
    cell = cell.expand(n_struct, 3, 3)
    # fractional coordinates through the reciprocal vectors (rows of inv(cell)^T = b_k = a_l x a_m / V):
    # elementwise, so nothing reads back to the host (torch.linalg.solve checks its pivots on the host,
    # which a CUDA graph capture refuses)
    a1, a2, a3 = cell.unbind(1)
    cross = torch.stack((torch.linalg.cross(a2, a3), torch.linalg.cross(a3, a1), torch.linalg.cross(a1, a2)), 1)
    volume = (a1 * cross[:, 0]).sum(-1)
    usable = (volume.abs() > 1e-12) & pbc.any(-1)
    pbc = pbc & usable.unsqueeze(-1)
    eye = torch.eye(3, dtype=pos.dtype, device=pos.device).expand_as(cell)
    cell = torch.where(usable.view(-1, 1, 1), cell, eye)
    reciprocal = torch.where(usable.view(-1, 1, 1), cross / torch.where(usable, volume, 1.0).view(-1, 1, 1), eye)
    index = batch if n_struct > 1 else torch.zeros_like(batch)
    cell_a = cell.index_select(0, index)
    frac = torch.einsum("nl,nkl->nk", pos, reciprocal.index_select(0, index))
    frac = torch.where(pbc.index_select(0, index), frac - torch.floor(frac), frac)
    return torch.einsum("nk,nkl->nl", frac, cell_a)


def grid_cells(pos: torch.Tensor, batch: Optional[torch.Tensor] = None, cell=None, pbc=None, bits: int = 10,
               num_structures: Optional[int] = None) -> torch.Tensor:
    """Integer cells [N, 3] in [0, 2^bits) of the atoms: positions (wrapped if periodic) scaled
    into the bounding cube of their structure (one scale for the three axes)."""
    _check_bits(bits)
    pos = pos.detach()
    n = pos.shape[0]
    if batch is None:
        batch = torch.zeros(n, dtype=torch.long, device=pos.device)
    if cell is not None:
        pos = _wrapped(pos, batch, cell, pbc)
    # per-structure bounds; without B known, N rows bound it (no host read)
    rows = int(num_structures) if num_structures is not None else max(n, 1)
    index = batch.unsqueeze(-1).expand(n, 3)
    lo = torch.full((rows, 3), float("inf"), dtype=pos.dtype, device=pos.device)
    hi = torch.full((rows, 3), float("-inf"), dtype=pos.dtype, device=pos.device)
    lo = lo.scatter_reduce(0, index, pos, "amin")
    hi = hi.scatter_reduce(0, index, pos, "amax")
    extent = (hi - lo).amax(-1).clamp(min=1e-12)
    scaled = (pos - lo.index_select(0, batch)) / extent.index_select(0, batch).unsqueeze(-1)
    top = (1 << bits) - 1
    scaled = torch.nan_to_num(scaled, nan=0.0, posinf=1.0, neginf=0.0)
    return (scaled * (1 << bits)).floor().clamp(0, top).long()


def spatial_order(pos: torch.Tensor, batch: Optional[torch.Tensor] = None, cell=None, pbc=None,
                  curve: str = "hilbert", bits: int = 10, num_structures: Optional[int] = None) -> torch.Tensor:
    """perm [N] long: ``pos[perm]`` follows the ``curve`` ("hilbert" or "morton") within each
    structure, and ``batch[perm]`` is sorted (the atoms of a structure stay together, the
    structures in their order). ``cell`` [B, 3, 3] or [3, 3] and ``pbc`` [B, 3] or [3]: periodic
    directions are wrapped first. ``bits`` per axis (1..21; 10 gives 1024 cells an axis, about
    0.1 Å for a 100 Å box). Reads nothing back from the device."""
    if curve not in ("hilbert", "morton"):
        raise ValueError(f"curve must be 'hilbert' or 'morton', got {curve!r}")
    cells = grid_cells(pos, batch, cell, pbc, bits, num_structures)
    code = hilbert_code(cells, bits) if curve == "hilbert" else morton_code(cells, bits)
    perm = torch.argsort(code, stable=True)
    if batch is not None:
        perm = perm.index_select(0, torch.argsort(batch.index_select(0, perm), stable=True))
    return perm


def block_spread(pos: torch.Tensor, perm: Optional[torch.Tensor] = None, block: int = BLOCK, cell=None, pbc=None,
                 batch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over the full blocks of ``block`` consecutive atoms of ``pos[perm]`` of the RMS
    distance of the block's atoms to its centroid (Å, a device scalar; 0 with fewer atoms than
    a block). Periodic positions are wrapped into the cell first (as for the codes)."""
    pos = pos.detach()
    if cell is not None:
        if batch is None:
            batch = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
        pos = _wrapped(pos, batch, cell, pbc)
    if perm is not None:
        pos = pos.index_select(0, perm)
    m = pos.shape[0] // block * block
    if m == 0:
        return torch.zeros((), dtype=pos.dtype, device=pos.device)
    blocks = pos[:m].reshape(-1, block, 3)
    centred = blocks - blocks.mean(1, keepdim=True)
    return (centred * centred).sum(-1).mean(1).sqrt().mean()


def auto_order(pos: torch.Tensor, batch=None, cell=None, pbc=None, num_structures: Optional[int] = None,
               margin: Optional[float] = None) -> torch.Tensor:
    """The :data:`AUTO_CURVE` order if it makes the blocks of consecutive atoms clearly tighter
    than the input order (see "When the input is already local" above), else the identity;
    chosen on the device."""
    margin = AUTO_MARGIN if margin is None else margin
    perm = spatial_order(pos, batch, cell, pbc, curve=AUTO_CURVE, num_structures=num_structures)
    better = block_spread(pos, perm, cell=cell, pbc=pbc, batch=batch) < margin * block_spread(
        pos, None, cell=cell, pbc=pbc, batch=batch)
    return torch.where(better, perm, torch.arange(pos.shape[0], dtype=perm.dtype, device=perm.device))


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inv with inv[perm[k]] = k, so ``x_sorted[inv]`` is back in the input order when
    ``x_sorted = x[perm]``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.shape[0], dtype=perm.dtype, device=perm.device)
    return inv


# ---------------------------------------------------------------------------- the model's hook
class AtomOrder:
    """A permutation of the atoms and the maps to and from it; without one (``perm`` None)
    both maps return their argument (no copy).

    ``sorted(x)`` = x[perm] (input order -> curve order), ``back(y)`` = y[inverse] (curve order
    -> input order)."""

    def __init__(self, perm: Optional[torch.Tensor] = None):
        self.perm = perm
        self._inverse = None

    @property
    def active(self) -> bool:
        return self.perm is not None

    @property
    def inverse(self) -> torch.Tensor:
        if self._inverse is None:
            self._inverse = inverse_permutation(self.perm)
        return self._inverse

    def sorted(self, x):
        return x if self.perm is None or x is None else x.index_select(0, self.perm)

    def back(self, x):
        return x if self.perm is None or x is None else x.index_select(0, self.inverse)

    @classmethod
    def choose(cls, mode: str, pos: torch.Tensor, batch, cell, pbc, num_structures: int,
               neighbors_given: bool) -> "AtomOrder":
        """The order :meth:`torchmdx.nn.base.Potential.forward` uses: none when the caller gives
        the neighbour list (its indices refer to the input order) or ``mode`` is "input";
        "auto": for one structure of at least :data:`LOCALITY_MIN_ATOMS` atoms,
        :func:`auto_order` (the curve unless the input order is as local); "hilbert" / "morton":
        that curve."""
        curve = resolve_curve(mode, int(pos.shape[0]), num_structures, neighbors_given)
        if curve is None:
            return cls()
        if mode == "auto":
            return cls(auto_order(pos, batch, cell, pbc, num_structures))
        return cls(spatial_order(pos, batch, cell, pbc, curve=curve, num_structures=num_structures))


def resolve_curve(mode: str, num_atoms: int, num_structures: int, neighbors_given: bool = False) -> Optional[str]:
    """The curve ``mode`` means for this input, or None (keep the input order)."""
    if neighbors_given or mode == "input":
        return None
    if mode == "auto":
        return AUTO_CURVE if num_structures == 1 and num_atoms >= LOCALITY_MIN_ATOMS else None
    return mode


# ---------------------------------------------------------------------------- measures
def _valid_pairs(edge_index: torch.Tensor, mask: Optional[torch.Tensor]):
    i, j = edge_index[0], edge_index[1]
    if mask is not None:
        i, j = i[mask], j[mask]
    return i, j


def neighbor_bandwidth(edge_index: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """Mean |i - j| over the (valid) edges: how far apart in memory a receiver's neighbours are
    (0 for no edges)."""
    i, j = _valid_pairs(edge_index, mask)
    if i.numel() == 0:
        return 0.0
    return float((i - j).abs().double().mean())


def same_block_fraction(edge_index: torch.Tensor, block: int = BLOCK, mask: Optional[torch.Tensor] = None) -> float:
    """Fraction of the (valid) edges whose neighbour j lies in the receiver i's block of
    ``block`` consecutive atoms (i // block == j // block)."""
    i, j = _valid_pairs(edge_index, mask)
    if i.numel() == 0:
        return 0.0
    return float(((i // block) == (j // block)).double().mean())


def blocks_touched(edge_index: torch.Tensor, block: int = BLOCK, mask: Optional[torch.Tensor] = None) -> float:
    """Mean number of distinct ``block``-atom blocks of senders that the edges of one block of
    ``block`` receivers read (the rows a group of programs running together gathers from)."""
    i, j = _valid_pairs(edge_index, mask)
    if i.numel() == 0:
        return 0.0
    nb = int(torch.maximum(i.max(), j.max())) // block + 1
    pair = torch.unique((i // block) * nb + (j // block))
    receivers = torch.unique(i // block)
    return float(pair.numel() / receivers.numel())
