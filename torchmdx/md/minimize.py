"""FIRE geometry optimisation on device tensors, one set of FIRE variables per structure.

FIRE (Bitzek, Koskinen, Gähler, Moseler & Gumbsch, PRL 97, 170201, 2006), in the variant of
ASE's ``ase.optimize.FIRE`` (unit masses, a cap on the step length), per structure b:

    P = F·v;  if P > 0:  v ← (1 - α) v + α |v| F/|F|;  after N_min such steps dt ← min(f_inc dt, dt_max), α ← f_α α
              else:      v ← 0;  α ← α_start;  dt ← f_dec dt
    v ← v + dt F;   Δr = dt v, scaled down to |Δr| = maxstep (Å) when longer;   r ← r + Δr

Converged when the largest atomic force |F_a| of every structure is below ``fmax`` (eV/Å).
``dt`` is in ASE's time unit with unit masses, as in ASE (defaults 0.1 / 1.0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from torchmdx.errors import ModelError
from torchmdx.md.forces import ForceField
from torchmdx.md.system import MDState


def collapse_message(step: int, atoms: tuple, distance: float, where: str) -> str:
    """The line for a minimisation whose step ``step`` put ``atoms`` (i, j) of ``where`` on top of each other
    (the model's overlap check): was the model's "atoms 6 and 7 are on top of each other", naming no file,
    step or minimisation, as if the input held a duplicated atom."""
    i, j = atoms
    return (f"the FIRE minimization stopped at step {step}: atoms {i} and {j} of {where} came on top of each other "
            f"({distance:.3g} Å apart): the model pulls them together instead of repelling them (an untrained model, "
            "or distances its training data lacked); check the model (torchmdx evaluate), or run without the "
            "minimization")


@dataclass
class FireResult:
    steps: int
    converged: bool
    fmax: float
    energy_start: list
    energy_end: list


def fire_minimize(
    forcefield: ForceField,
    state: MDState,
    fmax: float = 0.05,
    max_steps: int = 500,
    dt_start: float = 0.1,
    dt_max: float = 1.0,
    maxstep: float = 0.2,
    n_min: int = 5,
    f_inc: float = 1.1,
    f_dec: float = 0.5,
    alpha_start: float = 0.1,
    f_alpha: float = 0.99,
    check_every: int = 5,
    progress=None,
) -> FireResult:
    """Relax ``state.positions`` in place (state.forces/energy updated); see the module docstring.

    ``progress`` is an optional callable(step, fmax_now) for a progress display.
    """
    from torchmdx.md.arguments import real_argument, whole_argument

    # from Python (torchmdx md checks --fmax and --minimize-steps): fmax -1 or NaN ran every step and said "not
    # converged", "0.05" and max_steps "5" were TypeErrors, max_steps 2.5 ran 2 and -1 none
    fmax = real_argument("fmax", fmax, "a force > 0 eV/Å", inclusive=False, finite=False)
    max_steps = whole_argument("max_steps", max_steps, "a whole number of steps >= 0", low=0)
    s = forcefield.system
    b = s.num_structures
    dev, dt_ = s.device, s.dtype
    forcefield.compute(state, careful=True)
    energy_start = state.energy.tolist()
    v = torch.zeros_like(state.positions)
    dt = torch.full((b,), dt_start, dtype=dt_, device=dev)
    alpha = torch.full((b,), alpha_start, dtype=dt_, device=dev)
    n_pos = torch.zeros(b, dtype=torch.long, device=dev)
    largest = float(state.forces.norm(dim=-1).max())
    step = 0
    if largest < fmax:
        return FireResult(0, True, largest, energy_start, energy_start)
    for step in range(1, max_steps + 1):
        f = state.forces
        power = s.sum((f * v).sum(-1))
        v_norm = torch.sqrt(s.sum((v * v).sum(-1)))
        f_norm = torch.sqrt(s.sum((f * f).sum(-1)))
        uphill = power <= 0 if step > 1 else torch.zeros_like(power, dtype=torch.bool)  # ASE: no test at the start
        mixed = (1.0 - alpha)[s.batch].unsqueeze(-1) * v + (
            alpha * v_norm / torch.clamp(f_norm, min=1e-30)
        )[s.batch].unsqueeze(-1) * f
        v = torch.where(uphill[s.batch].unsqueeze(-1), torch.zeros_like(v), mixed)
        grow = (~uphill) & (n_pos > n_min)
        dt = torch.where(uphill, dt * f_dec, torch.where(grow, torch.clamp(dt * f_inc, max=dt_max), dt))
        alpha = torch.where(uphill, torch.full_like(alpha, alpha_start), torch.where(grow, alpha * f_alpha, alpha))
        n_pos = torch.where(uphill, torch.zeros_like(n_pos), n_pos + 1)
        v = v + dt[s.batch].unsqueeze(-1) * f
        dr = dt[s.batch].unsqueeze(-1) * v
        dr_norm = torch.sqrt(s.sum((dr * dr).sum(-1)))
        factor = torch.where(dr_norm > maxstep, maxstep / torch.clamp(dr_norm, min=1e-30), torch.ones_like(dr_norm))
        state.positions = state.positions + dr * factor[s.batch].unsqueeze(-1)
        try:
            forcefield.compute(state, careful=True)
        except ModelError as exc:  # atoms on top of each other (the model's check): the caller names them
            if getattr(exc, "atoms", None) is not None:
                exc.fire_step = step
            raise
        if step % check_every == 0 or step == max_steps:
            largest = float(state.forces.norm(dim=-1).max())
            if progress is not None:
                progress(step, largest)
            if largest < fmax:
                break
    largest = float(state.forces.norm(dim=-1).max())
    return FireResult(step, largest < fmax, largest, energy_start, state.energy.tolist())
