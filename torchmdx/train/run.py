"""A training run: config in, run folder out.

Run folder (``run_dir``)::

    config.resolved.yaml     the config with every default written out
    splits.npz               the train/val/test indices (reused by --resume and evaluate)
    data_summary.json        split sizes, fitted atomic references, energy/force statistics
    checkpoints/best.ckpt    lowest monitored validation value (EMA weights in state_dict)
    checkpoints/last.ckpt    end of the latest epoch (what --resume continues from)
    logs/csv/metrics.csv     per-epoch metrics (Lightning CSVLogger)
    logs/tensorboard/        the same for TensorBoard
    model.pt                 the best checkpoint's EMA weights as a self-contained model file
    learning_curve.png       train/val errors and learning rate per epoch

:func:`train` does: validate config -> check the run folder -> seed -> data (cache, split,
references, statistics) -> model with its normalisation -> Lightning ``Trainer.fit`` -> export.
The names of the run folder's files and the checks of the folder before a run (a new run into an old
one, a resumed run's checkpoint and config) are :mod:`torchmdx.train.run_folder`'s, imported here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Optional

from torchmdx.config import to_dict
from torchmdx.errors import ConfigError, DataError
from torchmdx.io_utils import atomic_write, jsonable
from torchmdx.train.config import RunConfig, TrainConfig, resolve_cuda_graph, resolved_yaml
from torchmdx.train.data_checks import (  # noqa: F401 - check_cells: imported from here
    _check_energies_differ, check_batch_limits, check_cells, check_cutoff_reaches_neighbours)
# the run folder's names and the checks before a run: their own module (2026-12-07); callers import them from here
from torchmdx.train.run_folder import (  # noqa: F401 - RESUME_MUTABLE_*, SPLIT_KEYS: names this module has offered
    BEST, CHECKPOINT_DIR, LAST, LEARNING_CURVE, METRICS_CSV, MODEL_FILE, RESOLVED_CONFIG, RESUME_MUTABLE_DATA_KEYS,
    RESUME_MUTABLE_MODEL_KEYS, SPLIT_KEYS, _check_checkpoint_fits, check_run_dir)

#: training structures used to fold the untrained network's energy offset into the references
INITIAL_REFIT_STRUCTURES = 2000
#: print the untrained model's validation errors before training (one pass over the val split)
INITIAL_VALIDATION = True


# ---------------------------------------------------------------------------- normalisation
def normalisation_from_data(datamodule, train: TrainConfig) -> dict:
    """Atomic references, scale, shift (eV) and elements from the training split's statistics
    (see :class:`~torchmdx.train.config.TrainConfig`)."""
    force_rms = datamodule.force_rms
    energy_std = datamodule.energy_std_per_atom
    if train.scale == "auto":
        scale = force_rms if (train.train_forces and force_rms) else energy_std
    elif train.scale == "force_rms":
        if not force_rms:
            raise ConfigError("train.scale 'force_rms' needs forces in the data; use 'energy_std' or a number")
        scale = force_rms
    elif train.scale == "energy_std":
        scale = energy_std
    elif train.scale == "none":
        scale = 1.0
    else:
        scale = float(train.scale)
    if not (scale and math.isfinite(scale) and scale > 0):
        scale = 1.0  # e.g. one training structure: no spread to scale by
    if train.shift == "auto":
        shift = datamodule.energy_mean_per_atom
    elif train.shift == "none":
        shift = 0.0
    else:
        shift = float(train.shift)
    return {"atomref": datamodule.atomic_references, "scale": float(scale), "shift": float(shift),
            "elements": datamodule.elements}


# ---------------------------------------------------------------------------- set-up
def prepare(cfg: RunConfig, run_dir: Optional[Path] = None):
    """Seed, set up the data (cache, split, references) and build the module with the model's
    normalisation. Returns ``(datamodule, module)``; nothing is trained."""
    import lightning as L

    from torchmdx.data.datamodule import TorchmdxDataModule
    from torchmdx.train.module import PotentialModule, fit_reference_correction

    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    # captured training steps take packed batches (a few fixed sizes); the stress term is eager only
    captured = resolve_cuda_graph(cfg)  # train.cuda_graph 'auto' -> on with one process on one GPU
    packed = captured and not cfg.train.train_stress
    datamodule = TorchmdxDataModule(cfg.data_config, run_dir=run_dir, pack_training=packed)  # max_z is the model's
    datamodule.setup("fit")
    sizes = datamodule.split.sizes()
    source = cfg.data_config.path
    if sizes["train"] == 0:
        raise DataError(f"{source}: the training split is empty; check data.train_size")
    if sizes["val"] == 0:
        raise ConfigError("config key 'data.val_size' gives an empty validation split; training needs one "
                          "(best checkpoint, EMA validation, early stopping, learning-rate schedule)")
    # energy_weight 0 first: the force_weight line advised force_weight 0, then "all weights are 0"
    if cfg.train.energy_weight == 0 and not datamodule.dataset.has_forces:
        raise ConfigError(f"config key 'train.energy_weight' is 0 but {source} has no forces: nothing to train on "
                          "(set train.energy_weight > 0 and train.force_weight: 0 for energy-only training)")
    if cfg.train.train_forces and not datamodule.dataset.has_forces:
        # a MACE-style file (REF_forces) read with the default forces key: name the per-atom arrays it has
        arrays = [str(k) for k in datamodule.dataset.info.get("atom_extras", [])]
        present = (f" (its per-atom arrays: {', '.join(arrays[:6])}; data.forces_key names the one that holds the "
                   "forces)") if arrays else ""
        raise ConfigError(f"config key 'train.force_weight' is {cfg.train.force_weight} but {source} has no forces "
                          f"'{cfg.data_config.forces_key or 'forces'}'{present}; set train.force_weight: 0 (energy-only "
                          "training)")
    if cfg.train.train_forces and datamodule.force_rms == 0.0 and cfg.data_config.check_labels is not False:
        # a converter that wrote zeros for forces it did not have: trained to a flat energy surface, silently
        key = f" (data.forces_key '{cfg.data_config.forces_key}')" if cfg.data_config.forces_key else ""
        raise DataError(f"{source}: every force of the {sizes['train']} training structures is exactly 0{key}: zeros "
                        "written where no forces were computed? "
                        "set train.force_weight: 0 to train on the energies alone (or data.check_labels: false if "
                        "they are meant to be 0)")
    if cfg.train.energy_weight > 0 and cfg.data_config.check_labels is not False:
        _check_energies_differ(datamodule, cfg, source)
    if cfg.train.train_stress and not datamodule.dataset.has_stress:  # was refused at the first step, the run
        # folder (splits, logs) written and the "before training" errors printed
        raise ConfigError(f"config key 'train.stress_weight' is {cfg.train.stress_weight} but {source} has no stress "
                          "(an ASE file's 'stress' or 'virial' per structure, data.stress_key); set "
                          "train.stress_weight: 0")
    label = {"val_forces_mae": ("forces", datamodule.dataset.has_forces),
             "val_stress_mae": ("stress", datamodule.dataset.has_stress)}.get(cfg.train.monitor)
    if label is not None and not label[1]:  # was Lightning's "Early stopping conditioned on metric ..." traceback
        raise ConfigError(f"config key 'train.monitor' is '{cfg.train.monitor}' but {source} has no {label[0]}, so "
                          "it is never logged (no best checkpoint, no early stopping); monitor val_loss or "
                          "val_energy_mae")
    check_batch_limits(cfg, sizes)  # a fraction of less than one batch was Lightning's traceback at fit (round 36)
    module = PotentialModule(
        model=to_dict(cfg.model_config), train=to_dict(dataclasses.replace(cfg.train, cuda_graph=captured)),
        data=to_dict(cfg.data_config),
        inference_batch_size=cfg.data_config.inference_batch_size or cfg.data_config.batch_size,
    )
    check_cells(datamodule.dataset, float(module.model.cutoff), source, module.model)
    if getattr(cfg.model_config, "cutoff_upper", None) is not None:  # null: attention over whole structures
        check_cutoff_reaches_neighbours(datamodule.dataset.structures, datamodule.split["train"],
                                        cfg.model_config.cutoff_upper, getattr(cfg.model_config, "cutoff_lower", 0.0),
                                        source)
    module.model.set_normalisation(**normalisation_from_data(datamodule, cfg.train))
    if cfg.data_config.atomref != "none" and INITIAL_REFIT_STRUCTURES > 0:
        # fold the untrained network's mean energy into the references, so that the energy
        # errors start at the spread of the data instead of the network's arbitrary offset
        train_indices = datamodule.split["train"][:INITIAL_REFIT_STRUCTURES]
        fit_reference_correction(module.model, datamodule.dataset, train_indices,
                                 cfg.data_config.inference_batch_size or cfg.data_config.batch_size)
    return datamodule, module


def _prepare_or_leave_no_trace(cfg: RunConfig, run_dir: Path, check=None):
    """:func:`prepare`; when it refuses the run (a TorchmdxError: no forces for train.force_weight,
    an empty split, ...), the files it wrote into the run folder (splits.npz, data_state.json)
    and a run folder it created are removed again: a refused run used to leave them behind.
    ``check(module)``, when given, runs on the prepared module under the same rule."""
    import shutil

    from torchmdx.errors import TorchmdxError

    existed = run_dir.is_dir()
    before = set(run_dir.iterdir()) if existed else set()
    made = [p for p in run_dir.parents if not p.exists()]  # runs/ of runs/t: left behind, empty (round 19)
    try:
        prepared = prepare(cfg, run_dir)
        if check is not None:
            check(prepared[1])
        return prepared
    except TorchmdxError:
        if not existed:
            shutil.rmtree(run_dir, ignore_errors=True)
            for parent in made:  # innermost first; only while empty (os.rmdir refuses a folder with files)
                try:
                    parent.rmdir()
                except OSError:
                    break
        elif run_dir.is_dir():
            for path in set(run_dir.iterdir()) - before:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------- trainer
def build_trainer(cfg: RunConfig, run_dir: Path, extra_callbacks: Optional[list] = None):
    """A ``lightning.Trainer`` with checkpoints, early stopping, EMA, loggers and progress bar."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from torchmdx.train.callbacks import beside_target_checkpoint_io
    from torchmdx.train.ema import EMA

    train = cfg.train
    callbacks = [
        ModelCheckpoint(dirpath=run_dir / CHECKPOINT_DIR, filename=BEST, monitor=train.monitor, mode="min",
                        save_top_k=1, save_last=True, auto_insert_metric_name=False, enable_version_counter=False),
    ]
    # a progress bar only on a terminal: piped or logged output (make demo | tee log, batch jobs)
    # gets the one line per epoch of EpochSummary instead of thousands of bar updates
    progress_bar = cfg.trainer.enable_progress_bar and sys.stderr.isatty()
    if progress_bar:
        callbacks.append(TQDMProgressBar())
    if train.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(monitor=train.monitor, mode="min", patience=train.early_stopping_patience,
                                       check_finite=True, check_on_train_epoch_end=False))
    if train.divergence_factor is not None:
        from torchmdx.train.callbacks import Divergence

        callbacks.append(Divergence(train.monitor, train.divergence_factor))
    if train.ema_decay is not None and train.ema_decay > 0:
        callbacks.append(EMA(train.ema_decay))
    callbacks.extend(extra_callbacks or [])
    loggers = [
        CSVLogger(save_dir=str(run_dir), name="logs", version="csv"),
        TensorBoardLogger(save_dir=str(run_dir), name="logs", version="tensorboard", default_hp_metric=False),
    ]
    kwargs = cfg.trainer.lightning_kwargs()
    kwargs["enable_progress_bar"] = progress_bar
    precision = "64-true" if cfg.model_config.dtype == "float64" else "32-true"
    return L.Trainer(
        **kwargs,
        precision=precision,
        callbacks=callbacks,
        logger=loggers,
        plugins=[beside_target_checkpoint_io()],  # last.ckpt / best.ckpt written beside themselves, then renamed
        default_root_dir=str(run_dir),
        inference_mode=False,  # forces need autograd during validation
        enable_model_summary=False,  # train() prints one line on the model instead
    )


def _quiet_lightning_warnings() -> None:
    for pattern in (
        r".*does not have many workers.*",
        r".*log_every_n_steps.*",
        r".*Experiment logs directory .* exists and is not empty.*",
        r".*Checkpoint directory .* exists and is not empty.*",
        r".*`training_step` returned `None`.*",
        r".*TensorBoard support.*",
        # the module logs values it has already summed over the ranks (torchmetrics)
        r".*It is recommended to use `self.log\(.*sync_dist=True.*",
        # Lightning's own internals and its notes about torchmdx's loaders, not the user's concern
        r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
        r".*Your `IterableDataset` has `__len__` defined.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    # Lightning's info lines (accelerators found, logger tips, "limit_*_batches=1.0 was
    # configured", "max_epochs reached") say nothing a user needs; warnings still show
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------- the run
def train(cfg: RunConfig, resume: bool = False, callbacks: Optional[list] = None) -> dict:
    """Train as configured; returns paths and best metrics. Raises TorchmdxError subclasses for
    predictable problems (config, data, run folder). ``callbacks``: extra Lightning callbacks."""
    import torch

    from torchmdx.train.callbacks import EpochSummary
    from torchmdx.train.export import export_checkpoint
    from torchmdx.train.plots import learning_curve

    from torchmdx.devices import check_accelerator, check_launcher

    _quiet_lightning_warnings()
    check_accelerator(cfg.trainer.accelerator, cfg.trainer.devices)  # before any data is read or written
    check_launcher(cfg.trainer.num_nodes)  # num_nodes 2 on one machine waited forever for the other node
    run_dir = check_run_dir(cfg, resume)
    if cfg.trainer.num_threads is not None:
        torch.set_num_threads(cfg.trainer.num_threads)
    last = run_dir / CHECKPOINT_DIR / f"{LAST}.ckpt"
    datamodule, module = _prepare_or_leave_no_trace(
        cfg, run_dir, check=(lambda prepared: _check_checkpoint_fits(last, prepared)) if resume else None)
    with atomic_write(run_dir / RESOLVED_CONFIG, "w") as handle:
        handle.write(resolved_yaml(cfg))
    from torchmdx.train.provenance import run_record

    # every checkpoint records the run (its split), so that one copied out of the run folder still exports a
    # model file that evaluate --run can check (round 27)
    module.training_record = run_record(run_dir)
    with atomic_write(run_dir / "data_summary.json", "w") as handle:
        json.dump(jsonable(datamodule.summary()), handle, indent=2)
    initial = None
    if not resume and INITIAL_VALIDATION:
        initial = initial_errors(datamodule, module)
        from lightning.pytorch.utilities import rank_zero_only

        if rank_zero_only.rank == 0:  # every DDP rank runs this command
            print("before training: " + ", ".join(_describe(initial)), flush=True)
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        parameters = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
        sizes = datamodule.split.sizes()
        print(f"model: {type(module.model).__name__}, {parameters:,} parameters; data: {sizes['train']} training / "
              f"{sizes['val']} validation structures; run folder {run_dir}", flush=True)
        from torchmdx.data.atomref import untrained_elements
        from torchmdx.train.data_checks import label_unit_warnings

        source = Path(str(cfg.data_config.path)).name
        # elements found while the references were fitted (kept in data_state.json), else looked for
        known = datamodule.missing_reference_elements if cfg.data_config.atomref == "fit" else None
        untrained = untrained_elements(datamodule.dataset, datamodule.split["train"], datamodule.max_z, source,
                                       missing=known)
        if untrained:  # an element only in the validation/test split (round 27): trained without a word
            print(f"warning: {untrained}", file=sys.stderr, flush=True)
        # forces in Hartree/Bohr, gradients as forces, energies per atom (round 28), a stress of the other sign or
        # in GPa, positions in another length unit (round 39): trained without a word; a stress is looked at
        # whenever the data hold one (its errors are logged)
        structures = datamodule.dataset.structures if datamodule.dataset is not None else None
        for line in label_unit_warnings(structures, source, energies=bool(cfg.train.energy_weight),
                                        forces=bool(cfg.train.force_weight),
                                        length_unit=cfg.data_config.length_unit):
            print(f"warning: {line}", file=sys.stderr, flush=True)
    last = run_dir / CHECKPOINT_DIR / f"{LAST}.ckpt"
    previous_rows = _previous_metric_rows(run_dir / METRICS_CSV, last) if resume else []
    trainer = build_trainer(cfg, run_dir, extra_callbacks=[EpochSummary(), *(callbacks or [])])
    if previous_rows and trainer.is_global_zero:
        _keep_metric_rows(trainer, previous_rows)
    # Lightning's DDP strategies re-seed when they start (reset_seed); so does one process, so that
    # a DDP run and a one-process run with the same global batch shuffle alike
    from lightning.fabric.utilities.seed import reset_seed

    reset_seed()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if resume else None)
    except SystemExit:
        # Lightning turns Ctrl+C into a graceful shutdown and sys.exit(1)
        if trainer.interrupted:
            if last.is_file():
                print(f"training interrupted; continue it with --resume (from {last})", file=sys.stderr)
            else:  # stopped before the first epoch ended: --resume would say "last.ckpt not found"
                print(f"training interrupted before its first checkpoint ({last}) was written; nothing to resume: "
                      "run the same command again (without --resume) to start over", file=sys.stderr)
            raise KeyboardInterrupt from None
        raise
    result = {"run_dir": str(run_dir), "checkpoint_last": str(last), "initial_val": initial}
    if not trainer.is_global_zero:
        return result
    checkpoint = trainer.checkpoint_callback
    best = Path(checkpoint.best_model_path) if checkpoint is not None and checkpoint.best_model_path else None
    if best is not None and best.parent.resolve() != (run_dir / CHECKPOINT_DIR).resolve():
        # a run folder copied (or moved) and resumed: Lightning keeps the best checkpoint's old path, and the
        # model was exported from the other folder's file (another run's weights once that one went on)
        best = run_dir / CHECKPOINT_DIR / best.name
    source = best if best is not None and best.is_file() else last
    model_path = run_dir / MODEL_FILE
    # the run's own model file (a resumed run replaces it), recording this run's split for evaluate --run
    export_checkpoint(source, model_path, force=True, training=run_record(run_dir))
    result.update(checkpoint_best=str(best) if best else None, model=str(model_path), exported_from=str(source))
    if checkpoint is not None and checkpoint.best_model_score is not None:
        result["best_" + cfg.train.monitor] = float(checkpoint.best_model_score)
    metrics_csv = run_dir / METRICS_CSV
    if metrics_csv.is_file():
        curve = learning_curve(metrics_csv, run_dir / LEARNING_CURVE)
        if curve is not None:
            result["learning_curve"] = str(curve)
    result["epochs"] = int(trainer.current_epoch)
    result["global_step"] = int(trainer.global_step)
    return result


def initial_errors(datamodule, module) -> dict:
    """Validation errors of the untrained model (meV, meV/Å), the start of the learning curve."""
    from torchmdx.train.evaluate import error_metrics, predict

    batch_size = datamodule.config.inference_batch_size or datamodule.config.batch_size
    return error_metrics(predict(module.model, datamodule.dataset, datamodule.split["val"], batch_size=batch_size))


def _describe(errors: dict) -> list[str]:
    parts = []
    if "forces_mae" in errors:
        parts.append(f"val F MAE {errors['forces_mae']:.4g} meV/Å")
    parts.append(f"val E MAE {errors['energy_mae']:.4g} meV")
    return parts


def _previous_metric_rows(metrics_csv: Path, checkpoint: Path) -> list[dict]:
    """Rows of the CSV log up to the checkpoint's epoch (Lightning's CSV writer would delete the
    file when the resumed run starts logging)."""
    import csv

    import torch

    if not metrics_csv.is_file():
        return []
    try:
        epoch = int(torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # noqa: BLE001 - an unreadable checkpoint fails later with its own message
        return []
    kept = []
    try:
        with open(metrics_csv, newline="", encoding="utf-8", errors="replace") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                value = row.get("epoch")
                if value in (None, ""):
                    continue
                try:
                    row_epoch = float(value)
                except ValueError:
                    row_epoch = math.nan
                if not (row_epoch.is_integer() and row_epoch >= 0):
                    # a tail of NUL bytes (a write cut short by a crash) or a damaged row: was a ValueError traceback
                    # (round 39); the log is a record, not an input: keep the rows before it and go on
                    _unreadable_log(metrics_csv, f"line {reader.line_num}", value)
                    break
                if int(row_epoch) <= epoch:
                    kept.append(row)
    except csv.Error as exc:  # e.g. a field beyond csv.field_size_limit
        _unreadable_log(metrics_csv, f"after {len(kept)} row(s)", str(exc))
    return kept


def _unreadable_log(metrics_csv: Path, where: str, what: str) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        shown = what if len(what) <= 20 else what[:20] + "..."
        print(f"warning: {metrics_csv}: {where} is not a row of the log ({shown!r}: a write cut short?); the rows "
              "before it are kept and the resumed epochs logged after them (epochs in the damaged part have no row)",
              file=sys.stderr, flush=True)


def _keep_metric_rows(trainer, rows: list[dict]) -> None:
    """Put ``rows`` back in front of what the CSV logger writes from now on."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            writer = logger.experiment  # creating the writer removes the old file
            writer.metrics[:0] = [{k: v for k, v in row.items() if v not in (None, "")} for row in rows]
