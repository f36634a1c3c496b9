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

The step runner's wiring (setting up the captured step, routing each batch to it or to the eager
step, packed training and validation batches, the optimiser hooks' graph branches, DDP's reducer
switched off) is in :class:`torchmdx.train.module_runner.StepRunnerMixin`, which this class
inherits; the hooks that do both call its helpers.

Force-only training (``refit_atomref``): before every validation the per-element reference
energies are re-fitted by least squares (:mod:`torchmdx.train.refit`) so that the model's
energies match the training energies; forces do not see these constants, so this is what makes
a force-only model predict absolute energies. It runs on the validated (EMA) weights and the
result is kept in both weight sets and in the checkpoints.
"""

from __future__ import annotations

import math
import random
from typing import Optional

import lightning as L
import numpy as np
import torch

from torchmdx.config import from_dict
from torchmdx.data.packing import PackedBatch
from torchmdx.nn.graph_attention import upgrade_state_dict
from torchmdx.train.config import TrainConfig
from torchmdx.train.metrics import EpochErrors, weighted_loss
from torchmdx.train.module_runner import StepRunnerMixin
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


def rank_max(counts: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``counts`` (the non-finite step counts [current, longest]) as the largest of every DDP
    rank's, so that every rank takes the same stop decision (a rank that stopped alone left the
    others waiting in their next collective until its timeout); one all-reduce, which every rank
    reaches at the same step (the logging points and epoch ends). One process: ``counts`` itself
    (None stays None)."""
    if distributed_world() <= 1:
        return counts
    dist = torch.distributed
    device = counts.device if counts is not None else (torch.device("cuda", torch.cuda.current_device())
                                                      if dist.get_backend() == "nccl" else torch.device("cpu"))
    reduced = counts.clone() if counts is not None else torch.zeros(2, dtype=torch.long, device=device)
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    return reduced


class PotentialModule(StepRunnerMixin, L.LightningModule):
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
        self._nonfinite: Optional[torch.Tensor] = None  # [current, longest] run of non-finite losses
        #: the run that trains it (train.run sets it; kept in every checkpoint: provenance.checkpoint_run_record)
        self.training_record: Optional[dict] = None
        self._init_step_runner()  # the step runner's state (StepRunnerMixin): none before training

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
        if limit is None:
            return
        counts = rank_max(self._nonfinite)
        if counts is None:
            return
        _, longest = counts.tolist()
        if longest >= limit:
            self._diverged(f"the loss was NaN or infinite for {longest} consecutive steps")

    def on_train_batch_end(self, outputs, batch, batch_idx):
        every = max(1, int(getattr(self.trainer, "log_every_n_steps", 50) or 50))
        if self.trainer.global_step % every:
            return
        self._check_runner()  # one host read at the logging points
        self._check_finite()

    def _diverged(self, what: str) -> None:
        """Raise the one-line TrainingError of a diverged run, with what to try."""
        from torchmdx.errors import TrainingError

        lr = self.train_config.lr
        clip = getattr(self.trainer, "gradient_clip_val", None)
        hint = "set trainer.gradient_clip_val" if not clip else f"a smaller trainer.gradient_clip_val (now {clip:g})"
        raise TrainingError(
            f"training diverged: {what} (by step {self.trainer.global_step}, epoch {self.trainer.current_epoch + 1}); "
            f"try a smaller train.lr (now {lr:g}), {hint}, or check the data (torchmdx data info); no model was exported")

    def validation_step(self, batch, batch_idx):
        if isinstance(batch, PackedBatch):
            self._eval_step_runner().step(batch)  # captured on a GPU; errors summed on the device
            return
        self._step(batch, "val")

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
        sums = self._runner_train_sums()  # the step runner's error sums of the epoch (graphed or packed)
        if sums is not None:
            self.errors["train_errors"].add_sums(sums)
        self._log_epoch("train")
        self.log("lr", self.optimizers().param_groups[0]["lr"] if self._trainer is not None else float("nan"))

    def on_validation_epoch_start(self):
        # callbacks run first: with EMA the averaged weights are in place now
        if self.train_config.refits_atomref:
            self._refit_atomref()

    def on_validation_epoch_end(self):
        sums = self._runner_val_sums()  # packed validation batches' error sums
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
        self._runner_optimizer_step(optimizer, optimizer_closure)  # a graphed batch: the replay's step

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["torchmdx"] = {
            "plateau": self._plateau.state_dict() if self._plateau is not None else None,
            "rng": collect_rng_states(),
            "refit_atomref": None if self._refit_value is None else self._refit_value.cpu(),
            # the run that trains it (torchmdx.train.provenance.run_record), for export outside the run folder
            "training": getattr(self, "training_record", None),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        upgrade_optimizer_states(checkpoint, self.model)  # before Lightning restores the optimiser
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


def upgrade_optimizer_states(checkpoint: dict, model, prefix: str = "model.") -> None:
    """An old checkpoint of ``model`` (weights under ``prefix``) whose parameters the model's
    modules convert on load (GATr's and the transformer's attention key biases and score-bias
    constants, dropped: :func:`torchmdx.nn.graph_attention.upgrade_state_dict`): its optimiser
    states converted alike, in place, so that ``--resume`` continues it. The weights convert
    themselves in ``load_state_dict``; a checkpoint without old entries is left as it is."""
    states = checkpoint.get("state_dict") or {}
    old = {k[len(prefix):]: v for k, v in states.items() if k.startswith(prefix)}
    upgraded = upgrade_state_dict(model, dict(old))
    if all(upgraded.get(k) is v for k, v in old.items()):
        return
    parameters = {name for name, _ in model.named_parameters()}
    # the old parameters in the old optimiser's order (state dicts list them as named_parameters does)
    old_names = [k for k in old if k in parameters or k not in upgraded]
    for optimizer in checkpoint.get("optimizer_states") or []:
        groups = optimizer.get("param_groups") or []
        if sum(len(group["params"]) for group in groups) != len(old_names):
            continue  # not this model's optimiser: loading it says so
        names = iter(old_names)
        state, count = {}, 0
        for group in groups:
            kept = []
            for index, name in zip(group["params"], names):
                if name not in upgraded:
                    continue  # dropped parameter
                entry = optimizer["state"].get(index)
                if entry is not None:
                    entry = {key: (upgrade_state_dict(model, {name: value})[name]
                                   if torch.is_tensor(value) and value.shape == old[name].shape else value)
                             for key, value in entry.items()}
                    state[count] = entry
                kept.append(count)
                count += 1
            group["params"] = kept
        optimizer["state"] = state
