"""Triton brute-force neighbor-list kernel (``method="brute"``): a 2-D grid of programs, a
block of receivers by a chunk of candidate neighbors; a batch of structures uses one chunk
spanning the structures of the block's receivers. See :mod:`torchmdx.kernels.neighbors_triton`."""

from __future__ import annotations

from torchmdx.kernels.neighbors_triton_common import HAVE_TRITON, tl, triton  # noqa: F401 - tl: the kernels


if HAVE_TRITON:
    from torchmdx.kernels.neighbors_triton_common import (  # noqa: F401 - read by the jit kernels
        _geometry_row, _image, _load_image_geometry, _write_limits,
    )

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
            row = _geometry_row(batch_ptr, i, im, geo_rows, i * 0, HAS_BATCH)
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
