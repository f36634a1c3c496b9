"""ASE calculator for any torchmdx :class:`~torchmdx.nn.base.Potential`.

    from torchmdx import Calculator
    atoms.calc = Calculator("model.pt", device="cuda")
    atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()

Properties (ASE units): ``energy`` and ``free_energy`` (eV), ``forces`` (eV/Å), ``energies``
(per-atom energies, eV), and for periodic structures ``stress`` (eV/Å³, Voigt order, ASE's sign:
σ = (1/V) ∂E/∂ε, from the potential's strain derivative). Energy, forces, per-atom energies and
(periodic) stress come from one forward/backward pass.

On CUDA (``cuda_graph="auto"``), when no stress is asked for, a call is one CUDA-graph replay
(:class:`torchmdx.md.cuda_graph.GraphedForces`: the neighbor list is rebuilt on the device
inside the graph) of the compiled model, captured again when the atoms, pbc or cell change (a
new cell of the same atoms is written into the captured function's cell in place: captured
again, not compiled again; :meth:`GraphedForces.set_cell`). One copy of the positions goes in and
one packed float64 copy of forces, per-atom energies, energy and overflow flag comes out.
:meth:`Calculator.energy_and_forces` is the same evaluation without ASE's bookkeeping, for
callers that evaluate every MD step (torchmdx's OpenMM PythonForce).
``compile`` (:data:`torchmdx.nn.traced.COMPILE_MODES`; "auto": on CUDA the whole model and its
forces as one traced graph for up to :data:`~torchmdx.nn.traced.WHOLE_GRAPH_MAX_ATOMS` atoms,
the dense parts compiled (:meth:`ETPotential.set_compiled`, which freezes the model's
parameters) above).

Otherwise work is reused while only positions (and the cell) change: atomic numbers and pbc stay on the
device, the element check is not repeated, and the neighbor list is built with a skin
(``skin`` Å) and kept until an atom has moved more than skin/2 from where it was at the build;
a cell change (cell filters, NPT) keeps the list while the deformation is small enough, see
:meth:`Calculator._list_still_valid`.

The model's weights are remembered too (:class:`WeightsWatch`): after ``load_state_dict``, an optimiser step
or ``model.double()`` on the module given to the Calculator, ASE's stored results of unchanged atoms were
returned again, and a copy the Calculator had made (another dtype or device, compiled parts) kept the old
weights; now the results are computed again, from the module as it is (a copy made again).
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
from ase.calculators.calculator import Calculator as _AseCalculator
from ase.calculators.calculator import PropertyNotImplementedError, all_changes

from torchmdx.errors import ModelError
from torchmdx.kernels.neighbors import Neighbors
from torchmdx.md.forces import fit_skin
from torchmdx.md.loading import as_dtype, load_potential, potential_dtype
from torchmdx.data.coincident import far_atom_line
from torchmdx.nn.atoms import beyond_dtype, local_origin, no_volume_stress, spans_volume
from torchmdx.nn.base import edge_vectors


#: keyword arguments of ASE's Calculator base class that torchmdx's Calculator passes on
_ASE_CALCULATOR_ARGUMENTS = frozenset({"restart", "ignore_bad_restart_file", "label", "atoms", "directory"})


#: a new structure far from the calculator's origin (Å, beyond twice the reach of the structure the origin was
#: set for, plus this): the origin is set again (float32 positions keep their precision near the origin only)
ORIGIN_MARGIN = 50.0


class WeightsWatch:
    """The state of ``module``'s weights: per parameter and buffer its storage address and in-place version,
    which change when the weights do (``load_state_dict``, also with ``assign=True``, an optimiser step,
    ``module.to``). The slots (the module dicts and names) are listed once: walking the modules at every call
    cost 180 µs for a 6-layer ET, the state 15 µs. A write through ``tensor.data`` (Lightning's weight-averaging
    swap) bumps no version and is not seen; nor is a submodule added after the watch was made."""

    def __init__(self, module: torch.nn.Module):
        self.slots = [(m._parameters, name) for m in module.modules() for name in m._parameters]
        self.slots += [(m._buffers, name) for m in module.modules() for name in m._buffers]

    def state(self) -> list:
        state = []
        for table, name in self.slots:
            t = table.get(name)
            if t is None:
                state.append(None)
                continue
            try:
                version = t._version
            except RuntimeError:  # an inference tensor keeps no version counter
                version = -1
            state.append((t.data_ptr(), version))
        return state


class _evaluation_mode:
    """``module.eval()`` for the block, then each submodule's training flag as it was."""

    def __init__(self, module: Optional[torch.nn.Module]):
        self.module = module

    def __enter__(self):
        self.flags = [] if self.module is None else [(m, m.training) for m in self.module.modules()]
        if self.module is not None:
            self.module.eval()

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag
        return False


class Calculator(_AseCalculator):
    """ASE calculator of a torchmdx potential (a :class:`Potential` or a model file path).

    ``device`` (e.g. "cpu", "cuda"), ``dtype`` (torch dtype or "float32"/"float64"; default:
    the model's own), ``skin`` (Å) of the reused neighbor list (0 rebuilds every call),
    ``compute_stress`` ("auto": for periodic structures), ``cuda_graph`` ("auto": on CUDA;
    True/False) for the graph-replay path (energies and forces without stress), ``compile``
    (auto, whole, parts, off or True/False; see the module docstring).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(self, model, device="cpu", dtype=None, skin: float = 0.5, compute_stress="auto",
                 cuda_graph="auto", compile="auto", **kwargs):
        from torchmdx.errors import ConfigError

        unknown = sorted(set(kwargs) - _ASE_CALCULATOR_ARGUMENTS)
        if unknown:  # ASE's base class would keep them as unused parameters: a typo'd device= silently ignored
            import difflib

            own = ("model", "device", "dtype", "skin", "compute_stress", "cuda_graph", "compile")
            close = difflib.get_close_matches(unknown[0], own, n=1)
            hint = f" (did you mean {close[0]}=?)" if close else ""
            raise ConfigError(f"Calculator got unknown argument {unknown[0]}={kwargs[unknown[0]]!r}{hint}; it takes "
                              f"{', '.join(own)} and ASE's {', '.join(sorted(_ASE_CALCULATOR_ARGUMENTS))}")
        if isinstance(skin, bool) or not isinstance(skin, (int, float)) or not skin >= 0 or skin == float("inf"):
            raise ConfigError(f"Calculator skin must be a distance >= 0 Å, got {skin!r}")
        if compute_stress not in ("auto", True, False):
            raise ConfigError(f"Calculator compute_stress must be 'auto', True or False, got {compute_stress!r}")
        if cuda_graph not in ("auto", True, False):  # bool("no") / bool("false") is True: captured on a GPU
            raise ConfigError(f"Calculator cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
        super().__init__(**kwargs)
        from torchmdx.devices import check_device

        self.device = check_device(device, "Calculator device")
        self.potential = load_potential(model, device=self.device, dtype=dtype)
        self.dtype = as_dtype(dtype) if dtype is not None else potential_dtype(self.potential)
        self._dtype_given = dtype
        #: the caller's module (None for a model file): the calculator follows its weights (_follow_model)
        self._caller = model if isinstance(model, torch.nn.Module) else None
        self._watch = WeightsWatch(self._caller if self._caller is not None else self.potential)
        self._model_state = self._watch.state()
        self._checked = None  # (the changes check_state returned, the watch's state it took)
        self._charge_warned = False  # a charged structure is said once (charge_warnings)
        self._contact_warned = False  # atoms closer than half their covalent radii: said once (close_contacts)
        if not self._shared:
            self.potential.eval()
        on_cuda = self.device.type == "cuda"
        self.cuda_graph = on_cuda if cuda_graph == "auto" else bool(cuda_graph)
        if self.cuda_graph and not on_cuda:
            from torchmdx.errors import ConfigError

            raise ConfigError(f"cuda_graph needs a CUDA device, got {self.device}")
        from torchmdx.nn.traced import compile_mode

        compile_mode(compile, self.device, 0, self.potential)  # a wrong value fails here, in one line
        self.compile = compile
        self._mode = "off"  # resolved per structure (_structure_tensors)
        self._graphed = None
        self.skin = float(skin)
        self.compute_stress = compute_stress
        self._z = self._cell = self._pbc = None
        self._numbers = self._pbc_np = self._cell_np = None
        self._origin = np.zeros(3)
        self._origin_reach = np.inf  # positions farther from the origin: it is set again (_device_positions)
        self._neighbors: Optional[Neighbors] = None
        self._reference: Optional[torch.Tensor] = None
        self._reference_cell: Optional[torch.Tensor] = None
        self._list_cutoff = 0.0
        self.neighbor_list_builds = 0

    @property
    def effective_skin(self) -> float:
        """Skin (Å) of the present neighbor list (``skin``, reduced to fit a small periodic box)."""
        return self._list_cutoff - float(self.potential.cutoff) if self._neighbors is not None else 0.0

    # ------------------------------------------------------------------ helpers
    def _structure_tensors(self, atoms, system_changes):
        numbers = atoms.get_atomic_numbers()
        pbc = np.asarray(atoms.pbc, dtype=bool)
        same_atoms = (
            self._numbers is not None and np.array_equal(numbers, self._numbers)
            and self._pbc_np is not None and np.array_equal(pbc, self._pbc_np)
        )
        cell_np = np.array(atoms.cell.array, dtype=np.float64)
        # compared here, not only taken from the caller: energy_and_forces(atoms) after atoms.set_cell(...) without
        # cell_changed=True computed in the old cell (-0.310 eV for the -0.194 eV of two waters in the new one)
        same_cell = self._cell_np is not None and np.array_equal(cell_np, self._cell_np, equal_nan=True)
        self._cell_np = cell_np
        if self._z is not None and same_atoms and same_cell and "cell" not in system_changes:
            return
        if not (same_atoms and pbc.any() and self._graphed is not None):
            self._graphed = None  # a new structure: capture again (a new cell of the same atoms: set_cell below)
        self._mode = self._compile_mode(len(numbers))
        if not same_atoms:
            z = torch.as_tensor(numbers, dtype=torch.long, device=self.device)
            self.potential.check_elements(z)
            self._numbers, self._pbc_np, self._z = numbers.copy(), pbc.copy(), z
            self._neighbors = None  # a different system: new list
            self._set_origin(atoms.get_positions())
        if pbc.any():
            # non-finite entries of open rows zeroed: a NaN there made every pair vector NaN
            # (0 * NaN), energy 0, silently; a finite open row (a slab's vacuum) stays: the stress
            # divides by the volume it spans
            cell = np.where(pbc[:, None] | np.isfinite(atoms.cell.array), atoms.cell.array, 0.0)
            self._cell = torch.as_tensor(cell, dtype=self.dtype, device=self.device).unsqueeze(0)
            self._pbc = torch.as_tensor(pbc, device=self.device).unsqueeze(0)
            if self._graphed is not None:  # the captured function reads the new cell in place; the model is kept
                self._graphed.set_cell(self._cell)
        else:
            self._cell = self._pbc = None

    def _set_origin(self, xyz: np.ndarray) -> None:
        """The local origin of ``xyz`` (:func:`local_origin`) and how far positions may go from it before it is
        set again: a structure of the same atoms given far away (a float32 model kept the first structure's
        origin, and a water moved 3e5 Å gave -0.188 eV for the -0.159 eV of a fresh calculator)."""
        self._origin = local_origin(xyz)
        with np.errstate(invalid="ignore"):
            far = np.abs(np.asarray(xyz, dtype=np.float64) - self._origin)
        self._origin_reach = 2.0 * float(np.max(far[np.isfinite(far)], initial=0.0)) + ORIGIN_MARGIN

    @property
    def _shared(self) -> bool:
        """Whether the calculator runs the caller's own module (no copy was needed): its training mode is switched
        to eval only during a call and restored after (Calculator(model) left a model being trained in eval
        mode)."""
        return self._caller is not None and self.potential is self._caller

    def _follow_model(self, state: Optional[list] = None) -> None:
        """Start afresh when the model's weights changed since the last call (:class:`WeightsWatch` of the
        caller's module, or of the calculator's own; ``state``: the watch's state when just taken): a copy of the
        caller's module is made again, the dtype (when none was given) read again and the structure's tensors,
        neighbor list and captured graph dropped."""
        if state is None:
            state = self._watch.state()
        if state == self._model_state:
            return
        self._model_state = state
        if self._caller is not None and self.potential is not self._caller:
            self.potential = load_potential(self._caller, device=self.device, dtype=self._dtype_given)
            if not self._shared:
                self.potential.eval()
        if self._dtype_given is None:
            self.dtype = potential_dtype(self.potential)
        self._numbers = self._pbc_np = self._z = None
        self._neighbors = self._graphed = None

    def check_state(self, atoms, tol=1e-15):
        """ASE's changes of ``atoms`` since the stored results, and "model" when the weights changed since
        (ASE returned the stored results of unchanged atoms after a ``load_state_dict``)."""
        changes = super().check_state(atoms, tol)
        state = self._watch.state()
        if state != self._model_state:
            changes = [*changes, "model"]
        # ASE's get_property passes these very changes to calculate next: it reuses the state taken here (the
        # watch costs ~22 µs for a 6-layer ET, once per step instead of twice)
        self._checked = (changes, state)
        return changes

    def _list_still_valid(self, positions: torch.Tensor, cutoff: float) -> bool:
        """Does the list (built with ``self._list_cutoff`` at ``self._reference`` in cell H0) still
        hold every pair within ``cutoff``?

        Positions are mapped back to the build cell with the same fractional coordinates,
        x' = x H⁻¹ H0, and F = H0⁻¹ H is the deformation since the build. A pair missing from
        the list had |r'| >= r_list - 2 max|x' - x0| in the build cell, and |r| >= σ_min(F) |r'|
        now, so the list is complete while 2 max|x' - x0| <= r_list - cutoff / σ_min(F)
        (for an unchanged cell: every atom moved less than skin/2).
        """
        if self._neighbors is None or self._list_cutoff <= cutoff:
            return False
        mapped, smin = positions, 1.0
        if self._cell is not None and not torch.equal(self._cell, self._reference_cell):
            if not bool(self._pbc.all()):
                return False
            h, h0 = self._cell[0], self._reference_cell[0]
            if abs(float(torch.linalg.det(h))) < 1e-12:
                return False
            # too little room for minimum image in the new cell: rebuild (which reports it)
            widths_ok = fit_skin(cutoff, 1e-9, self._cell, self._pbc) > 0
            if not widths_ok:
                return False
            deformation = torch.linalg.solve(h0.T, h.T).T  # F with H = H0 F
            smin = float(torch.linalg.svdvals(deformation).min())
            mapped = positions @ torch.linalg.inv(h) @ h0
        d = mapped - self._reference
        largest = float((d * d).sum(-1).max().sqrt()) if d.numel() else 0.0
        return 2.0 * largest <= self._list_cutoff - cutoff / smin

    def _neighbor_list(self, positions: torch.Tensor) -> Neighbors:
        cutoff = float(self.potential.cutoff)
        if not self._list_still_valid(positions, cutoff):
            skin = fit_skin(cutoff, self.skin, self._cell, self._pbc)
            self._neighbors = self.potential.neighbors(positions, None, self._cell, self._pbc, cutoff=cutoff + skin)
            self._reference = positions.clone()
            self._reference_cell = None if self._cell is None else self._cell.clone()
            self._list_cutoff = cutoff + skin
            self.neighbor_list_builds += 1
        nl = self._neighbors
        batch = torch.zeros(positions.shape[0], dtype=torch.long, device=self.device)
        vectors = edge_vectors(positions, nl.edge_index, nl.shifts, self._cell, batch)
        mask = (vectors * vectors).sum(-1) < cutoff * cutoff
        if nl.mask is not None:
            mask = mask & nl.mask
        return Neighbors(nl.edge_index, nl.shifts, vectors, vectors.norm(dim=-1), nl.num_pairs, nl.overflow, mask)

    # ------------------------------------------------------------------ ASE protocol
    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        from torchmdx.errors import ModelError

        if isinstance(properties, str):  # "energy" was read as its letters
            properties = [properties]
        if properties is None:  # "'NoneType' object is not iterable"; ASE's own default is ["energy"]
            properties = ["energy"]
        unknown = [p for p in properties if p not in self.implemented_properties]
        if unknown:  # a direct calculate(properties=["bogus"]) computed the rest without a word
            raise ModelError(f"Calculator: unknown property {unknown[0]!r}; this calculator computes "
                             f"{', '.join(self.implemented_properties)}")
        super().calculate(atoms, properties, system_changes)
        checked, self._checked = self._checked, None
        self._follow_model(checked[1] if checked is not None and checked[0] is system_changes else None)
        atoms = self.atoms
        if atoms is not None and len(atoms) == 0:  # was energy 0.0; md, label and the data readers refuse it
            raise ModelError("Calculator: the structure has no atoms; there is nothing to compute (md, label and the "
                             "data readers refuse an empty structure too): give a structure with at least one atom")
        if atoms is None:  # calc.get_potential_energy() before any structure: "'NoneType' object has no attribute 'pbc'"
            raise ModelError("Calculator: no structure to compute; give one, calc.get_potential_energy(atoms), or "
                             "attach the calculator (atoms.calc = calc) and ask the atoms: atoms.get_potential_energy()")
        if not self._charge_warned and {"numbers", "initial_charges"} & set(system_changes):
            # once per calculator, looked at only for a new structure (not at every MD step): a charged
            # structure is computed as if neutral
            from torchmdx.md.start_checks import charge_warnings

            lines = charge_warnings(self.potential, [atoms], ["Calculator"])
            if lines:
                warnings.warn(lines[0], stacklevel=2)
                self._charge_warned = True
        if not self._contact_warned and {"numbers", "positions"} <= set(system_changes):
            # a new structure (not an MD step, which changes positions only): atoms far closer than bonds, e.g.
            # positions in nm or Bohr read as Å (two argon atoms 0.38 Å apart: 1e10 eV from Lennard-Jones, silently;
            # md says so at its start, round 27)
            from torchmdx.md.start_checks import close_contacts

            try:
                lines = close_contacts([atoms], sources=["Calculator"])
            except Exception:  # noqa: BLE001 - a cell ASE cannot use (NaN, singular): the calculation names it
                lines = []
            if lines and " are 0 Å apart" not in lines[0]:  # atoms at one position: the model's error names them
                warnings.warn(lines[0] + " (positions in Å? nm or Bohr read as Å give such distances)", stacklevel=2)
                self._contact_warned = True
        periodic = bool(np.any(atoms.pbc))
        if periodic and not bool(np.all(atoms.pbc)):
            # a slab's or wire's stress divides by the volume its open (vacuum) rows span, ASE's
            # convention; with a zero or non-finite open row that volume is 0 and the stress was NaN
            if not spans_volume(atoms.cell.array):
                periodic = False  # energies and forces only
                if "stress" in properties:
                    raise PropertyNotImplementedError(no_volume_stress(atoms.pbc))
        if "stress" in properties and not np.any(atoms.pbc):
            raise PropertyNotImplementedError("stress is only defined for periodic structures (set a cell and pbc)")
        self._structure_tensors(atoms, system_changes)
        positions = self._device_positions(atoms.get_positions())
        want_stress = periodic and (self.compute_stress is True or self.compute_stress == "auto" or "stress" in properties)
        packed = self._graph_call(atoms, positions) if self.cuda_graph and not want_stress else None
        if packed is not None:
            n = len(atoms)
            energy = float(packed[4 * n])
            self.results = {
                "energy": energy,
                "free_energy": energy,
                "forces": packed[:3 * n].numpy().reshape(n, 3),
                "energies": packed[3 * n:4 * n].numpy(),
            }
            return
        neighbors = self._neighbor_list(positions)
        with _evaluation_mode(self.potential if self._shared else None):
            out = self.potential(
                self._z, positions, None, self._cell, self._pbc,
                neighbors=neighbors, forces=True, stress=want_stress, per_atom=True,
            )
        energy = float(out["energy"].detach().sum())
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": out["forces"].detach().cpu().double().numpy(),
            "energies": out["energies"].detach().cpu().double().numpy(),
        }
        if want_stress:
            s = out["stress"].detach()[0].cpu().double().numpy()
            self.results["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])

    def energy_and_forces(self, atoms, positions: Optional[np.ndarray] = None, cell_changed: bool = False):
        """(energy in eV, forces [N, 3] in eV/Å as float64 numpy) of ``atoms`` at ``positions``
        (Å, [N, 3]; default: the atoms' own), evaluated as :meth:`calculate` evaluates them
        without stress (on CUDA one CUDA-graph replay: one copy of the positions in, one copy of
        the results out), without ASE's bookkeeping (``atoms`` is not copied, ``results`` is not
        set): for callers that evaluate at every MD step, such as torchmdx's OpenMM PythonForce
        (:mod:`torchmdx.openmm.fast`). ``cell_changed``: ``atoms.cell`` differs from the last
        call's (a barostat); the atomic numbers, pbc and the cell are compared at every call anyway
        (the cell was taken from the last call without the flag)."""
        self._follow_model()
        self._structure_tensors(atoms, ("cell",) if cell_changed else ())
        try:
            xyz = atoms.get_positions() if positions is None else np.asarray(positions, dtype=np.float64)
        except (TypeError, ValueError):  # "could not convert string to float: 'abc'", a traceback
            from torchmdx.errors import ConfigError

            raise ConfigError(f"energy_and_forces: positions must be numbers, [{len(atoms)}, 3] in Å, got "
                              f"{type(positions).__name__}") from None
        n = len(atoms)
        if xyz.shape != (n, 3):
            from torchmdx.errors import ConfigError

            raise ConfigError(f"energy_and_forces: {list(xyz.shape)} positions given for {n} atoms; expected [{n}, 3]")
        device_positions = self._device_positions(xyz)
        packed = self._graph_call(atoms, device_positions) if self.cuda_graph else None
        if packed is not None:
            return float(packed[4 * n]), packed[:3 * n].numpy().reshape(n, 3)
        neighbors = self._neighbor_list(device_positions)
        with _evaluation_mode(self.potential if self._shared else None):
            out = self.potential(self._z, device_positions, None, self._cell, self._pbc, neighbors=neighbors, forces=True)
        return float(out["energy"].detach().sum()), out["forces"].detach().cpu().double().numpy()

    def _device_positions(self, xyz: np.ndarray) -> torch.Tensor:
        """Positions [N, 3] (Å) on the device in the model's dtype, relative to a fixed origin near
        the atoms, subtracted in float64: a float32 model's positions 10^6 Å from the origin kept
        0.06 Å steps (energies off by 0.03 eV, silently). A finite position the dtype cannot hold
        (1e200 Å in float32) is refused naming it (it was "non-finite [inf, ...]")."""
        # ASE's float64 positions themselves may have lost the distances (1e15 Å: 0.125 Å steps): far_atom_line
        with np.errstate(invalid="ignore"):
            far = np.abs(np.asarray(xyz, dtype=np.float64) - self._origin)
        moved = float(np.max(far[np.isfinite(far)], initial=0.0)) > self._origin_reach
        # the same atoms far from where the origin was set: a new origin (a new list, a new capture), kept only
        # for positions that pass the checks (a refused structure left its origin behind, and the next good one
        # came out in another float32 rounding than on a fresh calculator)
        origin = local_origin(xyz) if moved else self._origin
        line = beyond_dtype(xyz, self.dtype, self._numbers, origin) or far_atom_line(xyz)
        if line:
            raise ModelError(line)
        if moved:
            self._set_origin(xyz)
            self._neighbors = self._graphed = None
        return torch.as_tensor(xyz - self._origin, dtype=self.dtype, device=self.device)

    def _compile_mode(self, num_atoms: int) -> str:
        """The compile mode for ``num_atoms`` atoms (once per structure); switches the
        potential's compiled parts on for "parts" and off otherwise (the whole-graph path traces
        the plain model)."""
        from torchmdx.nn.traced import compile_mode

        mode = compile_mode(self.compile, self.device, num_atoms, self.potential)
        if bool(getattr(self.potential, "compiled", False)) != (mode == "parts"):
            self._own_copy()  # set_compiled freezes (or unfreezes) the parameters: not on the caller's own model
        self.potential.set_compiled(mode == "parts")
        return mode

    def _own_copy(self) -> None:
        """Before a change that lasts (compiled parts, a captured graph): a copy of the caller's own
        module in eval mode, so that the caller's model is left as it was; nothing when the
        calculator already holds its own."""
        if self._shared:
            import copy

            self.potential = copy.deepcopy(self.potential)
            self.potential.eval()

    def _graph_call(self, atoms, positions: torch.Tensor) -> Optional[torch.Tensor]:
        """Forces, per-atom energies and the energy by a CUDA-graph replay, packed on the host
        (:meth:`GraphedForces.host`); None (after a one-line note) if the graph path cannot run
        here, and the eager path is used from then on."""
        from torchmdx.md.cuda_graph import GraphedForces

        try:
            if self._graphed is None:
                self._own_copy()  # the captured graph runs the module in eval mode, for good
                self._graphed = GraphedForces(self.potential, atoms, self.device, self.dtype, skin=self.skin,
                                              traced=self._mode == "whole")
            return self._graphed.host(positions)
        except RuntimeError as exc:
            import sys

            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            print(f"note: the calculator's CUDA-graph path failed ({reason}); running eagerly", file=sys.stderr)
            self.cuda_graph, self._graphed = False, None
            return None
