"""``torchmdx bench NAME [ARGS...]``: the front door to the benchmark scripts in ``bench/``.

Each benchmark prints its table (side by side with its anchor where it has one: TorchMD-NET
3.0.0, vesin) and writes JSON next to it; ``torchmdx bench`` lists them, ``torchmdx bench NAME
--help`` shows a script's own options. The scripts live in the source checkout (they are not
installed with the package: they need the sample data and, for most, a GPU)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from torchmdx.errors import ConfigError

HELP = "run a benchmark script of bench/ (list them without a name)"

#: name -> (script, what it measures)
BENCHMARKS = {
    "accuracy": ("bench_accuracy.py", "time to accuracy, side by side with TorchMD-NET (GPU)"),
    "train": ("bench_train.py", "one captured training step vs eager (GPU)"),
    "trainrun": ("bench_train_run.py", "whole training runs: first step, steps/s per variant"),
    "model": ("bench_model.py", "energy + forces per call, kernels, memory (GPU)"),
    "md": ("bench_md.py", "MD steps per second, native engine and ASE loop"),
    "neighbors": ("bench_neighbors.py", "neighbor lists vs TorchMD-NET and vesin (GPU)"),
    "data": ("bench_data.py", "cache build, read and batch assembly (CPU)"),
}


def bench_folder() -> Path:
    """The checkout's bench/ folder (next to the torchmdx package)."""
    return Path(__file__).resolve().parents[2] / "bench"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", choices=sorted(BENCHMARKS), help="benchmark to run (none: list them)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")


def run(args) -> int:
    if args.name is None:
        width = max(map(len, BENCHMARKS))
        for name, (script, what) in BENCHMARKS.items():
            print(f"{name:<{width}}  {what}  (bench/{script})")
        return 0
    script = bench_folder() / BENCHMARKS[args.name][0]
    if not script.is_file():
        raise ConfigError(f"{script}: not found; the benchmarks live in the source checkout's bench/ folder")
    return subprocess.call([sys.executable, str(script), *args.args])
