"""The launch-parameter sweep of the fused message kernels (``bench_model.py --sweep SYSTEMS``).

On each system's edges and at each filter place (:data:`SWEEP_PLACES`, ``--sweep-places``), one
layer's message step (forward + backward, ``model_kernels.kernel_step``) for the launch
parameters (:data:`SWEEP`), each with its error against float64. At the 'gemm' place (training)
also the message variants (:data:`SWEEP_LABELS`) and every tl.dot precision, with the whole
model's force error per precision against float64 (the gate: at most 2 x tf32x3's); at the
'table' place (frozen models) the ``fused_table`` step, whose kernels have no tl.dot. The fastest
variant that passes becomes the launch-table entry (``torchmdx/kernels/launch_table.json``, copy
in ``--out``) that ``auto`` reads for this GPU, the system's size class and the place.
:data:`SWEEP_BUDGET_S` (``--sweep-budget-s``) bounds each system and place; :data:`LAUNCH_TABLE`
(``--launch-table``) is where the entries go.
"""

from __future__ import annotations

import math
import time

import torch

import gpu_timing
from gpu_timing import error_text
from model_kernels import kernel_step
from model_setup import make_model, read_xyz


def model_forces64(name, data_dir):
    """(z, pos64, forces) of the float32 benchmark model's weights evaluated in float64 on the fused
    path (its float64 kernels equal the torch reference to 1e-11 in the tests, and it fits STMV,
    where the float64 reference path would need ~90 GB)."""
    z_np, pos_np, cell_np, pbc_np = read_xyz(data_dir / f"{name}.xyz")
    model = make_model("triton").to(torch.float64)
    z = torch.tensor(z_np, device=gpu_timing.DEVICE)
    pos = torch.tensor(pos_np, dtype=torch.float64, device=gpu_timing.DEVICE)
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
#: the reverse sender side (the same reverse-edge walk in a sender kernel of its own: no sort),
#: then the knobs of the earlier sweeps; ``filters="kernel"`` is the old in-kernel filter place.
#: First, the few-warp rows: in the calculator's call with tables on an H100 (2026-12-07,
#: docs/benchmarks/2026-12-07-h100-b/tables_warps.md) one warp with 4-edge blocks and the merged side
#: took DHFR 6.09 -> 4.13 ms and STMV 55.5 -> 33.8 ms (the tiles' sums stay inside one warp), where this
#: kernel-level sweep had only timed 2 warps at 16-edge blocks (-7 % at STMV)
SWEEP = [
    dict(),
    dict(sender_side="merged", block_edges=4, num_warps=1),
    dict(sender_side="reverse", block_edges=4, num_warps=1),
    dict(sender_side="reverse", block_edges=8, num_warps=2),
    dict(sender_side="merged", block_edges=8, num_warps=2),
    dict(sender_side="merged"),
    dict(sender_side="merged", block_edges=8),
    dict(sender_side="reverse", block_edges=8),
    dict(sender_side="reverse"),
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
SWEEP_MERGED = 11
#: the kernel-level variants timed first in the sweep, with the default launch parameters
SWEEP_LABELS = ("fused_gemm", "fused_gemm_merged", "fused_table", "fused_kernel", "given_leaf")
SWEEP_KEYS = ("block_edges", "chunk_channels", "num_warps", "dot_precision", "programs_per_sm", "num_stages", "maxnreg",
              "filters", "sender_side")
#: the filter places ``--sweep`` measures by default (``--sweep-places``): 'table' is what frozen
#: models run (MD, the calculator, evaluation), 'gemm' what training runs
SWEEP_PLACES = ("table",)
#: seconds each system and place of ``--sweep`` may take before its remaining variants are skipped
SWEEP_BUDGET_S = 60.0
#: where ``--sweep`` writes its launch-table entries (None: the package's table; ``--launch-table``)
LAUNCH_TABLE = None


def bench_sweep(names, data_dir, out_dir, results, write_table=True, places=None):
    """For each system and filter place (``places``, default :data:`SWEEP_PLACES`): the launch
    variants timed on one layer's message step (forward + backward) on the system's edges, each
    with its message error against float64, and the fastest that passes the accuracy gate written
    as the launch-table entry of this GPU, the system's size class and the place (GPU time: graphs
    hide host time). At the 'gemm' place (training: RBF rows and weights) the message variants
    (``SWEEP_LABELS``), the launch parameters (``SWEEP``) and the tl.dot precisions, gated by the
    whole model's force error per precision (at most 2 x tf32x3's); at the 'table' place (frozen
    models: MD, the calculator) the launch parameters on the ``fused_table`` step (no tl.dot, so no
    precisions), gated by the message error (at most 2 x the default's)."""
    from torchmdx.kernels import launch_table

    places = tuple(places or SWEEP_PLACES)
    for place in places:
        if place not in launch_table.PLACES:
            raise ValueError(f"sweep place {place!r} is not one of {launch_table.PLACES}")
    results["sweep"] = {}
    for name in names:
        for place in places:
            key = name if place == "gemm" else f"{name}@{place}"
            results["sweep"][key] = _sweep_one(name, place, data_dir, out_dir, results, write_table)


def _sweep_one(name, place, data_dir, out_dir, results, write_table):
    """One system at one filter place (see :func:`bench_sweep`): its section of the results."""
    from torchmdx.kernels import launch_table, message_triton

    gpu = torch.cuda.get_device_name(0) if gpu_timing.DEVICE == "cuda" else "cpu"
    label = "fused" if place == "gemm" else "fused_table"
    tkey = f"{label}_fwd_bwd_gpu_ms"
    started = time.perf_counter()
    section = {"place": place, "rows": []}

    def budget_left():
        return SWEEP_BUDGET_S - (time.perf_counter() - started)

    def timed(overrides, labels=(label,), check=True):
        row = dict(overrides) if labels == (label,) else {"labels": ",".join(labels)}
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
        print("sweep", name, place, row, flush=True)
        return row

    if place == "gemm":
        timed({}, labels=SWEEP_LABELS, check=False)
        section["variants"] = section["rows"].pop()
        precisions = [dict(dot_precision=p) for p in launch_table.PRECISIONS if p != launch_table.BASELINE_PRECISION]
        for overrides in SWEEP[:SWEEP_MERGED] + precisions + SWEEP[SWEEP_MERGED:]:  # in order of priority
            timed(overrides)
        try:
            errors = model_force_errors(name, data_dir, launch_table.PRECISIONS)
        except Exception as exc:  # noqa: BLE001
            errors = {"error": error_text(exc)}
    else:  # the tables' kernels have no tl.dot: the precision rows and the in-kernel filter place do not apply
        for overrides in SWEEP:
            if "filters" not in overrides and "dot_precision" not in overrides:
                timed(overrides)
        errors = {}
    section["force_rel_err_vs_f64"] = errors
    allowed = launch_table.gate(errors)
    section["allowed_precisions"] = list(allowed)
    rows = [r for r in section["rows"] if tkey in r]
    default = next((r for r in rows if not any(k in r for k in SWEEP_KEYS)), None)
    limit = 2 * default["max_rel_err_vs_f64"] if default and default.get("max_rel_err_vs_f64") else 2e-5
    ok = [r for r in rows if r.get("dot_precision", launch_table.BASELINE_PRECISION) in allowed
          and r.get("max_rel_err_vs_f64", math.inf) <= limit]
    for r in rows:
        r["passes_gate"] = r in ok
    best = min(ok, key=lambda r: r[tkey]) if ok else None
    if best is not None and place == "gemm":  # the fastest knobs with the fastest allowed other precision
        precise = [r for r in ok if "dot_precision" in r and len([k for k in SWEEP_KEYS if k in r]) == 1]
        fastest_precision = min(precise, key=lambda r: r[tkey]) if precise else None
        knobs = {k: best[k] for k in SWEEP_KEYS if k in best}
        if fastest_precision is not None and "dot_precision" not in knobs and knobs:
            row = timed({**knobs, "dot_precision": fastest_precision["dot_precision"]})
            if tkey in row and row.get("max_rel_err_vs_f64", math.inf) <= limit:
                row["passes_gate"] = True
                if row[tkey] < best[tkey]:
                    best = row
    section["best"] = best
    section["wall_s"] = round(time.perf_counter() - started, 1)
    if best is not None and default is not None:
        atoms = default["atoms"]
        config = {k: best[k] for k in SWEEP_KEYS if k in best}
        section["entry"] = launch_table.make_entry(
            gpu, launch_table.size_class(atoms), config, {k: v for k, v in errors.items() if k in launch_table.PRECISIONS},
            {"system": name, "atoms": atoms, "edges": default["edges"], "fwd_bwd_gpu_ms": best[tkey],
             "default_fwd_bwd_gpu_ms": default[tkey], "max_rel_err_vs_f64": best.get("max_rel_err_vs_f64")},
            place=place)
        if write_table and gpu_timing.DEVICE == "cuda":  # after every system: a timeout keeps the entries so far
            path = launch_table.write_entries([section["entry"]], LAUNCH_TABLE)
            results["launch_table"] = str(path)
            (out_dir / "launch_table.json").write_text(path.read_text())
            print(f"launch table: entry {section['entry']['gpu']} / {section['entry']['size_class']} / {place} written "
                  f"to {path} (and {out_dir / 'launch_table.json'})", flush=True)
    print("sweep", name, place, "best", best, "force errors vs float64", errors, "allowed", allowed, flush=True)
    return section
