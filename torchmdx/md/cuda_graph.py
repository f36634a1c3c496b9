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

from typing import NamedTuple, Optional

import torch

STATE_FIELDS = ("positions", "velocities", "forces", "energy", "thermostat_energy")

#: the captured step's epilogue in few kernels: with the fused integrator, the non-finite check
#: as one compiled kernel (:func:`torchmdx.md.integrators_fused.non_finite`) and the copies of
#: the replaced tensors into the static ones as ``torch._foreach_copy_`` per dtype (one launch
#: per dtype instead of one per tensor); False: one op per check step and per copy (the reference)
FUSED_EPILOGUE = True


class ForceOutputs(NamedTuple):
    """The static outputs of one :class:`GraphedForces` evaluation (read them before the next
    call): energy [1] eV, forces [N, 3] eV/Å, per-atom energies [N] eV, the neighbor list's
    overflow flag, and ``packed`` = [forces (3N), per-atom energies (N), energy, overflow] in
    float64 for one copy to the host."""

    energy: torch.Tensor
    forces: torch.Tensor
    atomic: torch.Tensor
    overflow: torch.Tensor
    packed: torch.Tensor


def capture_graph(fn, device, generator: Optional[torch.Generator] = None, warmups: int = 2):
    """Run ``fn`` ``warmups`` times on a side stream (Triton and torch.compile compilation,
    autograd and allocator state), then capture one call as a CUDA graph; returns (graph, the
    captured call's outputs). ``generator``: a random generator the graph draws from (registered
    so that every replay draws fresh numbers)."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if generator is not None:
        register = getattr(graph, "register_generator_state", None)
        if register is None:
            raise RuntimeError("this torch cannot capture a custom random generator in a CUDA graph")
        register(generator)
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


class GraphedStep:
    """One integrator step of ``simulation`` as a CUDA graph (see the module docstring). One step
    per graph: K steps as one graph (K = 4) replayed no faster at 22 atoms (H100, 2026-12-07:
    2 790 against 2 810 steps/s), the gaps between replays being small beside the step."""

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

        fused = sim.integrator.fused if FUSED_EPILOGUE else None
        check = fused.get("non_finite", sim.device) if fused is not None else None

        def one_step():
            sim.integrator.step(sim.state, compute, sim.generator)
            if check is None:
                self.bad.logical_or_(sim._bad_flag(sim.state))
                for key, value in self._tensors().items():
                    static = self.static[key]
                    if value is not static:
                        static.copy_(value)
            else:
                groups = {}  # by dtype: _foreach_copy_ takes its one-launch path only for lists of one dtype
                for static, value in [(self.bad, check(self.bad, sim.state.forces, sim.state.energy))] + [
                        (self.static[key], value) for key, value in self._tensors().items()]:
                    if value is not static:
                        targets, sources = groups.setdefault(static.dtype, ([], []))
                        targets.append(static)
                        sources.append(value)
                for targets, sources in groups.values():
                    torch._foreach_copy_(targets, sources)
            self._point_at(self.static)

        try:
            # the warm-up steps advance the state: undone below
            graph, _ = capture_graph(one_step, sim.device, sim.generator if sim.integrator.stochastic else None)
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


class GraphedForces:
    """Energy, per-atom energies and forces of one fixed structure, as a CUDA graph: what the
    ASE calculator replays at every call while only the positions change.

    The captured function rebuilds the fixed-capacity neighbor list on the device (cutoff, no
    skin, :meth:`ForceField._build_on_device`) and evaluates the model; positions are copied
    into a static buffer before each replay. An overflowing list is detected after the replay
    (the results are read anyway): the exact list is then built eagerly (capacity grows), the
    function is captured again and replayed. ``use_graph=False`` runs the same function eagerly
    (the CPU tests exercise the list/overflow logic that way). ``traced``: the model and its
    forces run as one traced, compiled graph (:class:`torchmdx.nn.traced.TracedForces`).

    :meth:`host` is the call of callers that want the numbers on the host (the ASE calculator,
    the OpenMM PythonForce): the captured function also packs forces, per-atom energies, the
    energy and the overflow flag into one float64 vector, so a call is one copy of the positions
    in, one replay and one copy out. :meth:`set_cell` changes the periodic cell (a barostat, a
    cell filter) in place: the list is built again and the function captured again at the next
    call, but the model (its traced, compiled graph) is kept.
    """

    def __init__(self, potential, atoms, device, dtype, skin: float = 0.5, use_graph: bool = True,
                 traced: bool = False):
        from torchmdx.md.forces import ForceField
        from torchmdx.md.system import System

        self.system = System.from_atoms([atoms], device, dtype)
        self.forcefield = ForceField(potential, self.system, skin=skin, wrap=False)
        self.forcefield.fixed_capacity = True
        self.forcefield.rebuild_each_step = True
        if traced:
            from torchmdx.nn.traced import TracedForces

            self.forcefield.set_traced(TracedForces(potential))
        self.positions: Optional[torch.Tensor] = None
        self.use_graph = bool(use_graph)
        self.graph = None
        self.layout_version = -1
        self.outputs = None
        self.captures = 0
        self.regrowths = 0

    def _evaluate(self):
        ff = self.forcefield
        ff.stale = torch.zeros((), dtype=torch.bool, device=self.positions.device)  # static: stays False
        ff._build_on_device(self.positions)
        energy, forces, atomic = ff.evaluate(self.positions, per_atom=True)
        # what host() copies out in one go: [forces (3N), per-atom energies (N), energy, overflow]
        packed = torch.cat([forces.reshape(-1).to(torch.float64), atomic.reshape(-1).to(torch.float64),
                            energy.reshape(-1).to(torch.float64), ff.stale.reshape(1).to(torch.float64)])
        return ForceOutputs(energy, forces, atomic, ff.stale, packed)

    def _capture(self) -> None:
        self.graph, self.outputs = capture_graph(self._evaluate, self.positions.device)
        self.layout_version = self.forcefield.layout_version
        self.captures += 1

    def _run(self):
        """The outputs of one evaluation at ``self.positions`` (a replay, or an eager call)."""
        ff = self.forcefield
        if ff.neighbors is None:
            ff.build(self.positions, wrap=False)  # the exact list sizes the capacity
        if not self.use_graph:
            return self._evaluate()
        if self.graph is None or self.layout_version != ff.layout_version:
            self._capture()
        self.graph.replay()
        return self.outputs

    def _load(self, positions: torch.Tensor) -> None:
        """Copy ``positions`` (any device and floating dtype) into the static buffer."""
        if self.positions is None or self.positions.shape != positions.shape:
            self.positions = torch.empty(positions.shape, dtype=self.system.dtype, device=self.system.device)
        self.positions.copy_(positions)

    def _regrow(self) -> None:
        """More pairs than rows: build the exact list eagerly (grows the buffers); the next call
        captures again."""
        self.regrowths += 1
        self.forcefield.build(self.positions, wrap=False)

    def __call__(self, positions: torch.Tensor):
        """(energy [1] eV, forces [N, 3] eV/Å, per-atom energies [N] eV) at ``positions`` [N, 3] Å,
        device tensors (the static outputs of the graph: read them before the next call)."""
        self._load(positions)
        for _ in range(8):
            energy, forces, atomic, overflow, _ = self._run()
            if not bool(overflow):
                return energy, forces, atomic
            self._regrow()
        raise RuntimeError("the neighbor list kept overflowing its buffers")  # pragma: no cover

    def host(self, positions: torch.Tensor) -> torch.Tensor:
        """``[forces (3N, eV/Å), per-atom energies (N, eV), energy (eV)]`` as one float64 CPU
        tensor at ``positions`` [N, 3] Å (a CPU tensor is copied straight into the static
        buffer, converted to the model's dtype on the way): one replay and one copy out, which
        also brings the overflow flag (then: grow, capture again, replay)."""
        self._load(positions)
        for _ in range(8):
            packed = self._run().packed.cpu()
            if packed[-1].item() == 0.0:
                return packed[:-1]
            self._regrow()
        raise RuntimeError("the neighbor list kept overflowing its buffers")  # pragma: no cover

    def set_cell(self, cell: torch.Tensor) -> None:
        """A new periodic cell [1, 3, 3] (Å) for the same atoms: written into the system's cell
        tensor in place (the captured function reads it there); the exact list is built again at
        the next call (which checks the cell against the cutoff and sizes the capacity) and the
        function captured again. The model's traced graph is kept: no new compilation."""
        from torchmdx.md.forces import fit_skin

        s, ff = self.system, self.forcefield
        if s.cell is None:
            raise ValueError("set_cell: this structure is not periodic")
        cell = cell.reshape(s.cell.shape).to(device=s.cell.device, dtype=s.cell.dtype)
        if torch.equal(cell, s.cell):
            return
        s.cell.copy_(cell)
        ff.skin = fit_skin(ff.cutoff, ff.requested_skin, s.cell, s.pbc)
        ff.neighbors = None
        self.graph = None
