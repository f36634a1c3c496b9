"""Effective models of the spin energy: the linear baseline and the equivariant transformer.

Both map spins [B, N, 3] (float64 unit vectors) to an energy [B] that should follow the exact
Ω(S) of :mod:`torchmdx.lattice.fermions` up to a constant, and both end in the same readout::

    E_eff = E_0 + Σ_n J_n Σ_{pairs i<j at distance r_n} S̃_i · S̃_j

with S̃ = S for the linear model (the classic SLMC effective Hamiltonian, fitted by least
squares) and S̃ = the effective spins of the transformer's last layer (Nagai & Tomiya's
construction: the linear model on spins that have seen the whole configuration through
attention). A transformer with zero layers is the linear model.

Transformer layer (H heads, all weights scalars, so every step commutes with a global O(3)
rotation or reflection of all spins, and every table depends on r_j - r_i only, so it commutes
with lattice translations)::

    Q^h_i = Σ_k wq^h_k Σ_j C_k[i, j] x_j         (k = 0: the site itself, k >= 1: the k-th shell;
    K^h_i, V^h_i likewise with wk, wv             x the spins entering the layer, 3-vectors)
    a^h_ij = softmax_j( Q^h_i · K^h_j / √3 + b^h[shell(i, j)] )
    x_i ← normalise( x_i + Σ_h Σ_j a^h_ij V^h_j )

The scores use only rotation invariants (dot products of spin-built vectors) and positional
terms b^h that depend on the distance |r_j - r_i| (shell index, 0 for i = j, over the whole
lattice: attention is global; they start at -slope_h |r_j - r_i|, :func:`locality_bias`); the
update is a sum of vectors with invariant coefficients, and the normalisation keeps unit
effective spins. ``wv`` starts at ``init_value`` (0 by default: each
layer starts as the identity, so a new transformer starts as exactly the linear model it is
initialised from, or as the shallower transformer it is grown from, and training adds to it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from torchmdx.lattice.geometry import SquareLattice


def pair_sums(spins: torch.Tensor, shells: torch.Tensor) -> torch.Tensor:
    """[B, n_shells] Σ_{pairs i<j in shell n} S_i · S_j for spins [B, N, 3] and 0/1 shell
    matrices [n_shells, N, N] (symmetric, zero diagonal)."""
    gram = spins @ spins.transpose(-1, -2)  # [B, N, N]
    return 0.5 * torch.einsum("nij,bij->bn", shells, gram)


class LinearEffectiveModel(nn.Module):
    """E_eff = E_0 + Σ_n J_n Σ_{|i-j| = r_n} S_i · S_j over the first ``n_shells`` distances."""

    kind = "linear"

    def __init__(self, L: int, n_shells: int = 3):
        super().__init__()
        self.L, self.n_shells = int(L), int(n_shells)
        lattice = SquareLattice(L)
        self.register_buffer("shells", lattice.shell_matrices(n_shells), persistent=False)
        self.e0 = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.couplings = nn.Parameter(torch.zeros(n_shells, dtype=torch.float64))

    def hyper(self) -> dict:
        return {"kind": self.kind, "L": self.L, "n_shells": self.n_shells}

    def features(self, spins: torch.Tensor) -> torch.Tensor:
        return pair_sums(spins, self.shells)

    def forward(self, spins: torch.Tensor) -> torch.Tensor:
        return self.e0 + self.features(spins) @ self.couplings

    @torch.no_grad()
    def fit(self, spins: torch.Tensor, energies: torch.Tensor) -> None:
        """Least squares for (E_0, J_n) on configurations [M, N, 3] with energies [M]."""
        x = torch.cat([torch.ones(len(spins), 1, dtype=torch.float64), self.features(spins)], dim=1)
        sol = torch.linalg.lstsq(x, energies.to(torch.float64)[:, None], driver="gelsd").solution[:, 0]
        self.e0.copy_(sol[0])
        self.couplings.copy_(sol[1:])


class EquivariantAttention(nn.Module):
    """One layer of O(3)- and translation-equivariant self-attention over the lattice spins."""

    def __init__(self, conv: torch.Tensor, position: torch.Tensor, distances: torch.Tensor, heads: int,
                 init_value: float):
        super().__init__()
        self.register_buffer("conv", conv, persistent=False)  # [K, N, N]
        self.register_buffer("position", position, persistent=False)  # [N, N] long
        k = conv.shape[0]
        self.wq = nn.Parameter(_init(heads, k, 1.0))
        self.wk = nn.Parameter(_init(heads, k, 1.0))
        self.wv = nn.Parameter(_init(heads, k, init_value))
        self.bias = nn.Parameter(locality_bias(heads, distances))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        neighbours = torch.einsum("kij,bjc->bkic", self.conv, x)  # [B, K, N, 3]
        qkv = torch.einsum("hk,bkic->bhic", torch.cat([self.wq / math.sqrt(3.0), self.wk, self.wv]), neighbours)
        q, k, v = qkv.split(self.wq.shape[0], dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) + self.bias[:, self.position]  # [B, H, N, N]
        # softmax(scores) @ v, normalised after the product (a [B, H, N, 3] division instead of
        # [B, H, N, N]); the shift by the row maximum cancels, so it carries no gradient. Twice as
        # fast as Tensor.softmax in float64 on the CPU, the cost of every SLMC local update.
        weights = scores.sub_(scores.detach().amax(dim=-1, keepdim=True)).exp_()
        out = (torch.matmul(weights, v) / weights.sum(dim=-1, keepdim=True)).sum(dim=1)  # [B, N, 3]
        y = x + out
        return y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def locality_bias(heads: int, distances: torch.Tensor) -> torch.Tensor:
    """Initial positional scores [heads, positions]: -slope_h * r with slopes 2, 1, 1/2, ... per
    head (ALiBi-like), so that at the start the heads attend from the nearest sites to the whole
    lattice rather than uniformly over it. ``distances``: r of each position (0 for the site)."""
    slopes = 2.0 ** (1 - torch.arange(heads, dtype=torch.float64))
    return -slopes[:, None] * distances[None, :].to(torch.float64)


def _init(heads: int, k: int, scale: float) -> torch.Tensor:
    w = torch.zeros(heads, k, dtype=torch.float64)
    # deterministic start: each head looks at one neighbour range, plus a small spread
    for h in range(heads):
        w[h, h % k] = scale
    return w + 0.01 * scale * torch.linspace(-1, 1, heads * k, dtype=torch.float64).reshape(heads, k)


class EquivariantTransformer(nn.Module):
    """The linear readout on effective spins from ``layers`` equivariant attention layers.

    ``n_shells``: shells of the energy readout (as the linear model); ``conv_shells``: shells
    (besides the site itself) that the queries, keys and values sum over; ``heads``: attention
    heads per layer; ``init_value``: initial scale of the value weights (0: every layer starts
    as the identity).
    """

    kind = "transformer"

    def __init__(self, L: int, layers: int = 2, heads: int = 4, n_shells: int = 3, conv_shells: int = 1,
                 init_value: float = 0.0):
        super().__init__()
        self.L, self.n_layers, self.heads = int(L), int(layers), int(heads)
        self.n_shells, self.conv_shells, self.init_value = int(n_shells), int(conv_shells), float(init_value)
        lattice = SquareLattice(L)
        n = lattice.n_sites
        conv = torch.cat([torch.eye(n, dtype=torch.float64)[None], lattice.shell_matrices(conv_shells)])
        d2 = lattice.distances_squared
        position = torch.zeros(n, n, dtype=torch.long)
        for k, s in enumerate(lattice.shell_d2, start=1):
            position[d2 == s] = k
        self.readout = LinearEffectiveModel(L, n_shells)
        distances = torch.tensor([0.0] + lattice.shells, dtype=torch.float64)
        self.layers = nn.ModuleList(
            EquivariantAttention(conv, position, distances, heads, init_value) for _ in range(layers)
        )

    def hyper(self) -> dict:
        return {"kind": self.kind, "L": self.L, "layers": self.n_layers, "heads": self.heads,
                "n_shells": self.n_shells, "conv_shells": self.conv_shells, "init_value": self.init_value}

    def effective_spins(self, spins: torch.Tensor) -> torch.Tensor:
        x = spins
        for layer in self.layers:
            x = layer(x)
        return x

    def forward(self, spins: torch.Tensor) -> torch.Tensor:
        return self.readout(self.effective_spins(spins))

    def init_from_linear(self, linear: LinearEffectiveModel) -> None:
        with torch.no_grad():
            self.readout.e0.copy_(linear.e0)
            self.readout.couplings.copy_(linear.couplings)

    def grow_from(self, smaller: "EquivariantTransformer") -> None:
        """Take the readout and the layers of a shallower transformer of the same shape; the
        layers beyond its depth keep their initial weights (identity maps when ``init_value``
        is 0, so the grown model starts as the same function)."""
        if smaller.n_layers > self.n_layers or (smaller.L, smaller.heads, smaller.n_shells, smaller.conv_shells) != (
                self.L, self.heads, self.n_shells, self.conv_shells):
            raise ValueError("grow_from needs a shallower transformer of the same lattice, heads and shells")
        with torch.no_grad():
            self.readout.load_state_dict(smaller.readout.state_dict())
            for mine, theirs in zip(self.layers, smaller.layers):
                mine.load_state_dict(theirs.state_dict())


def build_effective(hyper: dict) -> nn.Module:
    """An effective model from its ``hyper()`` dict (model files, checkpoints)."""
    hyper = dict(hyper)
    kind = hyper.pop("kind")
    if kind == "linear":
        return LinearEffectiveModel(**hyper)
    if kind == "transformer":
        return EquivariantTransformer(**hyper)
    raise ValueError(f"unknown effective model kind {kind!r}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_effective(model: nn.Module, path, meta: dict | None = None) -> None:
    """A self-contained model file: hyper-parameters, weights and ``meta`` (lattice parameters,
    fit report), written atomically."""
    from torchmdx.io_utils import atomic_write

    payload = {"format": "torchmdx-lattice-effective", "version": 1, "hyper": model.hyper(),
               "state_dict": model.state_dict(), "meta": dict(meta or {})}
    with atomic_write(path) as handle:
        torch.save(payload, handle)


def load_effective(path) -> tuple[nn.Module, dict]:
    """(model, meta) from a file written by :func:`save_effective`; one-line ModelError otherwise."""
    from pathlib import Path

    from torchmdx.errors import ModelError

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: effective model file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
        raise ModelError(f"{path}: not a readable effective model file ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != "torchmdx-lattice-effective":
        raise ModelError(f"{path}: not a torchmdx lattice effective model file")
    model = build_effective(payload["hyper"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, payload.get("meta", {})
