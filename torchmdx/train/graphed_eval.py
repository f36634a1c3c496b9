"""Validation steps on packed batches, replayed as CUDA graphs.

What one replay does, on the packed batch in the static input buffers
(:class:`torchmdx.data.packing.PackedBatch`)::

    list = neighbor_list(pos, cutoff, batch, max_pairs=C)          (fixed capacity, no host read;
                                                                    periodic data: cell and pbc too,
                                                                    checked on the device)
    E, F = model(z, pos, batch; list),   F = -dE/dpos               (no create_graph)
    sums += error_sums(E - E_ref, n_atoms, F - F_ref; padding weights)   (float64, on the device)

The sums are read once, at the end of the validation epoch (:meth:`GraphedEvalStep.take_sums`),
and become the epoch's validation errors (:class:`torchmdx.train.metrics.EpochErrors`), exactly
what the eager validation step would have summed. The weights are whatever the model holds when
the graph replays: Lightning's EMA callback copies the averaged weights into the same parameter
tensors for validation, so the graph validates the EMA weights without recapture.

Capacity: C covers every pair of the real structures, Σ_b n_b (n_b − 1) (the largest such bound
seen for the graph's shape), so the list cannot overflow; a batch with a larger bound (the first
epoch only: validation batches repeat) recaptures with it. One graph per shape (atom capacity,
structures); a new shape runs one eager step first (lazy initialisation, Triton compilation).
On the CPU, or with ``capture=False``, the same step runs eagerly.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from torchmdx.kernels.neighbors import neighbor_list
from torchmdx.train.graphed_common import BadCells, round_capacity


class _EvalGraph:
    def __init__(self, inputs: dict, capacity: int):
        self.inputs = inputs
        self.capacity = capacity
        self.eager_steps = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None


class GraphedEvalStep:
    """Energies, forces and error sums of packed validation batches (module docstring).

    Args:
        model: a :class:`torchmdx.nn.Potential`.
        error_sums: ``(energy_error, n_atoms, force_error, structure_weight, atom_weight) ->
            float64 vector`` (:func:`torchmdx.train.module.train_error_sums`).
        forces: evaluate forces (and their errors).
        capture: capture CUDA graphs on a GPU.
    """

    def __init__(self, model, error_sums: Callable, *, forces: bool = True, capture: bool = True,
                 max_shapes: int = 8):
        self.model = model
        self.error_sums = error_sums
        self.forces = bool(forces)
        self.device = next(model.parameters()).device
        self.enabled = bool(capture) and self.device.type == "cuda" and torch.cuda.is_available()
        self.max_shapes = int(max_shapes)
        self.sums: Optional[torch.Tensor] = None
        self.stats = {"captures": 0, "replays": 0, "eager_steps": 0}
        self._graphs: dict = {}
        if self.enabled:
            self._side = torch.cuda.Stream(self.device)

    def step(self, packed) -> None:
        """Add the errors of one packed batch to :attr:`sums`."""
        given = {"z": packed.z, "pos": packed.pos, "batch": packed.batch, "energy": packed.energy,
                 "n_atoms": packed.n_atoms, "structure_weight": packed.structure_weight,
                 "atom_weight": packed.atom_weight}
        if self.forces and packed.forces is not None:
            given["forces"] = packed.forces
        if packed.periodic:
            given["cell"], given["pbc"] = packed.cell, packed.pbc
        key = (packed.atom_capacity, packed.num_structures, "forces" in given, packed.periodic)
        need = round_capacity(packed.pair_bound)
        graph = self._graphs.get(key)
        if graph is None or need > graph.capacity:
            if graph is None and len(self._graphs) >= self.max_shapes:
                self._graphs.clear()  # a run with many validation shapes: keep the latest ones only
            graph = self._graphs[key] = _EvalGraph({n: torch.empty_like(v) for n, v in given.items()},
                                                  max(need, graph.capacity if graph is not None else 0))
        for name, value in given.items():
            graph.inputs[name].copy_(value)
        if self.sums is None:
            from torchmdx.train.metrics import SUM_STATES

            self.sums = torch.zeros(len(SUM_STATES), dtype=torch.float64, device=self.device)
            self.bad_cells = BadCells(self.device)  # batches left out for an unusable cell
        if not self.enabled:
            self._compute(graph)
            self.stats["eager_steps"] += 1
            return
        if graph.graph is None:
            if graph.eager_steps < 1:
                self._eager(graph)
                graph.eager_steps += 1
                self.stats["eager_steps"] += 1
                return
            graph.graph = self._capture(graph)
            self.stats["captures"] += 1
        self._replay(graph)
        self.stats["replays"] += 1

    # the GPU parts (a test stands them in on the CPU)
    def _eager(self, graph: _EvalGraph) -> None:
        """The first call of a shape, on a side stream (lazy initialisation, Triton compilation)."""
        main = torch.cuda.current_stream(self.device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            self._compute(graph)
        main.wait_stream(self._side)

    def _capture(self, graph: _EvalGraph):
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            self._compute(graph)
        return cuda_graph

    def _replay(self, graph: _EvalGraph) -> None:
        graph.graph.replay()

    def _compute(self, graph: _EvalGraph) -> None:
        inputs = graph.inputs
        pos, batch = inputs["pos"], inputs["batch"]
        structures = inputs["energy"].shape[0]
        cell, pbc = inputs.get("cell"), inputs.get("pbc")
        neighbors = neighbor_list(pos.detach(), self.model.cutoff, batch, cell, pbc, max_pairs=graph.capacity,
                                  cell_check="device")
        with torch.enable_grad():
            out = self.model(inputs["z"], pos, batch, cell, pbc, neighbors=neighbors, forces="forces" in inputs,
                             create_graph=False, num_structures=structures)
        energy_error = out["energy"].detach() - inputs["energy"].to(out["energy"].dtype)
        force_error = out["forces"].detach() - inputs["forces"] if "forces" in inputs else None
        sums = self.error_sums(energy_error, inputs["n_atoms"], force_error, inputs["structure_weight"],
                               inputs["atom_weight"])
        if neighbors.cell_error is not None:
            # a batch with an unusable cell is left out of the sums and reported by take_sums
            bad = self.bad_cells.record(neighbors.cell_error, cell, pbc)
            sums = torch.where(bad, torch.zeros_like(sums), sums)
        self.sums.add_(sums)

    def take_sums(self) -> Optional[torch.Tensor]:
        """The sums since the last call (a copy; the accumulator restarts at 0). A periodic
        validation batch with an unusable cell stops the run here with one line."""
        from torchmdx.train.metrics import take_sums

        if self.sums is not None:
            count, code = self.bad_cells.state.tolist()
            if count:
                from torchmdx.errors import TrainingError

                raise TrainingError(f"{count} validation batch(es) hold a periodic structure whose cell cannot be "
                                    f"used with the model's cutoff {self.model.cutoff:g} Å (structure {code // 4} of "
                                    f"the first one); check the data's cells: torchmdx data info")

        return take_sums(self.sums)

    def release(self) -> None:
        self._graphs.clear()
