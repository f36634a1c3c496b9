"""Observables of spin configurations and statistics of Monte Carlo series.

- Structure factor S(q) = (1/N) |Σ_j S_j exp(i q·r_j)|² (summed over the three spin
  components) on the L × L grid of wave vectors; S(0)/N = m², S(π,π)/N = m_s² on even L.
- Magnetisation m = |Σ_j S_j| / N and staggered magnetisation m_s = |Σ_j (-1)^(x+y) S_j| / N.
- Integrated autocorrelation time (Sokal's windowing): τ_int(W) = 1/2 + Σ_{t=1..W} ρ(t), with
  the smallest window W >= c · τ_int(W); τ_int = 1/2 for independent samples (the variance of
  a mean of n samples is 2 τ_int σ² / n). ρ(t) is averaged over chains, each centred on the
  mean over all chains.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from torchmdx.lattice.geometry import SquareLattice


def structure_factor(spins: torch.Tensor, lattice: SquareLattice) -> torch.Tensor:
    """[..., N] S(q) for spins [..., N, 3], q in the order of ``lattice.momenta``."""
    r = lattice.coords.to(torch.float64)
    phase = lattice.momenta @ r.T  # [Nq, N]
    cos, sin = torch.cos(phase), torch.sin(phase)
    s = spins.to(torch.float64)
    re = torch.einsum("qj,...jc->...qc", cos, s)
    im = torch.einsum("qj,...jc->...qc", sin, s)
    return (re.pow(2) + im.pow(2)).sum(-1) / lattice.n_sites


def magnetisation(spins: torch.Tensor) -> torch.Tensor:
    return spins.sum(-2).norm(dim=-1) / spins.shape[-2]


def staggered_magnetisation(spins: torch.Tensor, lattice: SquareLattice) -> torch.Tensor:
    sign = 1.0 - 2.0 * (lattice.coords.sum(-1) % 2).to(torch.float64)
    return (spins * sign[:, None]).sum(-2).norm(dim=-1) / spins.shape[-2]


def spin_observables(spins: torch.Tensor, lattice: SquareLattice) -> dict[str, torch.Tensor]:
    return {"m": magnetisation(spins), "m_stag": staggered_magnetisation(spins, lattice)}


def autocorrelation(series: np.ndarray) -> np.ndarray:
    """Normalised autocorrelation ρ(t), t = 0..T-1, of series [chains, T] (mean over chains)."""
    x = np.asarray(series, dtype=float)
    if x.ndim == 1:
        x = x[None]
    n = x.shape[1]
    x = x - x.mean()
    size = 1 << (2 * n - 1).bit_length()
    f = np.fft.rfft(x, size, axis=1)
    acf = np.fft.irfft(f * np.conj(f), size, axis=1)[:, :n]
    acf = acf.mean(0) / (n - np.arange(n))
    if acf[0] <= 0:
        return np.ones(n) if n else acf
    return acf / acf[0]


def integrated_autocorrelation_time(series: np.ndarray, c: float = 5.0) -> tuple[float, int]:
    """(τ_int, window) of series [chains, T] or [T] (see the module docstring); a constant
    series gives (nan, 0), a series too short for the window gives the estimate at the end."""
    x = np.asarray(series, dtype=float)
    if x.ndim == 1:
        x = x[None]
    if x.shape[1] < 2 or np.allclose(x, x.flat[0]):
        return math.nan, 0
    rho = autocorrelation(x)
    tau = 0.5
    for w in range(1, len(rho)):
        tau += rho[w]
        if w >= c * tau:
            return float(tau), w
    return float(tau), len(rho) - 1


def mean_and_error(series: np.ndarray, c: float = 5.0) -> tuple[float, float]:
    """Mean of series [chains, T] and its error sqrt(2 τ_int var / n) (τ_int as above)."""
    x = np.asarray(series, dtype=float)
    tau, _ = integrated_autocorrelation_time(x, c)
    if not math.isfinite(tau):
        tau = 0.5
    return float(x.mean()), float(math.sqrt(2 * max(tau, 0.5) * x.var() / x.size))
