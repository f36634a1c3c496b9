"""Turn what a user passes as "the model" (a Potential or a model file) into a Potential."""

from __future__ import annotations

from pathlib import Path
import torch

from torchmdx.dtypes import torch_dtype
from torchmdx.devices import check_device  # noqa: F401 - md's device check lives in the foundation
from torchmdx.errors import ModelError
from torchmdx.nn.base import Potential

def as_dtype(dtype) -> torch.dtype:
    """torch dtype from a torch dtype or its name (float32/float64; float/double too)."""
    return torch_dtype(dtype)


def potential_dtype(potential: Potential, default: torch.dtype = torch.float64) -> torch.dtype:
    """The floating dtype of a potential's parameters (or buffers); ``default`` if it has none."""
    for t in list(potential.parameters()) + list(potential.buffers()):
        if t.is_floating_point():
            return t.dtype
    return default


def check_atoms_elements(potential: Potential, atoms) -> None:
    """The elements of ``atoms`` (an ase.Atoms) against those ``potential`` knows: its one-line
    ModelError (``Potential.check_elements``) when one is unknown."""
    device = next((b.device for b in potential.buffers()), torch.device("cpu"))
    potential.check_elements(torch.as_tensor(atoms.numbers, dtype=torch.long, device=device))


def load_potential(model, device="cpu", dtype=None) -> Potential:
    """A :class:`Potential` on ``device`` (and ``dtype`` when given) from a Potential object or
    a model file written by ``Potential.save`` (read by ``torchmdx.load_model``)."""
    device = check_device(device)
    if isinstance(model, Potential):
        potential = model
    elif isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_file():
            raise ModelError(f"{path}: model file not found")
        from torchmdx.nn import load_model

        potential = load_model(path, device=device)
    else:
        raise ModelError(f"expected a torchmdx Potential or a model file path, got {type(model).__name__}")
    potential = potential.to(device=torch.device(device))
    if dtype is not None:
        potential = potential.to(dtype=as_dtype(dtype))
    return potential
