"""The base of the attention potentials on non-periodic structures (GATr and the plain transformer:
:mod:`torchmdx.nn.gatr`, :mod:`torchmdx.nn.transformer`): a representation giving y [N] per atom and
the ET's energy normalisation (:class:`~torchmdx.nn.normalised.NormalisedPotential`)::

    t_a = scale · y_a + atomref(z_a) + shift,   E_b = Σ_a t_a + energy_offset   (reduce_op 'sum')

Forces and stress by autograd in the base class. Non-periodic structures only: atoms are points
relative to their structure's centroid, which has no meaning in a periodic box (a cell is refused
with one line, and so is a neighbor list whose vectors hold periodic image shifts).
"""

from __future__ import annotations

import torch

from torchmdx.dtypes import torch_dtype
from torchmdx.errors import ModelError
from torchmdx.nn.base import Graph
from torchmdx.nn.normalised import NormalisedPotential
from torchmdx.nn.potential import _construction


#: what a periodic structure needs instead of a model of non-periodic structures only
PERIODIC_ADVICE = "periodic data need a model of architecture et or equiformer"


def refuse_periodic(kind: str, cell, pbc) -> None:
    """One-line ModelError for a periodic input (reads ``pbc`` only when it is on the host or a cell is given)."""
    if cell is None:
        return
    if pbc is not None and not bool(torch.as_tensor(pbc).any()):
        return
    raise ModelError(f"model architecture {kind!r} handles non-periodic structures only (molecules, clusters); "
                     "this input has a periodic cell")


def periodic_structure_line(model, pbc_rows, where) -> str | None:
    """The line for the first periodic structure of ``pbc_rows`` ([S, 3] booleans) given to ``model`` when the model
    takes none (``model.periodic`` False), else None; ``where(index)`` names it ("w.extxyz: structure 3"). train,
    evaluate and md said "model architecture 'gatr' handles non-periodic structures only ...; this input has a periodic
    cell", naming neither the file nor the structure (round 33)."""
    import numpy as np

    if getattr(model, "periodic", True):
        return None
    rows = np.asarray(pbc_rows, dtype=bool).reshape(-1, 3)
    periodic = np.flatnonzero(rows.any(-1))
    if not periodic.size:
        return None
    index = int(periodic[0])
    kind = getattr(model, "kind", type(model).__name__)
    return (f"{where(index)} is periodic (pbc {rows[index].tolist()}), and model architecture {kind!r} handles "
            f"non-periodic structures only (molecules, clusters); {PERIODIC_ADVICE}")


def check_no_images(kind: str, graph: Graph) -> None:
    """One-line ModelError when the edge vectors are not pos[j] - pos[i] (periodic image shifts)."""
    if graph.vectors.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    direct = graph.pos.index_select(0, graph.edge_index[1]) - graph.pos.index_select(0, graph.edge_index[0])
    off = (graph.vectors.detach() - direct.detach()).abs().amax(-1) > 1e-6
    if graph.mask is not None:
        off = off & graph.mask
    if bool(off.any()):
        raise ModelError(f"model architecture {kind!r} handles non-periodic structures only; the neighbor list "
                         "holds periodic image shifts")


class AttentionPotential(NormalisedPotential):
    """Base of the attention potentials on non-periodic structures (GATr, the plain
    transformer): a representation giving y [N] from (z, pos, batch, B, edges, distances,
    mask) and the shared energy normalisation (:class:`~torchmdx.nn.normalised.NormalisedPotential`).
    Subclasses set ``kind``, ``build_config`` (a config from a dict/YAML/None + overrides) and
    ``representation_class``."""

    kind = "attention"
    periodic = False  # refuse_periodic
    #: traced by TracedForces with fake tensors (static shapes), one graph reused across batch
    #: compositions (tests/test_train_graph_architectures.py); the host checks above skip while
    #: tracing or inside a CUDA-graph capture
    traceable = True
    #: ``compile: auto`` does not pick the whole-model graph: its compile time on a GPU is not measured
    whole_graph_auto = False
    #: the captured training step (``train.cuda_graph: auto``) equals the eager steps on a GPU, for
    #: GATr and the transformer alike, once their dead attention key biases were removed (H100,
    #: 2026-12-06, tests/test_train_graph_architectures.py; rerun after GATr's fewer-kernel
    #: formulation the same day: passed)
    captured_training_auto = True
    build_config = None
    representation_class = None

    def __init__(self, config=None, **overrides):
        super().__init__()
        cfg = type(self).build_config(config, **overrides)
        self.config = cfg
        self.cutoff = cfg.neighbor_cutoff
        dtype = torch_dtype(cfg.dtype, error=ModelError, what="model dtype")
        with _construction(dtype, cfg.seed):
            self.representation = type(self).representation_class(cfg)
        self.register_normalisation(cfg.max_z)

    def neighbors(self, pos, batch, cell, pbc, cutoff=None, max_pairs=None):
        refuse_periodic(self.kind, cell, pbc)
        return super().neighbors(pos, batch, cell, pbc, cutoff=cutoff, max_pairs=max_pairs)

    def atomic_energies(self, graph: Graph, return_hidden: bool = False):
        """Per-atom energies t_a (eV, float64); with ``return_hidden`` also the representation's hidden list."""
        if not self.tracing:
            self._check_overlaps(graph)
            check_no_images(self.kind, graph)
        dtype = self.dtype
        out = self.representation(graph.z, graph.pos.to(dtype), graph.batch, graph.num_structures, graph.edge_index,
                                  graph.distances.to(dtype), graph.mask, return_hidden=return_hidden)
        y, hidden = out if return_hidden else (out, None)
        energies = self.normalised_energies(y, graph, self.config.reduce_op)
        return (energies, hidden) if return_hidden else energies
