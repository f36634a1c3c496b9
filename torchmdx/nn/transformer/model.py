"""The plain transformer on atoms (not equivariant): see :mod:`torchmdx.nn.transformer.config`.

Per atom i of structure b: x_i = Emb(z_i) + W_pos (pos_i - c_b) (c_b the centroid: positions as
input features, translation-invariant). L pre-norm blocks::

    x <- x + W_o Attention(LN(x));   x <- x + W_2 SiLU(W_1 LN(x))

Attention per head h over i itself and its neighbours j (within ``cutoff_upper`` or the whole
structure; :mod:`torchmdx.nn.graph_attention`, cosine cutoff in the softmax weights)::

    s_ij = q_i · k_j / sqrt(F / H) + b^h(r_ij),   b = MLP([r_ij, rbf(|r_ij|)]) (b(0) for i = i)

with r_ij = pos_j - pos_i the relative position *vector*: the bias, like the position features,
changes when the molecule rotates. No key bias in k_j and no constant in b (the softmax ignores
both: :mod:`torchmdx.nn.graph_attention`). Energy: y_i = MLP(LN(x_i)).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from torchmdx.nn.graph_attention import (
    QKVLinear,
    ScoreBias,
    aggregate,
    cutoff_weights,
    edge_scores,
    edge_softmax,
    structure_centroids,
    with_self_edges,
)
from torchmdx.nn.transformer.config import TransformerConfig


class PositionBias(ScoreBias):
    """b [E, H] from the relative vectors r [E, 3]: MLP([r, Gaussian rbf(|r|)])."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__(3, cfg.num_rbf, cfg.cutoff_upper, cfg.bias_hidden, cfg.num_heads)

    def forward(self, vectors):
        r = torch.sqrt((vectors * vectors).sum(-1, keepdim=True) + 1e-12)
        return self.mlp(torch.cat([vectors, self.rbf(r)], dim=-1))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        F, H = cfg.embedding_dimension, cfg.num_heads
        self.heads = H
        self.norm1 = nn.LayerNorm(F)
        self.qkv = QKVLinear(F, F)  # no key bias (graph_attention)
        self.bias = PositionBias(cfg)
        self.out = nn.Linear(F, F)
        self.norm2 = nn.LayerNorm(F)
        self.ffn = nn.Sequential(nn.Linear(F, cfg.ffn_multiplier * F), nn.SiLU(), nn.Linear(cfg.ffn_multiplier * F, F))
        self.scale = 1.0 / math.sqrt(F // H)

    def forward(self, x, vectors, receivers, senders, phi):
        N, F = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(N, 3, self.heads, F // self.heads).unbind(1)
        scores = edge_scores(q, k, receivers, senders) * self.scale + self.bias(vectors)
        alpha = edge_softmax(scores, receivers, phi, N)
        x = x + self.out(aggregate(alpha, v, receivers, senders, N).reshape(N, F))
        return x + self.ffn(self.norm2(x))


class TransformerRepresentation(nn.Module):
    """Per-atom outputs y [N] (module docstring)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        F = cfg.embedding_dimension
        self.embedding = nn.Embedding(cfg.max_z, F)
        self.position = nn.Linear(3, F, bias=False)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(F)
        self.head = nn.Sequential(nn.Linear(F, F // 2), nn.SiLU(), nn.Linear(F // 2, 1))
        self.attention_cutoff = cfg.cutoff_upper

    def forward(self, z, pos, batch, num_structures: int, edge_index, distances, mask: Optional[torch.Tensor] = None,
                return_hidden: bool = False):
        N = z.shape[0]
        centred = pos - structure_centroids(pos, batch, num_structures)[batch]
        x = self.embedding(z) + self.position(centred)
        phi = cutoff_weights(distances, self.attention_cutoff, mask)
        receivers, senders, phi = with_self_edges(edge_index, phi, N)
        vectors = pos.index_select(0, senders) - pos.index_select(0, receivers)  # self edges: 0
        hidden = [x]
        for block in self.blocks:
            x = block(x, vectors, receivers, senders, phi)
            hidden.append(x)
        y = self.head(self.norm(x)).squeeze(-1)
        return (y, hidden) if return_hidden else y
