"""Building blocks of the ET: radial bases, cosine cutoff, activations, MLP, neighbor embedding.

Distances r in Å. Definitions follow TorchMD-NET's so that imported checkpoints give the same
numbers (the equations are restated in each docstring).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from torchmdx.kernels import pairs as pair_layout
from torchmdx.kernels.message_ref import ACTIVATIONS
from torchmdx.nn.base import spread_where


class Activation(nn.Module):
    """Element-wise activation by name (silu, swish, ssp, tanh, sigmoid, mish)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fn = ACTIVATIONS[name]

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class CosineCutoff(nn.Module):
    """Smooth cutoff phi(r), 0 outside [r_lo, r_hi).

    r_lo = 0:  phi(r) = ½ (cos(π r / r_hi) + 1)                       for r < r_hi
    r_lo > 0:  phi(r) = ½ (cos(π (2 (r - r_lo) / (r_hi - r_lo) + 1)) + 1)  for r_lo < r < r_hi
               (a bump: 0 at r_lo, 1 half-way, 0 at r_hi; TorchMD-NET's definition)
    """

    def __init__(self, cutoff_lower: float, cutoff_upper: float):
        super().__init__()
        self.cutoff_lower = float(cutoff_lower)
        self.cutoff_upper = float(cutoff_upper)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        lo, hi = self.cutoff_lower, self.cutoff_upper
        if lo > 0:
            phi = 0.5 * (torch.cos(math.pi * (2 * (r - lo) / (hi - lo) + 1.0)) + 1.0)
            return phi * ((r < hi) & (r > lo)).to(r.dtype)
        phi = 0.5 * (torch.cos(r * (math.pi / hi)) + 1.0)
        return phi * (r < hi).to(r.dtype)


class ExpNormalRBF(nn.Module):
    """Exp-normal radial basis (PhysNet), K functions.

    e_k(r) = phi_{0,r_hi}(r) · exp(-beta_k (exp(alpha (r_lo - r)) - mu_k)^2),  alpha = 5 / (r_hi - r_lo)
    mu_k evenly spaced in [exp(r_lo - r_hi), 1]; beta_k = (2 (1 - exp(r_lo - r_hi)) / K)^-2.
    phi_{0,r_hi} is the cosine cutoff from 0 (not r_lo) to r_hi.
    """

    def __init__(self, cutoff_lower: float, cutoff_upper: float, num_rbf: int, trainable: bool):
        super().__init__()
        self.cutoff_lower = float(cutoff_lower)
        self.cutoff_upper = float(cutoff_upper)
        self.num_rbf = num_rbf
        self.alpha = 5.0 / (self.cutoff_upper - self.cutoff_lower)
        self.envelope = CosineCutoff(0.0, cutoff_upper)
        means, betas = self.initial_parameters()
        if trainable:
            self.means = nn.Parameter(means)
            self.betas = nn.Parameter(betas)
        else:
            self.register_buffer("means", means)
            self.register_buffer("betas", betas)

    def initial_parameters(self):
        start = math.exp(self.cutoff_lower - self.cutoff_upper)
        dtype = torch.get_default_dtype()
        means = torch.linspace(start, 1.0, self.num_rbf, dtype=dtype)
        betas = torch.full((self.num_rbf,), (2.0 / self.num_rbf * (1.0 - start)) ** -2, dtype=dtype)
        return means, betas

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        r = r.unsqueeze(-1)
        return self.envelope(r) * torch.exp(
            -self.betas * (torch.exp(self.alpha * (self.cutoff_lower - r)) - self.means) ** 2
        )


class GaussianRBF(nn.Module):
    """Gaussian radial basis: e_k(r) = exp(c (r - mu_k)^2), mu_k evenly spaced in [r_lo, r_hi],
    c = -½ / (mu_1 - mu_0)^2 (one shared width)."""

    def __init__(self, cutoff_lower: float, cutoff_upper: float, num_rbf: int, trainable: bool):
        super().__init__()
        self.cutoff_lower = float(cutoff_lower)
        self.cutoff_upper = float(cutoff_upper)
        self.num_rbf = num_rbf
        offset = torch.linspace(self.cutoff_lower, self.cutoff_upper, num_rbf, dtype=torch.get_default_dtype())
        coeff = -0.5 / (offset[1] - offset[0]) ** 2
        if trainable:
            self.offset = nn.Parameter(offset)
            self.coeff = nn.Parameter(coeff)
        else:
            self.register_buffer("offset", offset)
            self.register_buffer("coeff", coeff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.coeff * (r.unsqueeze(-1) - self.offset) ** 2)


RBF_TYPES = {"expnorm": ExpNormalRBF, "gauss": GaussianRBF}


def xavier_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """nn.Linear with Xavier-uniform weights and zero bias (the ET's initialisation)."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    nn.init.xavier_uniform_(layer.weight)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class MLP(nn.Sequential):
    """Linear(in, hidden) -> act -> Linear(hidden, out)."""

    def __init__(self, in_features: int, hidden: int, out_features: int, activation: str):
        super().__init__(xavier_linear(in_features, hidden), Activation(activation), xavier_linear(hidden, out_features))


class NeighborEmbedding(nn.Module):
    """x_i <- W_c [x_i , sum_{j != i} (W_d e(r_ij)) phi(r_ij) ⊙ Emb'(z_j)]  (self pairs excluded).

    ``cutoff_weight`` is phi(r_ij), already 0 on invalid edges.
    """

    def __init__(self, hidden: int, num_rbf: int, max_z: int):
        super().__init__()
        self.embedding = nn.Embedding(max_z, hidden)
        self.distance_proj = xavier_linear(num_rbf, hidden)
        self.combine = xavier_linear(2 * hidden, hidden)

    def forward(self, z, x, edge_index, rbf, cutoff_weight, valid=None, pairs=None):
        """``valid`` [E] (optional): rows with False have phi = 0 and add exact zeros; their adds
        are spread over the atoms (:func:`~torchmdx.nn.base.spread_where`; the padding of a
        fixed-capacity list would all hit atom N - 1). ``pairs=n``: the edges are the all-pairs
        layout of structures of n atoms (:mod:`torchmdx.kernels.pairs`; the diagonal has phi = 0)."""
        w = self.distance_proj(rbf) * cutoff_weight.unsqueeze(-1)
        if pairs is not None:
            messages = pair_layout.as_pairs(w, pairs) * pair_layout.senders_of(self.embedding(z), pairs)
            neighbours = pair_layout.sum_over_senders(messages)
            return self.combine(torch.cat([x, neighbours], dim=-1))
        msg = w * self.embedding(z).index_select(0, edge_index[1])
        receivers = edge_index[0] if valid is None else spread_where(valid, edge_index[0], x.shape[0])
        neighbours = torch.zeros_like(x).index_add(0, receivers, msg)
        return self.combine(torch.cat([x, neighbours], dim=-1))


def safe_norm(v: torch.Tensor, dim: int) -> torch.Tensor:
    """|v| along ``dim`` with zero value and finite (zero) first and second derivatives at v = 0."""
    sq = (v * v).sum(dim)
    nonzero = sq > 0
    return torch.where(nonzero, torch.sqrt(torch.where(nonzero, sq, torch.ones_like(sq))), torch.zeros_like(sq))


class GatedEquivariantBlock(nn.Module):
    """Gated equivariant block (Schütt et al. 2021), scalars x [N, F_in], vectors v [N, 3, F_in]:

        (x', g) = MLP([x, |W_1 v|])          (MLP hidden width F_in, outputs 2 F_out)
        v'      = g ⊙ W_2 v                  (W_1, W_2 without bias)
        x'      = act(x') if scalar_activation
    """

    def __init__(self, in_features: int, out_features: int, activation: str, scalar_activation: bool):
        super().__init__()
        self.out_features = out_features
        self.vec1_proj = xavier_linear(in_features, in_features, bias=False)
        self.vec2_proj = xavier_linear(in_features, out_features, bias=False)
        self.update_net = MLP(2 * in_features, in_features, 2 * out_features, activation)
        self.act = Activation(activation) if scalar_activation else None

    def forward(self, x, v):
        vec1 = safe_norm(self.vec1_proj(v), dim=-2)
        vec2 = self.vec2_proj(v)
        x, gate = torch.split(self.update_net(torch.cat([x, vec1], dim=-1)), self.out_features, dim=-1)
        v = gate.unsqueeze(1) * vec2
        if self.act is not None:
            x = self.act(x)
        return x, v
