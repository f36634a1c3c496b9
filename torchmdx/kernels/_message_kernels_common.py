"""Device helpers shared by the fused message kernels (:mod:`torchmdx.kernels._message_kernels`
and :mod:`torchmdx.kernels._message_kernels_backward`): the activations with their derivatives
(``_act``), the per-program set-up of a channel chunk that every message kernel starts with
(``_message_prologue``: channel indices and masks, and the chunk's filter weights), the radial
filters from an RBF block (``_weight_chunk_t``, ``_matmul``, ``_filter``) or from a given /
pre-activation tile (``_given_filter``) or from tables in the edge length
(``_table_position``, ``_table_filter``), and one edge block's shares in its
sender's gradients (``_sender_share``, used by the sender kernel and the merged receiver kernel).
Notation in :mod:`torchmdx.kernels._message_kernels`."""

import triton
import triton.language as tl

# activation codes (see message_triton.ACTIVATION_CODES)
SILU: tl.constexpr = 0
SSP: tl.constexpr = 1
TANH: tl.constexpr = 2
SIGMOID: tl.constexpr = 3
MISH: tl.constexpr = 4


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _tanh(x):
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _act(x, KIND: tl.constexpr):
    """(f(x), f'(x)) of the activation ``KIND``; unused derivatives are removed by the compiler."""
    if KIND == 0:  # silu: x sigma(x)
        s = _sigmoid(x)
        y = x * s
        dy = s * (1.0 + x * (1.0 - s))
    elif KIND == 1:  # shifted softplus: softplus(x) - ln 2
        # ln 2 rounded to float32, as the reference (and TorchMD-NET) subtracts it
        y = _softplus(x) - 0.6931471824645996
        dy = _sigmoid(x)
    elif KIND == 2:  # tanh
        y = _tanh(x)
        dy = 1.0 - y * y
    elif KIND == 3:  # sigmoid
        y = _sigmoid(x)
        dy = y * (1.0 - y)
    else:  # mish: x tanh(softplus(x))
        t = _tanh(_softplus(x))
        y = x * t
        dy = t + x * (1.0 - t * t) * _sigmoid(x)
    return y, dy


@triton.jit
def _weight_chunk_t(w_ptr, cb, row_stride_heads, block, H: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
                    HB: tl.constexpr, DP: tl.constexpr, KP: tl.constexpr):
    """W^T restricted to the channels of chunk ``cb``: [KP, HB*DP] (zero in padding).

    Row of output channel (h, d) in W: h * row_stride_heads + block * D + d.
    """
    fo = tl.arange(0, HB * DP)
    fh = cb * HB + fo // DP
    fd = fo % DP
    kk = tl.arange(0, KP)
    valid = ((fh < H) & (fd < D))[None, :] & (kk < K)[:, None]
    rows = fh * row_stride_heads + block * D + fd
    return tl.load(w_ptr + rows[None, :] * K + kk[:, None], mask=valid, other=0.0)


@triton.jit
def _message_prologue(cb, wk_ptr, bk_ptr, wv_ptr, bv_ptr, H: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
                      HB: tl.constexpr, DP: tl.constexpr, KP: tl.constexpr, DK_MODE: tl.constexpr,
                      DV_MODE: tl.constexpr):
    """The set-up every message kernel does once per program, for its channel chunk ``cb``:
    returns ``(cval, ch, vch, wk_t, bk, wv1_t, wv2_t, wv3_t, bv1, bv2, bv3)``.

    cval [HB, DP]  the chunk's channels that exist (head < H, channel < D; the rest is padding)
    ch   [HB, DP]  channel index in [0, F) of (head, channel):  h D + c
    vch  [HB, DP]  channel of value block 0 in [0, 3F):  3 h D + c  (blocks 1, 2 at + D, + 2D)
    wk_t, bk       with in-kernel filters (DK_MODE 2): W_k^T of the chunk [KP, HB*DP] and b_k
                   [HB, DP], so that dk = act_f(rbf W_k^T + b_k) on a block of edges
    wv1_t .. bv3   the same for the three value blocks of W_v, b_v (DV_MODE 2)
    Without in-kernel filters those are placeholders that the kernels never read."""
    hb = tl.arange(0, HB)
    dd = tl.arange(0, DP)
    hh = cb * HB + hb[:, None]
    cval = (hh < H) & (dd[None, :] < D)
    ch = hh * D + dd[None, :]
    vch = hh * (3 * D) + dd[None, :]
    if DK_MODE == 2:
        wk_t = _weight_chunk_t(wk_ptr, cb, D, 0, H, D, K, HB, DP, KP)
        bk = tl.load(bk_ptr + ch, mask=cval, other=0.0)
    else:  # placeholders (unused)
        wk_t = cval
        bk = cval
    if DV_MODE == 2:
        wv1_t = _weight_chunk_t(wv_ptr, cb, 3 * D, 0, H, D, K, HB, DP, KP)
        wv2_t = _weight_chunk_t(wv_ptr, cb, 3 * D, 1, H, D, K, HB, DP, KP)
        wv3_t = _weight_chunk_t(wv_ptr, cb, 3 * D, 2, H, D, K, HB, DP, KP)
        bv1 = tl.load(bv_ptr + vch, mask=cval, other=0.0)
        bv2 = tl.load(bv_ptr + vch + D, mask=cval, other=0.0)
        bv3 = tl.load(bv_ptr + vch + 2 * D, mask=cval, other=0.0)
    else:  # placeholders (unused)
        wv1_t = cval
        wv2_t = cval
        wv3_t = cval
        bv1 = cval
        bv2 = cval
        bv3 = cval
    return cval, ch, vch, wk_t, bk, wv1_t, wv2_t, wv3_t, bv1, bv2, bv3


@triton.jit
def _matmul(a, b, PREC: tl.constexpr):
    """a @ b: tensor cores (tl.dot with input precision PREC), or for PREC == "fma" (float64,
    whose tl.dot Triton 3.6 cannot lower for every shape here) a broadcast multiply-sum."""
    if PREC == "fma":
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _filter(r, wT, bias, MODE: tl.constexpr, FACT: tl.constexpr, BE: tl.constexpr, HB: tl.constexpr,
            DP: tl.constexpr, PREC: tl.constexpr):
    """act_f(r @ W^T + b) on a block of edges: (value, derivative) as [BE, HB, DP]."""
    z = tl.reshape(_matmul(r, wT, PREC), (BE, HB, DP)) + bias[None, :, :]
    return _act(z, FACT)


@triton.jit
def _given_filter(ptrs, m3, MODE: tl.constexpr, FACT: tl.constexpr):
    """(value, derivative) of a given filter tile: the tensor itself (MODE 1; the derivative is
    unused there and removed by the compiler) or act_f of the pre-activation z (MODE 3)."""
    x = tl.load(ptrs, mask=m3, other=0.0)
    if MODE == 3:
        return _act(x, FACT)
    else:
        return x, x


@triton.jit
def _table_position(r_ptr, eo, em, TG: tl.constexpr, TR0: tl.constexpr, TIH: tl.constexpr):
    """Where a block of edges falls in the filter tables (mode 4): (interval g [BE, 1, 1] int64,
    t = (r - r_min) / h - g [BE, 1, 1]) from the edge lengths r [E]; g is clamped to the table."""
    s = (tl.load(r_ptr + eo, mask=em, other=TR0) - TR0) * TIH
    g = tl.minimum(tl.maximum(tl.floor(s), 0.0), TG - 1.0)
    return g.to(tl.int64)[:, None, None], (s - g)[:, None, None]


@triton.jit
def _table_filter(table_ptr, g3, t3, chan, m3, C: tl.constexpr, TIH: tl.constexpr, TG: tl.constexpr = 1,
                  TPK: tl.constexpr = False):
    """(f, df/dr) of a tabulated filter on a block of edges (mode 4), [BE, HB, DP]: the cubic
    c0 + t (c1 + t (c2 + t c3)) of each edge's interval and its r-derivative
    (c1 + t (2 c2 + 3 t c3)) / h; coefficients [G, 4, C] (:mod:`torchmdx.kernels.filter_table`:
    each coefficient a contiguous row over the channels), ``chan`` the channels [1, HB, DP] in [0, C).
    ``TPK``: the compact buffer [3 G + 2, C] of :meth:`FilterTable.compact` instead (rows c0, c1 and
    one word of fixed-point c2 (low 20 bits) and c3 (high 12), then the inverse scales of c2 and c3;
    ``TG`` = G)."""
    if TPK:
        base = table_ptr + g3 * (3 * C) + chan
        c0 = tl.load(base, mask=m3, other=0.0)
        c1 = tl.load(base + C, mask=m3, other=0.0)
        word = tl.load(base + 2 * C, mask=m3, other=0.0).to(tl.int32, bitcast=True)
        scales = table_ptr + 3 * TG * C + chan
        inverse2 = tl.load(scales, mask=m3, other=0.0)
        inverse3 = tl.load(scales + C, mask=m3, other=0.0)
        c2 = ((word << 12) >> 12).to(tl.float32) * inverse2  # sign-extended low 20 bits
        c3 = (word >> 20).to(tl.float32) * inverse3  # arithmetic shift: the signed high 12 bits
    else:
        base = table_ptr + g3 * (4 * C) + chan
        c0 = tl.load(base, mask=m3, other=0.0)
        c1 = tl.load(base + C, mask=m3, other=0.0)
        c2 = tl.load(base + 2 * C, mask=m3, other=0.0)
        c3 = tl.load(base + 3 * C, mask=m3, other=0.0)
    return c0 + t3 * (c1 + t3 * (c2 + t3 * c3)), (c1 + t3 * (2.0 * c2 + 3.0 * t3 * c3)) * TIH


@triton.jit
def _sender_share(q, gm, gx, gy, gz, dk, dv1, dv2, dv3, ux, uy, uz, valid, phi, k_s, v1_s, vx_s, vy_s, vz_s,
                  DK_MODE: tl.constexpr, ATT: tl.constexpr, VCUT: tl.constexpr):
    """A block of edges (receiver r <- sender s): their shares in the sender's gradients, summed
    over the block, as (dL/dk_s, dL/dv1_s, dL/dv2_s, dL/dv3_s, sum dL/du_rx dv2, ..y, ..z); the
    last three are still to be multiplied by v2_s (a factor of every edge of the sender).

    Tiles [BE, HB, DP]: the receivers' q, dL/dm, dL/du (x, y, z); the filters dk (ignored for
    DK_MODE 0) and dv1..dv3 already multiplied by the validity / cutoff factor w_e; ux, uy, uz
    [BE, 1, 1] the edges' unit vectors; valid, phi [BE]; the sender's own rows k_s, v1_s,
    vec_s [HB, DP]. One formula for the sender kernel and the merged receiver kernel."""
    if DK_MODE != 0:
        qdk = q * dk
    else:
        qdk = q
    a, da = _act(tl.sum(qdk * k_s[None, :, :], axis=2), ATT)
    g_attn = tl.sum(gm * (v1_s[None, :, :] * dv1), axis=2)
    if VCUT:
        attn = tl.where(valid[:, None], a, 0.0)
        gp = tl.where(valid[:, None], g_attn * da, 0.0)
    else:
        attn = tl.where(valid[:, None], a * phi[:, None], 0.0)
        gp = tl.where(valid[:, None], g_attn * phi[:, None] * da, 0.0)
    share_k = tl.sum(gp[:, :, None] * qdk, axis=0)
    share_v1 = tl.sum(attn[:, :, None] * gm * dv1, axis=0)
    share_v2 = tl.sum((gx * vx_s[None, :, :] + gy * vy_s[None, :, :] + gz * vz_s[None, :, :]) * dv2, axis=0)
    share_v3 = tl.sum((gx * ux + gy * uy + gz * uz) * dv3, axis=0)
    return share_k, share_v1, share_v2, share_v3, tl.sum(gx * dv2, axis=0), tl.sum(gy * dv2, axis=0), \
        tl.sum(gz * dv2, axis=0)
