"""``StepRunnerMixin``: the step-runner wiring of :class:`torchmdx.train.module.PotentialModule`.

:mod:`torchmdx.train.module` is the Lightning module proper (model, objective, metrics, the eager
steps, optimiser, schedule, logging, checkpoints); this mixin, which ``PotentialModule`` inherits,
holds what routes training and validation batches through a step runner instead
(docs/training.md, "CUDA-graph training step"):

- the setup of the training step runner, :class:`torchmdx.train.graphed.GraphedTrainStep`
  (``on_train_start``: the capturable optimiser, captured on a GPU with ``train.cuda_graph``;
  :meth:`_step_runner`, with the weight EMA and the error sums inside the step), its statistics
  and release at the end of training (``on_train_end``, ``cuda_graph_stats``);
- the per-batch decision (``on_before_batch_transfer``: the host shape of each CPU batch;
  ``on_train_batch_start``: graph or eager) and the runner's training steps, for CPU batches
  (:meth:`_graphed_training_step`) and packed ones (:meth:`_packed_training_step`, eager on the
  CPU), with what the EMA callback and the log are told afterwards;
- the runner of packed validation batches, :class:`torchmdx.train.graphed_eval.GraphedEvalStep`;
- the optimiser hooks' graph branches (the replay holds backward, clipping and the AdamW step;
  the graphs' gradient tensors are kept);
- under DDP: DDP's reducer switched off (the runner all-reduces the gradients itself) and the
  stand-in loss Lightning wants from ``training_step``.

Where a Lightning hook does both (``__init__``, ``training_step``, ``validation_step``,
``optimizer_step``, ``configure_optimizers``, the epoch ends, ``on_train_batch_end``), the hook
stays in :mod:`torchmdx.train.module` and calls a helper here. The mixin uses the host's
``train_config``, ``model``, ``trainer``, ``log``, ``_track_finite`` and the LightningModule
hooks it extends through ``super()``.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from typing import Optional

import torch

from torchmdx.data.packing import PackedBatch
from torchmdx.train.objective import global_batch_objective, train_error_sums, training_objective

# StepRunnerMixin.on_before_batch_transfer (the host shape of each CPU batch, for CUDA graphs) is
# the only such hook (the data module has none): Lightning's note that a data module was passed
# too says nothing
warnings.filterwarnings("ignore", message=r"You have overridden `on_before_batch_transfer` in `LightningModule` but")


class RunTimeLeft:
    """Seconds a Lightning training run has left (None while not known), for the background
    compile's pay-off rule (:attr:`torchmdx.train.precompile.BackgroundCompile.time_left`): the
    smaller of ``max_time``'s remainder (Lightning's ``Timer`` callback) and the optimiser steps
    left (``trainer.estimated_stepping_batches`` - ``global_step``: ``max_steps``, or ``max_epochs``
    x batches per epoch) times the seconds per step measured since the first call (validation
    included), once :attr:`MIN_STEPS` steps have been timed. Early stopping is not foreseen."""

    MIN_STEPS = 20

    def __init__(self, trainer, clock=time.monotonic):
        self.trainer, self.clock = trainer, clock
        self._start: Optional[tuple] = None  # (time, global step) of the first call
        self._total: Optional[float] = None  # the run's optimiser steps, once read

    def _timer_left(self) -> Optional[float]:
        from lightning.pytorch.callbacks import Timer

        for callback in self.trainer.callbacks:
            if isinstance(callback, Timer):
                return callback.time_remaining()
        return None

    def _steps_total(self) -> float:
        if self._total is None:
            try:
                self._total = float(self.trainer.estimated_stepping_batches)
            except Exception:  # noqa: BLE001 - Lightning cannot tell (no loader length): not known
                self._total = math.inf
        return self._total

    def __call__(self) -> Optional[float]:
        now, step = self.clock(), int(self.trainer.global_step)
        if self._start is None:
            self._start = (now, step)
        timer = self._timer_left()
        known = [] if timer is None else [timer]
        (t0, s0), total = self._start, self._steps_total()
        if math.isfinite(total) and total > 0 and step - s0 >= self.MIN_STEPS and now > t0:
            known.append(max(0.0, total - step) * (now - t0) / (step - s0))
        return min(known) if known else None


class StepRunnerMixin:
    """The step-runner half of :class:`~torchmdx.train.module.PotentialModule` (see the module
    docstring); listed before ``LightningModule`` in its bases, so that its hooks override."""

    def _init_step_runner(self) -> None:
        """The runner's state before training (called by ``__init__``)."""
        # CUDA-graph training (set up in on_train_start): the runner, whether the current batch
        # goes through it, and its counters after training (captures, replays, eager steps, ...)
        self._graph_step = None
        self._graphed_batch = False
        self._eval_runner = None  # packed validation batches (on_validation_epoch_end reads its sums)
        self.cuda_graph_stats: dict | None = None

    # ------------------------------------------------------------------ training steps
    def _graphed_training_step(self, batch) -> None:
        """The whole optimiser step by :class:`~torchmdx.train.graphed.GraphedTrainStep`; returns
        None, so Lightning's closure runs no backward (the graph did it)."""
        from torchmdx.train.graphed import batch_shape

        cfg = self.train_config
        forces = getattr(batch, "forces", None)
        if cfg.train_forces and forces is None:
            from torchmdx.errors import DataError

            raise DataError("train.force_weight > 0 but the training data have no forces; set train.force_weight: 0")
        shape = batch_shape(batch)
        out = self._graph_step.step(batch.z, batch.pos, batch.batch, batch.energy.reshape(-1),
                                    forces if cfg.train_forces else None, shape=shape,
                                    cell=getattr(batch, "cell", None), pbc=getattr(batch, "pbc", None))
        self._after_runner_step(out, int(batch.num_graphs))
        return self._runner_result(out)

    def _packed_training_step(self, batch: PackedBatch) -> None:
        """A padded batch (:mod:`torchmdx.data.packing`): through the step runner, captured on a
        GPU with ``train.cuda_graph`` and eager otherwise (on the CPU, or with graphs off)."""
        cfg = self.train_config
        if cfg.train_forces and batch.forces is None:
            from torchmdx.errors import DataError

            raise DataError("train.force_weight > 0 but the training data have no forces; set train.force_weight: 0")
        if self._graph_step is None:
            self._graph_step = self._step_runner(capture=False)
            self._ddp_reducer(on=False)
        from torchmdx.train.graphed import packed_shape

        out = self._graph_step.step(batch.z, batch.pos, batch.batch, batch.energy, batch.forces if cfg.train_forces else None,
                                    shape=packed_shape(batch), n_atoms=batch.n_atoms,
                                    structure_weight=batch.structure_weight, atom_weight=batch.atom_weight,
                                    cell=batch.cell, pbc=batch.pbc)
        self._after_runner_step(out, batch.num_graphs)
        return self._runner_result(out)

    def _runner_result(self, out):
        """What training_step returns after the step runner's step: None (Lightning's closure then
        runs no backward; the runner did it). Under DDP Lightning refuses None, so a stand-in:
        a fresh leaf holding the loss, whose backward reaches no parameter."""
        if self.trainer.world_size <= 1:
            return None
        return out.loss.detach().clone().requires_grad_(True)

    def _ddp_reducer(self, on: bool) -> None:
        """Off (``on`` False): under DDP the step runner reduces the gradients itself (one
        all-reduce inside its step, :mod:`torchmdx.train.graphed`): DDP's reducer must not, or they
        would be reduced twice. ``require_backward_grad_sync = False`` is what
        ``DistributedDataParallel.no_sync()`` sets: its forward then arms no reducer hooks, so the
        runner's backward fires none. On: back for anything after training."""
        trainer = self._trainer
        if trainer is None or (not on and trainer.world_size <= 1):
            return
        wrapped = getattr(trainer.strategy, "model", None)
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            wrapped.require_backward_grad_sync = on

    def _after_runner_step(self, out, batch_size: int) -> None:
        """The step runner did the optimiser step, the EMA and the error sums: tell the EMA
        callback, and log the loss at the logging points only (a copy: the graph overwrites its
        loss tensor at the next step; reading it every step would wait for the GPU each time)."""
        if self._graph_step.ema is not None and self._ema_callback is not None:
            self._ema_callback.updated_elsewhere()
        self._track_finite(out.loss)
        every = max(1, int(getattr(self.trainer, "log_every_n_steps", 50) or 50))
        if self.trainer.global_step % every == 0:
            self.log("train_loss_step", out.loss.clone(), on_step=True, on_epoch=False, prog_bar=True,
                     batch_size=batch_size)

    def _check_runner(self) -> None:
        """At the logging points: one host read of the runner's counters (graphed batches only)."""
        graph_step = self._graph_step
        if graph_step is not None and self._graphed_batch:
            graph_step.check()

    def _runner_train_sums(self):
        """The training epoch's error sums kept by the step runner (None without one), after its
        check; called at the epoch's end."""
        if self._graph_step is None:
            return None
        self._graph_step.check()
        return self._graph_step.take_sums()

    # ------------------------------------------------------------------ validation
    def _eval_step_runner(self):
        """The :class:`~torchmdx.train.graphed_eval.GraphedEvalStep` of packed validation batches."""
        if self._eval_runner is None:
            from torchmdx.train.graphed_eval import GraphedEvalStep

            cfg = self.train_config
            self._eval_runner = GraphedEvalStep(self.model, functools.partial(train_error_sums, cfg),
                                                capture=self._cuda_graph_mode())
        return self._eval_runner

    def _runner_val_sums(self):
        """The validation epoch's error sums of packed batches (None without any)."""
        if self._eval_runner is None:
            return None
        return self._eval_runner.take_sums()

    # ------------------------------------------------------------------ optimiser hooks
    def _runner_optimizer_step(self, optimizer, optimizer_closure) -> None:
        """The step after the learning rate is set: a graphed batch's replay (in the closure's
        ``training_step``) holds backward, clipping and the AdamW step; otherwise the optimiser's."""
        if self._graphed_batch:
            # training_step replays the graph, which holds backward, clipping and the AdamW step
            optimizer_closure()
            return
        optimizer.step(closure=optimizer_closure)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        if self._graph_step is None:
            optimizer.zero_grad()
        elif not self._graphed_batch:
            # an eager batch of a graphed run: keep the gradient tensors the graphs write to
            optimizer.zero_grad(set_to_none=False)

    def on_validation_model_zero_grad(self):
        # Lightning sets the gradients to None before validating; the graphs write to (and zero)
        # their gradient tensors themselves, so keep those
        if self._graph_step is None:
            super().on_validation_model_zero_grad()

    # ------------------------------------------------------------------ CUDA graph
    def _cuda_graph_mode(self) -> bool:
        """Train through CUDA graphs: ``train.cuda_graph`` and a CUDA device (one process)."""
        cfg = self.train_config
        if not cfg.cuda_graph or self.device.type != "cuda":
            return False
        if cfg.cuda_graph == "auto" and not self.model.captured_training_auto:
            return False  # auto captures only architectures checked on a GPU (resolve_cuda_graph)
        trainer = self._trainer
        if trainer is not None:
            from torchmdx.errors import ConfigError

            if cfg.cuda_graph == "auto" and (trainer.world_size > 1 or trainer.accumulate_grad_batches > 1):
                return False  # auto: on only where it can be (torchmdx.train.config.resolve_cuda_graph)
            if trainer.world_size > 1 and trainer.num_nodes > 1:
                raise ConfigError(f"config key 'train.cuda_graph' under DDP needs one node; this run has "
                                  f"{trainer.num_nodes} (set trainer.num_nodes: 1 or train.cuda_graph: false)")
            if trainer.world_size > 1 and cfg.train_stress:
                raise ConfigError("config key 'train.cuda_graph' under DDP cannot train on stress (train.stress_weight "
                                  "> 0: the captured step has no stress term, and every rank's steps must go through "
                                  "it); set train.cuda_graph: false or train.stress_weight: 0")
            if trainer.accumulate_grad_batches > 1:
                raise ConfigError("config key 'train.cuda_graph' cannot be combined with trainer.accumulate_grad_batches > 1 "
                                  "(the graph applies the optimiser step at every batch)")
        return True

    def on_train_start(self):
        self._graph_step, self._graphed_batch = None, False
        cfg = self.train_config
        optimizers = self.trainer.optimizers
        if optimizers and self.device.type != "cuda":
            # a resumed CUDA-graph run's checkpoint carries capturable/fused groups: not on the CPU
            for group in optimizers[0].param_groups:
                if group.get("capturable") or group.get("fused"):
                    group.update(capturable=False, fused=None)
        if not cfg.cuda_graph:
            return
        if not self._cuda_graph_mode():
            if cfg.cuda_graph == "auto":
                return  # auto: eager where graphs cannot run, without a note
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"train.cuda_graph: the model is on {self.device.type}; CUDA graphs need a GPU, "
                           "training eagerly")
            return
        optimizer = self.trainer.optimizers[0]
        for group in optimizer.param_groups:  # a resumed run may have saved other flags
            group.update(fused=True, capturable=True, foreach=None)
        for state in optimizer.state.values():
            step = state.get("step")
            if torch.is_tensor(step) and step.device != self.device:
                state["step"] = step.to(device=self.device, dtype=torch.float32)
        self._graph_step = self._step_runner(capture=True)
        self._ddp_reducer(on=False)

    def _step_runner(self, capture: bool):
        """The :class:`~torchmdx.train.graphed.GraphedTrainStep` of this run: optimiser step,
        weight EMA and error sums in one (captured when ``capture`` and on a GPU)."""
        from torchmdx.train.graphed import GraphedTrainStep

        cfg = self.train_config
        optimizer = self.trainer.optimizers[0]
        ema = None
        callback = self._ema_callback
        averaged = callback.average_model if callback is not None else None
        if averaged is not None and averaged.n_averaged.device == self.device:
            ema = {"averaged": list(averaged.parameters()), "current": list(self.parameters()),
                   "averaged_buffers": list(averaged.module.buffers()), "buffers": list(self.buffers()),
                   "num_averaged": averaged.n_averaged, "decay": callback.decay}
        energy_sums = cfg.energy_weight > 0  # force-only: training energies carry arbitrary offsets

        def error_sums(energy_error, n_atoms, force_error, structure_weight, atom_weight):
            return train_error_sums(cfg, energy_error if energy_sums else None, n_atoms, force_error,
                                    structure_weight, atom_weight)

        buckets = getattr(getattr(self.trainer, "datamodule", None), "training_buckets", None) or []
        world = int(self.trainer.world_size)
        traced = (cfg.cuda_graph_compile if capture and cfg.cuda_graph_compile and getattr(self.model, "traceable", False)
                  else False)
        max_shapes = max(4, len(buckets) + 1)
        objective = functools.partial(training_objective, cfg)
        if world > 1:
            # DDP: the runner all-reduces the gradients itself; the loss is normalised by the global
            # batch's counts (reduced inside the step), graphs are kept per combination of the ranks'
            # shapes, and the compiled (traced) step is not available
            objective = functools.partial(global_batch_objective, cfg)
            max_shapes *= world
            if traced:
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(f"train.cuda_graph_compile: {str(cfg.cuda_graph_compile).lower()} is not available under "
                               "DDP; the captured step uses the model's autograd")
                traced = False
        step = GraphedTrainStep(
            self.model, optimizer, objective, forces=cfg.train_forces,
            clip_value=self.trainer.gradient_clip_val, clip_algorithm=self.trainer.gradient_clip_algorithm or "norm",
            pair_headroom=cfg.cuda_graph_pair_headroom, traced=traced,
            capture=capture, error_sums=error_sums, ema=ema, max_shapes=max_shapes, distributed=world > 1,
        )
        if step.background is not None:  # compile and switch only where the run's time left repays it
            step.background.time_left = RunTimeLeft(self.trainer)
        return step

    @property
    def _ema_callback(self):
        """The run's :class:`~torchmdx.train.ema.EMA` callback (None without one)."""
        from torchmdx.train.ema import EMA

        trainer = self._trainer
        for callback in (trainer.callbacks if trainer is not None else []):
            if isinstance(callback, EMA):
                return callback
        return None

    def on_train_end(self):
        if self._graph_step is not None:
            self.cuda_graph_stats = self._graph_step.check()
            self.cuda_graph_stats["notes"] = list(self._graph_step.notes)
            self._graph_step.release()
        if self._eval_runner is not None:
            self.cuda_graph_stats = {**(self.cuda_graph_stats or {}), "validation": dict(self._eval_runner.stats)}
            self._eval_runner.release()
        self._graph_step, self._graphed_batch, self._eval_runner = None, False, None
        self._ddp_reducer(on=True)

    def on_before_batch_transfer(self, batch, dataloader_idx):
        if (self._graph_step is not None and self.trainer.training and hasattr(batch, "pos")
                and not isinstance(batch, PackedBatch)):
            from torchmdx.train.graphed import batch_shape

            batch_shape(batch)  # host description of the CPU batch, remembered on it (no device read)
        return batch

    def on_train_batch_start(self, batch, batch_idx):
        self._graphed_batch = isinstance(batch, PackedBatch)  # always through the step runner
        if self._graph_step is not None and not self._graphed_batch:
            from torchmdx.train.graphed import batch_shape

            # the captured step has no stress term: batches with a stress target train eagerly
            stress_target = self.train_config.train_stress and getattr(batch, "stress", None) is not None
            if self.trainer.world_size > 1:
                # DDP: every rank's every batch through the runner (its collectives must match);
                # it agrees on the shapes with the other ranks and steps eagerly where graphs are off
                self._graphed_batch = True
            else:
                self._graphed_batch = not stress_target and self._graph_step.accepts(batch_shape(batch))
