"""Equiformer's representation: embeddings, Transformer blocks of equivariant graph attention and
feed-forward networks, and the invariant energy head (Liao & Smidt, "Equiformer: Equivariant
Graph Attention Transformer for 3D Atomistic Graphs", ICLR 2023, arXiv:2206.11990, Sec. 3.2-3.3,
Fig. 1-2). Written for torchmdx on e3nn; the authors' code (github.com/atomicarchitects/equiformer)
was read for the hyper-parameters and layer order, not copied.

Per edge i <- j (i receiver, j neighbour, r_ij = pos_j - pos_i + image shift, r < cutoff):
spherical harmonics Y(r̂_ij) up to lmax ('component' normalisation), radial basis e(r_ij) and the
cosine cutoff φ(r_ij). Per atom i: irreps features x_i (e.g. 128x0e+64x1o+32x2e).

Embedding (Sec. 3.3):
    x_i = Emb(z_i) (scalar channels) + 1/sqrt(d̄) Σ_j φ_ij Lin( DTP_{w(e_ij)}(1, Y(r̂_ij)) )   (edge-degree embedding)

Block (Sec. 3.3, pre-norm Transformer block):
    x <- x + GraphAttention(LN(x));   x <- x + FFN(LN(x))      (the last block maps to scalars)

Equivariant graph attention (Sec. 3.2, Fig. 2), per head h:
    x_ij = Lin_dst(x_i) + Lin_src(x_j)
    f_ij = DTP_{w(e_ij)}(x_ij, Y(r̂_ij))                                    (depth-wise TP)
    MLP attention:        z_ij^h = a_h · LeakyReLU( Lin_α(f_ij)^h )          (scalars only)
                          α_ij^h = φ_ij exp(z_ij^h) / Σ_k φ_ik exp(z_ik^h)   (softmax over j)
    non-linear message:   v_ij = Lin( DTP_θ( Gate(Lin(f_ij)), Y(r̂_ij) ) )
                          (linear messages: f_ij -> Lin -> [z inputs | v_ij])
    y_i = Lin_out( concat_h Σ_j α_ij^h φ_ij v_ij^h )

FFN (Sec. 3.3): Lin -> Gate -> Lin. Energy head (Sec. 3.3): LN -> Linear -> SiLU -> Linear on the
last block's scalar features: one invariant number per atom.

Smoothness at the cutoff (a deliberate difference from the authors' code). The softmax weights
carry φ_ij (a neighbour entering the sphere starts with zero weight and does not change the
others' normalisation) and each value is multiplied by φ_ij once more (an atom whose only
neighbour sits at the cutoff receives nothing), as is every edge term of the edge-degree
embedding. Without this the energy jumps whenever an atom crosses the cutoff (the radial MLP's
biases make the tensor-product weights non-zero there), which MD cannot conserve.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from e3nn import o3
from torch import nn

from torchmdx.nn.equiformer.config import EquiformerConfig
from torchmdx.nn.equiformer.layers import (
    BesselRBF,
    DepthwiseTensorProduct,
    EquivariantLayerNorm,
    GroupedLinear,
    RadialMLP,
    SmoothLeakyReLU,
    gate,
    glorot_,
    head_index,
    is_even_scalar,
    reference_enabled,
)
from torchmdx.nn.layers import RBF_TYPES, CosineCutoff


def scalar_multiplicity(irreps) -> int:
    return sum(mul for mul, ir in o3.Irreps(irreps) if is_even_scalar(ir))


def scaled_irreps(irreps, factor: int):
    return o3.Irreps([(mul * factor, ir) for mul, ir in o3.Irreps(irreps)])


def segment_softmax(z: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                    num_segments: int) -> torch.Tensor:
    """α_e = w_e exp(z_e) / Σ_{e' in segment(e)} w_e' exp(z_e') (see :func:`segment_softmax_reference`,
    its reference) in fewer operations: invalid edges enter the (detached) per-segment maximum as
    the dtype's lowest finite value instead of -inf, so no infinities need repair; a zero
    denominator (all weights zero) is clamped to the smallest normal number, which gives the
    same zeros."""
    if reference_enabled():
        return segment_softmax_reference(z, weight, index, valid, num_segments)
    column = valid.unsqueeze(-1)
    masked = torch.where(column, z.detach(), torch.finfo(z.dtype).min)
    zmax = z.new_zeros(num_segments, z.shape[1]).scatter_reduce(0, index.unsqueeze(-1).expand_as(z), masked, "amax",
                                                                include_self=False)
    shifted = torch.where(column, z - zmax.index_select(0, index), 0.0)
    e = torch.exp(shifted) * weight.unsqueeze(-1)
    denominator = torch.zeros_like(zmax).index_add(0, index, e).index_select(0, index)
    return e / denominator.clamp_min(torch.finfo(z.dtype).tiny)


def segment_softmax_reference(z: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                              num_segments: int) -> torch.Tensor:
    """α_e = w_e exp(z_e) / Σ_{e' in segment(e)} w_e' exp(z_e') per column of ``z`` [E, H], over the
    edges e with the same ``index`` (receiver); ``weight`` [E] >= 0 (the cutoff), invalid edges
    get 0. The per-segment maximum subtracted for stability is detached: the quotient does not
    depend on it. A segment whose weights are all zero gives zeros."""
    masked = torch.where(valid.unsqueeze(-1), z, torch.full_like(z, -math.inf))
    zmax = torch.full((num_segments, z.shape[1]), -math.inf, dtype=z.dtype, device=z.device)
    zmax = zmax.scatter_reduce(0, index.unsqueeze(-1).expand_as(z), masked.detach(), "amax", include_self=True)
    zmax = torch.where(torch.isfinite(zmax), zmax, torch.zeros_like(zmax))
    shifted = torch.where(valid.unsqueeze(-1), z - zmax.index_select(0, index), torch.zeros_like(z))
    e = torch.exp(shifted) * weight.unsqueeze(-1)
    denominator = torch.zeros_like(zmax).index_add(0, index, e).index_select(0, index)
    return e / torch.where(denominator > 0, denominator, torch.ones_like(denominator))


class EdgeDegreeEmbedding(nn.Module):
    """x_i += 1/sqrt(d̄) Σ_j φ_ij Lin( DTP_{w(e_ij)}(1, Y(r̂_ij)) ) (Sec. 3.3, "edge-degree
    embedding"): gives every degree of the features a starting value from the neighbourhood's
    geometry (d̄ = ``avg_num_neighbors``)."""

    def __init__(self, irreps_node, irreps_sh, num_rbf: int, radial_hidden, avg_num_neighbors: float):
        super().__init__()
        self.num_scalars = scalar_multiplicity(irreps_node)
        self.dtp = DepthwiseTensorProduct(f"{self.num_scalars}x0e", irreps_sh, irreps_node)
        self.radial = RadialMLP(num_rbf, radial_hidden, self.dtp.weight_numel)
        self.linear = GroupedLinear(self.dtp.irreps_out, irreps_node).take_input_order(self.dtp.plan.out_index)
        self.norm = 1.0 / math.sqrt(avg_num_neighbors)

    def forward(self, num_atoms: int, receivers, sh, rbf, phi) -> torch.Tensor:
        ones = sh.new_ones(sh.shape[0], self.num_scalars)
        edge = self.linear(self.dtp(ones, sh, self.radial(rbf), raw=True)) * (phi * self.norm).unsqueeze(-1)
        return edge.new_zeros(num_atoms, edge.shape[1]).index_add(0, receivers, edge)


class GraphAttention(nn.Module):
    """Equivariant graph attention (Sec. 3.2) with MLP attention and (non-)linear messages; see
    the module docstring for the equations."""

    def __init__(self, irreps_node, irreps_sh, num_heads: int, num_rbf: int, radial_hidden,
                 nonlinear_message: bool, attention_dropout: float):
        super().__init__()
        irreps_node = o3.Irreps(irreps_node)
        self.num_heads = num_heads
        num_alpha = scalar_multiplicity(irreps_node)  # H heads x A scalars each
        self.alpha_per_head = num_alpha // num_heads
        self.nonlinear_message = nonlinear_message
        self.merge_src = GroupedLinear(irreps_node, irreps_node, biases=True)
        self.merge_dst = GroupedLinear(irreps_node, irreps_node, biases=False)
        self.dtp = DepthwiseTensorProduct(irreps_node, irreps_sh, irreps_node)
        self.radial = RadialMLP(num_rbf, radial_hidden, self.dtp.weight_numel)
        irreps_alpha = o3.Irreps(f"{num_alpha}x0e")
        order = self.dtp.plan.out_index  # the raw output order of the DTP (see forward)
        if nonlinear_message:
            self.alpha_linear = GroupedLinear(self.dtp.irreps_out, irreps_alpha).take_input_order(order)
            self.value_gate = gate(irreps_node)
            self.value_linear = GroupedLinear(self.dtp.irreps_out, self.value_gate.irreps_in).take_input_order(order)
            self.value_dtp = DepthwiseTensorProduct(self.value_gate.irreps_out, irreps_sh, irreps_node, internal_weights=True)
            self.value_out = GroupedLinear(self.value_dtp.irreps_out, irreps_node).take_input_order(
                self.value_dtp.plan.out_index)
        else:
            self.linear = GroupedLinear(self.dtp.irreps_out, irreps_alpha + irreps_node).take_input_order(order)
        self.alpha_activation = SmoothLeakyReLU(0.2)
        self.alpha_dot = nn.Parameter(glorot_(torch.empty(num_heads, self.alpha_per_head)))
        self.dropout = nn.Dropout(attention_dropout) if attention_dropout > 0 else None
        self.register_buffer("heads", head_index(irreps_node, num_heads), persistent=False)
        spread = torch.zeros(num_heads, irreps_node.dim)
        spread[self.heads, torch.arange(irreps_node.dim)] = 1.0
        self.register_buffer("head_spread", spread, persistent=False)  # [H, dim]: 1 where component in head
        self.proj = GroupedLinear(irreps_node, irreps_node, biases=True)

    def forward(self, x, edge_index, sh, rbf, phi, valid) -> torch.Tensor:
        receivers, senders = edge_index[0], edge_index[1]
        message = self.merge_src(x).index_select(0, senders) + self.merge_dst(x).index_select(0, receivers)
        # f and the value DTP's output in the fast path's raw column order, which the linear layers
        # after them take (GroupedLinear.take_input_order); e3nn's order on the reference path
        f = self.dtp(message, sh, self.radial(rbf), raw=True)
        if self.nonlinear_message:
            alpha = self.alpha_linear(f)
            value = self.value_out(self.value_dtp(self.value_gate(self.value_linear(f)), sh, raw=True))
        else:
            out = self.linear(f)
            num_alpha = self.num_heads * self.alpha_per_head
            alpha, value = out[:, :num_alpha], out[:, num_alpha:]
        z = (self.alpha_activation(alpha).view(-1, self.num_heads, self.alpha_per_head) * self.alpha_dot).sum(-1)
        weight = segment_softmax(z, phi, receivers, valid, x.shape[0])
        if self.dropout is not None:
            weight = self.dropout(weight)
        weight = weight * phi.unsqueeze(-1)
        if reference_enabled():
            messages = value * weight.index_select(1, self.heads)
        else:  # the same spreading as a product (its backward is a product, a gather's a scatter)
            messages = value * (weight @ self.head_spread)
        aggregated = messages.new_zeros(x.shape[0], messages.shape[1]).index_add(0, receivers, messages)
        return self.proj(aggregated)


class FeedForward(nn.Module):
    """Lin -> Gate -> Lin (Sec. 3.3), hidden irreps ``irreps_mid``."""

    def __init__(self, irreps_in, irreps_mid, irreps_out):
        super().__init__()
        self.gate = gate(irreps_mid)
        self.linear_in = GroupedLinear(irreps_in, self.gate.irreps_in, biases=True)
        self.linear_out = GroupedLinear(self.gate.irreps_out, irreps_out, biases=True)

    def forward(self, x):
        return self.linear_out(self.gate(self.linear_in(x)))


class TransformerBlock(nn.Module):
    """x <- x + GraphAttention(LN(x)); x <- shortcut(x) + FFN(LN(x)) (pre-norm; the shortcut is a
    linear layer where the output irreps differ, i.e. in the last block)."""

    def __init__(self, irreps_node, irreps_out, irreps_sh, cfg: EquiformerConfig):
        super().__init__()
        self.norm_attention = EquivariantLayerNorm(irreps_node)
        self.attention = GraphAttention(irreps_node, irreps_sh, cfg.num_heads, cfg.num_rbf, cfg.radial_hidden,
                                        cfg.nonlinear_message, cfg.attention_dropout)
        self.norm_ffn = EquivariantLayerNorm(irreps_node)
        self.ffn = FeedForward(irreps_node, scaled_irreps(irreps_node, cfg.ffn_multiplier), irreps_out)
        self.shortcut = None if o3.Irreps(irreps_out) == o3.Irreps(irreps_node) else GroupedLinear(irreps_node, irreps_out, biases=True)

    def forward(self, x, edge_index, sh, rbf, phi, valid):
        x = x + self.attention(self.norm_attention(x), edge_index, sh, rbf, phi, valid)
        update = self.ffn(self.norm_ffn(x))
        if self.shortcut is not None:
            x = self.shortcut(x)
        return x + update


class EquiformerRepresentation(nn.Module):
    """Atoms and edges -> one invariant output per atom (before the energy normalisation)."""

    def __init__(self, cfg: EquiformerConfig):
        super().__init__()
        self.cutoff = float(cfg.cutoff_upper)
        self.irreps_node = cfg.node_irreps()
        self.irreps_sh = o3.Irreps.spherical_harmonics(cfg.lmax)
        self.irreps_feature = o3.Irreps(f"{cfg.feature_channels}x0e")
        self.embedding = nn.Embedding(cfg.max_z, scalar_multiplicity(self.irreps_node))
        self.rbf = {**RBF_TYPES, "bessel": BesselRBF}[cfg.rbf_type](0.0, cfg.cutoff_upper, cfg.num_rbf, cfg.trainable_rbf)
        self.cutoff_fn = CosineCutoff(0.0, cfg.cutoff_upper)
        self.edge_degree = EdgeDegreeEmbedding(self.irreps_node, self.irreps_sh, cfg.num_rbf, cfg.radial_hidden,
                                               cfg.avg_num_neighbors)
        self.blocks = nn.ModuleList(
            TransformerBlock(self.irreps_node, self.irreps_feature if k == cfg.num_layers - 1 else self.irreps_node,
                             self.irreps_sh, cfg)
            for k in range(cfg.num_layers)
        )
        self.norm = EquivariantLayerNorm(self.irreps_feature)
        width = cfg.feature_channels
        self.head = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        """Atom embedding: the even-scalar channels from the element, every other channel zero."""
        scalars = self.embedding(z)
        parts, used = [], 0
        for mul, ir in self.irreps_node:
            if is_even_scalar(ir):
                parts.append(scalars[:, used: used + mul])
                used += mul
            else:
                parts.append(scalars.new_zeros(scalars.shape[0], mul * ir.dim))
        return torch.cat(parts, dim=-1)

    def forward(self, z, edge_index, vectors, distances, mask: Optional[torch.Tensor] = None,
                return_hidden: bool = False):
        """Per-atom outputs [N] (and, with ``return_hidden``, the list of irreps features [N, dim]
        after the embedding and after each block but the last, which is scalar only)."""
        valid = distances < self.cutoff
        if mask is not None:
            valid = valid & mask
        # padded or out-of-range edges: a harmless unit vector (0, 0, 1); φ = 0 removes them. Built
        # by a comparison, not by item assignment: ``unit[:, 2] = 1.0`` puts a CPU scalar tensor
        # constant into a traced graph (make_fx lifts the 1.0), a host tensor in a CUDA graph
        unit = (torch.arange(3, device=vectors.device) == 2).to(vectors.dtype)
        safe = torch.where(valid.unsqueeze(-1), vectors, unit)
        sh = o3.spherical_harmonics(self.irreps_sh, safe, normalize=True, normalization="component")
        rbf = self.rbf(distances)
        phi = torch.where(valid, self.cutoff_fn(distances), torch.zeros_like(distances))
        receivers = edge_index[0]
        x = self.embed(z) + self.edge_degree(z.shape[0], receivers, sh, rbf, phi)
        hidden = [x]
        for block in self.blocks:
            x = block(x, edge_index, sh, rbf, phi, valid)
            hidden.append(x)
        y = self.head(self.norm(x)).squeeze(-1)
        if return_hidden:
            return y, hidden[:-1]
        return y
