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
from torch import nn


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


# ---------------------------------------------------------------- no key bias, no score offset
# q_i·(k_j + b_k) = q_i·k_j + q_i·b_k and s_ij + c_h add the same to every score of query i (per
# head); the softmax ignores that, so the energy cannot depend on a key bias or on a constant in a
# score bias. Such parameters got round-off gradients, which AdamW turned into lr-sized random
# steps (a captured training step then drifted from the eager one): the layers below have neither.
# Files written with them still load: the modules' ``upgrade_state`` drops them (provably without
# changing an energy) in ``load_state_dict``, and :func:`upgrade_state_dict` does it for other
# per-parameter state (the optimiser's moments of an old training checkpoint).


def query_key_value_bias(qv_bias: torch.Tensor) -> torch.Tensor:
    """(b_q, 0, b_v) [3n] from the query and value biases (b_q, b_v) [2n]."""
    query, value = qv_bias.chunk(2)
    return torch.cat([query, torch.zeros_like(query), value])


def drop_key_bias(state_dict: dict, name: str, size: int) -> None:
    """An old q, k, v bias [3n] at ``state_dict[name]`` -> its query and value thirds [2n]
    (``size`` = 2n), in place; anything else is left to ``load_state_dict``'s own checks."""
    old = state_dict.get(name)
    if torch.is_tensor(old) and old.dim() == 1 and 2 * old.shape[0] == 3 * size:
        n = size // 2
        state_dict[name] = torch.cat([old[:n], old[2 * n:]])


def upgrade_state_dict(module: nn.Module, state_dict: dict, prefix: str = "") -> dict:
    """Convert the old entries of ``state_dict`` (names relative to ``module`` under ``prefix``)
    in place, by every submodule's ``upgrade_state``; entries the modules do not know are left
    alone (a partial dict, e.g. one optimiser moment, is fine). Returns ``state_dict``."""
    for name, sub in module.named_modules():
        if isinstance(sub, Upgradable):
            sub.upgrade_state(state_dict, prefix + name + "." if name else prefix)
    return state_dict


class Upgradable(nn.Module):
    """A module whose old state dict entries ``upgrade_state`` converts when they are loaded."""

    def upgrade_state(self, state_dict: dict, prefix: str) -> None:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.upgrade_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class QKVLinear(Upgradable):
    """(q, k, v) = x W^T + (b_q, 0, b_v): ``nn.Linear(in_features, 3 out_features)`` without the
    key bias. Parameters ``weight`` [3 out, in] and ``bias`` = (b_q, b_v) [2 out], drawn as
    nn.Linear draws them (the key third is dropped), so a seeded model's other weights are those
    it had with the key bias; an old ``bias`` [3 out] loads without its key third."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        full = nn.Linear(in_features, 3 * out_features)
        n = out_features
        self.weight = full.weight
        self.bias = nn.Parameter(torch.cat([full.bias[:n], full.bias[2 * n:]]).detach())

    def forward(self, x):
        return nn.functional.linear(x, self.weight, query_key_value_bias(self.bias))

    def upgrade_state(self, state_dict, prefix):
        drop_key_bias(state_dict, prefix + "bias", self.bias.shape[0])


class ScoreBias(Upgradable):
    """b [E, H] = MLP([extra edge features, Gaussian rbf(r)]) added to the attention scores:
    Linear, SiLU, Linear without an output bias (a constant per head shifts all scores of a query
    alike); an old ``mlp.2.bias`` is dropped on load. ``num_rbf`` centres on [0, cutoff] (10 Å
    without a cutoff)."""

    def __init__(self, extra: int, num_rbf: int, cutoff: Optional[float], hidden: int, heads: int):
        super().__init__()
        span = cutoff if cutoff is not None else 10.0
        self.register_buffer("centres", torch.linspace(0.0, span, num_rbf))
        self.width = span / (num_rbf - 1)
        self.mlp = nn.Sequential(nn.Linear(extra + num_rbf, hidden), nn.SiLU(), nn.Linear(hidden, heads))
        self.mlp[2].register_parameter("bias", None)  # drawn, then dropped: the seeded weights stay

    def rbf(self, r):
        return torch.exp(-0.5 * ((r - self.centres) / self.width) ** 2)

    def upgrade_state(self, state_dict, prefix):
        state_dict.pop(prefix + "mlp.2.bias", None)
