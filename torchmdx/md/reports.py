"""What an MD run gives out, the same for the native and the ASE engine.

:class:`Observation` (host copies of one output step) goes to every :class:`Reporter` (the file
writers are in :mod:`torchmdx.md.run`); :class:`RunSummary` closes a run. :func:`model_problem`
is the one-line message for a model whose output at the initial positions is not finite.
Used by :class:`torchmdx.md.engine.Simulation` and :mod:`torchmdx.md.ase_engine`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

if TYPE_CHECKING:
    from torchmdx.md.engine import Simulation


@dataclass
class Observation:
    """Host copies of one output step. Per structure arrays are [B]; positions [N, 3] Å,
    velocities [N, 3] Å/ASE-time, forces [N, 3] eV/Å; stress [B, 3, 3] eV/Å³ (periodic only)."""

    step: int
    time_ps: float
    positions: np.ndarray
    velocities: np.ndarray
    forces: np.ndarray
    potential: np.ndarray
    kinetic: np.ndarray
    temperature: np.ndarray
    conserved: np.ndarray
    pressure_bar: Optional[np.ndarray] = None
    stress: Optional[np.ndarray] = None
    volume_A3: Optional[np.ndarray] = None
    density_g_cm3: Optional[np.ndarray] = None

    def rows(self) -> list[dict]:
        """Thermo-log rows, one per structure."""
        out = []
        for b in range(len(self.potential)):
            row = {
                "step": self.step,
                "time_ps": self.time_ps,
                "structure": b,
                "potential_eV": float(self.potential[b]),
                "kinetic_eV": float(self.kinetic[b]),
                "total_eV": float(self.potential[b] + self.kinetic[b]),
                "temperature_K": float(self.temperature[b]),
                "conserved_eV": float(self.conserved[b]),
            }
            for key in ("pressure_bar", "volume_A3", "density_g_cm3"):
                values = getattr(self, key)
                if values is not None:
                    row[key] = float(values[b])
            out.append(row)
        return out


class Reporter:
    """Receives observations at output steps; see :class:`torchmdx.md.run` for the file ones."""

    def report(self, simulation: "Simulation", observation: Observation) -> None:  # pragma: no cover
        pass

    def report_failure(self, simulation: "Simulation", observation: Observation) -> None:
        """The last good state of a run that stopped (default: report it like any other)."""
        self.report(simulation, observation)

    def close(self) -> None:
        pass


@dataclass
class RunSummary:
    steps: int
    wall_s: float
    steps_per_s: float
    ns_per_day: float
    atoms: int
    structures: int
    energy_drift_eV_per_atom: float
    energy_drift_eV_per_atom_per_ns: float
    neighbor_list_builds: int
    replays: int
    final_temperature_K: list = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            f"steps            {self.steps}  ({self.wall_s:.2f} s)",
            f"speed            {self.steps_per_s:.1f} steps/s, {self.ns_per_day:.3f} ns/day",
            f"atoms            {self.atoms} in {self.structures} structure(s)",
            f"energy drift     {self.energy_drift_eV_per_atom:.3e} eV/atom "
            f"({self.energy_drift_eV_per_atom_per_ns:.3e} eV/atom/ns, of the conserved energy)",
            f"neighbor lists   {self.neighbor_list_builds} builds, {self.replays} replayed chunks",
            "temperature      " + ", ".join(f"{t:.1f}" for t in self.final_temperature_K) + " K (final)",
        ]


def non_finite_weight(potential) -> Optional[str]:
    """The name of the first parameter or buffer of ``potential`` holding NaN/inf, else None."""
    for name, tensor in list(potential.named_parameters()) + list(potential.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def model_problem(what: str, potential) -> str:
    """The message for a model whose output at the initial positions is ``what`` (non-finite):
    a model problem (weights named when they hold NaN/inf), not one of the structure."""
    name = non_finite_weight(potential)
    if name is not None:
        return (f"the model's weights are not finite (NaN/inf in '{name}'): it gives {what} at the initial "
                "positions; it comes from a diverged training run (retrain it, e.g. with a lower learning rate)")
    return (f"the model gives {what} at the initial positions: check the model (torchmdx evaluate on its test "
            "set), and the structure for atoms on top of each other")
