"""The fused message step in table mode as ``torch.library`` custom operators, for traced graphs.

:class:`torchmdx.nn.traced.TracedForces` traces a model's energy and forces with ``make_fx`` into one
graph of aten operations that inductor compiles. Traced as Python, the fused Triton message step
(:class:`~torchmdx.kernels.message_triton.FusedMessage`) cannot enter such a graph (its autograd
function, its launches and its cached layout are not aten operations), so the traced graph has
always run the torch reference message, which inductor turns into many small reductions. Here the
inference form of the step, filters interpolated from tables (:meth:`FusedMessage.tabulated`,
mode 4), is two opaque operators that ``make_fx`` records as single nodes and inductor calls as
extern kernels, fusing everything around them:

- ``torchmdx::et_message_table`` (:func:`et_message_table`): (m [N, F], u [N, 3, F]) of one layer,
  the fused forward kernel (one launch per layer).
- ``torchmdx::et_message_table_backward`` (:func:`et_message_table_backward`): the first backward,
  the fused backward kernels called directly (``message_triton_autograd._fused_backward``: one or
  two launches per layer, no recomputed forward), returning dL/dq, dL/dk, dL/dv, dL/dvec, the
  per-edge buffer [E, 5] = (dL/dr, dL/dphi, dL/dd) whole (the graph slices it, so its columns
  need no copies), and dL/ddk0, dL/ddv0 of the self edge where asked for.

``register_autograd`` ties them (forces: ``torch.autograd.grad(E, pos)`` through the forward
op calls the backward op). The backward op has no derivative of its own: a second derivative
(training on forces, ``create_graph=True``) is refused, and so are gradients w.r.t. the tables or
the self edge's cutoff phi0 (frozen inference only; training keeps its own paths).

Arguments: tensors (``q`` [N, F], ``k`` [N, F], ``v`` [N, 3F], ``vec`` [N, 3, F], ``r`` [E] edge
lengths, the key / value tables' coefficients [G, 4, F] / [G, 4, 3F] or None, ``phi`` [E],
``unit`` [E, 3], ``edge_index`` [2, E] sorted by receiver, the receiver segments ``rowptr``
[N + 1] and ``rowend`` [N] (:func:`segments`), ``edge_mask`` [E] bool or None, the self edge's
``dk0`` [F], ``dv0`` [3F] and ``phi0`` [] or None), then plain values: ``heads``, the tables'
grid ``r_min`` / ``r_max`` (Å), ``attn_activation``, ``vector_cutoff`` and ``symmetric`` (the
edge list is symmetric, as the ET's full lists are: the backward may take the sender side from
the reverse edges). The operators are pure functions of these: the segments are inputs (one
``searchsorted`` pass per graph, shared by all layers, instead of one per operator call), and
the launch configuration is resolved at each call, as an eager call does
(``message_triton.CONFIG``, the launch table). Where the kernels cannot run (a CPU without the
Triton interpreter, other dtypes) the operators compute the torch reference of the same tables,
so a traced graph with them is correct everywhere (and tested on the CPU).

:class:`TableMessage` is the message object a model uses while it is traced with the operators:
its :meth:`TableMessage.tabulated` has the signature of :meth:`FusedMessage.tabulated`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from torchmdx.kernels.filter_table import FilterTable
from torchmdx.kernels.message_triton_spec import EdgeLayout, segment_ends

#: the operators' names (``torch.ops.torchmdx.<name>``)
FORWARD = "torchmdx::et_message_table"
BACKWARD = "torchmdx::et_message_table_backward"


def segments(edge_index: Tensor, num_nodes: int, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(rowptr [N + 1], rowend [N]) of an edge list sorted by receiver: the receiver segments of
    :class:`~torchmdx.kernels.message_triton_spec.EdgeLayout` (same numbers), as functional torch
    operations that a trace records once per graph (:func:`~torchmdx.kernels.message_triton_spec.segment_ends`
    in its traced form: no ``out=``, and ``rowend`` a fresh tensor, never a view of ``rowptr``)."""
    receivers = edge_index[0].contiguous()
    nodes = torch.arange(num_nodes + 1, device=edge_index.device, dtype=edge_index.dtype)
    rowptr = torch.searchsorted(receivers, nodes)
    return rowptr, segment_ends(rowptr, receivers, mask, traced=True)


def _call(q, k, v, vec, r, key_coefficients, value_coefficients, phi, unit, edge_index, rowptr, rowend, edge_mask, dk0,
          dv0, phi0, heads, r_min, r_max, attn_activation, vector_cutoff, symmetric):
    """(fused message object, its argument tuple, its launch plan or None for the reference)."""
    from torchmdx.kernels.message_triton import FusedMessage

    fused = FusedMessage(symmetric=symmetric)
    tables = None
    if key_coefficients is not None or value_coefficients is not None:
        tables = tuple(FilterTable(c, r_min, r_max) if c is not None else None
                       for c in (key_coefficients, value_coefficients))
    self_loop = (dk0, dv0, phi0) if phi0 is not None else None
    args = (q, k, v, vec, None, None, r if tables is not None else None, None, None, None, None, "silu", phi, unit,
            edge_index, heads, edge_mask, self_loop, attn_activation, vector_cutoff, tables)
    layout = EdgeLayout.from_segments(edge_index, q.shape[0], edge_mask, rowptr, rowend)
    return fused, args, fused._plan(*args, layout=layout)


@torch.library.custom_op(FORWARD, mutates_args=())
def et_message_table(q: Tensor, k: Tensor, v: Tensor, vec: Tensor, r: Tensor, key_coefficients: Optional[Tensor],
                     value_coefficients: Optional[Tensor], phi: Tensor, unit: Tensor, edge_index: Tensor, rowptr: Tensor,
                     rowend: Tensor, edge_mask: Optional[Tensor], dk0: Optional[Tensor], dv0: Optional[Tensor],
                     phi0: Optional[Tensor], heads: int, r_min: float, r_max: float, attn_activation: str,
                     vector_cutoff: bool, symmetric: bool) -> tuple[Tensor, Tensor]:
    """(m [N, F], u [N, 3, F]): :meth:`FusedMessage.tabulated` of one layer (module docstring)."""
    from torchmdx.kernels.message_triton import _FusedMessageFunction

    fused, args, plan = _call(q, k, v, vec, r, key_coefficients, value_coefficients, phi, unit, edge_index, rowptr,
                              rowend, edge_mask, dk0, dv0, phi0, heads, r_min, r_max, attn_activation, vector_cutoff,
                              symmetric)
    with torch.no_grad():
        if plan is None:
            return tuple(t.contiguous().clone() for t in fused._reference(*args))
        spec, layout, _, tensors = plan
        return _FusedMessageFunction.apply(spec, layout, [None] * 4, *tensors)


@et_message_table.register_fake
def _et_message_table_fake(q, k, v, vec, r, key_coefficients, value_coefficients, phi, unit, edge_index, rowptr, rowend,
                           edge_mask, dk0, dv0, phi0, heads, r_min, r_max, attn_activation, vector_cutoff, symmetric):
    n, f = q.shape
    return q.new_empty(n, f), q.new_empty(n, 3, f)


#: width of the per-edge gradient buffer the backward operator returns: dL/dr, dL/dphi, dL/dd [3]
EDGE_COLUMNS = 5


@torch.library.custom_op(BACKWARD, mutates_args=())
def et_message_table_backward(grad_m: Tensor, grad_u: Tensor, q: Tensor, k: Tensor, v: Tensor, vec: Tensor, r: Tensor,
                              key_coefficients: Optional[Tensor], value_coefficients: Optional[Tensor], phi: Tensor,
                              unit: Tensor, edge_index: Tensor, rowptr: Tensor, rowend: Tensor,
                              edge_mask: Optional[Tensor], dk0: Optional[Tensor], dv0: Optional[Tensor],
                              phi0: Optional[Tensor], heads: int, r_min: float, r_max: float, attn_activation: str,
                              vector_cutoff: bool, symmetric: bool,
                              self_filters: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dL/dq, dL/dk, dL/dv, dL/dvec, per-edge [E, 5] = (dL/dr, dL/dphi, dL/dd), dL/ddk0, dL/ddv0) for the
    output gradients ``grad_m``, ``grad_u``; dL/ddk0 and dL/ddv0 only with ``self_filters`` (else
    empty [0])."""
    from torchmdx.kernels.message_triton_autograd import _NAMES, _fused_backward

    fused, args, plan = _call(q, k, v, vec, r, key_coefficients, value_coefficients, phi, unit, edge_index, rowptr,
                              rowend, edge_mask, dk0, dv0, phi0, heads, r_min, r_max, attn_activation, vector_cutoff,
                              symmetric)
    wanted = {"q", "k", "v", "vec", "rbf", "phi", "unit"} | ({"dk0", "dv0"} if self_filters else set())
    if plan is None:
        grads = _reference_backward(fused, args, grad_m, grad_u, self_filters)
    else:
        spec, layout, _, tensors = plan
        needs = tuple(name in wanted and tensors[idx] is not None for idx, name in enumerate(_NAMES))
        buffers: list = []
        out = dict(zip(_NAMES, _fused_backward(spec, layout, tensors, needs, [None] * 4, grad_m.contiguous(),
                                               grad_u.contiguous(), None, buffers)))
        edge = _edge_gradients(buffers[0] if buffers else None, phi, spec.dk_mode == 4 or spec.dv_mode == 4)
        grads = (out["q"], out["k"], out["v"], out["vec"], edge, out["dk0"], out["dv0"])
    return (*grads[:5], *(g if self_filters and g is not None else q.new_empty(0) for g in grads[5:]))


def _edge_gradients(buffer: Optional[Tensor], phi: Tensor, has_r: bool) -> Tensor:
    """The kernels' per-edge buffer as [E, 5] (dL/dr, dL/dphi, dL/dd): zeros for no atoms, a zero
    dL/dr column where no table was read (no distance influence)."""
    if buffer is None:
        return phi.new_zeros(phi.shape[0], EDGE_COLUMNS)
    return buffer if has_r else torch.cat([buffer.new_zeros(buffer.shape[0], 1), buffer], dim=1)


def _autograd_dispatch():
    """A context in which autograd records again inside an operator's implementation: the custom
    operator runs its implementation below the autograd dispatch keys (excluded in the thread's
    dispatch state), so the reference fallback's ``autograd.grad`` would see no graph. This puts
    the exclusion set back without the autograd keys for the context's duration."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for name in ("AutogradFunctionality", "ADInplaceOrView"):
        key = getattr(torch._C.DispatchKey, name, None)
        if key is not None:
            excluded = excluded.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded)


def _reference_backward(fused, args, grad_m, grad_u, self_filters: bool):
    """The gradients of the torch reference (the operators' fallback), by autograd."""
    args = list(args)
    q, k, v, vec, phi, unit = (args[i].detach().requires_grad_(True) for i in (0, 1, 2, 3, 12, 13))
    r = args[6].detach().requires_grad_(True) if args[6] is not None else None
    args[0:4], args[12:14], args[6] = [q, k, v, vec], [phi, unit], r
    leaves = [q, k, v, vec, r, phi, unit]
    if args[17] is not None:  # self_loop
        dk0, dv0, phi0 = args[17]
        if self_filters:
            dk0, dv0 = (t.detach().requires_grad_(True) if t is not None else None for t in (dk0, dv0))
        args[17] = (dk0, dv0, phi0)
        leaves += [dk0, dv0]
    else:
        leaves += [None, None]
    with _autograd_dispatch(), torch.enable_grad():
        m, u = fused._reference(*args)
        wrt = [t for t in leaves if t is not None and t.requires_grad]
        found = dict(zip(map(id, wrt), torch.autograd.grad((m, u), wrt, (grad_m, grad_u), allow_unused=True)))
    grads = [found.get(id(t)) if t is not None else None for t in leaves]
    grads = [torch.zeros_like(t) if g is None and t is not None else g for g, t in zip(grads, leaves)]
    grads = [g.contiguous().clone() if g is not None else None for g in grads]
    g_r = grads[4] if grads[4] is not None else phi.new_zeros(phi.shape[0])
    edge = torch.cat([g_r[:, None], grads[5][:, None], grads[6]], dim=1)
    return (*grads[:4], edge, grads[7], grads[8])


@et_message_table_backward.register_fake
def _et_message_table_backward_fake(grad_m, grad_u, q, k, v, vec, r, key_coefficients, value_coefficients, phi, unit,
                                    edge_index, rowptr, rowend, edge_mask, dk0, dv0, phi0, heads, r_min, r_max,
                                    attn_activation, vector_cutoff, symmetric, self_filters):
    def like(t):
        return q.new_empty(t.shape) if self_filters and t is not None else q.new_empty(0)

    return (q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape), q.new_empty(vec.shape),
            q.new_empty(phi.shape[0], EDGE_COLUMNS), like(dk0), like(dv0))


# ------------------------------------------------------------------------------------ autograd
#: positions of the forward operator's tensor inputs
_Q, _K, _V, _VEC, _R, _KEYS, _VALUES, _PHI, _UNIT, _EDGES, _ROWPTR, _ROWEND, _MASK, _DK0, _DV0, _PHI0 = range(16)
_TENSORS = 16


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:_TENSORS])
    ctx.constants = tuple(inputs[_TENSORS:])


def _backward(ctx, grad_m, grad_u):
    needs = ctx.needs_input_grad
    refused = [name for name, idx in (("key table", _KEYS), ("value table", _VALUES), ("phi0", _PHI0)) if needs[idx]]
    if refused:
        raise NotImplementedError(f"{FORWARD}: no gradient w.r.t. {', '.join(refused)} (inference only: frozen "
                                  "filter tables; use FusedMessage.filtered for trainable filters)")
    saved = ctx.saved_tensors
    q = saved[_Q]
    grad_m = grad_m.contiguous() if grad_m is not None else torch.zeros_like(q)  # (in the graph: see tabulated)
    grad_u = grad_u.contiguous() if grad_u is not None else q.new_zeros(saved[_VEC].shape)
    self_filters = bool(needs[_DK0] or needs[_DV0])
    gq, gk, gv, gvec, edge, gdk0, gdv0 = torch.ops.torchmdx.et_message_table_backward(
        grad_m, grad_u, *saved, *ctx.constants, self_filters)
    grads = [None] * (_TENSORS + len(ctx.constants))
    grads[_Q], grads[_K], grads[_V], grads[_VEC] = gq, gk, gv, gvec
    grads[_R], grads[_PHI], grads[_UNIT] = edge[:, 0], edge[:, 1], edge[:, 2:]
    if needs[_DK0]:
        grads[_DK0] = gdk0
    if needs[_DV0]:
        grads[_DV0] = gdv0
    return tuple(grads)


et_message_table.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------ model hook
class TableMessage:
    """The message function of a model traced with the operators (one per traced forward pass):
    :meth:`tabulated` as :meth:`FusedMessage.tabulated`, computed by ``torchmdx::et_message_table``.
    The receiver segments of the last ``edge_index`` / mask seen (the same tensors in every layer)
    are made once (:func:`segments`)."""

    filtered = None  # no trainable-filter form: a model calls tabulated()

    def __init__(self, symmetric: bool = True):
        self.symmetric = bool(symmetric)
        self._segments = None

    def segments(self, edge_index: Tensor, num_nodes: int, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        key = (id(edge_index), num_nodes, id(mask))
        if self._segments is None or self._segments[0] != key:
            self._segments = (key, segments(edge_index, num_nodes, mask), edge_index, mask)  # (keeps the tensors alive)
        return self._segments[1]

    def tabulated(self, q, k, v, vec, r, key_table, value_table, cutoff_weight, unit_vectors, edge_index, num_heads,
                  *, edge_mask=None, self_loop=None, attn_activation="silu", vector_cutoff=False):
        tables = [t for t in (key_table, value_table) if t is not None]
        if len(tables) == 2 and (tables[0].r_min, tables[0].r_max, tables[0].intervals) != (
                tables[1].r_min, tables[1].r_max, tables[1].intervals):
            raise ValueError("the key and value filter tables must share one grid (intervals, r_min, r_max)")
        r_min, r_max = (tables[0].r_min, tables[0].r_max) if tables else (0.0, 1.0)
        dk0 = dv0 = phi0 = None
        if self_loop is not None:
            dk0, dv0, phi0 = self_loop
            if not torch.is_tensor(phi0):
                phi0 = torch.tensor(float(phi0), dtype=q.dtype, device=q.device)
        rowptr, rowend = self.segments(edge_index, q.shape[0], edge_mask)
        # contiguous here, in the graph, where inductor writes them so (q, k and v are views of one
        # product): the operators would otherwise copy each of them in the forward and the backward
        q, k, v, vec, r, cutoff_weight, unit_vectors = (t.contiguous() for t in (q, k, v, vec, r, cutoff_weight,
                                                                                 unit_vectors))
        return torch.ops.torchmdx.et_message_table(
            q, k, v, vec, r, key_table.coefficients if key_table is not None else None,
            value_table.coefficients if value_table is not None else None, cutoff_weight, unit_vectors, edge_index,
            rowptr, rowend, edge_mask, dk0, dv0, phi0, int(num_heads), float(r_min), float(r_max), attn_activation,
            bool(vector_cutoff), self.symmetric)
