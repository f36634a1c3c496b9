"""torchmdx: train, trust and run fast an equivariant-transformer molecular potential.

Public API (imported lazily so that ``import torchmdx`` stays cheap):

- ``torchmdx.build_model(config)``  -> :class:`torchmdx.nn.Potential`
- ``torchmdx.load_model(path, device=...)`` -> :class:`torchmdx.nn.Potential`
- ``torchmdx.Calculator(model_or_path, device=...)`` -> an ASE calculator
"""

__version__ = "0.1.0"

_LAZY = {
    "build_model": ("torchmdx.nn", "build_model"),
    "load_model": ("torchmdx.nn", "load_model"),
    "Potential": ("torchmdx.nn", "Potential"),
    "Calculator": ("torchmdx.md", "Calculator"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'torchmdx' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
