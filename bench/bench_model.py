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
  ``_nocombo``: without them, ``_nosmall``: without the small-product rewrite; ``BENCH_TRACED_OPTIONS``
  ``{"name": {inductor options}}`` adds ``graph_traced_<name>`` columns to the JSON, e.g. for issue 16's
  small-molecule kernel count: ``bash bench/gpu_session.sh small16``; the key ``"frontend"``
  (``"dynamo"`` or ``"inductor"``, :data:`torchmdx.nn.traced.FRONTENDS`) picks how the graph reaches
  inductor, e.g. ``{"dynamo": {"frontend": "dynamo"}}``). ``BENCH_GRAPH_VARIANTS`` picks columns;
  for small systems the JSON also has the kernel launches per replay.
- training step: 32 molecules x 21 atoms (aspirin frames of ``md17_aspirin_xtb.npz`` when it is
  in ``--data``, else random ones), loss 0.2 MSE(E) + 0.8 MSE(F) with create_graph=True, AdamW;
  also an energy-only step (first derivatives only: the fused backward does all of it).
- ``--sweep SYSTEMS``: on each system's edges and at each filter place of ``--sweep-places``
  (default 'table': what frozen models run; 'gemm': what training runs), one layer's message
  step (forward + backward) for the launch parameters (``SWEEP``; at 'gemm' also the message
  variants ``SWEEP_LABELS`` and every tl.dot precision, gated by the whole model's force error
  per precision against float64: at most 2 x tf32x3's), each with its error against float64;
  the fastest variant that passes becomes the launch-table entry
  (``torchmdx/kernels/launch_table.json``, copy in ``--out``) that ``auto`` reads for this GPU,
  the system's size class and the place (``bench/model_sweep.py``).
- ``--profile SYSTEMS``: kernel-time breakdown of a fused call (eager and the calculator's graph
  replay) and its roofline table (``bench/roofline.py``; ``roofline.md`` in ``--out``;
  ``bench/model_profile.py``).
- Time budgets: ``--budget-s`` (each timing), ``--row-budget-s`` (each system row: later columns
  are skipped and say so), ``--sweep-budget-s`` (each sweep system), ``--traced-max-atoms``.
- ``--kernels``: the message step alone (one layer, forward and forward + backward) for the
  edges of one system, reference vs fused (``bench/model_kernels.py``).

``--architecture equiformer``: the same table for Equiformer with the paper's MD17 model
(``EQUIFORMER_MD17``: configs/equiformer_md17.yaml's model, float32, random weights, seed 0). It
has one eager path on e3nn (the ``ref`` column: no fused kernels, no compiled parts), the ``graph``
column (the calculator's CUDA-graph replay) and the traced whole-model graph columns (it is
``traceable``); the training step as above. Run it
with ``--name bench_model_equiformer`` beside the ET's run on the same machine.

Times: median over timed calls (CUDA events) after warm-up (``bench/gpu_timing.py``). Prints a
table; writes ``bench_model.json`` to ``--out`` (default ``$OUT`` or the current folder). The model,
its systems and the calculator's graph call are in ``bench/model_setup.py``; this file holds the
system rows, the training step, the table and the command line.

    python bench/bench_model.py --data .benchdata --systems alanine_dipeptide,chignolin,dhfr,factorIX,stmv \
        [--sweep dhfr,stmv] [--kernels dhfr] [--profile dhfr,stmv] [--no-train] [--budget-s 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_timing  # noqa: E402
import model_setup  # noqa: E402
import model_sweep  # noqa: E402
# the names other scripts import from here (bench_train.py, ncu_message.py)
from gpu_timing import cuda_time, error_text, peak_mib, replay_kernels, synchronize  # noqa: E402,F401
from model_kernels import bench_kernels, grad_inputs, kernel_inputs, message_call  # noqa: E402,F401
from model_profile import bench_profile  # noqa: E402
from model_setup import EQUIFORMER_MD17, ET_MD17, graph_call, make_model, read_xyz, repeats_for  # noqa: E402,F401
from model_sweep import bench_sweep  # noqa: E402

DEFAULT_SYSTEMS = "alanine_dipeptide,chignolin,dhfr,factorIX,stmv"


# --------------------------------------------------------------------------------- system rows
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
    z = torch.tensor(z_np, device=gpu_timing.DEVICE)
    pos = torch.tensor(pos_np, dtype=torch.float32, device=gpu_timing.DEVICE)
    cell = torch.tensor(cell_np, dtype=torch.float32, device=gpu_timing.DEVICE) if cell_np is not None else None
    pbc = torch.tensor(pbc_np, device=gpu_timing.DEVICE) if pbc_np is not None else None
    row = {"atoms": int(len(z_np)), "periodic": cell is not None, "neighbors": NEIGHBORS}
    warmup, repeats = repeats_for(len(z_np))
    forces = {}
    started = time.perf_counter()

    longest_column_s = [0.0]  # the longest column so far: a column that would not fit is not started
    column_started = [started]

    def over_budget(column):
        now = time.perf_counter()
        if ROW_BUDGET_S is not None and now - started + longest_column_s[0] > ROW_BUDGET_S:
            row[f"{column}_error"] = (f"skipped: row budget {ROW_BUDGET_S:g} s (spent {now - started:.0f} s, "
                                      f"longest column {longest_column_s[0]:.0f} s)")
            print(f"  {name} {column}: {row[f'{column}_error']}", flush=True)
            return True
        column_started[0] = now
        return False

    def column_done(column):
        """Print the column's numbers as soon as it finishes (a timeout then loses only the
        column it cuts) and remember the longest column for the budget."""
        spent = time.perf_counter() - column_started[0]
        longest_column_s[0] = max(longest_column_s[0], spent)
        fields = {k: v for k, v in row.items() if k.startswith(f"{column}_")}
        print(f"  {name} {column} ({spent:.0f} s): {fields}", flush=True)

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
        column_done(key)
        if GRAPH and (backend == "triton" or model_setup.ARCHITECTURE != "et"):
            for gkey, compiled, traced in GRAPH_VARIANTS:
                if traced and (len(z_np) > TRACED_MAX_ATOMS or not getattr(model, "traceable", False)):
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
                    eager_forces = forces.get("fused", forces.get("ref"))  # Equiformer: one eager path, 'ref'
                    if eager_forces is not None:
                        row[f"{gkey}_force_diff"] = float((outputs[1] - eager_forces).abs().max())
                    row[f"{gkey}_ms"] = round(cuda_time(replay, warmup, repeats), 3)
                    row[f"{gkey}_peak_MiB"] = round(peak_mib(replay), 1)
                    if len(z_np) < 1000:
                        row[f"{gkey}_kernels"] = replay_kernels(replay)
                    del replay, outputs
                except Exception as exc:  # noqa: BLE001
                    row[f"{gkey}_error"] = error_text(exc)
                column_done(gkey)
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
    return (torch.tensor(z, device=gpu_timing.DEVICE), torch.tensor(pos, dtype=torch.float32, device=gpu_timing.DEVICE),
            torch.tensor(batch, device=gpu_timing.DEVICE), source)


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
    g = torch.Generator(device=gpu_timing.DEVICE).manual_seed(0)
    energy_ref = torch.randn(32, device=gpu_timing.DEVICE, generator=g)
    forces_ref = torch.randn(pos.shape, device=gpu_timing.DEVICE, generator=g)
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


def check_neighbors(name, data_dir, results):
    """Triton vs torch neighbor list on ``name`` (brute / cell, with and without capacity); run it
    in its own process (with CUDA_LAUNCH_BLOCKING=1): a faulting kernel ends the CUDA context."""
    from torchmdx.kernels.neighbors import neighbor_list

    z_np, pos_np, _, _ = read_xyz(data_dir / f"{name}.xyz")
    pos = torch.tensor(pos_np, dtype=torch.float32, device=gpu_timing.DEVICE)
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
    extra = sorted({key.rsplit("_", 1)[0] for row in results["systems"].values() for key in row
                    if key.startswith("graph_traced_") and (key.endswith("_ms") or key.endswith("_error"))
                    and "peak" not in key and key.rsplit("_", 1)[0] != "graph_traced"})
    if extra:  # the other traced columns (graph_traced_nocombo/_nosmall, BENCH_TRACED_OPTIONS): ms, launches, compile s
        lines += ["", "| system | traced variant | ms | kernel launches | GPU ms | setup s |", "|---|---|---|---|---|---|"]
        for name, row in results["systems"].items():
            for column in extra:
                kernels = row.get(f"{column}_kernels") or {}
                lines.append(f"| {name} | {column[len('graph_traced_'):]} | {row.get(f'{column}_ms', row.get(f'{column}_error', '-'))} | "
                             f"{kernels.get('launches', '-')} | {kernels.get('gpu_ms', '-')} | {row.get(f'{column}_setup_s', '-')} |")
    if "training" in results:
        t = results["training"]
        lines.append("")
        lines.append(f"training step, 32 x {t['atoms_per_molecule']} atoms ({t['data']}): " + ", ".join(
            f"{k} {v}" for k, v in t.items() if k.endswith("_ms") or k.endswith("_error")))
    return "\n".join(lines)


def main(argv=None):
    global NEIGHBORS, GRAPH, ROW_BUDGET_S, TRACED_MAX_ATOMS, GRAPH_VARIANTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "systems",
                        help="folder with the systems' .xyz files (and optionally md17_aspirin_xtb.npz)")
    parser.add_argument("--systems", default=DEFAULT_SYSTEMS, help="comma-separated file stems")
    parser.add_argument("--backends", default="torch,triton", help="message backends: torch (reference), triton (fused)")
    parser.add_argument("--sweep", default=None, metavar="SYSTEMS",
                        help="time the message variants, launch parameters and tl.dot precisions on each system "
                             "(comma-separated) and write the winners to the launch table that 'auto' reads")
    parser.add_argument("--sweep-budget-s", type=float, default=model_sweep.SWEEP_BUDGET_S,
                        help="seconds per --sweep system and place before its remaining variants are skipped")
    parser.add_argument("--sweep-places", default=",".join(model_sweep.SWEEP_PLACES),
                        help="filter places --sweep measures (comma-separated): table (frozen models: MD, the "
                             "calculator) and/or gemm (training)")
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
                             "--profile and the compiled-parts column are ET-only)")
    args = parser.parse_args(argv)
    # the run's settings live in the modules that read them
    gpu_timing.DEVICE, gpu_timing.TIME_BUDGET_S = args.device, args.budget_s
    ROW_BUDGET_S, TRACED_MAX_ATOMS = args.row_budget_s, args.traced_max_atoms
    model_sweep.SWEEP_BUDGET_S, model_sweep.LAUNCH_TABLE = args.sweep_budget_s, args.launch_table
    model_setup.ARCHITECTURE = architecture = args.architecture
    if architecture != "et":
        if args.sweep or args.kernels or args.profile:
            raise SystemExit("error: --sweep, --kernels and --profile time the ET's message kernels; drop them with --architecture "
                             f"{architecture}")
        args.backends = "torch"
    if os.environ.get("BENCH_COMPILE_OPTIONS") is not None:  # compare inductor settings (JSON dict)
        from torchmdx.nn import et

        et.CUDA_COMPILE_OPTIONS = json.loads(os.environ["BENCH_COMPILE_OPTIONS"])
        print(f"compile options on CUDA: {et.CUDA_COMPILE_OPTIONS}", flush=True)
    model_setup.apply_message_config_from_env()  # message-kernel launch parameters (JSON dict)
    NEIGHBORS = args.neighbors
    GRAPH = not args.no_graph
    if os.environ.get("BENCH_GRAPH_VARIANTS"):  # a subset of the graph columns, e.g. "graph_compiled,graph_traced"
        wanted = os.environ["BENCH_GRAPH_VARIANTS"].split(",")
        GRAPH_VARIANTS = [v for v in GRAPH_VARIANTS if v[0] in wanted]
    if os.environ.get("BENCH_TRACED_OPTIONS"):  # more traced columns: {"name": {inductor options}, ...} (JSON)
        extra = json.loads(os.environ["BENCH_TRACED_OPTIONS"])
        GRAPH_VARIANTS = GRAPH_VARIANTS + [(f"graph_traced_{name}", False, dict(options)) for name, options in extra.items()]
        print(f"extra traced columns: {', '.join(extra)}", flush=True)
    if architecture != "et":  # no compiled parts (ET-only); the traced whole-model graph needs `traceable` (checked per row)
        GRAPH_VARIANTS = [v for v in GRAPH_VARIANTS if not v[1]]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: bench_model.py needs a CUDA GPU (or --device cpu for a smoke test)")
    if not args.data.is_dir():
        raise SystemExit(f"error: data folder {args.data} not found (pass --data)")
    backends = args.backends.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    import triton

    results = {"gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "torch": torch.__version__, "triton": triton.__version__,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
               "architecture": architecture,
               "hyper_parameters": ET_MD17 if architecture == "et" else EQUIFORMER_MD17, "systems": {}}
    sections = []
    if args.check_neighbors:
        sections.append(("neighbors", lambda: check_neighbors(args.check_neighbors, args.data, results)))
    if args.sweep:
        sections.append(("sweep", lambda: bench_sweep(args.sweep.split(","), args.data, args.out, results,
                                                      write_table=not args.no_write_table,
                                                      places=args.sweep_places.split(","))))
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
        results["launch_config"] = dataclasses.asdict(message_triton.CONFIG)
        results["last_resolved_launch_config"] = dict(message_triton.LAST_CONFIG)
        tmp = args.out / f"{args.name}.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, args.out / f"{args.name}.json")
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print()
    print(f"{results['architecture']} on {results['gpu']}, torch {results['torch']}, triton {results['triton']}, {results['date']}; "
          f"launch config {results.get('launch_config')}")
    print(table(results))


if __name__ == "__main__":
    from torchmdx.cli.main import run_script

    sys.exit(run_script(main))  # a TorchmdxError is one error line (torchmdx bench runs this file)
