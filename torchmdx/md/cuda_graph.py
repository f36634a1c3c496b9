"""One MD step captured as a CUDA graph and replayed (the native engine's fast path on CUDA).

An eager MD step of a small molecule is ~1 000 kernel launches (6 ET layers, autograd for the
forces, integrator); the GPU finishes each faster than Python can launch it. Captured once as a
CUDA graph, the whole step (integrator, Verlet-skin displacement check, model energy and
forces, non-finite check) is replayed with one launch.

How it stays correct
--------------------
- Static buffers. A graph reads and writes fixed addresses. The integrators *replace* state
  tensors (``state.positions = ...``), so during capture the new values are copied back into
  the tensors the step started from, and every attribute is pointed at those static tensors
  again. Before each chunk of replays, :meth:`GraphedStep.sync` copies any tensor that eager
  code replaced meanwhile (a careful replay, a restart, a list rebuild) into the static one.
- Fixed-capacity neighbor list. The force field switches to static, capacity-padded list
  buffers (``ForceField.fixed_capacity``) refilled in place at every rebuild (which
  happens between replays, at the engine's host check points, exactly as in eager mode). When a
  rebuild needs more rows than the capacity, the buffers are reallocated
  (``layout_version`` changes) and the step is captured again.
- Checks. The "an atom moved more than skin/2" flag and the non-finite flag are ORed into
  static device flags inside the graph; the engine reads them once per chunk as before and, if
  set, undoes the chunk and replays it eagerly step by step (careful mode).
- Randomness. Stochastic integrators (Langevin, Bussi) draw from the engine's
  ``torch.Generator``; it is registered with the graph (``CUDAGraph.register_generator_state``)
  so each replay draws fresh numbers and the generator's state (saved in snapshots and restart
  files) advances as in eager mode. Where that is unavailable, or capture fails for any other
  reason, the engine says so once and runs eagerly.
"""

from __future__ import annotations

from typing import Optional

import torch

STATE_FIELDS = ("positions", "velocities", "forces", "energy", "thermostat_energy")


class GraphedStep:
    """One integrator step of ``simulation`` as a CUDA graph (see the module docstring)."""

    def __init__(self, simulation):
        self.sim = simulation
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.layout_version = -1
        self.static: dict = {}
        self.bad = None
        self.captures = 0

    # ------------------------------------------------------------------ static buffers
    def _tensors(self) -> dict:
        """Every tensor a step reads and replaces, by a stable key."""
        sim = self.sim
        out = {f"state.{name}": getattr(sim.state, name) for name in STATE_FIELDS}
        out["ff.stale"] = sim.forcefield.stale
        out["ff.max_displacement2"] = sim.forcefield.max_displacement2
        for name, value in sim.integrator.state_dict().items():
            if torch.is_tensor(value):
                out[f"integrator.{name}"] = value
        return out

    def _point_at(self, tensors: dict) -> None:
        """Make the simulation's attributes refer to ``tensors`` (same keys as :meth:`_tensors`)."""
        sim = self.sim
        for name in STATE_FIELDS:
            setattr(sim.state, name, tensors[f"state.{name}"])
        sim.forcefield.stale = tensors["ff.stale"]
        sim.forcefield.max_displacement2 = tensors["ff.max_displacement2"]
        integrator_state = {k[len("integrator."):]: v for k, v in tensors.items() if k.startswith("integrator.")}
        if integrator_state:
            for name, value in integrator_state.items():
                setattr(sim.integrator, name, value)

    def sync(self) -> None:
        """Copy tensors that eager code replaced into the static buffers; re-point attributes."""
        current = self._tensors()
        for key, value in current.items():
            static = self.static.get(key)
            if static is not None and value is not static:
                static.copy_(value)
        self._point_at(self.static)

    # ------------------------------------------------------------------ capture and replay
    def capture(self) -> None:
        sim = self.sim
        ff = sim.forcefield
        self.static = {key: value.detach().clone() for key, value in self._tensors().items()}
        self._point_at(self.static)
        self.bad = torch.zeros((), dtype=torch.bool, device=sim.device)
        step0 = sim.state.step
        saved = {key: value.clone() for key, value in self.static.items()}
        rng = sim.generator.get_state()
        compute = ff.compute

        def one_step():
            sim.integrator.step(sim.state, compute, sim.generator)
            self.bad.logical_or_(sim._bad_flag(sim.state))
            for key, value in self._tensors().items():
                static = self.static[key]
                if value is not static:
                    static.copy_(value)
            self._point_at(self.static)

        try:
            # warm-up on a side stream (Triton compilation, autograd and allocator state), undone after
            side = torch.cuda.Stream(device=sim.device)
            side.wait_stream(torch.cuda.current_stream(sim.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    one_step()
            torch.cuda.current_stream(sim.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if sim.integrator.stochastic:
                register = getattr(graph, "register_generator_state", None)
                if register is None:
                    raise RuntimeError("this torch cannot capture a custom random generator in a CUDA graph")
                register(sim.generator)
            with torch.cuda.graph(graph):
                one_step()
        finally:
            # capture ran nothing; undo the warm-up (also when capture failed)
            torch.cuda.synchronize(sim.device)
            for key, value in saved.items():
                self.static[key].copy_(value)
            self._point_at(self.static)
            sim.generator.set_state(rng)
            sim.state.step = step0
            self.bad.zero_()
        self.graph = graph
        self.layout_version = ff.layout_version
        self.captures += 1

    def run(self, n: int) -> torch.Tensor:
        """Replay ``n`` steps; returns the device flag "a step produced non-finite values"."""
        sim = self.sim
        if self.graph is None or self.layout_version != sim.forcefield.layout_version:
            self.capture()
        self.sync()
        self.bad.zero_()
        for _ in range(n):
            self.graph.replay()
        sim.state.step += n
        return self.bad.clone()
