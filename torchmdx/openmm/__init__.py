"""Run torchmdx models inside OpenMM (docs/openmm.md).

- :func:`export_openmm`: a TorchScript module for openmm-torch's ``TorchForce`` (positions in
  nm -> energy in kJ/mol; periodic boxes; ML atom subsets; autograd or returned forces), with
  units, elements and cutoff recorded in the file (``torchmdx export --openmm``).
- ``MLPotential("torchmdx", modelPath=...)`` (openmm-ml, registered through the entry point
  ``openmmml.potentials``): ``createSystem`` and ``createMixedSystem`` (ML region in an MM
  system), for a model file with an ``openmm.PythonForce`` (:mod:`torchmdx.openmm.mlpotential`)
  that evaluates the model through torchmdx's own fast path, the Calculator's
  (:mod:`torchmdx.openmm.fast`); for an export (or ``fastPath=False``) with a ``TorchForce``
  where openmm-torch loads, else a PythonForce running the same TorchScript module.

Layer: at the level of :mod:`torchmdx.md` (the fast path holds a Calculator); imports md, nn,
kernels, data and the foundation, never train or cli. Nothing here imports openmm at module level: ``import torchmdx.openmm`` works without it.
"""

from torchmdx.openmm.errors import OpenMMError

_LAZY = {
    "export_openmm": "torchmdx.openmm.export",
    "build_module": "torchmdx.openmm.export",
    "with_atoms": "torchmdx.openmm.export",
    "save_module": "torchmdx.openmm.export",
    "load_module": "torchmdx.openmm.export",
    "read_metadata": "torchmdx.openmm.export",
    "metadata": "torchmdx.openmm.export",
    "create_torch_force": "torchmdx.openmm.forces",
    "create_python_force": "torchmdx.openmm.forces",
    "create_fast_force": "torchmdx.openmm.fast",
    "FastComputation": "torchmdx.openmm.fast",
    "openmm_status": "torchmdx.openmm.forces",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'torchmdx.openmm' has no attribute {name!r}")


__all__ = ["OpenMMError", *_LAZY]
