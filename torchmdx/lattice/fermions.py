"""The spin-fermion (double-exchange) model and the exact weight of a spin configuration.

Classical unit spins S_i on the sites of an L × L periodic square lattice, coupled to spinful
fermions::

    H(S) = -t Σ_<ij>,σ (c†_iσ c_jσ + h.c.) + (J/2) Σ_i S_i · (c†_i σ c_i)

H is quadratic in the fermions: with the 2N × 2N single-particle matrix h(S) (index 2i + σ;
-t on each nearest-neighbour bond for both spin directions, the 2 × 2 block (J/2) S_i · σ on
site i) and its eigenvalues ε_k, the grand-canonical trace over the fermions is

    Tr exp(-β (H(S) - μ N_e)) = Π_k (1 + exp(-β (ε_k - μ))) = exp(-β Ω(S)),
    Ω(S) = -T Σ_k log(1 + exp(-(ε_k - μ) / T)).

So the spins are distributed as P(S) ∝ exp(-β Ω(S)): Ω is the "exact energy" of a spin
configuration that the effective models learn and the SLMC sampler corrects to. Energies are
in units of t (``t`` sets the scale; the code takes t, J, T and μ as plain numbers); T is k_B T.
The eigenvalues come from ``torch.linalg.eigvalsh`` on a batch of complex128 matrices.

``mu_for_filling`` turns a filling (electrons per site / 2, so 0.5 is half filling) into a fixed
μ: the μ at which the mean electron density over a set of spin configurations (random ones by
default) equals the filling, found by bisection. The run then keeps that μ (grand canonical).
"""

from __future__ import annotations

import torch

from torchmdx.lattice.geometry import SquareLattice


class DoubleExchangeModel:
    """Exact fermion free energy of classical spin configurations (float64/complex128)."""

    def __init__(self, lattice: SquareLattice, t: float = 1.0, J: float = 1.0, temperature: float = 0.1,
                 mu: float = 0.0):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.lattice = lattice
        self.t = float(t)
        self.J = float(J)
        self.temperature = float(temperature)
        self.mu = float(mu)
        n = lattice.n_sites
        hop = -self.t * lattice.hopping_matrix(torch.float64)
        kinetic = torch.zeros(2 * n, 2 * n, dtype=torch.complex128)
        kinetic[0::2, 0::2] = hop
        kinetic[1::2, 1::2] = hop
        self._kinetic = kinetic
        self.eigh_calls = 0  # number of batched diagonalisations (for cost reports)
        self.eigh_matrices = 0  # number of matrices diagonalised

    @property
    def beta(self) -> float:
        return 1.0 / self.temperature

    def hamiltonian(self, spins: torch.Tensor) -> torch.Tensor:
        """[..., 2N, 2N] single-particle matrices h(S) for spins [..., N, 3]."""
        spins = spins.to(torch.float64)
        sx, sy, sz = spins.unbind(-1)
        half = 0.5 * self.J
        h = self._kinetic.expand(*spins.shape[:-2], *self._kinetic.shape).clone()
        n = spins.shape[-2]
        i = torch.arange(n)
        h[..., 2 * i, 2 * i] += half * sz
        h[..., 2 * i + 1, 2 * i + 1] -= half * sz
        h[..., 2 * i, 2 * i + 1] += half * torch.complex(sx, -sy)
        h[..., 2 * i + 1, 2 * i] += half * torch.complex(sx, sy)
        return h

    def eigenvalues(self, spins: torch.Tensor) -> torch.Tensor:
        """[..., 2N] single-particle energies (ascending)."""
        h = self.hamiltonian(spins)
        self.eigh_calls += 1
        self.eigh_matrices += int(h.numel() // (h.shape[-1] * h.shape[-2]))
        return torch.linalg.eigvalsh(h)

    def grand_potential_from_eigenvalues(self, eps: torch.Tensor, mu: float | None = None) -> torch.Tensor:
        mu = self.mu if mu is None else mu
        T = self.temperature
        return -T * torch.logaddexp(torch.zeros((), dtype=eps.dtype), -(eps - mu) / T).sum(-1)

    def energy(self, spins: torch.Tensor) -> torch.Tensor:
        """Ω(S) [...]: the exact energy whose Boltzmann weight exp(-Ω/T) is P(S) up to a constant."""
        return self.grand_potential_from_eigenvalues(self.eigenvalues(spins))

    def occupations(self, eps: torch.Tensor, mu: float | None = None) -> torch.Tensor:
        mu = self.mu if mu is None else mu
        return torch.sigmoid(-(eps - mu) / self.temperature)

    def observables(self, spins: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per configuration: ``omega`` (Ω), ``energy`` (fermion energy <H> = Σ ε_k f_k) and
        ``filling`` (<N_e> / 2N)."""
        eps = self.eigenvalues(spins)
        f = self.occupations(eps)
        return {
            "omega": self.grand_potential_from_eigenvalues(eps),
            "energy": (eps * f).sum(-1),
            "filling": f.sum(-1) / eps.shape[-1],
        }

    def mu_for_filling(self, filling: float, spins: torch.Tensor, tol: float = 1e-10) -> float:
        """μ at which the mean of <N_e> / 2N over ``spins`` [B, N, 3] equals ``filling`` (0 < filling < 1)."""
        if not 0.0 < filling < 1.0:
            raise ValueError(f"filling must be in (0, 1), got {filling}")
        eps = self.eigenvalues(spins)
        lo = float(eps.min()) - 50 * self.temperature - 1.0
        hi = float(eps.max()) + 50 * self.temperature + 1.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            n = float(self.occupations(eps, mid).sum(-1).mean()) / eps.shape[-1]
            if n < filling:
                lo = mid
            else:
                hi = mid
            if hi - lo < tol:
                break
        return 0.5 * (lo + hi)


def random_spins(batch: int, n_sites: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[batch, n_sites, 3] independent unit vectors, uniform on the sphere (float64)."""
    v = torch.randn(batch, n_sites, 3, dtype=torch.float64, generator=generator)
    return v / v.norm(dim=-1, keepdim=True)
