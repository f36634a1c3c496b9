"""The fast ``openmm.PythonForce`` of ``MLPotential("torchmdx")``: torchmdx's own evaluator, not TorchScript.

A ``PythonForce`` is a Python callback, so nothing ties it to the exported TorchScript module
(:class:`torchmdx.openmm.forces.PythonForceComputation`, which runs the traced model through
TorchScript's executor, finds pairs by an O(N²) search and takes forces by autograd in float64,
eagerly, at every step). :class:`FastComputation` evaluates the model the way
:class:`torchmdx.Calculator` does, through a Calculator it holds
(:meth:`torchmdx.Calculator.energy_and_forces`):

- on CUDA one CUDA-graph replay per step (:class:`torchmdx.md.cuda_graph.GraphedForces`: the
  neighbor list rebuilt on the device by the Triton kernels, the model compiled as the
  Calculator's ``compile`` option says), one copy of the positions to the device and one copy
  of forces and energy back (packed in one float64 vector with the list's overflow flag);
- on the CPU the plain model call with the Calculator's Verlet-skin neighbor list;
- in the model's dtype (or ``dtype``); positions enter relative to a fixed origin near the
  atoms, subtracted in float64 (the Calculator's rule).

Units: OpenMM passes the ML atoms' positions in nm (and the box in nm); the Calculator works in Å
and eV. Positions and box are multiplied by :data:`torchmdx.units.NM_TO_ANGSTROM`, the energy by
:data:`~torchmdx.units.EV_TO_KJ_PER_MOL` (kJ/mol) and the forces by
``EV_TO_KJ_PER_MOL * NM_TO_ANGSTROM`` (eV/Å -> kJ/mol/nm), all in float64 on the host.

Periodic boxes: the box is compared at every call; a new box (a barostat's trial) is written
into the captured function's cell in place and the function captured again, without compiling
the model again (:meth:`GraphedForces.set_cell`). ML subsets (``createMixedSystem``): the force's
particles are the ML atoms, OpenMM passes only their positions.

Errors at a step (a non-finite position, two ML atoms on top of each other, a box shrunk below
twice the cutoff) are the calculator's one line, its atoms named as the System's particles
(:func:`name_particles`), raised as :class:`OpenMMError` (OpenMM shows it as its exception's text).

Pickling (``XmlSerializer``; OpenMM pickles a PythonForce's computation when the force is made):
the state is the model file's bytes and the options; the Calculator is built again, lazily, at
the first call after unpickling (and at the first call of a new computation: loading the model
and capturing the graph, compiling where the ``compile`` option says, happen then).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional, Sequence

from torchmdx.openmm.errors import OpenMMError


class FastComputation:
    """State (positions of the ML atoms, nm; box) -> (energy kJ/mol, forces kJ/mol/nm [M, 3]) by
    a :class:`torchmdx.Calculator` of the model (see the module docstring).

    ``model_bytes``: the model file's content (a torchmdx model file or a TorchMD-NET checkpoint,
    ``model_name`` its file name, whose suffix tells which); ``numbers``: the ML atoms' atomic
    numbers, in the force's particle order; ``periodic``: the force uses the box; ``device``,
    ``dtype`` (None: the model's), ``cuda_graph``, ``compile``: the Calculator's options.
    """

    def __init__(self, model_bytes: bytes, model_name: str, numbers: Sequence[int], periodic: bool,
                 device: str = "cpu", dtype: Optional[str] = None, cuda_graph="auto", compile="auto",
                 particles: Optional[Sequence[int]] = None):
        self.particles = None if particles is None else [int(p) for p in particles]
        self.model_bytes = bytes(model_bytes)
        self.model_name = Path(model_name).name or "model.pt"
        self.numbers = [int(z) for z in numbers]
        self.periodic = bool(periodic)
        self.device = str(device)
        self.dtype = None if dtype is None else str(dtype)
        self.cuda_graph = cuda_graph
        self.compile = compile
        self._reset()

    def _reset(self) -> None:
        self.calculator = None
        self._atoms = None
        self._box: Optional[object] = None

    # ------------------------------------------------------------------ pickling
    def __getstate__(self):
        return {"model_bytes": self.model_bytes, "model_name": self.model_name, "numbers": self.numbers,
                "periodic": self.periodic, "device": self.device, "dtype": self.dtype, "cuda_graph": self.cuda_graph,
                "compile": self.compile, "particles": self.particles}

    def __setstate__(self, state):
        self.particles = None  # pickled before the particles were kept
        self.__dict__.update(state)
        self._reset()

    # ------------------------------------------------------------------ evaluation
    def _build(self, positions_angstrom, box_angstrom) -> None:
        """The Calculator (the model loaded from its bytes) and the ase.Atoms it evaluates."""
        from ase import Atoms

        from torchmdx.errors import TorchmdxError
        from torchmdx.md.calculator import Calculator

        with tempfile.TemporaryDirectory(prefix="torchmdx-openmm-") as folder:
            path = Path(folder) / self.model_name
            path.write_bytes(self.model_bytes)
            try:
                calculator = Calculator(str(path), device=self.device, dtype=self.dtype, compute_stress=False,
                                        cuda_graph=self.cuda_graph, compile=self.compile)
            except TorchmdxError as exc:
                raise OpenMMError(f"torchmdx PythonForce: {str(exc).replace(str(path), self.model_name)}") from None
        self._atoms = Atoms(numbers=self.numbers, positions=positions_angstrom,
                            cell=box_angstrom if self.periodic else None, pbc=self.periodic)
        self.calculator = calculator

    def energy_forces(self, positions_nm, box_nm=None):
        """(energy kJ/mol, forces kJ/mol/nm [M, 3] float64) at ``positions_nm`` [M, 3] (numpy, nm)
        and, when periodic, the box ``box_nm`` [3, 3] (rows are box vectors, nm)."""
        import numpy as np

        from torchmdx import units

        positions = np.asarray(positions_nm, dtype=np.float64) * units.NM_TO_ANGSTROM
        box = None
        if self.periodic:
            box = np.asarray(box_nm, dtype=np.float64) * units.NM_TO_ANGSTROM
        if self.calculator is None:
            self._build(positions, box)
            self._box = box
        cell_changed = self.periodic and not np.array_equal(box, self._box)
        if cell_changed:  # a barostat's new box: the same atoms, a new cell
            self._atoms.set_cell(box)
            self._box = box
        # the atoms' own positions are those of the first call (the origin the Calculator keeps)
        from torchmdx.errors import TorchmdxError

        try:
            energy, forces = self.calculator.energy_and_forces(self._atoms, positions, cell_changed=cell_changed)
        except TorchmdxError as exc:  # a NaN position, atoms on top of each other: named as the System's particles
            raise OpenMMError(name_particles(str(exc), self.particles)) from None
        return energy * units.EV_TO_KJ_PER_MOL, forces * (units.EV_TO_KJ_PER_MOL * units.NM_TO_ANGSTROM)

    def __call__(self, state):
        positions = _in_nm(state.getPositions(asNumpy=True))
        box = _in_nm(state.getPeriodicBoxVectors(asNumpy=True)) if self.periodic else None
        return self.energy_forces(positions, box)


def name_particles(message: str, particles: Optional[Sequence[int]]) -> str:
    """``message`` of the calculator, whose "atom i" / "atoms i and j" count the ML atoms, with the
    System's particle indices instead ("particle p (an ML atom)"; ``particles``: the ML atoms'
    particle indices, None when every particle is an ML atom)."""
    import re

    def particle(index: str) -> str:
        i = int(index)
        return str(particles[i] if particles is not None and 0 <= i < len(particles) else i)

    message = re.sub(r"\batoms (\d+) and (\d+)",
                     lambda m: f"particles {particle(m.group(1))} and {particle(m.group(2))} (ML atoms)", message)
    return re.sub(r"\batom (\d+)", lambda m: f"particle {particle(m.group(1))} (an ML atom)", message)


def _in_nm(quantity):
    """The numbers of an OpenMM quantity in nm: a State's positions and box are in nm already, so
    the array itself (``value_in_unit`` cost 12-20 µs a call, per step)."""
    from openmm import unit

    return quantity._value if quantity.unit is unit.nanometer else quantity.value_in_unit(unit.nanometer)


def check_cuda_graph(value, device) -> object:
    """``cudaGraph`` as the Calculator takes it ("auto", True, False), or a one-line OpenMMError."""
    import torch

    if not (value is True or value is False or (isinstance(value, str) and value == "auto")):
        raise OpenMMError(f"MLPotential('torchmdx'): cudaGraph must be 'auto', True or False, got {value!r}")
    if value is True and torch.device(device).type != "cuda":
        raise OpenMMError(f"MLPotential('torchmdx'): cudaGraph=True needs a CUDA device, got device {device!r}")
    return value


def create_fast_force(model_path, numbers: Sequence[Optional[int]], names: Sequence[str], periodic: bool,
                      box_angstrom=None, atoms: Optional[Sequence[int]] = None, device: str = "cpu",
                      dtype: Optional[str] = None, cuda_graph="auto", compile="auto"):
    """An ``openmm.PythonForce`` of :class:`FastComputation` for the model file ``model_path``:
    its elements checked against ``numbers`` (``names`` label the atoms in the one-line error),
    a periodic box ``box_angstrom`` (3 rows, Å) checked against its cutoff; ``atoms``: the ML
    atoms' indices among the System's particles (None: all)."""
    from torchmdx.errors import TorchmdxError
    from torchmdx.openmm.export import box_check, check_ml_elements, model_elements
    from torchmdx.openmm.forces import OPENMM_INSTALL, import_openmm, python_force

    openmm = import_openmm()
    if not hasattr(openmm, "PythonForce"):
        raise OpenMMError(f"OpenMM {openmm.__version__} has no PythonForce (added in 8.4); {OPENMM_INSTALL}")
    try:
        from torchmdx.devices import check_device
        from torchmdx.nn.traced import compile_mode

        device = str(check_device(device, "device"))  # this machine has it (else the first step would fail)
        compile_mode(compile, device, 0, None)  # a wrong value: one line, before any work
    except TorchmdxError as exc:
        raise OpenMMError(f"MLPotential('torchmdx'): {exc}") from None
    check_cuda_graph(cuda_graph, device)
    path = Path(model_path)
    try:
        from torchmdx.nn.model_file import load_model

        potential = load_model(path, device="cpu", dtype=dtype)  # elements, cutoff and a dtype check
    except OpenMMError:
        raise
    except TorchmdxError as exc:
        raise OpenMMError(str(exc)) from None
    known, max_z = model_elements(potential)
    zs = check_ml_elements(numbers, known, max_z, names, source=str(path))
    if periodic and box_angstrom is not None:
        box_check(box_angstrom, float(potential.cutoff), str(path))
    computation = FastComputation(path.read_bytes(), path.name, zs, periodic, device=device, dtype=dtype,
                                  cuda_graph=cuda_graph, compile=compile, particles=atoms)
    return python_force(computation, periodic, atoms)
