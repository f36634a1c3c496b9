"""Reference (plain torch) message + aggregation of one equivariant-transformer (ET) layer.

This is the function a fused Triton kernel replaces (same signature, same results); the ET
layer in :mod:`torchmdx.nn.et` calls it through :func:`torchmdx.nn.et.message_function`.

Shapes: N atoms, E edges, F channels split into H heads of D = F / H channels.
Edge e = (i <- j): ``edge_index[0, e] = i`` receives, ``edge_index[1, e] = j`` sends; edges are
sorted by ``i`` (segments), as every torchmdx neighbor list is.

Inputs (all in the model's dtype):

    q, k          [N, F]     query and key of every atom
    v             [N, 3F]    values, laid out per head as [s1 | s2 | s3] (3 blocks of D)
    vec           [N, 3, F]  vector features
    dk            [E, F]     distance filter of the keys, act(W_k e(r_ij))   (None: 1)
    dv            [E, 3F]    distance filter of the values, act(W_v e(r_ij)) (None: 1)
    cutoff_weight [E]        cosine cutoff phi(r_ij), 0 on invalid (masked / out-of-range) edges
    unit_vectors  [E, 3]     d_ij = (pos_j - pos_i + shift) / r_ij  (0 on invalid edges)
    edge_mask     [E] bool   valid edges (None: all); invalid edges contribute nothing at all

Equations, per edge e = (i <- j) and head h (channels c of that head):

    a_e      = act_attn( sum_c q[i,c] k[j,c] dk[e,c] )                     (one number per head)
    w_e      = v[j] * dv[e]                            then split into s1, s2, s3 (per head)
    cutoff:  a_e <- a_e * phi_e           (standard ET), or
             w_e <- w_e * phi_e           (``vector_cutoff``: also the vector message vanishes
                                           smoothly at the cutoff)
    m_i      = sum_e a_e * s1_e                                                 [N, F]
    u_i      = sum_e vec[j] * s2_e + s3_e (x) d_ij                              [N, 3, F]

``self_loop`` (TorchMD-NET's ``loop=True``): every atom also receives from itself over an edge
of length 0, with d_ii = 0 and the filters evaluated at r = 0: ``(dk0 [F] | None, dv0 [3F] |
None, phi0 scalar)``. Pass None to leave it out.

Returns ``(m [N, F], u [N, 3, F])``. Aggregation is an ``index_add`` over receivers.

``pairs=n``: the edges are the all-pairs layout of structures of n atoms each
(:mod:`torchmdx.kernels.pairs`; ``edge_index`` is then not read): the same equations with the
gathers as broadcasts and the aggregation as a sum over the senders.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from torchmdx.kernels import pairs as pair_layout

#: ln 2 rounded to float32, as TorchMD-NET computes it (torch.log(torch.tensor(2.0)).item()),
#: so that imported checkpoints agree to the last digit in float64
_LOG2 = 0.6931471824645996


def shifted_softplus(x: torch.Tensor) -> torch.Tensor:
    """ssp(x) = softplus(x) - ln 2 (≈ 0 at x = 0; ln 2 rounded to float32 like TorchMD-NET)."""
    return F.softplus(x) - _LOG2


#: activation functions by name (TorchMD-NET's names); "swish" is x * sigmoid(x) = silu
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "ssp": shifted_softplus,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "mish": F.mish,
}


def et_message(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    vec: torch.Tensor,
    dk: Optional[torch.Tensor],
    dv: Optional[torch.Tensor],
    cutoff_weight: torch.Tensor,
    unit_vectors: torch.Tensor,
    edge_index: torch.Tensor,
    num_heads: int,
    *,
    edge_mask: Optional[torch.Tensor] = None,
    self_loop: Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]] = None,
    attn_activation: str = "silu",
    vector_cutoff: bool = False,
    pairs: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scalar message m [N, F] and vector message u [N, 3, F] of one ET layer (see module doc)."""
    n, f = q.shape
    h = num_heads
    d = f // h
    act = ACTIVATIONS[attn_activation]
    if pairs is None:
        i, j = edge_index[0], edge_index[1]
        e = i.numel()
        q_i = q.index_select(0, i).view(e, h, d)
        k_j = k.index_select(0, j).view(e, h, d)
        v_j = v.index_select(0, j).view(e, h, 3 * d)
        vec_j = vec.index_select(0, j).view(e, 3, h, d)
        edge_shape = (e,)
    else:  # [B, n, n, ...] (receiver, sender) broadcasts of the atoms' rows
        q_i = pair_layout.receivers_of(q.view(n, h, d), pairs)
        k_j = pair_layout.senders_of(k.view(n, h, d), pairs)
        v_j = pair_layout.senders_of(v.view(n, h, 3 * d), pairs)
        vec_j = pair_layout.senders_of(vec.view(n, 3, h, d), pairs)
        edge_shape = (n // pairs, pairs, pairs)
    prod = q_i * k_j
    if dk is not None:
        prod = prod * dk.view(*edge_shape, h, d)
    attn = act(prod.sum(-1))  # [E, H]
    phi = cutoff_weight.view(*edge_shape, 1)
    if edge_mask is not None:
        # invalid edges: drop every contribution (also the vector path of the standard ET)
        weight = edge_mask.to(q.dtype).view(*edge_shape, 1)
    else:
        weight = None
    if vector_cutoff:
        v_j = v_j * phi.unsqueeze(-1)
    else:
        attn = attn * phi
    if dv is not None:
        v_j = v_j * dv.view(*edge_shape, h, 3 * d)
    if weight is not None:
        v_j = v_j * weight.unsqueeze(-1)
        attn = attn * weight
    s1, s2, s3 = torch.split(v_j, d, dim=-1)  # [E, H, D] each
    msg_x = s1 * attn.unsqueeze(-1)
    msg_vec = vec_j * s2.unsqueeze(-3) + s3.unsqueeze(-3) * unit_vectors.view(*edge_shape, 3, 1, 1)
    if pairs is None:
        out_x = torch.zeros(n, f, dtype=q.dtype, device=q.device).index_add(0, i, msg_x.reshape(e, f))
        out_vec = torch.zeros(n, 3, f, dtype=q.dtype, device=q.device).index_add(0, i, msg_vec.reshape(e, 3, f))
    else:
        out_x = pair_layout.sum_over_senders(msg_x).reshape(n, f)
        out_vec = pair_layout.sum_over_senders(msg_vec).reshape(n, 3, f)

    if self_loop is not None:
        dk0, dv0, phi0 = self_loop
        prod0 = (q * k).view(n, h, d)
        if dk0 is not None:
            prod0 = prod0 * dk0.view(1, h, d)
        attn0 = act(prod0.sum(-1))  # [N, H]
        v0 = v.view(n, h, 3 * d)
        if vector_cutoff:
            v0 = v0 * phi0
        else:
            attn0 = attn0 * phi0
        if dv0 is not None:
            v0 = v0 * dv0.view(1, h, 3 * d)
        s1_0, s2_0, _ = torch.split(v0, d, dim=-1)  # d_ii = 0: no s3 term
        out_x = out_x + (s1_0 * attn0.unsqueeze(-1)).reshape(n, f)
        out_vec = out_vec + (vec.view(n, 3, h, d) * s2_0.unsqueeze(1)).reshape(n, 3, f)
    return out_x, out_vec
