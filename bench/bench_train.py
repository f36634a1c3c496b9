#!/usr/bin/env python3
"""Training-step time on one GPU: eager vs CUDA graph, torch reference vs fused message kernels.

The work (as in ``bench/bench_model.py``'s training row): TorchMD-NET's ET-MD17 hyper-parameters
(``bench_model.ET_MD17``: 128 channels, 6 layers, 8 heads, cutoff 5 Å, float32, random weights,
seed 0); 32 aspirin frames x 21 atoms (``bench_model.training_batch``: ``md17_aspirin_xtb.npz``
in ``--data``); loss 0.2 MSE(E) + 0.8 MSE(F) against random targets (seed 0), forces by
autograd with ``create_graph=True``; AdamW, lr 1e-4. The same batch every step.

Columns, ms per optimiser step (median over ``--repeats`` steps, CUDA events, after
``--warmup`` steps):

- ``eager``: what training did before: ``zero_grad(set_to_none=True)``, ``model(z, pos, batch,
  create_graph=True, num_structures=B)`` (exact neighbor list), loss, ``backward()``,
  ``AdamW.step()`` (foreach).
- ``graph bound``: :class:`torchmdx.train.graphed.GraphedTrainStep` (what ``train.cuda_graph:
  true`` runs): the step as one CUDA graph, fused capturable AdamW, a fixed-capacity neighbor
  list of Σ n(n-1) rows (``pair_headroom`` None: cannot overflow); the time includes copying the
  batch into the static buffers and the host bookkeeping.
- ``graph 1.1x``: the same with ``pair_headroom`` 1.1 (capacity 1.1 x the batch's pairs: the
  training config's default).
- ``replay``: ``CUDAGraph.replay()`` alone (the GPU time of the step); ``host``: one
  ``GraphedTrainStep.step`` call with the GPU idle (host time per step).
- ``graph 1.1x, traced``: the same captured step with energies and forces from the traced,
  compiled whole-model graph (``GraphedTrainStep(traced=True)``, ``train.cuda_graph_compile``:
  the double backward as inductor kernels); ``setup_s`` in the JSON is its warm-up + compile.
  ``--variants`` / ``--checks`` pick columns and loss checks; ``--launch JSON`` sets the fused message
  kernels' launch fields (A/B of the launch table's 'gemm' entries: run once with and once without).

Also: peak GPU memory per variant, host time per graphed step (calls without waiting for the
GPU), a check that the graphed steps reproduce the eager losses, and a kernel profile of one
eager step (kernel count, summed GPU time, the largest kernels). TorchMD-NET 3.0.0's step
(67.6 ms, measured earlier on the same GPU type) is quoted for comparison. Prints a table;
writes ``bench_train.json`` to ``--out`` (default ``$OUT`` or the current folder).

    python bench/bench_train.py --data .benchdata --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import ET_MD17, cuda_time, training_batch  # noqa: E402

#: TorchMD-NET 3.0.0, same step (eager), measured earlier on an H100 (issue 7 status, 2026-11-25)
TORCHMDNET_MS = 67.6
MOLECULES = 32
#: (column, bench_variant keywords)
VARIANTS = [("eager", dict(graphed=False)), ("graph", {}), ("graph_tight", dict(headroom=1.1)),
            ("graph_traced", dict(headroom=1.1, traced=True))]
BACKENDS = {"ref": "torch", "fused": "triton"}


def make_model(backend: str):
    from torchmdx.nn import ETPotential

    return ETPotential(dict(ET_MD17), backend=backend).cuda().train()


def objective():
    from torchmdx.train.config import TrainConfig
    from torchmdx.train.module import training_objective

    return functools.partial(training_objective, TrainConfig(energy_weight=0.2, force_weight=0.8))


def peak_reset():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()


def peak_mib() -> float:
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def eager_runner(backend, data):
    z, pos, batch, energy_ref, forces_ref = data
    model = make_model(backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = objective()
    n_atoms = torch.bincount(batch, minlength=MOLECULES)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = model(z, pos, batch, create_graph=True, num_structures=MOLECULES)
        loss, _, _ = loss_fn(out["energy"], out["forces"], energy_ref, forces_ref, n_atoms)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return model, step


def graph_runner(backend, data, headroom=None, traced=False):
    from torchmdx.train.graphed import GraphedTrainStep, shape_from_counts

    z, pos, batch, energy_ref, forces_ref = data
    model = make_model(backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=True)
    runner = GraphedTrainStep(model, optimizer, objective(), pair_headroom=headroom, traced=traced)
    shape = shape_from_counts([int(z.shape[0]) // MOLECULES] * MOLECULES)

    def step():
        return runner.step(z, pos, batch, energy_ref, forces_ref, shape=shape).loss

    return model, runner, step


def bench_variant(label, backend, data, args, headroom=None, graphed=True, traced=False):
    row = {"variant": label, "backend": backend}
    peak_reset()
    try:
        if not graphed:
            _, step = eager_runner(backend, data)
            row["ms"] = round(cuda_time(step, args.warmup, args.repeats), 3)
            row["peak_mib"] = peak_mib()
            return row
        _, runner, step = graph_runner(backend, data, headroom, traced)
        t0 = time.perf_counter()
        for _ in range(runner.warmup_steps + 1):  # warm-up (compilation) and capture, timed apart
            step()
        torch.cuda.synchronize()
        row["setup_s"] = round(time.perf_counter() - t0, 1)
        row["ms"] = round(cuda_time(step, max(args.warmup, runner.warmup_steps + 2), args.repeats), 3)
        row["peak_mib"] = peak_mib()
        graph = next(iter(runner._graphs.values()))
        row["capacity"] = graph.capacity
        row["replay_ms"] = round(cuda_time(graph.graph.replay, 2, args.repeats), 3)
        host = []
        for _ in range(10):  # one call with an idle GPU: what the host spends per step
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        row["host_ms"] = round(1e3 * sorted(host)[len(host) // 2], 3)
        row["stats"] = runner.check()
        row["notes"] = list(runner.notes)
        runner.release()
    except Exception as exc:  # noqa: BLE001 - a failed variant is a row with its error
        traceback.print_exc()
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return row


def check_losses(backend, data, steps=5, traced=False) -> float:
    """Largest relative difference of the per-step losses of ``steps`` graphed and eager steps
    (same initial weights; the graph is captured at step 3)."""
    _, eager_step = eager_runner(backend, data)
    # traced: the benchmark's own capacity (1.1x), so the compiled graph comes from inductor's cache
    _, runner, graph_step = graph_runner(backend, data, headroom=1.1 if traced else None, traced=traced)
    worst = 0.0
    for _ in range(steps):
        a, b = float(eager_step()), float(graph_step())
        worst = max(worst, abs(a - b) / max(abs(a), 1e-30))
    runner.release()
    return worst


def kernel_profile(backend, data, top=10) -> dict:
    """GPU kernels of one eager step (after 3 warm-up steps): count, summed GPU time (what a
    graph replay cannot go below) and the kernels that take most of it."""
    from torch.profiler import ProfilerActivity, profile

    _, step = eager_runner(backend, data)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None)
        if us is None:
            us = getattr(event, "cuda_time_total", 0.0)
        if us and event.count:
            rows.append((float(us), int(event.count), event.key))
    kernels = [r for r in rows if not r[2].startswith(("cudaLaunch", "cudaMemcpy", "Memcpy", "Memset"))]
    kernels.sort(reverse=True)
    return {"kernels": sum(r[1] for r in kernels), "gpu_ms": round(sum(r[0] for r in kernels) / 1e3, 3),
            "top": [{"ms": round(us / 1e3, 3), "count": n, "name": name[:90]} for us, n, name in kernels[:top]]}


def table(rows) -> str:
    by = {(r["variant"], r["backend"]): r for r in rows}

    def cell(variant, backend, key="ms"):
        r = by.get((variant, backend))
        if r is None:
            return "-"
        return "error" if "error" in r else f"{r[key]:.2f}"

    lines = ["| message path | eager | graph, bound Σn(n-1) | graph, 1.1x pairs (default) | replay only (1.1x) "
             "| host per graphed step | graph 1.1x, traced | replay only (traced) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, backend in BACKENDS.items():
        lines.append(f"| {label} | {cell('eager', backend)} | {cell('graph', backend)} | {cell('graph_tight', backend)} "
                     f"| {cell('graph_tight', backend, 'replay_ms')} | {cell('graph_tight', backend, 'host_ms')} "
                     f"| {cell('graph_traced', backend)} | {cell('graph_traced', backend, 'replay_ms')} |")
    lines.append(f"| TorchMD-NET 3.0.0 (eager, measured earlier) | {TORCHMDNET_MS} | | | | | | |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "systems")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--backends", default="ref,fused")
    parser.add_argument("--variants", default=",".join(v for v, _ in VARIANTS), help="columns to run (comma-separated)")
    parser.add_argument("--checks", default="graph,traced", help="loss checks to run: graph, traced (comma-separated)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the kernel profile of one eager step per message path")
    parser.add_argument("--launch", default=None, metavar="JSON",
                        help="LaunchConfig fields for the fused message kernels, e.g. "
                             "'{\"sender_side\": \"merged\", \"block_edges\": 4, \"num_warps\": 1}' "
                             "(default: the launch table's entries); the JSON and the table name them")
    args = parser.parse_args(argv)
    launch = json.loads(args.launch) if args.launch else {}
    if launch:
        from torchmdx.kernels import message_triton

        if unknown := sorted(set(launch) - set(message_triton.LaunchConfig.__dataclass_fields__)):
            raise SystemExit(f"error: --launch: unknown LaunchConfig field(s) {', '.join(unknown)}")
        message_triton.CONFIG = message_triton.LaunchConfig(**launch)
        print(f"fused message kernels with {launch}", flush=True)
    if os.environ.get("BENCH_SMALL_OUTPUT"):  # the traced graph's product-rewrite bound: an int, or "none"
        from torchmdx.nn import traced

        value = os.environ["BENCH_SMALL_OUTPUT"]
        traced.SMALL_OUTPUT = None if value.lower() == "none" else int(value)
        print(f"traced graph: products rewritten as reductions up to {traced.SMALL_OUTPUT} result elements", flush=True)
    if os.environ.get("BENCH_SMALL_ROWS"):  # the training graph's row bound for rewritten products: an int
        from torchmdx.nn import traced

        traced.TRAINING_SMALL_ROWS = int(os.environ["BENCH_SMALL_ROWS"])
        print(f"traced training graph: products of up to {traced.TRAINING_SMALL_ROWS} rows rewritten", flush=True)
    if not torch.cuda.is_available():
        raise SystemExit("error: bench_train needs a CUDA GPU")
    from torchmdx.kernels.neighbors import neighbor_list

    z, pos, batch, source = training_batch(args.data, MOLECULES)
    g = torch.Generator(device="cuda").manual_seed(0)
    energy_ref = torch.randn(MOLECULES, device="cuda", generator=g)
    forces_ref = torch.randn(pos.shape, device="cuda", generator=g)
    data = (z, pos, batch, energy_ref, forces_ref)
    pairs = int(neighbor_list(pos, ET_MD17["cutoff_upper"], batch).edge_index.shape[1])
    n = int(z.shape[0]) // MOLECULES
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "data": source,
            "molecules": MOLECULES, "atoms_per_molecule": n, "pairs": pairs, "pair_bound": MOLECULES * n * (n - 1),
            "warmup": args.warmup, "repeats": args.repeats, "torchmdnet_ms": TORCHMDNET_MS, "launch": launch}
    print(json.dumps(info), flush=True)
    rows, checks, profiles = [], {}, {}
    for label in args.backends.split(","):
        backend = BACKENDS[label]
        for variant, kwargs in [v for v in VARIANTS if v[0] in args.variants.split(",")]:
            row = bench_variant(variant, backend, data, args, **kwargs)
            print(json.dumps(row), flush=True)
            rows.append(row)
        for traced in [t for t, name in ((False, "graph"), (True, "traced")) if name in args.checks.split(",")]:
            key = f"{label}{' traced' if traced else ''}"
            try:
                checks[key] = check_losses(backend, data, traced=traced)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                checks[key] = f"{type(exc).__name__}: {exc}"
            print(f"loss check {key}: max relative difference graph vs eager {checks[key]}", flush=True)
        peak_reset()
        if args.profile:
            try:
                profiles[label] = kernel_profile(backend, data)
                print(f"profile {label}: {json.dumps(profiles[label])}", flush=True)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                profiles[label] = f"{type(exc).__name__}: {exc}"
            peak_reset()
    text = table(rows)
    print(f"\ntraining step, {MOLECULES} x {n} atoms ({source}), {pairs} pairs, ms per step, {info['device']}, {info['date']}"
          + (f", fused kernels with {launch}" if launch else ""))
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_train.json").write_text(json.dumps({**info, "rows": rows, "loss_check": checks, "profile": profiles}, indent=1))


if __name__ == "__main__":
    from torchmdx.cli.main import run_script

    sys.exit(run_script(main))  # a TorchmdxError is one error line (torchmdx bench runs this file)
