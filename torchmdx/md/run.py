"""What ``torchmdx md`` does: read structures and model, run (native or ASE engine), write
trajectory, thermo log, restart file and summary."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from torchmdx.errors import ConfigError, DataError, SimulationError
from torchmdx.io_utils import atomic_write
from torchmdx.md.config import MDConfig
from torchmdx.md.io import ThermoLog, TrajectoryWriter, load_restart, read_thermo
from torchmdx.md.outputs import plan_outputs
from torchmdx.md.reports import Reporter
from torchmdx.md.structure_files import read_structures
from torchmdx.md.start_checks import (charge_warnings, check_cells, check_coincident, check_constraints, check_elements,
                                        check_float32_reach, close_contacts, time_unit_warnings)
from torchmdx.train.plots import thermo_plot


class TrajectoryReporter(Reporter):
    """Writes each structure's frame to its trajectory file (skips steps up to ``last_step``,
    those already in the file)."""

    def __init__(self, writer: TrajectoryWriter, last_step: Optional[int] = None):
        self.writer = writer
        self.last_step = last_step  # the last step in the file

    def report(self, simulation, observation) -> None:
        if self.last_step is not None and observation.step <= self.last_step:
            return
        for b, atoms in enumerate(simulation.frames(observation)):
            self.writer.write(b, atoms)
        self.last_step = observation.step

    def close(self) -> None:
        self.writer.close()


class ThermoReporter(Reporter):
    """Appends the observation's rows to the thermo CSV (skips steps up to ``last_step``, those
    already in the file)."""

    def __init__(self, log: ThermoLog, last_step: Optional[int] = None):
        self.log = log
        self.last_step = last_step  # the last step in the file

    def report(self, simulation, observation) -> None:
        if self.last_step is not None and observation.step <= self.last_step:
            return
        self.log.write(observation.rows())
        self.last_step = observation.step

    def close(self) -> None:
        self.log.close()


def _note_new_atom_order(config: MDConfig, file_order, perm, err) -> None:
    """A continued run given another atom order than its restart file's: the file holds every
    per-atom value in the input order (and the order it was run in), so the new order is used as
    asked; a note says that the continuation then follows the original run to rounding only."""
    if config.atom_order == "auto":
        return
    before = None if file_order is None else np.asarray(file_order, dtype=np.int64)
    after = None if perm is None else np.asarray(perm, dtype=np.int64)
    if (before is None) == (after is None) and (before is None or np.array_equal(before, after)):
        return
    was = "the input order" if before is None else "a space-filling-curve order"
    now = "the input order" if after is None else f"the {config.atom_order} order"
    print(f"note: {config.option('atom_order')} {config.atom_order}: {config.restart} was run in {was}; continuing "
          f"in {now} (positions, velocities and forces are stored per input atom, outputs stay in the input order; "
          "sums run in another order, so the continuation matches the original run to rounding, not bit for bit)",
          file=err)


#: the least memory one simulated atom takes (bytes): positions, velocities, forces, the neighbor
#: pairs and the model's features; far less than a real run needs, so only impossible sizes stop
BYTES_PER_ATOM = 1024


def check_replica_memory(structures, config: MDConfig) -> None:
    """Refuse ``replicas`` copies that cannot fit in memory (10**12 replicas hung copying
    structures until the machine ran out of memory), before any copy is made."""
    from torchmdx.devices import memory_bytes

    atoms = sum(len(a) for a in structures) * config.replicas
    _, available = memory_bytes()
    if available and atoms * BYTES_PER_ATOM > available:
        raise ConfigError(
            f"{config.option('replicas')} {config.replicas} makes {atoms:,} atoms ({config.replicas} x "
            f"{sum(len(a) for a in structures)}), at least {atoms * BYTES_PER_ATOM / 1e9:.3g} GB ({BYTES_PER_ATOM} "
            f"bytes an atom), and {available / 1e9:.3g} GB of memory is available; give fewer replicas")


def _clean(atoms):
    atoms = atoms.copy()
    atoms.calc = None
    atoms.arrays.pop("momenta", None)  # the engines take initial velocities only from initial_velocities
    return atoms


def initial_velocities(config: MDConfig, structures, sources: list, err) -> Optional[np.ndarray]:
    """The velocities a new run starts from ([atoms of all replicas, 3], Å/ASE-time, in the order
    of the replicated structures), or None to draw Maxwell–Boltzmann ones at ``temperature``.

    ``velocities: auto`` takes the velocities (ASE momenta) the structure files carry, as ASE's MD
    does (md used to draw new ones silently), when every structure carries them and each runs once;
    with ``--replicas`` > 1 (copies exist to start from different velocities) or when only some
    structures carry them, it draws for all, as md always did, and the note says why. ``file``
    requires them in every structure (every replica starts from them); ``draw`` always draws. One
    note line says which were used. Non-finite velocities are refused in one line."""
    option = config.option("velocities")
    # under auto, momenta that are all zero count as none (files written from structures that never
    # moved carry a zero momenta column): they would start the run at 0 K; ``file`` takes them as given
    has = ["momenta" in atoms.arrays and (config.velocities == "file" or bool(np.any(atoms.arrays["momenta"] != 0)))
           for atoms in structures]
    why = None
    if config.velocities == "auto" and any(has) and not all(has):
        # a refusal here turned a command that ran before --velocities existed into an error whose
        # only way out was --velocities draw (file needs velocities in every structure)
        why = (f"{sources[has.index(False)]} carries none while {sources[has.index(True)]} does ({option} file "
               "needs them in every structure)")
    elif config.velocities == "auto" and any(has) and config.replicas > 1:
        # replicas are copies with different velocities (docs/md.md); refusing them broke
        # `md frame.extxyz --replicas N` from a frame of an earlier trajectory
        why = (f"{config.option('replicas')} {config.replicas} copies get different ones; {option} file starts "
               "every copy from the file's")
    if config.velocities == "draw" or (config.velocities == "auto" and not any(has)) or why:
        if why:
            print(f"note: the velocities in the structure files are not used: {why}; drawing Maxwell–Boltzmann "
                  f"ones at {config.temperature:g} K for all", file=err)
        elif any(has):
            print(f"note: {option} draw: the velocities in the structure file are not used; drawing "
                  f"Maxwell–Boltzmann ones at {config.temperature:g} K", file=err)
        return None
    if not all(has):  # file
        where = sources[has.index(False)]
        raise DataError(f"{where}: carries no velocities (ASE momenta), and {option} file needs them in every "
                        "structure; pass --velocities draw to draw Maxwell–Boltzmann ones")
    parts = []
    for atoms, where in zip(structures, sources):
        v = np.asarray(atoms.get_velocities(), dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(v).all(axis=1))
        if bad.size:
            a = int(bad[0])
            raise DataError(f"{where}: atom {a} ({atoms.get_chemical_symbols()[a]}) has the non-finite velocity "
                            f"{v[a].tolist()}; fix the momenta in the file, or pass {option} draw")
        parts.extend([v] * config.replicas)
    temperatures = [float(atoms.get_temperature()) for atoms in structures]
    print(f"note: initial velocities from the structure file{'s' if len(structures) > 1 else ''} (their momenta, "
          f"{min(temperatures):.4g}" + (f"-{max(temperatures):.4g}" if len(structures) > 1 else "")
          + f" K); {option} draw draws Maxwell–Boltzmann ones at {config.temperature:g} K instead", file=err)
    if config.replicas > 1 and config.ensemble in ("nve", "nose-hoover"):
        # the copies start from the same velocities, and these ensembles draw no random numbers
        print(f"note: {config.option('replicas')} {config.replicas} copies start from the same velocities and "
              f"{config.option('ensemble')} {config.ensemble} is deterministic: they run {config.replicas} identical "
              f"trajectories; {option} draw gives each copy its own", file=err)
    return np.concatenate(parts)


def check_restart_matches(config: MDConfig, payload: dict, structures: list, sources, replicas: int) -> None:
    """The restart file's atoms (counts and elements, in the input order) are those of the structures
    given; else one line. Elements were compared only by the engine, whose line said "1 structure(s)
    of [3] atoms that do not match the structures given ([3] atoms)": no file, no atom."""
    import numpy as np

    from torchmdx.nn.normalised import element_symbol

    counts = [len(a) for a in structures]
    if counts != list(payload.get("counts", [])):
        raise DataError(f"{config.restart}: the restart file holds {len(payload['counts'])} structure(s) of "
                        f"{list(payload['counts'])} atoms that do not match the structures given ({counts} atoms)")
    given = np.concatenate([np.asarray(a.numbers) for a in structures]) if structures else np.zeros(0, int)
    saved = np.asarray(payload["z"]).reshape(-1)
    if given.shape == saved.shape and np.array_equal(given, saved):
        return
    first = int(np.flatnonzero(given != saved)[0])
    b = int(np.searchsorted(np.cumsum(counts), first, side="right"))
    a = first - sum(counts[:b])
    where = f"structure {b}" if sources is None else sources[b // max(replicas, 1)]
    raise DataError(f"{config.restart}: atom {a} of {where} is {element_symbol(int(given[first]))}, but in the restart "
                    f"file it is {element_symbol(int(saved[first]))}: the restart file was written for other "
                    "structures (or another atom order); give the structures it was written for, or none")


def _checked_config(config, potential):
    """(config, potential) for :func:`run_md`: an ``MDConfig`` made by :func:`~torchmdx.md.config.md_config` (the
    command line, a YAML file) as it is; one built directly (``MDConfig(dt="0.5", ...)``) or a mapping of its keys
    goes through ``md_config`` as the command line's options do, so that its keys are checked as theirs (a
    directly built config was used unchecked: ``dt="0.5"`` a TypeError, ``structure="ar.xyz"`` read the file
    "a", a dict "'dict' object has no attribute 'device'"). A Potential as ``model`` is taken as ``potential``."""
    from collections.abc import Mapping
    from dataclasses import MISSING, fields

    from torchmdx.md.config import md_config
    from torchmdx.nn.base import Potential

    if isinstance(config, MDConfig):
        if hasattr(config, "_names"):
            return config, potential
        values = {}
        for f in fields(MDConfig):
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            value = getattr(config, f.name)
            if value is not default and (isinstance(value, Potential) or value != default):
                values[f.name] = value
    elif isinstance(config, Mapping):
        values = dict(config)
    else:
        raise ConfigError(f"run_md: expected an MDConfig (or a mapping of its keys), got {type(config).__name__}")
    if isinstance(values.get("model"), Potential):
        if potential is not None:
            raise ConfigError("run_md: a Potential is given both as the config's model and as potential=; give one")
        potential = values.pop("model")
    return md_config(values), potential


def run_md(config: MDConfig, potential=None, out=None, err=None) -> dict:
    """Run the simulation described by ``config``; returns the summary as a dict.

    ``potential`` (a Potential object) overrides ``config.model``. Everything that can be
    refused (options, structures, outputs, model, initial forces) is checked before any output
    file is touched; warnings go to ``err`` (default stderr) as ``warning: ...`` lines.
    """
    from torchmdx.md.loading import as_dtype, check_device, load_potential

    config, potential = _checked_config(config, potential)
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    check_device(config.device, config.option("device"))
    if config.threads:
        import torch

        torch.set_num_threads(int(config.threads))

    restart_payload = load_restart(config.restart) if config.restart else None
    start_step = int(restart_payload["step"]) if restart_payload is not None else 0
    if restart_payload is not None and config.steps <= start_step:
        raise ConfigError(
            f"{config.option('steps')} {config.steps} is the total number of steps, and the restart file "
            f"{config.restart} is at step {start_step} already: nothing to run; pass a total above {start_step} "
            f"(e.g. {config.option('steps')} {start_step + max(config.steps, 1)})"
        )
    if restart_payload is not None:  # both were ignored without a word (round 20)
        if config.minimize:
            raise ConfigError(f"{config.option('minimize')} relaxes a structure before its dynamics, but "
                              f"{config.option('restart')} {config.restart} continues a run (its positions and "
                              f"velocities, at step {start_step}): nothing would be minimized; leave "
                              f"{config.option('minimize')} out, or minimize in a fresh run")
        if config.velocities != "auto":
            raise ConfigError(f"{config.option('velocities')} {config.velocities} chooses the initial velocities, but "
                              f"{config.option('restart')} {config.restart} continues a run with its own velocities "
                              f"(at step {start_step}): leave {config.option('velocities')} out")
    if restart_payload is not None and restart_payload.get("engine") == "ase" and config.engine != "ase":
        raise ConfigError(f"{config.restart}: written by --engine ase; continue it with --engine ase")
    if config.structure:
        sources: list = []
        structures = read_structures(config.structure, config.index, config.option("index"), sources)
        check_replica_memory(structures, config)
        as_read = structures  # each read structure's elements are checked once, not once per replica
        velocities = None if restart_payload is not None else initial_velocities(config, as_read, sources, err)
        structures = [_clean(a) for a in structures for _ in range(config.replicas)]
    elif restart_payload is not None:
        if config.replicas != 1:  # was silently ignored: the file's structures ran once each
            raise ConfigError(f"{config.option('replicas')} {config.replicas} copies the structure files, and none "
                              f"is given: {config.restart} continues its own {len(restart_payload['structures'])} "
                              "structure(s) (leave the option out)")
        structures = list(restart_payload["structures"])
        velocities = None
    else:
        raise ConfigError("no structure given (a structure file, or --restart FILE)")
    if config.engine == "ase" and len(structures) != 1:
        raise ConfigError(
            f"--engine ase runs one structure, got {len(structures)} (frames x replicas); "
            "use the native engine for batches"
        )
    if restart_payload is not None:
        check_restart_matches(config, restart_payload, structures,
                              sources if config.structure else None, config.replicas if config.structure else 1)
    if potential is None and not config.model:
        if (getattr(config, "_names", None) or {}).get("model", "").startswith("config key"):
            # 'model:' with nothing after it (YAML's null) in an md config file
            raise ConfigError(f"{config.option('model')} is empty (null): give the model file (Potential.save / "
                              "torchmdx export), e.g. --model model.pt")
        raise ConfigError("no model given (--model model.pt, or 'model:' in the md config)")
    plan = plan_outputs(config, len(structures), restart_payload,
                        model_path=config.model if potential is None else None)
    model_name = str(config.model) if potential is None else None
    if potential is None:
        potential = load_potential(config.model, device=config.device)
    from torchmdx.md.loading import check_restart_model, model_digest

    model_record = {"name": model_name, "digest": model_digest(potential)}
    if restart_payload is not None:  # another model continued the run without a word (round 28)
        check_restart_model(config.restart, restart_payload, potential, model_name or "(a Python object)",
                            config.option("model") if model_name else "the potential given")
    if config.structure:
        check_elements(potential, as_read, sources)
        check_cells(potential, as_read, sources)
        if config.engine != "ase":
            check_constraints(as_read, sources)
        check_float32_reach(as_read, sources, config)
        check_coincident(as_read, sources)
    dtype = as_dtype(config.dtype)
    for line in getattr(config, "_unused_option_warnings", None) or ():
        print(f"warning: {line}", file=err)
    for line in time_unit_warnings(config, start_step):  # --dt 0.001 (ps), --friction 0.01 (1/fs): silent (round 28)
        print(f"warning: {line}", file=err)  # --ensemble nve --friction 5: taken, but said (round 18)
    written_with = restart_payload.get("ensemble") if restart_payload is not None else None
    if written_with and written_with != config.ensemble and restart_payload.get("integrator"):
        # a Nose-Hoover chain's variables were dropped without a word (Simulation.load_restart keeps them for the
        # same ensemble only; round 28 left it)
        print(f"warning: {config.restart} was written by a {written_with} run, whose thermostat variables "
              f"({', '.join(sorted(restart_payload['integrator']))}) do not carry over to {config.option('ensemble')} "
              f"{config.ensemble}: positions and velocities continue, the new thermostat starts afresh", file=err)
    if restart_payload is None:  # the structures as read, named by file and frame (each replica said it again,
        for line in close_contacts(as_read, sources=sources):  # as "structure 1", "structure 2": round 20)
            print(f"warning: {line}", file=err)
        for line in charge_warnings(potential, as_read, sources):
            print(f"warning: {line}", file=err)
    if config.temperature > 10_000:
        print(f"warning: {config.option('temperature')} {config.temperature:g} K is far above what molecules "
              f"survive (typical: up to 2000 K); the run stops above {config.max_temperature_K:g} K "
              f"({config.option('max_temperature')})", file=err)

    sim = None
    if config.engine != "ase":
        from torchmdx.md.engine import Simulation

        atom_order = config.atom_order
        file_order = None
        if restart_payload is not None and "atom_order" in restart_payload:
            file_order = restart_payload["atom_order"]
            if config.atom_order == "auto":
                atom_order = file_order or "input"  # a continued run keeps its file's order (bit for bit)
        sim = Simulation(
            potential, structures, timestep_fs=config.dt, ensemble=config.ensemble,
            temperature_K=config.temperature, friction_per_ps=config.friction, tau_fs=config.tau,
            chain_length=config.chain_length, device=config.device, dtype=dtype, seed=config.seed,
            skin=config.skin, check_interval=config.check_interval, max_temperature_K=config.max_temperature,
            wrap=config.wrap, cuda_graph=(config.cuda_graph and str(config.device).startswith("cuda")),
            compile=config.compile, atom_order=atom_order, fuse_integrator=config.fuse_integrator,
        )
        if sim.compile_mode != "off":
            what = "the whole model as one graph" if sim.compile_mode == "whole" else "the model's dense parts"
            print(f"compiling {what} with torch.compile (tens of seconds, once per structure size; "
                  "--no-compile skips it)", file=out, flush=True)
        sim.model_record = model_record
        if restart_payload is not None:
            sim.load_restart(restart_payload, check_model=False)  # checked above, before anything was written
            _note_new_atom_order(config, file_order, sim.atom_perm, err)
        else:
            sim.initialize(velocities)
            if config.minimize:
                with _named_structure(sources if config.structure else None, config.replicas):
                    result = sim.minimize(config.fmax, config.minimize_steps)
                print(
                    f"FIRE: {result.steps} steps, max force {result.fmax:.4f} eV/Å "
                    f"({'converged' if result.converged else 'NOT converged'}), energy "
                    + ", ".join(f"{a:.4f} -> {b:.4f}" for a, b in zip(result.energy_start, result.energy_end))
                    + " eV",
                    file=out,
                )

    # nothing was written until here
    plan.apply(out)
    append = restart_payload is not None
    restart_before = _mtime(plan.restart)

    def open_outputs():  # a continued run writes its first step unless the files have it
        return [
            TrajectoryReporter(TrajectoryWriter(config.out, len(structures), append=append),
                               plan.last_step(plan.trajectories)),
            ThermoReporter(ThermoLog(plan.log, multi=len(structures) > 1,
                                     periodic=any(a.pbc.all() for a in structures), append=append),
                           plan.last_step([plan.log])),
        ]

    remaining = config.steps - start_step
    reporters = []

    def open_reporters():  # the ASE engine opens them once its initial forces are checked
        reporters.extend(open_outputs())
        return reporters

    try:
        if config.engine == "ase":
            from torchmdx.md.ase_engine import run_ase

            with _named_structure(sources if config.structure else None, config.replicas):
                summary = run_ase(
                    potential, structures[0], steps=remaining, timestep_fs=config.dt, ensemble=config.ensemble,
                    temperature_K=config.temperature, friction_per_ps=config.friction, tau_fs=config.tau,
                    chain_length=config.chain_length, device=config.device, dtype=dtype, seed=config.seed,
                    skin=config.skin, every=config.every, reporters=open_reporters,
                    restart_path=plan.restart, restart_every=config.restart_every, restart_payload=restart_payload,
                    minimize=config.minimize, fmax=config.fmax, minimize_steps=config.minimize_steps,
                    max_temperature_K=config.max_temperature, progress=config.progress, pressure_bar=config.pressure,
                    barostat_tau_fs=config.barostat_tau, barostat=config.barostat, velocities=velocities, model_record=model_record,
                )
        else:
            summary = sim.run(
                remaining, reporters=open_reporters(), every=config.every, restart_path=plan.restart,
                restart_every=config.restart_every, progress=config.progress,
            )
    finally:
        for r in reporters:
            r.close()
    written = [str(p) for p in plan.trajectories] + [str(plan.log)]
    if _mtime(plan.restart) != restart_before:
        written.append(str(plan.restart))
    result = dict(summary.__dict__)
    result.update(
        engine=config.engine, ensemble=config.ensemble, pressure_bar=config.pressure, device=str(config.device),
        dtype=config.dtype,
        timestep_fs=config.dt, first_step=start_step, last_step=start_step + summary.steps,
        trajectory=[str(p) for p in plan.trajectories], log=str(plan.log),
        restart=str(plan.restart) if str(plan.restart) in written else None,
    )
    rows = read_thermo(plan.log)
    if rows:
        at = f" at {config.pressure:g} bar" if config.pressure is not None else ""
        thermo_plot(rows, plan.plot, title=f"{config.ensemble} MD{at}, {config.dt:g} fs steps")
        result["plot"] = str(plan.plot)
    with atomic_write(plan.summary, "w") as f:
        json.dump(result, f, indent=2)
    for line in summary.lines():
        print(line, file=out)
    print(f"outputs          {', '.join(written)}, {plan.summary}" + (f", {result['plot']}" if "plot" in result else ""),
          file=out)
    return result


@contextlib.contextmanager
def _named_structure(sources: Optional[list], replicas: int):
    """A SimulationError that carries the index of its structure (``structure``, e.g. a minimisation whose
    atoms collapsed) is prefixed with the structure's file (and frame)."""
    try:
        yield
    except SimulationError as exc:
        b = getattr(exc, "structure", None)
        if b is None or not sources:
            raise
        raise SimulationError(f"{sources[b // max(replicas, 1)]}: {exc}") from None


def _mtime(path: Path):
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)
