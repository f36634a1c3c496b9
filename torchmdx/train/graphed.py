"""One training step (forward, forces, loss, backward, clipping, optimiser step) as a CUDA graph.

Why
---
A training step on forces is a few thousand small kernels: the ET forward, the forces
F = -dE/dpos by autograd with ``create_graph=True``, and the backward through both (the fused
message kernels take their double backward through the torch reference). For a batch of 32
molecules of 21 atoms the host launches them more slowly than the GPU runs them (70-83 ms per
step on an H100, TorchMD-NET 3.0.0 68 ms). Captured once and replayed, the step is one launch.

What one replay does (in this order, on the batch in the static input buffers)::

    g_p <- 0                                   (the parameters' .grad tensors, in place)
    list = neighbor_list(pos, cutoff, batch[, cell, pbc], max_pairs=C)   (Triton, fixed capacity, no host read)
    E, F = model(z, pos, batch; list),   F = -dE/dpos   (create_graph=True when training on forces)
    loss, ΔE, ΔF = objective(E, F, E_ref, F_ref, n_atoms);   loss.backward()
    clip g (norm or value, as Lightning's gradient_clip_val / gradient_clip_algorithm)
    AdamW step (fused, capturable; lr read from a device tensor; skipped if the list overflowed)

Its outputs (loss, ΔE [B], ΔF [N, 3], atom counts [B], overflow flag) are static tensors that the
next step overwrites.

Neighbor capacity
-----------------
The graph needs a fixed number of pair rows C, and padding rows are not free (the reference
message path and the double backward work on every row). ``pair_headroom`` None:
C = Σ_b n_b (n_b - 1), the number of ordered pairs inside the structures of the batch, which
bounds a full non-periodic list, so the list cannot overflow; the bound comes from the CPU batch
(:func:`batch_shape`, before the batch is copied to the GPU), and a later batch of the same
shape with a larger bound recaptures with capacity max(bound, 1.25 C). ``pair_headroom`` h (the
training config's default is 1.1): C = h × (the most pairs seen in the warm-up steps, which run on
the exact list; the last warm-up step already runs with C), at most the bound. A batch with more pairs sets the overflow
flag, and the fused AdamW kernel then leaves weights, moments and step count untouched (its
``found_inf`` input, the mechanism GradScaler uses): an overflowed step is a no-op.
:meth:`GraphedTrainStep.check` (a host read, called at logging points) sees it, grows C and,
when the latest step was the one skipped, redoes it eagerly; earlier skipped steps are counted
and reported once. Measured (32 aspirins, 9 682 pairs, H100): 26.4 ms per replay with the bound
(13 440 rows), 20.4 ms with h = 1.1 (10 688 rows). Periodic batches (``cell``, ``pbc`` inputs)
are captured too: the list rebuilds their cell geometry on the device at every replay
(``cell_check="device"``); a batch whose cell cannot be used skips the step like an overflow, and
:meth:`GraphedTrainStep.check` stops the run with one line.

Shapes
------
One graph per batch shape (atoms, structures), at most ``max_shapes`` of them (the last,
smaller batch of an epoch is a second shape). A new shape first runs ``warmup_steps`` eager
steps (real training steps, on a side stream: lazy initialisation, Triton compilation,
optimiser state), then is captured and replayed. More distinct shapes than ``max_shapes``
(molecules of varying size) switch graphs off for the rest of the run, with one note.

Learning rate
-------------
The optimiser's ``group["lr"]`` stays a Python float for everybody else (schedulers, logging,
checkpoints). The graph reads a device copy, refreshed before each replay when the float
changed; during capture (and eager steps) ``group["lr"]`` is that tensor. The other
hyper-parameters (betas, eps, weight decay) are fixed at capture; changing them, or replacing a
parameter, gradient or optimiser-state tensor (``optimizer.load_state_dict``), is detected
before the next replay and recaptures.

Packed batches (:class:`torchmdx.data.packing.PackedBatch`): molecules of different sizes are
padded to a few atom capacities (size buckets), so datasets like QM9 or ANI-1x replay a handful
of graphs instead of one per batch shape; the step takes the batch's ``n_atoms`` and the
padding weights (``structure_weight``, ``atom_weight``) as static inputs too, and the objective
leaves the padding out of the loss.

Inside the graph as well (given ``ema`` and ``error_sums``): the weight EMA after the AdamW step
(:func:`torchmdx.train.ema.ema_update`, skipped with the step on overflow) and the epoch's
error sums (:attr:`GraphedTrainStep.sums`, float64 on the device, read once per epoch by
:meth:`GraphedTrainStep.take_sums`). Outside: logging, the learning-rate schedule, validation.
Nothing in a replay reads from the device; the host reads :attr:`GraphedTrainStep.status` only
in :meth:`GraphedTrainStep.check`.

Several processes (DDP)
-----------------------
With ``torch.distributed`` initialised and several ranks (``distributed``; docs/training.md,
"Under DDP"), the step reduces the gradients itself and keeps every rank in step
(:class:`~torchmdx.train.graphed_step.DistributedStep`):

- every parameter's ``.grad`` is a view of one flat buffer (made before the first step, never
  None); after the backward one all-reduce (sum, / W) of it, then clipping and AdamW;
- before the forward one all-reduce of [the global batch's counts, overflow and unusable-cell
  flags, each rank's pair count]: the objective (``global_batch_objective``, given those
  counts) normalises by the global batch, every rank skips a step in which some rank
  overflowed, and :attr:`status` holds the reduced flag and the largest pair count;
- NCCL wants a captured collective captured, and replayed, by all ranks together: every step
  first exchanges the ranks' batch shapes on the host (:meth:`DistributedStep.agree`, gloo), and
  the graphs are kept per combination of the ranks' shapes with the largest bound, so every host
  decision here (warm-up, capture, capacity, redo, ``max_shapes``) is the same on every rank;
- the traced (compiled) step is not available.

The caller keeps DDP's own reducer out (:class:`torchmdx.train.module.PotentialModule` sets the
wrapper's ``require_backward_grad_sync`` to False) and sends every rank's every batch here.

The batch shapes the graphs are keyed on, capacity rounding and the record of unusable cells,
shared with the validation step, are in :mod:`torchmdx.train.graphed_common`; the step a graph
captures (and the record of the tensors it binds) is in :mod:`torchmdx.train.graphed_step`.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import Callable, Optional

import torch

from torchmdx.train.graphed_common import (CAPACITY_ROUNDING, SHAPE_ATTRIBUTE, BadCells, BatchShape, batch_shape,
                                           packed_shape, round_capacity, shape_from_counts)
from torchmdx.train.graphed_step import CapturableStep, DistributedStep, StepOutputs  # StepOutputs: imported from here too

__all__ = ["CAPACITY_GROWTH", "StepOutputs", "GraphedTrainStep",
           # re-exported from torchmdx.train.graphed_common (imported from here by modules, tests, bench scripts)
           "CAPACITY_ROUNDING", "SHAPE_ATTRIBUTE", "BadCells", "BatchShape", "batch_shape", "packed_shape",
           "round_capacity", "shape_from_counts"]

#: a graph whose capacity is too small is recaptured with at least this factor more rows
CAPACITY_GROWTH = 1.25
#: with the background compile (``cuda_graph_compile: background``) a capacity chosen from the
#: pairs seen (``pair_headroom``) gets this much more room, and is the batch bound outright when
#: that is at most :data:`BOUND_FRACTION` further: a compiled shape whose capacity grows later is
#: stale (its compile, ~100 s on an H100, wasted). ANI-1x on an H100 (2026-12-05 night, 3.5-min
#: race): of three shapes compiled after settling, two had grown meanwhile and never switched.
BACKGROUND_ROOM = 1.25
BOUND_FRACTION = 1.5
#: with the background compile, a shape whose compile at its present capacity is running or done
#: keeps that capacity: no growth ahead of a batch (the prediction, most pairs / bound seen x the
#: batch's bound, is pessimistic), none after an overflow (the overflowed step is skipped on the
#: device and redone eagerly when it is the latest). Why (2026-12-06, bench/sim_capacity.py on
#: ani1x-large's 7320 training structures, 70 epochs): the capacity was capped by the largest
#: bound *seen so far* of the bucket (0.96 of a bound is within 5 A: the room rule made it the
#: bound), so every rarer batch with a larger bound grew it (272-atom bucket 2688 -> 2752 ->
#: 3008 pairs, steps 103 and 1564; 336: 3520 -> 3968, step 1133; 296: 3328 -> 3456, step 5932),
#: after the compiles had started (steps 61-328): all three went stale (12% of steps compiled).
#: The pairs themselves never needed it: the most pairs of 28 119 sampled 272-atom batches are
#: 2610 (bound up to 2962). Held, no request goes stale (tests/test_train_graph_policy.py).
HOLD_REQUESTED = True
#: the hold is released (capacities grow again, those compiles go stale) once more than this
#: fraction of the replays, and at least HOLD_MIN_SKIPPED steps, overflowed: the held capacity was
#: chosen from too few batches for this data (simulated ani1x-large, 4 seeds: 1 to 29 of 16 030
#: steps overflowed, 0.01-0.18%)
HOLD_SKIP_FRACTION = 0.01
HOLD_MIN_SKIPPED = 10


class _ShapeGraph:
    """Static inputs, capacity and (once captured) the graph of one batch shape."""

    def __init__(self, key, inputs: dict, capacity: int, bound: int):
        self.key = key
        self.inputs = inputs
        self.capacity = capacity
        self.bound = bound  # largest pair bound of the batches seen with this shape
        self.max_pairs = 0  # most pairs found in its eager steps
        self.pair_ratio = 0.0  # most pairs / pair bound of its eager steps (predicts a batch's pairs)
        self.last_bound = 0  # the pair bound of the batch in its input buffers
        self.steps_at_capacity = 0  # steps run since its capacity last changed (background compile)
        self._counted_capacity = capacity
        self.eager_steps = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.outputs: Optional[StepOutputs] = None

    def count_step(self) -> None:
        """One more step of this shape; :attr:`steps_at_capacity` restarts when the capacity changed."""
        if self.capacity != self._counted_capacity:
            self._counted_capacity, self.steps_at_capacity = self.capacity, 0
        self.steps_at_capacity += 1


class GraphedTrainStep(CapturableStep):
    """Training steps of ``model`` with ``optimizer``, captured as CUDA graphs (module docstring).

    Args:
        model: a :class:`torchmdx.nn.Potential` (``model(z, pos, batch, neighbors=..., forces=...,
            create_graph=..., num_structures=...)``).
        optimizer: ``torch.optim.AdamW`` (or Adam) over the model's parameters; on CUDA its groups
            are switched to ``capturable=True``; with ``fused=True`` an overflowed step is skipped.
        objective: ``(energy [B], forces [N,3] or None, energy_ref [B], forces_ref or None,
            n_atoms [B]) -> (loss, energy_error, force_error or None)``.
        forces: train on forces (forces by autograd with ``create_graph=True``).
        clip_value, clip_algorithm: gradient clipping ("norm" or "value"; None: none).
        pair_headroom: None for the all-pairs capacity bound, else h >= 1 (see the module docstring).
        warmup_steps: eager steps of a new shape before it is captured (at least 1).
        max_shapes: most batch shapes with their own graph.
        traced: the captured step evaluates energies and forces through one traced, compiled
            graph (:class:`torchmdx.nn.traced.TracedForces` with ``training=True``: forward,
            forces and their parameter gradients as fused inductor kernels) instead of the
            model's eager autograd; the eager warm-up steps at other capacities stay eager.
            ``"background"``: the model's autograd until a child process has compiled a
            shape's traced graph into the compile cache, then the traced graph
            (:mod:`torchmdx.train.precompile`).
        capture: capture CUDA graphs on a GPU (False: the same step, eagerly, everywhere).
        error_sums: ``(energy_error, n_atoms, force_error, structure_weight, atom_weight) ->
            float64 vector``, accumulated in :attr:`sums` by every step (None: no sums).
        ema: the weight average updated after every step, ``{"averaged": [...], "current":
            [...], "averaged_buffers": [...], "buffers": [...], "num_averaged": tensor,
            "decay": float}`` (:func:`torchmdx.train.ema.ema_update`); None: no EMA here.
        distributed: DDP (module docstring, "Several processes"); None: when ``torch.distributed``
            is initialised with more than one rank. The objective then takes ``counts=`` (the
            global counts, :func:`torchmdx.train.objective.global_batch_objective`).
        group, host_group: the process group of the device collectives (None: the default) and a
            gloo group for the shape agreement (None: ``group`` if gloo, else a new one: every
            rank must construct the step at the same point).

    On a CPU model nothing is captured: :meth:`step` runs the same step eagerly (tests use this).
    """

    def __init__(self, model, optimizer, objective: Callable, *, forces: bool = True,
                 clip_value: Optional[float] = None, clip_algorithm: str = "norm",
                 pair_headroom: Optional[float] = None, warmup_steps: int = 2, max_shapes: int = 4,
                 traced: bool = False, capture: bool = True, error_sums: Optional[Callable] = None,
                 ema: Optional[dict] = None, distributed: Optional[bool] = None, group=None, host_group=None):
        if pair_headroom is not None and not pair_headroom >= 1.0:
            raise ValueError(f"pair_headroom must be >= 1 or None, got {pair_headroom}")
        if distributed is None:
            dist = torch.distributed
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
        if distributed and traced:
            # a cache miss of the background compile redoes the step (its collectives twice on one rank)
            raise ValueError("GraphedTrainStep: traced steps are not available under DDP (distributed=True)")
        self.model = model
        self.optimizer = optimizer
        self.objective = objective
        self.forces = bool(forces)
        self.clip_value = clip_value
        self.clip_algorithm = str(getattr(clip_algorithm, "value", clip_algorithm))
        self.pair_headroom = pair_headroom
        self.warmup_steps = max(1, int(warmup_steps))
        self.max_shapes = int(max_shapes)
        self.traced = None
        #: ``traced="background"``: the traced graphs are compiled by a child process
        #: (:mod:`torchmdx.train.precompile`) while the step runs the model's autograd; a shape
        #: switches to its traced graph once the child has filled the compile cache for it
        self.background = None
        if traced == "background":
            from torchmdx.train.precompile import BackgroundCompile

            self.background = BackgroundCompile(model)
        elif traced:
            from torchmdx.nn.traced import TracedForces

            self.traced = TracedForces(model, training=True)
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        self.device = self._params[0].device
        #: under DDP: the flat gradients, the collectives and the agreement of the batch shapes
        #: (:class:`~torchmdx.train.graphed_step.DistributedStep`; module docstring, "Several processes")
        self._dist: Optional[DistributedStep] = (DistributedStep(self._params, self.device, group, host_group)
                                                 if distributed else None)
        self.enabled = bool(capture) and self.device.type == "cuda" and torch.cuda.is_available()
        self.disabled_reason: Optional[str] = None if self.enabled else (
            f"the model is on {self.device.type}" if capture else "capture is off")
        self.error_sums = error_sums
        self.ema = ema
        #: the error sums of the steps since the last :meth:`take_sums` (float64, on the device;
        #: allocated here, outside any capture, so that the graphs add to this one tensor)
        self.sums: Optional[torch.Tensor] = None
        if error_sums is not None:
            from torchmdx.train.metrics import SUM_STATES

            self.sums = torch.zeros(len(SUM_STATES), dtype=torch.float64, device=self.device)
        self.notes: list[str] = []
        self.stats = {"captures": 0, "replays": 0, "eager_steps": 0, "redone": 0, "skipped": 0, "lost": 0}
        self._graphs: "OrderedDict[tuple, _ShapeGraph]" = OrderedDict()
        self._last: Optional[_ShapeGraph] = None
        self._bindings: Optional[list] = None
        self._binding_labels: list[str] = []
        self._skipped_seen = 0
        self._hold_off = False  # the capacity hold (HOLD_REQUESTED) released after too many overflows
        # status: [steps skipped by overflow (running count), latest step overflowed, most pairs seen]
        self.status = torch.zeros(3, dtype=torch.long, device=self.device)
        #: periodic batches with an unusable cell (allocated here, outside any capture)
        self.bad_cells = BadCells(self.device)
        self._lr: Optional[list[torch.Tensor]] = None
        self._lr_host: list[float] = []
        self.guarded = False
        if self.enabled:
            for group in optimizer.param_groups:
                group["capturable"] = True
            # eager warm-up steps of a capturable optimiser are intended here
            optimizer._warned_capturable_if_run_uncaptured = True
            self.guarded = all(bool(group.get("fused")) for group in optimizer.param_groups)
            self._lr_host = [float(group["lr"]) for group in optimizer.param_groups]
            self._lr = [torch.tensor(v, dtype=torch.float32, device=self.device) for v in self._lr_host]
            self._side = torch.cuda.Stream(self.device)

    # ------------------------------------------------------------------ decisions (host only)
    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            warnings.warn(f"cuda_graph: {text}", RuntimeWarning, stacklevel=3)

    def disable(self, reason: str) -> None:
        """Stop graphing for the rest of the run (graphs released); says so once."""
        if self.disabled_reason is None:
            self.disabled_reason = reason
            self._note(f"{reason}; training eagerly from here on")
        self.release()

    def accepts(self, shape: BatchShape) -> bool:
        """Will :meth:`step` take a batch of this shape (else the caller trains it eagerly)?"""
        if self.disabled_reason is not None:
            return False
        key = shape.key
        if key not in self._graphs and len(self._graphs) >= self.max_shapes:
            self.disable(f"more than {self.max_shapes} distinct batch shapes (atoms, structures)")
            return False
        return True

    def _graph_for(self, shape: BatchShape, given: dict) -> _ShapeGraph:
        key = shape.key
        graph = self._graphs.get(key)
        if graph is None or (self.enabled and self.disabled_reason is not None):
            inputs = {name: torch.empty_like(value) for name, value in given.items()}
            # capacity 0 with pair_headroom: chosen at capture from the pairs of the eager steps
            capacity = round_capacity(shape.pair_bound) if self.pair_headroom is None else 0
            graph = _ShapeGraph(key, inputs, capacity, shape.pair_bound)
            if self.enabled and self.disabled_reason is not None:
                return graph  # graphs are off: a one-off set of buffers
            self._graphs[key] = graph
        elif self.pair_headroom is None and shape.pair_bound > graph.capacity:
            # a batch of this shape with more possible pairs than the graph holds: larger capacity
            self._drop(graph, eager_steps=self.warmup_steps - 1)
            graph.capacity = round_capacity(max(shape.pair_bound, math.ceil(CAPACITY_GROWTH * graph.capacity)))
        graph.bound = max(graph.bound, shape.pair_bound)
        self._graphs.move_to_end(key)
        return graph

    @staticmethod
    def _drop(graph: _ShapeGraph, eager_steps: int) -> None:
        graph.graph, graph.outputs = None, None
        graph.eager_steps = min(graph.eager_steps, eager_steps)

    # ------------------------------------------------------------------ the step
    def step(self, z, pos, batch, energy, forces=None, shape: Optional[BatchShape] = None, *,
             n_atoms: Optional[torch.Tensor] = None, structure_weight: Optional[torch.Tensor] = None,
             atom_weight: Optional[torch.Tensor] = None, cell: Optional[torch.Tensor] = None,
             pbc: Optional[torch.Tensor] = None) -> StepOutputs:
        """One optimiser step on this batch (eager warm-up, capture + replay, or replay).

        z [N] long, pos [N, 3] (Å), batch [N] long (sorted), energy [B] (eV), forces [N, 3] (eV/Å,
        needed when training on forces); ``shape`` from :func:`batch_shape` (else computed here
        from ``batch``, one host read). A packed batch also gives ``n_atoms`` [B] and the padding
        weights ``structure_weight`` [B], ``atom_weight`` [N] (:func:`packed_shape` its shape).
        Periodic batches (``shape.periodic``) give ``cell`` [B, 3, 3] (Å) and ``pbc`` [B, 3]: the
        step rebuilds their geometry on the device (``cell_check="device"``), and a batch with an
        unusable cell changes nothing and is reported by :meth:`check`."""
        if self.forces and forces is None:
            raise ValueError("GraphedTrainStep(forces=True) needs reference forces")
        if shape is None:
            counts = torch.zeros(int(energy.shape[0]), dtype=torch.long, device=batch.device)
            counts.index_add_(0, batch, torch.ones_like(batch))
            shape = shape_from_counts(counts.tolist())
        given = {"z": z, "pos": pos, "batch": batch, "energy": energy.reshape(-1)}
        if self.forces:
            given["forces"] = forces
        if shape.periodic and (cell is None or pbc is None):
            raise ValueError("a periodic batch shape needs cell and pbc")
        if not shape.periodic:
            cell = pbc = None
        for name, value in (("n_atoms", n_atoms), ("structure_weight", structure_weight), ("atom_weight", atom_weight),
                            ("cell", cell), ("pbc", pbc)):
            if value is not None:
                given[name] = value
        if self.background is not None:
            self.background.poll_step(self)
        if self._dist is not None:
            self._dist.rebind_if_replaced()
            if self.enabled:
                # every rank: the same shape key and bound, so the same graphs, warm-up steps,
                # captures and capacities (NCCL: a captured collective is captured by all ranks
                # together and replayed by all together); more shapes than max_shapes switch
                # graphs off on every rank at once, and the steps stay through this runner
                shape = self._dist.agree(shape)
                self.accepts(shape)
        graph = self._graph_for(shape, given)
        inputs = graph.inputs
        if set(inputs) != set(given):
            raise ValueError(f"a batch with inputs {sorted(given)} for a graph of {sorted(inputs)}")
        for name, value in given.items():
            inputs[name].copy_(value)
        self._last = graph
        graph.last_bound = shape.pair_bound
        graph.count_step()
        if not self.enabled or self.disabled_reason is not None:
            # the graph's capacity without pair_headroom (the bound: the traced graph's shape),
            # else the exact list
            return self._eager(graph, graph.capacity or None, count_warmup=False)
        if graph.graph is not None:
            changed = self._changed_binding()
            if changed is not None:
                self._drop_all(f"{changed} changed since capture (replaced outside the graph)")
        if graph.graph is not None and self.pair_headroom is not None:
            self._grow_ahead(graph, shape)
        if graph.graph is None:
            if graph.eager_steps < self.warmup_steps:
                # pair_headroom: the exact list until the capacity is chosen from what it finds
                # (the all-pairs bound of a large structure would be mostly padding rows); without
                # it the bound is the graph's own capacity
                capacity = round_capacity(shape.pair_bound) if self.pair_headroom is None else None
                if (self.pair_headroom is not None and self.guarded and graph.max_pairs > 0
                        and graph.eager_steps == self.warmup_steps - 1):
                    # the last warm-up step runs with the graph's own capacity, so that the capture
                    # meets no tensor size the eager steps have not (an overflow here is redone)
                    self._choose_capacity(graph)
                    capacity = graph.capacity
                return self._eager(graph, capacity)
            self._choose_capacity(graph)
            try:
                self._capture(graph)
            except Exception as exc:  # noqa: BLE001 - any capture failure: say so once, train eagerly
                self.disable(f"capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})")
                return self._eager(graph, None, count_warmup=False)
        return self._replay(graph)

    def _replay(self, graph: _ShapeGraph) -> StepOutputs:
        self._sync_lr()
        graph.graph.replay()
        self.stats["replays"] += 1
        return graph.outputs

    def _eager(self, graph: _ShapeGraph, capacity: Optional[int], count_warmup: bool = True) -> StepOutputs:
        """The step without a graph, with a capacity that cannot overflow (the batch's bound), or
        the exact list (``capacity`` None: eager steps off the graph path, and warm-up steps
        before a ``pair_headroom`` capacity is chosen). On CUDA on a side stream, then one host
        read (the pair count, for ``pair_headroom``)."""
        self._sync_lr()
        traced = capacity == graph.capacity  # the capture's shape: compile the traced graph now
        if not self.enabled:
            outputs, _ = self._compute(graph.inputs, capacity, traced)
            self.stats["eager_steps"] += 1
            return outputs
        outputs, pairs = self._side_step(graph, capacity, traced)
        graph.max_pairs = max(graph.max_pairs, pairs)
        if graph.last_bound > 0:
            graph.pair_ratio = max(graph.pair_ratio, pairs / graph.last_bound)
        self.stats["eager_steps"] += 1
        if capacity is not None and pairs > capacity:
            # only a tight capacity (pair_headroom, guarded optimiser) can overflow: the step changed
            # nothing; choose the capacity again and redo the step with the batch's bound
            self._skipped_seen += 1
            self.stats["skipped"] += 1
            self.stats["redone"] += 1
            if not self._held(graph):
                graph.capacity = 0
            return self._eager(graph, None, count_warmup)
        if count_warmup:
            graph.eager_steps += 1
        return outputs

    def _side_step(self, graph: _ShapeGraph, capacity: Optional[int], traced: bool) -> tuple:
        """:meth:`_compute` on the side stream; returns (outputs, pairs found: one host read).
        (:class:`torchmdx.train.graphed_sim.SimulatedStep` replaces it, and the other device
        parts, to drive the host decisions on the CPU.)"""
        main = torch.cuda.current_stream(self.device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            outputs, num_pairs = self._compute(graph.inputs, capacity, traced)
        main.wait_stream(self._side)
        return outputs, int(num_pairs)

    def _grow_ahead(self, graph: _ShapeGraph, shape: BatchShape) -> None:
        """A batch whose predicted pairs (the largest pairs / bound ratio seen, times its bound: a
        host number, no device read) exceed the graph's capacity would overflow and be skipped:
        recapture with room for it first (one eager step on the exact list, then capture)."""
        expected = math.ceil(graph.pair_ratio * shape.pair_bound)
        if graph.pair_ratio <= 0 or expected <= graph.capacity or graph.capacity >= round_capacity(graph.bound):
            return
        if self._held(graph):
            # its compile is under way or done at this capacity: replay (a real overflow is skipped
            # on the device and redone by check()) rather than make that compile stale
            self.stats["held"] = self.stats.get("held", 0) + 1
            return
        self._drop(graph, eager_steps=self.warmup_steps - 1)
        graph.capacity = self._room(math.ceil(self.pair_headroom * expected), graph.bound)
        self.stats["grown_ahead"] = self.stats.get("grown_ahead", 0) + 1

    def _held(self, graph: _ShapeGraph) -> bool:
        """Does this shape keep its capacity (:data:`HOLD_REQUESTED`: its background compile at
        this capacity is running or done)?"""
        return (HOLD_REQUESTED and not self._hold_off and self.background is not None and graph.capacity > 0
                and self.background.holds(graph.key, graph.capacity))

    def _choose_capacity(self, graph: _ShapeGraph) -> None:
        if graph.capacity == 0:  # pair_headroom: h x the most pairs of the eager steps, at most the bound
            graph.capacity = self._room(math.ceil(self.pair_headroom * max(graph.max_pairs, 1)), graph.bound)

    def _room(self, pairs: int, bound: int) -> int:
        """The capacity for ``pairs`` expected pairs, at most the bound (both rounded); with the
        background compile :data:`BACKGROUND_ROOM` more, and the bound itself when it is within
        :data:`BOUND_FRACTION` (then the capacity can never grow)."""
        if self.background is not None:
            pairs = math.ceil(BACKGROUND_ROOM * pairs)
            if bound <= BOUND_FRACTION * pairs:
                pairs = bound
        return min(round_capacity(pairs), round_capacity(bound))

    def _capture(self, graph: _ShapeGraph) -> None:
        self._sync_lr()
        if self._dist is not None:
            torch.cuda.synchronize(self.device)  # no earlier collective still in flight during the capture
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            outputs, _ = self._compute(graph.inputs, graph.capacity, traced=True)
        graph.graph, graph.outputs = cuda_graph, outputs
        self._binding_labels = []
        self._bindings = self._current_bindings(self._binding_labels)
        self.stats["captures"] += 1

    def _drop_all(self, reason: str) -> None:
        self._note(f"{reason}: recapturing")
        for graph in self._graphs.values():
            self._drop(graph, eager_steps=self.warmup_steps - 1)

    # ------------------------------------------------------------------ check points
    def check(self) -> dict:
        """Read :attr:`status` (one host read): stop with one line if a periodic batch had an
        unusable cell; if steps overflowed their neighbor capacity since the last check, grow the
        capacities, redo the latest step when it was one of them, and say how many were skipped
        without a redo. Returns :attr:`stats`."""
        parts = [self.status, self.bad_cells.state] + ([self._dist.bad_steps.reshape(1)] if self._dist else [])
        values = torch.cat(parts).tolist()
        if values[3] > 0:
            from torchmdx.errors import TrainingError

            what = self.bad_cells.describe(values[4], self.model.cutoff, "a periodic training structure")
            raise TrainingError(f"{what}; {values[3]} step(s) with such a structure changed nothing "
                                f"(check the data's cells: torchmdx data info)")
        if self._dist is not None and values[5] > 0:  # every rank stops, the one with the cell says which
            from torchmdx.errors import TrainingError

            raise TrainingError(f"a periodic training structure of another DDP rank has an unusable cell (that rank "
                                f"names it); {values[5]} step(s) changed nothing (check the data's cells: "
                                f"torchmdx data info)")
        if not self.enabled:
            return dict(self.stats)
        skipped, latest, most_pairs = values[:3]
        new = skipped - self._skipped_seen
        if new <= 0:
            return dict(self.stats)
        self._skipped_seen = skipped
        self.stats["skipped"] += new
        if (self.background is not None and not self._hold_off and self.stats["skipped"] >= HOLD_MIN_SKIPPED
                and self.stats["skipped"] > HOLD_SKIP_FRACTION * max(self.stats["replays"], 1)):
            # held capacities too small for this data: grow them (their compiles go stale)
            self._hold_off = True
            self._note(f"{self.stats['skipped']} of {self.stats['replays']} steps overflowed the neighbor capacity; "
                       f"capacities of background-compiled shapes may grow again")
        headroom = self.pair_headroom or 1.0
        needed = round_capacity(math.ceil(headroom * most_pairs))
        for graph in self._graphs.values():
            ceiling = round_capacity(graph.bound)
            target = min(needed, ceiling)
            if 0 < graph.capacity < target and not self._held(graph):
                self._drop(graph, eager_steps=self.warmup_steps - 1)
                grown = round_capacity(math.ceil(CAPACITY_GROWTH * graph.capacity))
                graph.capacity = min(max(target, grown), ceiling)
        redone = 0
        if latest and self._last is not None and self._last.key in self._graphs and self.guarded:
            self._eager(self._last, None, count_warmup=False)
            self.status[1].zero_()
            redone = 1
            self.stats["redone"] += 1
        lost = new - redone
        if lost > 0:
            self.stats["lost"] += lost
            what = "skipped (weights unchanged)" if self.guarded else "trained on a truncated neighbor list"
            self._note(f"{lost} step(s) overflowed the neighbor capacity and were {what}; capacity grown to {needed} pairs")
        return dict(self.stats)

    def take_sums(self) -> Optional[torch.Tensor]:
        """The error sums accumulated since the last call (a copy; the accumulator restarts at 0)."""
        from torchmdx.train.metrics import take_sums

        return take_sums(self.sums)

    def release(self) -> None:
        """Drop every captured graph and static buffer (their GPU memory goes back to the allocator);
        a background compile still running is ended (what it compiled stays in the cache)."""
        if self.background is not None:
            self.background.stop()
        self._graphs.clear()
        self._last = None
        self._bindings = None
