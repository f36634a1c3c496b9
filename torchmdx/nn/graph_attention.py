"""Attention over the pairs of a neighbor list, with a smooth cutoff: shared by GATr
(:mod:`torchmdx.nn.gatr`) and the plain transformer (:mod:`torchmdx.nn.transformer`).

Every atom i attends to itself and to its neighbors j (edges i <- j of the list, which never
cross structures, so attention is masked by structure). With per-head scores s_ij and the
cosine cutoff φ(r_ij) (φ_ii = 1; φ ≡ 1 for "attention over the whole structure")::

    α_ij = φ_ij exp(s_ij) / (exp(s_ii) + Σ_k φ_ik exp(s_ik))

so an atom entering the cutoff sphere starts with zero weight and the energy stays continuous
(differentiable) when atoms cross the cutoff. Invalid rows of a padded or Verlet-skin list
(``mask`` False) get φ = 0. No host reads (fixed shapes, segment reductions by index_add).
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def cutoff_weights(distances: torch.Tensor, cutoff: Optional[float], mask: Optional[torch.Tensor]) -> torch.Tensor:
    """φ [E]: ½(cos(π r / r_c) + 1) for r < r_c (1 when ``cutoff`` is None), 0 on masked rows."""
    if cutoff is None:
        phi = torch.ones_like(distances)
    else:
        phi = 0.5 * (torch.cos(distances * (math.pi / cutoff)) + 1.0) * (distances < cutoff).to(distances.dtype)
    if mask is not None:
        phi = phi * mask.to(phi.dtype)
    return phi


def with_self_edges(edge_index: torch.Tensor, phi: torch.Tensor, num_atoms: int):
    """Edges i <- j followed by the N self edges i <- i (φ = 1): (receivers, senders, φ)."""
    loops = torch.arange(num_atoms, device=edge_index.device)
    receivers = torch.cat([edge_index[0], loops])
    senders = torch.cat([edge_index[1], loops])
    return receivers, senders, torch.cat([phi, torch.ones(num_atoms, dtype=phi.dtype, device=phi.device)])


def edge_softmax(scores: torch.Tensor, receivers: torch.Tensor, phi: torch.Tensor, num_atoms: int) -> torch.Tensor:
    """α [E, H] from scores [E, H] (module docstring); every receiver has its self edge."""
    heads = scores.shape[1]
    top = torch.full((num_atoms, heads), -torch.inf, dtype=scores.dtype, device=scores.device)
    index = receivers.unsqueeze(1).expand(-1, heads)
    top = top.scatter_reduce(0, index, scores.detach(), reduce="amax", include_self=True)
    weights = phi.unsqueeze(1) * torch.exp(scores - top[receivers])
    total = torch.zeros(num_atoms, heads, dtype=scores.dtype, device=scores.device).index_add(0, receivers, weights)
    return weights / total[receivers]


def aggregate(alpha: torch.Tensor, values: torch.Tensor, receivers: torch.Tensor, senders: torch.Tensor,
              num_atoms: int) -> torch.Tensor:
    """Σ_j α_ij v_j: alpha [E, H], values [N, H, F] -> [N, H, F]."""
    messages = alpha.unsqueeze(-1) * values[senders]
    out = torch.zeros(num_atoms, *values.shape[1:], dtype=values.dtype, device=values.device)
    return out.index_add(0, receivers, messages)


def edge_scores(queries: torch.Tensor, keys: torch.Tensor, receivers: torch.Tensor, senders: torch.Tensor) -> torch.Tensor:
    """s_ij = q_i · k_j per head: queries, keys [N, H, F] -> [E, H] (an einsum, so that the FLOP
    counter of :mod:`torchmdx.train.sweep` sees it)."""
    return torch.einsum("ehf,ehf->eh", queries[receivers], keys[senders])


def structure_centroids(pos: torch.Tensor, batch: torch.Tensor, num_structures: int) -> torch.Tensor:
    """The mean position of each structure's atoms [B, 3] (no host read; empty structures: 0)."""
    total = torch.zeros(num_structures, 3, dtype=pos.dtype, device=pos.device).index_add(0, batch, pos)
    count = torch.zeros(num_structures, dtype=pos.dtype, device=pos.device).index_add(
        0, batch, torch.ones_like(pos[:, 0]))
    return total / count.clamp(min=1).unsqueeze(1)
