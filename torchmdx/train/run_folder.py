"""The run folder of a training run: the names of the files it holds (the layout: :mod:`torchmdx.train.run`'s
docstring), and the checks made of it before a run starts (moved out of :mod:`torchmdx.train.run`, 2026-12-07;
its callers import these names from there, as before).

A new run is not mixed into an old one (a folder with checkpoints needs ``--resume``; a ``splits.npz`` left by
an earlier run that drew another split is refused: :func:`check_run_dir`). A resumed run's ``last.ckpt`` must be
readable and its weights fit the model of the config (:func:`_check_checkpoint_fits`, run on the prepared
module), and the config may not change the model, the data (other than :data:`RESUME_MUTABLE_DATA_KEYS` and
:data:`RESUME_MUTABLE_MODEL_KEYS`), EMA on or off, or the loss while ``val_loss`` is monitored.
"""

from __future__ import annotations

from pathlib import Path

from torchmdx.errors import ConfigError
from torchmdx.train.config import RunConfig

CHECKPOINT_DIR = "checkpoints"
BEST = "best"
LAST = "last"
RESOLVED_CONFIG = "config.resolved.yaml"
MODEL_FILE = "model.pt"
LEARNING_CURVE = "learning_curve.png"
METRICS_CSV = Path("logs") / "csv" / "metrics.csv"

#: data keys that may change when a run is resumed (they do not change what is learned)
#: (max_z follows model.max_z, which may not change; runs made before data.max_z took the model's
#: meaning saved model.max_z - 1 there)
RESUME_MUTABLE_DATA_KEYS = {"num_workers", "inference_batch_size", "cache_dir", "mmap", "max_z", "device_resident",
                            "check_labels"}
RESUME_MUTABLE_MODEL_KEYS = {"backend"}


def _check_checkpoint_readable(last: Path) -> None:
    """One-line ConfigError for an empty or unreadable checkpoint, naming a good one to copy."""
    import torch

    problem = None
    if last.stat().st_size == 0:
        problem = "is empty"
    else:
        try:
            torch.load(last, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - any failure to read means a damaged file
            problem = f"cannot be read ({type(exc).__name__}; truncated?)"
    if problem is None:
        return
    good = [p for p in sorted(last.parent.glob("*.ckpt")) if p != last and p.stat().st_size > 0]
    offer = f"; to continue from {good[0]}, copy it over {last} and run again" if good else ""
    raise ConfigError(f"--resume: {last} {problem}{offer}")


def _check_checkpoint_fits(last: Path, module) -> None:
    """The checkpoint's weights against the module's: names and shapes (a checkpoint of another
    torchmdx version's layout, or of another model with no saved config to compare, was Lightning's
    36-line "Error(s) in loading state_dict" traceback)."""
    import torch

    from torchmdx.nn.graph_attention import upgrade_state_dict

    state = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("state_dict")
    expected = module.state_dict()
    if not isinstance(state, dict):
        raise ConfigError(f"--resume: {last} holds no weights ('state_dict'); it is no checkpoint of torchmdx train")
    # entries of an older layout that the model converts as it loads them (GATr's and the
    # transformer's attention key biases, dropped 2026-12-06) are compared after that conversion
    state = upgrade_state_dict(module, dict(state))
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [k for k in sorted(set(state) & set(expected))
              if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:3]}"] if missing else []
        parts += [f"unexpected {unexpected[:3]}"] if unexpected else []
        for k in shapes[:2]:
            parts.append(f"{k} of shape {list(getattr(state[k], 'shape', []))}, expected {list(expected[k].shape)}")
        detail = "; ".join(parts)
        raise ConfigError(f"--resume: {last}: its weights do not fit the model of this config ({detail}); written by "
                          "another torchmdx version, or for another model? Start a new run (another --run-dir)")


def _check_resumed_ema(old: dict, new: dict, run_dir: Path) -> None:
    """EMA turned on or off between a run and its resumption: a checkpoint of an EMA run holds the
    averaged weights as its weights (the training weights beside them), so resuming it without EMA
    went on training the average with the training weights' optimiser state, the training weights
    dropped silently; and an average started at the resumption is not the run's. Another decay
    value is fine."""
    if "ema_decay" not in old:
        return
    before, after = old.get("ema_decay"), new.get("ema_decay")
    if (before is None) != (after is None):
        raise ConfigError(f"--resume: config key 'train.ema_decay' is {_shown(after)} but the run in {run_dir} was "
                          f"started with {_shown(before)}; a resumed run keeps its weight averaging on or off (a "
                          "new decay value is fine)")


#: train keys that define val_loss: a resumed run that changes one compares its new losses with the old best
_LOSS_KEYS = ("energy_weight", "force_weight", "stress_weight", "loss", "huber_delta", "energy_loss")


def _check_resumed_loss(old: dict, new: dict, run_dir: Path) -> None:
    """The loss redefined on resume while ``val_loss`` is monitored (round 28): Lightning restores the best
    checkpoint's score, a val_loss of the old weights, and compares the new losses with it, so best.ckpt and
    model.pt stayed the checkpoint from before the change (``train.force_weight`` 1 -> 1000) or jumped to the first
    one after it, without a word. Another monitor (an error, such as val_forces_mae) starts its own record."""
    if old.get("monitor", "val_loss") != "val_loss" or new.get("monitor", "val_loss") != "val_loss":
        return
    for key in _LOSS_KEYS:
        if key in old and old.get(key) != new.get(key):
            raise ConfigError(f"--resume: config key 'train.{key}' is {_shown(new.get(key))} but the run in {run_dir} "
                              f"was started with {_shown(old.get(key))}, and train.monitor val_loss is computed with "
                              "it: the best checkpoint's val_loss is of the old loss, so best.ckpt and model.pt would "
                              "be chosen by comparing losses of two definitions; keep the value, or set train.monitor "
                              "to an error that does not depend on it (e.g. val_forces_mae, val_energy_mae)")


def _shown(value) -> str:
    """A config value as the YAML a user wrote: ``null`` for None (was Python's ``None``), else its repr."""
    return "null" if value is None else repr(value)


def _check_resumed_architecture(old: dict, new: dict, run_dir: Path) -> None:
    """A resumed run with another ``model.architecture``: the key-by-key comparison named the first key (in
    name order) the two architectures' sections differ in ("config key 'model.activation' is None but the run
    ... was started with 'silu'" for et -> transformer); the ET's section has no ``architecture`` key."""
    before, after = old.get("architecture") or "et", new.get("architecture") or "et"
    if before != after:
        raise ConfigError(f"--resume: config key 'model.architecture' is {after!r} but the run in {run_dir} was "
                          f"started with {before!r}; a resumed run keeps its model and data (train a new run with "
                          "--run-dir for another architecture)")


def check_run_dir(cfg: RunConfig, resume: bool) -> Path:
    """The run folder; refuse to mix a new run into an old one, and a resumed run whose model or
    data differ from the saved config."""
    from torchmdx.io_utils import unwritable_folder

    if str(cfg.run_dir).strip() in ("", "."):
        raise ConfigError("config key 'run_dir' (or --run-dir) is empty; give a folder for the run, e.g. runs/my_run")
    run_dir = Path(cfg.run_dir)
    problem = unwritable_folder(run_dir)
    if problem:
        raise ConfigError(f"run_dir {run_dir}: {problem}")
    last = run_dir / CHECKPOINT_DIR / f"{LAST}.ckpt"
    if resume:
        if not last.is_file():
            raise ConfigError(f"--resume: {last} not found; nothing to resume in {run_dir}")
        _check_checkpoint_readable(last)
        saved_path = run_dir / RESOLVED_CONFIG
        if saved_path.is_file():
            from torchmdx.config import load_yaml

            try:  # cut short or damaged: yaml's multi-line traceback before
                saved = load_yaml(saved_path)
            except ConfigError as exc:
                raise ConfigError(f"--resume: {exc}; the run's saved config is damaged: put back a copy, or delete it "
                                  "to resume without checking that the model and data are unchanged") from None
            now = cfg.to_dict()
            _check_resumed_architecture(saved.get("model") or {}, now["model"], run_dir)
            for section, mutable in (("model", RESUME_MUTABLE_MODEL_KEYS), ("data", RESUME_MUTABLE_DATA_KEYS)):
                old, new = saved.get(section) or {}, now[section]
                for key in sorted(set(old) | set(new)):
                    if key not in mutable and old.get(key) != new.get(key):
                        raise ConfigError(
                            f"--resume: config key '{section}.{key}' is {_shown(new.get(key))} but the run in "
                            f"{run_dir} was started with {_shown(old.get(key))}; a resumed run keeps its model and data"
                        )
            _check_resumed_ema(saved.get("train") or {}, now.get("train") or {}, run_dir)
            _check_resumed_loss(saved.get("train") or {}, now.get("train") or {}, run_dir)
    else:
        ckpt_dir = run_dir / CHECKPOINT_DIR
        if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
            raise ConfigError(f"{run_dir} already holds a run (checkpoints/); pass --resume to continue it "
                              "or --run-dir for a new folder")
        _check_leftover_split(cfg, run_dir)
    return run_dir


#: the data keys that decide a drawn split (a run folder's splits.npz is reused by a new run in that folder)
SPLIT_KEYS = ("path", "format", "group_key", "train_size", "val_size", "test_size", "split_by_group", "val_groups",
              "test_groups", "seed")


def _same_file(a, b) -> bool:
    """Whether ``a`` and ``b`` (a config's data.path, absolute or from the current folder) name one existing file."""
    try:
        return isinstance(a, str) and isinstance(b, str) and Path(a).samefile(b)
    except OSError:
        return False


def _check_leftover_split(cfg: RunConfig, run_dir: Path) -> None:
    """A run folder holding the splits.npz of an earlier run that wrote no checkpoint (stopped before its first
    epoch ended) and whose saved config drew another split: a new run there reused that split, silently, whatever
    its own sizes or seed said (round 23). The same config reuses it, as before; ``data.split_file`` replaces it."""
    from torchmdx.data.ranks import global_rank
    from torchmdx.data.splits import SPLIT_FILE_NAME

    saved_path = run_dir / RESOLVED_CONFIG
    if cfg.data_config.split_file is not None or global_rank() != 0 or not (run_dir / SPLIT_FILE_NAME).is_file() \
            or not saved_path.is_file():
        return
    from torchmdx.config import key_name, load_yaml

    try:
        old = load_yaml(saved_path).get("data") or {}
    except (ConfigError, AttributeError):
        return  # not a config torchmdx wrote: the split file is taken as before
    new = cfg.to_dict()["data"]
    if isinstance(old.get("format"), str):  # data.format is stored in lower case since round 31 ('MD17' before)
        old["format"] = old["format"].lower()
    changed = [key for key in SPLIT_KEYS if old.get(key) != new.get(key) and not _same_file(old.get(key), new.get(key))]
    if changed:
        key = changed[0]
        raise ConfigError(f"{run_dir / SPLIT_FILE_NAME}: left by an earlier run in {run_dir} that wrote no checkpoint, "
                          f"with {key_name('data.' + key)} {old.get(key)!r} (this config: {new.get(key)!r}); this run "
                          "would train on that split, not the one its config draws: delete the file (or the folder), "
                          "or give another --run-dir")
