"""Integrators and thermostats on device tensors (no host synchronisation inside a step).

Units: time step ``dt`` in ASE time units (``timestep_fs * units.FS_TO_ASE_TIME``), velocities
in Å per ASE time unit, so a = F/m (eV/Å/amu) needs no factor; temperatures K, k_B T in eV.
Every integrator advances an :class:`MDState` by one step, calling ``compute(state)`` for the
forces at the new positions, and *replaces* state tensors instead of modifying them in place.
Per structure b of the batch the thermostat acts on N_f(b) degrees of freedom (3n - 3: the
centre of mass is kept at rest) and keeps ``state.thermostat_energy`` such that
U + K + thermostat_energy is conserved.

- :class:`VelocityVerlet` (NVE): v += ½dt F/m; r += dt v; F(r); v += ½dt F/m.
- :class:`LangevinBAOAB` (NVT; Leimkuhler & Matthews 2013): B ½dt, A ½dt,
  O: v = c₁ v + sqrt((1 - c₁²) k_B T / m) ξ with c₁ = exp(-γ dt), then the centre-of-mass
  velocity is removed; A ½dt, F(r), B ½dt. ξ is drawn in the input order of the atoms and then
  permuted to the system's (``atom_perm``), so the trajectory of a seed does not depend on the
  order the engine simulates the atoms in.
- :class:`Bussi` (NVT, stochastic velocity rescaling; Bussi, Donadio & Parrinello 2007): before
  each velocity-Verlet step v ← α v with α² = K'/K, where, with c = exp(-dt/τ),
  K̄ = ½ N_f k_B T and R₁, …, R_{N_f} standard normal,
  K' = K + (1 - c)(K̄ (R₁² + Σ_{i≥2} R_i²)/N_f - K) + 2 R₁ sqrt(c (1 - c) K K̄ / N_f).
  Σ_{i≥2} R_i² is drawn as a χ²(N_f - 1) variate (2 × Gamma((N_f - 1)/2)).
- :class:`NoseHooverChain` (NVT; Martyna, Klein & Tuckerman 1992; Trotter splitting of
  Martyna, Tuckerman, Tobias & Klein 1996): a chain of M thermostats per structure with
  masses Q₁ = N_f k_B T τ², Q_k = k_B T τ²; a half step of the chain, a velocity-Verlet step,
  a half step of the chain. Conserved: U + K + Σ_k ½ Q_k v_ξk² + N_f k_B T ξ₁ + k_B T Σ_{k≥2} ξ_k.

Fused steps (:meth:`Integrator.set_fused`): the same step as two pure functions around the force
call (:mod:`torchmdx.md.integrators_fused`), compiled by ``torch.compile`` into a few kernels
instead of 8-40 element-wise launches. The random numbers are drawn here, before the call,
with the same generator calls in the same order, so random streams and restarts are unchanged.
Off by default; the eager methods below are the reference.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from torchmdx import units
from torchmdx.errors import ConfigError
from torchmdx.md.system import MDState, System

ComputeForces = Callable[[MDState], None]


def fs_to_ase_time(timestep_fs: float) -> float:
    return float(timestep_fs) * units.FS_TO_ASE_TIME


class Integrator:
    """Base: velocity-Verlet pieces and the (empty) thermostat state."""

    name = "nve"
    stochastic = False

    def __init__(self, system: System, timestep_fs: float):
        if not (timestep_fs > 0 and math.isfinite(timestep_fs)):
            raise ConfigError(f"time step must be a positive number of fs, got {timestep_fs}")
        self.system = system
        self.timestep_fs = float(timestep_fs)
        self.dt = fs_to_ase_time(timestep_fs)
        self.inverse_masses = (1.0 / system.masses).unsqueeze(-1)
        #: None: the eager step (the reference); else the FusedFunctions the step runs through
        self.fused = None

    def set_fused(self, enabled: bool, compile: bool = True) -> None:
        """Run each step as the pure functions of :mod:`torchmdx.md.integrators_fused`, compiled
        with ``torch.compile`` when ``compile`` (plain otherwise: same operations as the eager
        step), or (``enabled`` False) as the eager step again."""
        if not enabled:
            self.fused = None
            return
        from torchmdx.md.integrators_fused import FusedFunctions

        self.fused = FusedFunctions(compile=compile)

    def _fn(self, name: str, **constants):
        return self.fused.get(name, self.system.device, dt=self.dt, **constants)

    def _step_fused(self, state: MDState, compute: ComputeForces, generator: torch.Generator) -> None:
        state.positions, state.velocities = self._fn("verlet_before")(
            state.positions, state.velocities, state.forces, self.inverse_masses)
        compute(state)
        state.velocities = self._fn("verlet_after")(state.velocities, state.forces, self.inverse_masses)

    # --- pieces ---------------------------------------------------------------------------
    def kick(self, state: MDState, dt: float) -> None:
        """B: v += dt F / m."""
        state.velocities = state.velocities + dt * state.forces * self.inverse_masses

    def drift(self, state: MDState, dt: float) -> None:
        """A: r += dt v."""
        state.positions = state.positions + dt * state.velocities

    def velocity_verlet(self, state: MDState, compute: ComputeForces) -> None:
        self.kick(state, 0.5 * self.dt)
        self.drift(state, self.dt)
        compute(state)
        self.kick(state, 0.5 * self.dt)

    # --- interface ------------------------------------------------------------------------
    def step(self, state: MDState, compute: ComputeForces, generator: torch.Generator) -> None:
        """One step: the fused functions when :meth:`set_fused` is on, else the eager reference."""
        if self.fused is not None:
            self._step_fused(state, compute, generator)
        else:
            self._step_eager(state, compute, generator)
        state.step += 1

    def _step_eager(self, state: MDState, compute: ComputeForces, generator: torch.Generator) -> None:
        self.velocity_verlet(state, compute)

    def state_dict(self) -> dict:
        """Thermostat variables (tensors), for snapshots and restart files."""
        return {}

    def load_state_dict(self, values: dict) -> None:
        pass

    def extra_energy(self, state: MDState) -> torch.Tensor:
        """Energy of the thermostat's own variables (eV) [B] (only the Nosé–Hoover chain has one)."""
        return torch.zeros_like(state.energy)


class VelocityVerlet(Integrator):
    """NVE velocity Verlet (see the module docstring)."""

    name = "nve"


def _check_temperature(name: str, temperature_K: float) -> float:
    if not (temperature_K > 0 and math.isfinite(temperature_K)):
        raise ConfigError(f"the {name} thermostat needs a temperature > 0 K, got {temperature_K}")
    return float(temperature_K)


class LangevinBAOAB(Integrator):
    """NVT Langevin dynamics, BAOAB splitting; ``friction`` γ in 1/ps."""

    name = "langevin"
    stochastic = True

    def __init__(self, system: System, timestep_fs: float, temperature_K: float, friction_per_ps: float,
                 atom_perm: Optional[torch.Tensor] = None):
        """``atom_perm``: [N] device index tensor, the input index of each of the system's atoms
        (the MD engine's atom order), or None (the system is in the input order)."""
        super().__init__(system, timestep_fs)
        self.atom_perm = atom_perm
        self.temperature_K = _check_temperature("langevin", temperature_K)
        if not friction_per_ps >= 0:
            raise ConfigError(f"friction must be >= 0 1/ps, got {friction_per_ps}")
        self.friction_per_ps = float(friction_per_ps)
        gamma_per_fs = self.friction_per_ps * 1e-3
        self.c1 = math.exp(-gamma_per_fs * self.timestep_fs)
        kT = units.BOLTZMANN_EV_PER_K * self.temperature_K
        self.noise_scale = (math.sqrt(1.0 - self.c1 * self.c1) * torch.sqrt(kT / system.masses)).unsqueeze(-1)

    def _draw(self, state: MDState, generator: torch.Generator) -> torch.Tensor:
        """The step's standard normal noise [N, 3], in the system's order (the eager and the fused
        step draw it here, so both consume the generator alike)."""
        s = self.system
        return torch.randn(state.velocities.shape, generator=generator, device=s.device, dtype=s.dtype)

    def _step_fused(self, state, compute, generator):
        s = self.system
        noise = self._draw(state, generator)
        state.positions, state.velocities, state.thermostat_energy = self._fn(
            "langevin_before", c1=self.c1, num_structures=s.num_structures)(
            state.positions, state.velocities, state.forces, state.thermostat_energy, noise, self.atom_perm,
            self.inverse_masses, self.noise_scale, s.masses, s.batch, s.total_mass, s.multi_atom)
        compute(state)
        state.velocities = self._fn("verlet_after")(state.velocities, state.forces, self.inverse_masses)

    def _step_eager(self, state, compute, generator):
        s = self.system
        self.kick(state, 0.5 * self.dt)
        self.drift(state, 0.5 * self.dt)
        kinetic_before = s.kinetic_energy(state.velocities)
        noise = self._draw(state, generator)
        if self.atom_perm is not None:  # drawn in the input order: the same numbers for an atom in any order
            noise = noise.index_select(0, self.atom_perm)
        velocities = self.c1 * state.velocities + self.noise_scale * noise
        state.velocities = s.remove_com_velocity(velocities)
        state.thermostat_energy = state.thermostat_energy - (s.kinetic_energy(state.velocities) - kinetic_before)
        self.drift(state, 0.5 * self.dt)
        compute(state)
        self.kick(state, 0.5 * self.dt)


class Bussi(Integrator):
    """NVT stochastic velocity rescaling; ``tau_fs`` is the relaxation time of the kinetic energy."""

    name = "bussi"
    stochastic = True

    def __init__(self, system: System, timestep_fs: float, temperature_K: float, tau_fs: float):
        super().__init__(system, timestep_fs)
        self.temperature_K = _check_temperature("bussi", temperature_K)
        if not tau_fs > 0:
            raise ConfigError(f"tau must be > 0 fs, got {tau_fs}")
        self.tau_fs = float(tau_fs)
        self.c = math.exp(-self.timestep_fs / self.tau_fs)
        dof = system.degrees_of_freedom
        self.target_kinetic = 0.5 * dof * units.BOLTZMANN_EV_PER_K * self.temperature_K
        self.gamma_shape = torch.clamp(0.5 * (dof - 1.0), min=1e-30)  # χ²(k) = 2 Gamma(k/2)
        self.has_extra_dof = dof > 1.0

    def rescale(self, state: MDState, generator: torch.Generator) -> None:
        s = self.system
        kinetic = s.kinetic_energy(state.velocities)
        dof, target, c = s.degrees_of_freedom, self.target_kinetic, self.c
        r1, gamma = self._draw(generator)
        chi2 = 2.0 * gamma
        chi2 = torch.where(self.has_extra_dof, chi2, torch.zeros_like(chi2))
        new_kinetic = (
            kinetic
            + (1.0 - c) * (target * (r1 * r1 + chi2) / dof - kinetic)
            + 2.0 * r1 * torch.sqrt(c * (1.0 - c) * kinetic * target / dof)
        )
        new_kinetic = torch.clamp(new_kinetic, min=0.0)
        alpha = torch.where(kinetic > 0, torch.sqrt(new_kinetic / torch.where(kinetic > 0, kinetic, 1.0)), 1.0)
        state.velocities = state.velocities * alpha[s.batch].unsqueeze(-1)
        state.thermostat_energy = state.thermostat_energy - (alpha * alpha - 1.0) * kinetic

    def _draw(self, generator: torch.Generator):
        """(R₁ [B], Gamma((N_f - 1)/2) [B]): the step's random numbers (the eager :meth:`rescale` and
        the fused step draw them here, so both consume the generator alike)."""
        s = self.system
        r1 = torch.randn((s.num_structures,), generator=generator, device=s.device, dtype=s.dtype)
        return r1, torch._standard_gamma(self.gamma_shape, generator=generator)

    def _step_fused(self, state, compute, generator):
        s = self.system
        r1, gamma = self._draw(generator)
        state.positions, state.velocities, state.thermostat_energy = self._fn(
            "bussi_before", c=self.c, num_structures=s.num_structures)(
            state.positions, state.velocities, state.forces, state.thermostat_energy, r1, gamma,
            self.inverse_masses, s.masses, s.batch, s.degrees_of_freedom, self.target_kinetic, self.has_extra_dof)
        compute(state)
        state.velocities = self._fn("verlet_after")(state.velocities, state.forces, self.inverse_masses)

    def _step_eager(self, state, compute, generator):
        self.rescale(state, generator)
        self.velocity_verlet(state, compute)


class NoseHooverChain(Integrator):
    """NVT Nosé–Hoover chain of ``chain_length`` thermostats, time constant ``tau_fs``."""

    name = "nose-hoover"

    def __init__(self, system: System, timestep_fs: float, temperature_K: float, tau_fs: float, chain_length: int = 3):
        super().__init__(system, timestep_fs)
        self.temperature_K = _check_temperature("nose-hoover", temperature_K)
        if not tau_fs > 0:
            raise ConfigError(f"tau must be > 0 fs, got {tau_fs}")
        from torchmdx.md.config import MAX_TIME_CONSTANT_FS, MIN_TIME_CONSTANT_STEPS

        if not MIN_TIME_CONSTANT_STEPS * timestep_fs <= tau_fs <= MAX_TIME_CONSTANT_FS:
            # as md's config: beyond 1e21 fs the float32 masses overflowed (a RuntimeError traceback), from
            # 1e155 fs they were NaN, and below 0.2 time steps the run blew up
            raise ConfigError(f"tau of {tau_fs:g} fs must be between {MIN_TIME_CONSTANT_STEPS:g} time steps "
                              f"({MIN_TIME_CONSTANT_STEPS * timestep_fs:g} fs) and {MAX_TIME_CONSTANT_FS:g} fs for the "
                              "Nosé–Hoover chain (typical: 100-1000 fs)")
        if chain_length < 1:
            raise ConfigError(f"chain_length must be >= 1, got {chain_length}")
        self.tau_fs = float(tau_fs)
        self.chain_length = int(chain_length)
        self.kT = units.BOLTZMANN_EV_PER_K * self.temperature_K
        tau = fs_to_ase_time(tau_fs)
        b, m = system.num_structures, self.chain_length
        q = torch.full((b, m), self.kT * tau * tau, dtype=system.dtype, device=system.device)
        q[:, 0] = system.degrees_of_freedom * self.kT * tau * tau
        self.masses = q
        self.xi = torch.zeros(b, m, dtype=system.dtype, device=system.device)
        self.v_xi = torch.zeros(b, m, dtype=system.dtype, device=system.device)

    def _force(self, k: int, v: list, kinetic: torch.Tensor) -> torch.Tensor:
        q = self.masses
        if k == 0:
            return (2.0 * kinetic - self.system.degrees_of_freedom * self.kT) / q[:, 0]
        return (q[:, k - 1] * v[k - 1] * v[k - 1] - self.kT) / q[:, k]

    def half_step(self, state: MDState) -> None:
        """Propagate the chain and scale the velocities over dt/2."""
        s, m = self.system, self.chain_length
        h = 0.5 * self.dt
        v = [self.v_xi[:, k] for k in range(m)]
        kinetic = s.kinetic_energy(state.velocities)
        # chain, top down
        v[m - 1] = v[m - 1] + 0.5 * h * self._force(m - 1, v, kinetic)
        for k in range(m - 2, -1, -1):
            e = torch.exp(-0.25 * h * v[k + 1])
            v[k] = (v[k] * e + 0.5 * h * self._force(k, v, kinetic)) * e
        scale = torch.exp(-h * v[0])
        state.velocities = state.velocities * scale[s.batch].unsqueeze(-1)
        kinetic = kinetic * scale * scale
        self.xi = self.xi + h * torch.stack(v, dim=1)
        # chain, bottom up
        for k in range(0, m - 1):
            e = torch.exp(-0.25 * h * v[k + 1])
            v[k] = (v[k] * e + 0.5 * h * self._force(k, v, kinetic)) * e
        v[m - 1] = v[m - 1] + 0.5 * h * self._force(m - 1, v, kinetic)
        self.v_xi = torch.stack(v, dim=1)

    def _step_fused(self, state, compute, generator):
        s = self.system
        constants = dict(kT=self.kT, num_structures=s.num_structures)
        state.positions, state.velocities, self.xi, self.v_xi = self._fn("nose_hoover_before", **constants)(
            state.positions, state.velocities, state.forces, self.xi, self.v_xi, self.masses,
            self.inverse_masses, s.masses, s.batch, s.degrees_of_freedom)
        compute(state)
        state.velocities, self.xi, self.v_xi = self._fn("nose_hoover_after", **constants)(
            state.velocities, state.forces, self.xi, self.v_xi, self.masses,
            self.inverse_masses, s.masses, s.batch, s.degrees_of_freedom)

    def _step_eager(self, state, compute, generator):
        self.half_step(state)
        self.velocity_verlet(state, compute)
        self.half_step(state)

    def extra_energy(self, state):
        s = self.system
        chain_kinetic = (0.5 * self.masses * self.v_xi * self.v_xi).sum(-1)
        potential = s.degrees_of_freedom * self.kT * self.xi[:, 0] + self.kT * self.xi[:, 1:].sum(-1)
        return chain_kinetic + potential

    def state_dict(self):
        return {"xi": self.xi, "v_xi": self.v_xi}

    def load_state_dict(self, values):
        self.xi = values["xi"].to(self.xi)
        self.v_xi = values["v_xi"].to(self.v_xi)


ENSEMBLES = ("nve", "langevin", "bussi", "nose-hoover")


def make_integrator(
    ensemble: str,
    system: System,
    timestep_fs: float,
    temperature_K: float = 300.0,
    friction_per_ps: float = 1.0,
    tau_fs: float = 100.0,
    chain_length: int = 3,
    atom_perm: Optional[torch.Tensor] = None,
) -> Integrator:
    """The integrator of ``ensemble`` (one of :data:`ENSEMBLES`). ``atom_perm``: the input index
    of each of the system's atoms when the engine reordered them (per-atom noise is drawn in the
    input order), None otherwise."""
    if ensemble == "nve":
        return VelocityVerlet(system, timestep_fs)
    if ensemble == "langevin":
        return LangevinBAOAB(system, timestep_fs, temperature_K, friction_per_ps, atom_perm)
    if ensemble == "bussi":
        return Bussi(system, timestep_fs, temperature_K, tau_fs)
    if ensemble == "nose-hoover":
        return NoseHooverChain(system, timestep_fs, temperature_K, tau_fs, chain_length)
    raise ConfigError(f"unknown ensemble {ensemble!r}; choose one of {', '.join(ENSEMBLES)}")
