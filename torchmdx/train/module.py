"""``PotentialModule``: the LightningModule that trains a :class:`~torchmdx.nn.Potential`.

Objective (eV, eV/Å; see :class:`torchmdx.train.config.TrainConfig`)::

    loss = energy_weight · mean_b L(ΔE_b) + force_weight · mean_{a,k} L(ΔF_ak)

with forces F = −∂E/∂pos by autograd (``create_graph=True`` during training, so the force
loss is differentiated twice). Per epoch it logs for ``train`` and ``val`` (and ``test``):
``<stage>_loss`` (the objective over the whole epoch), ``<stage>_energy_mae/_rmse`` (meV),
``<stage>_energy_per_atom_mae/_rmse`` (meV/atom), ``<stage>_forces_mae/_rmse`` (meV/Å) and ``lr``;
errors are exact over the epoch (:class:`torchmdx.train.metrics.EpochErrors`).

Schedule: AdamW; the learning rate is set before every optimiser step from the step count
(linear warm-up, then cosine if chosen) and, for ``plateau``, reduced by a
``ReduceLROnPlateau`` stepped at the end of each validation (after the warm-up). The plateau
scheduler and the random-number generators are saved in the checkpoint, so ``--resume``
continues exactly where the run stopped.

Force-only training (``refit_atomref``): before every validation the per-element reference
energies are re-fitted by least squares so that the model's energies match the training
energies, min_δ Σ_s (E_ref,s − E_pred,s − Σ_e n_s,e δ_e)², atomref_e += δ_e; forces do not see
these constants, so this is what makes a force-only model predict absolute energies. It runs on
the validated (EMA) weights and the result is kept in both weight sets and in the checkpoints.
"""

from __future__ import annotations

import math
import random
from typing import Optional

import lightning as L
import numpy as np
import torch

from torchmdx.config import from_dict
from torchmdx.data.loader import batches_in_order
from torchmdx.train.config import TrainConfig
from torchmdx.train.metrics import EpochErrors, loss_terms, weighted_loss

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


def batch_counts(batch) -> torch.Tensor:
    """Number of atoms of each structure of a PyG batch [B]."""
    if getattr(batch, "ptr", None) is not None:
        return batch.ptr[1:] - batch.ptr[:-1]
    return torch.bincount(batch.batch, minlength=int(batch.num_graphs))


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
        from torchmdx.nn.potential import ETPotential

        self.save_hyperparameters()
        self.train_config: TrainConfig = from_dict(TrainConfig, train or {}, "train")
        self.model = ETPotential(dict(model))
        cfg = self.train_config
        # ("train" cannot be a ModuleDict key: it is Module.train)
        self.errors = torch.nn.ModuleDict(
            {f"{stage}_errors": EpochErrors(cfg.loss, cfg.huber_delta, cfg.energy_loss) for stage in STAGES}
        )
        self._plateau = None
        self._plateau_state: Optional[dict] = None
        self._cosine_steps: Optional[int] = None

    # ------------------------------------------------------------------ prediction and loss
    def forward(self, batch, forces: bool = True, create_graph: bool = False) -> dict:
        # num_graphs is a host int of the batch: the potential need not read B back from the device
        return self.model(batch.z, batch.pos, batch.batch, getattr(batch, "cell", None), getattr(batch, "pbc", None),
                          forces=forces, create_graph=create_graph, num_structures=int(batch.num_graphs))

    def _step(self, batch, stage: str) -> torch.Tensor:
        cfg = self.train_config
        has_forces = getattr(batch, "forces", None) is not None
        training = stage == "train"
        want_forces = has_forces and (cfg.train_forces or not training)
        if training and cfg.train_forces and not has_forces:
            from torchmdx.errors import DataError

            raise DataError("train.force_weight > 0 but the training data have no forces; set train.force_weight: 0")
        out = self(batch, forces=want_forces, create_graph=training and want_forces)
        n_atoms = batch_counts(batch)
        energy_error = out["energy"] - batch.energy.reshape(-1).to(out["energy"].dtype)
        force_error = out["forces"] - batch.forces.to(out["forces"].dtype) if want_forces else None
        loss = energy_error.new_zeros(())
        if cfg.energy_weight > 0:
            target = energy_error / n_atoms.to(energy_error.dtype) if cfg.energy_loss == "per_atom" else energy_error
            loss = loss + cfg.energy_weight * loss_terms(target, cfg.loss, cfg.huber_delta).mean()
        if cfg.force_weight > 0 and force_error is not None:
            loss = loss + cfg.force_weight * loss_terms(force_error, cfg.loss, cfg.huber_delta).mean()
        # force-only training: the training weights' energies carry arbitrary per-element offsets
        # (only the validated weights get re-fitted references), so no training energy errors
        logged_energy = None if (training and cfg.energy_weight == 0) else energy_error
        self.errors[f"{stage}_errors"].update(logged_energy, n_atoms, force_error)
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        self.log("train_loss_step", loss.detach(), on_step=True, on_epoch=False, prog_bar=True,
                 batch_size=int(batch.num_graphs))
        return loss

    def validation_step(self, batch, batch_idx):
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
        loss = weighted_loss(values, cfg.energy_weight, cfg.force_weight)
        logged = {}
        if loss is not None:
            logged[f"{stage}_loss"] = loss
        for key in ("energy_mae", "energy_rmse", "energy_per_atom_mae", "energy_per_atom_rmse", "forces_mae", "forces_rmse"):
            if key in values:
                logged[f"{stage}_{key}"] = values[key]
        for key, value in logged.items():
            shown = key in (f"{stage}_loss", f"{stage}_forces_mae", f"{stage}_energy_mae")
            self.log(key, value, prog_bar=shown and stage != "train", sync_dist=False)
        return logged

    def on_train_epoch_end(self):
        self._log_epoch("train")
        self.log("lr", self.optimizers().param_groups[0]["lr"] if self._trainer is not None else float("nan"))

    def on_validation_epoch_start(self):
        # callbacks run first: with EMA the averaged weights are in place now
        if self.train_config.refits_atomref:
            self._refit_atomref()

    def on_validation_epoch_end(self):
        logged = self._log_epoch("val")
        if self._refit_value is not None:
            # EMA has swapped the training weights back in (callbacks run first): keep the refit there too
            self.model.atomref.copy_(self._refit_value.to(self.model.atomref))
        if logged is None or self.trainer.sanity_checking:
            return
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
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
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
        optimizer.step(closure=optimizer_closure)

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


@torch.no_grad()
def reference_normal_equations(model, dataset, indices, batch_size: int = 64):
    """Normal equations of min_δ Σ_s (E_ref,s − E_pred,s − Σ_e n_s,e δ_e)² over ``indices``:
    (CᵀC [max_z, max_z], Cᵀr [max_z]) with C the element counts and r the energy residuals (eV),
    in float64 on the model's device. Energies only (no forces)."""
    device = next(model.parameters()).device
    max_z = model.config.max_z
    normal = torch.zeros(max_z, max_z, dtype=torch.float64, device=device)
    rhs = torch.zeros(max_z, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for batch in batches_in_order(dataset, indices, batch_size):
            batch = batch.to(device)
            out = model(batch.z, batch.pos, batch.batch, batch.cell, batch.pbc, forces=False,
                        num_structures=int(batch.num_graphs))
            residual = batch.energy.reshape(-1).to(torch.float64) - out["energy"].to(torch.float64)
            counts = torch.zeros(int(batch.num_graphs), max_z, dtype=torch.float64, device=device)
            counts.index_put_((batch.batch, batch.z), torch.ones_like(batch.z, dtype=torch.float64), accumulate=True)
            normal += counts.T @ counts
            rhs += counts.T @ residual
    finally:
        model.train(was_training)
    return normal, rhs


@torch.no_grad()
def apply_reference_correction(model, normal: torch.Tensor, rhs: torch.Tensor) -> bool:
    """atomref_e += δ_e, the minimum-norm least-squares solution of the normal equations over
    the elements present (pseudo-inverse: with one composition only Σ_e n_e δ_e is determined).
    Returns False when no element is present."""
    present = torch.diagonal(normal) > 0
    if not bool(present.any()):
        return False
    delta = torch.linalg.pinv(normal[present][:, present]) @ rhs[present]
    new = model.atomref.detach().clone()
    new[present] += delta.to(new)
    model.atomref.copy_(new)
    return True


def fit_reference_correction(model, dataset, indices, batch_size: int = 64) -> bool:
    """Shift the model's atomic references so that its energies fit ``dataset[indices]`` best
    (least squares, see :func:`reference_normal_equations`)."""
    normal, rhs = reference_normal_equations(model, dataset, np.asarray(indices, dtype=np.int64), batch_size)
    return apply_reference_correction(model, normal, rhs)

