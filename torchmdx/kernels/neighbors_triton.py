"""Triton neighbor lists (backend ``"triton"``): brute force and cell list, batched, periodic.

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
import os
import weakref
from collections import OrderedDict
from typing import Optional

import numpy as np
import torch

from torchmdx.errors import NeighborListError
from torchmdx.kernels.cell_geometry import GEO_WIDTH, cell_geometry, describe_problem, first_bad_structure
from torchmdx.kernels.neighbors import Neighbors

try:  # triton is a Linux dependency; elsewhere this backend reports itself unavailable
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAVE_TRITON = False

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


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def available(device: torch.device | str) -> bool:
    """Whether this backend can run on ``device``: CUDA with triton, or the CPU interpreter."""
    if not HAVE_TRITON:
        return False
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


if HAVE_TRITON:

    # ----------------------------------------------------------------------------------------
    # shared device helpers
    # ----------------------------------------------------------------------------------------
    @triton.jit
    def _load_geometry(geo_ptr, row):
        """Cell rows h (open rows zero), inverse of the completed cell k, pbc flags p (binning)."""
        base = geo_ptr + row * 33
        h00 = tl.load(base + 0)
        h01 = tl.load(base + 1)
        h02 = tl.load(base + 2)
        h10 = tl.load(base + 3)
        h11 = tl.load(base + 4)
        h12 = tl.load(base + 5)
        h20 = tl.load(base + 6)
        h21 = tl.load(base + 7)
        h22 = tl.load(base + 8)
        k00 = tl.load(base + 9)
        k01 = tl.load(base + 10)
        k02 = tl.load(base + 11)
        k10 = tl.load(base + 12)
        k11 = tl.load(base + 13)
        k12 = tl.load(base + 14)
        k20 = tl.load(base + 15)
        k21 = tl.load(base + 16)
        k22 = tl.load(base + 17)
        p0 = tl.load(base + 18)
        p1 = tl.load(base + 19)
        p2 = tl.load(base + 20)
        return h00, h01, h02, h10, h11, h12, h20, h21, h22, k00, k01, k02, k10, k11, k12, k20, k21, k22, p0, p1, p2

    @triton.jit
    def _load_image_geometry(geo_ptr, row):
        """Cell rows h (open rows zero) and q = inverse of the completed cell with the columns of
        open directions zeroed (so the image shift along an open direction is 0)."""
        base = geo_ptr + row * 33
        h00 = tl.load(base + 0)
        h01 = tl.load(base + 1)
        h02 = tl.load(base + 2)
        h10 = tl.load(base + 3)
        h11 = tl.load(base + 4)
        h12 = tl.load(base + 5)
        h20 = tl.load(base + 6)
        h21 = tl.load(base + 7)
        h22 = tl.load(base + 8)
        q00 = tl.load(base + 24)
        q01 = tl.load(base + 25)
        q02 = tl.load(base + 26)
        q10 = tl.load(base + 27)
        q11 = tl.load(base + 28)
        q12 = tl.load(base + 29)
        q20 = tl.load(base + 30)
        q21 = tl.load(base + 31)
        q22 = tl.load(base + 32)
        return h00, h01, h02, h10, h11, h12, h20, h21, h22, q00, q01, q02, q10, q11, q12, q20, q21, q22

    @triton.jit
    def _fractional(x, y, z, k00, k01, k02, k10, k11, k12, k20, k21, k22):
        """s = (x, y, z) @ inv(cell)."""
        s0 = x * k00 + y * k10 + z * k20
        s1 = x * k01 + y * k11 + z * k21
        s2 = x * k02 + y * k12 + z * k22
        return s0, s1, s2

    @triton.jit
    def _image(dx, dy, dz, h00, h01, h02, h10, h11, h12, h20, h21, h22,
               q00, q01, q02, q10, q11, q12, q20, q21, q22, ORTHO: tl.constexpr):
        """Integer shift n = -round(d @ q) and d + n @ h (q: inverse cell, open columns zero).

        ``ORTHO``: every cell is orthorhombic (off-diagonal h and q zero), so the products with
        the off-diagonal terms (exact zeros) are skipped: the same result, 12 fewer FMAs."""
        if ORTHO:
            s0 = dx * q00
            s1 = dy * q11
            s2 = dz * q22
        else:
            s0 = dx * q00 + dy * q10 + dz * q20
            s1 = dx * q01 + dy * q11 + dz * q21
            s2 = dx * q02 + dy * q12 + dz * q22
        # n = -rint(s) via the float "magic number" (2 adds instead of a quarter-rate cvt;
        # exact for |s| < 2^22 in float32, 2^51 in float64); ties (|s| = 1/2) are never within
        # the cutoff, so the rounding direction there does not matter
        if dx.dtype == tl.float64:
            magic = 6755399441055744.0
        else:
            magic = 12582912.0
        n0 = magic - (s0 + magic)
        n1 = magic - (s1 + magic)
        n2 = magic - (s2 + magic)
        if ORTHO:
            vx = dx + n0 * h00
            vy = dy + n1 * h11
            vz = dz + n2 * h22
        else:
            vx = dx + (n0 * h00 + n1 * h10 + n2 * h20)
            vy = dy + (n0 * h01 + n1 * h11 + n2 * h21)
            vz = dz + (n0 * h02 + n1 * h12 + n2 * h22)
        return vx, vy, vz, n0, n1, n2

    @triton.jit
    def _write_limits(offset_ptr, total_index, capacity, packed):
        """(start of edge_index row 1, rows that may be written).

        Fixed capacity: row 1 starts at ``capacity``. Exact lists (``packed``): the buffer is
        [2, total] packed, and nothing is written when the estimate was too small (the host
        then retries with the exact size)."""
        total = tl.load(offset_ptr + total_index)
        cap = total * 0 + capacity
        row1 = tl.where(packed != 0, total, cap)
        limit = tl.where(packed != 0, tl.where(total <= cap, total, total * 0), cap)
        return row1, limit

    # ----------------------------------------------------------------------------------------
    # brute force
    # ----------------------------------------------------------------------------------------
    @triton.jit(do_not_specialize=["geo_rows", "capacity", "n_atoms", "n_chunks", "chunk", "half", "packed"])
    def _brute_kernel(pos_ptr, start_ptr, end_ptr, batch_ptr, geo_ptr, geo_rows, params_ptr,
                      count_ptr, offset_ptr, status_ptr, pair_ptr, capacity,
                      n_atoms, n_chunks, chunk, half, packed,
                      HAS_BATCH: tl.constexpr, PERIODIC: tl.constexpr, ORTHO: tl.constexpr,
                      WRITE: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
        """Program (i block, j chunk): pairs of BLOCK_I receivers with the chunk's atoms.

        Count pass: counts[1 + i * n_chunks + chunk]; write pass: packed pairs (i << 32 | j)
        from the exclusive scan offsets[i * n_chunks + chunk], so rows are sorted by i, then j
        (:func:`_fill_kernel` expands them). Batched structures use one chunk spanning the
        structures of the block's receivers (contiguous, batch sorted).
        """
        pid = tl.program_id(0)
        cid = tl.program_id(1)
        i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
        im = i < n_atoms
        xi = tl.load(pos_ptr + i * 3 + 0, mask=im, other=0.0)
        yi = tl.load(pos_ptr + i * 3 + 1, mask=im, other=0.0)
        zi = tl.load(pos_ptr + i * 3 + 2, mask=im, other=0.0)
        cut2 = tl.load(params_ptr + 0)
        low2 = tl.load(params_ptr + 1)
        if HAS_BATCH:
            lo_i = tl.load(start_ptr + i, mask=im, other=n_atoms)
            hi_i = tl.load(end_ptr + i, mask=im, other=0)
            j_lo = tl.min(lo_i, axis=0)
            j_hi = tl.max(hi_i, axis=0)
        else:
            j_lo = cid * chunk
            j_hi = tl.minimum(j_lo + chunk, n_atoms)
        j_lo = tl.where(half != 0, tl.maximum(j_lo, pid * BLOCK_I + 1), j_lo)
        if PERIODIC:
            if HAS_BATCH:
                row = tl.minimum(tl.load(batch_ptr + i, mask=im, other=0), geo_rows - 1)
            else:
                row = i * 0
            (h00, h01, h02, h10, h11, h12, h20, h21, h22,
             q00, q01, q02, q10, q11, q12, q20, q21, q22) = _load_image_geometry(geo_ptr, row)
        cnt = tl.zeros([BLOCK_I], dtype=tl.int32)
        if WRITE:
            row1, limit = _write_limits(offset_ptr, n_atoms * n_chunks, capacity, packed)
            base = tl.load(offset_ptr + i * n_chunks + cid, mask=im, other=0)
            pk_i = i.to(tl.int64) << 32
        for j0 in range(j_lo, j_hi, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            jm = j < j_hi
            xj = tl.load(pos_ptr + j * 3 + 0, mask=jm, other=0.0)
            yj = tl.load(pos_ptr + j * 3 + 1, mask=jm, other=0.0)
            zj = tl.load(pos_ptr + j * 3 + 2, mask=jm, other=0.0)
            dx = xj[None, :] - xi[:, None]
            dy = yj[None, :] - yi[:, None]
            dz = zj[None, :] - zi[:, None]
            if PERIODIC:
                vx, vy, vz, n0, n1, n2 = _image(
                    dx, dy, dz, h00[:, None], h01[:, None], h02[:, None], h10[:, None], h11[:, None],
                    h12[:, None], h20[:, None], h21[:, None], h22[:, None], q00[:, None], q01[:, None],
                    q02[:, None], q10[:, None], q11[:, None], q12[:, None], q20[:, None], q21[:, None],
                    q22[:, None], ORTHO)
            else:
                vx = dx
                vy = dy
                vz = dz
            d2 = vx * vx + vy * vy + vz * vz
            ok = (d2 < cut2) & (d2 >= low2) & jm[None, :] & im[:, None] & (j[None, :] != i[:, None])
            ok = ok & ((j[None, :] > i[:, None]) | (i * 0 + half == 0)[:, None])
            if HAS_BATCH:
                ok = ok & (j[None, :] >= lo_i[:, None]) & (j[None, :] < hi_i[:, None])
            oki = ok.to(tl.int32)
            if WRITE:
                rank = tl.cumsum(oki, axis=1) - 1
                slot = base[:, None] + (cnt[:, None] + rank).to(tl.int64)
                pk = pk_i[:, None] | j.to(tl.int64)[None, :]
                tl.store(pair_ptr + row1 + slot, pk, mask=ok & (slot < limit))
            cnt += tl.sum(oki, axis=1)
        if not WRITE:
            tl.store(count_ptr + 1 + i * n_chunks + cid, cnt.to(tl.int64), mask=im)
            if pid + cid == 0:
                tl.store(count_ptr, pid.to(tl.int64) * 0)
            if cid == 0:
                bad = im & ((xi - xi != 0.0) | (yi - yi != 0.0) | (zi - zi != 0.0))
                tl.atomic_max(status_ptr, tl.max(bad.to(tl.int32), axis=0))

    # ----------------------------------------------------------------------------------------
    # cell list: extents, binning (counting sort), pairs
    # ----------------------------------------------------------------------------------------
    @triton.jit(do_not_specialize=["geo_rows", "n_atoms"])
    def _extent_kernel(pos_ptr, start_ptr, batch_ptr, geo_ptr, geo_rows, ext_ptr, n_atoms,
                       HAS_BATCH: tl.constexpr, PERIODIC: tl.constexpr, BLOCK: tl.constexpr):
        """ext[slot] = (-min s, max s) per direction (float32), s = pos @ inv(completed cell)."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        im = i < n_atoms
        x = tl.load(pos_ptr + i * 3 + 0, mask=im, other=0.0)
        y = tl.load(pos_ptr + i * 3 + 1, mask=im, other=0.0)
        z = tl.load(pos_ptr + i * 3 + 2, mask=im, other=0.0)
        if PERIODIC:
            if HAS_BATCH:
                row = tl.minimum(tl.load(batch_ptr + i, mask=im, other=0), geo_rows - 1)
            else:
                row = i * 0
            (h00, h01, h02, h10, h11, h12, h20, h21, h22,
             k00, k01, k02, k10, k11, k12, k20, k21, k22, p0, p1, p2) = _load_geometry(geo_ptr, row)
            s0, s1, s2 = _fractional(x, y, z, k00, k01, k02, k10, k11, k12, k20, k21, k22)
        else:
            s0 = x
            s1 = y
            s2 = z
        s0 = s0.to(tl.float32)
        s1 = s1.to(tl.float32)
        s2 = s2.to(tl.float32)
        if HAS_BATCH:
            slot = tl.load(start_ptr + i, mask=im, other=0)
            tl.atomic_max(ext_ptr + slot * 6 + 0, -s0, mask=im)
            tl.atomic_max(ext_ptr + slot * 6 + 1, -s1, mask=im)
            tl.atomic_max(ext_ptr + slot * 6 + 2, -s2, mask=im)
            tl.atomic_max(ext_ptr + slot * 6 + 3, s0, mask=im)
            tl.atomic_max(ext_ptr + slot * 6 + 4, s1, mask=im)
            tl.atomic_max(ext_ptr + slot * 6 + 5, s2, mask=im)
        else:
            neg = float("-inf")
            tl.atomic_max(ext_ptr + 0, tl.max(tl.where(im, -s0, neg), axis=0))
            tl.atomic_max(ext_ptr + 1, tl.max(tl.where(im, -s1, neg), axis=0))
            tl.atomic_max(ext_ptr + 2, tl.max(tl.where(im, -s2, neg), axis=0))
            tl.atomic_max(ext_ptr + 3, tl.max(tl.where(im, s0, neg), axis=0))
            tl.atomic_max(ext_ptr + 4, tl.max(tl.where(im, s1, neg), axis=0))
            tl.atomic_max(ext_ptr + 5, tl.max(tl.where(im, s2, neg), axis=0))

    @triton.jit
    def _grid_dims(L0, L1, L2, budget, rc):
        """Cells per direction for lengths L (Å; periodic: perpendicular width, open: extent).

        Cells are at least ``rc`` thick, at most ``budget`` cells in all; thin directions get
        one cell and the budget is spread over the others.
        """
        q0 = tl.maximum(L0, rc)
        q1 = tl.maximum(L1, rc)
        q2 = tl.maximum(L2, rc)
        m = budget.to(tl.float32)
        c1 = tl.maximum(rc, tl.exp(tl.log(q0 * q1 * q2 / m) / 3.0))
        t0 = L0 >= c1
        t1 = L1 >= c1
        t2 = L2 >= c1
        k = t0.to(tl.float32) + t1.to(tl.float32) + t2.to(tl.float32)
        prod = tl.where(t0, q0, 1.0) * tl.where(t1, q1, 1.0) * tl.where(t2, q2, 1.0)
        c2 = tl.where(k > 0.0, tl.maximum(rc, tl.exp(tl.log(prod / m) / tl.maximum(k, 1.0))), c1)
        c2 = tl.maximum(c2, c1)
        K0 = tl.maximum(tl.floor(L0 / c2), 1.0).to(tl.int32)
        K1 = tl.maximum(tl.floor(L1 / c2), 1.0).to(tl.int32)
        K2 = tl.maximum(tl.floor(L2 / c2), 1.0).to(tl.int32)
        K0 = tl.maximum(tl.minimum(K0, budget), 1)
        K1 = tl.maximum(tl.minimum(K1, budget // K0), 1)
        K2 = tl.maximum(tl.minimum(K2, budget // (K0 * K1)), 1)
        return K0, K1, K2

    @triton.jit
    def _cell_index(s, lo, length, K, periodic):
        """Cell of fractional (periodic) or Cartesian-complement (open) coordinate s, clamped."""
        Kf = K.to(tl.float32)
        u = s - tl.floor(s)
        c_per = tl.floor(u * Kf)
        c_open = tl.where(length > 0.0, tl.floor((s - lo) / tl.maximum(length, 1e-30) * Kf), 0.0)
        c = tl.where(periodic, c_per, c_open)
        c = tl.minimum(tl.maximum(c, 0.0), Kf - 1.0)
        return c.to(tl.int32)

    @triton.jit(do_not_specialize=["geo_rows", "rc", "n_atoms"])
    def _bin_kernel(pos_ptr, start_ptr, end_ptr, batch_ptr, geo_ptr, geo_rows, ext_ptr,
                    key_ptr, grid_ptr, cell_count_ptr, status_ptr, rc, n_atoms,
                    HAS_BATCH: tl.constexpr, PERIODIC: tl.constexpr, HAS_OPEN: tl.constexpr,
                    BLOCK: tl.constexpr):
        """Cell key (structure slot + linear cell) of every atom, atoms per cell (atomic count,
        the first half of a counting sort), cells per direction per slot."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        im = i < n_atoms
        x = tl.load(pos_ptr + i * 3 + 0, mask=im, other=0.0)
        y = tl.load(pos_ptr + i * 3 + 1, mask=im, other=0.0)
        z = tl.load(pos_ptr + i * 3 + 2, mask=im, other=0.0)
        if HAS_BATCH:
            slot = tl.load(start_ptr + i, mask=im, other=0)
            budget = (tl.load(end_ptr + i, mask=im, other=1) - slot).to(tl.int32)
        else:
            slot = (i * 0).to(tl.int64)
            budget = i * 0 + n_atoms
        budget = tl.maximum(budget, 1)
        if PERIODIC:
            if HAS_BATCH:
                row = tl.minimum(tl.load(batch_ptr + i, mask=im, other=0), geo_rows - 1)
            else:
                row = i * 0
            (h00, h01, h02, h10, h11, h12, h20, h21, h22,
             k00, k01, k02, k10, k11, k12, k20, k21, k22, p0, p1, p2) = _load_geometry(geo_ptr, row)
            w0 = tl.load(geo_ptr + row * 33 + 21).to(tl.float32)
            w1 = tl.load(geo_ptr + row * 33 + 22).to(tl.float32)
            w2 = tl.load(geo_ptr + row * 33 + 23).to(tl.float32)
            s0, s1, s2 = _fractional(x, y, z, k00, k01, k02, k10, k11, k12, k20, k21, k22)
            per0 = p0 != 0.0
            per1 = p1 != 0.0
            per2 = p2 != 0.0
        else:
            s0 = x
            s1 = y
            s2 = z
            w0 = x.to(tl.float32) * 0.0
            w1 = w0
            w2 = w0
            per0 = im & False
            per1 = per0
            per2 = per0
        s0 = s0.to(tl.float32)
        s1 = s1.to(tl.float32)
        s2 = s2.to(tl.float32)
        if HAS_OPEN:
            lo0 = -tl.load(ext_ptr + slot * 6 + 0, mask=im, other=0.0)
            lo1 = -tl.load(ext_ptr + slot * 6 + 1, mask=im, other=0.0)
            lo2 = -tl.load(ext_ptr + slot * 6 + 2, mask=im, other=0.0)
            e0 = tl.load(ext_ptr + slot * 6 + 3, mask=im, other=0.0) - lo0
            e1 = tl.load(ext_ptr + slot * 6 + 4, mask=im, other=0.0) - lo1
            e2 = tl.load(ext_ptr + slot * 6 + 5, mask=im, other=0.0) - lo2
        else:
            lo0 = w0 * 0.0
            lo1 = lo0
            lo2 = lo0
            e0 = lo0
            e1 = lo0
            e2 = lo0
        L0 = tl.where(per0, w0, e0)
        L1 = tl.where(per1, w1, e1)
        L2 = tl.where(per2, w2, e2)
        K0, K1, K2 = _grid_dims(L0, L1, L2, budget, rc)
        c0 = _cell_index(s0, lo0, e0, K0, per0)
        c1 = _cell_index(s1, lo1, e1, K1, per1)
        c2 = _cell_index(s2, lo2, e2, K2, per2)
        key = slot.to(tl.int32) + c0 + K0 * (c1 + K1 * c2)
        tl.store(key_ptr + i, key, mask=im)
        tl.atomic_add(cell_count_ptr + key, 1, mask=im)
        tl.store(grid_ptr + slot * 3 + 0, K0, mask=im)
        tl.store(grid_ptr + slot * 3 + 1, K1, mask=im)
        tl.store(grid_ptr + slot * 3 + 2, K2, mask=im)
        bad = im & ((x - x != 0.0) | (y - y != 0.0) | (z - z != 0.0))
        tl.atomic_max(status_ptr, tl.max(bad.to(tl.int32), axis=0))

    @triton.jit(do_not_specialize=["n_atoms"])
    def _scatter_kernel(pos_ptr, key_ptr, cell_count_ptr, cell_end_ptr, upos_ptr, uperm_ptr, n_atoms,
                        BLOCK: tl.constexpr):
        """Counting sort, second half: atom i goes to a free place of its cell,
        cell_end[key] - (atoms of the cell not yet placed). The order within a cell depends on
        the atomics; the count pass puts each cell back in atom order (deterministic)."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        im = i < n_atoms
        key = tl.load(key_ptr + i, mask=im, other=0)
        left = tl.atomic_add(cell_count_ptr + key, -1, mask=im)
        slot = tl.load(cell_end_ptr + key, mask=im, other=0) - left
        tl.store(upos_ptr + slot * 3 + 0, tl.load(pos_ptr + i * 3 + 0, mask=im, other=0.0), mask=im)
        tl.store(upos_ptr + slot * 3 + 1, tl.load(pos_ptr + i * 3 + 1, mask=im, other=0.0), mask=im)
        tl.store(upos_ptr + slot * 3 + 2, tl.load(pos_ptr + i * 3 + 2, mask=im, other=0.0), mask=im)
        tl.store(uperm_ptr + slot, i, mask=im)

    @triton.jit(do_not_specialize=["geo_rows", "capacity", "n_atoms", "n_programs", "half", "packed"])
    def _cell_pairs_kernel(cpos_ptr, cperm_ptr, opos_ptr, operm_ptr, cell_start_ptr, cells_ptr, start_ptr,
                           batch_ptr, geo_ptr, geo_rows, params_ptr, count_ptr, offset_ptr, pair_ptr,
                           capacity, n_atoms, n_programs, half, packed,
                           HAS_BATCH: tl.constexpr, PERIODIC: tl.constexpr, ORTHO: tl.constexpr,
                           WRITE: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                           BLOCK_O: tl.constexpr, PARTS: tl.constexpr):
        """Persistent programs over cells; atoms of a cell are contiguous in cell order (cpos,
        cperm). The atoms of one cell are the receivers (tiles of BLOCK_I, one lane each); the
        candidates are the 9 neighbouring rows of cells along x, each a contiguous run (plus
        one wrapped cell at a periodic boundary), walked in tiles of BLOCK_J. A tile is
        [candidate, receiver]: every lane keeps its receiver and steps through candidates in
        registers (no cross-lane work in the count pass).

        ``PARTS`` (1, 3 or 9): a work item is (cell, part), each part taking 9 / PARTS of the
        neighbour rows, so small systems get more programs; receiver i has one count per part.
        Count pass (``WRITE`` False): counts[1 + i * PARTS + part], and each cell's atoms are
        written back in atom order to (opos, operm) (the counting sort leaves them in atomic
        order). Write pass: packed pairs of *sorted* indices (i_sorted << 32 | j_sorted) from
        offsets[i * PARTS + part] in candidate order (deterministic); the fill maps them back to
        atom indices, reading the sorted positions in a few contiguous runs per receiver.
        """
        pid = tl.program_id(0)
        if HAS_BATCH:
            n_keys = n_atoms
        else:
            n_keys = tl.load(cells_ptr + 0) * tl.load(cells_ptr + 1) * tl.load(cells_ptr + 2)
        cut2 = tl.load(params_ptr + 0)
        low2 = tl.load(params_ptr + 1)
        lane_i = tl.arange(0, BLOCK_I)
        lane_j = tl.arange(0, BLOCK_J)
        runs = tl.arange(0, 32)  # 9 rows x (main run, wrapped cell); 18 used
        row_y = (runs // 2) % 3 - 1
        row_z = (runs // 2) // 3 - 1
        main = (runs % 2) == 0
        if WRITE:
            row1, limit = _write_limits(offset_ptr, n_atoms * PARTS, capacity, packed)
        else:
            lane_o = tl.arange(0, BLOCK_O)
            if pid == 0:
                tl.store(count_ptr, pid.to(tl.int64) * 0)
        for item in range(pid, n_keys * PARTS, n_programs):
            c = item // PARTS
            part = item % PARTS
            i_begin = tl.load(cell_start_ptr + c)
            i_end = tl.load(cell_start_ptr + c + 1)
            if i_end > i_begin:
                first = tl.load(cperm_ptr + i_begin)
                if HAS_BATCH:
                    slot = tl.load(start_ptr + first).to(tl.int32)
                else:
                    slot = c * 0
                K0 = tl.load(cells_ptr + slot * 3 + 0)
                K1 = tl.load(cells_ptr + slot * 3 + 1)
                K2 = tl.load(cells_ptr + slot * 3 + 2)
                lin = c - slot
                cx = lin % K0
                cy = (lin // K0) % K1
                cz = lin // (K0 * K1)
                if PERIODIC:
                    if HAS_BATCH:
                        row = tl.minimum(tl.load(batch_ptr + first), geo_rows - 1)
                    else:
                        row = c * 0
                    (h00, h01, h02, h10, h11, h12, h20, h21, h22,
                     q00, q01, q02, q10, q11, q12, q20, q21, q22) = _load_image_geometry(geo_ptr, row)
                    per0 = tl.load(geo_ptr + row * 33 + 18) != 0.0
                    per1 = tl.load(geo_ptr + row * 33 + 19) != 0.0
                    per2 = tl.load(geo_ptr + row * 33 + 20) != 0.0
                else:
                    per0 = c < 0
                    per1 = per0
                    per2 = per0
                # the runs: rows (y + oy, z + oz), x from xlo to xhi (+ the wrapped cell xw)
                xlo = tl.maximum(cx - 1, 0)
                xhi = tl.minimum(cx + 1, K0 - 1)
                has_wrap = per0 & (K0 >= 3) & ((cx == 0) | (cx == K0 - 1))
                xw = tl.where(cx == 0, K0 - 1, 0)
                ny = cy + row_y
                nz = cz + row_z
                y_ok = tl.where(per1, (row_y == 0) | ((row_y == 1) & (K1 >= 2)) | ((row_y == -1) & (K1 >= 3)),
                                (ny >= 0) & (ny < K1))
                z_ok = tl.where(per2, (row_z == 0) | ((row_z == 1) & (K2 >= 2)) | ((row_z == -1) & (K2 >= 3)),
                                (nz >= 0) & (nz < K2))
                ny = tl.where(ny < 0, ny + K1, tl.where(ny >= K1, ny - K1, ny))
                nz = tl.where(nz < 0, nz + K2, tl.where(nz >= K2, nz - K2, nz))
                # (integer products: the interpreter does not keep every mixed mask boolean)
                use = ((runs < 18).to(tl.int32) * y_ok.to(tl.int32) * z_ok.to(tl.int32)
                       * (main.to(tl.int32) + has_wrap.to(tl.int32))) > 0
                rowkey = slot + K0 * (ny + K1 * nz)
                js = tl.load(cell_start_ptr + rowkey + tl.where(main, xlo, xw), mask=use, other=0)
                je = tl.load(cell_start_ptr + rowkey + tl.where(main, xhi, xw) + 1, mask=use, other=0)
                if (not WRITE) and (part == 0):
                    # this cell's atoms back in atom order (rank = atoms of the cell with a
                    # smaller index), for the write pass
                    for a0 in range(i_begin, i_end, BLOCK_O):
                        a = a0 + lane_o
                        am = a < i_end
                        pa = tl.load(cperm_ptr + a, mask=am, other=0)
                        rank = tl.zeros([BLOCK_O], dtype=tl.int32)
                        for b0 in range(i_begin, i_end, BLOCK_O):
                            b = b0 + lane_o
                            pb = tl.load(cperm_ptr + b, mask=b < i_end, other=2147483647)
                            rank += tl.sum((pb[None, :] < pa[:, None]).to(tl.int32), axis=1)
                        dst = i_begin + rank
                        tl.store(operm_ptr + dst, pa, mask=am)
                        tl.store(opos_ptr + dst * 3 + 0, tl.load(cpos_ptr + a * 3 + 0, mask=am, other=0.0), mask=am)
                        tl.store(opos_ptr + dst * 3 + 1, tl.load(cpos_ptr + a * 3 + 1, mask=am, other=0.0), mask=am)
                        tl.store(opos_ptr + dst * 3 + 2, tl.load(cpos_ptr + a * 3 + 2, mask=am, other=0.0), mask=am)
                for i0 in range(i_begin, i_end, BLOCK_I):
                    ii = i0 + lane_i
                    im = ii < i_end
                    xi = tl.load(cpos_ptr + ii * 3 + 0, mask=im, other=0.0)
                    yi = tl.load(cpos_ptr + ii * 3 + 1, mask=im, other=0.0)
                    zi = tl.load(cpos_ptr + ii * 3 + 2, mask=im, other=0.0)
                    oi = tl.load(cperm_ptr + ii, mask=im, other=0)
                    # a candidate j is kept only if perm[j] > lower: -1 (full list, every j >= 0),
                    # i (half list) or INT_MAX (padding lanes); padding candidates have perm -2
                    lower = tl.where(im, tl.where(half != 0, oi, -1), 2147483647)
                    if WRITE:
                        # receiver i's rows start at offsets[i]; int32 from there on (a receiver
                        # has far fewer than 2^31 rows): room = rows it may still write
                        base = tl.load(offset_ptr + oi * PARTS + part, mask=im, other=0)
                        rows_i = pair_ptr + row1 + base
                        room = tl.minimum(tl.maximum(limit - base, 0), 2147483647).to(tl.int32)
                        cnt = tl.zeros([BLOCK_I], dtype=tl.int32)
                        pk_i = ii.to(tl.int64) << 32
                    else:
                        acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.int32)
                    for r in range(part * (18 // PARTS), (part + 1) * (18 // PARTS)):
                        q_lo = tl.sum(tl.where(runs == r, js, 0), axis=0)
                        q_hi = tl.sum(tl.where(runs == r, je, 0), axis=0)
                        for q0 in range(q_lo, q_hi, BLOCK_J):
                            q = q0 + lane_j
                            jm = q < q_hi
                            xj = tl.load(cpos_ptr + q * 3 + 0, mask=jm, other=0.0)
                            yj = tl.load(cpos_ptr + q * 3 + 1, mask=jm, other=0.0)
                            zj = tl.load(cpos_ptr + q * 3 + 2, mask=jm, other=0.0)
                            oj = tl.load(cperm_ptr + q, mask=jm, other=-2)
                            dx = xj[None, :] - xi[:, None]
                            dy = yj[None, :] - yi[:, None]
                            dz = zj[None, :] - zi[:, None]
                            if PERIODIC:
                                vx, vy, vz, n0, n1, n2 = _image(
                                    dx, dy, dz, h00, h01, h02, h10, h11, h12, h20, h21, h22,
                                    q00, q01, q02, q10, q11, q12, q20, q21, q22, ORTHO)
                            else:
                                vx = dx
                                vy = dy
                                vz = dz
                            d2 = vx * vx + vy * vy + vz * vz
                            ok = ((d2 < cut2) & (d2 >= low2) & (oj[None, :] > lower[:, None])
                                  & (q[None, :] != ii[:, None]))
                            if WRITE:
                                # rank within the tile by a scan over candidates (in registers:
                                # the tile is transposed so that receivers are on the lanes,
                                # which is also the layout Triton gives the store)
                                okt = tl.trans(ok)
                                seen = tl.cumsum(okt.to(tl.int32), axis=0) + cnt[None, :]
                                pk = pk_i[None, :] | q.to(tl.int64)[:, None]
                                wm = okt & (seen <= room[None, :])
                                tl.store(tl.trans(rows_i[None, :] + (seen - 1)), tl.trans(pk), mask=tl.trans(wm))
                                cnt = tl.max(seen, axis=0)
                            else:
                                acc += ok.to(tl.int32)
                    if not WRITE:
                        tl.store(count_ptr + 1 + oi * PARTS + part, tl.sum(acc, axis=1).to(tl.int64), mask=im)

    # ----------------------------------------------------------------------------------------
    # output rows from packed pairs
    # ----------------------------------------------------------------------------------------
    @triton.jit(do_not_specialize=["geo_rows", "capacity", "total_index", "fill", "packed"])
    def _fill_kernel(pos_ptr, perm_ptr, batch_ptr, geo_ptr, geo_rows, offset_ptr, ei_ptr, shift_ptr, vec_ptr,
                     dist_ptr, mask_ptr, overflow_ptr, capacity, total_index, fill, packed,
                     HAS_BATCH: tl.constexpr, PERIODIC: tl.constexpr, ORTHO: tl.constexpr,
                     SORTED: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
        """Row r < number of pairs: unpack (i, j) (stored by the write pass in edge_index row 1),
        write edge_index, the image shift n = -round((pos_j - pos_i) @ inv(cell)), the vector
        pos_j - pos_i + n @ cell (Å) and its length, all coalesced. ``SORTED`` (cell list): the
        packed indices are positions in cell order (pos_ptr: sorted positions, perm_ptr: their
        atom indices), so the neighbours of one receiver are read from a few contiguous runs.
        Fixed capacity (``HAS_MASK``): rows beyond are padding (i = j = N - 1, zeros, mask
        False) and program 0 sets ``overflow`` (pairs > capacity)."""
        pid = tl.program_id(0)
        r = pid * BLOCK + tl.arange(0, BLOCK)
        row1, limit = _write_limits(offset_ptr, total_index, capacity, packed)
        total = tl.load(offset_ptr + total_index)
        n_valid = tl.minimum(total, limit)
        valid = r < n_valid
        if HAS_MASK:
            rm = r < capacity
        else:
            rm = valid
        pk = tl.load(ei_ptr + row1 + r, mask=valid, other=0)
        i = pk >> 32
        j = pk & 4294967295
        xi = tl.load(pos_ptr + i * 3 + 0, mask=valid, other=0.0)
        yi = tl.load(pos_ptr + i * 3 + 1, mask=valid, other=0.0)
        zi = tl.load(pos_ptr + i * 3 + 2, mask=valid, other=0.0)
        dx = tl.load(pos_ptr + j * 3 + 0, mask=valid, other=0.0) - xi
        dy = tl.load(pos_ptr + j * 3 + 1, mask=valid, other=0.0) - yi
        dz = tl.load(pos_ptr + j * 3 + 2, mask=valid, other=0.0) - zi
        if SORTED:
            i = tl.load(perm_ptr + i, mask=valid, other=0).to(tl.int64)
            j = tl.load(perm_ptr + j, mask=valid, other=0).to(tl.int64)
        if PERIODIC:
            if HAS_BATCH:
                row = tl.minimum(tl.load(batch_ptr + i, mask=valid, other=0), geo_rows - 1)
            else:
                row = pid * 0
            (h00, h01, h02, h10, h11, h12, h20, h21, h22,
             q00, q01, q02, q10, q11, q12, q20, q21, q22) = _load_image_geometry(geo_ptr, row)
            vx, vy, vz, n0, n1, n2 = _image(dx, dy, dz, h00, h01, h02, h10, h11, h12, h20, h21, h22,
                                            q00, q01, q02, q10, q11, q12, q20, q21, q22, ORTHO)
        else:
            vx = dx
            vy = dy
            vz = dz
            n0 = dx * 0.0
            n1 = n0
            n2 = n0
        dist = tl.sqrt(vx * vx + vy * vy + vz * vz)
        fills = (r * 0 + fill).to(tl.int64)
        tl.store(ei_ptr + r, tl.where(valid, i, fills), mask=rm)
        tl.store(ei_ptr + row1 + r, tl.where(valid, j, fills), mask=rm)
        tl.store(shift_ptr + r * 3 + 0, n0, mask=rm)
        tl.store(shift_ptr + r * 3 + 1, n1, mask=rm)
        tl.store(shift_ptr + r * 3 + 2, n2, mask=rm)
        tl.store(vec_ptr + r * 3 + 0, vx, mask=rm)
        tl.store(vec_ptr + r * 3 + 1, vy, mask=rm)
        tl.store(vec_ptr + r * 3 + 2, vz, mask=rm)
        tl.store(dist_ptr + r, dist, mask=rm)
        if HAS_MASK:
            tl.store(mask_ptr + r, valid.to(tl.int8), mask=rm)
            if pid == 0:
                tl.store(overflow_ptr, (total > capacity).to(tl.int8))

    @triton.jit(do_not_specialize=["geo_rows", "limit2", "n_atoms"])
    def _displacement_kernel(pos_ptr, ref_ptr, batch_ptr, geo_ptr, geo_rows, flag_ptr, limit2, n_atoms,
                             HAS_BATCH: tl.constexpr, PERIODIC: tl.constexpr, BLOCK: tl.constexpr):
        """flag = 1 if some atom moved (minimum image) by more than sqrt(limit2) Å."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        im = i < n_atoms
        dx = tl.load(pos_ptr + i * 3 + 0, mask=im, other=0.0) - tl.load(ref_ptr + i * 3 + 0, mask=im, other=0.0)
        dy = tl.load(pos_ptr + i * 3 + 1, mask=im, other=0.0) - tl.load(ref_ptr + i * 3 + 1, mask=im, other=0.0)
        dz = tl.load(pos_ptr + i * 3 + 2, mask=im, other=0.0) - tl.load(ref_ptr + i * 3 + 2, mask=im, other=0.0)
        if PERIODIC:
            if HAS_BATCH:
                row = tl.minimum(tl.load(batch_ptr + i, mask=im, other=0), geo_rows - 1)
            else:
                row = i * 0
            (h00, h01, h02, h10, h11, h12, h20, h21, h22,
             q00, q01, q02, q10, q11, q12, q20, q21, q22) = _load_image_geometry(geo_ptr, row)
            dx, dy, dz, n0, n1, n2 = _image(dx, dy, dz, h00, h01, h02, h10, h11, h12, h20, h21, h22,
                                            q00, q01, q02, q10, q11, q12, q20, q21, q22, False)
        d2 = dx * dx + dy * dy + dz * dz
        # NaN displacements count as moved (the caller rebuilds, and the rebuild reports them)
        moved = im & ((d2 > limit2) | (d2 != d2))
        tl.atomic_max(flag_ptr, tl.max(moved.to(tl.int32), axis=0))

# --------------------------------------------------------------------------------------------
# host side: geometry cache
# --------------------------------------------------------------------------------------------
class _Geometry:
    """Per-structure cell data on the device plus host copies for validation."""

    __slots__ = ("geo", "rows", "periodic", "triclinic", "has_open", "widths", "pbc", "accepted")

    def __init__(self, geo, rows, periodic, triclinic, has_open, widths, pbc):
        self.accepted = set()  # (cutoff, structures) that passed _check_widths
        self.geo, self.rows, self.periodic = geo, rows, periodic
        self.triclinic, self.has_open, self.widths, self.pbc = triclinic, has_open, widths, pbc


_GEOMETRY_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_GEOMETRY_CACHE_SIZE = 32


def _build_geometry(cell, pbc, device, dtype) -> _Geometry:
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
        return _open_geometry()
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
    return _Geometry(geometry.geo.to(dtype), rows, True, triclinic, bool((~pbcs).any()), widths, pbcs)


def _open_geometry() -> _Geometry:
    return _Geometry(None, 1, False, False, True, np.full((1, 3), np.inf), np.zeros((1, 3), bool))


def _geometry(cell, pbc, device, dtype) -> _Geometry:
    """Geometry for (cell, pbc), cached by tensor identity and in-place version counter."""
    if pbc is None or cell is None:
        if pbc is not None:  # pbc without a cell: fine if nothing is periodic
            return _build_geometry(None, torch.as_tensor(pbc), device, dtype)
        return _open_geometry()
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
    geometry = _build_geometry(cell, pbc, device, dtype)
    _GEOMETRY_CACHE[key] = (weakref.ref(cell), weakref.ref(pbc), geometry)
    while len(_GEOMETRY_CACHE) > _GEOMETRY_CACHE_SIZE:
        _GEOMETRY_CACHE.popitem(last=False)
    return geometry


def _check_widths(geometry: _Geometry, cutoff: float, structures: Optional[int]) -> None:
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


_PARAM_CACHE: dict = {}


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
# launching: Triton's generic dispatch (argument binding, specialization keys) costs tens of
# microseconds per launch; once a kernel is compiled for a given argument signature we call the
# compiled kernel directly. Any failure switches this off for good (plain launches then).
# --------------------------------------------------------------------------------------------
_COMPILED: dict = {}
_FAST_OK = [True]
_STREAM = []  # (get_current_device, get_current_stream, knobs) of the active Triton driver


def _signature_key(args):
    """What Triton specializes a compiled kernel on: dtype and 16-byte alignment of tensors,
    the width of ints (every int argument is in ``do_not_specialize``)."""
    return tuple([(a.dtype, not a.data_ptr() & 15) if isinstance(a, torch.Tensor)
                  else (-2147483648 <= a < 2147483648) if type(a) is int else type(a) for a in args])


def _launch(kernel, grid, args, num_warps, **constexprs):
    """kernel[grid](*args, **constexprs), then direct calls of the compiled kernel's launcher
    for the same argument signature (Triton's generic dispatch costs tens of microseconds)."""
    fast = CONFIG.get("fast_launch", True) and _FAST_OK[0] and not interpreting()
    if fast:
        key = (kernel, len(grid), num_warps, tuple(constexprs.items()), _signature_key(args))
        hit = _COMPILED.get(key)
        if hit is not None:
            compiled, values = hit
            try:
                g = tuple(grid) + (1,) * (3 - len(grid))
                device, stream, knobs = _STREAM[0]
                enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
                if enter is None and leave is None:
                    compiled.run(g[0], g[1], g[2], stream(device()), compiled.function, compiled.packed_metadata,
                                 None, None, None, *args, *values)
                else:
                    compiled[g](*args, *values)
                return
            except Exception:  # noqa: BLE001 - a Triton version with another launcher: dispatch normally
                _FAST_OK[0] = False
    compiled = kernel[grid](*args, num_warps=num_warps, **constexprs)
    if fast and compiled is not None and hasattr(compiled, "packed_metadata"):
        try:
            if not _STREAM:
                from triton import knobs
                from triton.runtime.driver import driver

                _STREAM.append((driver.active.get_current_device, driver.active.get_current_stream, knobs))
            names = [p.name for p in kernel.params if p.is_constexpr]
            compiled.run  # noqa: B018 - loads the binary now (raises here, not at the next call)
            if len(_COMPILED) > 512:
                _COMPILED.clear()
            _COMPILED[key] = (compiled, tuple(constexprs[n] for n in names))
        except Exception:  # noqa: BLE001
            _FAST_OK[0] = False


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
        geometry = _Geometry(found.geo, found.geo.shape[0], True, True, True, None, None)
    else:
        geometry = _geometry(cell, pbc, device, dtype)

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
        _check_widths(geometry, cutoff, structures)

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
    geometry = _geometry(cell, pbc, device, dtype)
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
