"""Local Metropolis updates and the self-learning Monte Carlo (SLMC) step, over a batch of
independent chains.

Local update (one step, every chain at once): pick a site uniformly at random, propose a new
spin there (:class:`LocalProposal`: a symmetric proposal, q(a→b) = q(b→a)), accept with
min(1, exp(-β ΔE)). One step is reversible with respect to exp(-β E), and so is any number of
steps in a row (a power of a reversible kernel is reversible); a fixed sweep order would not be.

SLMC step (Liu, Qi, Meng, Fu 2017): from x, run ``n_local`` local steps under the effective
energy E_eff to reach y; accept y with

    min(1, exp(-β [(E(y) - E(x)) - (E_eff(y) - E_eff(x))]))

where E is the exact energy. Since the local run's kernel q satisfies
q(x→y) exp(-β E_eff(x)) = q(y→x) exp(-β E_eff(y)), the SLMC kernel satisfies detailed balance
with respect to exp(-β E): the chain samples the exact model whatever E_eff is; a better E_eff
only raises the acceptance. Each step costs one exact diagonalisation per chain.

Randomness comes only from the ``torch.Generator`` passed in, drawn in a fixed order, so a run
restarted from saved spins and generator state continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

EnergyFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LocalProposal:
    """A new spin for one site: uniform on the sphere (``step`` None), the old spin plus
    ``step`` times a Gaussian 3-vector, renormalised (its law depends only on the angle to
    the old spin, so it is symmetric), or a uniform draw from the finite set ``spin_set``
    [D, 3] (for exact enumeration tests)."""

    step: Optional[float] = None
    spin_set: Optional[torch.Tensor] = None

    def __call__(self, old: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b = old.shape[0]
        if self.spin_set is not None:
            pick = torch.randint(len(self.spin_set), (b,), generator=generator)
            return self.spin_set[pick].to(old.dtype)
        g = torch.randn(b, 3, dtype=old.dtype, generator=generator)
        new = g if self.step is None else old + self.step * g
        return new / new.norm(dim=-1, keepdim=True).clamp_min(1e-300)


@torch.no_grad()
def local_metropolis(energy_fn: EnergyFn, spins: torch.Tensor, energies: torch.Tensor, beta: float, n_steps: int,
                     proposal: LocalProposal, generator: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n_steps`` single-site Metropolis steps on every chain (spins [B, N, 3], energies [B]).
    Returns the new spins, their energies and the number of accepted steps per chain."""
    spins, energies = spins.clone(), energies.clone()
    b, n, _ = spins.shape
    rows = torch.arange(b)
    accepted = torch.zeros(b, dtype=torch.long)
    for _ in range(int(n_steps)):
        site = torch.randint(n, (b,), generator=generator)
        new_spin = proposal(spins[rows, site], generator)
        u = torch.rand(b, dtype=torch.float64, generator=generator)
        trial = spins.clone()
        trial[rows, site] = new_spin
        trial_energies = energy_fn(trial)
        accept = u < torch.exp(-beta * (trial_energies - energies))
        spins = torch.where(accept[:, None, None], trial, spins)
        energies = torch.where(accept, trial_energies, energies)
        accepted += accept
    return spins, energies, accepted


@dataclass
class ChainState:
    """The chains between SLMC steps: spins [B, N, 3], exact energies [B], effective energies
    [B], and any other per-chain values the exact function returned (``extras``, each [B])."""

    spins: torch.Tensor
    energy: torch.Tensor
    effective_energy: torch.Tensor
    extras: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {"spins": self.spins, "energy": self.energy, "effective_energy": self.effective_energy,
                "extras": dict(self.extras)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "ChainState":
        return cls(state["spins"], state["energy"], state["effective_energy"], dict(state.get("extras") or {}))


@torch.no_grad()
def slmc_step(state: ChainState, exact_fn: EnergyFn, effective_fn: EnergyFn, beta: float, n_local: int,
              proposal: LocalProposal, generator: torch.Generator, accept_all: bool = False
              ) -> tuple[ChainState, torch.Tensor, dict]:
    """One SLMC step for every chain. Returns the new state, the accepted mask [B] and
    diagnostics (the local acceptance of the effective run, the log acceptance ratios, the
    proposed spins and their exact energies).
    ``exact_fn`` returns the exact energies [B], or a dict with them under ``omega`` and other
    per-chain values that follow the chains (``state.extras``).
    ``accept_all`` skips the exact correction (a broken sampler: for tests only)."""
    proposed, eff_new, local_acc = local_metropolis(effective_fn, state.spins, state.effective_energy, beta, n_local,
                                                    proposal, generator)
    exact_out = exact_fn(proposed)
    extras_new = dict(exact_out) if isinstance(exact_out, dict) else {}
    exact_new = extras_new.pop("omega") if isinstance(exact_out, dict) else exact_out
    u = torch.rand(len(proposed), dtype=torch.float64, generator=generator)
    log_ratio = -beta * ((exact_new - state.energy) - (eff_new - state.effective_energy))
    accept = torch.ones_like(u, dtype=torch.bool) if accept_all else u < torch.exp(log_ratio)
    new = ChainState(
        spins=torch.where(accept[:, None, None], proposed, state.spins),
        energy=torch.where(accept, exact_new, state.energy),
        effective_energy=torch.where(accept, eff_new, state.effective_energy),
        extras={k: torch.where(accept, v, state.extras[k]) for k, v in extras_new.items()},
    )
    info = {"local_acceptance": local_acc.double() / max(int(n_local), 1), "log_ratio": log_ratio,
            "proposed": proposed, "proposed_energy": exact_new}
    return new, accept, info


def effective_energy_fn(model: torch.nn.Module, chunk: int = 4096) -> EnergyFn:
    """E_eff as a no-grad function of spins, evaluated in chunks."""

    @torch.no_grad()
    def fn(spins: torch.Tensor) -> torch.Tensor:
        return torch.cat([model(spins[i:i + chunk]) for i in range(0, len(spins), chunk)])

    return fn
