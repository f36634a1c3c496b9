"""The training config: one YAML file with the sections ``data:``, ``model:``, ``train:``,
``trainer:`` and the key ``run_dir``.

Every section is a typed dataclass built with :func:`torchmdx.config.from_dict`, so an unknown
key or a wrong type is a one-line :class:`~torchmdx.errors.ConfigError` naming the key and what is
allowed, raised before anything is read or trained::

    data:                      # torchmdx.data.DataConfig (docs/data.md)
      path: ../shared/data/md17/md17_ethanol_xtb.npz
      train_size: 950
      val_size: 50
    model:                     # torchmdx.nn.ModelConfig (docs/model.md)
      embedding_dimension: 128
    train:                     # TrainConfig below: objective, optimiser, schedule, EMA
      energy_weight: 0.2
      force_weight: 0.8
    trainer:                   # TrainerConfig below: passed to lightning.Trainer
      max_epochs: 3000
      devices: auto
    run_dir: runs/et_md17      # checkpoints, logs, splits, model.pt

``torchmdx train config.yaml --set train.lr=5e-4 --set trainer.max_epochs=10`` overrides single
keys (values parsed as YAML). Relative data files (``data.path``, ``data.split_file``) are looked
up next to the config file first, then in the current directory; relative outputs (``run_dir``,
``data.cache_dir``) are relative to the current directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal, Optional, Union

from torchmdx.config import apply_overrides, bad_key, from_dict, load_yaml, to_dict
from torchmdx.devices import check_threads
from torchmdx.errors import ConfigError
from torchmdx.io_utils import expand_home

LOSSES = ("mse", "l1", "huber")
MONITORS = ("val_loss", "val_energy_mae", "val_energy_per_atom_mae", "val_forces_mae")


@dataclass
class TrainConfig:
    """Objective, optimiser and schedule (energies eV, forces eV/Å).

    Loss over a batch of B structures with N atoms::

        loss = energy_weight · mean_b L(ΔE_b) + force_weight · mean_{a,k} L(ΔF_ak)
               + stress_weight · mean_{b,k,l} L(Δσ_bkl)

    ΔE_b = E_pred − E_ref (eV), divided by the atom count when ``energy_loss: per_atom``;
    ΔF_ak one force component (eV/Å); Δσ_bkl one component of the 3 x 3 stress of a periodic
    structure (eV/Å³, σ = (1/V) ∂E/∂ε, ASE's sign; stress errors are ~1e-3 eV/Å³ where force
    errors are ~0.05 eV/Å, so with mse useful weights are large: 1e3-1e4 against force_weight
    1 (tests/test_train_stress.py: 3e4 about halves the stress error of 32-atom argon boxes over
    8 epochs, 100 changes nothing); the data need a ``stress`` (or virial) per structure,
    :mod:`torchmdx.data.ase_format`);
    L(x) = x² (mse), |x| (l1) or Huber with threshold
    ``huber_delta`` (huber). ``force_weight: 0`` trains on energies only (no force evaluation
    during training), ``energy_weight: 0`` on forces only (the PolyGET objective): then the
    per-element reference energies are re-fitted on the training split before each validation
    (``refit_atomref``), so that the model still predicts absolute energies.

    Schedule: AdamW(lr, weight_decay); the learning rate rises linearly from lr/warmup to lr over
    ``lr_warmup_steps`` optimiser steps, then ``lr_schedule``: ``plateau`` multiplies it by
    ``lr_factor`` when the monitored validation value has not improved for ``lr_patience``
    validations (down to ``lr_min``), ``cosine`` decays it to ``lr_min`` over ``lr_cosine_steps``
    (default: the whole run), ``constant`` keeps it.

    ``augment``: ``rotations`` gives every training structure a random rotation at every step
    (positions, forces, cell and stress alike; ``rotations_reflections`` also a random mirror
    image), so that a model without built-in rotation symmetry (``model.architecture:
    transformer``) learns it from the data (:mod:`torchmdx.train.augment`); ``none``: off.

    EMA: the validation, the checkpoints and the exported model use the exponential moving
    average of the weights, θ_ema ← d θ_ema + (1 − d) θ with d = min(ema_decay, (1 + n)/(10 + n))
    after the n-th optimiser step (the warm-up keeps early averages from lagging far behind);
    ``ema_decay: null`` turns it off.

    Normalisation of the model output (see torchmdx.nn.potential): per-atom energy =
    scale · y + atomref(Z) + shift. ``scale``: ``auto`` = the RMS of the training forces when
    training on forces, else the standard deviation of the per-atom energy residual;
    ``force_rms`` / ``energy_std`` / a number (eV) / ``none`` (1). ``shift``: ``auto`` = mean
    per-atom energy residual after the atomic references (eV), a number, or ``none`` (0).

    ``cuda_graph``: on a GPU, replay each training step (neighbor list, forward, forces, loss,
    backward, gradient clipping, AdamW step) as one CUDA graph
    (:mod:`torchmdx.train.graphed`); one device, no gradient accumulation; ignored with a note on
    the CPU. ``auto`` (default): on where that holds, that is, one process on one CUDA GPU
    (``trainer.devices`` 1, or ``auto`` on a machine with one GPU), one node, no gradient
    accumulation, for an architecture whose captured step was checked on a GPU (the ET); off
    otherwise (:func:`resolve_cuda_graph`). ``cuda_graph_pair_headroom`` h >= 1: the graph's
    neighbor list has room for h × the
    pairs seen in its warm-up steps (padding rows cost time: the reference message path works on
    every row); a batch with more pairs is skipped inside the graph (weights untouched), seen at
    the next logging point, and the capacity grown (the latest step is redone, earlier skipped
    ones are counted and reported). null: room for every pair inside each structure, Σ n(n-1), so
    nothing can overflow (slower: 27 vs 21 ms per step for 32 aspirins on an H100).
    ``max_nonfinite_steps`` n: stop the run with one line (:class:`torchmdx.errors.TrainingError`,
    exit 2, nothing exported) once the training loss has been NaN or infinite for n consecutive
    optimiser steps (checked at the logging points and at each epoch's end, without a host
    read per step); null: never. ``divergence_factor`` f: stop the run likewise once the monitored
    validation value exceeds f times its first value (the sanity check's before training, else the
    first epoch's; :class:`torchmdx.train.callbacks.Divergence`): a learning rate so large that the
    loss grows by orders of magnitude without turning NaN; null: never.

    ``cuda_graph_compile``: inside the captured step, the model, its forces and their parameter
    gradients run as one traced and compiled graph (:mod:`torchmdx.nn.traced`; the first step of
    each batch shape compiles for a minute or two, once: the graphs are cached across runs,
    :mod:`torchmdx.nn.compile_cache`); false (default): the model's eager autograd, captured as
    is, which starts in seconds. Off by default because a time-limited run loses more to the
    compile than it gains (H200: 95 s per batch shape for 16.4 vs 22.2 ms per 32-aspirin step,
    and at the MD17 recipe's batch of 8 the host, not the GPU, set the pace; docs/training.md).
    ``background``: start on the captured eager step and compile the traced graphs in a child
    process meanwhile; each batch shape switches once its graph is in the compile cache
    (:mod:`torchmdx.train.precompile`), unless too little of the run is left for the compile or
    the switch to pay (``max_time`` and the steps left; docs/training.md, "The pay-off rule").
    """

    energy_weight: float = 1.0
    force_weight: float = 1.0
    stress_weight: float = 0.0
    loss: Literal["mse", "l1", "huber"] = "mse"
    huber_delta: float = 0.01
    energy_loss: Literal["per_structure", "per_atom"] = "per_structure"
    lr: float = 1.0e-3
    weight_decay: float = 0.0
    lr_warmup_steps: int = 1000
    lr_schedule: Literal["plateau", "cosine", "constant"] = "plateau"
    lr_factor: float = 0.8
    lr_patience: int = 30
    lr_min: float = 1.0e-7
    lr_cosine_steps: Optional[int] = None
    ema_decay: Optional[float] = 0.99
    early_stopping_patience: Optional[int] = 300
    monitor: Literal["val_loss", "val_energy_mae", "val_energy_per_atom_mae", "val_forces_mae",
                     "val_stress_mae"] = "val_loss"
    scale: Union[float, Literal["auto", "force_rms", "energy_std", "none"]] = "auto"
    shift: Union[float, Literal["auto", "none"]] = "auto"
    refit_atomref: Union[bool, Literal["auto"]] = "auto"
    seed: int = 1
    cuda_graph: Union[bool, Literal["auto"]] = "auto"
    cuda_graph_pair_headroom: Optional[float] = 1.1
    cuda_graph_compile: Union[bool, Literal["background"]] = False
    max_nonfinite_steps: Optional[int] = 10
    divergence_factor: Optional[float] = 1000.0
    augment: Literal["none", "rotations", "rotations_reflections"] = "none"

    def validate(self, section: str = "train") -> None:
        bad = partial(bad_key, section)

        for key in ("energy_weight", "force_weight", "stress_weight"):
            if getattr(self, key) < 0:
                bad(key, f"must be >= 0, got {getattr(self, key)}")
        if self.energy_weight == 0 and self.force_weight == 0 and self.stress_weight == 0:
            bad("force_weight", "and energy_weight (and stress_weight) are all 0: nothing to train on")
        if not self.lr > 0:
            bad("lr", f"must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            bad("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not self.huber_delta > 0:
            bad("huber_delta", f"must be > 0, got {self.huber_delta}")
        if self.lr_warmup_steps < 0:
            bad("lr_warmup_steps", f"must be >= 0, got {self.lr_warmup_steps}")
        if not 0 < self.lr_factor < 1:
            bad("lr_factor", f"must be between 0 and 1, got {self.lr_factor}")
        if self.lr_patience < 0:
            bad("lr_patience", f"must be >= 0, got {self.lr_patience}")
        if not 0 <= self.lr_min <= self.lr:
            bad("lr_min", f"must be between 0 and lr ({self.lr}), got {self.lr_min}")
        if self.lr_cosine_steps is not None and self.lr_cosine_steps < 1:
            bad("lr_cosine_steps", f"must be >= 1 or null, got {self.lr_cosine_steps}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            bad("ema_decay", f"must be in [0, 1) or null, got {self.ema_decay}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            bad("early_stopping_patience", f"must be >= 1 or null, got {self.early_stopping_patience}")
        if isinstance(self.scale, float) and not self.scale > 0:
            bad("scale", f"must be > 0 eV, got {self.scale}")
        from torchmdx.data.label_check import max_atom_energy

        for name in ("scale", "shift"):  # 'shift: 1e30' trained (best_val_loss 1.4e30) without a word
            value = getattr(self, name)
            if isinstance(value, float) and abs(value) > max_atom_energy():
                bad(name, f"is {value:g} eV per atom, beyond any atom's energy (at most {max_atom_energy():.1e} eV: "
                          "10 x the Thomas-Fermi energy of element 118, the label check's bound); give it in eV, "
                          "or 'auto'")
        if self.max_nonfinite_steps is not None and self.max_nonfinite_steps < 1:
            bad("max_nonfinite_steps", f"must be >= 1 or null, got {self.max_nonfinite_steps}")
        if self.divergence_factor is not None and not self.divergence_factor > 1:
            bad("divergence_factor", f"must be > 1 or null, got {self.divergence_factor}")
        if self.cuda_graph_pair_headroom is not None and not self.cuda_graph_pair_headroom >= 1:
            bad("cuda_graph_pair_headroom", f"must be >= 1 or null, got {self.cuda_graph_pair_headroom}")

    @property
    def train_forces(self) -> bool:
        return self.force_weight > 0

    @property
    def train_stress(self) -> bool:
        return self.stress_weight > 0

    @property
    def refits_atomref(self) -> bool:
        """Re-fit the atomic references to the model's energies (force-only training)."""
        return self.energy_weight == 0 if self.refit_atomref == "auto" else bool(self.refit_atomref)


@dataclass
class TrainerConfig:
    """Arguments of ``lightning.Trainer`` (same names and meaning), plus ``num_threads``.

    ``accelerator`` cpu | gpu | cuda | auto; ``devices`` a count, a list of device indices or
    'auto'; ``strategy`` auto | ddp | ddp_spawn | ...: with several devices Lightning runs
    distributed data parallel training unchanged. ``precision`` follows the model dtype
    (float32 -> '32-true', float64 -> '64-true'). ``num_threads``: torch CPU threads (null: torch's
    default); on a machine shared with other jobs 1 avoids thread over-subscription.
    """

    accelerator: str = "auto"
    devices: Union[int, str, list[int]] = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    max_epochs: Optional[int] = 1000
    max_steps: int = -1
    max_time: Optional[str] = None
    gradient_clip_val: Optional[float] = 10.0
    gradient_clip_algorithm: Literal["norm", "value"] = "norm"
    accumulate_grad_batches: int = 1
    check_val_every_n_epoch: int = 1
    log_every_n_steps: int = 50
    limit_train_batches: Union[int, float] = 1.0
    limit_val_batches: Union[int, float] = 1.0
    num_sanity_val_steps: int = 2
    deterministic: bool = False
    benchmark: Optional[bool] = None
    enable_progress_bar: bool = True
    num_threads: Optional[int] = None

    def validate(self, section: str = "trainer") -> None:
        bad = partial(bad_key, section)

        if self.max_epochs is not None and (self.max_epochs < -1 or self.max_epochs == 0):
            bad("max_epochs", f"must be >= 1, or -1 / null (no limit), got {self.max_epochs} (a run of no epochs "
                "writes no checkpoint and no model)")
        if self.max_steps == 0 or self.max_steps < -1:
            bad("max_steps", f"must be >= 1, or -1 (no limit), got {self.max_steps}")
        if self.max_epochs is None and self.max_steps == -1 and not self.max_time:
            # was checked when the Trainer was built: after the data were read and the run folder's splits.npz,
            # config.resolved.yaml and data_summary.json written (a later run reused that split), and after
            # `sweep --dry-run` had passed the point (round 23)
            bad("max_epochs", f"is null and no {section}.max_steps / max_time is set: the run would never end")
        for key in ("limit_train_batches", "limit_val_batches"):
            value = getattr(self, key)
            if not value > 0 or (isinstance(value, float) and value > 1):
                bad(key, f"must be a fraction in (0, 1] or a count >= 1, got {value} (nothing to "
                    f"{'train' if key == 'limit_train_batches' else 'validate'} on)")
        if self.num_nodes < 1:
            bad("num_nodes", f"must be >= 1, got {self.num_nodes}")
        if self.accumulate_grad_batches < 1:
            bad("accumulate_grad_batches", f"must be >= 1, got {self.accumulate_grad_batches}")
        if self.check_val_every_n_epoch < 1:
            bad("check_val_every_n_epoch", f"must be >= 1, got {self.check_val_every_n_epoch}")
        if self.max_epochs is not None and 0 < self.max_epochs < self.check_val_every_n_epoch:
            import warnings

            warnings.warn(f"config key '{section}.check_val_every_n_epoch' is {self.check_val_every_n_epoch} but "
                          f"'{section}.max_epochs' is {self.max_epochs}: no validation will run, so no best "
                          "checkpoint is chosen and the last one is exported", UserWarning, stacklevel=2)
        if self.log_every_n_steps < 0:  # Lightning took -5 as 5 (step % -5 == 0), without a word
            bad("log_every_n_steps", f"must be >= 0 (0: no per-step logging), got {self.log_every_n_steps}")
        if self.num_sanity_val_steps < -1:
            bad("num_sanity_val_steps", f"must be >= 0, or -1 (the whole validation set), got {self.num_sanity_val_steps}")
        if self.gradient_clip_val is not None and self.gradient_clip_val < 0:
            bad("gradient_clip_val", f"must be >= 0 or null, got {self.gradient_clip_val}")
        if self.num_threads is not None and self.num_threads < 1:
            bad("num_threads", f"must be >= 1 or null, got {self.num_threads}")
        check_threads(self.num_threads, f"config key '{section}.num_threads'")
        if isinstance(self.devices, str) and self.devices != "auto" and not self.devices.lstrip("-").isdigit():
            bad("devices", f"must be an int, a list of ints or 'auto', got {self.devices!r}")
        count = int(self.devices) if isinstance(self.devices, (int, str)) and self.devices != "auto" else None
        if count is not None and count < 1 and count != -1:
            bad("devices", f"must be a count >= 1, -1 (all), a list of device indices or 'auto', got {self.devices!r}")
        if isinstance(self.devices, list) and (not self.devices or min(self.devices) < 0
                                                or len(set(self.devices)) != len(self.devices)):
            bad("devices", f"must list distinct device indices >= 0, got {self.devices!r}")
        # Lightning's names are lower case: 'CPU' passed check_accelerator (which compares without case) and was
        # then Lightning's "invalid accelerator name" traceback; an unknown name was refused only after the data
        # were read and cached. The GPU's presence is checked when the run starts (check_accelerator).
        if self.accelerator.strip().lower() not in ("auto", "cpu", "gpu", "cuda"):
            bad("accelerator", f"must be cpu, gpu (cuda) or auto, got {self.accelerator!r}")
        self.accelerator = self.accelerator.strip().lower()
        self._check_strategy(bad)
        if self.max_time is not None:
            parts = self.max_time.strip().split(":")
            if len(parts) != 4 or not all(part.isdigit() for part in parts):
                bad("max_time", f"must be 'DD:HH:MM:SS' (e.g. '00:12:00:00' for 12 hours) or null, got {self.max_time!r}")
            if not any(int(part) for part in parts):  # was "run/checkpoints/last.ckpt: checkpoint not found" after
                bad("max_time", f"is {self.max_time!r}, no time at all (a run of no time writes no checkpoint and "
                    "no model); give a time > 0, or null for no limit")

    def _check_strategy(self, bad) -> None:
        """A strategy name Lightning knows ('auto', 'ddp', 'ddp_spawn', ...): Lightning's own
        message for an unknown one is a traceback from inside the Trainer."""
        if self.strategy == "auto":
            return
        try:
            from lightning.pytorch.strategies import StrategyRegistry
        except ImportError:  # pragma: no cover - lightning is a dependency
            return
        names = set(StrategyRegistry.available_strategies())
        if self.strategy not in names:
            shown = sorted(n for n in names if "_find_unused" not in n and "_" not in n.replace("ddp_", ""))
            bad("strategy", f"must be 'auto' or one of Lightning's strategies ({', '.join(shown)}), got {self.strategy!r}")

    def lightning_kwargs(self) -> dict:
        """The keyword arguments for ``lightning.Trainer`` (without num_threads)."""
        values = to_dict(self)
        values.pop("num_threads")
        return values


def _data_config_class():
    from torchmdx.data.data_config import DataConfig

    return DataConfig


def _model_config(values: dict):
    """The typed ``model:`` section; ``model.architecture`` (default 'et') picks its class
    (torchmdx.nn.config.ARCHITECTURES; an unknown name is a one-line ConfigError naming the choices)."""
    from torchmdx.nn.config import architecture_config

    return architecture_config(values, "model")


@dataclass
class RunConfig:
    """The whole training config (see the module docstring)."""

    data: dict
    model: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run_dir: str = "runs/run"

    # the typed data/model sections (DataConfig, ModelConfig), filled by build_run_config
    data_config: object = field(default=None, init=False, repr=False)
    model_config: object = field(default=None, init=False, repr=False)

    def to_dict(self) -> dict:
        """Plain dict of the resolved config (every default written out)."""
        return {
            "data": to_dict(self.data_config),
            "model": to_dict(self.model_config),
            "train": to_dict(self.train),
            "trainer": to_dict(self.trainer),
            "run_dir": self.run_dir,
        }


SECTIONS = ("data", "model", "train", "trainer", "run_dir")


def build_run_config(values: dict, source: str = "config", check_data: bool = True) -> RunConfig:
    """A :class:`RunConfig` from a plain dict; one-line ConfigErrors for unknown keys, wrong types
    and a missing ``data:`` section; with ``check_data`` a DataError when ``data.path`` does not
    exist (all before anything is read)."""
    misplaced = {key: _sections_of(key) for key in values if key not in SECTIONS}
    misplaced = {key: found for key, found in misplaced.items() if found}
    if "data" not in values:
        flat = ""
        if misplaced:  # a flat config (TorchMD-NET's are): "sections present: lr, cutoff_upper, ..." named no way out
            shown = ", ".join(f"{key} is {found[0]}.{key}" for key, found in list(misplaced.items())[:3])
            flat = (f"; its keys are at the top level, where torchmdx's go into the sections data:, model:, train: and "
                    f"trainer: ({shown}; configs/demo.yaml shows the layout)")
        raise ConfigError(f"{source}: no 'data:' section; sections present: {', '.join(map(str, values)) or 'none'}"
                          f"{flat}")
    for key, found in misplaced.items():  # "config key 'lr_patience' does not exist; allowed: data, model, ..."
        where = (f"the {found[0]}: section" if len(found) == 1
                 else "the sections " + ", ".join(f"{s}:" for s in found[:-1]) + f" and {found[-1]}:")
        raise ConfigError(f"config key {key!r} does not exist at the top level; it is a key of {where} "
                          f"({', '.join(f'{s}.{key}' for s in found)})")
    for key in ("data", "model", "train", "trainer"):
        if key in values and values[key] is not None and not isinstance(values[key], dict):
            raise ConfigError(f"config key '{key}' must be a mapping of keys, got {values[key]!r}")
    # an empty section (`train:` with nothing under it) is no keys; `run_dir:` with nothing is null, not {}
    # (was "config key 'run_dir' must be a string, got {} (dict)")
    sections = ("data", "model", "train", "trainer")
    cfg = from_dict(RunConfig, {k: ({} if v is None and k in sections else v) for k, v in values.items()})
    # '~' as the shell would expand it: 'run_dir: ~/runs/x' put splits and config in a folder named '~' here while
    # Lightning (which expands it) wrote the checkpoints under the home folder; the run then ended in
    # "~/runs/x/checkpoints/last.ckpt: checkpoint not found"
    cfg.run_dir = expand_home(cfg.run_dir)
    cfg.data_config = from_dict(_data_config_class(), cfg.data, "data")
    model_values = dict(cfg.model)
    kind = model_values.pop("kind", "et")
    if kind != "et":
        raise ConfigError(f"config key 'model.kind' must be 'et' for training, got {kind!r}")
    cfg.model_config = _model_config(model_values)
    # the data follow the model's precision (positions and forces in the model's dtype)
    cfg.data_config = dataclasses.replace(cfg.data_config, dtype=cfg.model_config.dtype)
    # data.max_z and model.max_z both count embedding rows (atomic numbers 0 .. max_z-1); the data
    # layer checks the elements against the model's and sizes the reference table [max_z] with it
    model_max_z = cfg.model_config.max_z
    from torchmdx.data.data_config import MAX_Z_LIMIT

    if model_max_z > MAX_Z_LIMIT:  # 10**12 was "ran out of memory" after the cache and the run folder were made
        raise ConfigError(f"config key 'model.max_z' is {model_max_z}, above {MAX_Z_LIMIT}: it counts embedding rows "
                          f"(atomic numbers 0..max_z-1) and elements stop at Z = 118, so the rows above would never be "
                          f"used; give at most {MAX_Z_LIMIT} (as data.max_z)")
    if "max_z" in cfg.data and cfg.data_config.max_z != model_max_z:
        raise ConfigError(f"config key 'data.max_z' is {cfg.data_config.max_z} but model.max_z is {model_max_z}; "
                          "both count embedding rows (atomic numbers 0..max_z-1): drop data.max_z or make them equal")
    cfg.data_config = dataclasses.replace(cfg.data_config, max_z=model_max_z)
    check_cuda_graph(cfg)
    if check_data:
        from torchmdx.data.formats import check_format, resolve_source

        resolve_source(cfg.data_config.path, check_format(cfg.data_config.format))
    return cfg


def _sections_of(key) -> list:
    """The sections (data, model, train, trainer) that have a key named ``key``, for a key written at the top level."""
    from torchmdx.nn.config import ARCHITECTURES, model_config_class

    classes = {"data": [_data_config_class()],
               "model": [model_config_class({"architecture": name}) for name in ARCHITECTURES],
               "train": [TrainConfig], "trainer": [TrainerConfig]}
    return [section for section, kinds in classes.items()
            if any(key in {f.name for f in dataclasses.fields(kind) if f.init} for kind in kinds)]


def _device_count(devices) -> Optional[int]:
    """``trainer.devices`` as a count (-1: all), or None for 'auto'."""
    if isinstance(devices, list):
        return len(devices)
    if isinstance(devices, int) or (isinstance(devices, str) and devices.lstrip("-").isdigit()):
        return int(devices)
    return None


def resolve_cuda_graph(cfg: RunConfig) -> bool:
    """Whether this run trains through captured steps: ``train.cuda_graph`` true/false as given;
    ``auto``: true when the architecture's captured step has been checked on a GPU
    (``Potential.captured_training_auto``: the ET and the Equiformer), torch sees a CUDA GPU, ``trainer.accelerator``
    allows it (auto, gpu or cuda), the run is one process on one device (``trainer.devices`` 1 or
    a one-item list, or ``auto`` with one visible GPU; one node) and gradients are not
    accumulated."""
    wanted = cfg.train.cuda_graph
    if wanted != "auto":
        return bool(wanted)
    from torchmdx.nn.config import potential_class_of

    if not potential_class_of(cfg.model).captured_training_auto:
        return False
    trainer = cfg.trainer
    if str(trainer.accelerator) not in ("auto", "gpu", "cuda") or trainer.num_nodes > 1 or trainer.accumulate_grad_batches > 1:
        return False
    import torch

    if not torch.cuda.is_available():
        return False
    count = _device_count(trainer.devices)
    if count is None or count == -1:
        count = torch.cuda.device_count()
    return count == 1


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_cuda_graph(cfg: RunConfig) -> None:
    """``train.cuda_graph: true`` replays one optimiser step per batch: refuse gradient
    accumulation, several nodes, and under several devices (DDP: the captured step all-reduces
    the gradients itself, docs/training.md) a stress term (one-line ConfigError). ``auto`` is
    never refused: it is off where it cannot be on (:func:`resolve_cuda_graph`; off under DDP)."""
    if cfg.train.cuda_graph is False and cfg.train.cuda_graph_compile:
        import warnings

        warnings.warn(f"train.cuda_graph_compile: {str(cfg.train.cuda_graph_compile).lower()} has no effect with "
                      "train.cuda_graph: false (it compiles the captured step); training eagerly", UserWarning,
                      stacklevel=2)
    if cfg.train.cuda_graph is not True:
        return
    trainer = cfg.trainer
    devices = trainer.devices
    count = _device_count(devices)
    if trainer.num_nodes > 1:
        raise ConfigError(f"config key 'train.cuda_graph' needs one node (its DDP step is built and tested on the "
                          f"GPUs of one host), but trainer.num_nodes is {trainer.num_nodes}; set trainer.num_nodes: 1 "
                          "or train.cuda_graph: false")
    # 'auto' / -1: as many devices as there are GPUs (the module checks again at fit start)
    several = _visible_gpus() > 1 if count is None or count == -1 else count > 1
    if several and cfg.train.train_stress:
        raise ConfigError(f"config key 'train.cuda_graph' with several devices (trainer.devices {devices!r}) cannot "
                          "train on stress (train.stress_weight > 0: the captured step has no stress term, and under "
                          "DDP every step must go through it); set train.cuda_graph: false or train.stress_weight: 0")
    if trainer.accumulate_grad_batches > 1:
        raise ConfigError(f"config key 'train.cuda_graph' cannot be combined with trainer.accumulate_grad_batches "
                          f"{trainer.accumulate_grad_batches} (the graph applies the optimiser step at every batch)")


def load_run_config(path, overrides: Optional[list[str]] = None, run_dir: Optional[str] = None,
                    check_data: bool = True) -> RunConfig:
    """Read ``path`` (YAML), apply ``--set`` overrides and ``--run-dir``, validate."""
    from torchmdx.data.data_config import resolve_data_paths

    values = load_yaml(path)
    missing = resolve_data_paths(values, Path(path).parent, str(path), overrides)  # data files near the config
    values = apply_overrides(values, list(overrides or []))
    if run_dir is not None:
        values["run_dir"] = str(run_dir)
    cfg = build_run_config(values, str(path), check_data=check_data and not missing)
    if missing and check_data:
        from torchmdx.errors import DataError

        raise DataError(missing)
    return cfg


def resolved_yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


__all__ = ["RunConfig", "TrainConfig", "TrainerConfig", "build_run_config", "check_cuda_graph", "load_run_config",
           "resolve_cuda_graph",
           "resolved_yaml"]
