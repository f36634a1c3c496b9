"""Equiformer as a :class:`~torchmdx.nn.base.Potential`: representation + energy normalisation.

Per-atom energies, as for the ET (:mod:`torchmdx.nn.potential`):

    t_a = scale · y_a + atomref(z_a) + shift,   E_b = Σ_a t_a + energy_offset  (reduce_op 'sum')
                                                E_b = mean_a t_a + energy_offset ('mean')

with y_a the representation's invariant output. The normalisation buffers, their float64 storage,
``set_normalisation`` / ``normalisation``, the element check and the overlap check are the ET's
(:class:`torchmdx.nn.normalised.NormalisedPotential`), so training, export and the calculator
treat both alike. Forces and stress
come from the base class by autograd. Traceable into one whole-model graph
(:class:`torchmdx.nn.traced.TracedForces`: ``compile: whole`` for the calculator and MD; equal
to the eager model in float64, compiled and not, tested), compiled by inductor without dynamo
(``traced_frontend``), but ``compile: auto`` does not pick it (``whole_graph_auto = False``):
its compile time on a GPU is not measured yet (for a 2-layer test model on this project's CPU
41 s with the grouped fast paths, 86 s with e3nn's per-path code:
``bench/count_equiformer_ops.py --compile``), and without compiled parts ``auto`` runs it
eagerly, captured as a CUDA graph where shapes allow. The compiled *training* graph
(``train.cuda_graph_compile``) is refused on the CPU (``traced_training``: inductor's C++ code got
its forces wrong) and allowed on CUDA (checked on an H100); the captured training step
(``train.cuda_graph``, on under ``auto`` since it was checked on an H100) runs the eager autograd
without it, whose model part traces with static shapes (tests/test_equiformer_capture.py).
"""

from __future__ import annotations

from typing import Mapping, Union


from torchmdx.dtypes import torch_dtype
from torchmdx.errors import ModelError
from torchmdx.nn.base import Graph
from torchmdx.nn.equiformer.config import EquiformerConfig, equiformer_config
from torchmdx.nn.equiformer.model import EquiformerRepresentation
from torchmdx.nn.normalised import NormalisedPotential
from torchmdx.nn.potential import _construction


class EquiformerPotential(NormalisedPotential):
    """Equiformer (Liao & Smidt, ICLR 2023) as a :class:`Potential` (energies in eV).

    ``EquiformerPotential(config)`` with an :class:`EquiformerConfig`, a dict, a YAML path or
    None (the paper's MD17 defaults); keyword arguments override single keys.
    """

    kind = "equiformer"
    traceable = True
    whole_graph_auto = False
    #: its traced graph goes to inductor without dynamo (:data:`torchmdx.nn.traced.FRONTENDS`): with
    #: ``torch.compile`` it failed on an H100 (torch 2.11) with dynamo's "Attempt to trace generator"
    traced_frontend = "inductor"
    #: may TracedForces compile its training graph (``train.cuda_graph_compile``)? Not yet: on the
    #: CPU (torch 2.13, inductor's C++ code, 2026-12-05) the compiled training graph of a 2-layer,
    #: lmax 2 test model gave forces off by 0.06 eV/Å (of 0.17) in float64, with the energy exact,
    #: while the traced graph run uncompiled, AOTAutograd without inductor
    #: (aot_eager_decomp_partition) and inductor with ``max_fusion_size: 1`` were exact: an
    #: inductor fusion bug met by this graph (torch 2.11 as well; exact up to max_fusion_size 4; the
    #: bisected lowering is the fused per-edge sum dE/dφ_e, docs/model.md). The inference graph
    #: compiles exactly. On CUDA (Triton code) the compiled training graph's forces and gradients
    #: equal the eager model's (H100, torch 2.11, 2026-12-05 night,
    #: tests/test_equiformer_capture.py), so it is allowed there: the device types it may run on
    traced_training = ("cuda",)
    #: the captured training step (``train.cuda_graph: auto``) equals the eager steps on a GPU
    #: (H100, 2026-12-05 night, tests/test_train_graph_architectures.py)
    captured_training_auto = True

    def __init__(self, config: Union[EquiformerConfig, Mapping, str, None] = None, **overrides):
        super().__init__()
        cfg = equiformer_config(config, **overrides)
        self.config = cfg
        self.cutoff = float(cfg.cutoff_upper)
        dtype = torch_dtype(cfg.dtype, error=ModelError, what="model dtype")
        with _construction(dtype, cfg.seed):
            self.representation = EquiformerRepresentation(cfg)
        self.register_normalisation(cfg.max_z)

    def atomic_energies(self, graph: Graph, return_hidden: bool = False):
        """Per-atom energies t_a (eV, float64); with ``return_hidden`` also the hidden irreps
        features (see :meth:`EquiformerRepresentation.forward`)."""
        if not self.tracing:
            self._check_overlaps(graph)
        dtype = self.dtype
        out = self.representation(graph.z, graph.edge_index, graph.vectors.to(dtype), graph.distances.to(dtype),
                                  graph.mask, return_hidden=return_hidden)
        y, hidden = out if return_hidden else (out, None)
        energies = self.normalised_energies(y, graph, self.config.reduce_op)
        return (energies, hidden) if return_hidden else energies
