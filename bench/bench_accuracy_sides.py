"""bench/bench_accuracy.py's two sides: TorchMD-NET 3.0.0 trained through its own ``LNNP``,
``DataModule`` and a Lightning ``Trainer`` as ``torchmd-train`` builds them, and torchmdx through
``torchmdx.train.run.train``; the recipes (TorchMD-NET's ET-MD17 in its 3.0.0 argument names, the
per-kind changes of ``bench_accuracy_data.DATASETS``) and the wall-clock checkpoint callback both
sides share. The race's orchestration, scoring and CLI stay in bench_accuracy.py."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from torchmdx.errors import ConfigError  # noqa: E402
from torchmdx.io_utils import atomic_write  # noqa: E402

from bench_accuracy_data import (DATASETS, nonzero_table, torchmdnet_dataset, write_custom_dataset,  # noqa: E402
                                 write_torchmdnet_splits)
from bench_accuracy_scorer import EV_TO_MEV, count_parameters  # noqa: E402

#: parameters of the ET-MD17 recipe with the gated equivariant head (both projects)
EXPECTED_PARAMETERS = 1_339_906
TORCHMDX_CONFIG = ROOT / "configs" / "et_md17.yaml"

#: TorchMD-NET's examples/ET-MD17.yaml in TorchMD-NET 3.0.0's argument names
#: (energy_weight/force_weight -> y_weight/neg_dy_weight, ema_alpha_dy -> ema_alpha_neg_dy)
TORCHMDNET_RECIPE = dict(
    model="equivariant-transformer", embedding_dimension=128, num_layers=6, num_heads=8, num_rbf=32,
    rbf_type="expnorm", trainable_rbf=False, activation="silu", attn_activation="silu", neighbor_embedding=True,
    distance_influence="both", cutoff_lower=0.0, cutoff_upper=5.0, max_z=100, max_num_neighbors=32,
    vector_cutoff=True, output_model="Scalar", reduce_op="add", aggr="add", prior_model=None, derivative=True,
    standardize=True, precision=32, batch_size=8, inference_batch_size=64, lr=1.0e-3, lr_warmup_steps=1000,
    lr_factor=0.8, lr_patience=30, lr_min=1.0e-7, weight_decay=0.0, y_weight=0.2, neg_dy_weight=0.8,
    ema_alpha_y=0.05, ema_alpha_neg_dy=1.0, train_loss="mse_loss", gradient_clipping=0.0,
    early_stopping_patience=300, save_interval=10, test_interval=-1, num_workers=6,
)
#: --small: a model small enough for a CPU smoke test (both sides)
SMALL = dict(embedding_dimension=32, num_layers=2)
#: validation values shown in the progress lines: (metric key, label, factor to meV, unit)
PROGRESS_METRICS = (("val_forces_mae", "val F MAE", 1.0, "meV/Å"), ("val_energy_mae", "val E MAE", 1.0, "meV"),
                    ("val_neg_dy_l1_loss", "val F L1", EV_TO_MEV, "meV/Å"),
                    ("val_y_l1_loss", "val E L1 (loss EMA)", EV_TO_MEV, "meV"))


# =============================================================================================
# checkpoints along the run (the same callback on both sides)
def _callback_base():
    try:
        from lightning.pytorch.callbacks import Callback
    except ImportError:  # pragma: no cover - torchmdx needs lightning; TorchMD-NET too
        from pytorch_lightning.callbacks import Callback
    return Callback


class WallClockCheckpoints(_callback_base()):
    """Save a full checkpoint at train start, every ``every`` seconds (or, with ``every_steps`` K,
    after every K-th optimiser step: checkpoints at the same steps on both sides, for a per-step
    comparison) and at train end; keep a JSON log of (t since fit start, t since train start,
    step, epoch, file, save seconds, learning rate)."""

    def __init__(self, side: str, dirpath: Path, log_path: Path, every: float, expected_parameters=None,
                 every_steps=None):
        super().__init__()
        self.side, self.dirpath, self.log_path, self.every = side, Path(dirpath), Path(log_path), float(every)
        self.every_steps = int(every_steps) if every_steps else None
        self.expected_parameters = expected_parameters
        self.records: list[dict] = []
        self.t_fit = self.t_train = self.last = None
        self.parameters = None
        self.save_seconds = 0.0

    # -- hooks
    def on_fit_start(self, trainer, pl_module):
        self.t_fit = time.monotonic()
        model = getattr(pl_module, "model", pl_module)
        self.parameters = count_parameters(model)
        note = ""
        if self.expected_parameters is not None and self.parameters != self.expected_parameters:
            note = f"   <-- NOT the recipe's {self.expected_parameters:,}"
        print(f"[{self.side}] trainable model parameters: {self.parameters:,}{note}", flush=True)

    def on_train_start(self, trainer, pl_module):
        self.t_train = time.monotonic()
        if self.t_fit is None:
            self.t_fit = self.t_train
        print(f"[{self.side}] train start {self.t_train - self.t_fit:.1f} s after fit start "
              "(Lightning's max_time counts from here)", flush=True)
        self._save(trainer, "start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every_steps is not None:
            step = int(trainer.global_step)
            if step % self.every_steps == 0 and (not self.records or self.records[-1]["step"] != step):
                self._save(trainer, "periodic")
        elif time.monotonic() - self.last >= self.every:
            self._save(trainer, "periodic")

    def on_train_end(self, trainer, pl_module):
        self._save(trainer, "end")

    # -- saving
    def _save(self, trainer, kind: str) -> None:
        now = time.monotonic()
        step, epoch = int(trainer.global_step), int(trainer.current_epoch)
        if kind == "end" and self.records and self.records[-1]["step"] == step:
            # no step since the last checkpoint: the same weights, at the time training ended
            path, saved = Path(self.records[-1]["file"]), now
        else:
            path = self.dirpath / f"{self.side}_{len(self.records):03d}_step{step}.ckpt"
            self.dirpath.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(str(path), weights_only=False)
            saved = time.monotonic()
        self.save_seconds += saved - now
        record = {"t": now - self.t_fit, "t_train": now - self.t_train, "step": step, "epoch": epoch,
                  "kind": kind, "save_s": saved - now, "lr": current_lr(trainer), "file": str(path)}
        self.records.append(record)
        self.write_log()
        self.last = saved
        print(f"[{self.side}] {self.progress_line(trainer, record)}", flush=True)

    def progress_line(self, trainer, record: dict) -> str:
        rate = record["step"] / record["t_train"] if record["t_train"] > 0 else 0.0
        parts = [f"t {record['t']:7.1f} s", f"step {record['step']:6d}", f"epoch {record['epoch']:4d}",
                 f"{rate:6.2f} steps/s", f"checkpoint {record['save_s']:.2f} s"]
        metrics = getattr(trainer, "callback_metrics", {}) or {}
        for key, label, factor, unit in PROGRESS_METRICS:
            if key in metrics:
                try:
                    parts.append(f"{label} {factor * float(metrics[key]):.4g} {unit}")
                except (TypeError, ValueError):
                    pass
        return " | ".join(parts)

    def write_log(self) -> None:
        payload = {"side": self.side, "parameters": self.parameters, "every_s": self.every, "every_steps": self.every_steps,
                   "save_seconds": self.save_seconds, "checkpoints": self.records}
        with atomic_write(self.log_path, "w") as handle:
            json.dump(payload, handle, indent=1)


def current_lr(trainer):
    """The optimiser's learning rate now (warm-up and plateau included), None without one."""
    try:
        return float(trainer.optimizers[0].param_groups[0]["lr"])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None


# =============================================================================================
# the two sides
def max_time_string(seconds: float) -> str:
    """Lightning's max_time as DD:HH:MM:SS (whole seconds, at least 1)."""
    s = max(1, int(round(seconds)))
    return f"{s // 86400:02d}:{s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def max_steps(ctx: dict) -> int:
    """Lightning's ``max_steps`` for both Trainers: ``--max-steps`` N (optimiser steps), else -1
    (no limit: the wall clock alone ends the run)."""
    n = ctx.get("max_steps")
    return int(n) if n is not None else -1


def accelerator(device: str) -> str:
    return "gpu" if device.startswith("cuda") else "cpu"


def torchmdnet_recipe(kind: str, small: bool = False) -> dict:
    """TorchMD-NET's hyper-parameters for data kind ``kind``: the ET-MD17 recipe, the kind's
    changes (``DATASETS[kind]["torchmdnet"]``), then ``--small``'s (no TorchMD-NET import)."""
    hp = dict(TORCHMDNET_RECIPE)
    hp.update(DATASETS[kind]["torchmdnet"])
    if small:
        hp.update(SMALL)
    return hp


def torchmdnet_hparams(ctx: dict) -> dict:
    """TorchMD-NET's own argument defaults (its get_argparse), the recipe, and this run's files."""
    from torchmdnet.scripts.train import get_argparse

    hp = vars(get_argparse().parse_args([]))
    hp.update(torchmdnet_recipe(ctx["kind"], ctx["small"]))
    files = ctx.get("tmdnet_files")
    if files:  # one molecule: TorchMD-NET's Custom dataset files; else the in-memory dataset given to DataModule
        hp.update(dataset="Custom", coord_files=files["coord"], embed_files=files["embed"], energy_files=files["energy"],
                  force_files=files["force"])
    hp.update(splits=str(ctx["tmdnet_splits"]), train_size=ctx["sizes"][0], val_size=ctx["sizes"][1],
              test_size=ctx["sizes"][2], seed=ctx["seed"], log_dir=str(ctx["work"] / "tmdnet"), num_epochs=1_000_000,
              ngpus=1)
    if ctx["workers"] is not None:
        hp["num_workers"] = ctx["workers"]
    return hp


def check_torchmdnet() -> None:
    """One-line error when TorchMD-NET cannot be imported."""
    try:
        import importlib

        for module in ("torchmdnet.data", "torchmdnet.module"):
            importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"TorchMD-NET is not importable ({exc}); install the wheels: python3 -m pip install "
                          "--no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD") from None


def run_torchmdnet(ctx: dict, callback: WallClockCheckpoints) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from torchmdnet.data import DataModule
    from torchmdnet.models.model import create_prior_models
    from torchmdnet.module import LNNP

    dataset = None
    if ctx["kind"] == "md17":
        ctx["tmdnet_files"] = write_custom_dataset(ctx["frames"], ctx["work"] / "tmdnet_data")
    else:  # molecules of different sizes: Data(z, pos, y, neg_dy) in memory, the shared references as get_atomref()
        dataset = torchmdnet_dataset(ctx["frames"], ctx["references"])
    ctx["tmdnet_splits"] = ctx["work"] / "tmdnet_splits.npz"
    write_torchmdnet_splits(ctx["split_file"], len(ctx["frames"]["energy"]), ctx["frames"]["hash"], ctx["tmdnet_splits"])
    hp = torchmdnet_hparams(ctx)
    os.makedirs(hp["log_dir"], exist_ok=True)
    # what torchmdnet.scripts.train.main does, with max_time and our checkpoint callback added
    pl.seed_everything(hp["seed"], workers=True)
    data = DataModule(hp, dataset=dataset)
    data.prepare_data()
    data.setup("fit")
    prior_models = create_prior_models(hp, data.dataset)
    hp["prior_args"] = [p.get_init_args() for p in prior_models]
    model = LNNP(hp, prior_model=prior_models, mean=data.mean, std=data.std)
    monitor = hp["checkpoint_monitor"]
    callbacks = [ModelCheckpoint(dirpath=hp["log_dir"], monitor=monitor, save_top_k=10, every_n_epochs=hp["save_interval"],
                                 filename=f"epoch={{epoch}}-{monitor.split('_')[0]}_loss={{{monitor}:.4f}}",
                                 auto_insert_metric_name=False),
                 EarlyStopping(hp["early_stopping_monitor"], patience=hp["early_stopping_patience"]),
                 callback]
    trainer = pl.Trainer(strategy="auto", max_epochs=hp["num_epochs"], max_time=ctx["max_time"],
                         max_steps=max_steps(ctx), accelerator=accelerator(ctx["device"]), devices=1, num_nodes=1, default_root_dir=hp["log_dir"],
                         callbacks=callbacks, logger=[CSVLogger(hp["log_dir"], name="", version="")],
                         precision=hp["precision"], gradient_clip_val=hp["gradient_clipping"], inference_mode=False,
                         enable_progress_bar=False)
    trainer.fit(model, data)
    info = {"epochs": int(trainer.current_epoch), "steps": int(trainer.global_step),
            "best_checkpoint": callbacks[0].best_model_path or None,
            "hparams": {k: v for k, v in hp.items() if k in TORCHMDNET_RECIPE or k in ("seed", "num_workers", "prior_args")},
            "atomic_references": nonzero_table(data.atomref.reshape(-1).double().numpy())
            if hp.get("prior_model") == "Atomref" and data.atomref is not None else {},
            "standardize_mean_std": [float(data.mean.reshape(-1)[0]), float(data.std.reshape(-1)[0])]
            if data.mean is not None else None}
    try:
        from importlib.metadata import version

        info["version"] = version("torchmd-net")
    except Exception:  # noqa: BLE001 - informative only
        info["version"] = None
    del trainer, model, data
    return info


def torchmdx_values(ctx: dict) -> tuple[dict, list]:
    """The torchmdx config (``--config``, default configs/et_md17.yaml) with this run's
    overrides, then the --torchmdx-set ones."""
    from torchmdx.config import apply_overrides, load_yaml

    values = load_yaml(ctx["config"])
    data, model, train, trainer = (values.setdefault(k, {}) for k in ("data", "model", "train", "trainer"))
    recipe = DATASETS[ctx["kind"]]
    data.update(path=str(ctx["data_path"]), format=recipe["format"], cache_dir=str(ctx["work"] / "cache"),
                train_size=ctx["sizes"][0], val_size=ctx["sizes"][1], test_size=ctx["sizes"][2],
                split_file=str(Path(ctx["split_file"]).resolve()), seed=ctx["seed"], **recipe.get("reader", {}),
                **recipe["torchmdx_data"])
    if ctx["workers"] is not None:
        data["num_workers"] = ctx["workers"]
    if Path(ctx["config"]).resolve() == default_config(ctx["kind"]).resolve():
        model.update(recipe.get("torchmdx_model", {}))  # the kind's own recipe: TorchMD-NET's model
        if ctx["small"]:
            model.update(SMALL)
    train.update(seed=ctx["seed"], cuda_graph=ctx["device"].startswith("cuda"))
    trainer.update(max_time=ctx["max_time"], max_steps=max_steps(ctx), max_epochs=1_000_000, accelerator=accelerator(ctx["device"]), devices=1,
                   enable_progress_bar=False)
    values["run_dir"] = str(ctx["work"] / "torchmdx_run")
    sets = list(ctx["torchmdx_set"])
    return apply_overrides(values, sets), sets


def run_torchmdx(ctx: dict, callback: WallClockCheckpoints) -> dict:
    from torchmdx.train.config import build_run_config
    from torchmdx.train.run import train

    values, sets = torchmdx_values(ctx)
    cfg = build_run_config(values, str(ctx["config"]))
    print(f"[{ctx['run']}] config {Path(ctx['config']).name} + overrides; --torchmdx-set: {sets or 'none'}", flush=True)
    result = train(cfg, callbacks=[callback])
    return {"epochs": result.get("epochs"), "steps": result.get("global_step"), "config": cfg.to_dict(),
            "best_checkpoint": result.get("checkpoint_best"),
            "torchmdx_set": sets, "version": _torchmdx_version(), "atomic_references": _torchmdx_references(values)}


def _torchmdx_references(values: dict) -> dict:
    """The reference energies torchmdx's data module fitted ({Z: eV}, from the run folder's
    data_state.json; empty when it is not there)."""
    path = Path(values["run_dir"]) / "data_state.json"
    try:
        return nonzero_table(json.loads(path.read_text())["atomic_references"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _torchmdx_version() -> str:
    import torchmdx

    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return torchmdx.__version__ + (f" ({rev})" if rev else "")


RUNNERS = {"torchmdnet": run_torchmdnet, "torchmdx": run_torchmdx}


def default_config(kind: str) -> Path:
    """torchmdx's config of a data kind when ``--config`` is not given."""
    return Path(DATASETS[kind].get("config", TORCHMDX_CONFIG))


def expected_parameters(kind: str, config: Path, small: bool):
    """The recipe's parameter count (both sides) for the kind's own config, else None."""
    if small or config.resolve() != default_config(kind).resolve():
        return None
    return DATASETS[kind].get("parameters", EXPECTED_PARAMETERS)
