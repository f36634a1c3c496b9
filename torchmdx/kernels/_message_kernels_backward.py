"""Triton kernels of the first backward of the fused ET message step: the receiver side
(``_message_bwd_receiver_kernel``: one program per receiver; dL/dq, the per-edge gradients, and
for symmetric lists the merged sender side) and the sender side
(``_message_bwd_sender_kernel``: one program per sender, edges through a sender-sorted
permutation). Notation and the forward in :mod:`torchmdx.kernels._message_kernels`, device
helpers in :mod:`torchmdx.kernels._message_kernels_common`; launched by
:mod:`torchmdx.kernels.message_triton`."""

import triton
import triton.language as tl

from torchmdx.kernels._message_kernels_common import (  # noqa: F401 - read by the jit kernels
    _act,
    _filter,
    _given_filter,
    _matmul,
    _message_prologue,
    _sender_share,
    _table_filter,
    _table_position,
)


@triton.jit
def _message_bwd_receiver_kernel(
    rowptr_ptr, rowend_ptr, senders_ptr, q_ptr, k_ptr, v_ptr, vec_ptr,
    dk_ptr, dv_ptr, rbf_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr,
    phi_ptr, unit_ptr, mask_ptr, dk0_ptr, dv0_ptr, phi0_ptr,
    gm_ptr, gu_ptr,
    gq_ptr, gedge_ptr, gdk_ptr, gdv_ptr, gzk_ptr, gzv_ptr, gdk0_ptr, gdv0_ptr,
    gk_ptr, gv_ptr, gvec_ptr,
    num_edges, num_atoms,
    H: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
    HB: tl.constexpr, DP: tl.constexpr, KP: tl.constexpr, BE: tl.constexpr,
    DK_MODE: tl.constexpr, DV_MODE: tl.constexpr, HAS_MASK: tl.constexpr,
    SELF_LOOP: tl.constexpr, SELF_DK: tl.constexpr, SELF_DV: tl.constexpr,
    VCUT: tl.constexpr, ATT: tl.constexpr, FACT: tl.constexpr, PREC: tl.constexpr,
    DKS: tl.constexpr, DVS: tl.constexpr,
    WRITE_GZ: tl.constexpr, SELF_FILTER_GRAD: tl.constexpr, MERGED: tl.constexpr,
    TG: tl.constexpr = 1, TR0: tl.constexpr = 0.0, TIH: tl.constexpr = 1.0, TPK: tl.constexpr = False,
):
    """Receiver-side gradients of one (receiver i, channel chunk cb): dL/dq_i of the chunk
    (segment sum), the given dk / dv's gradients, pre-activation filter gradients (for the
    weights, only when asked), and this chunk's share of the per-edge gradients, written to
    ``gedge[cb, e, :] = (dL/drbf_e [K, only with in-kernel filters] or dL/dr_e [1, only with
    tables], dL/dphi_e, dL/dd_e [3])``;
    the caller sums over chunks.

    ``MERGED`` (symmetric edge lists only): also the sender-side gradients of atom i, dL/dk_i,
    dL/dv_i, dL/dvec_i, which ``_message_bwd_sender_kernel`` would give. In a symmetric list
    every edge (i <- j) has a reverse edge (j <- i) with the same filters, cutoff and mask and
    the opposite unit vector, so the edges i sends on are the reverses of those it receives:
    while walking its own segment the program adds edge (j <- i)'s share from the filter tiles
    it already holds and the gathered q_j, dL/dm_j, dL/du_j. No sender-sorted permutation, no
    second pass over the filters. With u_e' = -u_e of the reverse edge e' and w_e as above:
        a'    = act_a(sum_h q_j k_i dk_e),  A' = a' phi_e valid_e (standard) or a' valid_e
        dL/dk_i  += g' q_j dk_e,  g' = dact(a') (phi_e) valid_e sum_h dL/dm_j v1_i dv1_e w_e
        dL/dv1_i += A' dL/dm_j dv1_e w_e
        dL/dv2_i += (dL/du_j . vec_i) dv2_e w_e
        dL/dv3_i += -(dL/du_j . u_e) dv3_e w_e
        dL/dvec_ix += v2_i dL/du_jx dv2_e w_e   (v2_i factored out of the sum)"""
    F: tl.constexpr = H * D
    USES_RBF: tl.constexpr = DK_MODE == 2 or DV_MODE == 2
    USES_R: tl.constexpr = DK_MODE == 4 or DV_MODE == 4  # tables: one column dL/dr first
    W: tl.constexpr = K + 4 if USES_RBF else (5 if USES_R else 4)  # row width of gedge
    KO: tl.constexpr = K if USES_RBF else (1 if USES_R else 0)  # column of dL/dphi in gedge
    cb = tl.program_id(1)
    kk = tl.arange(0, KP)
    eb = tl.arange(0, BE)
    cval, ch, vch, wk_t, bk, wv1_t, wv2_t, wv3_t, bv1, bv2, bv3 = _message_prologue(
        cb, wk_ptr, bk_ptr, wv_ptr, bv_ptr, H, D, K, HB, DP, KP, DK_MODE, DV_MODE)
    gedge = gedge_ptr + cb.to(tl.int64) * num_edges * W
    for atom in range(tl.program_id(0), num_atoms, tl.num_programs(0)):
        i = tl.cast(atom, tl.int64)
        start = tl.load(rowptr_ptr + i)
        end = tl.load(rowend_ptr + i)
        q_i = tl.load(q_ptr + i * F + ch, mask=cval, other=0.0)
        gm_i = tl.load(gm_ptr + i * F + ch, mask=cval, other=0.0)
        gx = tl.load(gu_ptr + i * (3 * F) + ch, mask=cval, other=0.0)
        gy = tl.load(gu_ptr + i * (3 * F) + F + ch, mask=cval, other=0.0)
        gz = tl.load(gu_ptr + i * (3 * F) + 2 * F + ch, mask=cval, other=0.0)
        acc_q = tl.zeros((HB, DP), dtype=q_i.dtype)
        if SELF_LOOP or MERGED:
            k_i = tl.load(k_ptr + i * F + ch, mask=cval, other=0.0)
            v1_i = tl.load(v_ptr + i * (3 * F) + vch, mask=cval, other=0.0)
            v2_i = tl.load(v_ptr + i * (3 * F) + vch + D, mask=cval, other=0.0)
        if MERGED:  # atom i as a sender (see the docstring)
            vx_i = tl.load(vec_ptr + i * (3 * F) + ch, mask=cval, other=0.0)
            vy_i = tl.load(vec_ptr + i * (3 * F) + F + ch, mask=cval, other=0.0)
            vz_i = tl.load(vec_ptr + i * (3 * F) + 2 * F + ch, mask=cval, other=0.0)
            acc_k = tl.zeros((HB, DP), dtype=q_i.dtype)
            acc_v1 = tl.zeros((HB, DP), dtype=q_i.dtype)
            acc_v2 = tl.zeros((HB, DP), dtype=q_i.dtype)
            acc_v3 = tl.zeros((HB, DP), dtype=q_i.dtype)
            acc_x = tl.zeros((HB, DP), dtype=q_i.dtype)  # sum dL/du_jx dv2 w: times v2_i at the end
            acc_y = tl.zeros((HB, DP), dtype=q_i.dtype)
            acc_z = tl.zeros((HB, DP), dtype=q_i.dtype)

        if SELF_LOOP:
            phi0 = tl.load(phi0_ptr)
            dk0 = tl.where(cval, 1.0, 0.0).to(q_i.dtype)
            dv01 = dk0
            dv02 = dk0
            if SELF_DK:
                dk0 = tl.load(dk0_ptr + ch, mask=cval, other=0.0)
            if SELF_DV:
                dv01 = tl.load(dv0_ptr + vch, mask=cval, other=0.0)
                dv02 = tl.load(dv0_ptr + vch + D, mask=cval, other=0.0)
            a0, da0 = _act(tl.sum(q_i * k_i * dk0, axis=1), ATT)
            if VCUT:
                g0 = 1.0
                f0 = phi0
            else:
                g0 = phi0
                f0 = 1.0
            ga0 = tl.sum(gm_i * v1_i * dv01 * f0, axis=1)  # dL/dA0 [HB]
            gp0 = ga0 * g0 * da0
            acc_q += gp0[:, None] * k_i * dk0
            if MERGED:  # the self edge's sender side: the same atom on both ends
                acc_k += gp0[:, None] * q_i * dk0
                acc_v1 += (a0 * g0)[:, None] * gm_i * dv01 * f0
                acc_v2 += (gx * vx_i + gy * vy_i + gz * vz_i) * dv02 * f0
                acc_x += gx * dv02 * f0
                acc_y += gy * dv02 * f0
                acc_z += gz * dv02 * f0
            if SELF_FILTER_GRAD:
                if SELF_DK:
                    tl.store(gdk0_ptr + i * F + ch, gp0[:, None] * q_i * k_i, mask=cval)
                if SELF_DV:
                    vec_x = tl.load(vec_ptr + i * (3 * F) + ch, mask=cval, other=0.0)
                    vec_y = tl.load(vec_ptr + i * (3 * F) + F + ch, mask=cval, other=0.0)
                    vec_z = tl.load(vec_ptr + i * (3 * F) + 2 * F + ch, mask=cval, other=0.0)
                    gs2_0 = gx * vec_x + gy * vec_y + gz * vec_z
                    tl.store(gdv0_ptr + i * (3 * F) + vch, (a0 * g0)[:, None] * gm_i * v1_i * f0, mask=cval)
                    tl.store(gdv0_ptr + i * (3 * F) + vch + D, gs2_0 * v2_i * f0, mask=cval)
                    tl.store(gdv0_ptr + i * (3 * F) + vch + 2 * D, tl.zeros((HB, DP), dtype=q_i.dtype), mask=cval)

        for e0 in range(start, end, BE):
            eo = e0 + eb
            em = eo < end
            j = tl.load(senders_ptr + eo, mask=em, other=0).to(tl.int64)
            valid = em
            if HAS_MASK:
                valid = valid & (tl.load(mask_ptr + eo, mask=em, other=0) != 0)
            phi = tl.load(phi_ptr + eo, mask=em, other=0.0)
            ux = tl.load(unit_ptr + eo * 3, mask=em, other=0.0)
            uy = tl.load(unit_ptr + eo * 3 + 1, mask=em, other=0.0)
            uz = tl.load(unit_ptr + eo * 3 + 2, mask=em, other=0.0)
            if VCUT:
                w_e = tl.where(valid, phi, 0.0)
            else:
                w_e = tl.where(valid, 1.0, 0.0).to(phi.dtype)
            w3 = w_e[:, None, None]
            m3 = em[:, None, None] & cval[None, :, :]
            j3 = j[:, None, None]
            e3 = eo[:, None, None]
            if USES_RBF:
                r = tl.load(rbf_ptr + eo[:, None] * K + kk[None, :], mask=em[:, None] & (kk < K)[None, :], other=0.0)
            if USES_R:
                g3, t3 = _table_position(rbf_ptr, eo, em, TG, TR0, TIH)
            kj = tl.load(k_ptr + j3 * F + ch[None, :, :], mask=m3, other=0.0)
            qk = q_i[None, :, :] * kj
            if DK_MODE == 1 or DK_MODE == 3:
                dk, ddk = _given_filter(dk_ptr + e3 * DKS + ch[None, :, :], m3, DK_MODE, FACT)
                a, da = _act(tl.sum(qk * dk, axis=2), ATT)
            elif DK_MODE == 2:
                dk, ddk = _filter(r, wk_t, bk, DK_MODE, FACT, BE, HB, DP, PREC)
                a, da = _act(tl.sum(qk * dk, axis=2), ATT)
            elif DK_MODE == 4:  # ddk: d dk / dr
                dk, ddk = _table_filter(wk_ptr, g3, t3, ch[None, :, :], m3, F, TIH, TG, TPK)
                a, da = _act(tl.sum(qk * dk, axis=2), ATT)
            else:
                a, da = _act(tl.sum(qk, axis=2), ATT)
            if VCUT:
                attn = tl.where(valid[:, None], a, 0.0)
            else:
                attn = tl.where(valid[:, None], a * phi[:, None], 0.0)
            vbase = v_ptr + j3 * (3 * F) + vch[None, :, :]
            v1 = tl.load(vbase, mask=m3, other=0.0)
            v2 = tl.load(vbase + D, mask=m3, other=0.0)
            v3 = tl.load(vbase + 2 * D, mask=m3, other=0.0)
            if DV_MODE == 1 or DV_MODE == 3:
                dvbase = dv_ptr + e3 * DVS + vch[None, :, :]
                dv1, ddv1 = _given_filter(dvbase, m3, DV_MODE, FACT)
                dv2, ddv2 = _given_filter(dvbase + D, m3, DV_MODE, FACT)
                dv3, ddv3 = _given_filter(dvbase + 2 * D, m3, DV_MODE, FACT)
            elif DV_MODE == 2:
                dv1, ddv1 = _filter(r, wv1_t, bv1, DV_MODE, FACT, BE, HB, DP, PREC)
                dv2, ddv2 = _filter(r, wv2_t, bv2, DV_MODE, FACT, BE, HB, DP, PREC)
                dv3, ddv3 = _filter(r, wv3_t, bv3, DV_MODE, FACT, BE, HB, DP, PREC)
            elif DV_MODE == 4:  # ddv: d dv / dr
                dv1, ddv1 = _table_filter(wv_ptr, g3, t3, vch[None, :, :], m3, 3 * F, TIH, TG, TPK)
                dv2, ddv2 = _table_filter(wv_ptr, g3, t3, vch[None, :, :] + D, m3, 3 * F, TIH, TG, TPK)
                dv3, ddv3 = _table_filter(wv_ptr, g3, t3, vch[None, :, :] + 2 * D, m3, 3 * F, TIH, TG, TPK)
            else:
                dv1 = tl.where(m3, 1.0, 0.0).to(v1.dtype)
                dv2 = dv1
                dv3 = dv1
            t1 = v1 * dv1  # value times filter, before the validity / cutoff factor w_e
            t2 = v2 * dv2
            t3 = v3 * dv3
            s3 = t3 * w3
            # attention chain
            g_attn = tl.sum(gm_i[None, :, :] * t1 * w3, axis=2)  # dL/dA [BE, HB]
            if VCUT:
                gp = tl.where(valid[:, None], g_attn * da, 0.0)
            else:
                gp = tl.where(valid[:, None], g_attn * phi[:, None] * da, 0.0)
            if DK_MODE != 0:
                acc_q += tl.sum(gp[:, :, None] * kj * dk, axis=0)
            else:
                acc_q += tl.sum(gp[:, :, None] * kj, axis=0)
            if MERGED:  # the reverse edge (j <- i), unit vector -d: atom i as its sender
                gubase = gu_ptr + j3 * (3 * F) + ch[None, :, :]
                if DK_MODE != 0:
                    dk_r = dk
                else:
                    dk_r = qk
                sk, sv1, sv2, sv3, sx, sy, sz = _sender_share(
                    tl.load(q_ptr + j3 * F + ch[None, :, :], mask=m3, other=0.0),
                    tl.load(gm_ptr + j3 * F + ch[None, :, :], mask=m3, other=0.0),
                    tl.load(gubase, mask=m3, other=0.0), tl.load(gubase + F, mask=m3, other=0.0),
                    tl.load(gubase + 2 * F, mask=m3, other=0.0), dk_r, dv1 * w3, dv2 * w3, dv3 * w3,
                    -ux[:, None, None], -uy[:, None, None], -uz[:, None, None], valid, phi,
                    k_i, v1_i, vx_i, vy_i, vz_i, DK_MODE, ATT, VCUT)
                acc_k += sk
                acc_v1 += sv1
                acc_v2 += sv2
                acc_v3 += sv3
                acc_x += sx
                acc_y += sy
                acc_z += sz
            # value side: dL/ds (before w_e)
            vecbase = vec_ptr + j3 * (3 * F) + ch[None, :, :]
            gs1 = attn[:, :, None] * gm_i[None, :, :]
            gs2 = (gx[None, :, :] * tl.load(vecbase, mask=m3, other=0.0)
                   + gy[None, :, :] * tl.load(vecbase + F, mask=m3, other=0.0)
                   + gz[None, :, :] * tl.load(vecbase + 2 * F, mask=m3, other=0.0))
            gs3 = gx[None, :, :] * ux[:, None, None] + gy[None, :, :] * uy[:, None, None] + gz[None, :, :] * uz[:, None, None]
            g_ux = tl.sum(tl.sum(gx[None, :, :] * s3, axis=2), axis=1)
            g_uy = tl.sum(tl.sum(gy[None, :, :] * s3, axis=2), axis=1)
            g_uz = tl.sum(tl.sum(gz[None, :, :] * s3, axis=2), axis=1)
            if VCUT:
                gw = gs1 * t1 + gs2 * t2 + gs3 * t3
                g_phi = tl.sum(tl.sum(tl.where(valid[:, None, None], gw, 0.0), axis=2), axis=1)
            else:
                g_phi = tl.sum(tl.where(valid[:, None], g_attn * a, 0.0), axis=1)
            # filters
            if USES_RBF:
                grbf = tl.zeros((BE, KP), dtype=phi.dtype)
            if USES_R:  # dL/dr_e through the tables: sum over channels of dL/dfilter * dfilter/dr
                g_r = tl.zeros((BE,), dtype=phi.dtype)
            if DK_MODE == 1:
                tl.store(gdk_ptr + e3 * DKS + ch[None, :, :], gp[:, :, None] * qk, mask=m3)
            elif DK_MODE == 3:  # pre-activation gradient, written over the pre-activation filter
                tl.store(gdk_ptr + e3 * DKS + ch[None, :, :], gp[:, :, None] * qk * ddk, mask=m3)
            elif DK_MODE == 2:
                gzk = gp[:, :, None] * qk * ddk
                grbf += _matmul(tl.reshape(gzk, (BE, HB * DP)), tl.trans(wk_t), PREC)
                if WRITE_GZ:
                    tl.store(gzk_ptr + e3 * F + ch[None, :, :], gzk, mask=m3)
            elif DK_MODE == 4:
                g_r += tl.sum(tl.sum(gp[:, :, None] * qk * ddk, axis=2), axis=1)
            if DV_MODE != 0:
                gdv1 = gs1 * v1 * w3
                gdv2 = gs2 * v2 * w3
                gdv3 = gs3 * v3 * w3
                if DV_MODE == 1:
                    dvbase = gdv_ptr + e3 * DVS + vch[None, :, :]
                    tl.store(dvbase, gdv1, mask=m3)
                    tl.store(dvbase + D, gdv2, mask=m3)
                    tl.store(dvbase + 2 * D, gdv3, mask=m3)
                elif DV_MODE == 3:
                    dvbase = gdv_ptr + e3 * DVS + vch[None, :, :]
                    tl.store(dvbase, gdv1 * ddv1, mask=m3)
                    tl.store(dvbase + D, gdv2 * ddv2, mask=m3)
                    tl.store(dvbase + 2 * D, gdv3 * ddv3, mask=m3)
                elif DV_MODE == 4:
                    g_r += tl.sum(tl.sum(gdv1 * ddv1 + gdv2 * ddv2 + gdv3 * ddv3, axis=2), axis=1)
                else:
                    gzv1 = gdv1 * ddv1
                    gzv2 = gdv2 * ddv2
                    gzv3 = gdv3 * ddv3
                    grbf += _matmul(tl.reshape(gzv1, (BE, HB * DP)), tl.trans(wv1_t), PREC)
                    grbf += _matmul(tl.reshape(gzv2, (BE, HB * DP)), tl.trans(wv2_t), PREC)
                    grbf += _matmul(tl.reshape(gzv3, (BE, HB * DP)), tl.trans(wv3_t), PREC)
                    if WRITE_GZ:
                        zbase = gzv_ptr + e3 * (3 * F) + vch[None, :, :]
                        tl.store(zbase, gzv1, mask=m3)
                        tl.store(zbase + D, gzv2, mask=m3)
                        tl.store(zbase + 2 * D, gzv3, mask=m3)
            row = gedge + eo * W
            if USES_RBF:
                tl.store(row[:, None] + kk[None, :], grbf, mask=em[:, None] & (kk < K)[None, :])
            if USES_R:
                tl.store(row, g_r, mask=em)
            tl.store(row + KO, g_phi, mask=em)
            tl.store(row + KO + 1, g_ux, mask=em)
            tl.store(row + KO + 2, g_uy, mask=em)
            tl.store(row + KO + 3, g_uz, mask=em)
        tl.store(gq_ptr + i * F + ch, acc_q, mask=cval)
        if MERGED:
            tl.store(gk_ptr + i * F + ch, acc_k, mask=cval)
            tl.store(gv_ptr + i * (3 * F) + vch, acc_v1, mask=cval)
            tl.store(gv_ptr + i * (3 * F) + vch + D, acc_v2, mask=cval)
            tl.store(gv_ptr + i * (3 * F) + vch + 2 * D, acc_v3, mask=cval)
            tl.store(gvec_ptr + i * (3 * F) + ch, v2_i * acc_x, mask=cval)
            tl.store(gvec_ptr + i * (3 * F) + F + ch, v2_i * acc_y, mask=cval)
            tl.store(gvec_ptr + i * (3 * F) + 2 * F + ch, v2_i * acc_z, mask=cval)


@triton.jit
def _message_bwd_sender_kernel(
    colptr_ptr, colend_ptr, perm_ptr, receivers_ptr, q_ptr, k_ptr, v_ptr, vec_ptr,
    dk_ptr, dv_ptr, rbf_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr,
    phi_ptr, unit_ptr, mask_ptr, dk0_ptr, dv0_ptr, phi0_ptr,
    gm_ptr, gu_ptr,
    gk_ptr, gv_ptr, gvec_ptr, num_atoms,
    H: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
    HB: tl.constexpr, DP: tl.constexpr, KP: tl.constexpr, BE: tl.constexpr,
    DK_MODE: tl.constexpr, DV_MODE: tl.constexpr, HAS_MASK: tl.constexpr,
    SELF_LOOP: tl.constexpr, SELF_DK: tl.constexpr, SELF_DV: tl.constexpr,
    VCUT: tl.constexpr, ATT: tl.constexpr, FACT: tl.constexpr, PREC: tl.constexpr,
    DKS: tl.constexpr, DVS: tl.constexpr,
    TG: tl.constexpr = 1, TR0: tl.constexpr = 0.0, TIH: tl.constexpr = 1.0, TPK: tl.constexpr = False,
    REVERSE: tl.constexpr = False,
):
    """Sender-side gradients dL/dk_j, dL/dv_j, dL/dvec_j: a segment sum over the edges that
    atom j sends on, visited in sender-sorted order through ``perm`` (the receiver-side
    quantities q_i, dL/dm_i, dL/du_i are gathered; everything else is recomputed).

    ``REVERSE`` (symmetric edge lists only; ``sender_side='reverse'``): the edges j sends on are
    the reverses of those it receives, so the program walks j's own receiver segment (``colptr``
    / ``colend`` are the receiver row pointers, ``perm`` is unused, ``receivers`` holds the
    senders): edge e = (j <- i) stands for its reverse e' = (i <- j), which has the same filters,
    cutoff and mask and the unit vector u_e' = -u_e. No sort, no permutation gather, contiguous
    edge rows; the work of the merged receiver kernel's sender half, in a kernel of its own."""
    F: tl.constexpr = H * D
    cb = tl.program_id(1)
    kk = tl.arange(0, KP)
    eb = tl.arange(0, BE)
    cval, ch, vch, wk_t, bk, wv1_t, wv2_t, wv3_t, bv1, bv2, bv3 = _message_prologue(
        cb, wk_ptr, bk_ptr, wv_ptr, bv_ptr, H, D, K, HB, DP, KP, DK_MODE, DV_MODE)

    for atom in range(tl.program_id(0), num_atoms, tl.num_programs(0)):
        j = tl.cast(atom, tl.int64)
        start = tl.load(colptr_ptr + j)
        end = tl.load(colend_ptr + j)
        k_j = tl.load(k_ptr + j * F + ch, mask=cval, other=0.0)
        v1_j = tl.load(v_ptr + j * (3 * F) + vch, mask=cval, other=0.0)
        v2_j = tl.load(v_ptr + j * (3 * F) + vch + D, mask=cval, other=0.0)
        vx_j = tl.load(vec_ptr + j * (3 * F) + ch, mask=cval, other=0.0)
        vy_j = tl.load(vec_ptr + j * (3 * F) + F + ch, mask=cval, other=0.0)
        vz_j = tl.load(vec_ptr + j * (3 * F) + 2 * F + ch, mask=cval, other=0.0)
        acc_k = tl.zeros((HB, DP), dtype=k_j.dtype)
        acc_v1 = tl.zeros((HB, DP), dtype=k_j.dtype)
        acc_v2 = tl.zeros((HB, DP), dtype=k_j.dtype)
        acc_v3 = tl.zeros((HB, DP), dtype=k_j.dtype)
        acc_x = tl.zeros((HB, DP), dtype=k_j.dtype)
        acc_y = tl.zeros((HB, DP), dtype=k_j.dtype)
        acc_z = tl.zeros((HB, DP), dtype=k_j.dtype)
        if SELF_LOOP:
            phi0 = tl.load(phi0_ptr)
            q_s = tl.load(q_ptr + j * F + ch, mask=cval, other=0.0)
            gm_s = tl.load(gm_ptr + j * F + ch, mask=cval, other=0.0)
            gx_s = tl.load(gu_ptr + j * (3 * F) + ch, mask=cval, other=0.0)
            gy_s = tl.load(gu_ptr + j * (3 * F) + F + ch, mask=cval, other=0.0)
            gz_s = tl.load(gu_ptr + j * (3 * F) + 2 * F + ch, mask=cval, other=0.0)
            dk0 = tl.where(cval, 1.0, 0.0).to(k_j.dtype)
            dv01 = dk0
            dv02 = dk0
            if SELF_DK:
                dk0 = tl.load(dk0_ptr + ch, mask=cval, other=0.0)
            if SELF_DV:
                dv01 = tl.load(dv0_ptr + vch, mask=cval, other=0.0)
                dv02 = tl.load(dv0_ptr + vch + D, mask=cval, other=0.0)
            a0, da0 = _act(tl.sum(q_s * k_j * dk0, axis=1), ATT)
            if VCUT:
                g0 = 1.0
                f0 = phi0
            else:
                g0 = phi0
                f0 = 1.0
            ga0 = tl.sum(gm_s * v1_j * dv01 * f0, axis=1)
            acc_k += (ga0 * g0 * da0)[:, None] * q_s * dk0
            acc_v1 += (a0 * g0)[:, None] * gm_s * dv01 * f0
            acc_v2 += (gx_s * vx_j + gy_s * vy_j + gz_s * vz_j) * dv02 * f0
            acc_x += gx_s * dv02 * f0  # sums of dL/du dv2 w: times v2_j at the end
            acc_y += gy_s * dv02 * f0
            acc_z += gz_s * dv02 * f0

        for t0 in range(start, end, BE):
            to = t0 + eb
            em = to < end
            if REVERSE:
                eo = to.to(tl.int64)
            else:
                eo = tl.load(perm_ptr + to, mask=em, other=0).to(tl.int64)
            i = tl.load(receivers_ptr + eo, mask=em, other=0).to(tl.int64)
            valid = em
            if HAS_MASK:
                valid = valid & (tl.load(mask_ptr + eo, mask=em, other=0) != 0)
            phi = tl.load(phi_ptr + eo, mask=em, other=0.0)
            m3 = em[:, None, None] & cval[None, :, :]
            i3 = i[:, None, None]
            e3 = eo[:, None, None]
            q_i = tl.load(q_ptr + i3 * F + ch[None, :, :], mask=m3, other=0.0)
            gm_i = tl.load(gm_ptr + i3 * F + ch[None, :, :], mask=m3, other=0.0)
            gubase = gu_ptr + i3 * (3 * F) + ch[None, :, :]
            gx = tl.load(gubase, mask=m3, other=0.0)
            gy = tl.load(gubase + F, mask=m3, other=0.0)
            gz = tl.load(gubase + 2 * F, mask=m3, other=0.0)
            if DK_MODE == 2 or DV_MODE == 2:
                r = tl.load(rbf_ptr + eo[:, None] * K + kk[None, :], mask=em[:, None] & (kk < K)[None, :], other=0.0)
            if DK_MODE == 4 or DV_MODE == 4:
                g3, t3 = _table_position(rbf_ptr, eo, em, TG, TR0, TIH)
            if DK_MODE == 1 or DK_MODE == 3:
                dk, _ = _given_filter(dk_ptr + e3 * DKS + ch[None, :, :], m3, DK_MODE, FACT)
            elif DK_MODE == 2:
                dk, _ = _filter(r, wk_t, bk, DK_MODE, FACT, BE, HB, DP, PREC)
            elif DK_MODE == 4:
                dk, _ = _table_filter(wk_ptr, g3, t3, ch[None, :, :], m3, F, TIH, TG, TPK)
            else:
                dk = q_i  # unused
            if VCUT:
                w_e = tl.where(valid, phi, 0.0)
            else:
                w_e = tl.where(valid, 1.0, 0.0).to(phi.dtype)
            w3 = w_e[:, None, None]
            if DV_MODE == 1 or DV_MODE == 3:
                dvbase = dv_ptr + e3 * DVS + vch[None, :, :]
                dv1, _ = _given_filter(dvbase, m3, DV_MODE, FACT)
                dv2, _ = _given_filter(dvbase + D, m3, DV_MODE, FACT)
                dv3, _ = _given_filter(dvbase + 2 * D, m3, DV_MODE, FACT)
            elif DV_MODE == 2:
                dv1, _ = _filter(r, wv1_t, bv1, DV_MODE, FACT, BE, HB, DP, PREC)
                dv2, _ = _filter(r, wv2_t, bv2, DV_MODE, FACT, BE, HB, DP, PREC)
                dv3, _ = _filter(r, wv3_t, bv3, DV_MODE, FACT, BE, HB, DP, PREC)
            elif DV_MODE == 4:
                dv1, _ = _table_filter(wv_ptr, g3, t3, vch[None, :, :], m3, 3 * F, TIH, TG, TPK)
                dv2, _ = _table_filter(wv_ptr, g3, t3, vch[None, :, :] + D, m3, 3 * F, TIH, TG, TPK)
                dv3, _ = _table_filter(wv_ptr, g3, t3, vch[None, :, :] + 2 * D, m3, 3 * F, TIH, TG, TPK)
            else:
                dv1 = tl.where(m3, 1.0, 0.0).to(k_j.dtype)
                dv2 = dv1
                dv3 = dv1
            ux = tl.load(unit_ptr + eo * 3, mask=em, other=0.0)[:, None, None]
            uy = tl.load(unit_ptr + eo * 3 + 1, mask=em, other=0.0)[:, None, None]
            uz = tl.load(unit_ptr + eo * 3 + 2, mask=em, other=0.0)[:, None, None]
            if REVERSE:  # the reverse edge's unit vector
                ux = -ux
                uy = -uy
                uz = -uz
            sk, sv1, sv2, sv3, sx, sy, sz = _sender_share(q_i, gm_i, gx, gy, gz, dk, dv1 * w3, dv2 * w3, dv3 * w3,
                                                          ux, uy, uz, valid, phi, k_j, v1_j, vx_j, vy_j, vz_j,
                                                          DK_MODE, ATT, VCUT)
            acc_k += sk
            acc_v1 += sv1
            acc_v2 += sv2
            acc_v3 += sv3
            acc_x += sx
            acc_y += sy
            acc_z += sz

        tl.store(gk_ptr + j * F + ch, acc_k, mask=cval)
        tl.store(gv_ptr + j * (3 * F) + vch, acc_v1, mask=cval)
        tl.store(gv_ptr + j * (3 * F) + vch + D, acc_v2, mask=cval)
        tl.store(gv_ptr + j * (3 * F) + vch + 2 * D, acc_v3, mask=cval)
        tl.store(gvec_ptr + j * (3 * F) + ch, v2_j * acc_x, mask=cval)
        tl.store(gvec_ptr + j * (3 * F) + F + ch, v2_j * acc_y, mask=cval)
        tl.store(gvec_ptr + j * (3 * F) + 2 * F + ch, v2_j * acc_z, mask=cval)


