#!/usr/bin/env python3
"""Cost of one training step of each variant of a sweep config, on this machine's CPU.

For every variant of ``configs/sweep_equivariance.yaml`` (or ``--config``): the model of the
point with the largest training set, one batch of ``data.batch_size`` structures of its data,
and the training step the sweep runs (energy forward, forces with ``create_graph``, the loss of
``train:``, the backward and an AdamW step), timed eagerly over ``--steps`` steps after
``--warmup`` steps, with ``--threads`` torch threads; plus the number of kernel-launching aten
operations of one step (``bench/count_step_ops.py``'s counter), which sets the pace of an
eager step on a GPU (each op is dispatched by the host: ~20-25 µs per op measured for the ET's
eager step on an H100, docs/training.md) and of a captured one (~2-3 µs per kernel).

    python bench/sweep_step_cost.py [--config configs/sweep_equivariance.yaml] [--steps 5] [--json out.json]

Used for the GPU run's cost estimate (docs/sweep.md, "The GPU run").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "sweep_equivariance.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default=None, help="comma-separated subset")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch

    from count_step_ops import KernelCount  # bench/ is on sys.path as the script's folder
    from torchmdx.config import to_dict
    from torchmdx.data.datamodule import TorchmdxDataModule
    from torchmdx.data.loader import batches_in_order
    from torchmdx.nn.model_file import build_model
    from torchmdx.train.flops import parameter_count, training_step_flops
    from torchmdx.train.objective import batch_counts, training_objective
    from torchmdx.train.sweep_plan import load_base, plan_points, point_config

    torch.set_num_threads(args.threads)
    base, grid, variants = load_base(args.config, args.overrides)
    points = plan_points(grid, variants)
    wanted = set(args.variants.split(",")) if args.variants else None
    chosen = {}
    for point in points:  # one point per variant: its model does not depend on the training-set size
        if point.variant not in chosen and (wanted is None or point.variant in wanted):
            chosen[point.variant] = point
    results = []
    batch = None
    for name, point in chosen.items():
        cfg = point_config(base, point, Path("/tmp/sweep_step_cost"))
        if batch is None:
            module = TorchmdxDataModule(cfg.data_config)
            module.setup("fit")
            indices = module.split["train"][: cfg.data_config.batch_size]
            batch = next(iter(batches_in_order(module.dataset, indices, len(indices))))
        model = build_model(to_dict(cfg.model_config))
        model.train()
        dtype = next(model.parameters()).dtype
        optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
        tc = cfg.train

        def step():
            out = model(batch.z, batch.pos.to(dtype), batch.batch, forces=True, create_graph=True,
                        num_structures=int(batch.num_graphs))
            loss, _, _ = training_objective(tc, out["energy"], out["forces"], batch.energy.to(out["energy"].dtype),
                                            batch.forces.to(dtype), batch_counts(batch))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            return loss

        for _ in range(args.warmup):
            step()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds = (time.perf_counter() - start) / args.steps
        counter = KernelCount()
        with counter:
            step()
        flops = training_step_flops(model, tc, batch)
        row = {"variant": name, "architecture": getattr(cfg.model_config, "architecture", "et"), "parameters": parameter_count(model),
               "cpu_ms_per_step": 1e3 * seconds, "ops_per_step": int(sum(counter.ops.values())),
               "flops_per_step": flops["total"], "batch_size": int(batch.num_graphs), "threads": args.threads}
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
