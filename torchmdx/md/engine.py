"""The native MD engine: every step on the device, the host only at check and output points.

The run loop (chunks of steps between host checks, careful replays, the checks themselves) is
:class:`~torchmdx.md.engine_loop.RunLoop`, mixed into :class:`Simulation`; its module docstring
describes it.

Restart files (written and read by the methods of :class:`~torchmdx.md.engine_restart.RestartFiles`)
let a continued run reproduce the original one bit for bit (on the same device, in the same mode).
Observations, reporters and the run summary are in :mod:`torchmdx.md.reports`.

Atom order (``atom_order``). For a large system the engine sorts the atoms of each structure
once, at construction, along a space-filling curve (:mod:`torchmdx.kernels.locality`), so that
the neighbors of an atom lie close in memory for the message kernels; the engine builds its
own neighbor lists (and passes them to the potential, whose own ordering hook is then off), so
the order is the engine's to choose. ``system`` and ``state`` hold the sorted order; everything
that leaves the engine is in the input order: :meth:`observe` (so trajectory frames and logs),
restart files (which also record the order, so a continued run uses the same one) and the
atoms named in error messages; ``initialize(velocities=...)`` takes them in the input order,
and Maxwell–Boltzmann velocities and the per-atom Langevin noise are drawn in the input order
(then permuted), so a sorted run follows the unsorted one with the same seed to rounding (NVE
and every thermostat; Bussi's and the Nosé–Hoover chain's variables are per structure).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from torchmdx import units
from torchmdx.errors import ConfigError, DataError, ModelError, SimulationError
from torchmdx.kernels.locality import LOCALITY_MIN_ATOMS, auto_order, check_atom_order, spatial_order
from torchmdx.md.engine_loop import RunLoop
from torchmdx.md.engine_restart import RestartFiles
from torchmdx.md.forces import ForceField
from torchmdx.md.integrators import make_integrator
from torchmdx.md.io import make_frame
from torchmdx.md.minimize import FireResult, collapse_message, fire_minimize
from torchmdx.md.reports import Observation, Reporter, RunSummary, model_problem, non_finite_weight
from torchmdx.md.system import MDState, System
from torchmdx.nn.base import Potential

__all__ = ["Simulation", "order_structures",
           # re-exported from torchmdx.md.reports (imported from here by other modules and tests)
           "Observation", "Reporter", "RunSummary", "model_problem", "non_finite_weight"]


class Simulation(RunLoop, RestartFiles):
    """Molecular dynamics of one or more structures with a :class:`Potential`.

    ``structures``: an ``ase.Atoms`` or a list of them (replicas or different molecules, run as
    one batch). ``timestep_fs`` (fs), ``ensemble`` one of nve, langevin, bussi, nose-hoover,
    ``temperature_K`` (K; initial velocities and thermostat target), ``friction_per_ps``
    (Langevin γ, 1/ps), ``tau_fs`` (Bussi / Nosé–Hoover time constant, fs), ``skin`` (Å),
    ``check_interval`` (steps between host checks), ``max_temperature_K`` (a structure hotter
    than this stops the run; default max(2000 K, 5 T)), ``check_every_step`` (default: True
    unless on CUDA; see :mod:`torchmdx.md.engine_loop`). The potential is moved to ``device`` and ``dtype``.
    ``cuda_graph``: replay each step as a CUDA graph (default: on CUDA). ``compile``: one of
    :data:`torchmdx.nn.traced.COMPILE_MODES` ("auto" by default: on CUDA the whole model as one
    compiled graph for up to :data:`~torchmdx.nn.traced.WHOLE_GRAPH_MAX_ATOMS` atoms, its dense
    parts compiled above; off on the CPU), True ("auto") or False ("off"). ``atom_order``: "auto"
    (default: Hilbert when a structure has at least
    :data:`~torchmdx.kernels.locality.LOCALITY_MIN_ATOMS` atoms, unless the input order is as
    local: :func:`~torchmdx.kernels.locality.auto_order`), "input", "hilbert", "morton",
    or an explicit permutation [N] (a restart file's); see the module docstring.
    ``fuse_integrator``: the integrator's element-wise work around the force call compiled into
    a few kernels (:mod:`torchmdx.md.integrators_fused`): "auto" (default: when the model is
    compiled, i.e. ``compile`` resolves to other than "off", as on CUDA), True or False (the eager
    integrator). Results agree with the eager step to rounding; on an H100 (2026-12-05, Langevin,
    float32 ET) 1 471 -> 1 620 steps/s for alanine dipeptide, 470 -> 485 for chignolin.
    """

    def __init__(
        self,
        potential: Potential,
        structures,
        *,
        timestep_fs: float = 0.5,
        ensemble: str = "nve",
        temperature_K: float = 300.0,
        friction_per_ps: float = 1.0,
        tau_fs: float = 100.0,
        chain_length: int = 3,
        device="cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        skin: float = 0.5,
        check_interval: int = 10,
        max_temperature_K: Optional[float] = None,
        wrap: bool = True,
        check_every_step: Optional[bool] = None,
        cuda_graph: Optional[bool] = None,
        compile=None,
        atom_order="auto",
        fuse_integrator="auto",
    ):
        import ase

        from torchmdx.md.arguments import flag_argument, real_argument, whole_argument

        if isinstance(structures, ase.Atoms):
            atoms_list = [structures]
        elif isinstance(structures, (str, bytes, os.PathLike)) or not isinstance(structures, Iterable):
            # a file name was "'str' object has no attribute 'copy'"
            hint = "; read the file first (ase.io.read)" if isinstance(structures, (str, os.PathLike)) else ""
            raise DataError(f"Simulation: structures must be an ase.Atoms or a list of them, got "
                            f"{type(structures).__name__} {str(structures)[:80]!r}{hint}")
        else:
            atoms_list = list(structures)
        for b, atoms in enumerate(atoms_list):
            if not isinstance(atoms, ase.Atoms):
                raise DataError(f"Simulation: structures must be an ase.Atoms or a list of them; item {b} is "
                                f"{type(atoms).__name__}")
        from torchmdx.md.start_checks import check_constraints

        # torchmdx md refuses them naming the file; from Python the engine moved the atoms a FixAtoms holds while
        # frames() (through ASE's set_positions) showed them fixed
        check_constraints(atoms_list, [f"Simulation: structure {b}" for b in range(len(atoms_list))],
                          "run ASE's dynamics with torchmdx.Calculator (ASE applies them), or remove them "
                          "(del atoms.constraints)")
        # numbers and flags given from Python (torchmdx md checks its options in md.config): "10" and "0.5" were
        # TypeErrors deep inside, 2.5 steps ran as 2, wrap="no" was true
        check_interval = whole_argument("check_interval", check_interval, "a whole number of steps >= 1")
        chain_length = whole_argument("chain_length", chain_length, "a whole number of thermostats >= 1")
        skin = real_argument("skin", skin, "a distance >= 0 Å")
        friction_per_ps = real_argument("friction_per_ps", friction_per_ps, "a friction >= 0 1/ps")
        tau_fs = real_argument("tau_fs", tau_fs, "a time > 0 fs", inclusive=False)
        wrap = flag_argument("wrap", wrap)
        #: the structures as given (outputs are written with these), and the sorted ones simulated
        self.input_templates = [a.copy() for a in atoms_list]
        atoms_list, self.atom_perm = order_structures(atoms_list, atom_order)
        from torchmdx.devices import check_device
        from torchmdx.dtypes import torch_dtype

        # the names the Calculator and load_model take: dtype="float64" was a TypeError traceback, a device
        # typo torch's RuntimeError listing every device type
        self.device = check_device(device, "device")
        self.dtype = dtype = torch_dtype(dtype, what="dtype")
        import numbers

        if max_temperature_K is not None and not (isinstance(max_temperature_K, numbers.Real)
                                                  and not isinstance(max_temperature_K, bool)
                                                  and 0 < max_temperature_K < float("inf")):
            # -5 ran, then stopped at once as "exploding: reduce the time step or check the model"
            raise ConfigError(f"max_temperature_K must be a positive number of K (or None: max(2000 K, 5 T)), got "
                              f"{max_temperature_K!r}")
        from torchmdx.md.loading import load_potential

        # a copy where the caller's model would be converted (Module.to converts in place):
        # Simulation(model, dtype=float64) turned the caller's float32 model into a float64 one.
        # A model already of the run's dtype and device is used as it is (switched to eval mode;
        # a copy there would compile again for every Simulation sharing one model)
        self.potential = load_potential(potential, device=self.device, dtype=dtype)
        self.potential.eval()
        if dtype == torch.float32:  # torchmdx md names the file first (md.run.check_float32_reach)
            from torchmdx.md.system import float32_reach_problem

            for b, atoms in enumerate(atoms_list):
                problem = float32_reach_problem(atoms, wrap)
                if problem:
                    raise ConfigError(f"structure {b}: {problem}; translate it near the origin, or run in float64")
        self.system = System.from_atoms(atoms_list, self.device, dtype)
        self._perm = self._inverse = None  # device index tensors of the order, None: input order
        if self.atom_perm is not None:
            self._perm = torch.as_tensor(self.atom_perm, dtype=torch.long, device=self.device)
            self._inverse = torch.empty_like(self._perm)
            self._inverse[self._perm] = torch.arange(len(self.atom_perm), device=self.device)
        self.forcefield = ForceField(self.potential, self.system, skin=skin, wrap=wrap)
        self.ensemble = ensemble
        self.temperature_K = float(temperature_K)
        from torchmdx.md.config import MAX_TEMPERATURE_K

        if not 0.0 <= self.temperature_K <= MAX_TEMPERATURE_K:  # as torchmdx md's --temperature (1e30 K ran)
            raise ConfigError(f"temperature_K must be between 0 and {MAX_TEMPERATURE_K:g} K (typical: up to 2000 K), "
                              f"got {temperature_K}")
        import numbers

        for name, value in (("timestep_fs", timestep_fs), ("seed", seed)):
            # timestep_fs="0.5" and seed=2**70 were tracebacks from deep inside
            kind = numbers.Real if name == "timestep_fs" else numbers.Integral
            if isinstance(value, bool) or not isinstance(value, kind) or (name == "seed" and not -2 ** 63 <= value < 2 ** 64):
                need = "a number of fs" if name == "timestep_fs" else "a whole number in [-2^63, 2^64) (torch's seeds)"
                raise ConfigError(f"{name} must be {need}, got {value!r}")
        self.integrator = make_integrator(
            ensemble, self.system, timestep_fs, temperature_K, friction_per_ps, tau_fs, chain_length,
            atom_perm=self._perm,
        )
        self.timestep_fs = float(timestep_fs)
        self.seed = int(seed)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.seed)
        self.check_interval = int(check_interval)
        # on the CPU a host check costs nothing: check (and rebuild) at every step, no replays
        self.check_every_step = (self.device.type == "cpu") if check_every_step is None else bool(check_every_step)
        self.max_temperature_K = float(max_temperature_K) if max_temperature_K is not None else max(2000.0, 5.0 * self.temperature_K)
        # CUDA graphs: one captured step replayed in the fast (chunked) path; see md/cuda_graph.py
        if cuda_graph and self.device.type != "cuda":
            raise ConfigError(f"cuda_graph needs a CUDA device, got {self.device}")
        if cuda_graph and self.check_every_step:
            raise ConfigError("cuda_graph needs check_every_step off (graphs replay whole chunks)")
        self.use_cuda_graph = (self.device.type == "cuda" and not self.check_every_step) if cuda_graph is None else bool(cuda_graph)
        self.forcefield.fixed_capacity = self.use_cuda_graph
        self.forcefield.rebuild_each_step = self.use_cuda_graph
        # compile (nn/traced.py compile_mode; "auto" on CUDA by default, off on the CPU):
        # "whole": the model, forces included, as one traced + compiled graph; its shapes are
        # static, so the list keeps a fixed capacity (one graph per capacity). "parts": the
        # model's dense parts (ETPotential.set_compiled; freezes its parameters)
        from torchmdx.nn.traced import TracedForces, compile_mode

        self.compile_mode = compile_mode(compile, self.device, self.system.num_atoms, self.potential)
        self.compiled = bool(self.potential.set_compiled(self.compile_mode == "parts"))
        self.traced = self.compile_mode == "whole"
        if self.traced:
            self.forcefield.fixed_capacity = True
            self.forcefield.set_traced(TracedForces(self.potential))
        if fuse_integrator not in (True, False, None, "auto"):
            raise ConfigError(f"fuse_integrator must be true, false or auto, got {fuse_integrator!r}")
        fuse = self.compile_mode != "off" if fuse_integrator == "auto" else bool(fuse_integrator)
        self.integrator.set_fused(fuse)
        self._graphed = None
        if self.use_cuda_graph:
            from torchmdx.md.cuda_graph import GraphedStep

            self._graphed = GraphedStep(self)
        self.state: Optional[MDState] = None
        self.replays = 0
        self._interval = self.check_interval  # shrinks after a replay, grows back by 1 per clean chunk
        self.last_restart_path: Optional[Path] = None

    # ------------------------------------------------------------------ set-up
    def initialize(self, velocities=None) -> MDState:
        """Positions from the structures; velocities given ([N, 3], Å/ASE-time) or drawn from
        Maxwell–Boltzmann at ``temperature_K`` with zero momentum (reproducible from ``seed``);
        initial forces. Raises SimulationError if they are not finite."""
        s = self.system
        positions = s.positions_from_templates(wrap=self.forcefield.wrap_positions)
        if velocities is None:
            self._warn_unused_momenta()
            if self.temperature_K > 0 and self._perm is not None:
                # = s.maxwell_boltzmann with the noise drawn in the input order (as an unsorted run)
                kT = units.BOLTZMANN_EV_PER_K * self.temperature_K
                noise = torch.randn(s.num_atoms, 3, generator=self.generator, device=self.device, dtype=self.dtype)
                velocities = s.remove_com_velocity(self.from_input(noise) * torch.sqrt(kT / s.masses).unsqueeze(-1))
            elif self.temperature_K > 0:
                velocities = s.maxwell_boltzmann(self.temperature_K, self.generator)
            else:
                velocities = torch.zeros_like(positions)
        else:
            velocities = torch.as_tensor(np.asarray(velocities), dtype=self.dtype, device=self.device).reshape(-1, 3)
            if velocities.shape != positions.shape:
                raise DataError(f"velocities must have shape [{s.num_atoms}, 3], got {list(velocities.shape)}")
            finite = torch.isfinite(velocities).all(-1)
            if not bool(finite.all()):  # was "reached nan K ... reduce the time step or check the model"
                a = int((~finite).nonzero()[0, 0])
                b = int(np.searchsorted(np.cumsum(list(s.counts)), a, side="right"))
                raise DataError(f"velocities: atom {a - sum(list(s.counts)[:b])} of structure {b} has a non-finite "
                                f"velocity {velocities[a].tolist()}")
            velocities = self.from_input(velocities)
        zeros_b = torch.zeros(s.num_structures, dtype=self.dtype, device=self.device)
        self.state = MDState(positions, velocities, torch.zeros_like(positions), zeros_b, zeros_b.clone(), 0)
        self.state.positions = self.forcefield.build(positions)
        self.forcefield.compute(self.state)
        self._check_initial()
        return self.state

    def _warn_unused_momenta(self) -> None:
        """One warning when a structure carries velocities (ASE momenta, e.g. from MaxwellBoltzmannDistribution or
        a trajectory's last frame) that ``initialize()`` without ``velocities`` does not take: ASE's dynamics start
        from them, so a run from Python started from other velocities without a word (``torchmdx md`` takes them
        with --velocities auto and removes them before it builds the Simulation)."""
        for b, atoms in enumerate(self.input_templates):
            momenta = atoms.arrays.get("momenta")
            if momenta is not None and np.any(momenta != 0):
                import warnings

                drawn = (f"draws Maxwell–Boltzmann velocities at {self.temperature_K:g} K" if self.temperature_K > 0
                         else "starts from rest (temperature_K 0)")
                warnings.warn(f"Simulation.initialize: structure {b} carries velocities (ASE momenta) that are not "
                              f"used: without velocities= it {drawn}; pass velocities=np.concatenate([a.get_velocities() "
                              "for a in structures]) to start from them, or remove them (atoms.set_momenta(None))",
                              UserWarning, stacklevel=3)
                return

    def _check_initial(self):
        s, st = self.system, self.state
        finite_f = torch.isfinite(st.forces).all(-1)
        finite_e = torch.isfinite(st.energy)
        if not bool(finite_f.all() & finite_e.all()):
            if not bool(finite_f.all()):
                a = self.input_index(int((~finite_f).nonzero()[0, 0]))
                b = int(s.batch[a])
                what = f"non-finite forces (NaN/inf) on atom {a - s.offsets[b]} of structure {b}"
            else:
                what = f"a non-finite energy for structure {int((~finite_e).nonzero()[0, 0])}"
            raise SimulationError(model_problem(what, self.potential))
        hot = self._initial_too_hot(st)
        if hot:
            raise SimulationError(hot)
        reason = self._bad_reason(st)
        if reason:
            raise SimulationError(f"the initial state cannot be simulated: {reason}")

    def minimize(self, fmax: float = 0.05, max_steps: int = 500, progress=None) -> FireResult:
        """FIRE relaxation of the positions (velocities kept), see :mod:`torchmdx.md.minimize`."""
        if self.state is None:
            self.initialize()
        try:
            result = fire_minimize(self.forcefield, self.state, fmax=fmax, max_steps=max_steps, progress=progress)
        except ModelError as exc:
            if getattr(exc, "fire_step", None) is None:
                raise
            s = self.system
            b = int(s.batch[exc.atoms[0]])
            i, j = (self.input_index(int(a)) - int(s.offsets[b]) for a in exc.atoms)
            error = SimulationError(collapse_message(exc.fire_step, (i, j), exc.distance, f"structure {b}"))
            error.structure = b  # torchmdx md names the file
            raise error from None
        self.state.positions = self.forcefield.build(self.state.positions)
        self.forcefield.compute(self.state)
        self._check_initial()
        return result

    # ------------------------------------------------------------------ atom order
    def to_input(self, values: torch.Tensor) -> torch.Tensor:
        """Per-atom ``values`` [N, ...] from the engine's (sorted) order to the input order."""
        return values if self._inverse is None else values.index_select(0, self._inverse)

    def from_input(self, values: torch.Tensor) -> torch.Tensor:
        """Per-atom ``values`` [N, ...] from the input order to the engine's order."""
        return values if self._perm is None else values.index_select(0, self._perm)

    def input_index(self, a: int) -> int:
        """The input index of the engine's atom ``a`` (the same structure: sorting keeps them)."""
        return a if self.atom_perm is None else int(self.atom_perm[a])

    # ------------------------------------------------------------------ observation
    def kinetic_energy(self) -> torch.Tensor:
        return self.system.kinetic_energy(self.state.velocities)

    def temperature(self) -> torch.Tensor:
        return self.system.temperature(self.kinetic_energy())

    def conserved_energy(self) -> torch.Tensor:
        """U + K + (energy taken by the thermostat) + (thermostat variables' energy) [B] (eV)."""
        st = self.state
        return st.energy + self.kinetic_energy() + st.thermostat_energy + self.integrator.extra_energy(st)

    def observe(self, pressure: bool = True) -> Observation:
        """Host copies of the present state (synchronises)."""
        s, st = self.system, self.state
        kinetic = self.kinetic_energy()
        temperature = s.temperature(kinetic)
        stress = pressure_bar = volume_A3 = density = None
        if pressure and s.periodic:
            stress_t = self.forcefield.stress(st.positions)
            volume = s.volume()
            p = (2.0 * kinetic / (3.0 * volume) - torch.diagonal(stress_t, dim1=1, dim2=2).sum(-1) / 3.0)
            periodic = s.pbc.all(-1)
            nan = torch.full_like(p, float("nan"))
            pressure_bar = torch.where(periodic, p * units.EV_PER_A3_TO_BAR, nan).cpu().numpy()
            volume_A3 = torch.where(periodic, volume, nan).cpu().numpy()
            density = torch.where(periodic, s.total_mass.to(volume) / volume * units.AMU_PER_A3_TO_G_PER_CM3,
                                  nan).cpu().numpy()
            stress = stress_t.cpu().numpy()
        return Observation(
            step=st.step,
            time_ps=self.time_ps(st.step),
            positions=self.to_input(st.positions.detach()).cpu().numpy(),
            velocities=self.to_input(st.velocities.detach()).cpu().numpy(),
            forces=self.to_input(st.forces.detach()).cpu().numpy(),
            potential=st.energy.cpu().numpy(),
            kinetic=kinetic.cpu().numpy(),
            temperature=temperature.cpu().numpy(),
            conserved=self.conserved_energy().cpu().numpy(),
            pressure_bar=pressure_bar,
            stress=stress,
            volume_A3=volume_A3,
            density_g_cm3=density,
        )

    def frames(self, observation: Observation) -> list:
        """ASE frames (one per structure, in the input order) of an observation."""
        s = self.system
        out = []
        for b, start in enumerate(s.offsets):
            sl = slice(start, start + s.counts[b])
            info = {"step": observation.step, "time_ps": observation.time_ps, "temperature_K": float(observation.temperature[b])}
            out.append(
                make_frame(
                    self.input_templates[b], observation.positions[sl], observation.velocities[sl],
                    observation.potential[b], observation.forces[sl],
                    None if observation.stress is None else _voigt(observation.stress[b]), info,
                )
            )
        return out


def order_structures(atoms_list: list, atom_order="auto"):
    """(structures in the engine's order, perm or None): ``perm`` [N] (numpy, over the batch's
    concatenated atoms) lists the input index of each of the engine's atoms; atoms never leave
    their structure. ``atom_order``: "input", "hilbert", "morton", "auto" (when some structure has
    at least LOCALITY_MIN_ATOMS atoms, Hilbert unless the input order is as local:
    :func:`torchmdx.kernels.locality.auto_order`) or an explicit permutation (a restart file's).
    None when the order is the input's."""
    counts = [len(a) for a in atoms_list]
    offsets = np.cumsum([0] + counts[:-1]).astype(np.int64)
    n = int(sum(counts))
    if isinstance(atom_order, str):
        mode = check_atom_order(atom_order, ConfigError, "atom_order")
        if mode == "auto" and (not counts or max(counts) < LOCALITY_MIN_ATOMS):
            mode = "input"
        if mode == "input" or n == 0:
            return atoms_list, None
        pos = torch.as_tensor(np.concatenate([a.get_positions() for a in atoms_list]), dtype=torch.float64)
        batch = torch.as_tensor(np.repeat(np.arange(len(counts)), counts), dtype=torch.long)
        cell = torch.as_tensor(np.stack([a.cell.array for a in atoms_list]), dtype=torch.float64)
        pbc = torch.as_tensor(np.stack([np.asarray(a.pbc, dtype=bool) for a in atoms_list]))
        if mode == "auto":
            perm = auto_order(pos, batch, cell, pbc, num_structures=len(counts)).numpy()
        else:
            perm = spatial_order(pos, batch, cell, pbc, curve=mode, num_structures=len(counts)).numpy()
    else:
        perm = np.asarray(atom_order, dtype=np.int64).reshape(-1)
        owner = np.repeat(np.arange(len(counts)), counts)
        if (perm.shape != (n,) or not np.array_equal(np.sort(perm), np.arange(n))
                or not np.array_equal(owner[perm], owner)):
            raise DataError(f"atom_order is not a permutation of the {n} atoms that keeps each structure's atoms "
                            "together (a restart file of other structures?)")
    if np.array_equal(perm, np.arange(n)):
        return atoms_list, None
    ordered = [atoms[perm[o:o + c] - o] for atoms, o, c in zip(atoms_list, offsets, counts)]
    return ordered, perm



def _voigt(stress: np.ndarray) -> np.ndarray:
    """3×3 -> ASE Voigt order [xx, yy, zz, yz, xz, xy]."""
    return np.array([stress[0, 0], stress[1, 1], stress[2, 2], stress[1, 2], stress[0, 2], stress[0, 1]])
