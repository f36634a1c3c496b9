"""``torchmdx sweep config.yaml --grid section.key=v1,v2 [--grid ...] [--out DIR] [--devices N]``.

Trains every point of a grid of configs (model sizes, training-set sizes, steps, architectures;
any config key), one after the other, or in worker processes (N per GPU with --workers-per-device,
one per GPU by default with several GPUs); resumes a partly done
sweep (finished points are skipped); writes results.csv (test errors, parameters, counted
training FLOPs, device-seconds), results.md and log-log plots with fitted power laws and the
compute-optimal frontier. Every point is validated before the first one trains. See
docs/sweep.md and :mod:`torchmdx.train.sweep`.
"""

from __future__ import annotations

import argparse

HELP = "train a grid of configs for a scaling study (CSV, power-law fits, log-log plots)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="base training config (YAML); an optional 'sweep:' section holds grid and variants")
    parser.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                        help="a grid key and its values (parsed as YAML); repeatable: every combination is trained")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one key of the base config; repeatable")
    parser.add_argument("--out", help="sweep folder (default sweeps/<config name>)")
    parser.add_argument("--devices", default="auto",
                        help="GPUs to spread points over: a count, a comma-separated list of ids, or auto (default: "
                             "every visible GPU; one point per GPU at a time)")
    parser.add_argument("--workers-per-device", default=None, metavar="N",
                        help="points trained at once on each GPU (or, without GPUs, on the CPU, splitting its threads), "
                             "each in its own worker process (default: the config's sweep.workers_per_device, else 1); "
                             "small models leave a GPU mostly idle (docs/sweep.md)")
    parser.add_argument("--dry-run", action="store_true", help="validate every point, write the plan, list the points")
    parser.add_argument("--report", action="store_true",
                        help="only rewrite results.csv, results.md and the plots from the finished points")


def run(args) -> int:
    from torchmdx.train.sweep import run_sweep

    if args.report:
        from pathlib import Path

        from torchmdx.errors import ConfigError
        from torchmdx.train.sweep import PLAN, finished_rows, prepare_sweep, read_plan, sweep_folder, write_results

        if not (sweep_folder(args.config, args.out) / PLAN).is_file():  # report only: make nothing
            raise ConfigError(f"sweep folder {sweep_folder(args.config, args.out)}: no sweep here (no {PLAN}); "
                              "run the sweep first, or give its folder with --out")
        sweep_dir = sweep_folder(args.config, args.out)
        finished_rows(sweep_dir, read_plan(sweep_dir))  # a damaged plan or result: refused before anything is rewritten
        prepared = prepare_sweep(args.config, args.grid, args.out, args.overrides)
        plan = read_plan(prepared["sweep_dir"])
        rows = write_results(prepared["sweep_dir"], plan)
        if not rows:
            raise ConfigError(f"sweep folder {prepared['sweep_dir']}: no finished points yet")
        print(f"{len(rows)} finished points: {Path(prepared['sweep_dir']) / 'results.md'}")
        return 0
    result = run_sweep(args.config, args.grid, args.out, args.overrides, devices=args.devices, dry_run=args.dry_run,
                       workers_per_device=args.workers_per_device)
    if not args.dry_run:
        print(f"results: {result['sweep_dir']}/results.csv, results.md, error_vs_compute.png, error_vs_data.png")
    return 0
