"""Filter tables against the GEMM filters (issue 16 item 4's gate), or any launch variants: per system,
the energy + forces call as the calculator replays it (CUDA graph, compiled dense parts, frozen ET-MD17
weights) under each variant of ``message_triton.CONFIG`` (by default 'gemm' = ``{"filters": "gemm"}`` and
'table' = ``{"filters": "table"}``), in one run on one GPU: ms per call, peak memory, kernels per replay,
and the force error of each against a float64 evaluation of the same weights (the fused float64 path;
'max' = largest component error over the largest reference component, 'rel' = norm of the error over
norm of the forces). A variant passes the gate when its error is at most 2 x the first variant's
(docs/kernels_message.md, "Filter tables").

    python bench/bench_filter_table.py --data .benchdata --systems alanine_dipeptide,chignolin,dhfr,factorIX \
        [--intervals G] [--out DIR] [--variants '{"auto": {}, "reverse": {"sender_side": "reverse"}}']

Writes ``filter_table.json`` in ``--out`` (with the GPU, torch and Triton versions and the date).
``--write-entries`` also makes the winners launch-table entries at the 'table' place (one per size
class among the systems: the variant with the lowest geometric mean of its time over the first
variant's, among those that ran every system of the class with the tables and passed the gate;
:func:`choose_entries`), written into ``torchmdx/kernels/launch_table.json`` (or the path given) and
copied to ``--out``. This call-level A/B is what decides the 'table' entries: the one-layer sweep of
``bench_model.py --sweep`` missed the one-warp win of 2026-12-07 (docs/kernels_message.md).
The anchor (TorchMD-NET 3.0.0 on the same systems) is ``bench_model.py``'s table: run it in the
same call for the README.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpu_timing  # noqa: E402
from torchmdx.kernels import filter_table  # noqa: E402
from gpu_timing import cuda_time, error_text, peak_mib, replay_kernels, synchronize  # noqa: E402
from model_setup import graph_call, make_model, read_xyz, repeats_for  # noqa: E402

#: variant name -> ``LaunchConfig`` fields (the default A/B: the filters' place)
VARIANTS = {"gemm": {"filters": "gemm"}, "table": {"filters": "table"}}
#: the launch fields recorded per variant as the kernels ran them (``message_triton.LAST_CONFIG``)
RAN_FIELDS = ("filters", "sender_side", "block_edges", "chunk_channels", "num_warps", "table_storage")


def choose_entries(results: dict, source: str = "") -> list:
    """Launch-table entries at the 'table' place from a results dict of :func:`main` (see the module
    docstring): per size class of the systems, the winning variant if it is not the first one."""
    import math

    from torchmdx.kernels import launch_table

    variants = list(results["variants"])
    classes: dict = {}
    for name, row in results["systems"].items():
        classes.setdefault(launch_table.size_class(row["atoms"]), []).append((name, row))
    entries = []
    for size, rows in classes.items():
        first = variants[0]

        def usable(variant):
            return all(f"{variant}_ms" in row and row.get(f"{variant}_ran", {}).get("filters") == "table"
                       and (variant == first or row.get(f"{variant}_passes_gate") is True) for _, row in rows)

        scores = {v: math.exp(sum(math.log(row[f"{v}_ms"] / row[f"{first}_ms"]) for _, row in rows) / len(rows))
                  for v in variants if usable(v) and usable(first)}
        if not scores:
            continue
        best = min(scores, key=scores.get)
        if best == first:
            continue
        ran = rows[0][1][f"{best}_ran"]
        config = {k: v for k, v in ran.items() if k != "filters" and v is not None}
        measured = {"variant": best, "baseline": first, "time_ratio": round(scores[best], 4),
                    "systems": {name: {"atoms": row["atoms"], "graph_call_ms": row[f"{best}_ms"],
                                       "baseline_graph_call_ms": row[f"{first}_ms"],
                                       "force_error_max": row[f"{best}_force_error"]["max"]} for name, row in rows},
                    **({"source": source} if source else {})}
        entry = launch_table.make_entry(results["gpu"], size, config, {}, measured, place="table")
        entry["measured"]["date"] = results.get("date", entry["measured"]["date"])
        entries.append(entry)
    return entries


def force_errors(forces: torch.Tensor, reference: torch.Tensor) -> dict:
    diff = forces.double() - reference
    return {"max": float(diff.abs().max() / reference.abs().max()), "rel": float(diff.norm() / reference.norm())}


def bench_system(name: str, data_dir: Path, intervals: int, variants: dict) -> dict:
    from torchmdx.kernels import message_triton
    from torchmdx.nn import et

    z_np, pos_np, cell_np, pbc_np = read_xyz(data_dir / f"{name}.xyz")
    device = gpu_timing.DEVICE
    z = torch.tensor(z_np, device=device)
    pos64 = torch.tensor(pos_np, dtype=torch.float64, device=device)
    cell = torch.tensor(cell_np, dtype=torch.float32, device=device) if cell_np is not None else None
    pbc = torch.tensor(pbc_np, device=device) if pbc_np is not None else None
    row = {"atoms": int(len(z_np))}
    started = time.perf_counter()
    message_triton.CONFIG = message_triton.LaunchConfig(filters="gemm")
    model = make_model("triton")
    reference = make_model("triton", dtype="float64")  # the same weights, in float64
    reference.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    reference = reference(z, pos64, cell=None if cell is None else cell.double(), pbc=pbc)["forces"].detach()
    torch.cuda.empty_cache()
    model.set_compiled(True)  # frozen weights: what the calculator and the MD engine run
    et.FILTER_TABLE_INTERVALS = intervals
    warmup, repeats = repeats_for(len(z_np))
    for variant, overrides in variants.items():
        message_triton.CONFIG = message_triton.LaunchConfig(**overrides)
        try:
            t0 = time.perf_counter()
            replay, outputs = graph_call(model, z, pos64.float(), cell, pbc)
            row[f"{variant}_setup_s"] = round(time.perf_counter() - t0, 1)
            ran = message_triton.LAST_CONFIG
            row[f"{variant}_ran"] = {k: ran.get(k) for k in RAN_FIELDS}  # what the kernels ran
            replay()
            synchronize()
            row[f"{variant}_force_error"] = force_errors(outputs[1], reference)
            row[f"{variant}_ms"] = round(cuda_time(replay, warmup, repeats), 3)
            row[f"{variant}_peak_MiB"] = round(peak_mib(replay), 1)
            if len(z_np) < 1000:
                row[f"{variant}_kernels"] = replay_kernels(replay)
            del replay, outputs
        except Exception as exc:  # noqa: BLE001 - one failing column must not stop the table
            row[f"{variant}_error"] = error_text(exc)
        print(f"  {name} {variant}: " + json.dumps({k: v for k, v in row.items() if k.startswith(variant + "_")}),
              flush=True)
        torch.cuda.empty_cache()
    first = row.get(f"{next(iter(variants))}_force_error")
    for variant in list(variants)[1:]:
        if first and row.get(f"{variant}_force_error"):
            row[f"{variant}_passes_gate"] = row[f"{variant}_force_error"]["max"] <= 2.0 * first["max"]
    row["wall_s"] = round(time.perf_counter() - started, 1)
    message_triton.CONFIG = message_triton.LaunchConfig()
    return row


def table_text(results: dict) -> str:
    variants = list(results["variants"])
    fmt = lambda x: "-" if x is None else f"{x:.2e}"  # noqa: E731
    lines = ["| system | atoms | " + " | ".join(f"{v} ms" for v in variants) + " | "
             + " | ".join(f"{v} MiB" for v in variants) + " | "
             + " | ".join(f"{v} force err (max)" for v in variants) + " | gate (vs the first) |",
             "|---" * (2 + 3 * len(variants) + 1) + "|"]
    for name, row in results["systems"].items():
        gates = ", ".join(f"{v} {row[f'{v}_passes_gate']}" for v in variants[1:] if f"{v}_passes_gate" in row)
        lines.append(f"| {name} | {row['atoms']} | "
                     + " | ".join(str(row.get(f"{v}_ms", row.get(f"{v}_error", "-"))) for v in variants) + " | "
                     + " | ".join(str(row.get(f"{v}_peak_MiB", "-")) for v in variants) + " | "
                     + " | ".join(fmt(row.get(f"{v}_force_error", {}).get("max")) for v in variants)
                     + f" | {gates or '-'} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(".benchdata"))
    parser.add_argument("--systems", default="alanine_dipeptide,chignolin,dhfr,factorIX")
    parser.add_argument("--intervals", type=int, default=filter_table.DEFAULT_INTERVALS)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--variants", default=None,
                        help="JSON: variant name -> LaunchConfig fields (default: gemm and table filters)")
    parser.add_argument("--write-entries", nargs="?", const="package", default=None, metavar="PATH",
                        help="write the winners as 'table' launch-table entries (default path: the package's table)")
    args = parser.parse_args(argv)
    variants = json.loads(args.variants) if args.variants else VARIANTS
    from torchmdx.kernels import message_triton

    known = message_triton.LaunchConfig.__dataclass_fields__
    for variant, overrides in variants.items():
        if unknown := sorted(set(overrides) - set(known)):
            raise SystemExit(f"error: --variants {variant}: unknown LaunchConfig field(s) {', '.join(unknown)}")
    if not torch.cuda.is_available():
        raise SystemExit("error: bench_filter_table.py needs a CUDA GPU")
    import triton

    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
               "intervals": args.intervals, "variants": variants, "systems": {}}
    for name in args.systems.split(","):
        results["systems"][name] = bench_system(name, args.data, args.intervals, variants)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "filter_table.json").write_text(json.dumps(results, indent=1))
    print(table_text(results))
    print(f"GPU: {results['gpu']}, {results['date']}")
    if args.write_entries:
        from torchmdx.kernels import launch_table

        entries = choose_entries(results, source=f"bench_filter_table.py {results['date']}")
        if not entries:
            print("launch table: no variant beat the first one at any size class; nothing written")
            return
        path = launch_table.write_entries(entries, None if args.write_entries == "package" else args.write_entries)
        (args.out / "launch_table.json").write_text(path.read_text())
        for entry in entries:
            print(f"launch table: {entry['gpu']} / {entry['size_class']} / table <- {entry['measured']['variant']} "
                  f"{entry['config']} ({entry['measured']['time_ratio']:.3f} x the first variant's time), "
                  f"written to {path} (and {args.out / 'launch_table.json'})")


if __name__ == "__main__":
    main()
