"""``torchmdx train config.yaml [--set section.key=value ...] [--run-dir DIR] [--resume]``.

Reads the YAML (sections data, model, train, trainer and run_dir; see docs/training.md),
validates every key before anything runs, trains, and leaves a run folder with the resolved
config, the split, checkpoints (best, last), CSV and TensorBoard logs, ``model.pt`` (EMA weights
of the best checkpoint) and ``learning_curve.png``.
"""

from __future__ import annotations

import argparse

HELP = "train a potential from a YAML config (run folder with checkpoints, logs and model.pt out)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config with data:, model:, train:, trainer: sections and run_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key (value parsed as YAML); repeatable")
    parser.add_argument("--run-dir", help="run folder (overrides run_dir of the config)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in the run folder from checkpoints/last.ckpt")


def run(args) -> int:
    from torchmdx.train.config import load_run_config

    cfg = load_run_config(args.config, args.overrides, args.run_dir)  # all config errors before any import
    if args.resume:
        _check_resume_folder(cfg, args)
    from torchmdx.train.run import train

    result = train(cfg, resume=args.resume)
    if "model" not in result:
        return 0
    lines = [f"run folder      {result['run_dir']}", f"model           {result['model']}  (from {result['exported_from']})"]
    if result.get("initial_val"):
        from torchmdx.train.run import _describe

        lines.append(f"before training {', '.join(_describe(result['initial_val']))}")
    for key, value in result.items():
        if key.startswith("best_"):
            lines.append(f"{key:<16}{value:.6g}")
    if "learning_curve" in result:
        lines.append(f"learning curve  {result['learning_curve']}")
    lines.append(f"evaluate with   torchmdx evaluate {result['model']} --data {args.config} --run {result['run_dir']}")
    print("\n".join(lines))
    return 0


def _check_resume_folder(cfg, args) -> None:
    """``train other/config.yaml --resume`` run from another folder: a relative ``run_dir`` is relative
    to the current folder (docs/training.md), so the run next to the config was "last.ckpt not found;
    nothing to resume", naming neither the folder looked in nor the run that exists."""
    from pathlib import Path

    from torchmdx.errors import ConfigError
    from torchmdx.train.run import CHECKPOINT_DIR, LAST

    given = Path(str(cfg.run_dir))
    near = Path(args.config).parent / given
    replaced = args.run_dir is not None or any(item.split("=", 1)[0].strip() == "run_dir" for item in args.overrides)
    if replaced or given.is_absolute() or Path(args.config).parent == Path("") \
            or (given / CHECKPOINT_DIR / f"{LAST}.ckpt").is_file() \
            or not (near / CHECKPOINT_DIR / f"{LAST}.ckpt").is_file():
        return
    raise ConfigError(f"--resume: run_dir '{given}' is relative to the current folder ({Path.cwd()}), where there is no "
                      f"run; {near} next to the config holds one: pass --run-dir {near} (or run from "
                      f"{Path(args.config).parent})")
