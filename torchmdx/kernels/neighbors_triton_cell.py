"""Triton cell-list neighbor-list kernels (``method="cell"``): per-structure extents, binning
in fractional coordinates with a counting sort, and the persistent pair kernel over (cell, part)
work items. See :mod:`torchmdx.kernels.neighbors_triton` for the method."""

from __future__ import annotations

from torchmdx.kernels.neighbors_triton_common import HAVE_TRITON, tl, triton  # noqa: F401 - tl: the kernels


if HAVE_TRITON:
    from torchmdx.kernels.neighbors_triton_common import (  # noqa: F401 - read by the jit kernels
        _fractional, _geometry_row, _image, _load_geometry, _load_image_geometry, _load_periodic, _load_widths,
        _write_limits,
    )

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
            row = _geometry_row(batch_ptr, i, im, geo_rows, i * 0, HAS_BATCH)
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
            row = _geometry_row(batch_ptr, i, im, geo_rows, i * 0, HAS_BATCH)
            (h00, h01, h02, h10, h11, h12, h20, h21, h22,
             k00, k01, k02, k10, k11, k12, k20, k21, k22, p0, p1, p2) = _load_geometry(geo_ptr, row)
            w0, w1, w2 = _load_widths(geo_ptr, row)
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
                    # (the mask is true here: the cell has atoms)
                    row = _geometry_row(batch_ptr, first, i_end > i_begin, geo_rows, c * 0, HAS_BATCH)
                    (h00, h01, h02, h10, h11, h12, h20, h21, h22,
                     q00, q01, q02, q10, q11, q12, q20, q21, q22) = _load_image_geometry(geo_ptr, row)
                    per0, per1, per2 = _load_periodic(geo_ptr, row)
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
