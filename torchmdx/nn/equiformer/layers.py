"""Equivariant operations on irreps features (Liao & Smidt, ICLR 2023, Sec. 3.1 "Equivariant
operations for irreps features"), built on e3nn.

A feature of irreps ``Σ_l C_l x l`` (e3nn's layout: each irrep block is C_l contiguous vectors of
2l + 1 components) transforms under a rotation or reflection g with the block-diagonal
Wigner-D matrix D(g). Every operation here commutes with D(g):

- linear layers (``e3nn.o3.Linear``): channel mixing within each degree and parity, biases on
  even scalars (0e) only;
- :class:`EquivariantLayerNorm`: layer norm per degree, on norms;
- :func:`gate`: the gate activation (SiLU on scalars, sigmoid gates multiplying the l > 0 or odd
  channels);
- :class:`DepthwiseTensorProduct`: the depth-wise tensor product of a feature with the spherical
  harmonics of an edge, weighted per edge by a radial MLP.

The linear layers, tensor products and gates run grouped fast paths (``fast.py``: a few large
operations instead of one or more per irreps path; the layer norm's and the leaky ReLU's are
here); e3nn's code and the per-degree loops stay beside them as references
(:func:`reference_ops`, compared in tests/test_equiformer_fast.py).

Tensor products use Clebsch-Gordan coefficients C (e3nn's ``o3.TensorProduct``), the paper's
tensor product (Sec. 2.3):  (x ⊗ y)^{(L)}_M = Σ_{m1, m2} C^{(L, M)}_{(l1, m1), (l2, m2)} x^{(l1)}_{m1} y^{(l2)}_{m2}.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from e3nn import nn as e3nn_nn
from e3nn import o3
from torch import nn

from torchmdx.nn.equiformer.fast import (  # noqa: F401  (reference_ops: re-exported)
    DepthwiseTensorProductPlan,
    GroupedGate,
    GroupedLinear,
    reference_enabled,
    reference_ops,
)


def is_even_scalar(ir) -> bool:
    return ir.l == 0 and ir.p == 1


class SmoothLeakyReLU(nn.Module):
    """The attention non-linearity (Sec. 3.2): a smooth leaky ReLU with slope ``a`` for x -> -inf,
    f(x) = (1 + a)/2 · x + (1 - a)/2 · x · (2 σ(x) - 1), smooth everywhere (forces need two
    derivatives in force training)."""

    def __init__(self, negative_slope: float = 0.2):
        super().__init__()
        self.negative_slope = float(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.negative_slope
        if reference_enabled():
            return 0.5 * (1 + a) * x + 0.5 * (1 - a) * x * (2 * torch.sigmoid(x) - 1)
        # the same function: (1 + a)/2 x + (1 - a)/2 x (2σ - 1) = a x + (1 - a) x σ(x)
        return torch.add(a * x, torch.nn.functional.silu(x), alpha=1 - a)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class EquivariantLayerNorm(nn.Module):
    """Layer norm of irreps features (Sec. 3.1, "Layer normalization"). Per degree l (C channels
    x_c of 2l + 1 components):

        even scalars (0e):  x_c <- x_c - mean_c(x_c)
        σ_l = sqrt( mean_c( |x_c|² / (2l + 1) ) + eps )
        x_c <- γ_c · x_c / σ_l  (+ β_c for even scalars)

    Only norms and scalar means enter, so the layer commutes with rotations and reflections
    (a mean of odd scalars or of l > 0 vectors is not subtracted, nor is a bias added to them).
    """

    def __init__(self, irreps, eps: float = 1e-5):
        super().__init__()
        self.irreps = o3.Irreps(irreps)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(self.irreps.num_irreps))
        self.bias = nn.Parameter(torch.zeros(sum(mul for mul, ir in self.irreps if is_even_scalar(ir))))
        # the fast path's constant matrices (products with them, not gathers: a gather's backward
        # writes a zero tensor and scatters into it, a product's is one product): per block the
        # averaging weights (even-scalar means, mean squares), and the spreading of per-block,
        # per-channel and per-bias values over the components
        nb, nc, dim = len(self.irreps), self.irreps.num_irreps, self.irreps.dim
        mean, var = torch.zeros(dim, nb, dtype=torch.float64), torch.zeros(dim, nb, dtype=torch.float64)
        spread_block, spread_channel = torch.zeros(nb, dim, dtype=torch.float64), torch.zeros(nc, dim, dtype=torch.float64)
        spread_bias = torch.zeros(self.bias.numel(), dim, dtype=torch.float64)
        channel, ib = 0, 0
        for k, ((mul, ir), block) in enumerate(zip(self.irreps, self.irreps.slices())):
            var[block, k] = 1.0 / (mul * ir.dim)
            spread_block[k, block] = 1.0
            for c in range(mul):
                spread_channel[channel + c, block.start + c * ir.dim: block.start + (c + 1) * ir.dim] = 1.0
            channel += mul
            if is_even_scalar(ir):
                mean[block, k] = 1.0 / mul
                for c in range(mul):
                    spread_bias[ib + c, block.start + c] = 1.0
                ib += mul
        self.centre = ib > 0
        dtype = torch.get_default_dtype()
        # x -> the mean of its even-scalar block at every component: one [dim, dim] product
        centring = mean @ spread_block
        for name, value in [("centring", centring), ("var_matrix", var), ("spread_block", spread_block),
                            ("spread_channel", spread_channel), ("spread_bias", spread_bias)]:
            self.register_buffer(name, value.to(dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if reference_enabled():
            return self.reference(x)
        if self.centre:  # minus the mean of each even-scalar block (zero for the others)
            x = x - x @ self.centring
        inv = torch.rsqrt((x * x) @ self.var_matrix + self.eps) @ self.spread_block
        scale = inv * (self.weight[None] @ self.spread_channel)
        if self.bias.numel() == 0:
            return x * scale
        return torch.addcmul(self.bias[None] @ self.spread_bias, x, scale)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The per-degree loop (the fast path's reference)."""
        out, iw, ib = [], 0, 0
        for (mul, ir), block in zip(self.irreps, self.irreps.slices()):
            field = x[:, block].reshape(-1, mul, ir.dim)
            if is_even_scalar(ir):
                field = field - field.mean(dim=1, keepdim=True)
            variance = field.pow(2).mean(dim=(1, 2), keepdim=True)
            field = field * torch.rsqrt(variance + self.eps) * self.weight[iw: iw + mul].view(1, mul, 1)
            iw += mul
            if is_even_scalar(ir):
                field = field + self.bias[ib: ib + mul].view(1, mul, 1)
                ib += mul
            out.append(field.reshape(-1, mul * ir.dim))
        return torch.cat(out, dim=-1)

    def extra_repr(self) -> str:
        return f"{self.irreps}, eps={self.eps}"


def gate(irreps_out) -> nn.Module:
    """The gate activation (Sec. 3.1, "Gate activation") whose output irreps are ``irreps_out``:
    even scalars go through SiLU; every other irrep x (l > 0, or odd scalars) is multiplied by
    sigmoid(g) of one extra even scalar g. The module's ``irreps_in`` is what a linear layer
    must produce for it (scalars, then gates, then gated irreps)."""
    irreps_out = o3.Irreps(irreps_out).simplify()
    scalars = o3.Irreps([(mul, ir) for mul, ir in irreps_out if is_even_scalar(ir)])
    gated = o3.Irreps([(mul, ir) for mul, ir in irreps_out if not is_even_scalar(ir)])
    if gated.dim == 0:
        return e3nn_nn.Activation(scalars, [torch.nn.functional.silu] * len(scalars))
    gates = o3.Irreps(f"{gated.num_irreps}x0e")
    return GroupedGate(scalars, gates, gated)


class RadialMLP(nn.Module):
    """Edge weights from radial basis values: Linear -> LayerNorm -> SiLU per hidden width, then a
    Linear to ``out_features`` (the paper's radial function of the depth-wise tensor product)."""

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LayerNorm(h), nn.SiLU()]
            width = h
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, rbf: torch.Tensor) -> torch.Tensor:
        return self.net(rbf)


class DepthwiseTensorProduct(nn.Module):
    """Depth-wise tensor product (Sec. 3.1): every channel u of every input irrep l1 is combined
    with the edge's spherical harmonics Y^{(l2)} into each allowed output irrep L, with one weight
    per (path, channel) — no mixing of channels (e3nn's 'uvu' mode); a linear layer after it mixes
    channels. Output irreps L are those present in ``irreps_target`` (plus 0e, which the attention
    needs). Weights come per edge from the caller (a radial MLP) or, with ``internal_weights``,
    are learned and shared by all edges.

        y_{u, L} = w_{u, path}(r_ij) · (x_u^{(l1)} ⊗ Y^{(l2)}(r̂_ij))^{(L)}
    """

    def __init__(self, irreps_in, irreps_sh, irreps_target, internal_weights: bool = False):
        super().__init__()
        irreps_in, irreps_sh, irreps_target = o3.Irreps(irreps_in), o3.Irreps(irreps_sh), o3.Irreps(irreps_target)
        wanted = {ir for _, ir in irreps_target} | {o3.Irrep("0e")}
        outputs, instructions = [], []
        for i, (mul, ir_in) in enumerate(irreps_in):
            for j, (_, ir_sh) in enumerate(irreps_sh):
                for ir_out in ir_in * ir_sh:
                    if ir_out in wanted:
                        instructions.append((i, j, len(outputs), "uvu", True))
                        outputs.append((mul, ir_out))
        self.irreps_in, self.irreps_sh = irreps_in, irreps_sh
        self.irreps_out = o3.Irreps(outputs)
        self.tp = o3.TensorProduct(
            irreps_in, irreps_sh, self.irreps_out, instructions,
            internal_weights=internal_weights, shared_weights=internal_weights,
        )
        self.weight_numel = self.tp.weight_numel
        self.plan = DepthwiseTensorProductPlan(self.tp)

    def forward(self, x: torch.Tensor, sh: torch.Tensor, weight: torch.Tensor | None = None,
                raw: bool = False) -> torch.Tensor:
        """With ``raw`` the fast path's output columns are in the plan's order, for linear layers
        set up with ``GroupedLinear.take_input_order(dtp.plan.out_index)`` (the reference path
        ignores it, and so do those layers)."""
        if reference_enabled():
            return self.tp(x, sh, weight)
        return self.plan.apply(x, sh, self.tp.weight if weight is None else weight, raw=raw)


class BesselRBF(nn.Module):
    """Spherical Bessel radial basis with a polynomial envelope (DimeNet, Gasteiger et al. 2020;
    the authors' QM9 U0 model uses 8 of them), d = r / r_c:

        e_n(r) = u(d) · sqrt(2 / r_c) · sin(ω_n d) / r,   ω_n = n π  (n = 1..K; trainable with ``trainable``)
        u(d) = 1 - (p+1)(p+2)/2 d^p + p(p+2) d^(p+1) - p(p+1)/2 d^(p+2)  for d < 1, else 0;  p = 5

    u and its first two derivatives vanish at the cutoff. At r = 0 (padding rows) the limit ω_n / r_c
    stands in for sin(ω_n d) / r, so no 0/0 enters."""

    def __init__(self, cutoff_lower: float, cutoff_upper: float, num_rbf: int, trainable: bool, exponent: int = 5):
        super().__init__()
        self.cutoff_upper = float(cutoff_upper)
        self.exponent = int(exponent)
        frequencies = math.pi * torch.arange(1, num_rbf + 1, dtype=torch.get_default_dtype())
        if trainable:
            self.frequencies = nn.Parameter(frequencies)
        else:
            self.register_buffer("frequencies", frequencies)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        rc, p = self.cutoff_upper, self.exponent
        d = (r / rc).unsqueeze(-1)
        positive = d > 0
        safe = torch.where(positive, d, torch.ones_like(d))
        sinc = torch.where(positive, torch.sin(self.frequencies * safe) / safe, self.frequencies)
        envelope = 1 - (p + 1) * (p + 2) / 2 * d**p + p * (p + 2) * d ** (p + 1) - p * (p + 1) / 2 * d ** (p + 2)
        envelope = torch.where(d < 1, envelope, torch.zeros_like(envelope))
        return envelope * math.sqrt(2.0 / rc) / rc * sinc


def scalar_slices(irreps) -> list[slice]:
    """Slices of the even-scalar blocks of ``irreps``."""
    irreps = o3.Irreps(irreps)
    return [block for (mul, ir), block in zip(irreps, irreps.slices()) if is_even_scalar(ir)]


def head_index(irreps, num_heads: int) -> torch.Tensor:
    """[irreps.dim] long: the attention head of each component. Within an irrep block of C
    channels, channels h·C/H .. (h+1)·C/H - 1 belong to head h (every component of a channel
    in the same head), so multiplying each component by its head's weight is equivariant."""
    index = []
    for mul, ir in o3.Irreps(irreps):
        per_head = mul // num_heads
        for c in range(mul):
            index += [c // per_head] * ir.dim
    return torch.tensor(index, dtype=torch.long)


def glorot_(tensor: torch.Tensor) -> torch.Tensor:
    """Uniform Glorot initialisation over the last two dimensions (fan_in + fan_out)."""
    bound = math.sqrt(6.0 / (tensor.shape[-2] + tensor.shape[-1]))
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)
