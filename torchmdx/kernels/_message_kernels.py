"""Triton kernels of the fused ET message step: the forward, and the two filter products of the
'gemm' filters (pre-activation z and dL/drbf); the backward kernels are in
:mod:`torchmdx.kernels._message_kernels_backward` (re-exported here), the device helpers both
use in :mod:`torchmdx.kernels._message_kernels_common`.

Imported only by :mod:`torchmdx.kernels.message_triton`, which documents the equations, the
launch wrappers and the autograd wiring. Notation (per edge e = (i <- j), head h, channel c):

    dk_e  = act_f(W_k rbf_e + b_k)   or a given [E, F] tensor, or 1     (DK_MODE 2 / 1 / 0)
    dv_e  = act_f(W_v rbf_e + b_v)   or a given [E, 3F] tensor, or 1    (DV_MODE 2 / 1 / 0)
    DK_MODE / DV_MODE 4: interpolated from tables in the edge length r_e (rbf_ptr holds r [E],
    wk_ptr / wv_ptr the coefficients [G, 4, F] / [G, 4, 3F]; TG, TR0, TIH: the grid), see
    :mod:`torchmdx.kernels.filter_table`; the receiver backward writes dL/dr_e in column 0.
    DK_MODE / DV_MODE 3: the given tensor is the pre-activation z = W rbf + b (one matrix
    product outside the kernels), dk = act_f(z); the receiver backward then writes dL/dz over z.
    DKS / DVS: row strides of the given tensors (both filters may live in one [E, 4F] buffer)
    p_eh  = sum_{c in h} q_ic k_jc dk_ec ;   a_eh = act_a(p_eh)
    A_eh  = a_eh phi_e valid_e           (standard)     A_eh = a_eh valid_e      (VCUT)
    s_e   = v_j dv_e valid_e             (standard)     s_e  = v_j dv_e phi_e valid_e (VCUT)
    m_i   = sum_e A_e s1_e ;   u_ix = sum_e vec_jx s2_e + s3_e d_ex

Every program owns one receiver (forward, ``_bwd_receiver``) or one sender
(``_bwd_sender``, edges visited through a sender-sorted permutation) and writes its rows
once: segment sums in registers, no atomics, deterministic. A segment runs from
``rowptr[i]`` to ``rowend[i]``: its trailing masked rows (the padding of a fixed-capacity list,
all on atom N - 1) are skipped, and their per-edge gradients are left at the caller's zeros. Channels are processed in chunks
of ``HB`` whole heads (``DP`` = D padded to a power of two, masked) so that edge x channel
tiles stay small; the radial filters come from the RBF row with ``tl.dot`` on a block of
``BE`` edges.
"""

import triton
import triton.language as tl

from torchmdx.kernels._message_kernels_backward import (  # re-exported for message_triton (__all__)
    _message_bwd_receiver_kernel,
    _message_bwd_sender_kernel,
)
from torchmdx.kernels._message_kernels_common import (  # noqa: F401 - read by the jit kernels
    _act,
    _filter,
    _given_filter,
    _matmul,
    _message_prologue,
    _table_filter,
    _table_position,
)

#: the kernels message_triton launches (the backward ones re-exported)
__all__ = ["_message_fwd_kernel", "_message_bwd_receiver_kernel", "_message_bwd_sender_kernel",
           "_filter_preact_kernel", "_filter_rbf_grad_kernel"]


@triton.jit
def _message_fwd_kernel(
    rowptr_ptr, rowend_ptr, senders_ptr, q_ptr, k_ptr, v_ptr, vec_ptr,
    dk_ptr, dv_ptr, rbf_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr,
    phi_ptr, unit_ptr, mask_ptr, dk0_ptr, dv0_ptr, phi0_ptr,
    m_ptr, u_ptr, num_atoms,
    H: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
    HB: tl.constexpr, DP: tl.constexpr, KP: tl.constexpr, BE: tl.constexpr,
    DK_MODE: tl.constexpr, DV_MODE: tl.constexpr, HAS_MASK: tl.constexpr,
    SELF_LOOP: tl.constexpr, SELF_DK: tl.constexpr, SELF_DV: tl.constexpr,
    VCUT: tl.constexpr, ATT: tl.constexpr, FACT: tl.constexpr, PREC: tl.constexpr,
    DKS: tl.constexpr, DVS: tl.constexpr,
    TG: tl.constexpr = 1, TR0: tl.constexpr = 0.0, TIH: tl.constexpr = 1.0, TPK: tl.constexpr = False,
):
    F: tl.constexpr = H * D
    cb = tl.program_id(1)
    kk = tl.arange(0, KP)
    eb = tl.arange(0, BE)
    cval, ch, vch, wk_t, bk, wv1_t, wv2_t, wv3_t, bv1, bv2, bv3 = _message_prologue(
        cb, wk_ptr, bk_ptr, wv_ptr, bv_ptr, H, D, K, HB, DP, KP, DK_MODE, DV_MODE)

    for atom in range(tl.program_id(0), num_atoms, tl.num_programs(0)):
        i = tl.cast(atom, tl.int64)
        start = tl.load(rowptr_ptr + i)
        end = tl.load(rowend_ptr + i)
        q_i = tl.load(q_ptr + i * F + ch, mask=cval, other=0.0)
        acc_m = tl.zeros((HB, DP), dtype=q_i.dtype)
        acc_x = tl.zeros((HB, DP), dtype=q_i.dtype)
        acc_y = tl.zeros((HB, DP), dtype=q_i.dtype)
        acc_z = tl.zeros((HB, DP), dtype=q_i.dtype)
        if SELF_LOOP:
            # edge (i <- i) of length 0: d_ii = 0, filters dk0 / dv0, cutoff phi0
            phi0 = tl.load(phi0_ptr)
            prod0 = q_i * tl.load(k_ptr + i * F + ch, mask=cval, other=0.0)
            if SELF_DK:
                prod0 = prod0 * tl.load(dk0_ptr + ch, mask=cval, other=0.0)
            a0, _da0 = _act(tl.sum(prod0, axis=1), ATT)
            s1_0 = tl.load(v_ptr + i * (3 * F) + vch, mask=cval, other=0.0)
            s2_0 = tl.load(v_ptr + i * (3 * F) + vch + D, mask=cval, other=0.0)
            if SELF_DV:
                s1_0 = s1_0 * tl.load(dv0_ptr + vch, mask=cval, other=0.0)
                s2_0 = s2_0 * tl.load(dv0_ptr + vch + D, mask=cval, other=0.0)
            if VCUT:
                s1_0 = s1_0 * phi0
                s2_0 = s2_0 * phi0
            else:
                a0 = a0 * phi0
            acc_m += a0[:, None] * s1_0
            acc_x += tl.load(vec_ptr + i * (3 * F) + ch, mask=cval, other=0.0) * s2_0
            acc_y += tl.load(vec_ptr + i * (3 * F) + F + ch, mask=cval, other=0.0) * s2_0
            acc_z += tl.load(vec_ptr + i * (3 * F) + 2 * F + ch, mask=cval, other=0.0) * s2_0

        for e0 in range(start, end, BE):
            eo = e0 + eb
            em = eo < end
            j = tl.load(senders_ptr + eo, mask=em, other=0).to(tl.int64)
            valid = em
            if HAS_MASK:
                valid = valid & (tl.load(mask_ptr + eo, mask=em, other=0) != 0)
            phi = tl.load(phi_ptr + eo, mask=em, other=0.0)
            m3 = em[:, None, None] & cval[None, :, :]
            j3 = j[:, None, None]
            e3 = eo[:, None, None]
            if DK_MODE == 2 or DV_MODE == 2:
                r = tl.load(rbf_ptr + eo[:, None] * K + kk[None, :], mask=em[:, None] & (kk < K)[None, :], other=0.0)
            if DK_MODE == 4 or DV_MODE == 4:
                g3, t3 = _table_position(rbf_ptr, eo, em, TG, TR0, TIH)
            prod = q_i[None, :, :] * tl.load(k_ptr + j3 * F + ch[None, :, :], mask=m3, other=0.0)
            if DK_MODE == 1 or DK_MODE == 3:
                dk, _ = _given_filter(dk_ptr + e3 * DKS + ch[None, :, :], m3, DK_MODE, FACT)
                prod = prod * dk
            elif DK_MODE == 2:
                dk, _ = _filter(r, wk_t, bk, DK_MODE, FACT, BE, HB, DP, PREC)
                prod = prod * dk
            elif DK_MODE == 4:
                dk, _ = _table_filter(wk_ptr, g3, t3, ch[None, :, :], m3, F, TIH, TG, TPK)
                prod = prod * dk
            a, _ = _act(tl.sum(prod, axis=2), ATT)  # [BE, HB]
            if VCUT:
                attn = tl.where(valid[:, None], a, 0.0)
                w_e = tl.where(valid, phi, 0.0)
            else:
                attn = tl.where(valid[:, None], a * phi[:, None], 0.0)
                w_e = tl.where(valid, 1.0, 0.0).to(phi.dtype)
            w3 = w_e[:, None, None]
            vbase = v_ptr + j3 * (3 * F) + vch[None, :, :]
            s1 = tl.load(vbase, mask=m3, other=0.0) * w3
            s2 = tl.load(vbase + D, mask=m3, other=0.0) * w3
            s3 = tl.load(vbase + 2 * D, mask=m3, other=0.0) * w3
            if DV_MODE == 1 or DV_MODE == 3:
                dvbase = dv_ptr + e3 * DVS + vch[None, :, :]
                dv1, _ = _given_filter(dvbase, m3, DV_MODE, FACT)
                dv2, _ = _given_filter(dvbase + D, m3, DV_MODE, FACT)
                dv3, _ = _given_filter(dvbase + 2 * D, m3, DV_MODE, FACT)
                s1 = s1 * dv1
                s2 = s2 * dv2
                s3 = s3 * dv3
            elif DV_MODE == 2:
                dv1, _ = _filter(r, wv1_t, bv1, DV_MODE, FACT, BE, HB, DP, PREC)
                dv2, _ = _filter(r, wv2_t, bv2, DV_MODE, FACT, BE, HB, DP, PREC)
                dv3, _ = _filter(r, wv3_t, bv3, DV_MODE, FACT, BE, HB, DP, PREC)
                s1 = s1 * dv1
                s2 = s2 * dv2
                s3 = s3 * dv3
            elif DV_MODE == 4:
                dv1, _ = _table_filter(wv_ptr, g3, t3, vch[None, :, :], m3, 3 * F, TIH, TG, TPK)
                dv2, _ = _table_filter(wv_ptr, g3, t3, vch[None, :, :] + D, m3, 3 * F, TIH, TG, TPK)
                dv3, _ = _table_filter(wv_ptr, g3, t3, vch[None, :, :] + 2 * D, m3, 3 * F, TIH, TG, TPK)
                s1 = s1 * dv1
                s2 = s2 * dv2
                s3 = s3 * dv3
            acc_m += tl.sum(attn[:, :, None] * s1, axis=0)
            vecbase = vec_ptr + j3 * (3 * F) + ch[None, :, :]
            ux = tl.load(unit_ptr + eo * 3, mask=em, other=0.0)[:, None, None]
            uy = tl.load(unit_ptr + eo * 3 + 1, mask=em, other=0.0)[:, None, None]
            uz = tl.load(unit_ptr + eo * 3 + 2, mask=em, other=0.0)[:, None, None]
            acc_x += tl.sum(tl.load(vecbase, mask=m3, other=0.0) * s2 + s3 * ux, axis=0)
            acc_y += tl.sum(tl.load(vecbase + F, mask=m3, other=0.0) * s2 + s3 * uy, axis=0)
            acc_z += tl.sum(tl.load(vecbase + 2 * F, mask=m3, other=0.0) * s2 + s3 * uz, axis=0)

        tl.store(m_ptr + i * F + ch, acc_m, mask=cval)
        tl.store(u_ptr + i * (3 * F) + ch, acc_x, mask=cval)
        tl.store(u_ptr + i * (3 * F) + F + ch, acc_y, mask=cval)
        tl.store(u_ptr + i * (3 * F) + 2 * F + ch, acc_z, mask=cval)




@triton.jit
def _filter_preact_kernel(rbf_ptr, w_ptr, b_ptr, z_ptr, num_edges, C,
                          K: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """z[e, c] = sum_k rbf[e, k] W[c, k] + b[c] on a [BM, BN] tile (rbf [E, K], W [C, K], z [E, C]):
    the pre-activation filters of the GEMM place (mode 3), in float32 accuracy (tf32x3) on
    tensor cores where cuBLAS without TF32 would run plain FMA."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    kk = tl.arange(0, KP)
    rmask = rows < num_edges
    cmask = cols < C
    r = tl.load(rbf_ptr + rows[:, None] * K + kk[None, :], mask=rmask[:, None] & (kk < K)[None, :], other=0.0)
    w_t = tl.load(w_ptr + cols[None, :] * K + kk[:, None], mask=cmask[None, :] & (kk < K)[:, None], other=0.0)
    z = _matmul(r, w_t, PREC) + tl.load(b_ptr + cols, mask=cmask, other=0.0)[None, :]
    tl.store(z_ptr + rows[:, None] * C + cols[None, :], z, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _filter_rbf_grad_kernel(gz_ptr, w_ptr, mask_ptr, grbf_ptr, num_edges, C,
                            K: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                            HAS_MASK: tl.constexpr, PREC: tl.constexpr):
    """dL/drbf[e, k] = sum_c dL/dz[e, c] W[c, k] for BM edges (dL/dz [E, C], W [C, K]); rows
    whose mask is False are written as 0 (the receiver kernel skips trailing masked rows, whose
    dL/dz slots still hold z)."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    kk = tl.arange(0, KP)
    rmask = rows < num_edges
    acc = tl.zeros((BM, KP), dtype=gz_ptr.dtype.element_ty)
    for c0 in range(0, C, BN):
        cols = c0 + tl.arange(0, BN)
        cmask = cols < C
        g = tl.load(gz_ptr + rows[:, None] * C + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * K + kk[None, :], mask=cmask[:, None] & (kk < K)[None, :], other=0.0)
        acc += _matmul(g, w, PREC)
    if HAS_MASK:
        keep = tl.load(mask_ptr + rows, mask=rmask, other=0) != 0
        acc = tl.where(keep[:, None], acc, 0.0)
    tl.store(grbf_ptr + rows[:, None] * K + kk[None, :], acc, mask=rmask[:, None] & (kk < K)[None, :])
