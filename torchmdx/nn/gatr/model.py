"""GATr's representation for molecules: atoms as points of a geometric algebra, multivector
attention blocks, an invariant energy per atom. Written for torchmdx from the papers (Brehmer,
de Haan, Behrends, Cohen, "Geometric Algebra Transformer", NeurIPS 2023; de Haan, Cohen, Brehmer,
"Euclidean, Projective, Conformal", AISTATS 2024); the authors' code was read, not copied.

Input, per atom i of structure b: x_i = pos_i - mean_{a in b} pos_a (translation invariance is
exact; the positions stay small, which keeps the conformal algebra's |x|² term tame), the
point embedding P(x_i) (:mod:`torchmdx.nn.gatr.algebra`) as one multivector channel, and an
embedding of z_i as S scalar channels. An equivariant linear layer maps them to (C mv, S
scalars). Then L pre-norm blocks::

    (mv, s) += Attention(LN(mv, s));   (mv, s) += MLP(LN(mv, s))

Attention (per head h, over i itself and its neighbours j within ``cutoff_upper``, or every
atom of the structure): q, k, v = EquiLinear(LN(mv, s)) (no key bias, and no constant in the radial
bias: the softmax ignores both, :mod:`torchmdx.nn.graph_attention`); score

    s_ij = [ Σ_c ⟨q_ic, k_jc⟩ + Σ q^s_i k^s_j  (+ β_h d(q_i, k_j)) ] / sqrt(F)

with ⟨·,·⟩ the algebra's invariant inner product ⟨x̃ y⟩_0 and, for the projective algebra,
d = -Σ_c |w_k p_q - w_q p_k|² from the channels' trivector parts (w e123 + p·(e0-trivectors): the
squared distance of two points, which the degenerate inner product cannot see; written as a
dot product of per-atom features so it costs no more than the rest), each trivector first
dehomogenised with ``distance_normalised``, T -> T w / (w² + ε) as GATr's normaliser: then d ≈
-Σ_c |x_q - x_k|² whatever the channels' weights w. Without it (the default, the first
formulation) d = -Σ_c w_q² w_k² |x_q - x_k|², fourth order in the learned w: ~1e-4 of the scores
at initialisation, where the term does next to nothing (docs/sweep.md, "Why GATr trails here"). Softmax with the cosine
cutoff in its weights (:mod:`torchmdx.nn.graph_attention`), values v_j (mv and scalars)
summed, EquiLinear out.

MLP: EquiLinear -> GP(L1 x, L2 x) [+ (L3 x ∨ L4 x) · r, the join] -> x · GELU(⟨x⟩_0) (scalars:
GELU) -> EquiLinear. The join changes sign under reflections, so its factor r must too: with
``join_reference: input`` (projective only) r is the e123 coefficient of the atom's input
point, ±1 (GATr's reference from the data; the two signs of the sign average); with 'block' (the
default) the mean pseudoscalar coefficient of the block input, per atom (the first formulation: ~0.1 at
initialisation, which scaled the join, the network's way from the points' e0 components to its
invariants, down tenfold). Positions reach the invariants only through the join, the
distance term and the radial bias: the geometric product, the inner product and the norm never
move e0 components out of the e0 ideal.

Energy: LN, then y_i = MLP([s_i, ⟨mv_i⟩_0]) (invariants only).

Projective sign average (``sign_average``): a point of the projective algebra is a trivector,
and the twisted action of a reflection maps P(x) to -P(Rx); an E(3)-equivariant network is
therefore reflection-invariant on points only if it is even in their sign, which GATr's layers
are not. y_i = (y_i(P) + y_i(-P)) / 2 is (the two passes run as one batch).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import nn

from torchmdx.nn.gatr.algebra import algebra, point_embedding_matrix
from torchmdx.nn.gatr.config import GATrConfig
from torchmdx.nn.gatr.layers import AlgebraBuffers, Bilinear, EquiLayerNorm, EquiLinear, gated_gelu, prepared_matrices
from torchmdx.nn.graph_attention import (
    ScoreBias,
    cutoff_weights,
    structure_centroids,
    with_self_edges,
)


def _trivector_point_readout(name: str):
    """Projective algebra: (w_index, w_sign, p_index [3], p_sign [3]) with T = w e123 + ... such
    that a point's trivector P(x) has w = 1 and p = x (from the embedding's construction)."""
    c, a, _ = point_embedding_matrix(name)
    w_index = int(np.nonzero(c)[0][0])
    p_index, p_sign = [], []
    for i in range(3):
        (blade,) = np.nonzero(a[:, i])[0]
        p_index.append(int(blade))
        p_sign.append(float(a[blade, i]))
    return w_index, float(c[w_index]), p_index, p_sign


class RadialBias(ScoreBias):
    """b [E, H] = MLP(Gaussian rbf(r)) of the edge lengths (self edges: r = 0): invariant."""

    def __init__(self, cfg: GATrConfig):
        super().__init__(0, cfg.num_rbf, cfg.cutoff_upper, cfg.scalar_channels, cfg.num_heads)

    def forward(self, distances):
        return self.mlp(self.rbf(distances.unsqueeze(-1)))


def _point_feature_maps(name: str, scale: float = 1.0) -> np.ndarray:
    """[2, 16, 5]: (φ, ψ) = (T ⊗ T).flatten() @ maps[0 or 1] with T the 4 components (w, p) of
    a channel's trivector as stored (signs of the embedding included), φ(q)·ψ(k) = -|w_k p_q - w_q p_k|²:
    φ = (w², |p|², w p), ψ = (-|p|², -w², 2 w p) (times ``scale`` for φ)."""
    _, w_sign, _, p_sign = _trivector_point_readout(name)
    maps = np.zeros((2, 4, 4, 5))
    maps[0, 0, 0, 0] = 1.0
    maps[1, 0, 0, 1] = -1.0
    for i in range(1, 4):
        maps[0, i, i, 1] = 1.0
        maps[1, i, i, 0] = -1.0
        maps[0, 0, i, 1 + i] = w_sign * p_sign[i - 1]
        maps[1, 0, i, 1 + i] = 2.0 * w_sign * p_sign[i - 1]
    maps[0] *= scale
    return maps.reshape(2, 16, 5)


#: ε of the trivectors' normaliser T w / (w² + ε) in the distance-aware scores (GATr's value)
POINT_EPSILON = 1e-3


class MVAttention(nn.Module):
    """Multivector attention (module docstring)."""

    def __init__(self, buffers: AlgebraBuffers, cfg: GATrConfig):
        super().__init__()
        self.buffers_ = [buffers]
        C, S, H = cfg.channels, cfg.scalar_channels, cfg.num_heads
        self.C, self.S, self.H, self.dim = C, S, H, buffers.algebra.dim
        self.qkv = EquiLinear(buffers, C, 3 * C, S, 3 * S, qkv=True)  # no key bias (graph_attention)
        self.out = EquiLinear(buffers, C, C, S, S)
        self.distance = cfg.uses_distance
        features = (C // H) * self.dim + S // H
        dtype = torch.get_default_dtype()
        if self.distance:
            w_index, w_sign, p_index, p_sign = _trivector_point_readout(cfg.algebra)
            self.register_buffer("point_index", torch.tensor([w_index, *p_index]), persistent=False)
            self.register_buffer("point_maps", torch.tensor(_point_feature_maps(cfg.algebra), dtype=dtype),
                                 persistent=False)
            self.distance_scale = nn.Parameter(torch.full((H,), 0.1))
            self.normalise_points = cfg.normalises_distance
            features += 5 * (C // H)
        self.scale = 1.0 / math.sqrt(features)
        self.radial = RadialBias(cfg) if cfg.radial_bias else None
        self.register_buffer("one", torch.ones(1, 1, 1, dtype=dtype), persistent=False)

    def _point_features(self, qk_mv):
        """(φ(q), ψ(k)) [N, H, 5c] from the query and key channels [N, 2C, D] (module docstring):
        φ(q)·ψ(k) = -Σ_c |w_k p_q - w_q p_k|² (projective)."""
        N = qk_mv.shape[0]
        t = qk_mv[..., self.point_index].view(N, 2, self.C, 4)
        if self.normalise_points:  # dehomogenise: T w / (w² + ε) (GATr's normaliser; even in the sign of T)
            w = t[..., :1]
            t = t * (w / (w * w + POINT_EPSILON))
        outer = (t.unsqueeze(-1) * t.unsqueeze(-2)).view(N, 2, self.C, 16)
        phi, psi = torch.matmul(outer, self.point_maps).unbind(1)  # [N, C, 5] each
        return phi.reshape(N, self.H, -1), psi.reshape(N, self.H, -1)

    def forward(self, mv, s, receivers, senders, phi, distances=None, rbf=None, radial=None, flat=None):
        """``flat``: the normalised input [N, C·D + S] in place of (mv, s); ``rbf``: the radial basis of ``distances`` (shared by the blocks), else computed here;
        ``radial``: this block's score bias [E, H] when the caller computed it (:func:`radial_biases`)."""
        b = self.buffers_[0]
        C, S, H = self.C, self.S, self.H
        qkv_mv, qkv_s = self.qkv(mv, s) if flat is None else self.qkv.forward_flat(flat)
        N = qkv_mv.shape[0]
        q_mv, k_mv, v_mv = qkv_mv.split(C, dim=1)
        q_s, k_s, v_s = qkv_s.split(S, dim=1)
        queries = [(q_mv * b.inner_weights).reshape(N, H, -1), q_s.reshape(N, H, -1)]
        keys = [k_mv.reshape(N, H, -1), k_s.reshape(N, H, -1)]
        if self.distance:
            q_phi, k_psi = self._point_features(qkv_mv[:, :2 * C])
            queries.append(q_phi * self.distance_scale.view(1, H, 1))
            keys.append(k_psi)
        queries, keys = torch.cat(queries, -1), torch.cat(keys, -1)
        E, F = receivers.shape[0], queries.shape[-1]
        q_e, k_e = queries[receivers].view(E * H, 1, F), keys[senders].view(E * H, F, 1)
        if self.radial is not None and (radial is not None or rbf is not None or distances is not None):
            if radial is None:
                radial = self.radial.mlp(self.radial.rbf(distances.unsqueeze(-1)) if rbf is None else rbf)
            scores = torch.baddbmm(radial.reshape(E * H, 1, 1), q_e, k_e, alpha=self.scale)
        else:
            scores = torch.bmm(q_e, k_e) * self.scale
        scores = scores.view(E, H)
        # softmax over each receiver's edges (cosine cutoff φ in the weights, graph_attention),
        # normalised after the sum: Σ_j w_ij [v_j, 1] = [Σ_j w_ij v_j, Σ_j w_ij]
        top = torch.full((N, H), -torch.inf, dtype=scores.dtype, device=scores.device).scatter_reduce(
            0, receivers.unsqueeze(1).expand(-1, H), scores.detach(), reduce="amax", include_self=True)
        weights = phi.unsqueeze(1) * torch.exp(scores - top[receivers])
        values = torch.cat([v_mv.reshape(N, H, -1), v_s.reshape(N, H, -1), self.one.expand(N, H, 1)], dim=-1)
        summed = torch.zeros(N, H, values.shape[-1], dtype=values.dtype, device=values.device).index_add(
            0, receivers, weights.unsqueeze(-1) * values[senders])
        numerator, total = summed.split([values.shape[-1] - 1, 1], dim=-1)
        out = numerator / total
        c, D = C // H, self.dim
        a_mv, a_s = out.split([c * D, S // H], dim=-1)
        return self.out(a_mv.reshape(N, C, D), a_s.reshape(N, S))


def radial_biases(radials, rbf):
    """The score biases [E, H] of every block's :class:`RadialBias` on the shared basis ``rbf``
    [E, R], all blocks in three products: the first layers side by side (one matrix product),
    SiLU, the second layers as one batched product over the blocks (plus their biases where
    they have them: modules of the old code, tests/test_attention_key_bias.py)."""
    first = [r.mlp[0] for r in radials]
    hidden = nn.functional.silu(torch.addmm(torch.cat([f.bias for f in first]), rbf,
                                            torch.cat([f.weight for f in first]).T))  # [E, L*S]
    E, L = rbf.shape[0], len(radials)
    second = torch.stack([r.mlp[2].weight for r in radials])  # [L, H, S]
    out = torch.bmm(hidden.view(E, L, -1).transpose(0, 1), second.transpose(1, 2))  # [L, E, H]
    if any(r.mlp[2].bias is not None for r in radials):
        out = out + torch.stack([r.mlp[2].bias if r.mlp[2].bias is not None else torch.zeros_like(second[0, :, 0])
                                 for r in radials]).unsqueeze(1)
    return out.unbind(0)


class GeometricMLP(nn.Module):
    """EquiLinear -> bilinears -> gated GELU -> EquiLinear (module docstring)."""

    def __init__(self, buffers: AlgebraBuffers, cfg: GATrConfig):
        super().__init__()
        C, S, m = cfg.channels, cfg.scalar_channels, cfg.mlp_multiplier
        hidden = m * C
        join = (hidden + 1) // 2 if cfg.uses_join else 0
        if cfg.uses_join and hidden < 2:
            join = 0
        self.pseudoscalar = buffers.algebra.pseudoscalar
        self.first = EquiLinear(buffers, C, C, S, m * S)
        self.bilinear = Bilinear(buffers, C, hidden - join, join)
        self.last = EquiLinear(buffers, hidden, C, m * S, S, gain=0.5)
        self.channels, self.dim = C, buffers.algebra.dim

    def forward(self, mv, s, flat=None, reference=None):
        """``flat``: the normalised input [N, C·D + S] in place of (mv, s); ``reference`` [N]: the
        join's factor when given (``join_reference: input``), else the mean pseudoscalar
        coefficient of the block input."""
        if reference is None:
            if flat is not None:
                mv = flat.split([self.channels * self.dim, flat.shape[-1] - self.channels * self.dim], dim=-1)[0]
                mv = mv.view(*mv.shape[:-1], self.channels, self.dim)
            reference = mv[..., self.pseudoscalar].mean(-1)  # pseudoscalar coefficient, per atom
        m, h = self.first(mv, s) if flat is None else self.first.forward_flat(flat)
        x = gated_gelu(self.bilinear(m, reference))
        return self.last(x, nn.functional.gelu(h))


class GATrBlock(nn.Module):
    def __init__(self, buffers: AlgebraBuffers, cfg: GATrConfig):
        super().__init__()
        self.norm1 = EquiLayerNorm(buffers, cfg.scalar_channels, channels=cfg.channels)
        self.attention = MVAttention(buffers, cfg)
        self.norm2 = EquiLayerNorm(buffers, cfg.scalar_channels, channels=cfg.channels)
        self.mlp = GeometricMLP(buffers, cfg)

    def forward(self, mv, s, receivers, senders, phi, distances=None, rbf=None, radial=None, reference=None):
        a_mv, a_s = self.attention(None, None, receivers, senders, phi, distances, rbf, radial, flat=self.norm1.flat(mv, s))
        mv, s = mv + a_mv, s + a_s
        m_mv, m_s = self.mlp(None, None, flat=self.norm2.flat(mv, s), reference=reference)
        return mv + m_mv, s + m_s


class GATrRepresentation(nn.Module):
    """Per-atom invariant outputs y [N] from atoms, positions and a neighbor list."""

    def __init__(self, cfg: GATrConfig):
        super().__init__()
        self.config = cfg
        self.algebra_name = cfg.algebra
        ga = algebra(cfg.algebra)
        self.buffers_module = AlgebraBuffers(ga)
        C, S = cfg.channels, cfg.scalar_channels
        self.embedding = nn.Embedding(cfg.max_z, S)
        self.input = EquiLinear(self.buffers_module, 1, C, S, S)
        self.blocks = nn.ModuleList(GATrBlock(self.buffers_module, cfg) for _ in range(cfg.num_layers))
        self.final_norm = EquiLayerNorm(self.buffers_module, S, channels=C)
        self.head = nn.Sequential(nn.Linear(S + C, S), nn.SiLU(), nn.Linear(S, 1))
        self.attention_cutoff = cfg.cutoff_upper
        # the point embedding P(x) = c + A x + |x|^2 q as buffers (no host-to-device copy per call,
        # which a CUDA-graph capture would refuse)
        c, a, q = point_embedding_matrix(cfg.algebra)
        dtype = torch.get_default_dtype()
        self.register_buffer("point_constant", torch.tensor(np.array(c), dtype=dtype), persistent=False)
        self.register_buffer("point_linear", torch.tensor(np.array(a), dtype=dtype), persistent=False)
        self.register_buffer("point_quadratic", torch.tensor(np.array(q), dtype=dtype), persistent=False)
        self.quadratic_points = bool(np.any(q))
        # join_reference 'input': the e123 coefficient (w) of a point, ±1 for the input points
        self.input_reference = cfg.uses_join and cfg.join_reference == "input"
        if self.input_reference:
            w_index, w_sign, _, _ = _trivector_point_readout(cfg.algebra)
            self.w_index, self.w_sign = w_index, w_sign

    def features(self, mv, s, receivers, senders, phi, return_hidden: bool = False, distances=None, reference=None):
        """The blocks on given multivector and scalar channels (the equivariance tests call this
        with arbitrary multivectors); returns (mv, s) after the final norm, and the hidden list.
        ``reference`` [N]: the join's factor (``join_reference: input``; the input points' w,
        :meth:`forward`); None: the e123 coefficient of ``mv``'s channel mean (a pseudoscalar
        of E(3) for any multivector: translations and rotations keep it, reflections flip it)."""
        if self.input_reference and reference is None:
            reference = mv[..., self.w_index].mean(-1) * self.w_sign
        hidden = [(mv, s)]
        rbf, biases = None, [None] * len(self.blocks)
        radial = self.blocks[0].attention.radial
        if radial is not None and distances is not None:  # the same Gaussians in every block (config)
            rbf = radial.rbf(distances.unsqueeze(-1))
            biases = radial_biases([block.attention.radial for block in self.blocks], rbf)
        layers = [m for m in self.blocks.modules() if isinstance(m, EquiLinear)]
        with prepared_matrices(layers):
            for block, bias in zip(self.blocks, biases):
                mv, s = block(mv, s, receivers, senders, phi, distances, rbf, bias, reference)
            hidden.append((mv, s))
        mv, s = self.final_norm(mv, s)
        return (mv, s, hidden) if return_hidden else (mv, s)

    def readout(self, mv, s):
        return self.head(torch.cat([s, mv[..., 0]], dim=-1)).squeeze(-1)

    def embed(self, z, pos, batch, num_structures: int):
        """(mv [N, C, D], s [N, S]) of the input layer, positions relative to the centroids."""
        centred = pos - structure_centroids(pos, batch, num_structures)[batch]
        points = self.point_constant + centred @ self.point_linear.T
        if self.quadratic_points:
            points = points + (centred * centred).sum(-1, keepdim=True) * self.point_quadratic
        return points.unsqueeze(1), self.embedding(z)  # [N, 1, D], [N, S]

    def forward(self, z, pos, batch, num_structures: int, edge_index, distances, mask: Optional[torch.Tensor] = None,
                return_hidden: bool = False):
        N = z.shape[0]
        points, s = self.embed(z, pos, batch, num_structures)
        phi = cutoff_weights(distances, self.attention_cutoff, mask)
        receivers, senders, phi = with_self_edges(edge_index, phi, N)
        lengths = torch.cat([distances, torch.zeros(N, dtype=distances.dtype, device=distances.device)])
        copies = 2 if self.config.averages_sign else 1
        if copies == 2:
            points = torch.cat([points, -points])
            s = torch.cat([s, s])
            receivers = torch.cat([receivers, receivers + N])
            senders = torch.cat([senders, senders + N])
            phi = torch.cat([phi, phi])
            lengths = torch.cat([lengths, lengths])
        reference = points[:, 0, self.w_index] * self.w_sign if self.input_reference else None
        mv, s = self.input(points, s)
        out = self.features(mv, s, receivers, senders, phi, return_hidden=return_hidden, distances=lengths,
                            reference=reference)
        y = self.readout(out[0], out[1])
        if copies == 2:
            y = 0.5 * (y[:N] + y[N:])
        return (y, out[2]) if return_hidden else y
