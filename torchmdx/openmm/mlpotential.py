"""openmm-ml potential ``"torchmdx"``: ``MLPotential("torchmdx", modelPath="model.pt")``.

Registered through the entry point ``openmmml.potentials`` (pyproject.toml), so that ``import
openmmml`` finds it. openmm-ml loads every registered factory when it is imported: this module
imports nothing heavy at module level (torch and torchmdx's model code are imported when a
System is built), so a broken torch never breaks ``import openmmml``.

    from openmmml import MLPotential
    potential = MLPotential("torchmdx", modelPath="model.pt")
    system = potential.createSystem(topology)                               # all atoms ML
    mixed = potential.createMixedSystem(topology, mm_system, ligand_atoms)  # ML region in MM

``modelPath``: a torchmdx model file (``model.pt``; a TorchMD-NET ``.ckpt`` is imported) or an
OpenMM export (``torchmdx export --openmm``). Options (to ``MLPotential`` or, per System, to
``createSystem`` / ``createMixedSystem``):

- ``implementation``: ``"auto"`` (a model file: the fast ``PythonForce`` below; an OpenMM
  export, or ``fastPath=False``: a ``TorchForce`` when openmm-torch loads here, else a
  ``PythonForce``), ``"torchforce"`` or ``"python"``;
- ``fastPath``: how a ``PythonForce`` evaluates the model. ``True`` (the default for a model
  file): torchmdx's own evaluator, the one :class:`torchmdx.Calculator` uses
  (:mod:`torchmdx.openmm.fast`: on CUDA one CUDA-graph replay per step with the neighbor list
  rebuilt on the device, Triton kernels, the model compiled; on the CPU the plain model call);
  ``False``: the exported TorchScript module, as a ``TorchForce`` runs it
  (:class:`torchmdx.openmm.forces.PythonForceComputation`). An OpenMM export as ``modelPath``
  carries no torchmdx model: always TorchScript (``fastPath=True`` with one is refused);
- ``cudaGraph`` (``"auto"``, True, False) and ``compile`` (``"auto"``, ``"whole"``, ``"parts"``,
  ``"off"``, True, False): the Calculator's ``cuda_graph`` and ``compile`` options, for the fast
  path (``compile="off"`` skips the compile time at the first step; "auto" compiles on CUDA);
- ``device``: torch device of the model (default: CUDA when torch sees a GPU, else CPU; an
  export keeps the device it was traced on);
- ``dtype``: ``"float32"`` / ``"float64"`` (default: the model's own);
- ``outputForces``: the ``TorchForce`` gets forces returned by the module instead of autograd.

The model's interactions are local (cutoff, no long-range electrostatics):
:meth:`TorchmdxPotentialImpl.getMLLongRange` is False, which openmm-ml's mechanical embedding
uses for periodic mixed systems. Mistakes are one-line :class:`torchmdx.openmm.OpenMMError`:
no ``modelPath``, an atom without element or of an element the model does not know (named by
index, residue and atom name), a box too small for the cutoff, an export in other units.
"""

from __future__ import annotations

import io
from pathlib import Path

import sys

if "openmmml.mlpotential" not in sys.modules:
    # imported before openmm-ml: openmm-ml's import loads its plug-ins, this module among them, and
    # found it half-initialised (AttributeError). Step aside so that it loads a complete copy; the
    # import system then hands that copy (the registered one) to whoever imported this module.
    sys.modules.pop(__name__, None)
    try:
        import openmmml  # noqa: F401
    except ImportError:
        pass  # said below
try:
    from openmmml.mlpotential import MLPotentialImpl, MLPotentialImplFactory
except ImportError as _exc:  # this module is openmm-ml's plug-in: without openmm-ml it has nothing to plug into
    from torchmdx.openmm.errors import OpenMMError
    from torchmdx.openmm.forces import OPENMM_INSTALL

    raise OpenMMError(f"openmm-ml is not installed ({str(_exc).splitlines()[0] if str(_exc) else 'ImportError'}); "
                      f"MLPotential('torchmdx') needs it: {OPENMM_INSTALL}") from None

IMPLEMENTATIONS = ("auto", "torchforce", "python")
_OPTIONS = ("implementation", "fastPath", "cudaGraph", "compile", "device", "dtype", "outputForces")
#: arguments openmm-ml itself forwards to ``addForces`` from ``createMixedSystem`` (its mechanical embedding's)
_OPENMMML_ARGS = ("mlLongRange", "linkAtomDistances")
#: other openmm-ml potentials' option names, and torchmdx's for them
_FOREIGN_OPTIONS = {"precision": "dtype='float32' or 'float64'", "platform": "device='cpu' or 'cuda'"}


class TorchmdxPotentialImplFactory(MLPotentialImplFactory):
    """Creates :class:`TorchmdxPotentialImpl` objects (the ``openmmml.potentials`` entry point)."""

    def createImpl(self, name: str, modelPath=None, **args) -> MLPotentialImpl:
        return TorchmdxPotentialImpl(name, modelPath, **args)


class TorchmdxPotentialImpl(MLPotentialImpl):
    """A torchmdx model as an openmm-ml potential (see the module docstring)."""

    def __init__(self, name: str, modelPath=None, **options):
        from torchmdx.openmm.errors import OpenMMError

        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:  # a hint as createSystem's (MACE's precision='double' is dtype='float64' here)
            raise OpenMMError(_unknown_option_line(name, unknown[0], "modelPath, "))
        if modelPath is None:
            raise OpenMMError(f"MLPotential('{name}') needs modelPath=: a torchmdx model file (model.pt) or an OpenMM "
                              "export (torchmdx export --openmm model.pt -o model_openmm.pt)")
        path = Path(modelPath)
        if not path.is_file():
            raise OpenMMError(f"{path}: model file not found (MLPotential('{name}', modelPath=...))")
        self.name = name
        self.modelPath = path
        self.options = dict(options)
        _check_implementation(self.options.get("implementation", "auto"))
        self._generic: dict = {}  # (device, dtype, forces) -> TorchScript bytes of the generic module

    # ------------------------------------------------------------------ openmm-ml interface
    def getMLLongRange(self) -> bool:
        return False

    def addForces(self, topology, system, atoms, forceGroup: int, /, **args):
        # positional-only: createSystem(topology, atoms=[...]) (openmm-ml's createSystem takes no atoms, and calls
        # addForces(topology, system, None, 0, **args)) was "addForces() got multiple values for argument 'atoms'"
        from torchmdx.openmm.export import box_check, is_openmm_export, with_atoms
        from torchmdx.openmm.forces import create_python_force, create_torch_force, openmmtorch_problem
        from torchmdx import units

        _check_system_args(self.name, args)
        options = {**self.options, **{k: v for k, v in args.items() if k in _OPTIONS}}
        implementation = _check_implementation(options.get("implementation", "auto"))
        flag = options.get("outputForces")
        if flag is not None and not isinstance(flag, bool):  # the text 'false' was truthy: forces returned
            from torchmdx.openmm.errors import OpenMMError

            raise OpenMMError(f"MLPotential('{self.name}'): outputForces must be True or False, got {flag!r}")
        fast = options.get("fastPath")
        if fast is not None and not isinstance(fast, bool):
            from torchmdx.openmm.errors import OpenMMError

            raise OpenMMError(f"MLPotential('{self.name}'): fastPath must be True or False, got {fast!r}")
        if implementation == "auto":
            # a model file: the fast PythonForce (torchmdx's own evaluator, measured 12-25x the TorchScript
            # module on an H100); an export (TorchScript only) or fastPath=False: TorchForce where it loads
            fast_file = fast is not False and not is_openmm_export(self.modelPath)
            implementation = "python" if fast_file or openmmtorch_problem() is not None else "torchforce"
        all_atoms = list(topology.atoms())
        _check_particle_count(self.name, system, len(all_atoms))
        indices = list(range(len(all_atoms))) if atoms is None else _check_atoms(atoms, len(all_atoms))
        chosen = [all_atoms[i] for i in indices]
        numbers = [a.element.atomic_number if a.element is not None else None for a in chosen]
        names = [f"atom {i} ({a.name}, residue {a.residue.name} {a.residue.id})" for i, a in zip(indices, chosen)]
        periodic = topology.getPeriodicBoxVectors() is not None or system.usesPeriodicBoundaryConditions()
        box = None
        if periodic:
            from openmm import unit

            vectors = topology.getPeriodicBoxVectors()
            if vectors is None:  # `or` asked a Quantity of a numpy array for its truth value: a ValueError traceback
                vectors = system.getDefaultPeriodicBoxVectors()
            box = [[x * units.NM_TO_ANGSTROM for x in v.value_in_unit(unit.nanometer)] for v in vectors]
        if implementation == "python" and self._fast_path(fast):
            from torchmdx.openmm.fast import create_fast_force

            force = create_fast_force(self.modelPath, numbers, names, periodic, box, None if atoms is None else indices,
                                      device=self._device(options, export=False), dtype=options.get("dtype"),
                                      cuda_graph=options.get("cudaGraph", "auto"), compile=options.get("compile", "auto"))
            force.setForceGroup(forceGroup)
            system.addForce(force)
            return
        forces = "returned" if options.get("outputForces") and implementation == "torchforce" else "autograd"
        module = self._module(options, forces)
        if implementation == "torchforce":
            with_atoms(module, numbers, None if atoms is None else indices, names, source=str(self.modelPath))
        else:
            with_atoms(module, numbers, None, names, source=str(self.modelPath))
        if periodic:
            box_check(box, module.cutoff, str(self.modelPath))
        if implementation == "torchforce":
            force = create_torch_force(module, periodic)
        else:
            force = create_python_force(module, periodic, None if atoms is None else indices, device=module.device_type)
        force.setForceGroup(forceGroup)
        system.addForce(force)

    def _fast_path(self, fast) -> bool:
        """Does a PythonForce evaluate with torchmdx's own evaluator (``fastPath``; None: yes for
        a model file)? An OpenMM export has no torchmdx model in it: TorchScript."""
        from torchmdx.openmm.export import is_openmm_export

        if not is_openmm_export(self.modelPath):
            return fast is not False
        if fast is True:
            from torchmdx.openmm.errors import OpenMMError

            raise OpenMMError(f"{self.modelPath}: an OpenMM export (TorchScript) has no torchmdx model for fastPath=True; "
                              "give the model file (model.pt), or leave fastPath out to run the export")
        return False

    def _device(self, options: dict, export: bool):
        """The torch device name for ``options`` (None for an export without ``device``: it keeps
        the device it was traced on)."""
        import torch

        device = options.get("device")
        if device is None and not export:
            device = self._getTorchDevice({})
        if device is not None:
            try:
                device = str(torch.device(device))
            except (RuntimeError, TypeError, ValueError):  # torch's message lists every device type
                from torchmdx.openmm.errors import OpenMMError

                raise OpenMMError(f"MLPotential('{self.name}'): device {device!r} is not a torch device (cpu, cuda, "
                                  "cuda:1, ...)") from None
        return device

    # ------------------------------------------------------------------ module cache
    def _module(self, options: dict, forces: str):
        """A fresh generic module (its atoms not set) for ``options``; built once per device,
        dtype and force convention, then copied from its TorchScript bytes."""
        import torch

        from torchmdx.openmm.export import build_module, is_openmm_export, load_module

        export = is_openmm_export(self.modelPath)
        device = self._device(options, export)
        key = (device, options.get("dtype"), forces)
        if key not in self._generic:
            if export:
                module, meta = load_module(self.modelPath, device=device)
                if options.get("dtype") is not None:
                    from torchmdx.openmm.errors import OpenMMError

                    raise OpenMMError(f"{self.modelPath}: an OpenMM export keeps the dtype it was exported with "
                                      f"({meta['model'].get('model_dtype')}); give the model file to change it")
                if forces == "returned" and not module.outputs_forces:
                    forces = "autograd"  # the export decides
            else:
                module = build_module(self.modelPath, forces=forces, device=device or "cpu", dtype=options.get("dtype"),
                                      source=str(self.modelPath))
            buffer = io.BytesIO()
            torch.jit.save(module, buffer)
            self._generic[key] = buffer.getvalue()
        return torch.jit.load(io.BytesIO(self._generic[key]), map_location=device)


def _check_system_args(name: str, args: dict) -> None:
    """One OpenMMError for an argument of ``createSystem`` / ``createMixedSystem`` that torchmdx does not take: they
    were dropped without a word (``dtpye='float64'`` or MACE's ``precision='double'`` ran in float32), and
    ``createSystem(topology, atoms=...)`` was a TypeError. openmm-ml's own forwarded arguments pass."""
    from torchmdx.openmm.errors import OpenMMError

    if "atoms" in args:
        raise OpenMMError(f"MLPotential('{name}').createSystem takes no atoms=: it makes every atom of the topology "
                          "an ML atom; for ML atoms inside an MM system use createMixedSystem(topology, mm_system, "
                          "atoms), or give createSystem a topology of the ML atoms only")
    for key in args:
        if key not in _OPTIONS and key not in _OPENMMML_ARGS:
            raise OpenMMError(_unknown_option_line(name, key))


def _check_particle_count(name: str, system, count: int) -> None:
    """The System openmm-ml hands ``addForces`` has one particle per topology atom: ``createMixedSystem(topology,
    mm_system, atoms)`` with an ``mm_system`` of another topology (fewer particles) read positions that do not exist
    ("particles 0 and 2 (ML atoms) are on top of each other (distance 0 Å)" at the first energy), and one of more
    particles ran with the ML atoms at indices the topology does not describe (round 34's leftover)."""
    particles = system.getNumParticles()
    if particles != count:
        from torchmdx.openmm.errors import OpenMMError

        raise OpenMMError(f"MLPotential('{name}'): the System has {particles} particle(s) but the topology has {count} "
                          "atom(s); createMixedSystem(topology, system, atoms) needs the System made from this topology "
                          "(forcefield.createSystem(topology)): one particle per atom, in the topology's order")


def _unknown_option_line(name: str, key: str, more: str = "") -> str:
    """The line for an option ``key`` torchmdx's potential does not take, with a hint: its own name for another
    openmm-ml potential's option, or the option it is a typo of (``cuda_graph``: cudaGraph)."""
    import difflib

    if key in _FOREIGN_OPTIONS:
        hint = f" (torchmdx's option is {_FOREIGN_OPTIONS[key]})"
    else:
        lower = {o.lower().replace("_", ""): o for o in _OPTIONS}
        close = lower.get(str(key).lower().replace("_", "")) or next(
            iter(difflib.get_close_matches(str(key), _OPTIONS, n=1)), None)
        hint = f" (did you mean {close!r}?)" if close else ""
    return f"MLPotential('{name}'): unknown option {key!r}{hint}; known: {more}{', '.join(_OPTIONS)}"


def _check_implementation(value) -> str:
    from torchmdx.openmm.errors import OpenMMError

    if value not in IMPLEMENTATIONS:
        raise OpenMMError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {value!r}")
    return value


def _check_atoms(atoms, count: int) -> list:
    """The ML atoms openmm-ml passes (``createMixedSystem(..., atoms)``) as distinct whole numbers in
    0..count-1: a negative index crashed the process (freed memory), one past the end was an
    IndexError, a repeated atom and 1.5 (read as atom 1) were used silently."""
    import operator

    import numpy as np

    from torchmdx.openmm.errors import OpenMMError

    indices, seen = [], set()
    for a in atoms:
        try:  # int, numpy and torch integers (a tensor of indices, which int() took before); not 1.5 or True
            if isinstance(a, (bool, np.bool_)):
                raise TypeError
            index = operator.index(a)
        except TypeError:
            raise OpenMMError(f"ML atom index {a!r} is not a whole number; give 0-based atom indices of the "
                              "topology") from None
        if not 0 <= index < count:
            raise OpenMMError(f"ML atom index {index} is outside the topology's {count} atoms (0-based: 0..{count - 1})")
        if index in seen:
            raise OpenMMError(f"ML atom {index} is given twice; each ML atom once")
        seen.add(index)
        indices.append(index)
    return indices
