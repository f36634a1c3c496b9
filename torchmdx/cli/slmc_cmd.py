"""``torchmdx slmc config.yaml [--set section.key=value ...] [--run-dir DIR] [--resume]``.

Self-learning Monte Carlo of the spin-fermion (double-exchange) lattice model with a linear and
equivariant-transformer effective models (Nagai & Tomiya): exact local-update Monte Carlo for
training data, one SLMC run per effective model, then a summary table, ``summary.json``, CSVs of
the samples and PNG plots (acceptance rate against attention layers, S(q)). See docs/lattice.md.
"""

from __future__ import annotations

import argparse
import sys

HELP = "self-learning Monte Carlo of a lattice spin-fermion model with equivariant-attention effective models"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config with lattice:, data:, effective:, slmc: sections and run_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key (value parsed as YAML); repeatable")
    parser.add_argument("--run-dir", help="run folder (overrides run_dir of the config)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the run folder from checkpoint.pt")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run(args) -> int:
    from torchmdx.lattice.config import load_slmc_config

    cfg = load_slmc_config(args.config, args.overrides, args.run_dir)  # all config errors before any work
    from torchmdx.lattice.config import size_warning, unused_warnings

    for line in unused_warnings(cfg):  # slmc.retrain_every beyond slmc.steps: no refit, without a word
        print(f"warning: {line}", file=sys.stderr, flush=True)
    warning = size_warning(cfg)  # a lattice whose exact diagonalisations take hours, or most of the memory
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    from torchmdx.lattice.run import format_summary, run_slmc

    summary = run_slmc(cfg, resume=args.resume, progress=args.progress)
    print(format_summary(summary, cfg.run_dir))
    return 0
