"""What ``torchmdx md`` does: read structures and model, run (native or ASE engine), write
trajectory, thermo log, restart file and summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from torchmdx.errors import ConfigError, DataError
from torchmdx.io_utils import atomic_write
from torchmdx.md.config import MDConfig
from torchmdx.md.engine import Reporter
from torchmdx.md.io import ThermoLog, TrajectoryWriter, load_restart, read_thermo, structure_paths, truncate_outputs
from torchmdx.train.plots import thermo_plot


class TrajectoryReporter(Reporter):
    """Writes each structure's frame to its trajectory file (skips a step already written)."""

    def __init__(self, writer: TrajectoryWriter):
        self.writer = writer
        self.last_step: Optional[int] = None

    def report(self, simulation, observation) -> None:
        if observation.step == self.last_step:
            return
        for b, atoms in enumerate(simulation.frames(observation)):
            self.writer.write(b, atoms)
        self.last_step = observation.step

    def close(self) -> None:
        self.writer.close()


class ThermoReporter(Reporter):
    """Appends the observation's rows to the thermo CSV (skips a step already written)."""

    def __init__(self, log: ThermoLog):
        self.log = log
        self.last_step: Optional[int] = None

    def report(self, simulation, observation) -> None:
        if observation.step == self.last_step:
            return
        self.log.write(observation.rows())
        self.last_step = observation.step

    def close(self) -> None:
        self.log.close()


def read_structures(paths, index: str = "-1") -> list:
    """The frames ``index`` (ASE syntax: "-1" last, ":" all) of every file, via ``ase.io.read``
    (one-line DataError on failure)."""
    from ase.io import read

    structures = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: structure file not found")
        try:
            frames = read(str(path), index=index)
            frames = [frames] if not isinstance(frames, list) else frames
        except Exception as exc:  # noqa: BLE001 - any reader failure is the same user error
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"{path}: cannot read a structure with ASE ({first})") from None
        if not frames:
            raise DataError(f"{path}: holds no structure")
        for k, atoms in enumerate(frames):
            if len(atoms) == 0:
                raise DataError(f"{path}: frame {k} has no atoms")
            if atoms.pbc.any() and atoms.cell.volume < 1e-6:
                raise DataError(f"{path}: frame {k} is periodic ({atoms.pbc.tolist()}) but has no cell")
        structures.extend(frames)
    return structures


def _clean(atoms):
    atoms = atoms.copy()
    atoms.calc = None
    return atoms


def run_md(config: MDConfig, potential=None, out=None) -> dict:
    """Run the simulation described by ``config``; returns the summary as a dict.

    ``potential`` (a Potential object) overrides ``config.model``.
    """
    from torchmdx.md.loading import as_dtype, check_device, load_potential

    out = sys.stdout if out is None else out
    check_device(config.device)
    if config.threads:
        import torch

        torch.set_num_threads(int(config.threads))

    restart_payload = load_restart(config.restart) if config.restart else None
    if config.structure:
        structures = read_structures(config.structure, config.index)
        structures = [_clean(a) for a in structures for _ in range(config.replicas)]
    elif restart_payload is not None:
        structures = list(restart_payload["structures"])
    else:
        raise ConfigError("no structure given (a structure file, or --restart FILE)")
    if potential is None:
        if not config.model:
            raise ConfigError("no model given (--model model.pt, or 'model:' in the md config)")
        potential = load_potential(config.model, device=config.device)
    dtype = as_dtype(config.dtype)
    traj_paths = structure_paths(config.out, len(structures))
    if restart_payload is not None:
        truncate_outputs(traj_paths, config.log_path, int(restart_payload["step"]))
    append = restart_payload is not None
    reporters = [
        TrajectoryReporter(TrajectoryWriter(config.out, len(structures), append=append)),
        ThermoReporter(ThermoLog(config.log_path, multi=len(structures) > 1,
                                 periodic=any(a.pbc.all() for a in structures), append=append)),
    ]
    start_step = int(restart_payload["step"]) if restart_payload is not None else 0
    remaining = max(0, config.steps - start_step)
    try:
        if config.engine == "ase":
            if len(structures) != 1:
                raise ConfigError(
                    f"--engine ase runs one structure, got {len(structures)} (frames x replicas); "
                    "use the native engine for batches"
                )
            from torchmdx.md.ase_engine import run_ase

            summary = run_ase(
                potential, structures[0], steps=remaining, timestep_fs=config.dt, ensemble=config.ensemble,
                temperature_K=config.temperature, friction_per_ps=config.friction, tau_fs=config.tau,
                chain_length=config.chain_length, device=config.device, dtype=dtype, seed=config.seed,
                skin=config.skin, every=config.every, reporters=reporters, restart_path=config.restart_path,
                restart_every=config.restart_every, restart_payload=restart_payload, minimize=config.minimize,
                fmax=config.fmax, minimize_steps=config.minimize_steps, max_temperature_K=config.max_temperature,
                progress=config.progress, pressure_bar=config.pressure, barostat_tau_fs=config.barostat_tau,
                barostat=config.barostat,
            )
        else:
            from torchmdx.md.engine import Simulation

            if restart_payload is not None and restart_payload.get("engine") == "ase":
                raise ConfigError(f"{config.restart}: written by --engine ase; continue it with --engine ase")
            sim = Simulation(
                potential, structures, timestep_fs=config.dt, ensemble=config.ensemble,
                temperature_K=config.temperature, friction_per_ps=config.friction, tau_fs=config.tau,
                chain_length=config.chain_length, device=config.device, dtype=dtype, seed=config.seed,
                skin=config.skin, check_interval=config.check_interval, max_temperature_K=config.max_temperature,
                wrap=config.wrap, cuda_graph=(config.cuda_graph and str(config.device).startswith("cuda")),
                compile=config.compile,
            )
            if sim.compile_mode != "off":
                what = "the whole model as one graph" if sim.compile_mode == "whole" else "the model's dense parts"
                print(f"compiling {what} with torch.compile (tens of seconds, once per structure size; "
                      "--no-compile skips it)", file=out, flush=True)
            if restart_payload is not None:
                sim.load_restart(restart_payload)
            else:
                sim.initialize()
                if config.minimize:
                    result = sim.minimize(config.fmax, config.minimize_steps)
                    print(
                        f"FIRE: {result.steps} steps, max force {result.fmax:.4f} eV/Å "
                        f"({'converged' if result.converged else 'NOT converged'}), energy "
                        + ", ".join(f"{a:.4f} -> {b:.4f}" for a, b in zip(result.energy_start, result.energy_end))
                        + " eV",
                        file=out,
                    )
            summary = sim.run(
                remaining, reporters=reporters, every=config.every, restart_path=config.restart_path,
                restart_every=config.restart_every, progress=config.progress,
                report_start=restart_payload is None,
            )
    finally:
        for r in reporters:
            r.close()
    result = dict(summary.__dict__)
    result.update(
        engine=config.engine, ensemble=config.ensemble, pressure_bar=config.pressure, device=str(config.device),
        dtype=config.dtype,
        timestep_fs=config.dt, first_step=start_step, last_step=start_step + summary.steps,
        trajectory=[str(p) for p in traj_paths], log=str(config.log_path), restart=str(config.restart_path),
    )
    plot_path = Path(config.log_path).with_suffix(".png")
    rows = read_thermo(config.log_path)
    if rows:
        at = f" at {config.pressure:g} bar" if config.pressure is not None else ""
        thermo_plot(rows, plot_path, title=f"{config.ensemble} MD{at}, {config.dt:g} fs steps")
        result["plot"] = str(plot_path)
    with atomic_write(config.summary_path, "w") as f:
        json.dump(result, f, indent=2)
    for line in summary.lines():
        print(line, file=out)
    print(f"outputs          {', '.join(result['trajectory'])}, {result['log']}, {result['restart']}, "
          f"{config.summary_path}" + (f", {result['plot']}" if "plot" in result else ""), file=out)
    return result
