"""Device helpers shared by the Triton neighbor-list kernels (cell geometry rows, the minimum
image, output limits) and the two passes every method shares: the fill pass that writes the
output rows from packed pairs, and the Verlet-skin displacement check. The conventions and the
host side are in :mod:`torchmdx.kernels.neighbors_triton`; the geometry rows in
:mod:`torchmdx.kernels.cell_geometry`."""

from __future__ import annotations

try:  # triton is a Linux dependency; elsewhere the kernels are not defined
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAVE_TRITON = False


if HAVE_TRITON:

    # ----------------------------------------------------------------------------------------
    # shared device helpers
    # ----------------------------------------------------------------------------------------
    @triton.jit
    def _geometry_row(batch_ptr, idx, mask, geo_rows, zero, HAS_BATCH: tl.constexpr):
        """Geometry row of the structure of atom(s) ``idx``: ``batch[idx]`` clamped to the last
        row (one shared geometry row serves every structure), or ``zero`` without a batch (the
        caller's row 0: a scalar, or zeros shaped like the rows it broadcasts against)."""
        if HAS_BATCH:
            row = tl.minimum(tl.load(batch_ptr + idx, mask=mask, other=0), geo_rows - 1)
        else:
            row = zero
        return row

    @triton.jit
    def _load_3x3(ptr):
        """Nine consecutive values, a 3x3 matrix row by row."""
        m00 = tl.load(ptr + 0)
        m01 = tl.load(ptr + 1)
        m02 = tl.load(ptr + 2)
        m10 = tl.load(ptr + 3)
        m11 = tl.load(ptr + 4)
        m12 = tl.load(ptr + 5)
        m20 = tl.load(ptr + 6)
        m21 = tl.load(ptr + 7)
        m22 = tl.load(ptr + 8)
        return m00, m01, m02, m10, m11, m12, m20, m21, m22

    @triton.jit
    def _load_3(ptr):
        """Three consecutive values."""
        return tl.load(ptr + 0), tl.load(ptr + 1), tl.load(ptr + 2)

    @triton.jit
    def _load_geometry(geo_ptr, row):
        """Cell rows h (open rows zero), inverse of the completed cell k, pbc flags p (binning)."""
        base = geo_ptr + row * 33
        h00, h01, h02, h10, h11, h12, h20, h21, h22 = _load_3x3(base + 0)
        k00, k01, k02, k10, k11, k12, k20, k21, k22 = _load_3x3(base + 9)
        p0, p1, p2 = _load_3(base + 18)
        return h00, h01, h02, h10, h11, h12, h20, h21, h22, k00, k01, k02, k10, k11, k12, k20, k21, k22, p0, p1, p2

    @triton.jit
    def _load_widths(geo_ptr, row):
        """Perpendicular widths of the completed cell (Å, float32: the binning's precision)."""
        w0, w1, w2 = _load_3(geo_ptr + row * 33 + 21)
        return w0.to(tl.float32), w1.to(tl.float32), w2.to(tl.float32)

    @triton.jit
    def _load_periodic(geo_ptr, row):
        """The pbc flags as booleans."""
        base = geo_ptr + row * 33
        return tl.load(base + 18) != 0.0, tl.load(base + 19) != 0.0, tl.load(base + 20) != 0.0

    @triton.jit
    def _load_image_geometry(geo_ptr, row):
        """Cell rows h (open rows zero) and q = inverse of the completed cell with the columns of
        open directions zeroed (so the image shift along an open direction is 0)."""
        base = geo_ptr + row * 33
        h00, h01, h02, h10, h11, h12, h20, h21, h22 = _load_3x3(base + 0)
        q00, q01, q02, q10, q11, q12, q20, q21, q22 = _load_3x3(base + 24)
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
            row = _geometry_row(batch_ptr, i, valid, geo_rows, pid * 0, HAS_BATCH)
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
            row = _geometry_row(batch_ptr, i, im, geo_rows, i * 0, HAS_BATCH)
            (h00, h01, h02, h10, h11, h12, h20, h21, h22,
             q00, q01, q02, q10, q11, q12, q20, q21, q22) = _load_image_geometry(geo_ptr, row)
            dx, dy, dz, n0, n1, n2 = _image(dx, dy, dz, h00, h01, h02, h10, h11, h12, h20, h21, h22,
                                            q00, q01, q02, q10, q11, q12, q20, q21, q22, False)
        d2 = dx * dx + dy * dy + dz * dz
        # NaN displacements count as moved (the caller rebuilds, and the rebuild reports them)
        moved = im & ((d2 > limit2) | (d2 != d2))
        tl.atomic_max(flag_ptr, tl.max(moved.to(tl.int32), axis=0))
