"""The numbers and the table of an SLMC run's report (:mod:`torchmdx.lattice.run`): acceptance
diagnostics (spread of the log acceptance ratios and the acceptance it implies, the residual
decomposition of that spread into fit error over states and proposals and their correlation, the
expected acceptance E[min(1, e^r)]), structure-factor errors from per-chain means, and the
summary table the CLI prints."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def log_ratio_statistics(log_ratio: torch.Tensor) -> dict:
    """Spread of the log acceptance ratios -β[(Ω(y) - Ω(x)) - (E_eff(y) - E_eff(x))] of every
    proposal, and the acceptance that a Gaussian spread s with the detailed-balance mean -s²/2
    gives: erfc(s / 2√2). With s ≈ √(2(1 - ρ)) β·RMS (ρ: correlation of the fit residual between
    a configuration and its proposal), this ties the fit error to the acceptance."""
    s = float(log_ratio.std()) if log_ratio.numel() > 1 else math.nan
    return {"log_ratio_mean": float(log_ratio.mean()), "log_ratio_std": s,
            "acceptance_from_log_ratio_std": math.erfc(s / (2 * math.sqrt(2))) if s == s else math.nan}


@torch.no_grad()
def residual_decomposition(model: torch.nn.Module, states: tuple[torch.Tensor, torch.Tensor],
                           proposals: tuple[torch.Tensor, torch.Tensor], beta: float, chains: int) -> dict:
    """Where the spread of the log acceptance ratios comes from. The log ratio of a proposal y
    from the chain state x is β (r(y) - r(x)) with r = E_eff - Ω, so its spread is
    β √(RMS_x² + RMS_y² - 2 ρ RMS_x RMS_y). ``states``: (spins, Ω) of the chain after every step,
    ``proposals``: (spins, Ω) of every step's proposals, both step-major ([steps * chains, ...]);
    the proposal of step t starts from the state after step t - 1. Returns β·RMS of the residual
    over the states x and over the proposals y (each about its mean) and their correlation ρ."""
    def residual(spins, omega):
        return (torch.cat([model(spins[i:i + 2048]) for i in range(0, len(spins), 2048)]) - omega).reshape(-1, chains)

    x = residual(*states)[:-1].flatten()
    y = residual(*proposals)[1:].flatten()
    if len(x) < 2:
        return {}
    return {"beta_rmse_states": beta * float(x.std()), "beta_rmse_proposals": beta * float(y.std()),
            "residual_correlation": float(torch.corrcoef(torch.stack([x, y]))[0, 1])}


def _stacked(pairs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """[(spins, Ω), ...] per step -> (all spins, all Ω), step-major."""
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def expected_acceptance(log_ratio: torch.Tensor) -> dict:
    """The acceptance as the mean of min(1, e^r) over the log ratios r [steps, chains] of every
    proposal (the expectation of the accept indicator given the proposal: the same mean without
    the coin's own variance), with its error from the spread of the per-chain means."""
    p = log_ratio.clamp(max=0.0).exp()
    per_chain = p.mean(0)
    n = per_chain.numel()
    return {"acceptance_expected": float(per_chain.mean()),
            "acceptance_expected_error": float(per_chain.std() / math.sqrt(n)) if n > 1 else math.nan}


def _chain_mean_and_error(per_chain: torch.Tensor) -> dict:
    """S(q) [Nq] and its error from per-chain means [chains, Nq] (independent chains)."""
    chains = per_chain.shape[0]
    error = per_chain.std(0) / math.sqrt(chains) if chains > 1 else torch.full_like(per_chain[0], math.nan)
    return {"structure_factor": per_chain.mean(0).tolist(), "structure_factor_error": error.tolist()}


def format_summary(summary: dict, run_dir: Path) -> str:
    """The table the CLI prints."""
    ref = summary["exact_local_mc"]
    lines = [f"μ = {summary['mu']:.6g}   exact local MC: Ω/N = {ref['omega']:.5f} ± {ref['omega_error']:.5f}, "
             f"m_s = {ref['m_stag']:.4f} ± {ref['m_stag_error']:.4f}, τ(Ω) = {ref['tau_omega']:.2f} samples",
             f"{'model':<16}{'params':>7}{'β·rmse':>9}{'accept':>14}{'E[min(1,e^r)]':>16}{'τ(Ω)':>8}{'Ω/N':>20}"
             f"{'m_s':>18}"]
    for r in summary["models"]:
        expected = (f"{r['acceptance_expected']:>8.3f} ± {r['acceptance_expected_error']:.3f}"
                    if "acceptance_expected" in r else f"{'-':>16}")
        lines.append(f"{r['name']:<16}{r['parameters']:>7}{r['fit']['beta_val_rmse']:>9.3f}"
                     f"{r['acceptance']:>8.3f} ± {r['acceptance_error']:.3f}{expected}{r['tau_omega']:>8.2f}"
                     f"{r['omega']:>11.5f} ± {r['omega_error']:.5f}{r['m_stag']:>9.4f} ± {r['m_stag_error']:.4f}")
    lines.append(f"run folder {run_dir}: summary.json, acceptance_vs_layers.png, structure_factor.png, "
                 "samples_<model>.csv, models/")
    return "\n".join(lines)
