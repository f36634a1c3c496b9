"""``PotentialModule``: the LightningModule that trains a :class:`~torchmdx.nn.Potential`.

Objective (eV, eV/Å, eV/Å³; see :class:`torchmdx.train.config.TrainConfig`)::

    loss = energy_weight · mean_b L(ΔE_b) + force_weight · mean_{a,k} L(ΔF_ak)
           + stress_weight · mean_{b,k,l} L(Δσ_bkl)

with forces F = −∂E/∂pos and stress σ = (1/V) ∂E/∂ε (strain ε) by autograd
(``create_graph=True`` during training, so the force and stress losses are differentiated
twice). Per epoch it logs for ``train`` and ``val`` (and ``test``): ``<stage>_loss`` (the
objective over the whole epoch), ``<stage>_energy_mae/_rmse`` (meV),
``<stage>_energy_per_atom_mae/_rmse`` (meV/atom), ``<stage>_forces_mae/_rmse`` (meV/Å),
``<stage>_stress_mae/_rmse`` (meV/Å³; data with a stress: validation and test always, training
when stress_weight > 0) and ``lr``; errors are exact over the epoch
(:class:`torchmdx.train.metrics.EpochErrors`).

Schedule: AdamW; the learning rate is set before every optimiser step from the step count
(linear warm-up, then cosine if chosen) and, for ``plateau``, reduced by a
``ReduceLROnPlateau`` stepped at the end of each validation (after the warm-up). The plateau
scheduler and the random-number generators are saved in the checkpoint, so ``--resume``
continues exactly where the run stopped.

CUDA graph (``train.cuda_graph: true`` on a GPU): each training step (neighbor list, forward,
forces, loss, backward, gradient clipping, AdamW step, weight EMA, error sums) is replayed as one
CUDA graph by :class:`torchmdx.train.graphed.GraphedTrainStep`; Lightning still drives the loop
(the ``optimizer_step`` hook replays the graph instead of calling ``optimizer.step``; the EMA
callback is told the step already averaged). Training batches come packed to a few fixed sizes
(:mod:`torchmdx.data.packing`), from the GPU when the split fits there, and validation batches
then replay graphs too (:class:`torchmdx.train.graphed_eval.GraphedEvalStep`); the epoch's error
sums are read once at its end. The stress term trains eagerly. Under DDP (``cuda_graph: true``,
several devices of one node) the captured step all-reduces the gradients itself, with the
objective normalised by the global batch; DDP's reducer is switched off and every batch of every
rank goes through the step runner (docs/training.md, "Under DDP"). On the CPU
the option is ignored with a note (``data.device_resident: true`` packs there anyway, eagerly:
the tests compare that path with the plain one). A loss that stays NaN or infinite stops the run
(``train.max_nonfinite_steps``).

Force-only training (``refit_atomref``): before every validation the per-element reference
energies are re-fitted by least squares (:mod:`torchmdx.train.refit`) so that the model's
energies match the training energies; forces do not see these constants, so this is what makes
a force-only model predict absolute energies. It runs on the validated (EMA) weights and the
result is kept in both weight sets and in the checkpoints.
"""

from __future__ import annotations

import functools
import math
import random
import warnings
from typing import Optional

import lightning as L
import numpy as np
import torch

from torchmdx.config import from_dict
from torchmdx.data.packing import PackedBatch
from torchmdx.train.config import TrainConfig
from torchmdx.train.metrics import EpochErrors, weighted_loss
from torchmdx.train.objective import (  # noqa: F401 - the objective's names, as before the split
    batch_counts,
    distributed_world,
    global_batch_objective,
    masked_stress_error,
    train_error_sums,
    training_objective,
)
from torchmdx.train.refit import (  # noqa: F401 - the refit's names, as before the split
    apply_reference_correction,
    fit_reference_correction,
    reference_normal_equations,
)

STAGES = ("train", "val", "test")


# PotentialModule.on_before_batch_transfer (the host shape of each CPU batch, for CUDA graphs) is
# the only such hook (the data module has none): Lightning's note that a data module was passed
# too says nothing
warnings.filterwarnings("ignore", message=r"You have overridden `on_before_batch_transfer` in `LightningModule` but")


def collect_rng_states() -> dict:
    """States of Python's, numpy's and torch's (CPU and CUDA) generators, as types that
    ``torch.load(weights_only=True)`` accepts (numpy's key array as a tensor)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(states["torch"].cpu() if torch.is_tensor(states["torch"]) else states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class PotentialModule(L.LightningModule):
    """Trains an ET potential on energies and/or forces (see the module docstring).

    Args:
        model: the ``model:`` section (ModelConfig keys) as a plain dict.
        train: the ``train:`` section (TrainConfig keys) as a plain dict.
        data: the ``data:`` section, kept in the checkpoint's hyper-parameters for reference.
        inference_batch_size: batch size of the atomic-reference refit.
    """

    def __init__(self, model: dict, train: Optional[dict] = None, data: Optional[dict] = None,
                 inference_batch_size: int = 64):
        super().__init__()
        from torchmdx.nn.model_file import build_model

        self.save_hyperparameters()
        self.train_config: TrainConfig = from_dict(TrainConfig, train or {}, "train")
        self.model = build_model(dict(model))  # model.architecture picks the Potential class
        cfg = self.train_config
        # ("train" cannot be a ModuleDict key: it is Module.train)
        self.errors = torch.nn.ModuleDict(
            {f"{stage}_errors": EpochErrors(cfg.loss, cfg.huber_delta, cfg.energy_loss) for stage in STAGES}
        )
        self._plateau = None
        self._plateau_state: Optional[dict] = None
        self._cosine_steps: Optional[int] = None
        # CUDA-graph training (set up in on_train_start): the runner, whether the current batch
        # goes through it, and its counters after training (captures, replays, eager steps, ...)
        self._graph_step = None
        self._graphed_batch = False
        self._eval_runner = None  # packed validation batches (on_validation_epoch_end reads its sums)
        self._nonfinite: Optional[torch.Tensor] = None  # [current, longest] run of non-finite losses
        self.cuda_graph_stats: Optional[dict] = None

    # ------------------------------------------------------------------ prediction and loss
    def forward(self, batch, forces: bool = True, create_graph: bool = False, stress: bool = False) -> dict:
        # num_graphs is a host int of the batch: the potential need not read B back from the device
        return self.model(batch.z, batch.pos, batch.batch, getattr(batch, "cell", None), getattr(batch, "pbc", None),
                          forces=forces, stress=stress, create_graph=create_graph,
                          num_structures=int(batch.num_graphs))

    def _step(self, batch, stage: str) -> torch.Tensor:
        cfg = self.train_config
        has_forces = getattr(batch, "forces", None) is not None
        has_stress = getattr(batch, "stress", None) is not None
        training = stage == "train"
        want_forces = has_forces and (cfg.train_forces or not training)
        want_stress = has_stress and (cfg.train_stress or not training)
        if training and cfg.train_forces and not has_forces:
            from torchmdx.errors import DataError

            raise DataError("train.force_weight > 0 but the training data have no forces; set train.force_weight: 0")
        if training and cfg.train_stress and not has_stress:
            from torchmdx.errors import DataError

            raise DataError("train.stress_weight > 0 but the training data have no stress (an ASE file's 'stress' "
                            "or 'virial' per structure, data.stress_key); set train.stress_weight: 0")
        out = self(batch, forces=want_forces, create_graph=training and (want_forces or want_stress),
                   stress=want_stress)
        n_atoms = batch_counts(batch)
        # DDP: normalise by the global batch's counts (global_batch_objective); one process: as always
        objective = global_batch_objective if training and distributed_world() > 1 else training_objective
        loss, energy_error, force_error = objective(
            cfg, out["energy"], out["forces"] if want_forces else None, batch.energy,
            batch.forces if want_forces else None, n_atoms,
            out["stress"] if want_stress else None, batch.stress if want_stress else None)
        stress_error = None
        if want_stress:
            error, known = masked_stress_error(out["stress"], batch.stress)
            stress_error = error[known]  # the components with a reference
        # force-only training: the training weights' energies carry arbitrary per-element offsets
        # (only the validated weights get re-fitted references), so no training energy errors
        logged_energy = None if (training and cfg.energy_weight == 0) else energy_error
        self.errors[f"{stage}_errors"].update(logged_energy, n_atoms, force_error, stress_error)
        return loss

    def training_step(self, batch, batch_idx):
        if self.train_config.augment != "none":
            # a random rotation (reflection) per structure, on the device, before any step
            # runner copies the batch (train.augment; torchmdx.train.augment)
            from torchmdx.train.augment import augment_batch

            batch = augment_batch(batch, self.train_config.augment)
        if isinstance(batch, PackedBatch):
            return self._packed_training_step(batch)
        if self._graphed_batch:
            return self._graphed_training_step(batch)
        loss = self._step(batch, "train")
        self._track_finite(loss)
        self.log("train_loss_step", loss.detach(), on_step=True, on_epoch=False, prog_bar=True,
                 batch_size=int(batch.num_graphs))
        return loss

    def _track_finite(self, loss: torch.Tensor) -> None:
        """Count consecutive steps with a NaN or infinite loss on the device (no host read):
        ``_nonfinite`` = [current run, longest run]."""
        if self.train_config.max_nonfinite_steps is None:
            return
        if self._nonfinite is None or self._nonfinite.device != loss.device:
            self._nonfinite = torch.zeros(2, dtype=torch.long, device=loss.device)
        run = torch.where(torch.isfinite(loss.detach()), torch.zeros_like(self._nonfinite[0]), self._nonfinite[0] + 1)
        self._nonfinite.copy_(torch.stack([run, torch.maximum(self._nonfinite[1], run)]))

    def _check_finite(self) -> None:
        """Stop the run with one line once the loss was not finite for ``max_nonfinite_steps``
        consecutive steps (one host read; called at the logging points and each epoch's end)."""
        limit = self.train_config.max_nonfinite_steps
        if limit is None or self._nonfinite is None:
            return
        _, longest = self._nonfinite.tolist()
        if longest >= limit:
            self._diverged(f"the loss was NaN or infinite for {longest} consecutive steps")

    def _diverged(self, what: str) -> None:
        """Raise the one-line TrainingError of a diverged run, with what to try."""
        from torchmdx.errors import TrainingError

        lr = self.train_config.lr
        clip = getattr(self.trainer, "gradient_clip_val", None)
        hint = "set trainer.gradient_clip_val" if not clip else f"a smaller trainer.gradient_clip_val (now {clip:g})"
        raise TrainingError(
            f"training diverged: {what} (by step {self.trainer.global_step}, epoch {self.trainer.current_epoch + 1}); "
            f"try a smaller train.lr (now {lr:g}), {hint}, or check the data (torchmdx data info); no model was exported")

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
            self._ddp_reducer_off()
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

    def _ddp_reducer_off(self) -> None:
        """Under DDP the step runner reduces the gradients itself (one all-reduce inside its step,
        :mod:`torchmdx.train.graphed`): DDP's reducer must not, or they would be reduced twice.
        ``require_backward_grad_sync = False`` is what ``DistributedDataParallel.no_sync()`` sets:
        its forward then arms no reducer hooks, so the runner's backward fires none."""
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return
        wrapped = getattr(trainer.strategy, "model", None)
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            wrapped.require_backward_grad_sync = False

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

    def validation_step(self, batch, batch_idx):
        if isinstance(batch, PackedBatch):
            self._eval_step_runner().step(batch)  # captured on a GPU; errors summed on the device
            return
        self._step(batch, "val")

    def _eval_step_runner(self):
        """The :class:`~torchmdx.train.graphed_eval.GraphedEvalStep` of packed validation batches."""
        if self._eval_runner is None:
            from torchmdx.train.graphed_eval import GraphedEvalStep

            cfg = self.train_config
            self._eval_runner = GraphedEvalStep(self.model, functools.partial(train_error_sums, cfg),
                                                capture=self._cuda_graph_mode())
        return self._eval_runner

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def _log_epoch(self, stage: str) -> Optional[dict]:
        metric = self.errors[f"{stage}_errors"]
        if metric.empty:
            metric.reset()
            return None
        values = metric.compute()
        metric.reset()
        cfg = self.train_config
        loss = weighted_loss(values, cfg.energy_weight, cfg.force_weight, cfg.stress_weight)
        logged = {}
        if loss is not None:
            logged[f"{stage}_loss"] = loss
        for key in ("energy_mae", "energy_rmse", "energy_per_atom_mae", "energy_per_atom_rmse", "forces_mae", "forces_rmse",
                    "stress_mae", "stress_rmse"):
            if key in values:
                logged[f"{stage}_{key}"] = values[key]
        for key, value in logged.items():
            shown = key in (f"{stage}_loss", f"{stage}_forces_mae", f"{stage}_energy_mae")
            self.log(key, value, prog_bar=shown and stage != "train", sync_dist=False)
        return logged

    def on_train_epoch_end(self):
        self._check_finite()
        if self._graph_step is not None:
            self._graph_step.check()
            sums = self._graph_step.take_sums()
            if sums is not None:
                self.errors["train_errors"].add_sums(sums)
        self._log_epoch("train")
        self.log("lr", self.optimizers().param_groups[0]["lr"] if self._trainer is not None else float("nan"))

    def on_validation_epoch_start(self):
        # callbacks run first: with EMA the averaged weights are in place now
        if self.train_config.refits_atomref:
            self._refit_atomref()

    def on_validation_epoch_end(self):
        if self._eval_runner is not None:
            sums = self._eval_runner.take_sums()
            if sums is not None:
                self.errors["val_errors"].add_sums(sums)
        logged = self._log_epoch("val")
        if self._refit_value is not None:
            # EMA has swapped the training weights back in (callbacks run first): keep the refit there too
            self.model.atomref.copy_(self._refit_value.to(self.model.atomref))
        if logged is None or self.trainer.sanity_checking:
            return
        loss = logged.get("val_loss")
        if self.train_config.max_nonfinite_steps is not None and loss is not None and not math.isfinite(loss):
            self._diverged(f"the validation loss is {loss}")
        if self._plateau is not None and self.global_step >= self.train_config.lr_warmup_steps:
            monitored = logged.get(self.train_config.monitor)
            if monitored is not None and math.isfinite(monitored):
                self._plateau.step(monitored)

    def on_test_epoch_end(self):
        self._log_epoch("test")

    _refit_value: Optional[torch.Tensor] = None

    def _refit_atomref(self) -> None:
        """Least-squares correction of the atomic references on the training split (this rank's
        share; normal equations summed over ranks)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or getattr(datamodule, "split", None) is None:
            return
        indices = np.asarray(datamodule.split["train"], dtype=np.int64)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        batch_size = int(self.hparams.get("inference_batch_size") or 64)
        normal, rhs = reference_normal_equations(self.model, datamodule.dataset, indices[rank::world], batch_size)
        if world > 1:
            normal = self.trainer.strategy.reduce(normal, reduce_op="sum")
            rhs = self.trainer.strategy.reduce(rhs, reduce_op="sum")
        if apply_reference_correction(self.model, normal, rhs):
            self._refit_value = self.model.atomref.detach().clone()

    # ------------------------------------------------------------------ optimiser and schedule
    def configure_optimizers(self):
        cfg = self.train_config
        graphed = self._cuda_graph_mode()
        # the graph needs a capturable optimiser; fused, so that an overflowed step can be skipped
        extra = {"fused": True, "capturable": True} if graphed else {}
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)
        if cfg.lr_warmup_steps > 0:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr / cfg.lr_warmup_steps
        self._plateau = None
        if cfg.lr_schedule == "plateau":
            self._plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience, min_lr=cfg.lr_min
            )
            if self._plateau_state is not None:
                self._plateau.load_state_dict(self._plateau_state)
        return optimizer

    def scheduled_lr(self, step: int) -> Optional[float]:
        """Learning rate for optimiser step ``step`` (0-based) from warm-up / cosine, or None
        when the optimiser's current value (plateau / constant after warm-up) applies."""
        cfg = self.train_config
        warmup = cfg.lr_warmup_steps
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        if cfg.lr_schedule == "cosine":
            total = cfg.lr_cosine_steps or self._cosine_steps or 0
            span = max(total - warmup, 1)
            progress = min((step - warmup) / span, 1.0)
            return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1.0 + math.cos(math.pi * progress))
        if step == warmup and warmup > 0:
            return cfg.lr
        return None

    def on_fit_start(self):
        if self.train_config.lr_schedule == "cosine" and self.train_config.lr_cosine_steps is None:
            steps = self.trainer.estimated_stepping_batches
            if not math.isfinite(steps):
                from torchmdx.errors import ConfigError

                raise ConfigError("train.lr_schedule 'cosine' needs trainer.max_epochs or trainer.max_steps "
                                  "(or train.lr_cosine_steps)")
            self._cosine_steps = int(steps)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        lr = self.scheduled_lr(self.trainer.global_step)
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
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
        self._ddp_reducer_off()

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
        return GraphedTrainStep(
            self.model, optimizer, objective, forces=cfg.train_forces,
            clip_value=self.trainer.gradient_clip_val, clip_algorithm=self.trainer.gradient_clip_algorithm or "norm",
            pair_headroom=cfg.cuda_graph_pair_headroom, traced=traced,
            capture=capture, error_sums=error_sums, ema=ema, max_shapes=max_shapes, distributed=world > 1,
        )

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
        wrapped = getattr(self._trainer.strategy, "model", None) if self._trainer is not None else None
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            wrapped.require_backward_grad_sync = True  # DDP's reducer back for anything after training

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

    def on_train_batch_end(self, outputs, batch, batch_idx):
        every = max(1, int(getattr(self.trainer, "log_every_n_steps", 50) or 50))
        if self.trainer.global_step % every:
            return
        graph_step = self._graph_step
        if graph_step is not None and self._graphed_batch:
            graph_step.check()  # one host read at the logging points
        self._check_finite()

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["torchmdx"] = {
            "plateau": self._plateau.state_dict() if self._plateau is not None else None,
            "rng": collect_rng_states(),
            "refit_atomref": None if self._refit_value is None else self._refit_value.cpu(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("torchmdx") or {}
        self._plateau_state = extra.get("plateau")
        if self._plateau is not None and self._plateau_state is not None:
            self._plateau.load_state_dict(self._plateau_state)
        if extra.get("refit_atomref") is not None:
            self._refit_value = extra["refit_atomref"]
        if extra.get("rng") is not None:
            restore_rng_states(extra["rng"])

    # ------------------------------------------------------------------ the trained potential
    def potential(self):
        """The wrapped :class:`~torchmdx.nn.Potential` (with whatever weights are loaded now)."""
        return self.model
