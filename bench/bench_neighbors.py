"""Neighbor-list speed on one GPU: torchmdx (Triton brute / cell list) side by side with the
torch reference, TorchMD-NET 3.0.0's OptimizedDistance (brute / cell) and vesin-torch.

    python bench/bench_neighbors.py [--sizes 1000,10000,100000,1000000] [--systems DIR] [--tune]

Cases: random atoms at liquid density (0.1 / Å^3) in a periodic cube, cutoff 5 Å, full list,
float32; then the structures in ``../shared/data/systems`` (or ``.benchdata``) with cutoff 5 Å
(open unless the file has a periodic cell). Times are medians of CUDA-event timings after
warm-up, in ms:

- ``tmx``: torchmdx eager call returning an exact-size list (one host read of the pair count);
  ``tmx graph``: the fixed-capacity call (``max_pairs``) captured in a CUDA graph and replayed,
  i.e. what an MD step pays; ``brute`` / ``cell`` name the kernel;
- ``ref``: torchmdx's torch reference (small systems only);
- ``tmdnet``: TorchMD-NET 3.0.0 ``OptimizedDistance`` (max 200 neighbors per atom, no resize);
- ``vesin``: vesin-torch ``NeighborList.compute`` (``ij`` like the published anchors, and
  ``ijSDd``: the same outputs torchmdx returns).

The pair counts of every implementation are compared (a mismatch is printed). The table is
printed with the GPU name and the date; all numbers go to ``$OUT/bench_neighbors.json`` (or
``bench/results/``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from torchmdx.kernels import neighbors_ref, neighbors_triton  # noqa: E402
from torchmdx.io_utils import atomic_write  # noqa: E402
from gpu_timing import cuda_time  # noqa: E402 - median ms between CUDA events after warm-up

CUTOFF = 5.0
DENSITY = 0.1  # atoms / Å^3
WARMUP = 3  # calls before each timing


def peak_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    del out
    return peak


def graph_runner(pos, cell, pbc, method, capacity, module=None):
    """Capture the fixed-capacity call in a CUDA graph; returns (replay, outputs)."""
    module = module or neighbors_triton
    static = pos.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            module.neighbor_list(static, CUTOFF, None, cell, pbc, method=method, max_pairs=capacity)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = module.neighbor_list(static, CUTOFF, None, cell, pbc, method=method, max_pairs=capacity)
    return graph.replay, out


def bench_case(name, pos, cell, pbc, args, record):
    """Time every implementation on one structure; record[...] gets ms, pairs, errors."""
    n = pos.shape[0]
    row = {"case": name, "atoms": n}
    reps = 10 if n >= 500_000 else 20
    periodic = cell is not None
    counts = {}

    def attempt(key, fn, count=None, reps_=reps):
        try:
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            if time.perf_counter() - t > 0.05:  # slow (competitor) calls: fewer repetitions
                reps_ = min(reps_, 5)
            ms = cuda_time(fn, WARMUP, reps_)
            row[key] = round(ms, 4)
            if count is not None:
                counts[key] = int(count())
        except Exception as err:  # noqa: BLE001 - a failing competitor must not stop the table
            row[key + "_error"] = f"{type(err).__name__}: {str(err)[:160]}"
        torch.cuda.empty_cache()

    methods = ["brute", "cell"] if n <= args.brute_max else ["cell"]
    for method in methods:
        fn = lambda m=method: neighbors_triton.neighbor_list(pos, CUTOFF, None, cell, pbc, method=m)  # noqa: E731
        attempt(f"tmx_{method}", fn, lambda m=method: fn(m).num_pairs)
        try:
            exact = int(fn(method).num_pairs)
            row[f"tmx_{method}_MiB"] = round(peak_mib(lambda m=method: fn(m)), 1)
            row["pairs"] = exact
            replay, out = graph_runner(pos, cell, pbc, method, int(exact * 1.1) + 1024)
            row[f"tmx_graph_{method}"] = round(cuda_time(replay, WARMUP, reps), 4)
            replay()
            torch.cuda.synchronize()
            counts[f"tmx_graph_{method}"] = int(out.num_pairs)
            assert not bool(out.overflow)
            del out, replay
        except Exception as err:  # noqa: BLE001
            row[f"tmx_graph_{method}_error"] = f"{type(err).__name__}: {str(err)[:160]}"
        torch.cuda.empty_cache()
    if args.only_torchmdx:
        record.append(row)
        print(json.dumps(row), flush=True)
        return row
    if n <= args.ref_max:
        fn = lambda: neighbors_ref.neighbor_list(pos, CUTOFF, None, cell, pbc)  # noqa: E731
        attempt("ref", fn, lambda: fn().num_pairs, reps_=3)
    try:
        from torchmdnet.models.utils import OptimizedDistance

        batch = torch.zeros(n, dtype=torch.long, device=pos.device)
        for strategy in methods:
            try:
                od = OptimizedDistance(cutoff_upper=CUTOFF, max_num_pairs=-200, strategy=strategy,
                                       box=None if cell is None else cell.cpu(), loop=False,
                                       include_transpose=True, resize_to_fit=False).to(pos.device)
                # count valid pairs (padding rows have edge_index -1)
                attempt(f"tmdnet_{strategy}", lambda od=od: od(pos, batch),
                        lambda od=od: (od(pos, batch)[0][0] >= 0).sum())
            except Exception as err:  # noqa: BLE001
                row[f"tmdnet_{strategy}_error"] = f"{type(err).__name__}: {str(err)[:160]}"
    except Exception as err:  # noqa: BLE001
        row["tmdnet_error"] = f"not importable: {type(err).__name__}: {str(err)[:120]}"
    try:
        from vesin.torch import NeighborList

        nl = NeighborList(cutoff=CUTOFF, full_list=True)
        box = cell if cell is not None else torch.zeros(3, 3, device=pos.device, dtype=pos.dtype)
        attempt("vesin_ij", lambda: nl.compute(points=pos, box=box, periodic=periodic, quantities="ij"),
                lambda: nl.compute(points=pos, box=box, periodic=periodic, quantities="ij")[0].numel())
        attempt("vesin_ijSDd", lambda: nl.compute(points=pos, box=box, periodic=periodic, quantities="ijSDd"))
    except Exception as err:  # noqa: BLE001
        row["vesin_error"] = f"not importable: {type(err).__name__}: {str(err)[:120]}"
    if counts:
        values = set(counts.values())
        if len(values) > 1:
            row["count_mismatch"] = counts
    record.append(row)
    print(json.dumps(row), flush=True)
    return row


def random_box(n, dtype=torch.float32, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    length = (n / DENSITY) ** (1 / 3)
    pos = torch.rand(n, 3, device="cuda", dtype=dtype, generator=gen) * length
    cell = torch.eye(3, device="cuda", dtype=dtype) * length
    pbc = torch.ones(3, dtype=torch.bool, device="cuda")
    return pos, cell, pbc


def tune(sizes, record):
    """Pick launch parameters on this GPU: graph-replay time of a few candidates relative to the
    first candidate, summed over ``sizes`` (so every size counts alike; brute force only where
    N <= 20000); the best go into neighbors_triton.CONFIG."""
    cell = [
        {"cell_block_j": 8, "cell_block_j_write": 8, "cell_programs": 8448},
        {"cell_block_j": 16, "cell_block_j_write": 16, "cell_programs": 4224},
        {"cell_block_j": 8, "cell_block_j_write": 8, "cell_programs": 4224},
        {"cell_block_j": 16, "cell_block_j_write": 16, "cell_programs": 8448},
        {"cell_block_j": 8, "cell_block_j_write": 8, "cell_block_i_write": 8, "cell_programs": 8448},
    ]
    brute = [
        {"brute_block_i": 16, "brute_block_j": 64, "brute_warps": 4, "brute_block_j_write": 32, "brute_warps_write": 8},
        {"brute_block_i": 16, "brute_block_j": 64, "brute_warps": 4, "brute_block_j_write": 16, "brute_warps_write": 4},
        {"brute_block_i": 16, "brute_block_j": 64, "brute_warps": 4, "brute_block_j_write": 32, "brute_warps_write": 8,
         "brute_chunk": 256},
    ]
    default = dict(neighbors_triton.CONFIG)
    results, chosen, first = {}, {}, {}
    boxes = {n: random_box(n) for n in sizes}
    exact = {n: int(neighbors_triton.neighbor_list(*boxes[n][:1], CUTOFF, None, *boxes[n][1:], method="cell").num_pairs)
             for n in sizes}
    for label, options, method in (("cell", cell, "cell"), ("brute", brute, "brute")):
        best = None
        for opt in options:
            neighbors_triton.CONFIG.clear()
            neighbors_triton.CONFIG.update(default)
            neighbors_triton.CONFIG.update(chosen)
            neighbors_triton.CONFIG.update(opt)
            total = 0.0
            for n in sizes:
                if method == "brute" and n > 20000:
                    continue
                pos, cell_, pbc = boxes[n]
                try:
                    replay, out = graph_runner(pos, cell_, pbc, method, int(exact[n] * 1.1) + 1024)
                    ms = cuda_time(replay, WARMUP, 10)
                    replay()
                    torch.cuda.synchronize()
                    assert int(out.num_pairs) == exact[n] and not bool(out.overflow)
                    del out, replay
                except Exception as err:  # noqa: BLE001
                    ms = float("inf")
                    print("tune error", opt, type(err).__name__, str(err)[:200], flush=True)
                results[f"{label}-{n}-{json.dumps(opt, sort_keys=True)}"] = ms
                first.setdefault((label, n), ms)
                total += ms / first[(label, n)]
                torch.cuda.empty_cache()
            print(f"tune {label} {opt}: {total:.4f} (time / first candidate's, summed over sizes)", flush=True)
            if best is None or total < best[0]:
                best = (total, opt)
        chosen.update(best[1])
        print(f"tune {label}: chose {best[1]}", flush=True)
    neighbors_triton.CONFIG.clear()
    neighbors_triton.CONFIG.update(default)
    neighbors_triton.CONFIG.update(chosen)
    record["tune"] = results
    record["config"] = dict(neighbors_triton.CONFIG)


def phase_profile(n):
    """Per-kernel GPU time of the fixed-capacity cell-list call (what a CUDA graph replays),
    torch profiler over 5 calls."""
    pos, cell, pbc = random_box(n)
    exact = int(neighbors_triton.neighbor_list(pos, CUTOFF, None, cell, pbc, method="cell").num_pairs)
    cap = int(exact * 1.1) + 1024
    for _ in range(3):
        neighbors_triton.neighbor_list(pos, CUTOFF, None, cell, pbc, method="cell", max_pairs=cap)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            neighbors_triton.neighbor_list(pos, CUTOFF, None, cell, pbc, method="cell", max_pairs=cap)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=16)
    print(f"--- profile N={n}, fixed capacity (5 calls) ---\n{table}", flush=True)
    return table


def load_module(path):
    """A neighbors_triton variant from a file (e.g. the previous implementation, for a
    same-run baseline)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare_variants(sizes, variants, baseline, record):
    """Graph-replay time of the cell list under launch-parameter variants (and of a baseline
    module), each checked against the exact pair count; printed as one table."""
    default = dict(neighbors_triton.CONFIG)
    modules = [("baseline", load_module(baseline), {})] if baseline else []
    modules += [(json.dumps(v, sort_keys=True) if v else "default", neighbors_triton, v) for v in variants]
    results = {}
    for n in sizes:
        pos, cell, pbc = random_box(n)
        exact = int(neighbors_triton.neighbor_list(pos, CUTOFF, None, cell, pbc, method="cell").num_pairs)
        for label, module, override in modules:
            neighbors_triton.CONFIG.clear()
            neighbors_triton.CONFIG.update(default)
            neighbors_triton.CONFIG.update(override)
            try:
                replay, out = graph_runner(pos, cell, pbc, "cell", int(exact * 1.1) + 1024, module)
                ms = cuda_time(replay, WARMUP, 20 if n < 500_000 else 10)
                replay()
                torch.cuda.synchronize()
                assert int(out.num_pairs) == exact and not bool(out.overflow), (int(out.num_pairs), exact)
                del out, replay
            except Exception as err:  # noqa: BLE001 - one failing variant must not stop the sweep
                ms = float("nan")
                print(f"variant {label} N={n}: {type(err).__name__}: {str(err)[:200]}", flush=True)
            results.setdefault(label, {})[n] = round(ms, 4)
            torch.cuda.empty_cache()
    neighbors_triton.CONFIG.clear()
    neighbors_triton.CONFIG.update(default)
    print("\nCell list in a CUDA graph (ms, median) per variant:")
    print(f"{'variant':>90} | " + " | ".join(f"{n:>9}" for n in sizes))
    for label, row in results.items():
        print(f"{label[:90]:>90} | " + " | ".join(f"{row.get(n, float('nan')):9.4f}" for n in sizes), flush=True)
    record["variants"] = results


def host_overhead(n=1000):
    """Host (Python + launch) time per call, and where it goes (cProfile of 200 eager calls)."""
    import cProfile
    import io
    import pstats

    pos, cell, pbc = random_box(n)
    report = {}
    for method in ("brute", "cell"):
        exact = int(neighbors_triton.neighbor_list(pos, CUTOFF, None, cell, pbc, method=method).num_pairs)
        cap = exact + 1024
        for _ in range(5):
            neighbors_triton.neighbor_list(pos, CUTOFF, None, cell, pbc, method=method, max_pairs=cap)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(200):
            neighbors_triton.neighbor_list(pos, CUTOFF, None, cell, pbc, method=method, max_pairs=cap)
        host = (time.perf_counter() - t) / 200 * 1e3
        torch.cuda.synchronize()
        report[f"{method}_capacity_host_ms"] = round(host, 4)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            neighbors_triton.neighbor_list(pos, CUTOFF, None, cell, pbc, method=method)
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(14)
        print(f"--- host profile, {method}, N={n}, exact (200 calls); capacity call host time {host:.4f} ms ---")
        print("\n".join(text.getvalue().splitlines()[6:26]), flush=True)
    return report


def print_table(rows, device, date):
    keys = ["tmx_brute", "tmx_cell", "tmx_graph_brute", "tmx_graph_cell", "ref", "tmdnet_brute",
            "tmdnet_cell", "vesin_ij", "vesin_ijSDd"]
    header = ["case", "atoms", "pairs"] + keys
    print(f"\nNeighbor lists, cutoff {CUTOFF} Å, full list, float32 — {device}, {date} (ms, median)")
    print(f"torchmdx launch parameters: {json.dumps(neighbors_triton.CONFIG, sort_keys=True)}")
    print(" | ".join(f"{h:>15}" for h in header))
    for row in rows:
        cells = [str(row.get("case")), str(row.get("atoms")), str(row.get("pairs", "-"))]
        for k in keys:
            v = row.get(k)
            cells.append(f"{v:.3f}" if v is not None else ("err" if k + "_error" in row else "-"))
        print(" | ".join(f"{c:>15}" for c in cells))
    for row in rows:
        for k, v in row.items():
            if k.endswith("_error") or k == "count_mismatch":
                print(f"  {row['case']}: {k}: {v}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000,1000000")
    parser.add_argument("--systems", default=None, help="folder of .xyz structures (default ../shared/data/systems or .benchdata)")
    parser.add_argument("--brute-max", type=int, default=20000, help="largest N timed with brute force")
    parser.add_argument("--ref-max", type=int, default=10000, help="largest N timed with the torch reference")
    parser.add_argument("--tune", default="", help="comma-separated sizes for a launch-parameter sweep")
    parser.add_argument("--profile", default="", help="comma-separated sizes for a per-kernel profile")
    parser.add_argument("--no-systems", action="store_true", help="skip the structures")
    parser.add_argument("--only-torchmdx", action="store_true", help="skip the reference and the other libraries")
    parser.add_argument("--host", action="store_true", help="measure and profile the host-side cost per call")
    parser.add_argument("--variants", default="", help="JSON list of CONFIG overrides to compare in graph mode "
                        "(at --variant-sizes) before the table; [{}] is the default")
    parser.add_argument("--variant-sizes", default="10000,100000")
    parser.add_argument("--baseline", default="", help="a neighbors_triton module file to time beside the variants")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_neighbors.py needs a CUDA GPU")
    device = torch.cuda.get_device_name(0)
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    record = {"device": device, "date": date, "torch": torch.__version__, "cutoff": CUTOFF, "density": DENSITY,
              "config": dict(neighbors_triton.CONFIG), "rows": []}
    try:
        import triton

        record["triton"] = triton.__version__
    except ImportError:
        pass
    for mod in ("vesin", "torchmdnet"):
        try:
            record[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            record[mod] = None
    print(f"{device} torch {torch.__version__} triton {record.get('triton')} vesin {record['vesin']} "
          f"torchmdnet {record['torchmdnet']}", flush=True)
    if args.tune:
        tune([int(s) for s in args.tune.split(",")], record)
    if args.variants or args.baseline:
        compare_variants([int(s) for s in args.variant_sizes.split(",")], json.loads(args.variants or "[{}]"),
                         args.baseline, record)
        save(record, args.out)
    t0 = time.time()
    for n in (int(s) for s in args.sizes.split(",") if s):
        pos, cell, pbc = random_box(n)
        bench_case(f"random-{n}", pos, cell, pbc, args, record["rows"])
        del pos
        torch.cuda.empty_cache()
    folder = Path(args.systems) if args.systems else None
    if folder is None:
        for candidate in (ROOT.parent / "shared" / "data" / "systems", ROOT / ".benchdata"):
            if candidate.is_dir():
                folder = candidate
                break
    if folder is not None and folder.is_dir() and not args.no_systems:
        from ase.io import read

        for path in sorted(folder.glob("*.xyz"), key=lambda p: p.stat().st_size):
            atoms = read(path)
            pos = torch.tensor(atoms.positions, device="cuda", dtype=torch.float32)
            cell = pbc = None
            if atoms.pbc.any():
                cell = torch.tensor(atoms.cell.array, device="cuda", dtype=torch.float32)
                pbc = torch.tensor(atoms.pbc, device="cuda")
            bench_case(path.stem, pos, cell, pbc, args, record["rows"])
    print(f"(benchmark took {time.time() - t0:.0f} s)")
    print_table(record["rows"], device, date)
    save(record, args.out)
    if args.host:
        record["host"] = host_overhead()
    for n in (int(s) for s in args.profile.split(",") if s):
        record.setdefault("profile", {})[n] = phase_profile(n)
    save(record, args.out)


def save(record, folder):
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "bench_neighbors.json", "w") as handle:
        json.dump(record, handle, indent=1)
    print(f"wrote {out / 'bench_neighbors.json'}", flush=True)


if __name__ == "__main__":
    from torchmdx.cli.main import run_script

    sys.exit(run_script(main))  # a TorchmdxError is one error line (torchmdx bench runs this file)
