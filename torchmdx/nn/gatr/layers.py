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

import numpy as np
import torch
from torch import nn

from torchmdx.nn.gatr.algebra import Algebra
from torchmdx.nn.graph_attention import QKVLinear, Upgradable, drop_key_bias, query_key_value_bias


def _sparse_form(table: np.ndarray):
    """(index [D, D], coef [D, D]) with (x ∘ y)_k = Σ_i coef[i, k] x_i y_{index[i, k]}: every
    product table of the algebra has at most one non-zero j for each (i, k)."""
    dim = table.shape[0]
    index = np.zeros((dim, dim), dtype=np.int64)
    coef = np.zeros((dim, dim))
    for i in range(dim):
        for k in range(dim):
            js = np.nonzero(table[i, :, k])[0]
            if len(js) > 1:
                raise AssertionError("product table is not a signed permutation per (i, k)")
            if len(js) == 1:
                index[i, k] = js[0]
                coef[i, k] = table[i, js[0], k]
    return index, coef


class AlgebraBuffers(nn.Module):
    """The algebra's tables as (non-persistent) buffers in the model's dtype and device."""

    def __init__(self, ga: Algebra):
        super().__init__()
        self.algebra = ga
        dtype = torch.get_default_dtype()
        gp_index, gp_coef = _sparse_form(ga.gp)
        join_index, join_coef = _sparse_form(ga.join)
        self.register_buffer("gp_index", torch.as_tensor(gp_index), persistent=False)
        self.register_buffer("gp_coef", torch.as_tensor(gp_coef, dtype=dtype), persistent=False)
        self.register_buffer("join_index", torch.as_tensor(join_index), persistent=False)
        self.register_buffer("join_coef", torch.as_tensor(join_coef, dtype=dtype), persistent=False)
        self.register_buffer("linear_basis", torch.tensor(np.array(ga.linear_basis), dtype=dtype), persistent=False)
        self.register_buffer("inner_weights", torch.tensor(np.array(ga.inner_weights), dtype=dtype), persistent=False)
        onehot = np.zeros((ga.dim, ga.n + 1))
        onehot[np.arange(ga.dim), ga.grades] = 1.0
        self.register_buffer("grade_onehot", torch.as_tensor(onehot, dtype=dtype), persistent=False)

    @staticmethod
    def _product(x, y, index, coef):
        # out_k = sum_i x_i coef_ik y_{index_ik}: a batched vector-matrix product (counted as FLOPs)
        gathered = y[..., index] * coef  # [..., D(i), D(k)]
        return torch.einsum("...i,...ik->...k", x, gathered)

    def geometric_product(self, x, y):
        return self._product(x, y, self.gp_index, self.gp_coef)

    def join(self, x, y):
        return self._product(x, y, self.join_index, self.join_coef)

    def inner(self, x, y):
        """⟨x̃ y⟩_0 over the last dimension."""
        return (x * y * self.inner_weights).sum(-1)


class EquiLinear(Upgradable):
    """Equivariant linear map (C_in mv, S_in scalars) -> (C_out mv, S_out scalars).

    ``qkv``: the outputs are the query, key and value thirds of an attention layer, which get no
    key bias (the grade-0 and scalar biases hold the query and value thirds only; an old file's
    full biases load without their key thirds: :mod:`torchmdx.nn.graph_attention`)."""

    def __init__(self, buffers: AlgebraBuffers, in_mv: int, out_mv: int, in_s: int, out_s: int, gain: float = 1.0,
                 qkv: bool = False):
        super().__init__()
        self.buffers_ = [buffers]  # not a submodule (shared)
        num_maps = buffers.algebra.linear_basis.shape[0]
        self.out_mv, self.dim = out_mv, buffers.algebra.dim
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

    def forward(self, mv, s=None):
        basis = self.buffers_[0].linear_basis
        matrix = torch.einsum("oim,mab->oaib", self.weight, basis).reshape(self.out_mv * self.dim, -1)
        out = (mv.reshape(*mv.shape[:-2], -1) @ matrix.T).reshape(*mv.shape[:-2], self.out_mv, self.dim)
        grade0 = self._bias(self.mv_bias)
        if self.s_to_mv is not None and s is not None:
            grade0 = grade0 + s @ self.s_to_mv.T
        out = torch.cat([out[..., :1] + grade0.unsqueeze(-1), out[..., 1:]], dim=-1)
        s_out = None
        if self.mv_to_s is not None:
            s_out = mv[..., 0] @ self.mv_to_s.T
            if self.scalar is not None and s is not None:
                s_out = s_out + self.scalar(s)
            elif self.s_bias is not None:
                s_out = s_out + self._bias(self.s_bias)
        return out, s_out


class EquiLayerNorm(nn.Module):
    """Equivariant layer norm of the multivectors, LayerNorm of the scalars."""

    def __init__(self, buffers: AlgebraBuffers, scalars: int, eps: float = 1e-6):
        super().__init__()
        self.buffers_ = [buffers]
        self.eps = eps
        self.scalar_norm = nn.LayerNorm(scalars) if scalars else None

    def forward(self, mv, s):
        b = self.buffers_[0]
        per_grade = (mv * mv * b.inner_weights) @ b.grade_onehot  # [..., C, grades]
        squared = per_grade.abs().sum(-1).mean(-1, keepdim=True)  # [..., 1]
        mv = mv / torch.sqrt(squared + self.eps).unsqueeze(-1)
        return mv, (self.scalar_norm(s) if self.scalar_norm is not None else s)


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
        out = b.geometric_product(both[..., :g, :], both[..., g:2 * g, :])
        if j:
            joined = b.join(both[..., 2 * g:2 * g + j, :], both[..., 2 * g + j:, :])
            out = torch.cat([out, joined * reference.unsqueeze(-1).unsqueeze(-1)], dim=-2)
        return out
