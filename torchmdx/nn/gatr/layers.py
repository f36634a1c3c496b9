"""GATr's layers on multivector channels (torch), for any algebra of :mod:`torchmdx.nn.gatr.algebra`.

A hidden state is a pair (mv [..., C, D], s [..., S]): C multivector channels of D = 2^n
components and S auxiliary scalar channels. Every layer is equivariant: it commutes with the
action ρ_u of the algebra's group on each multivector channel and leaves the scalars invariant.

- :class:`EquiLinear`: y_o = Σ_i Σ_m W_oim B_m x_i (+ scalars into the grade-0 component, the
  grade-0 components into the scalars), B_m the algebra's equivariant linear basis.
- :class:`Bilinear`: geometric product GP(L1 x, L2 x) and, optionally, the equivariant join
  (L3 x ∨ L4 x) · r with r the pseudoscalar coefficient of a reference (the join changes sign
  under reflections, so does r: their product is equivariant).
- :func:`gated_gelu`: x · GELU(⟨x⟩_0) per channel.
- :class:`EquiLayerNorm`: x / sqrt(mean_c Σ_k |⟨⟨x_c⟩_k, ⟨x_c⟩_k⟩| + ε) (absolute values per grade:
  the inner product is indefinite in the conformal algebra); ordinary LayerNorm on the scalars.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import nn

from torchmdx.nn.gatr.algebra import Algebra
from torchmdx.nn.graph_attention import QKVLinear, Upgradable, drop_key_bias, query_key_value_bias


def _dense_form(table: np.ndarray) -> np.ndarray:
    """[D*D, D]: (x ∘ y) = (x ⊗ y).flatten() @ T for a product table [D, D, D]."""
    dim = table.shape[0]
    return np.ascontiguousarray(table.reshape(dim * dim, dim))


class AlgebraBuffers(nn.Module):
    """The algebra's tables as (non-persistent) buffers in the model's dtype and device."""

    def __init__(self, ga: Algebra):
        super().__init__()
        self.algebra = ga
        dtype = torch.get_default_dtype()
        self.register_buffer("gp_table", torch.tensor(_dense_form(ga.gp), dtype=dtype), persistent=False)
        self.register_buffer("join_table", torch.tensor(_dense_form(ga.join), dtype=dtype), persistent=False)
        self.register_buffer("linear_basis", torch.tensor(np.array(ga.linear_basis), dtype=dtype), persistent=False)
        self.register_buffer("inner_weights", torch.tensor(np.array(ga.inner_weights), dtype=dtype), persistent=False)
        onehot = np.zeros((ga.dim, ga.n + 1))
        onehot[np.arange(ga.dim), ga.grades] = 1.0
        # Σ_k |Σ_{A in k} w_A x_A²|: with no negative weight (euclidean, projective) every grade's sum
        # is >= 0 and this is Σ_A w_A x_A² (no per-grade sums, no abs)
        self.definite = bool(np.all(ga.inner_weights >= 0))
        self.register_buffer("grade_weights", torch.as_tensor(onehot * np.array(ga.inner_weights)[:, None], dtype=dtype),
                             persistent=False)
        scalar = np.zeros(ga.dim)
        scalar[0] = 1.0
        self.register_buffer("scalar_part", torch.as_tensor(scalar, dtype=dtype), persistent=False)

    @staticmethod
    def _product(x, y, table):
        # (x ⊗ y) [..., D*D] @ table [D*D, D]: two kernels, whatever the batch shape
        outer = (x.unsqueeze(-1) * y.unsqueeze(-2)).flatten(-2)
        return outer @ table

    def geometric_product(self, x, y):
        return self._product(x, y, self.gp_table)

    def join(self, x, y):
        return self._product(x, y, self.join_table)

    def inner(self, x, y):
        """⟨x̃ y⟩_0 over the last dimension."""
        return (x * y * self.inner_weights).sum(-1)


class EquiLinear(Upgradable):
    """Equivariant linear map (C_in mv, S_in scalars) -> (C_out mv, S_out scalars).

    ``qkv``: the outputs are the query, key and value thirds of an attention layer, which get no
    key bias (the grade-0 and scalar biases hold the query and value thirds only; an old file's
    full biases load without their key thirds: :mod:`torchmdx.nn.graph_attention`).

    The map runs as one matrix product on the flattened input [mv (C_in·D), s (S_in)]: the matrix
    (:meth:`matrix`) is built from the parameters once per call (a handful of small kernels that
    do not depend on the number of atoms) and holds the basis maps, the scalar-to-grade-0 and
    grade-0-to-scalar weights and the scalar linear map; the biases are one vector."""

    def __init__(self, buffers: AlgebraBuffers, in_mv: int, out_mv: int, in_s: int, out_s: int, gain: float = 1.0,
                 qkv: bool = False):
        super().__init__()
        self.buffers_ = [buffers]  # not a submodule (shared)
        num_maps = buffers.algebra.linear_basis.shape[0]
        self.in_mv, self.out_mv, self.dim = in_mv, out_mv, buffers.algebra.dim
        self.in_s, self.out_s = in_s, out_s
        self.qkv = qkv
        biases = (lambda n: 2 * n // 3) if qkv else (lambda n: n)
        self.weight = nn.Parameter(torch.empty(out_mv, in_mv, num_maps))
        grade_maps = buffers.algebra.n + 1  # the first n+1 basis maps are the grade projections
        with torch.no_grad():
            self.weight.normal_(0.0, gain / math.sqrt(in_mv + (in_s > 0) * in_s / 2))
            self.weight[:, :, grade_maps:] *= 0.5
        self.mv_bias = nn.Parameter(torch.zeros(biases(out_mv)))
        self.s_to_mv = nn.Parameter(torch.randn(out_mv, in_s) * gain / math.sqrt(max(in_s + in_mv, 1))) if in_s else None
        if in_s and out_s:
            self.scalar = QKVLinear(in_s, out_s // 3) if qkv else nn.Linear(in_s, out_s)
        else:
            self.scalar = None
        self.mv_to_s = nn.Parameter(torch.randn(out_s, in_mv) * gain / math.sqrt(in_mv + in_s)) if out_s else None
        self.s_bias = nn.Parameter(torch.zeros(biases(out_s))) if (out_s and not in_s) else None

    def _bias(self, bias):
        return query_key_value_bias(bias) if self.qkv else bias

    def upgrade_state(self, state_dict, prefix):
        if self.qkv:
            drop_key_bias(state_dict, prefix + "mv_bias", self.mv_bias.shape[0])
            if self.s_bias is not None:
                drop_key_bias(state_dict, prefix + "s_bias", self.s_bias.shape[0])

    def _key(self):
        return (self.qkv, self.in_mv, self.out_mv, self.in_s, self.out_s, type(self.scalar), self.s_bias is None,
                self.s_to_mv is None, self.mv_to_s is None, self.mv_bias.shape[0])

    def matrix(self, scalars: bool = True):
        """(W [out_mv·D + out_s, in_mv·D (+ in_s)], b [out_mv·D + out_s]) with
        [mv_out flat, s_out] = [mv flat, s] @ W.T + b (the s columns only with ``scalars``)."""
        prepared = getattr(self, "_prepared", None)
        if prepared is not None:
            weight, bias = prepared
            if not scalars and self.s_to_mv is not None:
                weight = weight[:, :self.in_mv * self.dim]
            return weight, bias
        return matrices([self], scalars)[0]

    def forward(self, mv, s=None):
        lead = mv.shape[:-2]
        x = mv.reshape(*lead, -1)
        scalars = s is not None and self.s_to_mv is not None
        if scalars:
            x = torch.cat([x, s], dim=-1)
        return self.forward_flat(x, scalars)

    def forward_flat(self, x, scalars: bool = True):
        """:meth:`forward` on the flattened input [..., mv (in_mv·D), s (in_s)] (``scalars``: with the s columns)."""
        lead = x.shape[:-1]
        weight, bias = self.matrix(scalars)
        y = torch.nn.functional.linear(x, weight, bias)
        if self.mv_to_s is None:
            return y.view(*lead, self.out_mv, self.dim), None
        out, s_out = y.split([self.out_mv * self.dim, y.shape[-1] - self.out_mv * self.dim], dim=-1)
        return out.view(*lead, self.out_mv, self.dim), s_out


def matrices(layers, scalars: bool = True):
    """[(W, b)] of :meth:`EquiLinear.matrix` for ``layers`` of one shape and kind, built together
    (one set of kernels for all of them: the blocks' layers of one role)."""
    first = layers[0]
    b = first.buffers_[0]
    L, O, I, D = len(layers), first.out_mv, first.in_mv, first.dim
    e0 = b.scalar_part

    def stacked(get):
        values = [get(layer) for layer in layers]
        return values[0].unsqueeze(0) if L == 1 else torch.stack(values)

    def bias_of(values):  # [L, n] -> [L, 3n/2] with the zero key third (qkv)
        if not first.qkv:
            return values
        query, value = values.chunk(2, dim=-1)
        return torch.cat([query, torch.zeros_like(query), value], dim=-1)

    weight = stacked(lambda m: m.weight)  # [L, O, I, M]
    basis = (weight.reshape(L * O * I, -1) @ b.linear_basis.reshape(-1, D * D)).reshape(L, O, I, D, D)
    top = basis.transpose(2, 3).reshape(L, O * D, I * D)  # rows (o, a), columns (i, b)
    use_s = scalars and first.s_to_mv is not None
    if use_s:
        s_to_mv = stacked(lambda m: m.s_to_mv)  # [L, O, S_in]
        top = torch.cat([top, (s_to_mv.unsqueeze(2) * e0.view(1, 1, D, 1)).reshape(L, O * D, -1)], dim=2)
    bias = (bias_of(stacked(lambda m: m.mv_bias)).unsqueeze(-1) * e0).reshape(L, O * D)
    if first.mv_to_s is not None:
        bottom = (stacked(lambda m: m.mv_to_s).unsqueeze(-1) * e0).reshape(L, -1, I * D)  # s_out from grade 0
        if first.scalar is not None:
            if isinstance(first.scalar, QKVLinear):
                s_bias = bias_of(stacked(lambda m: m.scalar.bias))
            else:
                s_bias = stacked(lambda m: m.scalar.bias)
            if use_s:
                bottom = torch.cat([bottom, stacked(lambda m: m.scalar.weight)], dim=2)
        else:
            s_bias = bias_of(stacked(lambda m: m.s_bias))
            if use_s:  # (never: s_bias exists only without input scalars)
                bottom = torch.cat([bottom, torch.zeros_like(bottom[:, :, :1]).expand(-1, -1, first.in_s)], dim=2)
        top, bias = torch.cat([top, bottom], dim=1), torch.cat([bias, s_bias], dim=1)
    if L == 1:
        return [(top[0], bias[0])]
    return list(zip(top.unbind(0), bias.unbind(0)))


class prepared_matrices:
    """Within it, every EquiLinear of ``layers`` uses its matrix built together with those of the
    same shape and kind (:func:`matrices`): the blocks' layers of one role share one set of
    kernels per call instead of one each."""

    def __init__(self, layers):
        self.layers = list(layers)

    def __enter__(self):
        groups = {}
        for layer in self.layers:
            groups.setdefault(layer._key(), []).append(layer)
        for group in groups.values():
            for layer, prepared in zip(group, matrices(group)):
                layer._prepared = prepared
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            layer._prepared = None
        return False


class EquiLayerNorm(nn.Module):
    """Equivariant layer norm of the multivectors, LayerNorm of the scalars.

    With ``channels`` given (and an inner product without negative weights), :meth:`flat` runs
    both as one computation on [mv flat, s - mean(s)]: both squared norms by one matrix product,
    one rsqrt, one scale-and-shift (LayerNorm's weight and bias in it), which is the same function
    with a cheaper second derivative than the two norms apart."""

    def __init__(self, buffers: AlgebraBuffers, scalars: int, eps: float = 1e-6, channels: Optional[int] = None):
        super().__init__()
        self.buffers_ = [buffers]
        self.eps = eps
        self.scalar_norm = nn.LayerNorm(scalars) if scalars else None
        self.channels, self.scalars = channels, scalars
        self.joint = bool(channels) and bool(scalars) and buffers.definite
        if self.joint:
            ga, dtype = buffers.algebra, torch.get_default_dtype()
            width = channels * ga.dim
            stats = np.zeros((width + scalars, 2))  # columns: mean_c Σ_A w_A x_A², mean_j (s_j - mean s)²
            stats[:width, 0] = np.tile(np.array(ga.inner_weights), channels) / channels
            stats[width:, 1] = 1.0 / scalars
            mv_columns = np.zeros(width + scalars)
            mv_columns[:width] = 1.0
            self.register_buffer("stats", torch.tensor(stats, dtype=dtype), persistent=False)
            self.register_buffer("mv_columns", torch.tensor(mv_columns, dtype=dtype), persistent=False)
            self.register_buffer("epsilons", torch.tensor([eps, self.scalar_norm.eps], dtype=dtype), persistent=False)

    def forward(self, mv, s):
        if self.joint and mv.shape[-2] == self.channels:
            out_mv, out_s = self.flat(mv, s).split([mv.shape[-2] * mv.shape[-1], s.shape[-1]], dim=-1)
            return out_mv.view(mv.shape), out_s
        b = self.buffers_[0]
        if b.definite:  # Σ_k |Σ_{A in k} w_A x_A²| = Σ_A w_A x_A² (every weight >= 0)
            squared = ((mv * mv) @ b.inner_weights).mean(-1, keepdim=True)  # [..., 1]
        else:
            squared = ((mv * mv) @ b.grade_weights).abs().sum(-1).mean(-1, keepdim=True)
        mv = mv * torch.rsqrt(squared + self.eps).unsqueeze(-1)
        return mv, (self.scalar_norm(s) if self.scalar_norm is not None else s)

    def flat(self, mv, s):
        """The normalised [mv flat, s] [..., C·D + S]."""
        if not (self.joint and mv.shape[-2] == self.channels):
            out_mv, out_s = self.forward(mv, s)
            return torch.cat([out_mv.flatten(-2), out_s], dim=-1)
        x = torch.cat([mv.flatten(-2), s - s.mean(-1, keepdim=True)], dim=-1)
        inverse = torch.rsqrt((x * x) @ self.stats + self.epsilons)  # [..., 2]
        width = mv.shape[-2] * mv.shape[-1]
        norm = self.scalar_norm
        scale = torch.stack([self.mv_columns, nn.functional.pad(norm.weight, (width, 0))])  # [2, C·D + S]
        return torch.addcmul(nn.functional.pad(norm.bias, (width, 0)), x, inverse @ scale)


def gated_gelu(mv):
    """x · GELU(⟨x⟩_0) per channel (the gate is invariant)."""
    return mv * nn.functional.gelu(mv[..., :1])


class Bilinear(nn.Module):
    """Geometric product (and join) of two equivariant linear images of the input."""

    def __init__(self, buffers: AlgebraBuffers, channels: int, gp_channels: int, join_channels: int):
        super().__init__()
        self.buffers_ = [buffers]
        self.gp_channels, self.join_channels = gp_channels, join_channels
        self.left_right = EquiLinear(buffers, channels, 2 * (gp_channels + join_channels), 0, 0)

    def forward(self, mv, reference):
        """``reference`` [...]: the pseudoscalar coefficient of a reference multivector (per atom)."""
        b = self.buffers_[0]
        both, _ = self.left_right(mv)
        g, j = self.gp_channels, self.join_channels
        if not j:
            left, right = both.split([g, g], dim=-2)
            return b.geometric_product(left, right)
        left, right, join_left, join_right = both.split([g, g, j, j], dim=-2)
        joined = b.join(join_left * reference.unsqueeze(-1).unsqueeze(-1), join_right)
        return torch.cat([b.geometric_product(left, right), joined], dim=-2)
