"""Which run trained a model file, and whether another run's split may be used to score it.

A model file written from a training run (the run's ``model.pt``, ``torchmdx export RUN/checkpoints/x.ckpt``)
holds a ``training`` record (:func:`run_record`)::

    run        the run folder's name ("ethanol_a")
    run_dir    the run folder as training named it
    data       the data source of its config (data.path), or None
    data_hash  the content hash its splits.npz records ("" where none)
    split      :func:`torchmdx.data.splits.split_digest` of its splits.npz: 12 hex digits over the
               train/val/test indices, the number of structures and the content hash
    sizes      {"train": n, "val": n, "test": n}

``torchmdx evaluate MODEL --run RUN`` compares ``split`` with the digest of RUN's splits.npz
(:func:`check_model_run`): another run's split may hold the model's training structures in its test part,
so the errors come out too good. Equal digests (a copied run folder, two runs with the same data and seed)
are the same split: nothing to say. A model file without the record (older files, imported and analytic
models, a new model saved from Python, a checkpoint written before round 27 and exported from outside its run
folder) cannot be checked: a warning that says so.

Every checkpoint of a run holds the record too (``checkpoint["torchmdx"]["training"]``), so that one copied out
of its run folder exports a model file with its run (:func:`checkpoint_run_record`); a model loaded with
``load_model`` keeps it (``Potential.training_record``) and ``Potential.save`` writes it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Union

from torchmdx.errors import ConfigError, TorchmdxError


#: why a model file may record no run (evaluate's warning says them)
NO_RECORD_REASONS = ("the model file was written before torchmdx recorded runs, saved from a new model in Python, "
                     "imported or analytic, or exported from a checkpoint that records no run and lay outside its "
                     "run folder")


def run_record(run_dir: Union[str, Path]) -> Optional[dict]:
    """The training record of the run in ``run_dir`` (from its splits.npz and config.resolved.yaml), or None
    where the folder holds no readable splits.npz."""
    from torchmdx.data.splits import SPLIT_FILE_NAME, load_split, split_digest

    run_dir = Path(run_dir)
    if not (run_dir / SPLIT_FILE_NAME).is_file():
        return None
    try:
        split = load_split(run_dir / SPLIT_FILE_NAME)
    except TorchmdxError:
        return None
    content_hash = str(split.info.get("hash", ""))
    return {"run": run_dir.resolve().name, "run_dir": str(run_dir), "data": _data_source(run_dir),
            "data_hash": content_hash, "split": split_digest(split, content_hash), "sizes": split.sizes()}


def _data_source(run_dir: Path) -> Optional[str]:
    from torchmdx.train.run import RESOLVED_CONFIG

    try:
        import yaml

        values = yaml.safe_load((run_dir / RESOLVED_CONFIG).read_text())
        path = values["data"]["path"]
    except Exception:  # noqa: BLE001 - a record without its data source is still a record of the split
        return None
    return str(path) if isinstance(path, (str, list)) else None


def checkpoint_run_record(checkpoint: Union[str, Path]) -> Optional[dict]:
    """The record of the run that wrote a checkpoint: the one the checkpoint holds (``torchmdx.training``,
    written by every run since round 27, so a checkpoint copied out of its run folder, or into another run's,
    still names its own run), else that of the run folder it lies in (:func:`folder_run_record`: older
    checkpoints), else None (an older checkpoint moved out of its run folder: the model file records no run).
    Reads the checkpoint (memory-mapped); an export has read it already and keeps its record on the potential
    (:func:`torchmdx.train.export.potential_from_checkpoint`), so it asks only :func:`folder_run_record`."""
    own = _stored_record(Path(checkpoint))
    if own is not None:
        return own
    return folder_run_record(checkpoint)


def folder_run_record(checkpoint: Union[str, Path]) -> Optional[dict]:
    """The record of the run folder a checkpoint lies in (``RUN/checkpoints/x.ckpt``: for checkpoints that hold
    none, written before round 27), or None where it lies elsewhere."""
    from torchmdx.train.run import CHECKPOINT_DIR

    checkpoint = Path(checkpoint)
    if checkpoint.parent.name != CHECKPOINT_DIR:
        return None
    return run_record(checkpoint.parent.parent)


def _stored_record(checkpoint: Path) -> Optional[dict]:
    """The ``training`` record a checkpoint file holds (:func:`stored_run_record`), or None (an unreadable file:
    export names what the file is)."""
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            payload = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - export names what the file is
        return None
    return stored_run_record(payload)


def stored_run_record(payload) -> Optional[dict]:
    """The ``training`` record of a loaded checkpoint (``payload["torchmdx"]["training"]``), or None (older
    checkpoints, other files)."""
    extra = payload.get("torchmdx") if isinstance(payload, Mapping) else None
    record = extra.get("training") if isinstance(extra, Mapping) else None
    if not isinstance(record, Mapping) or not isinstance(record.get("split"), str):
        return None
    return dict(record)


def _data_name(data) -> str:
    """', data e.npz' (a list of files: the first and a count), or ''."""
    if isinstance(data, (list, tuple)) and data:
        more = f" and {len(data) - 1} more" if len(data) > 1 else ""
        return f", data {Path(str(data[0])).name}{more}"
    return f", data {Path(data).name}" if isinstance(data, str) and data else ""


def _describe(record: Mapping) -> str:
    run = record.get("run_dir") or record.get("run") or "?"
    return f"{run} (split {record.get('split')}{_data_name(record.get('data'))})"


def check_model_run(model_path: Union[str, Path], record: Optional[Mapping], run_dir: Union[str, Path],
                    option: str = "--run", allow: bool = False, split: str = "test") -> Optional[str]:
    """Compare the model file's training ``record`` with the split of ``run_dir``.

    Returns None where they agree, or a warning line (without ``warning:``) where the model records no run
    (it cannot be checked) or, with ``allow`` (``--allow-other-run``), another run. Another run without
    ``allow``: a one-line ConfigError naming both runs."""
    run_dir = Path(run_dir)
    name = Path(model_path).name
    if record is None:
        return (f"{name} records no training run, so it cannot be checked that {option} {run_dir}'s split holds "
                f"none of its training structures ({NO_RECORD_REASONS}); export it again from its run's "
                "checkpoints folder (RUN/checkpoints/best.ckpt) to record the run")
    here = run_record(run_dir)
    if here is None:
        return None  # no readable splits.npz: evaluate names the problem when it reads the split
    if here["split"] == record.get("split"):
        return None
    said = f"{name} was trained in run {_describe(record)}, not in {option} {_describe(here)}"
    if allow:
        return f"{said}: its {split} split may hold the model's training structures (--allow-other-run: " \
               "evaluating anyway)"
    raise ConfigError(f"{said}: the {split} split of {run_dir} may hold the model's training structures, so its "
                      f"errors would come out too good; give the model's own run folder as {option}, leave it out, "
                      "or pass --allow-other-run to evaluate anyway")


def all_split_warning(model_path: Union[str, Path], record: Optional[Mapping], content_hash: str,
                      data: Union[str, Path]) -> Optional[str]:
    """A warning line (without ``warning:``) where ``evaluate --split all`` scores a model on the data file it
    was trained on (the record's content hash is ``content_hash``): every structure includes its training and
    validation structures, so the errors come out too good (round 27: silent before); else None."""
    if record is None or not content_hash or record.get("data_hash") != content_hash:
        return None
    sizes = record.get("sizes") if isinstance(record.get("sizes"), Mapping) else {}
    seen = ""
    if isinstance(sizes.get("train"), int) and isinstance(sizes.get("val"), int):
        seen = f" ({sizes['train']} training and {sizes['val']} validation structures)"
    run = record.get("run_dir") or record.get("run") or "?"
    name = _data_name(data).removeprefix(", data ") or str(data)
    return (f"{Path(model_path).name} was trained on {name} (run {run}): --split all scores the "
            f"structures it was trained on too{seen}, so the errors come out too good; give --run {run} to score "
            "its test split only (or --split all to score every structure without this warning)")


def run_cutoff(run_dir: Union[str, Path]) -> Optional[float]:
    """The cutoff (Å) of the model the run in ``run_dir`` trained (its config.resolved.yaml's
    ``model.cutoff_upper``), or None where the folder does not say (no file, no number)."""
    from torchmdx.train.run_folder import RESOLVED_CONFIG

    try:
        import yaml

        value = yaml.safe_load((Path(run_dir) / RESOLVED_CONFIG).read_text())["model"]["cutoff_upper"]
    except Exception:  # noqa: BLE001 - a run folder without a readable config: nothing to compare
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def check_model_cutoff(model_path: Union[str, Path], model_cutoff: float, record: Optional[Mapping],
                       run_dir: Union[str, Path], option: str = "--run", allow: bool = False,
                       split: str = "test") -> Optional[str]:
    """A model whose cutoff is not the one ``run_dir``'s config trained was not trained in that run (round 35: was
    scored without a word, the run's learning curve written beside its report as if it were the model's).
    Returns None where the cutoffs agree (or the run does not say), else a warning line (without ``warning:``):
    the model records the run's own split (another run on the same split, e.g. a sweep over the cutoff: its
    errors are fair, the run's learning curve is not the model's), or ``allow``. A model that records no run: a
    ConfigError, as another run's model (the split may hold its training structures)."""
    import math

    trained = run_cutoff(run_dir)
    if trained is None or not math.isfinite(model_cutoff) or math.isclose(trained, model_cutoff, rel_tol=1e-9):
        return None
    name = Path(model_path).name
    said = (f"{name} has cutoff {model_cutoff:g} Å, but {option} {run_dir} trained a model of cutoff {trained:g} Å "
            f"({Path(run_dir) / 'config.resolved.yaml'} model.cutoff_upper), so {name} is not that run's model")
    here = run_record(run_dir)
    same_split = record is not None and here is not None and here["split"] == record.get("split")
    if same_split:
        return (f"{said}: it records the same split (its {split} errors are fair), but the run's learning curve is "
                "not its own and is left out of the report")
    if allow:
        return f"{said}: its {split} split may hold the model's training structures (--allow-other-run: evaluating " \
               "anyway, without the run's learning curve)"
    raise ConfigError(f"{said}, and {name} records no training run: the {split} split of {run_dir} may hold its "
                      f"training structures, so its errors would come out too good; give the model's own run folder as "
                      f"{option}, leave it out, or pass --allow-other-run to evaluate anyway")
