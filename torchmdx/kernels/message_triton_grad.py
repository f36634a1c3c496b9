"""The gradient side of the fused message (:mod:`torchmdx.kernels.message_triton`) that needs no
kernel launch: which weight gradients the running backward must produce (autograd engine
queries), and the torch reference behind the fallback and the second derivatives.

Gradients and their limits
--------------------------
First derivatives w.r.t. every tensor input are produced by the Triton backward (forces need
q, k, v, vec, rbf / dk / dv, phi and the unit vectors). Weight gradients (W_k, b_k, W_v, b_v,
dk0, dv0) are computed only when requested; for W and b the backward asks the autograd engine
whether their nodes will run (``torch._C._will_engine_execute_node``; a force evaluation by
``torch.autograd.grad(E, pos)`` does not need them, ``loss.backward()`` does). The self-loop
cutoff phi0 is a constant (cos(0) = 1); its gradient is not produced (the call falls back to
the reference when phi0 requires grad).

Second derivatives (training on forces: ``create_graph=True``): when the backward runs with
grad mode on, it recomputes the message with the torch reference on the saved inputs and
differentiates that with ``create_graph=True``, so double backward is exact but costs what the
reference costs. Force evaluation (``create_graph=False``) never touches the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as torch_functional

from torchmdx.kernels import message_ref
from torchmdx.kernels.filter_table import FilterTable
from torchmdx.kernels.message_triton_spec import _Spec


def _engine_needs(node) -> bool:
    """Will the running backward pass execute ``node`` (a weight's gradient accumulator)?"""
    if node is None:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):  # API absent, or asked for a leaf inside autograd.grad
        return True


def _grad_node(t: Optional[torch.Tensor]):
    if t is None or not t.requires_grad:
        return None
    try:
        from torch.autograd.graph import _get_grad_fn_or_grad_acc

        return _get_grad_fn_or_grad_acc(t)
    except (ImportError, AttributeError, RuntimeError):
        return None


def reference_filtered(
    q, k, v, vec, rbf, dk_weight, dk_bias, dv_weight, dv_bias, cutoff_weight, unit_vectors, edge_index, num_heads,
    *, filter_activation="silu", edge_mask=None, self_loop=None, attn_activation="silu", vector_cutoff=False,
):
    """Torch reference of :func:`et_message_filtered`: dk = act_f(rbf W_k^T + b_k) etc., then
    :func:`torchmdx.kernels.message_ref.et_message`."""
    act = message_ref.ACTIVATIONS[filter_activation]
    dk = act(torch_functional.linear(rbf, dk_weight, dk_bias)) if dk_weight is not None else None
    dv = act(torch_functional.linear(rbf, dv_weight, dv_bias)) if dv_weight is not None else None
    return message_ref.et_message(
        q, k, v, vec, dk, dv, cutoff_weight, unit_vectors, edge_index, num_heads, edge_mask=edge_mask,
        self_loop=self_loop, attn_activation=attn_activation, vector_cutoff=vector_cutoff,
    )


def reference_tabulated(q, k, v, vec, r, key_table, value_table, cutoff_weight, unit_vectors, edge_index, num_heads,
                        *, edge_mask=None, self_loop=None, attn_activation="silu", vector_cutoff=False):
    """Torch reference of :meth:`FusedMessage.tabulated`: dk = key_table(r), dv = value_table(r)
    (:meth:`~torchmdx.kernels.filter_table.FilterTable.lookup`), then
    :func:`torchmdx.kernels.message_ref.et_message`."""
    dk = key_table.lookup(r) if key_table is not None else None
    dv = value_table.lookup(r) if value_table is not None else None
    return message_ref.et_message(
        q, k, v, vec, dk, dv, cutoff_weight, unit_vectors, edge_index, num_heads, edge_mask=edge_mask,
        self_loop=self_loop, attn_activation=attn_activation, vector_cutoff=vector_cutoff,
    )


def _reference_from_saved(spec: _Spec, edge_index, t):
    (q, k, v, vec, dk, dv, rbf, wk, bk, wv, bv, phi, unit, mask, dk0, dv0, phi0) = t
    self_loop = (dk0, dv0, phi0) if spec.self_loop else None
    kwargs = dict(edge_mask=mask.bool() if mask is not None else None, self_loop=self_loop,
                  attn_activation=spec.attn_activation, vector_cutoff=spec.vector_cutoff)
    if spec.dk_mode == 4 or spec.dv_mode == 4:  # the tables' coefficients in the weights' slots
        tables = [FilterTable(c, spec.table_r_min, spec.table_r_min + spec.table_intervals / spec.table_inverse_step)
                  if c is not None else None for c in (wk, wv)]
        return reference_tabulated(q, k, v, vec, rbf, *tables, phi, unit, edge_index, spec.heads, **kwargs)
    if spec.dk_mode in (2, 3) or spec.dv_mode in (2, 3):
        return reference_filtered(q, k, v, vec, rbf, wk, bk, wv, bv, phi, unit, edge_index, spec.heads,
                                  filter_activation=spec.filter_activation, **kwargs)
    return message_ref.et_message(q, k, v, vec, dk, dv, phi, unit, edge_index, spec.heads, **kwargs)


def _reference_backward(spec, edge_index, saved, needs, grad_m, grad_u):
    """Differentiable backward: the reference on fresh views of the inputs, differentiated with
    create_graph=True. The views matter: inputs may depend on each other (q on rbf through
    earlier layers, dk0 on W_k), and gradients w.r.t. the tensors themselves would also follow
    those outer paths, which the outer backward already takes (double counting)."""
    wrt = [idx for idx, (t, need) in enumerate(zip(saved, needs)) if need and t is not None]
    out = [None] * len(saved)
    if not wrt:
        return tuple(out)
    with torch.enable_grad():
        inputs = list(saved)
        for idx in wrt:
            inputs[idx] = saved[idx].view_as(saved[idx])
        m, u = _reference_from_saved(spec, edge_index, inputs)
        grads = torch.autograd.grad((m, u), [inputs[idx] for idx in wrt], (grad_m, grad_u),
                                    create_graph=True, allow_unused=True)
    for idx, g in zip(wrt, grads):
        out[idx] = g
    return tuple(out)
