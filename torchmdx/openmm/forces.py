"""OpenMM forces around the exported module: openmm-torch's ``TorchForce``, or OpenMM's own
``PythonForce`` (OpenMM >= 8.4) calling the same TorchScript module from Python. (The fast
``PythonForce`` that ``MLPotential("torchmdx")`` builds by default from a model file evaluates the
model with torchmdx's own evaluator instead: :mod:`torchmdx.openmm.fast`.)

Why two: openmm-torch's only PyPI wheel (openmmtorch 1.5, manylinux_2_34) is a C++ plugin linked
against the CUDA build of torch 2.9.0 (``libtorch_cuda.so``, ``libc10_cuda.so``,
``libnvrtc.so.12``): it does not load beside torch 2.13.0 (torchmdx's pin, CPU build), and its
inlined torch headers do not match 2.13's ABI either (README "OpenMM"). ``PythonForce`` needs no
plugin, so ``MLPotential("torchmdx")`` works with the pinned torch; a ``TorchForce`` is used where
openmm-torch loads (an environment whose torch matches openmm-torch's build).
"""

from __future__ import annotations

import io
from typing import Optional, Sequence

from torchmdx.openmm.errors import OpenMMError

#: what to install, named in the one-line errors
OPENMM_INSTALL = "pip install 'torchmdx[openmm]' (openmm 8.6.1, openmmml 1.8)"


def import_openmm():
    """The ``openmm`` module, or a one-line :class:`OpenMMError` naming what to install."""
    try:
        import openmm
    except ImportError as exc:
        raise OpenMMError(f"OpenMM is not installed ({_first_line(exc)}); {OPENMM_INSTALL}") from None
    return openmm


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def openmmtorch_problem() -> Optional[str]:
    """None when ``import openmmtorch`` works here, else why not (one line)."""
    try:
        import torch  # noqa: F401 - openmm-torch's plugin needs libtorch loaded first
        import openmmtorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError or OSError from the C++ plugin
        import torch

        if isinstance(exc, ModuleNotFoundError) and exc.name in ("openmmtorch", "openmm"):
            return f"openmmtorch is not installed ({_first_line(exc)})"
        return (f"openmmtorch cannot be imported ({_first_line(exc)}); its PyPI wheel 1.5 is built against the CUDA build of "
                f"torch 2.9.0, this is torch {torch.__version__}")
    return None


def import_openmmtorch():
    """The ``openmmtorch`` module, or a one-line :class:`OpenMMError` saying why it cannot load
    and what to use instead."""
    problem = openmmtorch_problem()
    if problem is not None:
        raise OpenMMError(f"{problem}; use implementation='python' (openmm.PythonForce) or an environment where "
                          "openmm-torch matches torch (docs/openmm.md)")
    import openmmtorch

    return openmmtorch


def openmm_status() -> dict:
    """Versions and availability of openmm, openmmml and openmmtorch here (plain Python)."""
    import torch

    status = {"torch": torch.__version__}
    try:
        import openmm

        status["openmm"] = openmm.__version__
        status["python_force"] = hasattr(openmm, "PythonForce")
    except ImportError as exc:
        status["openmm"] = None
        status["openmm_problem"] = _first_line(exc)
    try:
        from importlib.metadata import version

        status["openmmml"] = version("openmmml")
    except Exception:  # noqa: BLE001 - not installed
        status["openmmml"] = None
    try:
        from importlib.metadata import version

        status["openmmtorch"] = version("openmmtorch")
    except Exception:  # noqa: BLE001 - not installed
        status["openmmtorch"] = None
    status["openmmtorch_loads"] = openmmtorch_problem() is None
    if not status["openmmtorch_loads"]:
        status["openmmtorch_problem"] = openmmtorch_problem()
    return status


def create_torch_force(module, periodic: bool, path: Optional[str] = None):
    """An openmm-torch ``TorchForce`` of the exported ``module`` (positions of the whole System
    in, the module's ``indices`` pick the ML atoms); ``path``: load from that file instead."""
    from torchmdx.openmm.export import check_openmm_units, metadata

    check_openmm_units(metadata(module), path or "the module")
    openmmtorch = import_openmmtorch()
    force = openmmtorch.TorchForce(str(path) if path is not None else module)
    force.setUsesPeriodicBoundaryConditions(bool(periodic))
    force.setOutputsForces(bool(module.outputs_forces))
    force.setName("torchmdx")
    return force


class PythonForceComputation:
    """The computation of an ``openmm.PythonForce``: State (positions of the ML atoms, nm; box)
    -> (energy kJ/mol, forces kJ/mol/nm [M, 3]) by the TorchScript module and autograd.
    Picklable (the module travels as its TorchScript bytes), so ``XmlSerializer`` can save it."""

    def __init__(self, module, periodic: bool, device: str = "cpu"):
        self.module = module
        self.periodic = bool(periodic)
        self.device = str(device)

    def __getstate__(self):
        import torch

        buffer = io.BytesIO()
        torch.jit.save(self.module, buffer)
        return {"module": buffer.getvalue(), "periodic": self.periodic, "device": self.device}

    def __setstate__(self, state):
        import torch

        self.periodic = state["periodic"]
        self.device = state["device"]
        self.module = torch.jit.load(io.BytesIO(state["module"]), map_location=self.device)

    def __call__(self, state):
        import numpy as np
        import torch
        from openmm import unit

        positions = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)
        pos = torch.tensor(positions, dtype=torch.float64, device=self.device, requires_grad=True)
        box = None
        if self.periodic:
            vectors = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer)
            box = torch.tensor(np.asarray(vectors, dtype=np.float64), dtype=torch.float64, device=self.device)
        try:
            with torch.enable_grad():
                energy = self.module.energy(pos, box)
                (grad,) = torch.autograd.grad(energy, pos)
        except torch.jit.Error as exc:  # the module's own "torchmdx: ..." line, under 30 lines of TorchScript
            raise OpenMMError(module_error_line(exc)) from None
        return float(energy.detach()), (-grad).detach().cpu().numpy()


def module_error_line(exc: BaseException) -> str:
    """The one line of the module's own error ("torchmdx: ..." in :mod:`torchmdx.openmm.module` and
    :mod:`torchmdx.openmm.neighbors`: a box narrower than twice the cutoff, a non-finite position,
    atoms on top of each other) out of TorchScript's traceback; any other error's last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if "torchmdx: " in line:
            return line[line.index("torchmdx: ") + len("torchmdx: "):]
    return lines[-1] if lines else type(exc).__name__


def create_python_force(module, periodic: bool, atoms: Optional[Sequence[int]] = None, device: str = "cpu"):
    """An ``openmm.PythonForce`` running ``module`` (whose ML atoms are all the positions it is
    given: ``atoms`` become the force's particles, OpenMM passes only theirs)."""
    from torchmdx.openmm.export import check_openmm_units, metadata

    openmm = import_openmm()
    if not hasattr(openmm, "PythonForce"):
        raise OpenMMError(f"OpenMM {openmm.__version__} has no PythonForce (added in 8.4); {OPENMM_INSTALL}")
    check_openmm_units(metadata(module), "the module")
    if module.indices.numel():
        raise OpenMMError("a PythonForce passes only the ML atoms' positions: build the module without atom indices")
    return python_force(PythonForceComputation(module, periodic, device), periodic, atoms)


def python_force(computation, periodic: bool, atoms: Optional[Sequence[int]] = None):
    """The ``openmm.PythonForce`` "torchmdx" of ``computation`` (either path's): ``atoms`` (the ML
    atoms' particle indices; None: all particles) become its particles, OpenMM passes only theirs."""
    force = import_openmm().PythonForce(computation, {})
    if atoms is not None:
        force.setParticles([int(a) for a in atoms])
    force.setUsesPeriodicBoundaryConditions(bool(periodic))
    force.setName("torchmdx")
    return force
