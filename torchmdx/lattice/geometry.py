"""The periodic L × L square lattice: sites, minimum-image displacements, distance shells.

Site ``i = x * L + y`` sits at integer coordinates (x, y), 0 <= x, y < L. A displacement
between two sites is taken in the minimum image: each component in [-L/2, L/2], so every
quantity built from displacements (the shells below, the transformer's positional terms) depends
on ``j - i`` only and is the same for every site: lattice translations permute sites and leave
these tables unchanged.

Distance shells: ``shells[k]`` is the k-th smallest distance |r_j - r_i| over distinct sites
(1, √2, 2, √5, ...); ``shell_matrices(n)[k]`` is the N × N 0/1 matrix of the pairs at the
k-th distance (symmetric, zero diagonal). On small lattices with periodic boundaries a pair can
be joined by several bonds (on L = 2 the two neighbours to the left and right of a site are the
same site); the shell matrices count pairs, the hopping matrix counts bonds (:func:`hopping_matrix`).
"""

from __future__ import annotations

import math
from functools import cached_property

import torch


class SquareLattice:
    """Geometry of an L × L periodic square lattice (no torch state beyond cached tables)."""

    def __init__(self, L: int):
        if L < 2:
            raise ValueError(f"lattice size must be at least 2, got {L}")
        self.L = int(L)
        self.n_sites = self.L * self.L

    @cached_property
    def coords(self) -> torch.Tensor:
        """[N, 2] integer coordinates (x, y) of each site."""
        idx = torch.arange(self.n_sites)
        return torch.stack([idx // self.L, idx % self.L], dim=1)

    @cached_property
    def displacements(self) -> torch.Tensor:
        """[N, N, 2] minimum-image displacement r_j - r_i (components in [-L/2, L/2))."""
        d = self.coords[None, :, :] - self.coords[:, None, :]
        return (d + self.L // 2) % self.L - self.L // 2

    @cached_property
    def distances_squared(self) -> torch.Tensor:
        """[N, N] integer squared minimum-image distances."""
        return (self.displacements**2).sum(-1)

    @cached_property
    def shell_d2(self) -> list[int]:
        """Squared distances of the shells, in increasing order (0 excluded)."""
        values = torch.unique(self.distances_squared)
        return [int(v) for v in values if v > 0]

    @property
    def shells(self) -> list[float]:
        """Distances of the shells, in increasing order: 1, √2, 2, √5, ..."""
        return [math.sqrt(d2) for d2 in self.shell_d2]

    def shell_matrices(self, n_shells: int, dtype=torch.float64) -> torch.Tensor:
        """[n_shells, N, N] 0/1 matrices of the site pairs at the first ``n_shells`` distances."""
        if n_shells > len(self.shell_d2):
            raise ValueError(f"an L = {self.L} lattice has {len(self.shell_d2)} distance shells, asked for {n_shells}")
        d2 = self.distances_squared
        return torch.stack([(d2 == s).to(dtype) for s in self.shell_d2[:n_shells]])

    @cached_property
    def displacement_index(self) -> torch.Tensor:
        """[N, N] index in 0..N-1 of the displacement class r_j - r_i (mod L): the same for
        every pair related by a lattice translation (used for relative-position terms)."""
        d = (self.coords[None, :, :] - self.coords[:, None, :]) % self.L
        return d[..., 0] * self.L + d[..., 1]

    def hopping_matrix(self, dtype=torch.float64) -> torch.Tensor:
        """[N, N] number of nearest-neighbour bonds between each pair (bonds to +x and +y of
        every site; on L = 2 a pair is joined by two bonds)."""
        n = self.n_sites
        a = torch.zeros(n, n, dtype=dtype)
        x, y = self.coords[:, 0], self.coords[:, 1]
        idx = torch.arange(n)
        for dx, dy in ((1, 0), (0, 1)):
            j = ((x + dx) % self.L) * self.L + (y + dy) % self.L
            a.index_put_((idx, j), torch.ones(n, dtype=dtype), accumulate=True)
            a.index_put_((j, idx), torch.ones(n, dtype=dtype), accumulate=True)
        return a

    def translate(self, spins: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
        """Spins [..., N, 3] moved by the lattice translation ``shift`` = (dx, dy)."""
        grid = spins.reshape(*spins.shape[:-2], self.L, self.L, spins.shape[-1])
        grid = torch.roll(grid, shifts=shift, dims=(-3, -2))
        return grid.reshape(spins.shape)

    @cached_property
    def momenta(self) -> torch.Tensor:
        """[N, 2] wave vectors q = 2π (m, n) / L on the L × L grid (0 <= m, n < L)."""
        return 2 * math.pi * self.coords.to(torch.float64) / self.L

    def momentum_path(self) -> tuple[list[int], list[str], list[int]]:
        """Indices into :attr:`momenta` along Γ(0,0) → X(π,0) → M(π,π) → Γ, the labels and the
        positions of the labelled points (for S(q) plots); the lattice needs even L for X and M."""
        half = self.L // 2
        path = [(m, 0) for m in range(half)] + [(half, n) for n in range(half)] + [(m, m) for m in range(half, -1, -1)]
        idx = [m * self.L + n for m, n in path]
        return idx, ["Γ", "X", "M", "Γ"], [0, half, 2 * half, 3 * half]
