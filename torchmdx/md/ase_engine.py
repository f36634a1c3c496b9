"""``--engine ase``: the same simulation through ASE's integrators and the torchmdx calculator.

For cross-checking the native engine (same model, same initial velocities from the same seed,
same output files), and for ASE features the native engine lacks. Mapping of the ensembles:

    nve          ase.md.verlet.VelocityVerlet
    langevin     ase.md.langevinbaoab.LangevinBAOAB (T_tau = 1/friction)
    bussi        ase.md.bussi.Bussi (taut = tau)
    nose-hoover  ase.md.nose_hoover_chain.NoseHooverChainNVT (tdamp = tau, tchain = chain_length)

With a pressure P (bar), ``langevin`` is NPT and ``nve`` is NPH through the same
``LangevinBAOAB`` with its Langevin-Hoover barostat (Quigley and Probert 2004): external stress
-P (eV/Å³; ASE's stress is the negative of the pressure and the barostat holds the mean stress
including the kinetic part), ``P_tau = barostat_tau`` (the cell's mass is ASE's heuristic for
that period), ``hydrostatic`` for the isotropic barostat (the cell keeps its shape).
``nose-hoover`` is the deterministic Martyna-Tobias-Klein NPT (``IsotropicMTKNPT``, or
``MTKNPT`` for the anisotropic barostat: tdamp = tau, pdamp = barostat_tau, tchain =
chain_length), whose conserved energy ASE gives. The thermo log then has the volume and density
of each output step, the frames the cell of that step, and restart files the cell too (a
continued run starts the barostat's momentum at zero).

One structure per run (the native engine batches). The conserved energy column is the total
energy for nve, total minus ASE's ``transferred_energy`` for bussi, ASE's
``get_conserved_energy()`` for nose-hoover (NVT and NPT), the total energy for langevin (ASE does
not track the heat exchanged), and the enthalpy U + K + P V for langevin and nve at constant
pressure. Restart files hold
positions, velocities and the step (not the integrator's internal state: a continued ASE run is
not bit-for-bit).
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Optional

import numpy as np
import torch

from torchmdx import units
from torchmdx.errors import ConfigError, SimulationError
from torchmdx.md.reports import Observation, RunSummary, model_problem
from torchmdx.md.io import make_frame, save_restart
from torchmdx.md.loading import as_dtype
from torchmdx.md.system import System


def make_ase_dynamics(atoms, ensemble: str, timestep_fs: float, temperature_K: float, friction_per_ps: float,
                      tau_fs: float, chain_length: int, seed: int, pressure_bar: Optional[float] = None,
                      barostat_tau_fs: float = 1000.0, barostat: str = "isotropic"):
    """The ASE integrator for ``ensemble`` (see the module docstring); ``pressure_bar`` not None:
    constant pressure (langevin: NPT, nve: NPH)."""
    from ase import units as ase_units

    dt = timestep_fs * ase_units.fs
    langevin = {}  # LangevinBAOAB's thermostat
    if ensemble == "langevin":
        if not friction_per_ps > 0:
            raise ConfigError("the ASE Langevin integrator needs friction > 0 1/ps")
        langevin = dict(temperature_K=temperature_K, T_tau=(1000.0 / friction_per_ps) * ase_units.fs)
    if pressure_bar is not None:
        from ase.md.langevinbaoab import LangevinBAOAB

        if ensemble not in ("langevin", "nve", "nose-hoover"):
            raise ConfigError(f"constant pressure works with the langevin, nose-hoover or nve ensemble, not {ensemble}")
        if not bool(np.all(atoms.pbc)):
            raise ConfigError(f"constant pressure needs a structure periodic in x, y and z, got pbc={[bool(p) for p in atoms.pbc]}")
        if ensemble == "nose-hoover":
            from ase.md.nose_hoover_chain import MTKNPT, IsotropicMTKNPT

            integrator = IsotropicMTKNPT if barostat == "isotropic" else MTKNPT
            return integrator(atoms, timestep=dt, temperature_K=temperature_K,
                              pressure_au=float(pressure_bar) / units.EV_PER_A3_TO_BAR, tdamp=tau_fs * ase_units.fs,
                              pdamp=barostat_tau_fs * ase_units.fs, tchain=chain_length)
        with warnings.catch_warnings():  # "Using heuristic P_mass ...": the documented choice (from P_tau)
            warnings.filterwarnings("ignore", message="Using heuristic P_mass")
            return LangevinBAOAB(atoms, timestep=dt, externalstress=-float(pressure_bar) / units.EV_PER_A3_TO_BAR,
                                 hydrostatic=barostat == "isotropic", P_tau=barostat_tau_fs * ase_units.fs,
                                 rng=np.random.default_rng(seed), **langevin)
    if ensemble == "nve":
        from ase.md.verlet import VelocityVerlet

        return VelocityVerlet(atoms, timestep=dt)
    if ensemble == "langevin":
        from ase.md.langevinbaoab import LangevinBAOAB

        return LangevinBAOAB(atoms, timestep=dt, rng=np.random.default_rng(seed), **langevin)
    if ensemble == "bussi":
        from ase.md.bussi import Bussi

        return Bussi(atoms, timestep=dt, temperature_K=temperature_K, taut=tau_fs * ase_units.fs,
                     rng=np.random.default_rng(seed))
    if ensemble == "nose-hoover":
        from ase.md.nose_hoover_chain import NoseHooverChainNVT

        return NoseHooverChainNVT(atoms, timestep=dt, temperature_K=temperature_K, tdamp=tau_fs * ase_units.fs,
                                  tchain=chain_length)
    raise ConfigError(f"unknown ensemble {ensemble!r}")


class _Frames:
    """Adapter giving reporters the ``frames(observation)`` of a single ASE structure."""

    def __init__(self, template):
        self.template = template

    def frames(self, obs: Observation):
        info = {"step": obs.step, "time_ps": obs.time_ps, "temperature_K": float(obs.temperature[0])}
        stress = None
        if obs.stress is not None:
            s = obs.stress[0]
            stress = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
        return [make_frame(self.template, obs.positions, obs.velocities, obs.potential[0], obs.forces, stress, info)]


def _steps(dyn, steps: int):
    """``dyn.irun(steps)``, yielding None per step taken, or once the one-line reason a step failed
    (the calculator's refusal of the state it reached, or ASE's arithmetic on a collapsed or
    overflowing cell: "You have 0 lattice vectors" and OverflowError were tracebacks) and stopping."""
    from torchmdx.errors import TorchmdxError

    iterator = dyn.irun(steps)
    while True:
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # a failed step is named below
                next(iterator)
        except StopIteration:
            return
        except (TorchmdxError, ValueError, ArithmeticError) as exc:
            text = " ".join(str(exc).split()) or type(exc).__name__
            yield f"the step failed: {text if isinstance(exc, TorchmdxError) else type(exc).__name__ + ': ' + text}"
            return
        yield None


def run_ase(
    potential,
    atoms,
    *,
    steps: int,
    timestep_fs: float,
    ensemble: str = "nve",
    temperature_K: float = 300.0,
    friction_per_ps: float = 1.0,
    tau_fs: float = 100.0,
    chain_length: int = 3,
    device="cpu",
    dtype="float64",
    seed: int = 0,
    skin: float = 0.5,
    every: int = 10,
    reporters=(),
    restart_path=None,
    restart_every=None,
    restart_payload=None,
    minimize: bool = False,
    fmax: float = 0.05,
    minimize_steps: int = 500,
    max_temperature_K=None,
    progress: bool = False,
    velocities=None,
    pressure_bar: Optional[float] = None,
    barostat_tau_fs: float = 1000.0,
    barostat: str = "isotropic",
    model_record: Optional[dict] = None,
) -> RunSummary:
    """Run ``steps`` steps (a restart payload continues from its step) with ASE; returns the
    summary. ``pressure_bar``: constant pressure (see the module docstring). ``reporters``: a
    list, or a function returning one, called once the initial forces are known to be finite
    (so that a refused start leaves the output files alone)."""
    from torchmdx.md.calculator import Calculator

    dtype = as_dtype(dtype)
    atoms = atoms.copy()
    atoms.calc = Calculator(potential, device=device, dtype=dtype, skin=skin)
    # md said a charged structure's line already (start_checks.charge_warnings, naming the file): the Calculator's
    # own warning was a second line, "warning: Calculator: atoms.info['charge'] is 1, ..." (round 27)
    atoms.calc._charge_warned = atoms.calc._contact_warned = True  # and its close contacts (round 27)
    n = len(atoms)
    dof = 3 * n - 3 if n > 1 else 3
    max_t = float(max_temperature_K) if max_temperature_K else max(2000.0, 5.0 * temperature_K)
    start = 0
    if restart_payload is not None:
        if restart_payload.get("cell") is not None:  # a constant-pressure run's last cell
            atoms.set_cell(restart_payload["cell"].double().numpy())
        atoms.set_positions(restart_payload["positions"].double().numpy())
        atoms.set_velocities(restart_payload["velocities"].double().numpy())
        start = int(restart_payload["step"])
    else:
        if minimize:
            from ase.optimize import FIRE

            from torchmdx.errors import ModelError
            from torchmdx.md.minimize import collapse_message

            optimizer = FIRE(atoms, logfile=None)
            try:
                optimizer.run(fmax=fmax, steps=minimize_steps)
            except ModelError as exc:  # atoms on top of each other (the model's check), named as the engine's
                if getattr(exc, "atoms", None) is None:
                    raise
                error = SimulationError(collapse_message(optimizer.nsteps, exc.atoms, exc.distance, "the structure"))
                error.structure = 0  # torchmdx md names the file
                raise error from None
        if velocities is not None:
            atoms.set_velocities(np.asarray(velocities, dtype=float))
        elif temperature_K > 0:
            # the native engine's Maxwell–Boltzmann draw: identical velocities for the same seed
            system = System.from_atoms([atoms], "cpu", dtype)
            generator = torch.Generator().manual_seed(int(seed))
            atoms.set_velocities(system.maxwell_boltzmann(temperature_K, generator).double().numpy())
    from torchmdx.md.io import time_origin_ps

    origin_ps = time_origin_ps(restart_payload, timestep_fs)  # a restart with another --dt: the time goes on
    dyn = make_ase_dynamics(atoms, ensemble, timestep_fs, temperature_K, friction_per_ps, tau_fs, chain_length, seed,
                            pressure_bar, barostat_tau_fs, barostat)
    frames = _Frames(atoms)
    periodic = bool(np.all(atoms.pbc))

    def conserved(total):
        if ensemble == "nose-hoover":  # MTK NPT too: thermostat, barostat and P V included
            return dyn.get_conserved_energy()
        if pressure_bar is not None:  # the enthalpy U + K + P V (the cell's own kinetic energy is not included)
            return total + float(pressure_bar) / units.EV_PER_A3_TO_BAR * atoms.get_volume()
        if ensemble == "bussi":
            return total - dyn.transferred_energy
        return total

    def observe(step) -> Observation:
        energy = atoms.get_potential_energy()
        kinetic = atoms.get_kinetic_energy()
        pressure = stress = volume = density = None
        if periodic:
            s = atoms.get_stress(voigt=False, include_ideal_gas=False)
            v = atoms.get_volume()
            p = 2.0 * kinetic / (3.0 * v) - np.trace(s) / 3.0
            pressure = np.array([p * units.EV_PER_A3_TO_BAR])
            stress = s[None]
            volume = np.array([v])
            density = np.array([atoms.get_masses().sum() / v * units.AMU_PER_A3_TO_G_PER_CM3])
        return Observation(
            step=step, time_ps=origin_ps + step * timestep_fs * 1e-3,
            positions=atoms.get_positions(), velocities=atoms.get_velocities(), forces=atoms.get_forces(),
            potential=np.array([energy]), kinetic=np.array([kinetic]),
            temperature=np.array([2.0 * kinetic / (dof * units.BOLTZMANN_EV_PER_K)]),
            conserved=np.array([conserved(energy + kinetic)]), pressure_bar=pressure, stress=stress,
            volume_A3=volume, density_g_cm3=density,
        )

    def payload(step):
        return {
            "engine": "ase", "step": step, "time_ps": origin_ps + step * timestep_fs * 1e-3,
            "timestep_fs": timestep_fs, "ensemble": ensemble,
            "temperature_K": temperature_K, "seed": seed, "dtype": str(dtype).replace("torch.", ""),
            "z": torch.as_tensor(atoms.numbers), "counts": [n], "structures": [atoms.copy()],
            "positions": torch.as_tensor(atoms.get_positions()), "velocities": torch.as_tensor(atoms.get_velocities()),
            "cell": torch.as_tensor(atoms.cell.array) if periodic else None,
            "model": model_record,
        }

    if restart_every is None:
        restart_every = 10 * every
    bar = None
    if progress and sys.stderr.isatty():  # a bar on a terminal; logs get the summary lines
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, unit="step", desc=f"md {ensemble} (ase)", dynamic_ncols=True)
    first = observe(start)
    if not (np.isfinite(first.forces).all() and np.isfinite(first.potential).all()):
        bad = np.nonzero(~np.isfinite(first.forces).all(1))[0]
        what = f"forces (NaN/inf) on atom {int(bad[0])}" if len(bad) else "energy"
        raise SimulationError(model_problem(f"non-finite {what} of structure 0", potential))
    if not float(first.temperature[0]) <= max_t:  # was one step run and its outputs kept, then "stopped at step 1"
        from torchmdx.md.engine_loop import too_hot_at_start

        raise SimulationError(too_hot_at_start(0, float(first.temperature[0]), max_t))
    if callable(reporters):
        reporters = reporters()
    for r in reporters:  # (file reporters skip a step their file holds: a continued run's first)
        r.report(frames, first)
    previous = (atoms.get_positions(), atoms.get_velocities(), atoms.cell.array.copy())
    step = start
    wall_start = time.perf_counter()
    for i, failed in enumerate(_steps(dyn, steps)):
        if i == 0:  # irun yields once before the first step
            if failed:
                raise SimulationError(f"the initial state cannot be simulated: {failed}")
            continue
        step = start + i
        reason = None
        if failed:  # a step ASE or the calculator could not take (a collapsed cell, NaN positions)
            reason = failed + (f" (at {pressure_bar:g} bar: check the pressure and the barostat time constant)"
                               if pressure_bar is not None else "")
        else:
            forces = atoms.get_forces()
            temperature = 2.0 * atoms.get_kinetic_energy() / (dof * units.BOLTZMANN_EV_PER_K)
        if reason:
            pass  # kept below, as the other failures
        elif not np.isfinite(forces).all() or not np.isfinite(atoms.get_potential_energy()):
            bad = int(np.nonzero(~np.isfinite(forces).all(1))[0][0]) if not np.isfinite(forces).all() else 0
            reason = f"the forces are not finite (NaN/inf) on atom {bad} of structure 0"
        elif not temperature <= max_t:
            reason = f"the temperature reached {temperature:.4g} K, above max_temperature {max_t:g} K"
        if reason:
            atoms.set_cell(previous[2])
            atoms.set_positions(previous[0])
            atoms.set_velocities(previous[1])
            kept = []
            try:
                obs = observe(step - 1)
                for r in reporters:
                    r.report_failure(frames, obs)
                kept.append("the trajectory's last frame")
            except Exception:  # noqa: BLE001
                pass
            if restart_path is not None:
                save_restart(restart_path, payload(step - 1))
                kept.append(str(restart_path))
            where = f"; last good state (step {step - 1}) kept in " + " and ".join(kept) if kept else ""
            raise SimulationError(f"simulation stopped at step {step}: {reason}{where}")
        previous = (atoms.get_positions(), atoms.get_velocities(), atoms.cell.array.copy())
        if bar is not None:
            bar.update(1)
        if step % every == 0 or i == steps:
            obs = observe(step)
            for r in reporters:
                r.report(frames, obs)
        if restart_path is not None and (step % restart_every == 0 or i == steps):
            save_restart(restart_path, payload(step))
    wall = time.perf_counter() - wall_start
    if bar is not None:
        bar.close()
    last = observe(step)
    done = step - start
    rate = done / wall if wall > 0 else float("inf")
    drift = float(last.conserved[0] - first.conserved[0]) / n
    sim_ns = done * timestep_fs * 1e-6
    return RunSummary(
        steps=done, wall_s=wall, steps_per_s=rate, ns_per_day=rate * timestep_fs * 1e-6 * 86400.0,
        atoms=n, structures=1, energy_drift_eV_per_atom=drift,
        energy_drift_eV_per_atom_per_ns=drift / sim_ns if sim_ns > 0 else 0.0,
        neighbor_list_builds=atoms.calc.neighbor_list_builds, replays=0,
        final_temperature_K=[float(last.temperature[0])],
    )
