"""The run loop of the native MD engine (:class:`RunLoop`, mixed into :class:`torchmdx.md.engine.Simulation`).

Loop structure
--------------
Steps run in *chunks* that end after ``check_interval`` steps, at the next multiple of the
output interval ``every`` or of ``restart_every``, or at the end. Inside a chunk nothing is
read back from the device: the integrator updates tensors, the force field ORs "an atom moved
more than skin/2" into a device flag, and a second flag records non-finite energies or forces
(and, at the chunk's end, a temperature above ``max_temperature_K``). At the end of the chunk
both flags are read with one transfer. If either is set, the chunk is undone (the state before
it is a shallow snapshot: integrators never modify tensors in place; the random generator's
state is saved too) and replayed in careful mode, which checks after every step: the neighbor
list is rebuilt exactly when needed, and a bad step stops the run at the last good step. After
a replay the chunk length halves, and grows back by one step per clean chunk. At a check point
the list is also rebuilt ahead of time when the largest displacement plus twice (largest speed
× chunk duration) would exceed skin/2, so replays stay rare. With CUDA graphs the captured step
rebuilds its own (fixed-capacity) list on the device at every step instead
(:mod:`torchmdx.md.forces`), so only a capacity overflow makes a chunk replay.

On the CPU a host check costs nothing, so there (``check_every_step``, the default off CUDA)
every step is taken in careful mode and nothing is ever replayed.

The loop uses the simulation's state, system, integrator, force field, random generator,
reporters and restart files (:class:`~torchmdx.md.engine_restart.RestartFiles`); its set-up,
atom order and observations are in :mod:`torchmdx.md.engine`.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from torchmdx.errors import ConfigError, SimulationError
from torchmdx.io_utils import output_file_name
from torchmdx.md.arguments import whole_argument
from torchmdx.md.reports import Reporter, RunSummary
from torchmdx.md.system import MDState

__all__ = ["RunLoop"]


def _next_multiple(step: int, interval: Optional[int]) -> float:
    if not interval:
        return math.inf
    return (step // interval + 1) * interval


def too_hot_at_start(structure: int, temperature: float, limit: float) -> str:
    """The line for a start state hotter than the run's temperature limit: no step was taken, so
    the old advice ("the simulation is exploding: reduce the time step or check the model") was
    wrong; the limit is below the initial velocities' temperature (``--max-temperature 1``)."""
    return (f"the initial state cannot be simulated: structure {structure} starts at {temperature:.4g} K (its "
            f"initial velocities), above max_temperature {limit:g} K, before any step: raise max_temperature "
            "(--max-temperature) above the starting temperature, or start colder")


class _FunctionReporter(Reporter):
    """A function ``f(simulation, observation)`` given as a reporter (as ASE's ``dyn.attach(f)`` takes one)."""

    def __init__(self, function):
        self.function = function

    def report(self, simulation, observation) -> None:
        self.function(simulation, observation)


def _as_reporters(reporters) -> list:
    """``run``'s reporters as a list: Reporter objects (anything with ``report(simulation, observation)``), a
    function ``f(simulation, observation)``, or a list of them. A function was "'function' object has no attribute
    'report'" (in a list) or "'function' object is not iterable" (alone), any other object an AttributeError after
    the first steps."""
    if reporters is None:
        return []
    if hasattr(reporters, "report") or callable(reporters):
        reporters = [reporters]
    try:
        items = list(reporters)
    except TypeError:
        raise ConfigError(f"reporters must be a list of Reporter objects (or functions f(simulation, observation)), "
                          f"got {type(reporters).__name__} {reporters!r}"[:300]) from None
    out = []
    for k, item in enumerate(items):
        if hasattr(item, "report"):
            out.append(item)
        elif callable(item):
            out.append(_FunctionReporter(item))
        else:
            raise ConfigError(f"reporters: item {k} ({type(item).__name__}) has no report(simulation, observation) "
                              "method; give torchmdx.md.Reporter objects or functions f(simulation, observation)")
    return out


class RunLoop:
    """The checks, snapshots and chunked run loop of :class:`~torchmdx.md.engine.Simulation` (module
    docstring)."""

    # ------------------------------------------------------------------ checks
    def _initial_too_hot(self, state: MDState) -> Optional[str]:
        """The start state's temperature above the limit: :func:`too_hot_at_start`'s line, else None."""
        s = self.system
        temperature = s.temperature(s.kinetic_energy(state.velocities))
        hot = ~(temperature <= self.max_temperature_K)
        if not bool(hot.any()):
            return None
        b = int(hot.nonzero()[0, 0])
        return too_hot_at_start(b, float(temperature[b]), self.max_temperature_K)

    def _bad_flag(self, state: MDState) -> torch.Tensor:
        """Device bool: non-finite energy or forces (checked every step; the temperature limit
        is checked at the end of each chunk, :meth:`_too_hot`)."""
        return ~torch.isfinite(state.forces.sum() + state.energy.sum())

    def _too_hot(self, state: MDState) -> torch.Tensor:
        temperature = self.system.temperature(self.system.kinetic_energy(state.velocities))
        return ~(temperature <= self.max_temperature_K).all()

    def _bad_reason(self, state: MDState) -> Optional[str]:
        """A one-line reason if the state is bad (synchronises), else None."""
        s = self.system
        finite_f = torch.isfinite(state.forces).all(-1)
        if not bool(finite_f.all()):
            a = self.input_index(int((~finite_f).nonzero()[0, 0]))
            b = int(s.batch[a])
            return f"the forces are not finite (NaN/inf) on atom {a - s.offsets[b]} of structure {b}"
        finite_e = torch.isfinite(state.energy)
        if not bool(finite_e.all()):
            b = int((~finite_e).nonzero()[0, 0])
            return f"the energy of structure {b} is not finite"
        temperature = s.temperature(s.kinetic_energy(state.velocities))
        hot = ~(temperature <= self.max_temperature_K)
        if bool(hot.any()):
            b = int(hot.nonzero()[0, 0])
            return (
                f"the temperature of structure {b} reached {float(temperature[b]):.4g} K, above "
                f"max_temperature {self.max_temperature_K:g} K (the simulation is exploding: "
                f"reduce the time step or check the model)"
            )
        return None

    # ------------------------------------------------------------------ snapshots
    def _snapshot(self) -> tuple:
        if self._graphed is None:
            return (
                self.state.copy(),
                dict(self.integrator.state_dict()),
                self.generator.get_state(),
                self.forcefield.snapshot(),
            )
        # graph replays modify the static tensors in place: a snapshot must copy them
        def copy(value):
            return value.clone() if torch.is_tensor(value) else value

        from torchmdx.md.cuda_graph import STATE_FIELDS

        state = self.state.copy()
        for name in STATE_FIELDS:
            setattr(state, name, getattr(state, name).clone())
        return (
            state,
            {k: copy(v) for k, v in self.integrator.state_dict().items()},
            self.generator.get_state(),
            tuple(copy(v) for v in self.forcefield.snapshot()),
        )

    def _restore(self, snap: tuple) -> None:
        state, integrator_state, rng, ff = snap
        self.state = state.copy()
        self.integrator.load_state_dict(integrator_state)
        self.generator.set_state(rng)
        self.forcefield.restore(ff)

    # ------------------------------------------------------------------ running
    def _advance_fast(self, n: int) -> torch.Tensor:
        if self._graphed is not None:
            try:
                return self._graphed.run(n)
            except RuntimeError as exc:  # capture not possible here: say so once, run eagerly
                reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
                if self.integrator.fused is not None:  # first the fused integrator: the newest part
                    print(f"note: the fused integrator failed in the CUDA-graph step ({reason}); "
                          "running it eagerly", file=sys.stderr)
                    self.integrator.set_fused(False)
                    return self._advance_fast(n)
                if self.traced:  # first try again with the model's parts compiled
                    print(f"note: the whole-model graph failed in the CUDA-graph step ({reason}); "
                          "compiling the model's parts instead", file=sys.stderr)
                    self.forcefield.set_traced(None)
                    self.traced = False
                    self.compile_mode = "parts"
                    self.compiled = bool(self.potential.set_compiled(True))
                    return self._advance_fast(n)
                if self.compiled:  # then without torch.compile
                    print(f"note: the compiled model failed in the CUDA-graph step ({reason}); "
                          "running it uncompiled", file=sys.stderr)
                    self.potential.set_compiled(False)
                    self.compiled = False
                    return self._advance_fast(n)
                print(f"note: CUDA-graph capture of the MD step failed ({reason}); running eagerly", file=sys.stderr)
                self._graphed = None
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        compute = self.forcefield.compute
        for _ in range(n):
            self.integrator.step(self.state, compute, self.generator)
            bad = bad | self._bad_flag(self.state)
        return bad

    def _advance_chunk(self, n: int, reporters) -> None:
        """n steps without host synchronisation, then one check; replay carefully if needed."""
        ff = self.forcefield
        snap = self._snapshot()
        bad = self._advance_fast(n) | self._too_hot(self.state)
        v2 = (self.state.velocities ** 2).sum(-1).amax()
        d2 = ff.displacement2(self.state.positions)
        stale, bad_f, d2_now, v2_now = torch.stack([ff.stale.to(self.dtype), bad.to(self.dtype), d2, v2]).tolist()
        if stale or bad_f:
            self.replays += 1
            self._restore(snap)
            self._advance_careful(n, reporters)
            self._interval = max(1, self._interval // 2)
        else:
            self._interval = min(self.check_interval, self._interval + 1)
            if ff.rebuild_each_step:
                # the step builds its own list: nothing to look ahead for; keep positions in the box
                if ff.wrap_positions and self.system.periodic:
                    self.state.positions = self.system.wrap(self.state.positions)
                return
            # rebuild ahead of time if, at twice the present top speed, an atom could pass
            # skin/2 within the next chunk
            horizon = 2.0 * self.integrator.dt * self._interval
            if math.sqrt(d2_now) + math.sqrt(v2_now) * horizon > 0.5 * ff.skin:
                self.state.positions = ff.build(self.state.positions)

    def _advance_careful(self, n: int, reporters) -> None:
        def compute(state):
            self.forcefield.compute(state, careful=True)

        for _ in range(n):
            snap = self._snapshot()
            self.integrator.step(self.state, compute, self.generator)
            reason = self._bad_reason(self.state)
            if reason:
                failed_step = self.state.step
                self._restore(snap)
                self._fail(failed_step, reason, reporters)

    def _fail(self, failed_step: int, reason: str, reporters) -> None:
        """Stop: report the last good state, write the restart file, raise SimulationError."""
        last = self.state.step
        kept = []
        try:
            observation = self.observe()
            for r in reporters:
                r.report_failure(self, observation)
            kept.append("the trajectory's last frame")
        except Exception:  # noqa: BLE001 - the failure message matters more than a partial report
            pass
        if self._restart_path is not None:
            self.save_restart(self._restart_path)
            kept.append(str(self._restart_path))
        where = f"; last good state (step {last}) kept in " + " and ".join(kept) if kept else ""
        raise SimulationError(f"simulation stopped at step {failed_step}: {reason}{where}")

    def run(
        self,
        steps: int,
        reporters: Sequence[Reporter] = (),
        every: int = 10,
        restart_path=None,
        restart_every: Optional[int] = None,
        progress: bool = False,
        report_start: bool = True,
    ) -> RunSummary:
        """Advance ``steps`` steps, reporting every ``every`` steps (and at the start when
        ``report_start``), writing ``restart_path`` every ``restart_every`` steps and at the end."""
        # run(2.5) ran 2 steps, run("10") was a TypeError deep inside, restart_every=-3 never ended (the next
        # restart step was never ahead) and 0 was taken as the default: whole numbers in range only
        steps = whole_argument("steps", steps, "a whole number of steps >= 0", low=0)
        every = whole_argument("every", every, "a whole number of steps >= 1 (the output interval)")
        if restart_every is not None:
            restart_every = whole_argument("restart_every", restart_every,
                                           "a whole number of steps >= 1 (None: 10 x every)")
        reporters = _as_reporters(reporters)
        if self.state is None:
            self.initialize()
        # checked before any step (a folder was found at the first restart step, 'out/' wrote a file named out)
        self._restart_path = output_file_name(restart_path) if restart_path is not None else None
        if self._restart_path is not None and not restart_every:
            restart_every = every * 10
        s, ff = self.system, self.forcefield
        start_step = self.state.step
        if self.check_every_step:
            self._interval = self.check_interval
        end = start_step + int(steps)
        builds_before, replays_before = ff.builds, self.replays
        bar = None
        if progress and sys.stderr.isatty():  # a bar on a terminal; logs get the summary lines
            from tqdm.auto import tqdm

            bar = tqdm(total=int(steps), unit="step", desc=f"md {self.ensemble}", dynamic_ncols=True)
        try:
            with torch.no_grad():
                first = self.observe()
                if report_start:
                    for r in reporters:
                        r.report(self, first)
                wall_start = time.perf_counter()
                while self.state.step < end:
                    step = self.state.step
                    target = int(min(
                        step + self._interval, _next_multiple(step, every),
                        _next_multiple(step, restart_every if self._restart_path is not None else None), end,
                    ))
                    n = target - step
                    if self.check_every_step:
                        self._advance_careful(n, reporters)
                    else:
                        self._advance_chunk(n, reporters)
                    if bar is not None:
                        bar.update(n)
                    step = self.state.step
                    if step % every == 0 or step == end:
                        observation = self.observe()
                        for r in reporters:
                            r.report(self, observation)
                        if bar is not None:
                            bar.set_postfix(T=f"{float(observation.temperature.mean()):.1f}K", E=f"{float(observation.conserved.sum()):.4f}eV")
                    if self._restart_path is not None and (step % restart_every == 0 or step == end):
                        self.save_restart(self._restart_path)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                wall = time.perf_counter() - wall_start
                last = self.observe(pressure=False)
        finally:
            if bar is not None:
                bar.close()
        done = end - start_step
        steps_per_s = done / wall if wall > 0 else float("inf")
        drift = (last.conserved - first.conserved) / np.asarray(s.counts, dtype=float)
        worst = float(drift[np.argmax(np.abs(drift))]) if len(drift) else 0.0
        sim_ns = done * self.timestep_fs * 1e-6
        return RunSummary(
            steps=done,
            wall_s=wall,
            steps_per_s=steps_per_s,
            ns_per_day=steps_per_s * self.timestep_fs * 1e-6 * 86400.0,
            atoms=s.num_atoms,
            structures=s.num_structures,
            energy_drift_eV_per_atom=worst,
            energy_drift_eV_per_atom_per_ns=worst / sim_ns if sim_ns > 0 else 0.0,
            neighbor_list_builds=ff.builds - builds_before,
            replays=self.replays - replays_before,
            final_temperature_K=[float(t) for t in last.temperature],
        )

    _restart_path: Optional[Path] = None
