"""Restart files of the native engine: what continues a run, writing it, reading it back.

Restart files are written after rebuilding the neighbor list (which wraps periodic positions
into the cell); a continued run builds its list from the same positions and carries on with the
saved forces, velocities, thermostat variables, random-generator state and chunk length, so it
reproduces the original run bit for bit (on the same device, in the same mode).

:class:`RestartFiles` is mixed into :class:`torchmdx.md.engine.Simulation` (it uses the
simulation's state, system, integrator, generator, force field and atom order); the file
format itself (``torch.save`` of a dict, written atomically) is :mod:`torchmdx.md.io`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from torchmdx.errors import DataError
from torchmdx.md.io import load_restart, save_restart
from torchmdx.md.system import MDState


class RestartFiles:
    """The restart-file methods of :class:`torchmdx.md.engine.Simulation` (module docstring)."""

    def restart_payload(self) -> dict:
        """Everything needed to continue this run (tensors on the CPU; per-atom ones in the input
        order, ``atom_order`` the engine's order of them, None for the input order)."""
        st, s = self.state, self.system
        cpu = lambda t: None if t is None else self.to_input(t.detach()).cpu()  # noqa: E731
        structures = []
        positions = cpu(st.positions)
        for b, start in enumerate(s.offsets):
            atoms = self.input_templates[b].copy()
            atoms.calc = None
            atoms.set_positions(positions[start:start + s.counts[b]].double().numpy())
            structures.append(atoms)
        return {
            "step": st.step,
            "time_ps": self.time_ps(st.step),
            "timestep_fs": self.timestep_fs,
            "ensemble": self.ensemble,
            "temperature_K": self.temperature_K,
            "seed": self.seed,
            "dtype": str(self.dtype).replace("torch.", ""),
            "z": cpu(s.z),
            "counts": list(s.counts),
            "cell": None if s.cell is None else s.cell.detach().cpu(),
            "pbc": None if s.pbc is None else s.pbc.detach().cpu(),
            "structures": structures,
            "positions": positions,
            "velocities": cpu(st.velocities),
            "forces": cpu(st.forces),
            "energy": st.energy.detach().cpu(),
            "thermostat_energy": st.thermostat_energy.detach().cpu(),
            "atom_order": None if self.atom_perm is None else [int(a) for a in self.atom_perm],
            "integrator": {k: v.detach().cpu() if torch.is_tensor(v) else v
                           for k, v in self.integrator.state_dict().items()},
            "rng_state": self.generator.get_state(),
            "check_interval_now": self._interval,
            "model": self._model_record(),  # a continued run's model is checked against it
        }

    def _model_record(self) -> dict:
        """The potential's name (a file's, set by ``torchmdx md``; None from Python) and weights digest, made once."""
        if getattr(self, "model_record", None) is None:
            from torchmdx.md.loading import model_digest

            self.model_record = {"name": None, "digest": model_digest(self.forcefield.potential)}
        return self.model_record

    def time_ps(self, step: int) -> float:
        """The simulated time at ``step`` (ps): continuous across restarts with another time step."""
        return getattr(self, "time_origin_ps", 0.0) + step * self.timestep_fs * 1e-3

    def save_restart(self, path) -> None:
        """Rebuild the neighbor list (wrapping periodic positions), then write the restart file
        atomically (a crash while writing leaves the previous one)."""
        self.state.positions = self.forcefield.build(self.state.positions)
        save_restart(path, self.restart_payload())
        self.last_restart_path = Path(path)

    def load_restart(self, path_or_payload, check_model: bool = True) -> MDState:
        """Continue from a restart file: state, thermostat variables (same ensemble only),
        random-generator state and step. The structures must match (same atoms, same order), and
        with ``check_model`` the potential must be the one the file was written with (its weights
        digest, :func:`torchmdx.md.loading.check_restart_model`; ``torchmdx md`` checks that
        before it writes anything and passes False)."""
        payload = path_or_payload if isinstance(path_or_payload, dict) else load_restart(path_or_payload)
        where = "" if isinstance(path_or_payload, dict) else f"{path_or_payload}: "
        if check_model:  # from Python another potential continued the run without a word (round 28's leftover)
            from torchmdx.md.loading import check_restart_model

            check_restart_model(str(path_or_payload) if where else "the restart payload", payload,
                                self.forcefield.potential, "potential", "the Simulation's")
        s = self.system
        z = payload["z"]
        if list(payload["counts"]) != list(s.counts):
            raise DataError(
                f"{where}restart file holds {len(payload['counts'])} structure(s) of {list(payload['counts'])} atoms "
                f"that do not match the structures given ({list(s.counts)} atoms)"
            )
        given = self.to_input(s.z).cpu()
        if not torch.equal(z, given):  # the same counts: "[3] atoms that do not match ... ([3] atoms)" said nothing
            from torchmdx.nn.normalised import element_symbol

            i = int((z != given).nonzero()[0, 0])
            b = int(np.searchsorted(np.cumsum(list(s.counts)), i, side="right"))  # sorting keeps structures together
            raise DataError(f"{where}atom {i - sum(list(s.counts)[:b])} of structure {b} is {element_symbol(int(given[i]))}, "
                            f"but in the restart file it is {element_symbol(int(z[i]))}: the restart file was written "
                            "for other structures (or another atom order)")
        to = dict(device=self.device, dtype=self.dtype)
        self.state = MDState(
            positions=self.from_input(payload["positions"].to(**to)),
            velocities=self.from_input(payload["velocities"].to(**to)),
            forces=self.from_input(payload["forces"].to(**to)),
            energy=payload["energy"].to(**to),
            thermostat_energy=payload["thermostat_energy"].to(**to),
            step=int(payload["step"]),
        )
        if payload.get("ensemble") == self.ensemble:
            self.integrator.load_state_dict({k: v.to(**to) for k, v in payload["integrator"].items()})
        self.generator.set_state(payload["rng_state"])
        from torchmdx.md.io import time_origin_ps

        self.time_origin_ps = time_origin_ps(payload, self.timestep_fs)  # another --dt: the time goes on
        self._interval = int(payload.get("check_interval_now", self.check_interval))
        # the file was written right after a list build at these (wrapped) positions
        self.state.positions = self.forcefield.build(self.state.positions, wrap=False)
        return self.state
