"""The ET potential: TorchMD-NET's equivariant transformer representation + output head, with
the energy normalisation of :class:`torchmdx.nn.normalised.NormalisedPotential`:

    t_a = scale · y_a + atomref(z_a) + shift,   E_b = sum_a t_a + energy_offset  (reduce_op 'sum';
    'mean' and 'torchmdnet_mean' as described there)

y_a is the head's output for atom a (scalar MLP or gated equivariant blocks). Energies come in
float64; forces have the dtype of the positions. ``elements`` (atomic numbers seen in training)
restricts the accepted elements. Forces, stress and the neighbor list come from
:class:`torchmdx.nn.base.Potential`.
"""

from __future__ import annotations

import contextlib
from typing import Mapping, Optional, Union

import torch

from torchmdx.dtypes import torch_dtype
from torchmdx.errors import ModelError, requested_gigabytes
from torchmdx.nn.base import Graph
from torchmdx.nn.config import ModelConfig, model_config
from torchmdx.nn.et import ETRepresentation, compiled_function
from torchmdx.nn.heads import DipoleHead, GatedEquivariantHead, ScalarHead
from torchmdx.nn.normalised import (  # noqa: F401 - names this module has always offered
    _NORMALISATION_BUFFERS,
    OVERLAP_DISTANCE,
    NormalisedPotential,
    element_symbol,
)


@contextlib.contextmanager
def _construction(dtype: torch.dtype, seed: Optional[int]):
    """Create parameters directly in ``dtype`` and, with a seed, reproducibly."""
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            yield
        except (RuntimeError, MemoryError) as exc:
            if not _out_of_memory(exc):
                raise
            raise ModelError(f"building the model ran out of memory ({_allocation(exc)}): check the sizes in the "
                             "model: section (embedding_dimension, num_rbf, num_layers, max_z, ...)") from None
        finally:
            torch.set_default_dtype(previous)


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(exc) \
        or "out of memory" in str(exc).lower()


def _allocation(exc: BaseException) -> str:
    """'one array of 40 GB' from torch's allocator message, else its first line."""
    gigabytes = requested_gigabytes(str(exc))
    if gigabytes is not None:
        return f"one weight array needed {gigabytes:.3g} GB"
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


#: message path of a training step under ``backend: auto``. The fused Triton kernels serve the
#: energy and force passes, but a force loss differentiates the forces once more, and that double
#: backward recomputes the message on the torch reference per layer anyway; the reference path
#: itself evaluates every layer's filters in one product with self edges in the edge list
#: (:meth:`torchmdx.nn.et.ETRepresentation.forward`). Measured in the captured training step
#: (H100, 2026-12-05): aspirin batch 8, 11.7 ms reference vs 14.9 ms fused (85.7 vs 67.2 steps/s
#: in a whole training run); ANI-1x batch 32, 13.2 vs 14.5 ms before the merged filters and 10.8 ms
#: after. Inference and validation (eval mode, or no gradients) keep the fused kernels.
AUTO_TRAINING_BACKEND = "torch"


class ETPotential(NormalisedPotential):
    """TorchMD-NET's equivariant transformer as a :class:`Potential` (energies in eV).

    ``ETPotential(config)`` with a :class:`ModelConfig`, a dict, a YAML path or None (defaults);
    keyword arguments override single keys: ``ETPotential(embedding_dimension=64)``.
    """

    kind = "et"
    traceable = True
    captured_training_auto = True  # tests/test_train_graph.py's -m gpu tests: captured = eager steps
    pair_layout = True  # Graph.pairs: broadcasts and sums over the senders (kernels.pairs)
    graph_ops = True  # traced inference graphs may run the fused message as custom operators (kernels.message_ops)

    def __init__(self, config: Union[ModelConfig, Mapping, str, None] = None, **overrides):
        super().__init__()
        cfg = model_config(config, **overrides)
        self.config = cfg
        self.cutoff = float(cfg.cutoff_upper)
        dtype = torch_dtype(cfg.dtype, error=ModelError, what="model dtype")
        with _construction(dtype, cfg.seed):
            self.representation = ETRepresentation(cfg)
            if cfg.output_model == "scalar":
                self.head = ScalarHead(cfg.embedding_dimension, cfg.activation)
            else:
                self.head = GatedEquivariantHead(cfg.embedding_dimension, cfg.activation)
            self.dipole_head = DipoleHead(cfg.embedding_dimension, cfg.activation) if cfg.dipole else None
        self.register_normalisation(cfg.max_z)
        self.backend = cfg.backend
        self._extras: Optional[dict] = None
        self.compiled = False
        self._frozen: list = []  # parameters set_compiled(True) froze

    # ------------------------------------------------------------------ description / files
    def hparams(self) -> dict:
        """Constructor arguments (the config, with the current dtype and backend), plain Python."""
        return {**super().hparams(), "backend": self.backend}

    # ------------------------------------------------------------------ inference speed
    def set_compiled(self, enabled: bool = True) -> bool:
        """Inference mode with fewer, fused kernels: the dense parts of the representation and
        the head run through ``torch.compile`` (:func:`torchmdx.nn.et.compiled_function`), the
        message step on its own kernels. Freezes the parameters (``requires_grad = False``):
        energies, forces and stress are unchanged, parameters get no gradients (not for
        training; ``set_compiled(False)`` gives back ``requires_grad`` to the parameters it
        froze), and double backward is not available. The first call compiles (tens of
        seconds); the MD engine and the calculator use it on CUDA. Returns ``enabled``."""
        enabled = bool(enabled)
        if enabled and not self.compiled:
            self._frozen = [p for p in self.parameters() if p.requires_grad]
            for p in self._frozen:
                p.requires_grad_(False)
        elif not enabled and self.compiled:
            for p in self._frozen:
                p.requires_grad_(True)
            self._frozen = []
        self.compiled = enabled
        return self.compiled

    def message_backend(self) -> str:
        """The message path of this call: :attr:`backend`, except that 'auto' in training mode
        with gradients on (a training step: its loss differentiates the forces again) gives
        :data:`AUTO_TRAINING_BACKEND`."""
        if self.backend == "auto" and self.training and torch.is_grad_enabled():
            return AUTO_TRAINING_BACKEND
        return self.backend

    def graph_inputs(self, device) -> dict:
        """The filter tables' coefficients (:meth:`ETRepresentation.table_inputs`, model dtype): the
        inputs of the fused message operators in a traced inference graph."""
        return self.representation.table_inputs(torch.device(device), self.dtype)

    # ------------------------------------------------------------------ energies
    def atomic_energies(self, graph: Graph) -> torch.Tensor:
        """Per-atom energies t_a (eV, float64). While :attr:`tracing`
        (:class:`torchmdx.nn.traced.TracedForces`): no overlap check (a host read) and the torch
        reference message, or, with :attr:`traced_inputs` (the graph's filter tables), the fused
        message as custom operators (:mod:`torchmdx.kernels.message_ops`)."""
        tracing = self.tracing
        if not tracing:
            self._check_overlaps(graph)
        dtype = self.dtype
        compiled = self.compiled and not tracing
        given = None
        if tracing and self.traced_inputs is not None:  # (the all-pairs layout takes none: ETRepresentation)
            given = self.representation.tables_from_inputs(self.traced_inputs)
        x, vec = self.representation(
            graph.z, graph.edge_index, graph.vectors.to(dtype), graph.distances.to(dtype), graph.mask,
            backend="torch" if tracing else self.message_backend(), compiled=compiled, self_edges=not tracing,
            pairs=graph.pairs, given_tables=given,
        )
        head = compiled_function(type(self.head).forward, x.device.type) if compiled else type(self.head).forward
        energies = self.normalised_energies(head(self.head, x, vec), graph, self.config.reduce_op)
        if self._extras is not None and self.dipole_head is not None:
            self._extras["dipole"] = self.dipole_head(
                x, vec, graph.z, graph.pos.to(dtype), graph.batch, graph.num_structures
            )
        return energies

    def forward(self, z, pos=None, batch=None, cell=None, pbc=None, **kwargs) -> dict:
        """As :meth:`Potential.forward`; a model with a dipole head also returns ``dipole`` [B, 3] (e·Å)."""
        if self.dipole_head is None or not torch.is_tensor(z):
            return super().forward(z, pos, batch, cell, pbc, **kwargs)
        self._extras = {}
        try:
            out = super().forward(z, pos, batch, cell, pbc, **kwargs)
            out.update(self._extras)
        finally:
            self._extras = None
        return out
