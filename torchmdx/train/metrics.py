"""Loss terms and errors accumulated over a whole epoch (exact, not a mean of batch means).

Per structure b (n_b atoms) and force component (a, k)::

    ΔE_b = E_pred,b − E_ref,b  (eV)          ΔF_ak = F_pred,ak − F_ref,ak  (eV/Å)
    energy MAE  = Σ_b |ΔE_b| / B              energy RMSE  = sqrt(Σ_b ΔE_b² / B)
    per-atom    = the same with ΔE_b / n_b
    force MAE   = Σ_ak |ΔF_ak| / (3N)         force RMSE   = sqrt(Σ_ak ΔF_ak² / (3N))
    stress MAE  = Σ_bkl |Δσ_bkl| / (9B)       stress RMSE  = sqrt(Σ_bkl Δσ_bkl² / (9B))   (periodic data)

(force errors over Cartesian components, as TorchMD-NET, MACE and NequIP report them).
:class:`EpochErrors` keeps the sums in float64 as torchmetrics states with ``sum`` reduction,
so under DDP :meth:`EpochErrors.compute` returns the errors over every rank's structures.
Reported values are in meV, meV/atom, meV/Å and meV/Å³.
"""

from __future__ import annotations

from typing import Optional

import torch
import torchmetrics

from torchmdx.units import EV_TO_MEV



def loss_terms(error: torch.Tensor, kind: str, huber_delta: float = 0.01) -> torch.Tensor:
    """Element-wise loss of an error: x² (mse), |x| (l1) or Huber (quadratic below
    ``huber_delta``, linear above: δ(|x| − δ/2)), same shape as ``error``."""
    if kind == "mse":
        return error * error
    if kind == "l1":
        return error.abs()
    if kind == "huber":
        return torch.nn.functional.huber_loss(error, torch.zeros_like(error), reduction="none", delta=huber_delta)
    raise ValueError(f"unknown loss {kind!r}")


#: the energy and force states, in the order of :func:`error_sums`
SUM_STATES = ("n_structures", "energy_abs", "energy_sq", "energy_loss", "energy_pa_abs", "energy_pa_sq",
              "n_components", "forces_abs", "forces_sq", "forces_loss")


def error_sums(energy_error: Optional[torch.Tensor], n_atoms: torch.Tensor, force_error: Optional[torch.Tensor],
               loss: str = "mse", huber_delta: float = 0.01, energy_loss: str = "per_structure",
               structure_weight: Optional[torch.Tensor] = None,
               atom_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The energy and force error sums of one batch as a float64 vector (:data:`SUM_STATES`):
    counts, Σ|ΔE|, ΣΔE², Σ loss(ΔE), the same per atom, component count, Σ|ΔF|, ΣΔF², Σ loss(ΔF).

    ``structure_weight`` [B] / ``atom_weight`` [N] (1 real, 0 padding; a packed batch) leave the
    padding out; ``energy_error`` or ``force_error`` None adds nothing for them. Device work
    only (no host read), so it can run inside a CUDA graph."""
    zero = n_atoms.new_zeros((), dtype=torch.float64)
    out = [zero] * len(SUM_STATES)
    if energy_error is not None:
        e = energy_error.detach().to(torch.float64)
        w = torch.ones_like(e) if structure_weight is None else structure_weight.detach().to(torch.float64)
        e = torch.where(w > 0, e, torch.zeros_like(e))
        per_atom = e / n_atoms.to(torch.float64).clamp(min=1)
        target = per_atom if energy_loss == "per_atom" else e
        out[0:6] = [w.sum(), (w * e.abs()).sum(), (w * e * e).sum(),
                    (w * loss_terms(target, loss, huber_delta)).sum(),
                    (w * per_atom.abs()).sum(), (w * per_atom * per_atom).sum()]
    if force_error is not None:
        x = force_error.detach().to(torch.float64)
        if atom_weight is None:
            w = torch.ones_like(x[..., 0]) if x.dim() > 1 else torch.ones_like(x)
        else:
            w = atom_weight.detach().to(torch.float64)
        w = w.reshape(w.shape + (1,) * (x.dim() - w.dim())).expand_as(x)
        x = torch.where(w > 0, x, torch.zeros_like(x))
        out[6:10] = [w.sum(), (w * x.abs()).sum(), (w * x * x).sum(), (w * loss_terms(x, loss, huber_delta)).sum()]
    return torch.stack(out)


def take_sums(sums: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A copy of an on-device sum accumulator, which restarts at 0 (None stays None)."""
    if sums is None:
        return None
    taken = sums.clone()
    sums.zero_()
    return taken


_STATES = ("n_structures", "energy_abs", "energy_sq", "energy_loss", "energy_pa_abs", "energy_pa_sq",
           "n_components", "forces_abs", "forces_sq", "forces_loss",
           "n_stress", "stress_abs", "stress_sq", "stress_loss")
#: (count state, state prefix) of the per-component errors: force and stress components
_COMPONENTS = (("n_components", "forces"), ("n_stress", "stress"))


class EpochErrors(torchmetrics.Metric):
    """Sums of energy and force errors and loss terms over an epoch (float64 states)."""

    full_state_update = False

    def __init__(self, loss: str = "mse", huber_delta: float = 0.01, energy_loss: str = "per_structure"):
        super().__init__()
        # (not "energy_loss": that is the name of a state)
        self.loss_kind, self.huber_delta, self.energy_loss_mode = loss, huber_delta, energy_loss
        for name in _STATES:
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _apply(self, fn, *args, **kwargs):
        # keep the sums in float64 when the module is cast (module.float() / precision plugins)
        out = super()._apply(fn, *args, **kwargs)
        for name in _STATES:
            value = getattr(self, name)
            if torch.is_tensor(value) and value.dtype != torch.float64:
                setattr(self, name, value.to(torch.float64))
        return out

    def update(self, energy_error: Optional[torch.Tensor], n_atoms: torch.Tensor,
               force_error: Optional[torch.Tensor] = None, stress_error: Optional[torch.Tensor] = None) -> None:
        """``energy_error`` [B] eV (or None), ``n_atoms`` [B], ``force_error`` [N, 3] eV/Å (or
        None), ``stress_error`` eV/Å³, any shape: the stress components with a reference (or None)."""
        sums = error_sums(energy_error, n_atoms, force_error, self.loss_kind, self.huber_delta,
                          self.energy_loss_mode)
        self.add_sums(sums)
        if stress_error is not None:
            x = stress_error.detach().to(torch.float64)
            self.n_stress += x.numel()
            self.stress_abs += x.abs().sum()
            self.stress_sq += (x * x).sum()
            self.stress_loss += loss_terms(x, self.loss_kind, self.huber_delta).sum()

    def add_sums(self, sums: torch.Tensor) -> None:
        """Add a vector of :func:`error_sums` (energy and force sums, in :data:`SUM_STATES` order)."""
        for index, name in enumerate(SUM_STATES):
            setattr(self, name, getattr(self, name) + sums[index].to(torch.float64))
        # what torchmetrics' update wrapper does: count the update (else compute() warns that it
        # ran before any update) and drop a cached result
        self._update_count += 1
        self._computed = None

    def compute(self) -> dict:
        """Errors in meV (energy), meV/atom, meV/Å, and the mean loss terms (eV², eV, ...).
        Keys are missing for quantities that were never given."""
        out = {}
        n = float(self.n_structures)
        if n > 0:
            out["energy_mae"] = EV_TO_MEV * float(self.energy_abs) / n
            out["energy_rmse"] = EV_TO_MEV * (float(self.energy_sq) / n) ** 0.5
            out["energy_per_atom_mae"] = EV_TO_MEV * float(self.energy_pa_abs) / n
            out["energy_per_atom_rmse"] = EV_TO_MEV * (float(self.energy_pa_sq) / n) ** 0.5
            out["energy_loss"] = float(self.energy_loss) / n
        for count, name in _COMPONENTS:
            m = float(getattr(self, count))
            if m > 0:
                out[f"{name}_mae"] = EV_TO_MEV * float(getattr(self, f"{name}_abs")) / m
                out[f"{name}_rmse"] = EV_TO_MEV * (float(getattr(self, f"{name}_sq")) / m) ** 0.5
                out[f"{name}_loss"] = float(getattr(self, f"{name}_loss")) / m
        return out

    @property
    def empty(self) -> bool:
        return float(self.n_structures) == 0 and float(self.n_components) == 0 and float(self.n_stress) == 0


def weighted_loss(errors: dict, energy_weight: float, force_weight: float,
                  stress_weight: float = 0.0) -> Optional[float]:
    """energy_weight · mean energy loss + force_weight · mean force loss (+ stress_weight · mean
    stress loss) from :meth:`EpochErrors.compute` (terms with zero weight are left out; None if a
    weighted term is missing)."""
    total = 0.0
    for weight, key in ((energy_weight, "energy_loss"), (force_weight, "forces_loss"),
                        (stress_weight, "stress_loss")):
        if weight > 0:
            if key not in errors:
                return None
            total += weight * errors[key]
    return total
