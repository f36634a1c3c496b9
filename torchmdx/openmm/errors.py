"""One-line errors of the OpenMM layer (a :class:`torchmdx.errors.ModelError`: the CLI prints
``error: ...`` and exits with status 2)."""

from torchmdx.errors import ModelError


class OpenMMError(ModelError):
    """OpenMM export or set-up that cannot go on: missing openmm / openmm-torch, an element the
    model does not know, a unit mismatch, a box too small for the cutoff."""
