"""Fused Triton message step of one equivariant-transformer (ET) layer, forward and backward.

Same function as :func:`torchmdx.kernels.message_ref.et_message` (see its docstring for the
shapes), computed without materialising any per-edge feature tensor. For edge e = (i <- j),
head h with channels c (D = F / H of them), N atoms, E edges sorted by receiver i:

    dk_e   = act_f(W_k rbf_e + b_k)  [F]      dv_e = act_f(W_v rbf_e + b_v)  [3F]
    a_eh   = act_a( sum_{c in h} q_ic k_jc dk_ec )
    (s1, s2, s3)_e = v_j * dv_e                                     (3 blocks of D per head)
    cutoff phi_e on a_eh (standard ET) or on (s1, s2, s3)_e (``vector_cutoff``)
    m_i    = sum_e a_e s1_e                                          [N, F]
    u_i    = sum_e vec_j s2_e + s3_e (x) d_ij                        [N, 3, F]
    plus the self edge (i <- i, r = 0, d = 0) with filters dk0, dv0 and cutoff phi0.

Entry points
------------
- :func:`et_message`: drop-in for the reference (``dk`` [E, F] and ``dv`` [E, 3F] given,
  or None). Used where the caller already holds the filters.
- :func:`et_message_filtered`: takes the RBF rows ``rbf`` [E, K] and the filter weights
  (W_k [F, K], b_k, W_v [3F, K], b_v, activation ``filter_activation``); where the filters are
  evaluated is ``CONFIG.filters``: 'gemm' (default) computes the pre-activation
  z = rbf [W_k; W_v]^T + b [E, 4F] by one Triton product per layer, the kernels apply
  act_f, the backward recomputes z, overwrites it with dL/dz and turns that into dL/drbf by one
  more product (transient memory E x 4F per layer, not kept between forward and backward);
  'kernel' evaluates dk, dv inside every kernel with ``tl.dot`` on blocks of edges (O(E K)
  memory, but about three times the registers: slower, docs/kernels_message.md). The
  backward returns dL/drbf [E, K] (which carries the position dependence together with phi
  and the unit vectors).
- :class:`FusedMessage`: one object per model forward pass (what
  :func:`torchmdx.nn.et.message_function` returns). Calling it is :func:`et_message`; its
  :meth:`FusedMessage.filtered` is :func:`et_message_filtered`; it computes the edge layout
  (receiver row pointers, sender permutation) once and reuses it in every layer.

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
  edges of its own segment: no sort, no second kernel, the filters read once.
Segments and the launch spec: :mod:`torchmdx.kernels.message_triton_spec`. Nothing
synchronises with the host, so the whole step can be captured in a CUDA graph. Design notes and
measurements: ``docs/kernels_message.md``.

Gradients and their limits (which are produced, and the reference backward behind second
derivatives): :mod:`torchmdx.kernels.message_triton_grad`.

Dtypes float32 and float64 (float64 for tests). In float32 the filter products use
``CONFIG.dot_precision`` ("tf32x3": three tf32 tensor-core passes, float32 accuracy; falls
back to "ieee" if the compiler refuses it). Any F divisible by H: D is padded to a power of
two with masked channels. Runs on CUDA tensors, and on CPU tensors under the Triton
interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is imported); anything else goes to
the torch reference.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Optional

import torch

from torchmdx.kernels import message_ref
from torchmdx.kernels.message_triton_grad import _engine_needs, _grad_node, _reference_backward, reference_filtered
from torchmdx.kernels.message_triton_spec import ACTIVATION_CODES, EdgeLayout, _pow2, _Spec

try:  # triton is a Linux dependency; elsewhere the reference is used
    import triton

    from torchmdx.kernels import _message_kernels as kernels

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    kernels = None
    HAVE_TRITON = False


@dataclass
class LaunchConfig:
    """Launch parameters (the benchmark may change them).

    A field left at None / 'auto' is chosen per call (:func:`resolved_config`): on a CUDA GPU
    from the measured launch table (:mod:`torchmdx.kernels.launch_table`, keyed by the GPU's
    name and the call's size class) when ``table`` is True and it has an entry, else the
    built-in default named below. A field set explicitly always wins.

    block_edges      edges per block (BE); at least 16 where the filters use tl.dot (default 16)
    chunk_channels   channels per chunk (whole heads; at least one head) (default 32)
    num_warps        warps per program (default 4)
    dot_precision    tl.dot input precision of the float32 filter products: 'tf32x3'
                     (default: three tf32 passes, float32 accuracy), 'tf32', 'ieee', 'bf16x3'
                     or 'bf16x6' (split-bf16 products; Triton >= 3.5); float64 always uses a
                     multiply-sum ('fma'); the table may pick only a precision that passed
                     the force-error gate (:func:`torchmdx.kernels.launch_table.gate`)
    programs_per_sm  persistent grid: at most this many programs per multiprocessor and
                     channel chunk, each looping over atoms (0, the default: one program per atom)
    num_stages       Triton software-pipelining depth (None: the table's, else Triton's default)
    maxnreg          register cap per thread (None: the table's, else no cap)
    sender_side      how the backward gets the sender-side gradients dL/dk, dL/dv, dL/dvec:
                     'sorted' (the default: a second kernel walks the edges of each sender
                     through a stable sort of the senders), 'merged' (for calls that declare a
                     symmetric edge list, :class:`FusedMessage` ``symmetric=True``: the
                     receiver kernel adds them while it walks each atom's own segment, using
                     the reverse edges; no sort, no second kernel, the filters read once)
    filters          where :func:`et_message_filtered` evaluates the radial filters:
                     'gemm' (the default: one matrix product z = rbf W^T + b per layer before
                     the kernels, which apply act_f; the backward recomputes z and overwrites
                     it with dL/dz, and one more product gives dL/drbf: transient GPU memory
                     E x 4F), 'kernel' (tl.dot on blocks of edges inside every kernel: O(E K)
                     memory, but three times the registers)
    table            consult the measured launch table for the fields left None / 'auto'
    """

    block_edges: Optional[int] = None
    chunk_channels: Optional[int] = None
    num_warps: Optional[int] = None
    dot_precision: str = "auto"
    programs_per_sm: Optional[int] = None
    num_stages: Optional[int] = None
    maxnreg: Optional[int] = None
    filters: str = "auto"
    sender_side: str = "auto"
    table: bool = True


CONFIG = LaunchConfig()

FILTER_PLACES = ("auto", "gemm", "kernel")
SENDER_SIDES = ("auto", "sorted", "merged")

#: the resolved launch configuration of the last fused call (diagnostics, benchmarks and tests)
LAST_CONFIG: dict = {}

#: what the last fused backward did (diagnostics and tests): weight_gradients is True when it
#: produced the filter weights' gradients, False when the autograd engine did not need them
LAST_BACKWARD: dict = {"weight_gradients": None}


def interpreted() -> bool:
    """True when the kernels run under the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return HAVE_TRITON and type(kernels._message_fwd_kernel).__name__ == "InterpretedFunction"


def supported(tensor: torch.Tensor) -> bool:
    """Can the fused kernels run on this tensor's device and dtype?"""
    if not HAVE_TRITON or tensor.dtype not in (torch.float32, torch.float64):
        return False
    return tensor.is_cuda != interpreted()


_GPU_NAMES: dict = {}


def _gpu_name(device: torch.device) -> Optional[str]:
    """``torch.cuda.get_device_name`` of a CUDA device (cached), None elsewhere (the
    interpreter, the CPU): the key of the launch table."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _GPU_NAMES:
        _GPU_NAMES[index] = torch.cuda.get_device_name(index)
    return _GPU_NAMES[index]


def resolved_config(num_atoms: int, gpu_name: Optional[str] = None) -> LaunchConfig:
    """:data:`CONFIG` with every None / 'auto' field decided for a call of ``num_atoms`` atoms
    on the GPU named ``gpu_name`` (None: no GPU, so no table): the launch table's entry for
    that GPU and size class where ``CONFIG.table``, else the built-in defaults."""
    from torchmdx.kernels import launch_table

    explicit = {name: getattr(CONFIG, name) for name in launch_table.DEFAULTS}
    values = launch_table.resolve(explicit, gpu_name, num_atoms, use_table=CONFIG.table)
    return LaunchConfig(**values, table=CONFIG.table)


def _make_spec(dtype, heads, head_dim, num_rbf, dk_mode, dv_mode, has_mask, self_loop, self_dk, self_dv,
               vector_cutoff, attn_activation, filter_activation, merged=False, cfg: Optional[LaunchConfig] = None) -> _Spec:
    cfg = cfg if cfg is not None else resolved_config(0)
    uses_dot = dk_mode == 2 or dv_mode == 2
    dp = _pow2(head_dim)
    hp = _pow2(heads)
    hb = max(1, min(hp, _pow2(max(cfg.chunk_channels, 1)) // dp))
    be = _pow2(max(cfg.block_edges, 1))
    kp = _pow2(max(num_rbf, 1))
    if uses_dot:  # tl.dot needs every dimension >= 16
        if hb * dp < 16:
            hb = min(hp, max(1, 16 // dp))
        if hb * dp < 16:
            dp = 16 // hb
        be = max(be, 16)
        kp = max(kp, 16)
    precision = _dot_precision(dtype, cfg.dot_precision)
    f = heads * head_dim
    if dk_mode == 3 or dv_mode == 3:  # one buffer z = [z_k | z_v]
        dk_stride = dv_stride = f * ((dk_mode == 3) + 3 * (dv_mode == 3))
    else:
        dk_stride, dv_stride = f, 3 * f
    return _Spec(heads, head_dim, num_rbf, dk_mode, dv_mode, has_mask, self_loop, self_dk, self_dv, vector_cutoff,
                 attn_activation, filter_activation, hb, hp, dp, kp, be, cfg.num_warps, precision,
                 cfg.programs_per_sm, cfg.num_stages, cfg.maxnreg, dk_stride, dv_stride, merged)


def _launch(kernel, grid, spec: _Spec, *args):
    """Launch; if the compiler refuses a float32 tl.dot precision other than 'ieee', fall back
    to 'ieee' for this and later calls (with a warning)."""
    try:
        kernel[grid](*args, **spec.constexprs())
        return spec
    except Exception as exc:  # noqa: BLE001 - compiler errors have no stable type across versions
        if spec.precision in ("ieee", "fma") or not (spec.dk_mode == 2 or spec.dv_mode == 2):
            raise
        warnings.warn(f"tl.dot input_precision={spec.precision!r} failed ({type(exc).__name__}); using 'ieee'")
        CONFIG.dot_precision = "ieee"
        spec = replace(spec, precision="ieee")
        kernel[grid](*args, **spec.constexprs())
        return spec


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
        if n > 0:
            if spec.dk_mode == 3 or spec.dv_mode == 3:
                dk, dv = _preactivation_views(spec, _preactivation(rbf, wk, bk, wv, bv, spec.precision))
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
        grads = _fused_backward(spec, layout, saved, needs, ctx.weight_nodes, grad_m.contiguous(), grad_u.contiguous())
        return (None, None, None) + grads


def _or(t, default):
    return default if t is None else t


def _stacked(wk, wv, key, value) -> torch.Tensor:
    """[key; value] for the filters present (W_k / W_v not None): ``_stacked(wk, wv, wk, wv)``
    is [W_k; W_v] [C, K], ``_stacked(wk, wv, bk, bv)`` is [b_k; b_v] [C]; C = F (keys) + 3F (values)."""
    parts = [x for w, x in ((wk, key), (wv, value)) if w is not None]
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).contiguous()


#: tl.dot input precisions the Triton interpreter accepts; it multiplies in numpy whatever the
#: precision, so the others ('bf16x3', 'bf16x6') run there as 'ieee'
_INTERPRETER_PRECISIONS = ("ieee", "tf32", "tf32x3")


def _dot_precision(dtype, precision: Optional[str] = None) -> str:
    """tl.dot input precision: ``precision`` (default: ``CONFIG.dot_precision``, 'auto' = the
    built-in default) for float32, a multiply-sum for float64."""
    if dtype == torch.float64:
        return "fma"
    if precision is None or precision == "auto":
        precision = CONFIG.dot_precision if CONFIG.dot_precision != "auto" else "tf32x3"
    if precision not in _INTERPRETER_PRECISIONS and interpreted():
        return "ieee"
    return precision


def _gemm_tiles(dtype):
    """(rows, columns) of a filter-product tile: float64 multiplies and sums in registers
    (no float64 tensor-core path here), so its tiles are smaller."""
    return (32, 32) if dtype == torch.float64 else (64, 128)


def _preactivation(rbf, wk, bk, wv, bv, precision: Optional[str] = None) -> torch.Tensor:
    """z = rbf [W_k; W_v]^T + [b_k; b_v]: [E, C], C = F (keys) + 3F (values), by one Triton
    kernel with float32 accuracy on tensor cores (``_filter_preact_kernel``; tf32x3 where
    cuBLAS without TF32 runs plain FMA, ~1.5x slower here)."""
    weight, bias = _stacked(wk, wv, wk, wv), _stacked(wk, wv, bk, bv)
    e, k = rbf.shape
    c = weight.shape[0]
    z = torch.empty(e, c, dtype=rbf.dtype, device=rbf.device)
    if e == 0:
        return z
    bm, bn = _gemm_tiles(rbf.dtype)
    kernels._filter_preact_kernel[(triton.cdiv(e, bm), triton.cdiv(c, bn))](
        rbf.contiguous(), weight, bias, z, e, c, K=k, KP=max(16, _pow2(k)), BM=bm, BN=bn,
        PREC=_dot_precision(rbf.dtype, precision), num_warps=4)
    return z


def _rbf_gradient(gz, wk, wv, mask, precision: Optional[str] = None) -> torch.Tensor:
    """dL/drbf = dL/dz [W_k; W_v] ([E, C] x [C, K]), rows with mask False set to 0 (one Triton
    kernel, float32 accuracy; reference: ``torch.where(mask, gz @ W, 0)``)."""
    weight = _stacked(wk, wv, wk, wv)
    e, c = gz.shape
    k = weight.shape[1]
    grbf = torch.empty(e, k, dtype=gz.dtype, device=gz.device)
    if e == 0:
        return grbf
    bm, bn = _gemm_tiles(gz.dtype)
    kernels._filter_rbf_grad_kernel[(triton.cdiv(e, bm),)](
        gz, weight, mask if mask is not None else gz, grbf, e, c, K=k, KP=max(16, _pow2(k)), BM=bm, BN=min(bn, 64),
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


def _fused_backward(spec: _Spec, layout: EdgeLayout, saved, needs, weight_nodes, grad_m, grad_u):
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
        z = _preactivation(rbf, wk, bk, wv, bv, spec.precision)  # recomputed: not kept from the forward (memory)
        dk, dv = _preactivation_views(spec, z)
    tensors = (q, k, v, vec, _or(dk, dummy), _or(dv, dummy), _or(rbf, dummy), _or(wk, dummy), _or(bk, dummy),
               _or(wv, dummy), _or(bv, dummy), phi, unit, _or(mask, dummy), _or(dk0, dummy), _or(dv0, dummy),
               _or(phi0, dummy))

    def sender_side():
        gk, gv, gvec = torch.empty_like(k), torch.empty_like(v), torch.empty_like(vec)
        if n > 0:
            colptr, colend, perm = layout.sender_order()
            _launch(
                kernels._message_bwd_sender_kernel, spec.grid(n, q.device), spec,
                colptr, colend, perm, layout.receivers, *tensors, grad_m, grad_u, gk, gv, gvec, n,
            )
        out["k"], out["v"], out["vec"] = gk, gv, gvec

    if need_sender and gemm and not merged:  # before the receiver side, which overwrites z with dL/dz
        sender_side()
    if need_receiver and n > 0:
        new = lambda *shape: torch.empty(*shape, dtype=q.dtype, device=q.device)  # noqa: E731
        uses_rbf = spec.dk_mode == 2 or spec.dv_mode == 2
        width = (spec.num_rbf if uses_rbf else 0) + 4
        # per-edge outputs: rows the kernels skip (trailing masked rows) must read 0
        new_edge = (lambda *shape: torch.zeros(*shape, dtype=q.dtype, device=q.device)) if spec.has_mask else new
        gq = new(n, f)
        gedge = new_edge(spec.chunks, e, width)  # per chunk: dL/drbf [K], dL/dphi, dL/dd [3]
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
        k0 = width - 4
        gphi, gunit = gedge[:, k0], gedge[:, k0 + 1:]
        grbf = gedge[:, :k0] if uses_rbf else None
        out["q"], out["phi"], out["unit"] = gq, gphi, gunit
        if spec.dk_mode == 1:
            out["dk"] = gdk
        if spec.dv_mode == 1:
            out["dv"] = gdv
        if uses_rbf:
            out["rbf"] = grbf
        if gemm:
            _gemm_filter_gradients(spec, z, mask, rbf, wk, wv, bk, bv, need, weights_wanted, out)
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
        if gemm:
            out["rbf"] = torch.zeros_like(rbf)
    if need_sender and not gemm and not merged:
        sender_side()
    return tuple(out[name] if need[name] else None for name in _NAMES)


def _gemm_filter_gradients(spec, gz, mask, rbf, wk, wv, bk, bv, need, weights_wanted, out):
    """Filter gradients from dL/dz [E, F + 3F] (written by the receiver kernel over z): dL/drbf =
    dL/dz [W_k; W_v], dL/dW = dL/dz^T rbf, dL/db = sum_e dL/dz. Trailing masked rows the kernel
    skipped still hold z: they are zeroed (per row of dL/drbf, or in dL/dz for the weights)."""
    f = spec.heads * spec.head_dim
    if need["rbf"]:
        out["rbf"] = _rbf_gradient(gz, wk, wv, mask, spec.precision)
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
        CONFIG.dot_precision = "ieee"
        kernel[grid](*args, **replace(spec, precision="ieee").constexprs(), **extra)


# ---------------------------------------------------------------------------------- entry points
class FusedMessage:
    """The fused message function for one model forward pass (see the module docstring).

    ``FusedMessage()(q, k, v, vec, dk, dv, ...)`` has the signature of
    :func:`torchmdx.kernels.message_ref.et_message`; :meth:`filtered` takes the RBF rows and
    filter weights instead of dk / dv. The edge layout of the last ``edge_index`` seen is kept
    (same tensor object, unchanged version), so the layers of one forward pass share it.
    Create a new object per forward pass: a kept layout is not refreshed when a CUDA graph
    replay rewrites ``edge_index`` in place.

    ``symmetric=True`` declares that the edge list is symmetric: every edge (i <- j) has a
    reverse edge (j <- i) with the same filters (rbf, or the given dk / dv), cutoff weight and
    mask, and the opposite unit vector. A full neighbor list with distance-only filters is (the
    ET model's lists). The backward may then take the sender side from the reverse edges
    (``CONFIG.sender_side``); on a list that is not symmetric that would be wrong.
    """

    def __init__(self, symmetric: bool = False):
        self._layout: Optional[EdgeLayout] = None
        self.symmetric = bool(symmetric)

    def layout(self, edge_index: torch.Tensor, num_nodes: int, mask: Optional[torch.Tensor] = None) -> EdgeLayout:
        if self._layout is None or not self._layout.matches(edge_index, num_nodes, mask):
            self._layout = EdgeLayout(edge_index, num_nodes, mask)
        return self._layout

    def __call__(self, q, k, v, vec, dk, dv, cutoff_weight, unit_vectors, edge_index, num_heads, *,
                 edge_mask=None, self_loop=None, attn_activation="silu", vector_cutoff=False):
        return self._run(q, k, v, vec, dk, dv, None, None, None, None, None, "silu", cutoff_weight, unit_vectors,
                         edge_index, num_heads, edge_mask, self_loop, attn_activation, vector_cutoff)

    def filtered(self, q, k, v, vec, rbf, dk_weight, dk_bias, dv_weight, dv_bias, cutoff_weight, unit_vectors,
                 edge_index, num_heads, *, filter_activation="silu", edge_mask=None, self_loop=None,
                 attn_activation="silu", vector_cutoff=False):
        return self._run(q, k, v, vec, None, None, rbf, dk_weight, dk_bias, dv_weight, dv_bias, filter_activation,
                         cutoff_weight, unit_vectors, edge_index, num_heads, edge_mask, self_loop, attn_activation,
                         vector_cutoff)

    def _run(self, q, k, v, vec, dk, dv, rbf, wk, bk, wv, bv, filter_activation, phi, unit, edge_index, num_heads,
             edge_mask, self_loop, attn_activation, vector_cutoff):
        filtered = rbf is not None
        dk0 = dv0 = phi0 = None
        if self_loop is not None:
            dk0, dv0, phi0 = self_loop
            if not torch.is_tensor(phi0):
                phi0 = torch.tensor(float(phi0), dtype=q.dtype, device=q.device)
        n, f = q.shape
        others = [t for t in (k, v, vec, dk, dv, rbf, wk, bk, wv, bv, phi, unit, dk0, dv0, phi0) if t is not None]
        fallback = (
            not supported(q)
            or any(t.dtype != q.dtype or t.device != q.device for t in others)
            or attn_activation not in ACTIVATION_CODES
            or (filtered and filter_activation not in ACTIVATION_CODES)
            or f % num_heads != 0
            or (phi0 is not None and phi0.requires_grad)
        )
        if fallback:
            kwargs = dict(edge_mask=edge_mask, self_loop=self_loop, attn_activation=attn_activation,
                          vector_cutoff=vector_cutoff)
            if filtered:
                return reference_filtered(q, k, v, vec, rbf, wk, bk, wv, bv, phi, unit, edge_index, num_heads,
                                          filter_activation=filter_activation, **kwargs)
            return message_ref.et_message(q, k, v, vec, dk, dv, phi, unit, edge_index, num_heads, **kwargs)
        head_dim = f // num_heads
        if CONFIG.sender_side not in SENDER_SIDES:
            raise ValueError(f"message_triton.CONFIG.sender_side must be one of {SENDER_SIDES}, "
                             f"not {CONFIG.sender_side!r}")
        if CONFIG.filters not in FILTER_PLACES:
            raise ValueError(f"message_triton.CONFIG.filters must be one of {FILTER_PLACES}, not {CONFIG.filters!r}")
        cfg = resolved_config(n, _gpu_name(q.device))
        LAST_CONFIG.clear()
        LAST_CONFIG.update(vars(cfg))
        merged = self.symmetric and cfg.sender_side == "merged"
        if filtered:
            mode = 2 if cfg.filters == "kernel" else 3
            dk_mode = mode if wk is not None else 0
            dv_mode = mode if wv is not None else 0
            num_rbf = rbf.shape[-1]
            if bk is None and wk is not None:
                bk_t = torch.zeros(f, dtype=q.dtype, device=q.device)
            else:
                bk_t = bk
            if bv is None and wv is not None:
                bv_t = torch.zeros(3 * f, dtype=q.dtype, device=q.device)
            else:
                bv_t = bv
            bk, bv = bk_t, bv_t
        else:
            dk_mode = 1 if dk is not None else 0
            dv_mode = 1 if dv is not None else 0
            num_rbf = 1
        mask = edge_mask.view(torch.uint8) if edge_mask is not None and edge_mask.dtype == torch.bool else edge_mask
        spec = _make_spec(q.dtype, num_heads, head_dim, num_rbf, dk_mode, dv_mode, mask is not None,
                          self_loop is not None, dk0 is not None, dv0 is not None, bool(vector_cutoff),
                          attn_activation, filter_activation, merged, cfg)
        layout = self.layout(edge_index, n, edge_mask)
        tensors = [q, k, v, vec, dk, dv, rbf, wk, bk, wv, bv, phi, unit, mask, dk0, dv0, phi0]
        tensors = [t.contiguous() if t is not None else None for t in tensors]
        # grad mode is off inside Function.forward: find the weights' gradient nodes here
        weight_nodes = [_grad_node(t) for t in (wk, bk, wv, bv)] if torch.is_grad_enabled() else [None] * 4
        return _FusedMessageFunction.apply(spec, layout, weight_nodes, *tensors)


def et_message(q, k, v, vec, dk, dv, cutoff_weight, unit_vectors, edge_index, num_heads, *,
               edge_mask=None, self_loop=None, attn_activation="silu", vector_cutoff=False, symmetric=False):
    """Fused drop-in for :func:`torchmdx.kernels.message_ref.et_message` (same arguments;
    ``symmetric``: see :class:`FusedMessage`)."""
    return FusedMessage(symmetric)(q, k, v, vec, dk, dv, cutoff_weight, unit_vectors, edge_index, num_heads,
                                   edge_mask=edge_mask, self_loop=self_loop, attn_activation=attn_activation,
                                   vector_cutoff=vector_cutoff)


def et_message_filtered(q, k, v, vec, rbf, dk_weight, dk_bias, dv_weight, dv_bias, cutoff_weight, unit_vectors,
                        edge_index, num_heads, *, filter_activation="silu", edge_mask=None, self_loop=None,
                        attn_activation="silu", vector_cutoff=False, symmetric=False):
    """Fused message with the radial filters computed in the kernels (see the module docstring).

    rbf [E, K]; dk_weight [F, K] and dk_bias [F] (or None: no key filter); dv_weight [3F, K]
    and dv_bias [3F] (or None); ``filter_activation`` act_f. Other arguments as
    :func:`et_message`.
    """
    return FusedMessage(symmetric).filtered(q, k, v, vec, rbf, dk_weight, dk_bias, dv_weight, dv_bias,
                                            cutoff_weight, unit_vectors, edge_index, num_heads,
                                            filter_activation=filter_activation, edge_mask=edge_mask,
                                            self_loop=self_loop, attn_activation=attn_activation,
                                            vector_cutoff=vector_cutoff)
