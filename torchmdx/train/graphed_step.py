"""The step a :class:`torchmdx.train.graphed.GraphedTrainStep` captures, and what a capture binds.

:class:`CapturableStep` is mixed into :class:`~torchmdx.train.graphed.GraphedTrainStep` (it uses
the step's model, optimiser, objective, clipping, learning-rate tensors, EMA, error sums and
status tensors): the step itself (zero the gradients, neighbor list at a fixed capacity, forces,
objective, backward, clipping, the fused AdamW step skipped on overflow or an unusable cell, EMA
and error sums; "What one replay does" in :mod:`torchmdx.train.graphed`), the device copy of the
learning rate, and the record of every tensor and hyper-parameter a captured graph binds by
address (checked before each replay). :class:`StepOutputs` is what one step returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from torchmdx.kernels.neighbors import neighbor_list

__all__ = ["StepOutputs", "CapturableStep", "DistributedStep"]

_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_HYPER = ("betas", "eps", "weight_decay", "amsgrad", "maximize", "fused", "capturable")


@dataclass
class StepOutputs:
    """What one training step returns (static tensors while graphed: valid until the next step).

    loss 0-d; energy_error [B] (eV, predicted - reference); force_error [N, 3] (eV/Å) or None;
    n_atoms [B] long; overflow 0-d bool (the neighbor list lost pairs: the step was skipped)."""

    loss: torch.Tensor
    energy_error: torch.Tensor
    force_error: Optional[torch.Tensor]
    n_atoms: torch.Tensor
    overflow: torch.Tensor


class DistributedStep:
    """What one training step needs under DDP (``torch.distributed`` initialised, several ranks),
    see "Several processes (DDP)" in :mod:`torchmdx.train.graphed`:

    - the gradients live in one flat buffer per dtype (every parameter's ``.grad`` a view of it,
      made here, before any step or capture: never None, so the buffer has one size on every
      rank), all-reduced (sum, then / W) by one collective after the backward;
    - :meth:`reduce_flags`: one all-reduce (sum) of a small float64 vector before the forward:
      the objective's counts (:func:`torchmdx.train.objective.objective_counts`), the skip flags
      (neighbor overflow, unusable cell: max as sum > 0) and every rank's pair count (its own slot);
    - :meth:`agree`: every rank's batch shape (host integers, one all-gather over a gloo group,
      no device read), so that every rank keeps the same graphs and takes the same decisions.

    ``group``: the process group of the device collectives (None: the default group);
    ``host_group``: a gloo group for :meth:`agree` (None: ``group`` if it is gloo, else a new
    gloo group over its ranks: every rank must construct this at the same point)."""

    def __init__(self, params: list, device: torch.device, group=None, host_group=None):
        dist = torch.distributed
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if host_group is None:
            if dist.get_backend(group) == "gloo":
                host_group = group
            else:
                ranks = None if group is None else dist.get_process_group_ranks(group)
                host_group = dist.new_group(ranks=ranks, backend="gloo")
        self.host_group = host_group
        self.device = device
        self.params = [p for p in params if p.requires_grad]
        # this rank's slot of the pair counts (made here: a capture may not copy from the host)
        self.slot = torch.zeros(self.world, dtype=torch.float64, device=device)
        self.slot[self.rank] = 1.0
        #: steps in which some rank met an unusable cell (device; read by check())
        self.bad_steps = torch.zeros((), dtype=torch.long, device=device)
        self.flats: list[torch.Tensor] = []
        self.views: list[torch.Tensor] = []
        self.bind()

    def bind(self) -> None:
        """Make every parameter's gradient a view of one flat buffer per dtype (values kept)."""
        by_dtype: dict = {}
        for p in self.params:
            if not p.is_contiguous():
                raise ValueError("the DDP training step needs contiguous parameters (their gradients are views "
                                 "of one flat buffer)")
            by_dtype.setdefault(p.dtype, []).append(p)
        self.flats, views = [], {}
        for dtype, params in by_dtype.items():
            flat = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=self.device)
            offset = 0
            for p in params:
                view = flat[offset:offset + p.numel()].view_as(p)
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view
                views[id(p)] = view
                offset += p.numel()
            self.flats.append(flat)
        self.views = [views[id(p)] for p in self.params]

    def rebind_if_replaced(self) -> bool:
        """Bind again if a gradient was replaced outside the step (``zero_grad(set_to_none=True)``,
        ...); True if so (the captured graphs then see a changed binding and recapture)."""
        if all(p.grad is v for p, v in zip(self.params, self.views)):
            return False
        self.bind()
        return True

    def agree(self, shape):
        """``shape`` (this rank's :class:`~torchmdx.train.graphed_common.BatchShape`) made the
        same on every rank: ``ranks`` every rank's (atoms, structures, periodic), ``pair_bound``
        the largest. One all-gather of four host integers per rank (gloo)."""
        import dataclasses

        mine = torch.tensor([shape.atoms, shape.structures, shape.pair_bound, int(shape.periodic)], dtype=torch.long)
        rows = [torch.empty_like(mine) for _ in range(self.world)]
        torch.distributed.all_gather(rows, mine, group=self.host_group)
        rows = [row.tolist() for row in rows]
        return dataclasses.replace(shape, pair_bound=max(row[2] for row in rows),
                                   ranks=tuple((row[0], row[1], bool(row[3])) for row in rows))

    def reduce_flags(self, counts: torch.Tensor, overflow: torch.Tensor, bad: torch.Tensor, pairs: torch.Tensor):
        """One all-reduce (sum) of [counts (3), overflow, bad, pairs in this rank's slot (W)]:
        returns (global counts, overflow on some rank, bad cell on some rank, most pairs of a rank).
        Capturable (device kernels and one collective)."""
        f64 = torch.float64
        vector = torch.cat([counts.to(f64), overflow.to(f64).reshape(1), bad.to(f64).reshape(1),
                            self.slot * pairs.to(f64)])
        torch.distributed.all_reduce(vector, group=self.group)
        return vector[:3], vector[3] > 0, vector[4] > 0, vector[5:].max().long()

    def reduce_gradients(self) -> None:
        """Sum the flat gradients over the ranks and divide by W (DDP's mean): one collective per
        dtype (one for a model of one dtype)."""
        for flat in self.flats:
            torch.distributed.all_reduce(flat, group=self.group)
            flat.div_(self.world)


class CapturableStep:
    """The step function and capture bindings of :class:`~torchmdx.train.graphed.GraphedTrainStep`
    (module docstring)."""

    def _compute(self, inputs: dict, capacity: int, traced: bool = False):
        """The step itself (captured as is): see :mod:`torchmdx.train.graphed`. Returns (outputs, num_pairs).
        ``traced``: through :attr:`traced` (when set). Background compile: a shape's first traced
        call loads its graph from the cache, and a miss redoes the step on the model's autograd
        (:meth:`torchmdx.train.precompile.BackgroundCompile.step`)."""
        if self.background is None:
            return self._compute_step(inputs, capacity, traced)
        from torchmdx.train.precompile import CacheMiss

        try:
            with self.background.step():
                return self._compute_step(inputs, capacity, traced)
        except CacheMiss:
            return self._compute_step(inputs, capacity, traced=False)

    def _compute_step(self, inputs: dict, capacity: int, traced: bool = False):
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)
        pos, batch = inputs["pos"], inputs["batch"]
        cell, pbc = inputs.get("cell"), inputs.get("pbc")
        structures = inputs["energy"].shape[0]
        neighbors = neighbor_list(pos.detach(), self.model.cutoff, batch, cell, pbc, max_pairs=capacity,
                                  cell_check="device")
        joint = None
        if self._dist is not None:
            joint = self._reduce_flags(inputs, structures, neighbors, cell, pbc)
        out = None
        if traced and self.background is not None:
            traced = self.background.use(self, inputs["z"], pos, structures, neighbors, cell is not None)
        if traced and self.traced is not None:
            try:
                offsets = None
                if cell is not None:  # image offsets n_e @ cell of the receiver's structure (Å)
                    owner = cell.index_select(0, batch.index_select(0, neighbors.edge_index[0]))
                    offsets = torch.einsum("ek,ekl->el", neighbors.shifts, owner)
                energy, forces, _ = self.traced(inputs["z"], pos, batch, structures, neighbors.edge_index, offsets,
                                                neighbors.mask)
                out = {"energy": energy, "forces": forces}
            except Exception as exc:  # noqa: BLE001 - a graph that does not compile: say so once, go on
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise
                reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"
                if self.background is not None:  # that shape stays eager; the others keep their graphs
                    self.background.load_failed(reason)
                else:
                    self.traced = None
                    self._note(f"the traced model did not compile ({reason}); the step uses the model's autograd")
        if out is None:
            out = self.model(inputs["z"], pos, batch, cell, pbc, neighbors=neighbors, forces=self.forces,
                             create_graph=self.forces, num_structures=structures)
        n_atoms = inputs.get("n_atoms")
        if n_atoms is None:
            n_atoms = torch.zeros(structures, dtype=torch.long, device=pos.device).index_add_(0, batch, torch.ones_like(batch))
        weights = {name: inputs[name] for name in ("structure_weight", "atom_weight") if name in inputs}
        extra = {} if joint is None else {"counts": joint[0]}
        loss, energy_error, force_error = self.objective(out["energy"], out.get("forces"), inputs["energy"],
                                                         inputs.get("forces"), n_atoms, **weights, **extra)
        loss.backward()
        if joint is not None:
            self._dist.reduce_gradients()  # clipping and the optimiser see the global batch's gradient
        self._clip()
        overflow = neighbors.overflow.reshape(())
        cell_error = neighbors.cell_error
        if joint is not None:
            # every rank skips the steps in which some rank overflowed or met an unusable cell
            _, overflow, bad, _ = joint
            skip = overflow | bad
            self._dist.bad_steps.add_(bad.long())
        elif cell_error is not None:
            # an unusable cell: the step changes nothing (as an overflow), the first one is kept
            # for check(); the skip costs nothing (the fused optimiser's found_inf input)
            bad = self.bad_cells.record(cell_error, cell, pbc)
            overflow = overflow & ~bad
            skip = overflow | bad
        else:
            skip = overflow
        self._optimizer_step(skip)
        if self.ema is not None:
            from torchmdx.train.ema import ema_update

            ema = self.ema
            ema_update(ema["averaged"], ema["current"], ema["num_averaged"], ema["decay"], skip=skip,
                       averaged_buffers=ema.get("averaged_buffers"), buffers=ema.get("buffers"))
        if self.error_sums is not None:
            sums = self.error_sums(energy_error, n_atoms, force_error, weights.get("structure_weight"),
                                   weights.get("atom_weight"))
            self.sums.add_(torch.where(skip, torch.zeros_like(sums), sums))
        # under DDP the most pairs of any rank: capacities (host decisions) are the same on every rank
        found = neighbors.num_pairs.reshape(()).long() if joint is None else joint[3]
        flag = overflow.long()
        self.status.copy_(torch.stack([self.status[0] + flag, flag, torch.maximum(self.status[2], found)]))
        outputs = StepOutputs(loss.detach(), energy_error.detach(),
                              force_error.detach() if force_error is not None else None, n_atoms, skip)
        return outputs, found

    def _reduce_flags(self, inputs: dict, structures: int, neighbors, cell, pbc):
        """Under DDP, before the forward: this rank's objective counts, overflow and unusable-cell
        flags (its first such cell kept for check()) and pair count, reduced over the ranks
        (:meth:`DistributedStep.reduce_flags`)."""
        from torchmdx.train.objective import objective_counts

        overflow = neighbors.overflow.reshape(())
        bad = torch.zeros((), dtype=torch.bool, device=overflow.device)
        if neighbors.cell_error is not None:
            bad = self.bad_cells.record(neighbors.cell_error, cell, pbc)
            overflow = overflow & ~bad
        counts = objective_counts(structures, inputs["pos"].shape[0], self.forces, overflow.device,
                                  inputs.get("structure_weight"), inputs.get("atom_weight") if self.forces else None)
        return self._dist.reduce_flags(counts, overflow, bad, neighbors.num_pairs.reshape(()))

    def _clip(self) -> None:
        if self.clip_value is None or not self.clip_value > 0:
            return
        params = [p for p in self._params if p.grad is not None]
        if self.clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, self.clip_value)
        else:
            torch.nn.utils.clip_grad_norm_(params, self.clip_value)

    def _optimizer_step(self, overflow: torch.Tensor) -> None:
        if not self.guarded and self.device.type == "cpu" and bool(overflow):
            return  # no fused found_inf skip here; on the CPU the host read is free
        groups = self.optimizer.param_groups
        floats = [group["lr"] for group in groups]
        try:
            if self._lr is not None:
                for group, lr in zip(groups, self._lr):
                    group["lr"] = lr
            if self.guarded:
                # the fused kernel skips the whole update (weights, moments, step count) when set
                self.optimizer.found_inf = overflow.to(torch.float32)
            self.optimizer.step()
        finally:
            for group, value in zip(groups, floats):
                group["lr"] = value
            if "found_inf" in self.optimizer.__dict__:
                del self.optimizer.found_inf

    def _sync_lr(self) -> None:
        if self._lr is None:
            return
        for index, group in enumerate(self.optimizer.param_groups):
            value = float(group["lr"])
            if value != self._lr_host[index]:
                self._lr[index].fill_(value)
                self._lr_host[index] = value

    # ------------------------------------------------------------------ validity of captured graphs
    def _current_bindings(self, labels: Optional[list] = None) -> list:
        """Every tensor a captured step reads or writes by address, plus the fixed hyper-parameters
        (``labels``: filled with what each entry is)."""
        state = self.optimizer.state
        out: list = []
        for index, p in enumerate(self._params):
            out.append(p.data_ptr())
            out.append(p.grad)
            entry = state.get(p)
            keys = [key for key in _ADAM_STATE if entry and key in entry]
            out.extend(entry[key] for key in keys)
            if labels is not None:
                labels.extend([f"parameter {index}'s storage", f"parameter {index}'s gradient"]
                              + [f"parameter {index}'s optimiser state {key!r}" for key in keys])
        for index, group in enumerate(self.optimizer.param_groups):
            out.append(tuple(group.get(key) for key in _HYPER))
            if labels is not None:
                labels.append(f"parameter group {index}'s {'/'.join(_HYPER)}")
        return out

    def _changed_binding(self) -> Optional[str]:
        """What changed since the capture (None: nothing)."""
        now = self._current_bindings()
        bound = self._bindings
        if bound is None or len(now) != len(bound):
            return "the number of parameters or optimiser-state tensors"
        for index, (a, b) in enumerate(zip(now, bound)):
            if not (a is b or (not torch.is_tensor(a) and not torch.is_tensor(b) and a == b)):
                return self._binding_labels[index] if index < len(self._binding_labels) else f"entry {index}"
        return None
