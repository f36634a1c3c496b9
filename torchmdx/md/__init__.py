"""Molecular dynamics: the ASE calculator and the native engine.

- :class:`Calculator` (``torchmdx.md.calculator``): ASE calculator of any Potential / model file.
- :class:`Simulation` (``torchmdx.md.engine``): batched MD on the device (NVE velocity Verlet,
  Langevin BAOAB, Bussi, Nosé–Hoover chain; FIRE minimisation; Verlet-skin neighbor lists).
- :func:`run_md` (``torchmdx.md.run``): what ``torchmdx md`` does, from an :class:`MDConfig`.

Imported lazily so that ``import torchmdx.md`` does not pull in ASE and torch until needed.
"""

_LAZY = {
    "Calculator": ("torchmdx.md.calculator", "Calculator"),
    "Simulation": ("torchmdx.md.engine", "Simulation"),
    "Reporter": ("torchmdx.md.reports", "Reporter"),
    "Observation": ("torchmdx.md.reports", "Observation"),
    "RunSummary": ("torchmdx.md.reports", "RunSummary"),
    "System": ("torchmdx.md.system", "System"),
    "MDState": ("torchmdx.md.system", "MDState"),
    "ForceField": ("torchmdx.md.forces", "ForceField"),
    "make_integrator": ("torchmdx.md.integrators", "make_integrator"),
    "fire_minimize": ("torchmdx.md.minimize", "fire_minimize"),
    "load_potential": ("torchmdx.md.loading", "load_potential"),
    "MDConfig": ("torchmdx.md.config", "MDConfig"),
    "run_md": ("torchmdx.md.run", "run_md"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'torchmdx.md' has no attribute {name!r}")


__all__ = list(_LAZY)
