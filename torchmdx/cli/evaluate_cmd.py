"""``torchmdx evaluate model.pt --data <config.yaml | data file> [--split test] [--run RUN_DIR]``
(a data file also takes ``--format``, ``--cache-dir``, ``--energy-key``, ``--forces-key``, ``--energy-unit``,
``--length-unit``, as ``torchmdx data`` does).

Prints a table of energy and force errors (MAE, RMSE in meV, meV/atom, meV/Å) and writes
``errors.txt``, ``errors.json`` and ``parity.png`` (predicted vs reference) to ``--out``
(default ``<model folder>/evaluate_<split>``), plus ``learning_curve.png`` of a run folder.

``--data`` is a YAML config (its ``data:`` section; the split comes from ``--run``'s
``splits.npz``, else ``data.split_file``, else the config's ``run_dir``, else it is drawn again
from ``data.seed``) or a data file of any supported format (every structure, ``--split all``,
unless ``--run`` gives a split for it: then ``--split test``). Every structure of the data file a model was
trained on (its record's content hash) is scored with a warning that its training structures are among them.

A run's split is checked against the model: a model file of ``torchmdx train``/``export`` records the split
of the run that trained it, and another run's (whose test split may hold the model's training structures)
is refused unless ``--allow-other-run`` (then a warning); a model file without the record is evaluated
with a warning that it cannot be checked (``torchmdx.train.provenance``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "error table, parity plots and learning curve of a model on a dataset split"

SPLITS = ("test", "val", "train", "all")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model file (model.pt from torchmdx train / export)")
    parser.add_argument("--data", required=True, help="YAML config with a data: section, or a data file")
    parser.add_argument("--split", choices=SPLITS, default=None,
                        help="which structures: test (default for a config, or a file with --run), val, train, all "
                             "(default for a file without --run)")
    parser.add_argument("--run", help="run folder: its splits.npz and its learning curve")
    parser.add_argument("--allow-other-run", action="store_true",
                        help="evaluate on the split of a run other than the one that trained the model (its test "
                             "split may hold the model's training structures; refused without this)")
    parser.add_argument("--out", help="output folder (default <model folder>/evaluate_<split>)")
    parser.add_argument("--format", help="data file format (default: guessed); see torchmdx data")
    parser.add_argument("--cache-dir", help="HDF5 cache folder for a data file (default data/cache)")
    # a data file's keys and units, as torchmdx data's options (the readers' lines name them; round 24)
    parser.add_argument("--energy-key", help="energy key of a data file (ASE info key, QM9 property, ANI-1x e.g. "
                        "wb97x_dz.energy)")
    parser.add_argument("--forces-key", help="forces key of a data file (ASE array, ANI-1x e.g. wb97x_dz.forces)")
    parser.add_argument("--energy-unit", help="energy unit of a data file (e.g. kcal/mol, Hartree, eV)")
    parser.add_argument("--length-unit", help="length unit of a data file (e.g. Bohr, Å)")
    parser.add_argument("--batch-size", type=int, default=None, help="structures per batch (default 64)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is best for small molecules on a busy machine)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


#: options of a data file given as --data (a config's data: section chooses them) -> their DataConfig keys
FILE_OPTIONS = {"--format": "format", "--cache-dir": "cache_dir", "--energy-key": "energy_key",
                "--forces-key": "forces_key", "--energy-unit": "energy_unit", "--length-unit": "length_unit"}


def _data_config(args):
    """(DataConfig, run folder with the split or None, is_config)."""
    from torchmdx.config import from_dict, load_yaml
    from torchmdx.data.data_config import DataConfig
    from torchmdx.errors import ConfigError

    if not str(args.data).strip():  # Path('') is '.': ". cannot guess the format of this folder"
        raise ConfigError(f"--data is empty ({args.data!r}); give a data file, a folder or a YAML config")
    source = Path(args.data)
    run_dir = Path(args.run) if args.run else None
    if source.suffix.lower() in (".yaml", ".yml"):
        for option, key in FILE_OPTIONS.items():
            value = getattr(args, key)
            if value is not None:  # ignored without a word (round 20; the keys and units: round 24)
                shown = value if str(value).strip() else repr(value)
                raise ConfigError(f"{option} {shown} applies to a data file given as --data, and {args.data} is a "
                                  f"config, whose data: section chooses it: set data.{key} there, or give the data "
                                  "file as --data")
        from torchmdx.data.data_config import resolve_data_paths

        values = load_yaml(source)
        missing = resolve_data_paths(values, source.parent, str(source))  # data files near the config
        if "data" in values and not isinstance(values["data"], dict):
            raise ConfigError(f"{source}: config key 'data' must be a mapping of keys, got {values['data']!r}")
        if "data" not in values:
            raise ConfigError(f"{source}: no 'data:' section; sections present: {', '.join(map(str, values)) or 'none'}")
        cfg = from_dict(DataConfig, values["data"], "data")
        if missing:
            from torchmdx.errors import DataError

            raise DataError(missing)
        if run_dir is None and isinstance(values.get("run_dir"), str):
            run_dir = Path(values["run_dir"])
        return cfg, run_dir, True
    if not source.exists():
        from torchmdx.errors import DataError
        from torchmdx.io_utils import missing_file_reason

        raise DataError(f"{source}: {missing_file_reason(source)}")
    values = {"path": str(source), "format": args.format, "train_size": 0, "val_size": 0, "test_size": None,
              "atomref": "none"}
    for key in ("cache_dir", "energy_key", "forces_key", "energy_unit", "length_unit"):
        if getattr(args, key) is not None:  # '' meant data/cache silently; DataConfig.validate refuses it
            values[key] = getattr(args, key)
    # the options given are named as options, not as a config's keys ("config key 'data.format'")
    cfg = from_dict(DataConfig, values, "data", names={f"data.{key}": option for option, key in FILE_OPTIONS.items()})
    return cfg, run_dir, False


def check_output_folder(folder: Path, what: str) -> None:
    """One-line ConfigError unless ``folder`` is (or can be made as) a writable folder."""
    from torchmdx.errors import ConfigError
    from torchmdx.io_utils import unwritable_folder

    if str(folder).strip() == "":
        raise ConfigError(f"{what} is empty; give a folder name")
    problem = unwritable_folder(folder)
    if problem:
        raise ConfigError(f"{what} {folder}: {problem}")


def run(args) -> int:
    import dataclasses

    from torchmdx.errors import ConfigError, DataError

    for option, value, what in (("--out", args.out, "the output folder (or leave --out out for <model "
                                                    "folder>/evaluate_<split>)"),
                                ("--run", args.run, "the run folder of torchmdx train (or leave --run out)")):
        if value is not None and not value.strip():  # an unset shell variable: was taken as the default, silently
            raise ConfigError(f"{option} is empty; give {what}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {args.threads}")
        from torchmdx.devices import check_threads

        check_threads(args.threads, "--threads")
        import torch

        torch.set_num_threads(args.threads)
    from torchmdx.devices import check_device

    check_device(args.device, "--device")  # before any work
    model_path = Path(args.model)
    data_cfg, run_dir, is_config = _data_config(args)
    if args.run:
        # a --run without its split (a typo, another folder) was passed over silently: the "test" split was
        # drawn again from data.seed, which need not be the run's (its training structures counted as test)
        from torchmdx.data.datamodule import SPLIT_FILE_NAME

        if not run_dir.is_dir():
            raise ConfigError(f"--run {run_dir}: " + ("is a file, not a run folder" if run_dir.exists()
                                                      else "no such folder") + "; give the run folder of torchmdx train")
        if not (run_dir / SPLIT_FILE_NAME).is_file():
            raise ConfigError(f"--run {run_dir}: no {SPLIT_FILE_NAME} in it (not a run folder of torchmdx train?), so "
                              "the run's split is unknown; give the run folder, or leave out --run")
    # a data file with --run: the run's test split (it evaluated every structure, the run's training ones too,
    # though --run was given for its split; round 27), as the module docstring said
    split = args.split or ("test" if is_config or args.run else "all")
    out_dir = Path(args.out) if args.out else model_path.parent / f"evaluate_{split}"
    check_output_folder(out_dir, "--out" if args.out else "the report folder")

    from torchmdx.data.datamodule import SPLIT_FILE_NAME, TorchmdxDataModule
    from torchmdx.nn.model_file import load_model
    from torchmdx.train.evaluate import error_metrics, predict, write_report
    from torchmdx.train.plots import learning_curve
    from torchmdx.train.run import LEARNING_CURVE, METRICS_CSV

    model = load_model(model_path, device=args.device)  # one read of the file, its training record kept (round 27)
    record = getattr(model, "training_record", None)
    from torchmdx.train.export import check_finite_weights

    check_finite_weights(model, model_path, "nothing evaluated")
    split_dir = run_dir if run_dir is not None and (run_dir / SPLIT_FILE_NAME).is_file() else None
    if not is_config and split != "all" and split_dir is None:
        raise DataError(f"--split {split} with a data file needs --run RUN_DIR holding its {SPLIT_FILE_NAME}")
    if data_cfg.split_file is not None:
        split_dir = None
    run_warning, other_model = None, False
    if args.allow_other_run and (split_dir is None or split == "all"):  # was ignored without a word (round 27)
        if split == "all":
            what = f"--split all scores every structure of {data_cfg.path}, of no run's split"
        elif data_cfg.split_file is not None:
            what = f"the {split} split comes from data.split_file {data_cfg.split_file}, not a run folder"
        else:  # a config without run_dir
            what = f"the {split} split is drawn again from data.seed, not read from a run folder"
        raise ConfigError(f"--allow-other-run applies to a model scored on a run's split (--run RUN_DIR, or a "
                          f"config's run_dir), and {what}: drop --allow-other-run")
    if split_dir is not None and split != "all":
        # another run's model scored on this run's split: its test part may hold the model's training
        # structures, errors too good without a word (round 26); refused before the data is read
        from torchmdx.train.provenance import check_model_run

        option = "--run" if args.run else "run_dir"
        run_warning = check_model_run(model_path, record, split_dir, option=option,
                                      allow=args.allow_other_run, split=split)
        from torchmdx.train.provenance import check_model_cutoff

        cutoff_warning = check_model_cutoff(model_path, float(model.cutoff), record, split_dir, option=option,
                                            allow=args.allow_other_run, split=split)
        if cutoff_warning:  # the model is not the run's (round 35): its learning curve is not the model's either
            run_warning, other_model = cutoff_warning, True
    # the model's embedding rows (atomic numbers 0..max_z-1); data.max_z has the same meaning
    max_z = int(getattr(getattr(model, "config", None), "max_z", data_cfg.max_z))
    data_cfg = dataclasses.replace(data_cfg, max_z=max_z, atomref="none")  # references are the model's
    if split == "all" and split_dir is None and data_cfg.split_file is None:
        data_cfg = dataclasses.replace(data_cfg, train_size=0, val_size=0, test_size=None, split_by_group=False,
                                       val_groups=[], test_groups=[])
    datamodule = TorchmdxDataModule(data_cfg, run_dir=split_dir, max_z=max_z, read_only=True)  # reads the run
    try:
        datamodule.setup("test")
    except DataError as exc:
        # the split file's advice ("delete it or set another split_file") is for train; here the file is
        # the run's own record of its split, and the data given is not the run's
        if split_dir is None or "split made for" not in str(exc) or not str(exc).startswith(str(split_dir)):
            raise
        detail = str(exc).split(': ', 1)[1].split(';')[0].replace("split made for", f"its {SPLIT_FILE_NAME} was made for")
        raise DataError(f"--run {run_dir}: {detail} ({data_cfg.path}): the run was "
                        "trained on other data; give the run's data, or leave out --run to evaluate every "
                        "structure") from None
    dataset = datamodule.dataset
    from torchmdx.train.run import check_cells

    # as train does: a singular or too narrow cell named with the file and its structure number (the
    # neighbor list named "structure 0" of a batch, without the file)
    check_cells(dataset, float(model.cutoff), data_cfg.path, model)
    if split == "all":
        indices = None
        if args.split is None:  # the default for a data file: the model's own data file, training structures and
            # all, errors too good without a word (round 27); an explicit --split all is a request
            from torchmdx.train.provenance import all_split_warning

            run_warning = all_split_warning(model_path, record,
                                            str(dataset.info.get("fingerprint", {}).get("hash", "")),
                                            data_cfg.path)
    else:
        indices = datamodule.split[split]
        if len(indices) == 0:  # said "the test split is empty", not why (data.test_size 0, fractions adding up to 1)
            raise DataError(_empty_split_line(datamodule.split, split, data_cfg, split_dir, args.data))
    if run_warning:
        print(f"warning: {run_warning}", file=sys.stderr, flush=True)
    batch_size = args.batch_size or data_cfg.inference_batch_size or 64
    predictions = predict(model, dataset, indices, batch_size=batch_size, device=args.device, progress=args.progress and sys.stderr.isatty())
    errors = error_metrics(predictions)
    from torchmdx.train.evaluate import check_finite_predictions

    check_finite_predictions(predictions, model_path)
    heading = f"{model_path.name} on {Path(data_cfg.path).name} ({split})"
    info = {"model": str(model_path), "data": str(data_cfg.path), "split": split,
            "split_file": str(datamodule.split_path) if datamodule.split_path else None}
    # an earlier report in this folder (not a run folder, whose learning curve is the training's)
    earlier_report = (Path(out_dir) / "errors.json").is_file() and not (Path(out_dir) / "checkpoints").is_dir()
    paths = write_report(errors, predictions, out_dir, heading, info)
    print(paths["text"])
    written = [paths["table"], paths["json"], paths["parity"]]
    curve = None
    if run_dir is not None and not other_model and (run_dir / METRICS_CSV).is_file():
        curve = learning_curve(run_dir / METRICS_CSV, out_dir / LEARNING_CURVE, title=str(run_dir))
        if curve is not None:
            written.append(str(curve))
    stale = out_dir / LEARNING_CURVE
    if curve is None and earlier_report and stale.is_file():
        # an earlier evaluation's curve (another run, another model) sat beside this report, silently
        stale.unlink()
        print(f"removed {stale}: it was an earlier evaluation's (this one has no learning curve)")
    print("wrote " + ", ".join(written))
    return 0


def _empty_split_line(parts, split: str, data_cfg, split_dir, given) -> str:
    """The line for an empty ``--split``: where the split came from, its sizes, and the splits to choose instead."""
    from torchmdx.data.datamodule import SPLIT_FILE_NAME

    if split_dir is not None:
        where = f"the run's {Path(split_dir) / SPLIT_FILE_NAME}"
    elif data_cfg.split_file is not None:
        where = f"data.split_file {data_cfg.split_file}"
    else:
        sizes = ", ".join(f"{name} {'null (the rest)' if getattr(data_cfg, name) is None else getattr(data_cfg, name)}"
                          for name in ("train_size", "val_size", "test_size"))
        where = f"{given} (data.{sizes})"
    counts = ", ".join(f"{name} {len(parts[name])}" for name in ("train", "val", "test"))
    others = [name for name in ("test", "val", "train") if len(parts[name])]
    return (f"{data_cfg.path}: the {split} split is empty: {where} splits its {parts.n_structures} structures into "
            f"{counts}; choose --split {', '.join(others)} or all")
