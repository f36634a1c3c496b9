#!/usr/bin/env python3
"""ET energy + forces on one GPU: torchmdx reference path vs fused Triton message kernels.

TorchMD-NET's ET-MD17 hyper-parameters (128 channels, 6 layers, 8 heads, 32 exp-normal RBF,
cutoff 5 Å, vector cutoff, float32), random weights (seed 0). For each system (extxyz files in
``--data``, default ``../shared/data/systems``):

- ``ref`` / ``fused``: ms per ``model(z, pos)`` call (neighbor list, input checks, energy and
  forces by autograd: what a calculator pays per step) with the message step on the torch
  reference or on the fused Triton kernels; peak GPU memory of that call.
- ``graph``: the same work for fixed shapes as one CUDA-graph replay, as ``torchmdx.Calculator``
  runs it on CUDA (``GraphedForces``: capacity-padded Triton neighbor list rebuilt inside the
  graph, representation, head, energy, forces); ``graph + compile``: the same with the
  model's dense parts compiled (``ETPotential.set_compiled``, ``compile: parts``);
  ``graph, traced``: the model and its forces as one traced, compiled graph
  (``compile: whole``, :mod:`torchmdx.nn.traced`, default options: combo kernels on CUDA;
  ``_nocombo``: without them, ``_nosmall``: without the small-product rewrite). ``BENCH_GRAPH_VARIANTS`` picks columns;
  for small systems the JSON also has the kernel launches per replay.
- training step: 32 molecules x 21 atoms (aspirin frames of ``md17_aspirin_xtb.npz`` when it is
  in ``--data``, else random ones), loss 0.2 MSE(E) + 0.8 MSE(F) with create_graph=True, AdamW;
  also an energy-only step (first derivatives only: the fused backward does all of it).
- ``--sweep SYSTEMS``: on each system's edges, one layer's message step (forward + backward)
  for the message variants (``SWEEP_LABELS``), the launch parameters (``SWEEP``) and every
  tl.dot precision, each with its error against float64; the whole model's force error per
  precision against float64 (the gate: at most 2 x tf32x3's); the fastest variant that passes
  becomes the launch-table entry (``torchmdx/kernels/launch_table.json``, copy in ``--out``)
  that ``auto`` reads for this GPU and the system's size class.
- ``--profile SYSTEMS``: kernel-time breakdown of a fused call (eager and the calculator's graph
  replay) and its roofline table (``bench/roofline.py``; ``roofline.md`` in ``--out``).
- Time budgets: ``--budget-s`` (each timing), ``--row-budget-s`` (each system row: later columns
  are skipped and say so), ``--sweep-budget-s`` (each sweep system), ``--traced-max-atoms``.
- ``--kernels``: the message step alone (one layer, forward and forward + backward) for the
  edges of one system, reference vs fused.

``--architecture equiformer``: the same table for Equiformer with the paper's MD17 model
(``EQUIFORMER_MD17``: configs/equiformer_md17.yaml's model, float32, random weights, seed 0). It
has one eager path on e3nn (the ``ref`` column: no fused kernels, no compiled or traced variants)
and the ``graph`` column (the calculator's CUDA-graph replay); the training step as above. Run it
with ``--name bench_model_equiformer`` beside the ET's run on the same machine.

Times: median over timed calls (CUDA events) after warm-up. Prints a table; writes
``bench_model.json`` to ``--out`` (default ``$OUT`` or the current folder).

    python bench/bench_model.py --data .benchdata --systems alanine_dipeptide,chignolin,dhfr,factorIX,stmv \
        [--sweep dhfr,stmv] [--kernels dhfr] [--profile dhfr,stmv] [--no-train] [--budget-s 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ET_MD17 = dict(embedding_dimension=128, num_layers=6, num_heads=8, num_rbf=32, rbf_type="expnorm", trainable_rbf=False,
               activation="silu", attn_activation="silu", neighbor_embedding=True, distance_influence="both",
               vector_cutoff=True, cutoff_lower=0.0, cutoff_upper=5.0, max_z=100, dtype="float32", seed=0)
#: Equiformer's MD17 model (Liao & Smidt 2023; configs/equiformer_md17.yaml)
EQUIFORMER_MD17 = dict(architecture="equiformer", lmax=2, channels=128, num_layers=6, num_heads=4, ffn_multiplier=3,
                       feature_channels=512, num_rbf=32, rbf_type="expnorm", radial_hidden=[64, 64],
                       nonlinear_message=True, cutoff_upper=5.0, max_z=100, dtype="float32", seed=0)
#: the benchmarked architecture (--architecture)
ARCHITECTURE = "et"
DEFAULT_SYSTEMS = "alanine_dipeptide,chignolin,dhfr,factorIX,stmv"
#: where the benchmark runs (``--device cpu`` only smoke-tests the script: CPU times mean nothing here)
DEVICE = "cuda"
SYMBOLS = ("X H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br Kr "
           "Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe").split()


def read_xyz(path: Path):
    """(atomic numbers [N], positions [N, 3] Å, cell [3, 3] or None, pbc [3] or None) of the first
    frame of an (ext)xyz file: count line, comment line (Lattice="..." pbc="..."), symbol x y z."""
    lines = path.read_text().splitlines()
    n = int(lines[0].split()[0])
    comment = lines[1]
    z, pos = [], []
    for line in lines[2:2 + n]:
        parts = line.split()
        symbol = parts[0].capitalize()
        if symbol not in SYMBOLS:
            raise SystemExit(f"error: {path}: unknown element {parts[0]!r}")
        z.append(SYMBOLS.index(symbol))
        pos.append([float(x) for x in parts[1:4]])
    lattice = re.search(r'Lattice="([^"]+)"', comment)
    pbc = re.search(r'pbc="([^"]+)"', comment)
    cell = np.array([float(x) for x in lattice.group(1).split()]).reshape(3, 3) if lattice else None
    flags = [s.upper().startswith("T") for s in pbc.group(1).split()] if pbc else [False] * 3
    if not any(flags):
        cell = None
    return np.array(z), np.array(pos), cell, (flags if cell is not None else None)


#: seconds one timing (warm-up + timed calls) may take; None: the fixed counts (``--budget-s``)
TIME_BUDGET_S = None


def budgeted_counts(first_call_s: float, warmup: int, repeats: int, budget_s, min_repeats: int = 3) -> tuple:
    """(warm-up calls, timed calls) that fit ``budget_s`` seconds given the first call's wall time
    (which includes compilation, so it over-estimates): at most the given counts, at least one
    warm-up call and ``min_repeats`` timed calls."""
    if budget_s is None or first_call_s <= 0:
        return warmup, repeats
    calls = int(budget_s / first_call_s)
    repeats_fit = max(min_repeats, min(repeats, calls - 1))
    warmup_fit = max(1, min(warmup, calls - repeats_fit))
    return warmup_fit, repeats_fit


def cuda_time(fn, warmup: int, repeats: int) -> float:
    """Median ms of ``fn()`` over ``repeats`` calls timed with CUDA events, after ``warmup`` calls
    (both reduced to fit :data:`TIME_BUDGET_S` when set, from the first call's wall time)."""
    if TIME_BUDGET_S is not None:
        t0 = time.perf_counter()
        fn()
        synchronize()
        t1 = time.perf_counter()
        fn()  # the first call compiles; the second one is the estimate
        synchronize()
        warmup, repeats = budgeted_counts(min(t1 - t0, time.perf_counter() - t1), warmup, repeats, TIME_BUDGET_S)
        warmup = max(warmup - 2, 0)  # two calls already made
    for _ in range(warmup):
        fn()
    if DEVICE == "cpu":
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gpu_busy_ms(fn, calls: int = 3):
    """(ms of GPU kernel time per ``fn()`` call, {kernel: ms per call}) from torch.profiler: the
    GPU's share of a call, without the host time between launches that CUDA events also see."""
    if DEVICE == "cpu":
        return math.nan, {}
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per_kernel = {ev.key[:60]: ev.device_time_total / (1e3 * calls) for ev in prof.key_averages() if ev.device_time_total > 0}
    return sum(per_kernel.values()), per_kernel


def peak_mib(fn) -> float:
    if DEVICE == "cpu":
        return math.nan
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def error_text(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out of GPU memory"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def repeats_for(atoms: int) -> tuple:
    return (3, 50) if atoms < 1000 else (3, 20) if atoms < 10000 else (2, 10)


# --------------------------------------------------------------------------------- model calls
def make_model(backend: str, **overrides):
    if ARCHITECTURE == "equiformer":  # one path (e3nn): the backend does not apply
        from torchmdx.nn import build_model

        return build_model({**EQUIFORMER_MD17, **overrides}).to(DEVICE).eval()
    from torchmdx.nn import ETPotential

    return ETPotential({**ET_MD17, **overrides}, backend=backend).to(DEVICE).eval()


def graph_call(model, z, pos, cell, pbc, traced=False):
    """Energy + forces of fixed shapes as one CUDA graph, exactly as ``torchmdx.Calculator``
    replays it on CUDA (:class:`torchmdx.md.cuda_graph.GraphedForces`: fixed-capacity Triton
    neighbor list rebuilt inside the graph, model, forces): returns (replay, outputs)."""
    from ase import Atoms

    from torchmdx.md.cuda_graph import GraphedForces

    atoms = Atoms(numbers=z.cpu().numpy(), positions=pos.double().cpu().numpy(),
                  cell=None if cell is None else cell.double().cpu().numpy(),
                  pbc=False if pbc is None else pbc.cpu().numpy())
    graphed = GraphedForces(model, atoms, pos.device, pos.dtype, traced=bool(traced))
    if traced == "nosmall":  # the traced graph without small products as reductions
        graphed.forcefield.traced.small = False
    elif isinstance(traced, dict):
        graphed.forcefield.traced.options = traced
    graphed(pos)  # builds, captures, replays once
    energy, forces, _, overflow = graphed.outputs

    def replay():  # holds ``graphed``: the graph reads its static buffers at every replay
        graphed.graph.replay()

    return replay, (energy, forces, overflow)


def replay_kernels(replay, calls: int = 3) -> dict:
    """Kernels per graph replay and their summed GPU time (torch.profiler; CUPTI reports the
    kernels inside a graph), with the five largest."""
    from torch.profiler import ProfilerActivity, profile

    synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            replay()
        synchronize()
    rows = [(ev.device_time_total, ev.count, ev.key) for ev in prof.key_averages() if ev.device_time_total > 0]
    rows.sort(reverse=True)
    return {"launches": sum(r[1] for r in rows) // calls, "gpu_ms": round(sum(r[0] for r in rows) / 1e3 / calls, 3),
            "top": [(key[:70], round(us / calls, 1), count // calls) for us, count, key in rows[:5]]}


#: neighbor-list backend of the timed model calls ('auto': Triton on CUDA; 'torch': reference)
NEIGHBORS = "auto"
#: also time a CUDA-graph-captured call
GRAPH = True
#: seconds one system's row may spend before its remaining columns are skipped (``--row-budget-s``)
ROW_BUDGET_S = None
#: traced (whole-model) graph columns only up to this many atoms (``auto`` traces up to 64)
TRACED_MAX_ATOMS = 1000
#: (column, ETPotential.set_compiled, whole model traced into one compiled graph) of the graph calls
GRAPH_VARIANTS = [("graph", False, False), ("graph_compiled", True, False), ("graph_traced", False, True),
                  ("graph_traced_nocombo", False, {"combo_kernels": False}),
                  ("graph_traced_nosmall", False, "nosmall")]


def bench_system(name, data_dir, results, backends):
    z_np, pos_np, cell_np, pbc_np = read_xyz(data_dir / f"{name}.xyz")
    z = torch.tensor(z_np, device=DEVICE)
    pos = torch.tensor(pos_np, dtype=torch.float32, device=DEVICE)
    cell = torch.tensor(cell_np, dtype=torch.float32, device=DEVICE) if cell_np is not None else None
    pbc = torch.tensor(pbc_np, device=DEVICE) if pbc_np is not None else None
    row = {"atoms": int(len(z_np)), "periodic": cell is not None, "neighbors": NEIGHBORS}
    warmup, repeats = repeats_for(len(z_np))
    forces = {}
    started = time.perf_counter()

    def over_budget(column):
        if ROW_BUDGET_S is not None and time.perf_counter() - started > ROW_BUDGET_S:
            row[f"{column}_error"] = f"skipped: row budget {ROW_BUDGET_S:g} s spent"
            return True
        return False

    for backend in backends:
        key = {"torch": "ref", "triton": "fused"}[backend]
        if over_budget(key):
            continue
        model = make_model(backend)
        try:
            def call():
                if NEIGHBORS == "auto":
                    return model(z, pos, cell=cell, pbc=pbc)
                from torchmdx.kernels.neighbors import neighbor_list

                nb = neighbor_list(pos, model.cutoff, None, cell, pbc, backend=NEIGHBORS)
                return model(z, pos, cell=cell, pbc=pbc, neighbors=nb)

            out = call()
            forces[key] = out["forces"].detach()
            row[f"{key}_ms"] = round(cuda_time(call, warmup, repeats), 3)
            row[f"{key}_peak_MiB"] = round(peak_mib(call), 1)
        except Exception as exc:  # noqa: BLE001 - one failing column must not stop the table
            row[f"{key}_error"] = error_text(exc)
        if GRAPH and (backend == "triton" or ARCHITECTURE != "et"):
            for gkey, compiled, traced in GRAPH_VARIANTS:
                if traced and len(z_np) > TRACED_MAX_ATOMS:
                    continue
                if over_budget(gkey):
                    continue
                try:
                    model.set_compiled(compiled)
                    t0 = time.perf_counter()
                    replay, outputs = graph_call(model, z, pos, cell, pbc, traced=traced)
                    row[f"{gkey}_setup_s"] = round(time.perf_counter() - t0, 1)
                    replay()
                    synchronize()
                    if bool(outputs[2]):
                        raise RuntimeError("neighbor buffer overflow in the captured call")
                    if "fused" in forces:
                        row[f"{gkey}_force_diff"] = float((outputs[1] - forces["fused"]).abs().max())
                    row[f"{gkey}_ms"] = round(cuda_time(replay, warmup, repeats), 3)
                    row[f"{gkey}_peak_MiB"] = round(peak_mib(replay), 1)
                    if len(z_np) < 1000:
                        row[f"{gkey}_kernels"] = replay_kernels(replay)
                    del replay, outputs
                except Exception as exc:  # noqa: BLE001
                    row[f"{gkey}_error"] = error_text(exc)
        del model
        torch.cuda.empty_cache()
    row["wall_s"] = round(time.perf_counter() - started, 1)
    if "fused" in forces:
        from torchmdx.kernels import message_triton

        row["launch_config"] = dict(message_triton.LAST_CONFIG)
    if "ref" in forces and "fused" in forces:
        ref = forces["ref"]
        row["fused_vs_ref_force_rel"] = float((forces["fused"] - ref).norm() / ref.norm())
    results["systems"][name] = row
    print(name, row, flush=True)


# --------------------------------------------------------------------------------- training
def training_batch(data_dir: Path, molecules=32):
    path = data_dir / "md17_aspirin_xtb.npz"
    if path.exists():
        data = np.load(path)
        frames = np.random.default_rng(0).choice(len(data["R"]), molecules, replace=False)
        z = np.tile(data["z"], molecules)
        pos = data["R"][frames].reshape(-1, 3)
        source = "md17_aspirin_xtb.npz"
    else:
        rng = np.random.default_rng(0)
        z = rng.integers(1, 9, molecules * 21)
        pos = rng.normal(scale=1.5, size=(molecules * 21, 3))
        source = "random"
    n = len(z) // molecules
    batch = np.repeat(np.arange(molecules), n)
    return (torch.tensor(z, device=DEVICE), torch.tensor(pos, dtype=torch.float32, device=DEVICE),
            torch.tensor(batch, device=DEVICE), source)


def energy_only(model, z, pos, batch):
    """Energies [B] with a graph for loss.backward() (Potential.forward computes them without
    one when no forces are asked for)."""
    from torchmdx.nn.base import Graph, edge_vectors

    nb = model.neighbors(pos, batch, None, None)
    vectors = edge_vectors(pos, nb.edge_index, nb.shifts, None, batch)
    graph = Graph(z, pos, batch, 32, nb.edge_index, vectors, vectors.norm(dim=-1), nb.mask)
    atom_energy = model.atomic_energies(graph)
    return torch.zeros(32, dtype=atom_energy.dtype, device=pos.device).index_add(0, batch, atom_energy)


def bench_training(data_dir, results, backends):
    z, pos, batch, source = training_batch(data_dir)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    energy_ref = torch.randn(32, device=DEVICE, generator=g)
    forces_ref = torch.randn(pos.shape, device=DEVICE, generator=g)
    row = {"molecules": 32, "atoms_per_molecule": int(len(z) // 32), "data": source}
    for backend in backends:
        key = {"torch": "ref", "triton": "fused"}[backend]
        for mode in ("forces", "energy_only"):
            model = make_model(backend).train()
            opt = torch.optim.AdamW(model.parameters(), 1e-4)

            def step():
                opt.zero_grad(set_to_none=True)
                if mode == "forces":
                    out = model(z, pos, batch, create_graph=True)
                    loss = 0.2 * (out["energy"] - energy_ref).square().mean() + 0.8 * (out["forces"] - forces_ref).square().mean()
                else:
                    energy = energy_only(model, z, pos, batch)
                    loss = (energy - energy_ref).square().mean()
                loss.backward()
                opt.step()

            try:
                row[f"{key}_{mode}_ms"] = round(cuda_time(step, 3, 30), 3)
            except Exception as exc:  # noqa: BLE001
                row[f"{key}_{mode}_error"] = error_text(exc)
            del model, opt
    results["training"] = row
    print("training", row, flush=True)


# --------------------------------------------------------------------------------- sweep / kernels
def model_forces64(name, data_dir):
    """(z, pos64, forces) of the float32 benchmark model's weights evaluated in float64 on the fused
    path (its float64 kernels equal the torch reference to 1e-11 in the tests, and it fits STMV,
    where the float64 reference path would need ~90 GB)."""
    z_np, pos_np, cell_np, pbc_np = read_xyz(data_dir / f"{name}.xyz")
    model = make_model("triton").to(torch.float64)
    z = torch.tensor(z_np, device=DEVICE)
    pos = torch.tensor(pos_np, dtype=torch.float64, device=DEVICE)
    out = model(z, pos)
    del model
    return z, pos, out["forces"].detach()


def model_force_errors(name, data_dir, precisions):
    """{precision: relative force error of the float32 fused model vs float64}, plus 'ref' (the
    float32 torch reference path, where it fits) for context."""
    from torchmdx.kernels import message_triton

    z, pos64, f64 = model_forces64(name, data_dir)
    pos = pos64.float()
    errors = {}
    old = message_triton.CONFIG
    model = make_model("triton")
    try:
        for precision in precisions:
            message_triton.CONFIG = message_triton.LaunchConfig(dot_precision=precision, table=False)
            try:
                forces = model(z, pos)["forces"].double()
                errors[precision] = float((forces - f64).norm() / f64.norm())
            except Exception as exc:  # noqa: BLE001 - a precision this Triton refuses
                errors[precision] = error_text(exc)
    finally:
        message_triton.CONFIG = old
    if len(z) < 10000:
        try:
            forces = make_model("torch")(z, pos)["forces"].double()
            errors["ref"] = float((forces - f64).norm() / f64.norm())
        except Exception as exc:  # noqa: BLE001
            errors["ref"] = error_text(exc)
    return errors


#: launch variants of ``--sweep`` in order of priority (a system's budget may cut the tail):
#: the merged sender side at the block shapes that compile without spills (255 registers at
#: 16 edges x 4 warps on sm_90, 168 at 8 x 4, 125 at 8 x 8, 195 at 16 x 8: kernels.compile_check),
#: then the knobs of the earlier sweeps; ``filters="kernel"`` is the old in-kernel filter place
SWEEP = [
    dict(),
    dict(sender_side="merged"),
    dict(sender_side="merged", block_edges=8),
    dict(sender_side="merged", block_edges=8, num_warps=8),
    dict(sender_side="merged", num_warps=8),
    dict(num_stages=2),
    dict(sender_side="merged", num_stages=2),
    dict(block_edges=8),
    dict(num_warps=2),
    dict(chunk_channels=64),
    dict(chunk_channels=16, num_warps=2),
    dict(block_edges=32),
    dict(programs_per_sm=4),
    dict(filters="kernel"),
    dict(num_warps=8),
]
#: the first SWEEP_MERGED rows of SWEEP are timed before the precisions, the rest after them
SWEEP_MERGED = 5
#: the kernel-level variants timed first in the sweep, with the default launch parameters
SWEEP_LABELS = ("fused_gemm", "fused_gemm_merged", "fused_kernel", "given_leaf")
SWEEP_KEYS = ("block_edges", "chunk_channels", "num_warps", "dot_precision", "programs_per_sm", "num_stages", "maxnreg",
              "filters", "sender_side")
#: seconds each system of ``--sweep`` may take before its remaining variants are skipped
SWEEP_BUDGET_S = 60.0
#: where ``--sweep`` writes its launch-table entries (None: the package's table; ``--launch-table``)
LAUNCH_TABLE = None


def bench_sweep(names, data_dir, out_dir, results, write_table=True):
    """For each system: the message variants (``SWEEP_LABELS``), the launch parameters
    (``SWEEP``) and the tl.dot precisions, each timed on one layer's message step (forward +
    backward) on the system's edges, with the message error against float64; the whole model's
    force error per precision (the accuracy gate: at most 2 x tf32x3's); then the fastest
    variant that passes the gate (GPU time: graphs hide host time) becomes the launch-table
    entry for this GPU and the system's size class."""
    from torchmdx.kernels import launch_table, message_triton

    gpu = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    results["sweep"] = {}
    entries = []
    for name in names:
        started = time.perf_counter()
        section = results["sweep"][name] = {"rows": []}

        def budget_left():
            return SWEEP_BUDGET_S - (time.perf_counter() - started)

        def timed(overrides, labels=("fused",), check=True):
            row = dict(overrides) if labels == ("fused",) else {"labels": ",".join(labels)}
            if budget_left() <= 0:
                row["error"] = f"skipped: sweep budget {SWEEP_BUDGET_S:g} s spent"
                section["rows"].append(row)
                return row
            t0 = time.perf_counter()
            message_triton.CONFIG = message_triton.LaunchConfig(table=False, **overrides)
            try:
                row.update(kernel_step(name, data_dir, check=check, labels=labels))
            except Exception as exc:  # noqa: BLE001
                row["error"] = error_text(exc)
            finally:
                message_triton.CONFIG = message_triton.LaunchConfig()
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            section["rows"].append(row)
            print("sweep", name, row, flush=True)
            return row

        timed({}, labels=SWEEP_LABELS, check=False)
        section["variants"] = section["rows"].pop()
        precisions = [dict(dot_precision=p) for p in launch_table.PRECISIONS if p != launch_table.BASELINE_PRECISION]
        for overrides in SWEEP[:SWEEP_MERGED] + precisions + SWEEP[SWEEP_MERGED:]:  # in order of priority
            timed(overrides)
        try:
            errors = model_force_errors(name, data_dir, launch_table.PRECISIONS)
        except Exception as exc:  # noqa: BLE001
            errors = {"error": error_text(exc)}
        section["force_rel_err_vs_f64"] = errors
        allowed = launch_table.gate(errors)
        section["allowed_precisions"] = list(allowed)
        rows = [r for r in section["rows"] if "fused_fwd_bwd_gpu_ms" in r]
        default = next((r for r in rows if not any(k in r for k in SWEEP_KEYS)), None)
        limit = 2 * default["max_rel_err_vs_f64"] if default and default.get("max_rel_err_vs_f64") else 2e-5
        ok = [r for r in rows if r.get("dot_precision", launch_table.BASELINE_PRECISION) in allowed
              and r.get("max_rel_err_vs_f64", math.inf) <= limit]
        for r in rows:
            r["passes_gate"] = r in ok
        best = min(ok, key=lambda r: r["fused_fwd_bwd_gpu_ms"]) if ok else None
        if best is not None:  # the fastest knobs with the fastest allowed other precision, if not timed together
            precise = [r for r in ok if "dot_precision" in r and len([k for k in SWEEP_KEYS if k in r]) == 1]
            fastest_precision = min(precise, key=lambda r: r["fused_fwd_bwd_gpu_ms"]) if precise else None
            knobs = {k: best[k] for k in SWEEP_KEYS if k in best}
            if fastest_precision is not None and "dot_precision" not in knobs and knobs:
                row = timed({**knobs, "dot_precision": fastest_precision["dot_precision"]})
                if "fused_fwd_bwd_gpu_ms" in row and row.get("max_rel_err_vs_f64", math.inf) <= limit:
                    row["passes_gate"] = True
                    if row["fused_fwd_bwd_gpu_ms"] < best["fused_fwd_bwd_gpu_ms"]:
                        best = row
        section["best"] = best
        section["wall_s"] = round(time.perf_counter() - started, 1)
        if best is not None and default is not None:
            atoms = default["atoms"]
            config = {k: best[k] for k in SWEEP_KEYS if k in best}
            section["entry"] = launch_table.make_entry(
                gpu, launch_table.size_class(atoms), config, {k: v for k, v in errors.items() if k in launch_table.PRECISIONS},
                {"system": name, "atoms": atoms, "edges": default["edges"], "fwd_bwd_gpu_ms": best["fused_fwd_bwd_gpu_ms"],
                 "default_fwd_bwd_gpu_ms": default["fused_fwd_bwd_gpu_ms"]})
            entries.append(section["entry"])
            if write_table and DEVICE == "cuda":  # after every system: a timeout keeps the entries so far
                path = launch_table.write_entries([section["entry"]], LAUNCH_TABLE)
                results["launch_table"] = str(path)
                (out_dir / "launch_table.json").write_text(path.read_text())
                print(f"launch table: entry {section['entry']['gpu']} / {section['entry']['size_class']} written to "
                      f"{path} (and {out_dir / 'launch_table.json'})", flush=True)
        print("sweep", name, "best", best, "force errors vs float64", errors, "allowed", allowed, flush=True)


_KERNEL_INPUTS = {}


def kernel_inputs(name, data_dir):
    """One ET-MD17 layer's message inputs on the edges of ``name`` (cached per system): random
    atom features and filter weights; edge features from the geometry (unit vectors, Gaussian
    RBF rows and a cosine cutoff of the distance), so the list is symmetric as the model's are
    (the merged sender side needs that)."""
    from torchmdx.kernels.neighbors import neighbor_list

    if name not in _KERNEL_INPUTS:
        z_np, pos_np, _, _ = read_xyz(data_dir / f"{name}.xyz")
        pos = torch.tensor(pos_np, dtype=torch.float32, device=DEVICE)
        nb = neighbor_list(pos, 5.0)
        n, f, k = len(z_np), 128, 32
        g = torch.Generator(device=DEVICE).manual_seed(0)

        def r(*shape, scale=1.0):
            return (scale * torch.randn(*shape, device=DEVICE, generator=g)).requires_grad_(True)

        distance = nb.distances.float()
        unit = (nb.vectors.float() / distance[:, None]).requires_grad_(True)
        centres = torch.linspace(0.0, 5.0, k, device=DEVICE)
        rbf = torch.exp(-4.0 * (distance[:, None] - centres) ** 2).requires_grad_(True)
        phi = (0.5 * (torch.cos(distance * math.pi / 5.0) + 1.0)).requires_grad_(True)
        t = dict(q=r(n, f), k=r(n, f), v=r(n, 3 * f), vec=r(n, 3, f), rbf=rbf,
                 wk=r(f, k, scale=k ** -0.5), bk=r(f, scale=0.1), wv=r(3 * f, k, scale=k ** -0.5), bv=r(3 * f, scale=0.1),
                 phi=phi, unit=unit, dk0=r(f), dv0=r(3 * f))
        with torch.no_grad():
            t["dk"] = torch.nn.functional.silu(torch.nn.functional.linear(t["rbf"], t["wk"], t["bk"])).requires_grad_(True)
            t["dv"] = torch.nn.functional.silu(torch.nn.functional.linear(t["rbf"], t["wv"], t["bv"])).requires_grad_(True)
        _KERNEL_INPUTS[name] = (t, nb.edge_index, n, nb.edge_index.shape[1])
    return _KERNEL_INPUTS[name]


def message_call(t, edge_index, label):
    """One layer's message step on the inputs ``t``. ``label``: ``ref`` (torch reference),
    ``fused`` (the default ``message_triton.CONFIG``), ``fused_kernel`` (filters
    evaluated inside the kernels from the RBF rows with tl.dot), ``fused_gemm`` (filters from
    one matrix product before the kernels, which apply the activation), a suffix ``_merged``
    (the sender side inside the receiver kernel, ``CONFIG.sender_side``), ``given`` (filters
    act(rbf W^T + b) by torch / cuBLAS, then the kernels with given dk / dv), ``given_leaf``
    (the kernels alone on given dk / dv that are leaves), ``nofilter`` (no distance
    influence: the gathers and attention without filters, a lower bound of the kernels)."""
    from torchmdx.kernels import message_triton

    self_loop = (t["dk0"], t["dv0"], torch.ones((), device=t["q"].device))
    rest = (t["phi"], t["unit"], edge_index, 8)
    if label == "ref" or label.startswith("fused"):
        old = message_triton.CONFIG
        parts = label.split("_")[1:]
        message_triton.CONFIG = replace(old, **({"filters": parts[0]} if parts and parts[0] != "merged" else {}),
                                        **({"sender_side": "merged"} if "merged" in parts else {}))
        try:
            if label == "ref":
                return message_triton.reference_filtered(t["q"], t["k"], t["v"], t["vec"], t["rbf"], t["wk"], t["bk"],
                                                         t["wv"], t["bv"], *rest, self_loop=self_loop, vector_cutoff=True)
            return message_triton.et_message_filtered(t["q"], t["k"], t["v"], t["vec"], t["rbf"], t["wk"], t["bk"],
                                                      t["wv"], t["bv"], *rest, self_loop=self_loop, vector_cutoff=True,
                                                      symmetric=True)
        finally:
            message_triton.CONFIG = old
    if label == "given":
        dk = torch.nn.functional.silu(torch.nn.functional.linear(t["rbf"], t["wk"], t["bk"]))
        dv = torch.nn.functional.silu(torch.nn.functional.linear(t["rbf"], t["wv"], t["bv"]))
    elif label == "given_leaf":
        dk, dv = t["dk"], t["dv"]
    else:
        dk = dv = None
        self_loop = (None, None, self_loop[2])
    return message_triton.et_message(t["q"], t["k"], t["v"], t["vec"], dk, dv, *rest, self_loop=self_loop,
                                     vector_cutoff=True)


GRAD_INPUTS = ("q", "k", "v", "vec", "rbf", "phi", "unit")
GRAD_INPUTS_GIVEN = ("q", "k", "v", "vec", "dk", "dv", "phi", "unit")
GRAD_INPUTS_NOFILTER = ("q", "k", "v", "vec", "phi", "unit")


def grad_inputs(label):
    """The inputs a force evaluation differentiates for the message variant ``label``."""
    return {"given_leaf": GRAD_INPUTS_GIVEN, "nofilter": GRAD_INPUTS_NOFILTER}.get(label, GRAD_INPUTS)


_REFERENCE64 = {}


def kernel_step(name, data_dir, check=False, labels=("fused",)):
    """ms of one layer's message step (forward; forward + backward for forces) on ``name``."""
    t, edge_index, n, e = kernel_inputs(name, data_dir)
    row = {"atoms": n, "edges": e}
    for label in labels:
        wrt = grad_inputs(label)

        def forward():
            with torch.no_grad():
                return message_call(t, edge_index, label)

        def forward_backward():
            m, u = message_call(t, edge_index, label)
            return torch.autograd.grad(m.sum() + u.square().sum(), [t[x] for x in wrt])

        try:
            row[f"{label}_fwd_ms"] = round(cuda_time(forward, 3, 20), 3)
            row[f"{label}_fwd_bwd_ms"] = round(cuda_time(forward_backward, 3, 20), 3)
            row[f"{label}_fwd_bwd_peak_MiB"] = round(peak_mib(forward_backward), 1)
            busy, per_kernel = gpu_busy_ms(forward_backward)
            row[f"{label}_fwd_bwd_gpu_ms"] = round(busy, 3)
            row[f"{label}_fwd_bwd_top"] = {k: round(v, 3) for k, v in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:6]}
        except Exception as exc:  # noqa: BLE001
            row[f"{label}_error"] = error_text(exc)
    if check:
        m, u = message_call(t, edge_index, "fused")
        grads = torch.autograd.grad(m.sum() + u.square().sum(), [t[x] for x in GRAD_INPUTS])
        if name not in _REFERENCE64:  # the same inputs for every variant: one float64 reference per system
            t64 = {k: v.detach().double().requires_grad_(True) for k, v in t.items()}
            m64, u64 = message_call(t64, edge_index, "ref")
            grads64 = torch.autograd.grad(m64.sum() + u64.square().sum(), [t64[x] for x in GRAD_INPUTS])
            _REFERENCE64[name] = tuple(x.detach() for x in (m64, u64) + grads64)
            del t64, m64, u64, grads64
        errs = [float((a.detach().double() - b).norm() / b.norm()) for a, b in zip((m, u) + grads, _REFERENCE64[name])]
        row["max_rel_err_vs_f64"] = max(errs)
    return row


#: the message-step variants of ``--kernels`` (see :func:`message_call`; env BENCH_KERNEL_LABELS)
KERNEL_LABELS = tuple(os.environ.get("BENCH_KERNEL_LABELS",
                                     "ref,fused_kernel,fused_gemm,fused_gemm_merged,given_leaf,nofilter").split(","))


def bench_kernels(name, data_dir, results):
    """One layer's message step alone on the edges of ``name`` (random features), reference vs fused."""
    row = kernel_step(name, data_dir, labels=KERNEL_LABELS)
    e = row["edges"]
    # lower bounds per layer (docs/kernels_message.md): filter flops of the 4 passes that evaluate
    # or differentiate W e(r) (forward, receiver backward x2, sender backward); gathered bytes
    row["filter_gflop_fwd_bwd"] = round(4 * 2 * e * 32 * 4 * 128 / 1e9, 2)
    row["gather_MB_fwd_bwd"] = round(e * (7 + 7 + 5) * 128 * 4 / 1e6, 1)
    results.setdefault("kernels", {})[name] = row
    print("kernels", name, row, flush=True)


#: the variants of ``--profile`` (env BENCH_PROFILE_VARIANTS): eager fused call, the same with the
#: model's dense parts compiled, and what the calculator replays (capacity-padded list, compiled parts)
PROFILE_VARIANTS = tuple(os.environ.get("BENCH_PROFILE_VARIANTS", "eager,graph").split(","))


def bench_profile(names, data_dir, out_dir, results):
    """CUDA kernel time of one fused energy + forces call, by kernel (torch.profiler), and its
    roofline table (bench/roofline.py: FLOP/s and bytes/s against the GPU's peaks, the bound)."""
    from torch.profiler import ProfilerActivity, profile

    import roofline
    from torchmdx.kernels import message_triton
    from torchmdx.kernels.neighbors import neighbor_list

    gpu = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    found = roofline.peaks_for(gpu)
    results["profile"] = {}
    markdown = []
    for name in names:
        z_np, pos_np, _, _ = read_xyz(data_dir / f"{name}.xyz")
        z = torch.tensor(z_np, device=DEVICE)
        pos = torch.tensor(pos_np, dtype=torch.float32, device=DEVICE)
        model = make_model("triton")
        edges = int(neighbor_list(pos, model.cutoff).edge_index.shape[1])
        profiler_flops = {}  # kernel name -> FLOPs per call from the non-graph profiles (a replay has no operators)
        for variant in PROFILE_VARIANTS:
            label = name if variant == "eager" else f"{name} {variant}"
            model.set_compiled(variant != "eager")
            try:
                if variant == "graph":  # what the calculator replays: capacity-padded list, compiled parts
                    call, _ = graph_call(model, z, pos, None, None)
                else:
                    call = lambda: model(z, pos)  # noqa: E731
                for _ in range(3):
                    call()
                synchronize()
                cfg = dict(message_triton.LAST_CONFIG) or vars(message_triton.resolved_config(len(z_np), gpu))
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_flops=True,
                             record_shapes=True) as prof:
                    for _ in range(3):
                        call()
                    synchronize()
            except Exception as exc:  # noqa: BLE001 - one variant must not stop the others
                results["profile"][label] = {"error": error_text(exc)}
                print(f"profile {label}: {error_text(exc)}", flush=True)
                continue
            records = roofline.records_from_profiler(prof.events(), calls=3)
            for rec in records:
                if rec.flops:
                    profiler_flops[rec.name] = rec.flops
                elif rec.name in profiler_flops:
                    rec.flops = profiler_flops[rec.name]
            shape = roofline.MessageShape(atoms=len(z_np), edges=edges, features=ET_MD17["embedding_dimension"],
                                          heads=ET_MD17["num_heads"], rbf=ET_MD17["num_rbf"], layers=ET_MD17["num_layers"],
                                          chunk_channels=cfg["chunk_channels"], filters=cfg["filters"],
                                          sender_side=cfg["sender_side"], precision=cfg["dot_precision"])
            rows = roofline.build_rows(records, roofline.message_work(shape), found[1] if found else None)
            total = sum(r.ms for r in rows)
            text = roofline.table(rows, gpu, title=f"### {label}: {len(z_np)} atoms, {edges} edges, launch {cfg}")
            markdown.append(text)
            results["profile"][label] = {"gpu_busy_ms": round(total, 3), "kernels": len(rows),
                                         "launches": sum(r.launches for r in rows), "launch_config": cfg,
                                         "edges": edges, "groups": {g: [round(v[0], 4), v[1], round(v[2], 4)]
                                                                    for g, v in roofline.group_totals(rows).items()},
                                         "roofline": roofline.rows_json(rows)}
            print(f"profile {label}: GPU busy {total:.3f} ms per call", flush=True)
            print(text, flush=True)
            (out_dir / f"profile_{label.replace(' ', '_')}.txt").write_text(
                prof.key_averages().table(sort_by="device_time_total", row_limit=80))
            (out_dir / "roofline.md").write_text("\n\n".join(markdown) + "\n")
            del prof


def check_neighbors(name, data_dir, results):
    """Triton vs torch neighbor list on ``name`` (brute / cell, with and without capacity); run it
    in its own process (with CUDA_LAUNCH_BLOCKING=1): a faulting kernel ends the CUDA context."""
    from torchmdx.kernels.neighbors import neighbor_list

    z_np, pos_np, _, _ = read_xyz(data_dir / f"{name}.xyz")
    pos = torch.tensor(pos_np, dtype=torch.float32, device=DEVICE)
    ref = neighbor_list(pos, 5.0, backend="torch")
    e = ref.edge_index.shape[1]
    row = {"atoms": len(z_np), "torch_pairs": e}
    print("neighbors", name, row, flush=True)
    results["neighbors_check"] = row
    for method in ("brute", "cell"):
        for capacity in (None, int(e * 1.2) + 64):
            label = f"triton_{method}_{'capacity' if capacity else 'exact'}"
            nb = neighbor_list(pos, 5.0, backend="triton", method=method, max_pairs=capacity)
            synchronize()
            count = int(nb.num_pairs)
            row[label] = {"pairs": count, "same_as_torch": bool(count == e and torch.equal(nb.edge_index[:, :count], ref.edge_index))}
            print("neighbors", label, row[label], flush=True)


# --------------------------------------------------------------------------------- main
def table(results) -> str:
    lines = ["| system | atoms | ref ms | ref MiB | fused ms | fused MiB | graph ms | graph MiB "
             "| graph + compile ms | graph + compile MiB | graph, traced ms | graph, traced MiB | fused/ref force rel |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in results["systems"].items():
        def cell(key):
            if key in row:
                return str(row[key])
            err = row.get(key.replace("_peak_MiB", "").replace("_ms", "") + "_error")
            return f"({err[:40]})" if err else "-"

        rel = row.get("fused_vs_ref_force_rel")
        lines.append(f"| {name} | {row['atoms']} | {cell('ref_ms')} | {cell('ref_peak_MiB')} | {cell('fused_ms')} | "
                     f"{cell('fused_peak_MiB')} | {cell('graph_ms')} | {cell('graph_peak_MiB')} | "
                     f"{cell('graph_compiled_ms')} | {cell('graph_compiled_peak_MiB')} | "
                     f"{cell('graph_traced_ms')} | {cell('graph_traced_peak_MiB')} | "
                     f"{'-' if rel is None else f'{rel:.1e}'} |")
    if "training" in results:
        t = results["training"]
        lines.append("")
        lines.append(f"training step, 32 x {t['atoms_per_molecule']} atoms ({t['data']}): " + ", ".join(
            f"{k} {v}" for k, v in t.items() if k.endswith("_ms") or k.endswith("_error")))
    return "\n".join(lines)


def main(argv=None):
    global DEVICE, NEIGHBORS, GRAPH, ARCHITECTURE, TIME_BUDGET_S, ROW_BUDGET_S, TRACED_MAX_ATOMS, SWEEP_BUDGET_S
    global LAUNCH_TABLE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "systems",
                        help="folder with the systems' .xyz files (and optionally md17_aspirin_xtb.npz)")
    parser.add_argument("--systems", default=DEFAULT_SYSTEMS, help="comma-separated file stems")
    parser.add_argument("--backends", default="torch,triton", help="message backends: torch (reference), triton (fused)")
    parser.add_argument("--sweep", default=None, metavar="SYSTEMS",
                        help="time the message variants, launch parameters and tl.dot precisions on each system "
                             "(comma-separated) and write the winners to the launch table that 'auto' reads")
    parser.add_argument("--sweep-budget-s", type=float, default=SWEEP_BUDGET_S,
                        help="seconds per --sweep system before its remaining variants are skipped")
    parser.add_argument("--launch-table", type=Path, default=None,
                        help="launch table --sweep writes (default: torchmdx/kernels/launch_table.json)")
    parser.add_argument("--no-write-table", action="store_true", help="--sweep measures but writes no launch table")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds per timing: warm-up and timed calls are reduced to fit (default: fixed counts)")
    parser.add_argument("--row-budget-s", type=float, default=None,
                        help="seconds per system row; columns after it are skipped and say so")
    parser.add_argument("--traced-max-atoms", type=int, default=TRACED_MAX_ATOMS,
                        help="traced (whole-model) graph columns only up to this many atoms")
    parser.add_argument("--kernels", default=None, metavar="SYSTEMS",
                        help="time one layer's message step alone on the edges of each (comma-separated)")
    parser.add_argument("--profile", default=None, metavar="SYSTEMS", help="kernel-time breakdown of a fused call (comma-separated)")
    parser.add_argument("--neighbors", default="auto", choices=("auto", "torch"),
                        help="neighbor-list backend inside the timed calls (default auto: Triton on CUDA)")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph column")
    parser.add_argument("--check-neighbors", default=None, metavar="SYSTEM",
                        help="compare the Triton and torch neighbor lists on SYSTEM first")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step benchmark")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--name", default="bench_model", help="stem of the JSON file written to --out")
    parser.add_argument("--device", default="cuda", help="cuda; 'cpu' only smoke-tests the script")
    parser.add_argument("--architecture", default="et", choices=("et", "equiformer"),
                        help="et (default) or equiformer (the paper's MD17 model; --backends, --sweep, --kernels, "
                             "--profile and the compiled/traced graph columns are ET-only)")
    args = parser.parse_args(argv)
    DEVICE = args.device
    TIME_BUDGET_S, ROW_BUDGET_S, TRACED_MAX_ATOMS = args.budget_s, args.row_budget_s, args.traced_max_atoms
    SWEEP_BUDGET_S, LAUNCH_TABLE = args.sweep_budget_s, args.launch_table
    ARCHITECTURE = args.architecture
    if ARCHITECTURE != "et":
        if args.sweep or args.kernels or args.profile:
            raise SystemExit("error: --sweep, --kernels and --profile time the ET's message kernels; drop them with --architecture "
                             f"{ARCHITECTURE}")
        args.backends = "torch"
    if os.environ.get("BENCH_COMPILE_OPTIONS") is not None:  # compare inductor settings (JSON dict)
        from torchmdx.nn import et

        et.CUDA_COMPILE_OPTIONS = json.loads(os.environ["BENCH_COMPILE_OPTIONS"])
        print(f"compile options on CUDA: {et.CUDA_COMPILE_OPTIONS}", flush=True)
    if os.environ.get("BENCH_MESSAGE_CONFIG"):  # message-kernel launch parameters (JSON dict)
        from torchmdx.kernels import message_triton

        message_triton.CONFIG = message_triton.LaunchConfig(**json.loads(os.environ["BENCH_MESSAGE_CONFIG"]))
        print(f"message launch config: {message_triton.CONFIG}", flush=True)
    NEIGHBORS = args.neighbors
    GRAPH = not args.no_graph
    global GRAPH_VARIANTS
    if os.environ.get("BENCH_GRAPH_VARIANTS"):  # a subset of the graph columns, e.g. "graph_compiled,graph_traced"
        wanted = os.environ["BENCH_GRAPH_VARIANTS"].split(",")
        GRAPH_VARIANTS = [v for v in GRAPH_VARIANTS if v[0] in wanted]
    if ARCHITECTURE != "et":  # not traceable, no compiled parts: the plain captured call only
        GRAPH_VARIANTS = [v for v in GRAPH_VARIANTS if v[0] == "graph"]
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: bench_model.py needs a CUDA GPU (or --device cpu for a smoke test)")
    if not args.data.is_dir():
        raise SystemExit(f"error: data folder {args.data} not found (pass --data)")
    backends = args.backends.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    import triton

    results = {"gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "torch": torch.__version__, "triton": triton.__version__,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
               "architecture": ARCHITECTURE,
               "hyper_parameters": ET_MD17 if ARCHITECTURE == "et" else EQUIFORMER_MD17, "systems": {}}
    sections = []
    if args.check_neighbors:
        sections.append(("neighbors", lambda: check_neighbors(args.check_neighbors, args.data, results)))
    if args.sweep:
        sections.append(("sweep", lambda: bench_sweep(args.sweep.split(","), args.data, args.out, results,
                                                      write_table=not args.no_write_table)))
    for name in (args.kernels or "").split(","):
        if name:
            sections.append((f"kernels {name}", lambda name=name: bench_kernels(name, args.data, results)))
    if args.profile:
        sections.append(("profile", lambda: bench_profile(args.profile.split(","), args.data, args.out, results)))
    for name in args.systems.split(","):
        if name:
            sections.append((name, lambda name=name: bench_system(name, args.data, results, backends)))
    if not args.no_train:
        sections.append(("training", lambda: bench_training(args.data, results, backends)))
    from torchmdx.kernels import message_triton

    for label, fn in sections:
        try:
            fn()
        except Exception:  # noqa: BLE001 - report and go on with the next section
            results.setdefault("errors", {})[label] = traceback.format_exc(limit=6)
            print(f"{label}: failed\n{results['errors'][label]}", flush=True)
        results["launch_config"] = vars(message_triton.CONFIG).copy()
        results["last_resolved_launch_config"] = dict(message_triton.LAST_CONFIG)
        tmp = args.out / f"{args.name}.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, args.out / f"{args.name}.json")
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print()
    print(f"{results['architecture']} on {results['gpu']}, torch {results['torch']}, triton {results['triton']}, {results['date']}; "
          f"launch config {results.get('launch_config')}")
    print(table(results))


if __name__ == "__main__":
    main()
