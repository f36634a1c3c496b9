"""Kernel launches and autograd wiring of the fused Triton ET message step: what
:mod:`torchmdx.kernels.message_triton` (configuration, dispatch, entry points) calls once it has
decided to run the kernels on a call.

For edge e = (i <- j), head h with channels c (D = F / H of them), N atoms, E edges sorted by
receiver i (the full statement in :mod:`torchmdx.kernels.message_triton`):

    dk_e   = act_f(W_k rbf_e + b_k)  [F]      dv_e = act_f(W_v rbf_e + b_v)  [3F]
    a_eh   = act_a( sum_{c in h} q_ic k_jc dk_ec ),   (s1, s2, s3)_e = v_j * dv_e
    m_i    = sum_e a_e s1_e  [N, F],   u_i = sum_e vec_j s2_e + s3_e (x) d_ij  [N, 3, F]

Here: :class:`_FusedMessageFunction` (the forward launch; first derivatives by the Triton
backward kernels, :func:`_fused_backward`; with grad mode on, i.e. create_graph, the reference
backward of :mod:`torchmdx.kernels.message_triton_grad`), the launchers with their tl.dot
precision fallback (:func:`_launch`, :func:`_launch_receiver`), and the two filter products of
the 'gemm' filters, z = rbf [W_k; W_v]^T + [b_k; b_v] (:func:`_preactivation`) and
dL/drbf = dL/dz [W_k; W_v] (:func:`_rbf_gradient`), with the filter weights' gradients
dL/dW = dL/dz^T rbf, dL/db = sum_e dL/dz.

Kernels (:mod:`torchmdx.kernels._message_kernels`, ``_message_kernels_backward``)
--------------------------------------------------------------------------------
- forward: one program per receiver i; loops over chunks of whole heads, and in each over
  blocks of ``block_edges`` edges of i's segment; m_i and u_i are summed in registers and
  written once (deterministic segment sums, no atomics).
- backward, receiver side: one program per receiver; recomputes the forward of its edges and
  writes dL/dq_i (segment sum) and every per-edge gradient (phi, unit vectors, rbf or the given
  dk / dv, and, only when the filter weights' gradients are wanted, the pre-activation filter
  gradients [E, 4F] that a matrix product turns into dL/dW).
- backward, sender side: one program per sender j; visits j's edges through a
  sender-sorted permutation of the edges (``torch.sort`` of edge_index[1], stable) and writes
  dL/dk_j, dL/dv_j, dL/dvec_j as segment sums, again without atomics. For a symmetric list
  (``FusedMessage(symmetric=True)``, the ET model's full lists) and
  ``CONFIG.sender_side = 'merged'``, the receiver kernel gives these too, from the reverse
  edges of its own segment: no sort, no second kernel, the filters read once; with
  ``'reverse'`` the sender kernel does that walk in a kernel of its own (no sort either).
Segments and the launch spec: :mod:`torchmdx.kernels.message_triton_spec`. Nothing
synchronises with the host, so the whole step can be captured in a CUDA graph. Design notes and
measurements: ``docs/kernels_message.md``.

The launch configuration (``message_triton.CONFIG``, which callers may rebind) stays in
:mod:`torchmdx.kernels.message_triton`; this module reads it there, at call time, only for the
default tl.dot precision and to record the 'ieee' fallback.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Optional

import torch

from torchmdx.kernels.message_triton_grad import _engine_needs, _reference_backward
from torchmdx.kernels.message_triton_spec import EdgeLayout, _pow2, _Spec

try:  # triton is a Linux dependency; elsewhere the reference is used
    import triton

    from torchmdx.kernels import _message_kernels as kernels

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    kernels = None
    HAVE_TRITON = False

#: what the last fused backward did (diagnostics and tests): weight_gradients is True when it
#: produced the filter weights' gradients, False when the autograd engine did not need them
LAST_BACKWARD: dict = {"weight_gradients": None}


def interpreted() -> bool:
    """True when the kernels run under the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return HAVE_TRITON and type(kernels._message_fwd_kernel).__name__ == "InterpretedFunction"


def _config():
    """The live launch configuration, ``message_triton.CONFIG`` (looked up at call time: callers
    rebind it; importing message_triton at the top would be circular)."""
    from torchmdx.kernels import message_triton

    return message_triton.CONFIG


#: tl.dot input precisions the Triton interpreter accepts; it multiplies in numpy whatever the
#: precision, so the others ('bf16x3', 'bf16x6') run there as 'ieee'
_INTERPRETER_PRECISIONS = ("ieee", "tf32", "tf32x3")


def _dot_precision(dtype, precision: Optional[str] = None) -> str:
    """tl.dot input precision: ``precision`` (default: ``CONFIG.dot_precision``, 'auto' = the
    built-in default) for float32, a multiply-sum for float64."""
    if dtype == torch.float64:
        return "fma"
    if precision is None or precision == "auto":
        config = _config()
        precision = config.dot_precision if config.dot_precision != "auto" else "tf32x3"
    if precision not in _INTERPRETER_PRECISIONS and interpreted():
        return "ieee"
    return precision


def _launch(kernel, grid, spec: _Spec, *args, **extra):
    """Launch (``extra``: constexprs of this kernel only); if the compiler refuses a float32 tl.dot
    precision other than 'ieee', fall back to 'ieee' for this and later calls (with a warning)."""
    try:
        kernel[grid](*args, **spec.constexprs(), **extra)
        return spec
    except Exception as exc:  # noqa: BLE001 - compiler errors have no stable type across versions
        if spec.precision in ("ieee", "fma") or not (spec.dk_mode == 2 or spec.dv_mode == 2):
            raise
        warnings.warn(f"tl.dot input_precision={spec.precision!r} failed ({type(exc).__name__}); using 'ieee'")
        _config().dot_precision = "ieee"
        spec = replace(spec, precision="ieee")
        kernel[grid](*args, **spec.constexprs(), **extra)
        return spec


def _launch_receiver(spec, layout, tensors, grad_m, grad_u, outputs, write_gz, self_filter_grad, merged):
    kernel = kernels._message_bwd_receiver_kernel
    args = (layout.rowptr, layout.rowend, layout.senders, *tensors, grad_m, grad_u, *outputs)
    extra = dict(WRITE_GZ=write_gz, SELF_FILTER_GRAD=self_filter_grad, MERGED=merged)
    grid = spec.grid(tensors[0].shape[0], tensors[0].device)
    try:
        kernel[grid](*args, **spec.constexprs(), **extra)
    except Exception as exc:  # noqa: BLE001 - see _launch
        if spec.precision in ("ieee", "fma") or not (spec.dk_mode == 2 or spec.dv_mode == 2):
            raise
        warnings.warn(f"tl.dot input_precision={spec.precision!r} failed ({type(exc).__name__}); using 'ieee'")
        _config().dot_precision = "ieee"
        kernel[grid](*args, **replace(spec, precision="ieee").constexprs(), **extra)


# ---------------------------------------------------------------------------------- autograd
_NAMES = ("q", "k", "v", "vec", "dk", "dv", "rbf", "wk", "bk", "wv", "bv", "phi", "unit", "mask", "dk0", "dv0", "phi0")


class _FusedMessageFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, layout, weight_nodes, *tensors):
        (q, k, v, vec, dk, dv, rbf, wk, bk, wv, bv, phi, unit, mask, dk0, dv0, phi0) = tensors
        n, f = q.shape
        m = torch.empty(n, f, dtype=q.dtype, device=q.device)
        u = torch.empty(n, 3, f, dtype=q.dtype, device=q.device)
        dummy = q
        # [W_k; W_v] and [b_k; b_v] of the filter products, stacked once per call: the backward's
        # recomputed product and dL/drbf reuse them (three weight copies per layer fewer)
        ctx.stacked = _stack_filters(wk, bk, wv, bv) if spec.dk_mode == 3 or spec.dv_mode == 3 else None
        if n > 0:
            if ctx.stacked is not None:
                dk, dv = _preactivation_views(spec, _preactivation(rbf, *ctx.stacked, spec.precision))
            spec = _launch(
                kernels._message_fwd_kernel, spec.grid(n, q.device), spec,
                layout.rowptr, layout.rowend, layout.senders, q, k, v, vec,
                _or(dk, dummy), _or(dv, dummy), _or(rbf, dummy), _or(wk, dummy), _or(bk, dummy), _or(wv, dummy),
                _or(bv, dummy), phi, unit, _or(mask, dummy), _or(dk0, dummy), _or(dv0, dummy), _or(phi0, dummy),
                m, u, n,
            )
        ctx.spec = spec
        ctx.layout = layout
        ctx.weight_nodes = weight_nodes
        ctx.save_for_backward(*tensors)  # mode 3: z is not saved (the backward recomputes it)
        return m, u

    @staticmethod
    def backward(ctx, grad_m, grad_u):
        spec: _Spec = ctx.spec
        layout: EdgeLayout = ctx.layout
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]
        if torch.is_grad_enabled():
            # create_graph=True (training on forces): a differentiable backward through the reference
            return (None, None, None) + _reference_backward(spec, layout.edge_index, saved, needs, grad_m, grad_u)
        grads = _fused_backward(spec, layout, saved, needs, ctx.weight_nodes, grad_m.contiguous(), grad_u.contiguous(),
                                ctx.stacked)
        return (None, None, None) + grads


def _or(t, default):
    return default if t is None else t


def _stacked(wk, wv, key, value) -> torch.Tensor:
    """[key; value] for the filters present (W_k / W_v not None): ``_stacked(wk, wv, wk, wv)``
    is [W_k; W_v] [C, K], ``_stacked(wk, wv, bk, bv)`` is [b_k; b_v] [C]; C = F (keys) + 3F (values)."""
    parts = [x for w, x in ((wk, key), (wv, value)) if w is not None]
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).contiguous()


def _stack_filters(wk, bk, wv, bv):
    """(weight [C, K], bias [C]) = ([W_k; W_v], [b_k; b_v]) of the filters present."""
    return _stacked(wk, wv, wk, wv), _stacked(wk, wv, bk, bv)


#: (rows, columns) of the float32 filter-product tiles, per kernel. Swept on an H100 on 2026-12-06
#: (bench/bench_filter_gemm.py, docs/benchmarks/2026-12-06-h100-f): the pre-activation at 128 x 64 took
#: 25.5 / 137.7 / 1 120 µs at 5 660 / 104 436 / 1 022 612 edges against 47.6 / 148.1 / 1 189 µs at the
#: former 64 x 128 (128 x 128 was 2-4 % faster at the two larger sizes, but 46 µs at the smallest);
#: the rbf gradient keeps 64 x 64
#: (128 x 64 was 6 µs slower at 5 660 edges, 66 µs faster at 1 M: no clear winner).
GEMM_TILES = {"preact": (128, 64), "rbf_grad": (64, 64)}


def _gemm_tiles(dtype, kernel: str):
    """(rows, columns) of ``kernel``'s tile ("preact" or "rbf_grad"): :data:`GEMM_TILES` for
    float32; float64 multiplies and sums in registers (no float64 tensor-core path here), so
    its tiles are 32 x 32."""
    return (32, 32) if dtype == torch.float64 else GEMM_TILES[kernel]


def _preactivation(rbf, weight, bias, precision: Optional[str] = None) -> torch.Tensor:
    """z = rbf [W_k; W_v]^T + [b_k; b_v]: [E, C], C = F (keys) + 3F (values), by one Triton
    kernel with float32 accuracy on tensor cores (``_filter_preact_kernel``; tf32x3 where
    cuBLAS without TF32 runs plain FMA, ~1.5x slower here). ``weight``, ``bias``: the stacked
    filters (:func:`_stack_filters`)."""
    e, k = rbf.shape
    c = weight.shape[0]
    z = torch.empty(e, c, dtype=rbf.dtype, device=rbf.device)
    if e == 0:
        return z
    bm, bn = _gemm_tiles(rbf.dtype, "preact")
    kernels._filter_preact_kernel[(triton.cdiv(e, bm), triton.cdiv(c, bn))](
        rbf.contiguous(), weight, bias, z, e, c, K=k, KP=max(16, _pow2(k)), BM=bm, BN=bn,
        PREC=_dot_precision(rbf.dtype, precision), num_warps=4)
    return z


def _rbf_gradient(gz, weight, mask, precision: Optional[str] = None) -> torch.Tensor:
    """dL/drbf = dL/dz [W_k; W_v] ([E, C] x [C, K], ``weight`` stacked by :func:`_stack_filters`),
    rows with mask False set to 0 (one Triton kernel, float32 accuracy; reference:
    ``torch.where(mask, gz @ W, 0)``)."""
    e, c = gz.shape
    k = weight.shape[1]
    grbf = torch.empty(e, k, dtype=gz.dtype, device=gz.device)
    if e == 0:
        return grbf
    bm, bn = _gemm_tiles(gz.dtype, "rbf_grad")
    kernels._filter_rbf_grad_kernel[(triton.cdiv(e, bm),)](
        gz, weight, mask if mask is not None else gz, grbf, e, c, K=k, KP=max(16, _pow2(k)), BM=bm, BN=bn,
        HAS_MASK=mask is not None, PREC=_dot_precision(gz.dtype, precision), num_warps=4)
    return grbf


def _preactivation_views(spec, z):
    """(z_k, z_v): the key and value columns of the pre-activation buffer (None where absent)."""
    f = spec.heads * spec.head_dim
    zk = z if spec.dk_mode == 3 else None
    zv = (z[:, f:] if spec.dk_mode == 3 else z) if spec.dv_mode == 3 else None
    return zk, zv


class _full_precision_matmul:
    """Context: float32 matrix products without TF32 (restores the caller's setting)."""

    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.old


def _fused_backward(spec: _Spec, layout: EdgeLayout, saved, needs, weight_nodes, grad_m, grad_u, stacked,
                    edge_buffer: Optional[list] = None):
    """Input gradients from the Triton backward kernels. ``stacked``: the forward's stacked filter
    weights (:func:`_stack_filters`; None off the GEMM place); the GEMM place's pre-activations z
    are recomputed here (not kept from the forward: memory, and keeping them was slower).
    ``edge_buffer``: a list that receives the per-edge gradient buffer [E, width] (columns: dL/drbf
    [K] or dL/dr [1] or none, then dL/dphi, dL/dd [3]) whose column views the phi, unit and rbf
    gradients are (the custom operators of :mod:`torchmdx.kernels.message_ops` return it whole)."""
    (q, k, v, vec, dk, dv, rbf, wk, bk, wv, bv, phi, unit, mask, dk0, dv0, phi0) = saved
    need = dict(zip(_NAMES, needs))
    n, f = q.shape
    e = phi.shape[0]
    out = dict.fromkeys(_NAMES)
    dummy = q
    gemm = spec.dk_mode == 3 or spec.dv_mode == 3  # filters from one matrix product (pre-activation z)
    weights_wanted = [need[name] and _engine_needs(node) for name, node in zip(("wk", "bk", "wv", "bv"), weight_nodes)]
    write_gz = spec.dk_mode == 2 and any(weights_wanted[:2]) or spec.dv_mode == 2 and any(weights_wanted[2:])
    gemm_weights = gemm and any(weights_wanted)
    LAST_BACKWARD["weight_gradients"] = bool(write_gz or gemm_weights)
    self_filter_grad = spec.self_loop and (need["dk0"] or need["dv0"])
    need_receiver = (any(need[name] for name in ("q", "dk", "dv", "rbf", "phi", "unit")) or write_gz or gemm_weights
                     or self_filter_grad)
    need_sender = any(need[name] for name in ("k", "v", "vec"))
    merged = spec.merged and need_sender and n > 0  # the receiver kernel gives the sender side too
    need_receiver = need_receiver or merged
    z = None
    if gemm and n > 0 and (need_receiver or need_sender):
        z = _preactivation(rbf, *stacked, spec.precision)  # recomputed; the receiver kernel overwrites it with dL/dz
        dk, dv = _preactivation_views(spec, z)
    tensors = (q, k, v, vec, _or(dk, dummy), _or(dv, dummy), _or(rbf, dummy), _or(wk, dummy), _or(bk, dummy),
               _or(wv, dummy), _or(bv, dummy), phi, unit, _or(mask, dummy), _or(dk0, dummy), _or(dv0, dummy),
               _or(phi0, dummy))

    def sender_side():
        gk, gv, gvec = torch.empty_like(k), torch.empty_like(v), torch.empty_like(vec)
        if n > 0:
            if spec.reverse:  # each atom's own receiver segment, edges taken as their reverses
                colptr, colend, perm, other_end = layout.rowptr, layout.rowend, layout.rowptr, layout.senders
            else:
                (colptr, colend, perm), other_end = layout.sender_order(), layout.receivers
            _launch(
                kernels._message_bwd_sender_kernel, spec.grid(n, q.device), spec,
                colptr, colend, perm, other_end, *tensors, grad_m, grad_u, gk, gv, gvec, n, REVERSE=spec.reverse,
            )
        out["k"], out["v"], out["vec"] = gk, gv, gvec

    if need_sender and gemm and not merged:  # before the receiver side, which overwrites z with dL/dz
        sender_side()
    if need_receiver and n > 0:
        new = lambda *shape: torch.empty(*shape, dtype=q.dtype, device=q.device)  # noqa: E731
        uses_rbf = spec.dk_mode == 2 or spec.dv_mode == 2
        uses_r = spec.dk_mode == 4 or spec.dv_mode == 4  # tables: dL/dr [E] in column 0
        width = (spec.num_rbf if uses_rbf else 1 if uses_r else 0) + 4
        # per-edge outputs: rows the kernels skip (trailing masked rows) must read 0
        new_edge = (lambda *shape: torch.zeros(*shape, dtype=q.dtype, device=q.device)) if spec.has_mask else new
        gq = new(n, f)
        gedge = new_edge(spec.chunks, e, width)  # per chunk: dL/drbf [K], dL/dphi, dL/dd [3]
        # mode 3: dL/dz is written over z's key / value columns (in place)
        gdk = new_edge(e, f) if spec.dk_mode == 1 else dk if spec.dk_mode == 3 else dummy
        gdv = new_edge(e, 3 * f) if spec.dv_mode == 1 else dv if spec.dv_mode == 3 else dummy
        gzk = new_edge(e, f) if write_gz and spec.dk_mode == 2 else dummy
        gzv = new_edge(e, 3 * f) if write_gz and spec.dv_mode == 2 else dummy
        gdk0 = new(n, f) if self_filter_grad and spec.self_dk else dummy
        gdv0 = new(n, 3 * f) if self_filter_grad and spec.self_dv else dummy
        if merged:
            out["k"], out["v"], out["vec"] = torch.empty_like(k), torch.empty_like(v), torch.empty_like(vec)
        sender_outputs = (out["k"], out["v"], out["vec"]) if merged else (dummy, dummy, dummy)
        _launch_receiver(spec, layout, tensors, grad_m, grad_u,
                         (gq, gedge, gdk, gdv, gzk, gzv, gdk0, gdv0, *sender_outputs, e, n),
                         write_gz, self_filter_grad, merged)
        gedge = gedge[0] if spec.chunks == 1 else gedge.sum(0)
        if edge_buffer is not None:
            edge_buffer.append(gedge)
        k0 = width - 4
        gphi, gunit = gedge[:, k0], gedge[:, k0 + 1:]
        grbf = gedge[:, :k0] if uses_rbf else gedge[:, 0] if uses_r else None
        out["q"], out["phi"], out["unit"] = gq, gphi, gunit
        if spec.dk_mode == 1:
            out["dk"] = gdk
        if spec.dv_mode == 1:
            out["dv"] = gdv
        if uses_rbf or uses_r:
            out["rbf"] = grbf
        if gemm:
            _gemm_filter_gradients(spec, z, mask, rbf, stacked[0], wk, wv, bk, bv, need, weights_wanted, out)
        if write_gz and spec.dk_mode == 2:
            if weights_wanted[0]:
                out["wk"] = gzk.t() @ rbf
            if weights_wanted[1] and bk is not None:
                out["bk"] = gzk.sum(0)
        if write_gz and spec.dv_mode == 2:
            if weights_wanted[2]:
                out["wv"] = gzv.t() @ rbf
            if weights_wanted[3] and bv is not None:
                out["bv"] = gzv.sum(0)
        if self_filter_grad and spec.self_dk and need["dk0"]:
            out["dk0"] = gdk0.sum(0)
        if self_filter_grad and spec.self_dv and need["dv0"]:
            out["dv0"] = gdv0.sum(0)
    elif n == 0:
        out["q"] = torch.zeros_like(q)
        out["phi"] = torch.zeros_like(phi)
        out["unit"] = torch.zeros_like(unit)
        if gemm or spec.dk_mode == 4 or spec.dv_mode == 4:
            out["rbf"] = torch.zeros_like(rbf)
    if need_sender and not gemm and not merged:
        sender_side()
    return tuple(out[name] if need[name] else None for name in _NAMES)


def _gemm_filter_gradients(spec, gz, mask, rbf, weight, wk, wv, bk, bv, need, weights_wanted, out):
    """Filter gradients from dL/dz [E, F + 3F] (written by the receiver kernel over z): dL/drbf =
    dL/dz [W_k; W_v], dL/dW = dL/dz^T rbf, dL/db = sum_e dL/dz. Trailing masked rows the kernel
    skipped still hold z: they are zeroed (per row of dL/drbf, or in dL/dz for the weights)."""
    f = spec.heads * spec.head_dim
    if need["rbf"]:
        out["rbf"] = _rbf_gradient(gz, weight, mask, spec.precision)
    if any(weights_wanted):
        if mask is not None:
            gz = gz.masked_fill_(~mask.bool()[:, None], 0.0)
        zk, zv = _preactivation_views(spec, gz)
        with _full_precision_matmul():
            if weights_wanted[0]:
                out["wk"] = zk[:, :f].t() @ rbf
            if weights_wanted[2]:
                out["wv"] = zv.t() @ rbf
        if weights_wanted[1] and bk is not None:
            out["bk"] = zk[:, :f].sum(0)
        if weights_wanted[3] and bv is not None:
            out["bv"] = zv.sum(0)
