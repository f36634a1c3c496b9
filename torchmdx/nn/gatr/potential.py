"""GATr as a :class:`~torchmdx.nn.base.Potential`: representation + the ET's energy normalisation.

Per-atom energies, as for the ET (:mod:`torchmdx.nn.potential`)::

    t_a = scale · y_a + atomref(z_a) + shift,   E_b = Σ_a t_a + energy_offset   (reduce_op 'sum')

with y_a the representation's invariant output (:mod:`torchmdx.nn.gatr.model`). The
normalisation buffers, ``set_normalisation``/``normalisation`` and the element and overlap
checks are the ET's (:class:`torchmdx.nn.normalised.NormalisedPotential`). Forces and stress by autograd in the base class.

Non-periodic structures only: atoms are points relative to their structure's centroid, which has
no meaning in a periodic box (a cell is refused with one line, and so is a neighbor list whose
vectors hold periodic image shifts).
"""

from __future__ import annotations

from typing import Mapping, Union

from torchmdx.nn.attention_potential import AttentionPotential
from torchmdx.nn.gatr.config import GATrConfig, gatr_config
from torchmdx.nn.gatr.model import GATrRepresentation


class GATrPotential(AttentionPotential):
    """Geometric Algebra Transformer as a :class:`Potential` (energies in eV).

    ``GATrPotential(config)`` with a :class:`GATrConfig`, a dict, a YAML path or None
    (defaults); keyword arguments override single keys.
    """

    kind = "gatr"
    build_config = staticmethod(gatr_config)
    representation_class = GATrRepresentation

    def __init__(self, config: Union[GATrConfig, Mapping, str, None] = None, **overrides):
        super().__init__(config, **overrides)
