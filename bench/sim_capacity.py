"""Simulate the captured training step's neighbor-capacity policy on the CPU (no GPU) over the
real batches of a variable-size training split, and log per batch shape when its compiled
graph was requested, at which capacity, and when / why its capacity changed
(:mod:`torchmdx.train.graphed_sim`).

    python bench/sim_capacity.py [--data PATH] [--epochs 70] [--steps-per-s 70] [--compile-s 100]

The split is bench_accuracy's (formula-stratified, seed 0); per-structure pair counts come from
torchmdx's CPU neighbor list at the ET-MD17 cutoff (5 Å)."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def split_pairs(path: Path, cutoff: float, seed: int = 0):
    import bench_accuracy_data as D
    from torchmdx.kernels.neighbors import neighbor_list

    frames = D.load_frames(path, Path("/tmp") / "torchmdx_sim_capacity_cache")
    split = D.formula_split(D.split_groups(frames), D.DATASETS[frames["kind"]]["sizes"], seed)
    counts = np.diff(frames["offsets"])
    batch = torch.repeat_interleave(torch.arange(counts.size), torch.from_numpy(counts))
    nl = neighbor_list(torch.from_numpy(frames["pos"]), cutoff, batch, backend="torch")
    pairs = np.bincount(batch.numpy()[nl.edge_index[0].numpy()], minlength=counts.size)
    return counts[split.train], pairs[split.train]


def main(argv=None) -> int:
    from torchmdx.train.graphed_sim import simulate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "main" / ".benchdata" / "ani1x_xtb_large.h5"))
    parser.add_argument("--epochs", type=int, default=70)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--steps-per-s", type=float, default=70.0)
    parser.add_argument("--compile-s", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-hold", action="store_true", help="HOLD_REQUESTED off (the policy before the 2026-12-06 fix)")
    args = parser.parse_args(argv)
    counts, pairs = split_pairs(Path(args.data), args.cutoff)
    print(f"{counts.size} training structures of {counts.min()}-{counts.max()} atoms; pairs / all-pairs bound "
          f"{pairs.sum() / (counts * (counts - 1)).sum():.3f}")
    if args.no_hold:
        import torchmdx.train.graphed as graphed

        graphed.HOLD_REQUESTED = False
    out = simulate(counts, pairs, args.batch_size, args.epochs, seed=args.seed,
                   compile_steps=int(args.compile_s * args.steps_per_s))
    sim, rate = out["step"], args.steps_per_s
    print(f"buckets {out['buckets']}; {out['steps']} steps (~{out['steps'] / rate:.0f} s at {rate:g} steps/s)")
    for step, kind, sig in out["events"]:
        print(f"  t {step / rate:6.1f} s step {step:6d}  {kind:9s} {sig.atoms} atoms, {sig.structures} structures, "
              f"{sig.pairs} pairs")
    for step, key, old, new, why in out["changes"]:
        print(f"  t {step / rate:6.1f} s step {step:6d}  capacity {key[0]} atoms: {old} -> {new} ({why})")
    stale = Counter((s.atoms, s.structures) for s in out["stale"])
    print(f"requests per shape: { {k[0]: len(v) for k, v in out['requests'].items()} }; stale: {dict(stale)}")
    print(f"stats {sim.stats}; compiled steps {sim.compiled_steps} of {out['steps']} "
          f"({sim.compiled_steps / max(out['steps'], 1):.0%})")
    print(f"replayed pair rows / real pairs {sim.rows / max(sim.real_pairs, 1):.3f} (padding rows cost compute)")
    for key, graph in sim._graphs.items():
        print(f"  shape {key[0]} atoms: capacity {graph.capacity}, most pairs {graph.max_pairs}, bound seen {graph.bound}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
