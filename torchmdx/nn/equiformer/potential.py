"""Equiformer as a :class:`~torchmdx.nn.base.Potential`: representation + energy normalisation.

Per-atom energies, as for the ET (:mod:`torchmdx.nn.potential`):

    t_a = scale · y_a + atomref(z_a) + shift,   E_b = Σ_a t_a + energy_offset  (reduce_op 'sum')
                                                E_b = mean_a t_a + energy_offset ('mean')

with y_a the representation's invariant output. The normalisation buffers, their float64 storage,
``set_normalisation`` / ``normalisation``, the element check and the overlap check are the ET's
(the same functions), so training, export and the calculator treat both alike. Forces and stress
come from the base class by autograd. Not traceable into the ET's whole-model graph
(``traceable = False``) and without compiled parts: the MD engine and the calculator run it eagerly.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import torch

from torchmdx.dtypes import torch_dtype
from torchmdx.errors import ModelError
from torchmdx.nn.base import Graph, Potential
from torchmdx.nn.equiformer.config import EquiformerConfig, equiformer_config
from torchmdx.nn.equiformer.model import EquiformerRepresentation
from torchmdx.nn.potential import _NORMALISATION_BUFFERS, ETPotential, _construction


class EquiformerPotential(Potential):
    """Equiformer (Liao & Smidt, ICLR 2023) as a :class:`Potential` (energies in eV).

    ``EquiformerPotential(config)`` with an :class:`EquiformerConfig`, a dict, a YAML path or
    None (the paper's MD17 defaults); keyword arguments override single keys.
    """

    kind = "equiformer"
    traceable = False

    # the energy normalisation and the input checks are the ET's, unchanged (same buffers)
    elements = ETPotential.elements
    normalisation = ETPotential.normalisation
    set_normalisation = ETPotential.set_normalisation
    check_elements = ETPotential.check_elements
    _check_overlaps = ETPotential._check_overlaps

    def __init__(self, config: Union[EquiformerConfig, Mapping, str, None] = None, **overrides):
        super().__init__()
        cfg = equiformer_config(config, **overrides)
        self.config = cfg
        self.cutoff = float(cfg.cutoff_upper)
        dtype = torch_dtype(cfg.dtype, error=ModelError, what="model dtype")
        with _construction(dtype, cfg.seed):
            self.representation = EquiformerRepresentation(cfg)
        self.register_buffer("atomref", torch.zeros(cfg.max_z, dtype=torch.float64))
        self.register_buffer("scale", torch.ones((), dtype=torch.float64))
        self.register_buffer("shift", torch.zeros((), dtype=torch.float64))
        self.register_buffer("energy_offset", torch.zeros((), dtype=torch.float64))
        self.register_buffer("known_elements", torch.ones(cfg.max_z, dtype=torch.bool))

    def _apply(self, fn, recurse=True):
        """Module.to()/float()/cuda(): move the normalisation buffers but keep them float64."""
        kept = {name: self._buffers[name] for name in _NORMALISATION_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != torch.float64:
                self._buffers[name] = old.to(device=new.device)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.representation.embedding.weight.dtype

    def hparams(self) -> dict:
        """Constructor arguments (the config, with the current dtype), plain Python."""
        values = self.config.to_dict()
        values["dtype"] = "float64" if self.dtype == torch.float64 else "float32"
        return values

    def atomic_energies(self, graph: Graph, return_hidden: bool = False):
        """Per-atom energies t_a (eV, float64); with ``return_hidden`` also the hidden irreps
        features (see :meth:`EquiformerRepresentation.forward`)."""
        if not self.tracing:
            self._check_overlaps(graph)
        dtype = self.dtype
        out = self.representation(graph.z, graph.edge_index, graph.vectors.to(dtype), graph.distances.to(dtype),
                                  graph.mask, return_hidden=return_hidden)
        y, hidden = out if return_hidden else (out, None)
        t = self.scale * y.to(torch.float64) + self.atomref[graph.z] + self.shift
        counts = torch.zeros(graph.num_structures, dtype=t.dtype, device=t.device).index_add(
            0, graph.batch, torch.ones_like(t)
        )
        per_atom_count = counts[graph.batch]
        if self.config.reduce_op == "mean":
            t = t / per_atom_count
        energies = t + self.energy_offset / per_atom_count
        return (energies, hidden) if return_hidden else energies
