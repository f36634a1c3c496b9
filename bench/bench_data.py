#!/usr/bin/env python3
"""Dataset-layer throughput: raw file -> HDF5 cache -> one epoch of PyG batches.

Builds a synthetic dataset of ``--n`` structures (default 100 000) in a raw layout (ANI-1x HDF5 by
default: molecules of 5..30 atoms grouped by formula, energies in Hartree, forces in Hartree/Å;
or the MD17 npz / extxyz layouts), then times

  - building the cache (read the raw file, convert units, validate, write HDF5),
  - the up-to-date check of a second ``build_cache`` call (no rebuild),
  - opening the cache as an ``H5Dataset`` (whole arrays read once),
  - one shuffled epoch per batch size / worker count through ``torch_geometric.loader.DataLoader``
    (one Data per structure, collated in Python) and through torchmdx's ``BatchLoader`` (the same
    PyG Batch gathered from the cache arrays in one step),

and prints structures per second as a table. Not a test: nothing is asserted.

    python bench/bench_data.py [--n 100000] [--format ani1x|md17|extxyz] [--batch-sizes 32 128]
                               [--workers 0 2] [--mmap] [--keep DIR]

**At scale** (``--synthetic N``): writes a synthetic ANI-1x-layout file of N conformations
(formulas of 8..23 atoms of H, C, N, O, 250 conformations each; coordinates and forces float32,
energies float64, as in ANI-1x; written to a temporary folder, never shipped), then runs each
stage in a fresh process and reports its wall time, its peak resident memory (``ru_maxrss``:
the process's own memory plus the pages of a memory-mapped cache it touched, which the kernel
may drop at any time and which the DDP ranks of a host share) and, at the stage's end, resident
memory split into the process's own (anonymous) and mapped file pages:

  - ``build cache``: the streamed build (``torchmdx.data.build_cache``);
  - ``data info``: ``torchmdx data info <file> --json`` on the built cache (a fresh CLI process);
  - ``open + split + fit``: ``TorchmdxDataModule.setup`` (open the cache, memory-mapped above
    1 GiB, random 80/10/10 split, atomic references fitted in one pass, statistics);
  - ``batches``: one shuffled epoch (or ``--max-batches``) of ``BatchLoader`` batches of
    ``--batch-size`` structures on one thread, structures/s and batches/s.

    python bench/bench_data.py --synthetic 1000000 [--batch-size 32] [--max-batches N] [--keep DIR]

**An extxyz at scale** (``--synthetic-extxyz N``): writes a synthetic extxyz of N frames in MACE's MPtrj layout
(periodic crystals of 4..60 atoms of a dozen elements in a cubic cell; ``REF_energy``, ``REF_forces``,
``REF_stress`` (9 values), a per-atom ``REF_magmom``, a numeric ``corrected_total_energy`` and a text ``mp_id``
per frame), then, each in a fresh process, its wall time and peak resident memory:

  - ``build cache``: the streamed build of an ASE file (one parse, two passes over its frames:
    :mod:`torchmdx.data.ase_stream`, chunks of ``--chunk-atoms`` atoms, default 2^20);
  - ``read whole``: ``read_ase`` of the same file (every frame in memory; what the build did before it
    streamed), for comparison (``--skip-whole`` leaves it out).

    python bench/bench_data.py --synthetic-extxyz 20000 [--chunk-atoms 65536] [--skip-whole] [--keep DIR]

**An ASE database at scale** (``--synthetic-db N``): the same MPtrj-like frames as rows of an ASE database
(``energy``, ``forces``, ``stress`` written as a calculator's results, a numeric ``corrected_total_energy`` and a
text ``mp_id`` as key-value pairs), then, each in a fresh process:

  - ``build cache``: the streamed build (one fetch of each row, two passes, rows fetched a page at a time:
    :func:`torchmdx.data.ase_format.db_rows`; chunks of ``--chunk-atoms`` atoms);
  - ``data info``: ``torchmdx data info <db> --json`` without a cache (one streamed pass:
    :mod:`torchmdx.data.summary_stream`), and as it was before (the whole read, every row fetched at once, its
    summary and label check, the same imports);
  - ``read whole``: ``read_ase`` (every row's frame in memory, rows paged) and ``read whole, all rows at once``:
    the same with ASE's ``db.select()`` fetching every row before the first (what the build and ``data info`` did
    before they streamed); ``--skip-whole`` leaves both out.

    python bench/bench_data.py --synthetic-db 20000 [--chunk-atoms 65536] [--skip-whole] [--keep DIR]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # data_synthetic, also when loaded by path (tests)

from data_synthetic import synthetic_ani1x, synthetic_extxyz, synthetic_md17  # noqa: E402


STAGE_CODE = r"""
import json, resource, sys, time
stage, raw, cache_dir = sys.argv[1], sys.argv[2], sys.argv[3]
out = {}
t = time.perf_counter()
if stage == "write":
    sys.path.insert(0, sys.argv[5])
    from data_synthetic import synthetic_ani1x_scale
    from pathlib import Path
    out.update(synthetic_ani1x_scale(Path(raw), int(sys.argv[4])))
elif stage == "write_extxyz":
    sys.path.insert(0, sys.argv[5])
    from data_synthetic import synthetic_extxyz_scale
    from pathlib import Path
    out.update(synthetic_extxyz_scale(Path(raw), int(sys.argv[4])))
elif stage in ("build_extxyz", "read_extxyz"):
    sys.path.insert(0, sys.argv[5])
    from data_synthetic import EXTXYZ_OPTIONS
    if stage == "build_extxyz":
        from torchmdx.data import build_cache
        chunk = int(sys.argv[4]) or None
        out["cache"] = str(build_cache(raw, "ase", cache_dir=cache_dir, chunk_atoms=chunk, **EXTXYZ_OPTIONS))
    else:
        from torchmdx.data.ase_format import read_ase
        out["structures"] = len(read_ase(raw, **EXTXYZ_OPTIONS))
elif stage == "write_db":
    sys.path.insert(0, sys.argv[5])
    from data_synthetic import synthetic_db_scale
    from pathlib import Path
    out.update(synthetic_db_scale(Path(raw), int(sys.argv[4])))
elif stage in ("build_db", "read_db", "read_db_select", "info_db_whole"):
    if stage == "build_db":
        from torchmdx.data import build_cache
        out["cache"] = str(build_cache(raw, "ase", cache_dir=cache_dir, chunk_atoms=int(sys.argv[4]) or None))
    elif stage == "info_db_whole":  # what data info did before (the same imports): read whole, summary, label check
        import torchmdx.cli.main, torchmdx.data.ase_format as ase_format
        from torchmdx.data.formats import read_structures
        from torchmdx.data.label_check import check_labels
        from torchmdx.data.summary import summarize
        ase_format.db_rows = lambda db: db.select()
        structures = read_structures(raw, "ase")
        out["structures"] = summarize(structures)["n_structures"]
        check_labels(structures)
    else:
        import torchmdx.data.ase_format as ase_format
        if stage == "read_db_select":  # before the rows were paged: ASE fetches every row at once
            ase_format.db_rows = lambda db: db.select()
        out["structures"] = len(ase_format.read_ase(raw))
elif stage == "info":
    import contextlib, io
    from torchmdx.cli.main import main
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        code = main(["data", "info", raw, "--format", sys.argv[4], "--cache-dir", cache_dir, "--json"])
    if code:
        raise SystemExit(f"data info exited with {code}")
    out["n_structures"] = json.loads(text.getvalue())["n_structures"]
elif stage == "build":
    from torchmdx.data import build_cache
    out["cache"] = str(build_cache(raw, "ani1x", cache_dir=cache_dir))
elif stage == "setup":
    import torch
    torch.set_num_threads(1)
    from torchmdx.data import TorchmdxDataModule
    import torchmdx.data.datamodule
    out["imports_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    dm = TorchmdxDataModule({"path": raw, "format": "ani1x", "cache_dir": cache_dir, "train_size": 0.8,
                             "val_size": 0.1, "test_size": 0.1, "batch_size": int(sys.argv[4])})
    dm.setup()
    out["mmap"] = dm.dataset.mmap
    out["train"] = len(dm.split.train)
    out["elements"] = dm.elements
elif stage == "batches":
    import torch
    torch.set_num_threads(1)
    from torchmdx.data import BatchLoader, H5Dataset, build_cache
    cache = build_cache(raw, "ani1x", cache_dir=cache_dir)
    t = time.perf_counter()
    ds = H5Dataset(cache, mmap="auto")
    out["open_s"] = time.perf_counter() - t
    batch_size, limit = int(sys.argv[4]), int(sys.argv[6])
    loader = BatchLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    structures = batches = 0
    for batch in loader:
        structures += batch.num_graphs
        batches += 1
        if limit and batches >= limit:
            break
    out["structures"], out["batches"], out["mmap"] = structures, batches, ds.mmap
out["seconds"] = time.perf_counter() - t
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
try:  # resident memory now, split into the process's own (anonymous) and mapped file pages
    for line in open("/proc/self/status"):
        key, value = line.split(":", 1)
        if key in ("RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
except OSError:
    pass
print("BENCH " + json.dumps(out))
"""


def _stage(args: list, env: dict) -> dict:
    import json
    import subprocess

    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", STAGE_CODE, *map(str, args)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"stage {args[0]} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")][-1]
    out = json.loads(line[6:])
    out["wall_s"] = time.perf_counter() - t
    return out


def _written(stage: str, raw: Path, cache_dir: Path, n: int, env: dict) -> dict:
    """The synthetic file's writing stage, or, for a file kept from an earlier run (``--keep``), its size only."""
    if raw.is_file():
        return {"seconds": 0.0, "peak_rss_mb": float("nan"), "structures": n, "atoms": None, "formulas": None,
                "bytes": raw.stat().st_size}
    return _stage([stage, raw, cache_dir, n, Path(__file__).resolve().parent], env)


def run_synthetic(args) -> int:
    import datetime
    import os

    work = args.keep or Path(tempfile.mkdtemp(prefix="torchmdx-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    raw, cache_dir = work / "synthetic_ani1x.h5", work / "cache"
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    n = args.synthetic
    rows = []
    try:
        w = _written("write", raw, cache_dir, n, env)
        rows.append(("write synthetic ANI-1x file", w["seconds"], w["peak_rss_mb"], _split(w),
                     f"{w['formulas']} formulas, {w['atoms']} atoms, {w['bytes'] / 2**30:.2f} GiB"))
        shutil.rmtree(cache_dir, ignore_errors=True)  # a kept folder: build again, do not reuse
        b = _stage(["build", raw, cache_dir, n], env)
        cache = Path(b["cache"])
        rows.append(("build cache (streamed)", b["seconds"], b["peak_rss_mb"], _split(b),
                     f"{n / b['seconds']:,.0f} structures/s, cache {cache.stat().st_size / 2**30:.2f} GiB"))
        info = _stage(["info", raw, cache_dir, "ani1x"], env)
        rows.append(("torchmdx data info --json (imports included)", info["seconds"], info["peak_rss_mb"], _split(info),
                     f"process wall time {info['wall_s']:.2f} s"))
        s = _stage(["setup", raw, cache_dir, args.batch_size], env)
        rows.append(("DataModule.setup: open, split, fit, stats", s["seconds"], s["peak_rss_mb"], _split(s),
                     f"mmap {s['mmap']}, {s['train']} training structures; {s['imports_rss_mb']:.0f} MB after "
                     "importing torch and lightning"))
        r = _stage(["batches", raw, cache_dir, args.batch_size, "", args.max_batches], env)
        rows.append((f"batches of {args.batch_size}, one thread", r["seconds"], r["peak_rss_mb"], _split(r),
                     f"{r['structures'] / r['seconds']:,.0f} structures/s, {r['batches'] / r['seconds']:,.0f} "
                     f"batches/s ({r['batches']} batches; open {r['open_s']:.2f} s, mmap {r['mmap']})"))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    import torch

    print(f"torchmdx data at scale: {n:,} synthetic ANI-1x conformations; {platform.node()}, "
          f"{os.cpu_count()} cores, {_mem_gb():.0f} GB; torch {torch.__version__}; "
          f"{datetime.datetime.now().isoformat(timespec='minutes')}")
    _print_stages(rows)
    return 0


def _stage_folder(args, prefix: str, raw_name: str) -> tuple:
    """(work folder (``--keep`` or a new temporary one), raw file path, cache folder, bench folder, the stage
    processes' environment) of a ``--synthetic-*`` run."""
    import os

    work = args.keep or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=str(here.parent), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return work, work / raw_name, work / "cache", here, env


def run_synthetic_extxyz(args) -> int:
    """``--synthetic-extxyz N``: write an MPtrj-like extxyz, build its cache (streamed), read it whole; each stage
    in a fresh process, its time and peak RSS (module docstring)."""
    import datetime
    import os

    work, raw, cache_dir, here, env = _stage_folder(args, "torchmdx-bench-extxyz-", "synthetic_mptrj.extxyz")
    n = args.synthetic_extxyz
    rows = []
    try:
        w = _written("write_extxyz", raw, cache_dir, n, env)
        rows.append(("write synthetic extxyz", w["seconds"], w["peak_rss_mb"], _split(w),
                     f"{w['atoms']} atoms, {w['bytes'] / 2**30:.2f} GiB"))
        shutil.rmtree(cache_dir, ignore_errors=True)  # a kept folder: build again, do not reuse
        b = _stage(["build_extxyz", raw, cache_dir, args.chunk_atoms or 0, here], env)
        cache = Path(b["cache"])
        chunk = args.chunk_atoms or "2^20 (default)"
        rows.append(("build cache (streamed, one parse)", b["seconds"], b["peak_rss_mb"], _split(b),
                     f"{n / b['seconds']:,.0f} frames/s, chunks of {chunk} atoms, cache "
                     f"{cache.stat().st_size / 2**20:.0f} MiB"))
        if not args.skip_whole:
            r = _stage(["read_extxyz", raw, cache_dir, 0, here], env)
            rows.append(("read_ase (whole file in memory, one pass)", r["seconds"], r["peak_rss_mb"], _split(r),
                         f"{n / r['seconds']:,.0f} frames/s"))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"torchmdx data at scale: an extxyz of {n:,} synthetic MPtrj-like frames; {platform.node()}, "
          f"{os.cpu_count()} cores, {_mem_gb():.0f} GB; {datetime.datetime.now().isoformat(timespec='minutes')}")
    _print_stages(rows)
    return 0


def run_synthetic_db(args) -> int:
    """``--synthetic-db N``: write an MPtrj-like ASE database, build its cache (streamed), summarise it without a
    cache (streamed), read it whole (rows paged, and all at once as before); each stage in a fresh process, its time
    and peak RSS (module docstring)."""
    import datetime
    import os

    work, raw, cache_dir, here, env = _stage_folder(args, "torchmdx-bench-db-", "synthetic_mptrj.db")
    n = args.synthetic_db
    rows = []
    try:
        w = _written("write_db", raw, cache_dir, n, env)
        rows.append(("write synthetic ASE database", w["seconds"], w["peak_rss_mb"], _split(w),
                     f"{w['atoms']} atoms, {w['bytes'] / 2**30:.2f} GiB"))
        shutil.rmtree(cache_dir, ignore_errors=True)  # a kept folder: build again, do not reuse
        b = _stage(["build_db", raw, cache_dir, args.chunk_atoms or 0], env)
        chunk = args.chunk_atoms or "2^20 (default)"
        rows.append(("build cache (streamed, one fetch)", b["seconds"], b["peak_rss_mb"], _split(b),
                     f"{n / b['seconds']:,.0f} rows/s, chunks of {chunk} atoms, cache "
                     f"{Path(b['cache']).stat().st_size / 2**20:.0f} MiB"))
        shutil.rmtree(cache_dir, ignore_errors=True)  # data info on the raw file: no cache
        i = _stage(["info", raw, cache_dir, "ase"], env)
        rows.append(("data info --json, no cache (streamed)", i["seconds"], i["peak_rss_mb"], _split(i),
                     f"{n / i['seconds']:,.0f} rows/s (torch imports included)"))
        if not args.skip_whole:
            for stage, what in (("info_db_whole", "data info as before (whole read, all rows)"),
                                ("read_db", "read_ase (rows paged, all frames held)"),
                                ("read_db_select", "read_ase, all rows at once (before)")):
                r = _stage([stage, raw, cache_dir], env)
                rows.append((what, r["seconds"], r["peak_rss_mb"], _split(r), f"{n / r['seconds']:,.0f} rows/s"))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"torchmdx data at scale: an ASE database of {n:,} synthetic MPtrj-like rows; {platform.node()}, "
          f"{os.cpu_count()} cores, {_mem_gb():.0f} GB; {datetime.datetime.now().isoformat(timespec='minutes')}")
    _print_stages(rows)
    return 0


def _print_stages(rows) -> None:
    """The stage table: (stage, seconds, peak RSS MB, anon/file split, notes) per row."""
    print(f"{'stage':<44} {'seconds':>9} {'peak RSS MB':>12} {'anon/file MB at end':>20}  notes")
    print("-" * 130)
    for stage, seconds, rss, split, notes in rows:
        rss_text = f"{rss:>12.0f}" if rss is not None and rss == rss else f"{'-':>12}"
        print(f"{stage:<44} {seconds:>9.2f} {rss_text} {split:>20}  {notes}")


def _split(out: dict) -> str:
    if "RssAnon" not in out:
        return "-"
    return f"{out['RssAnon']:.0f} / {out['RssFile']:.0f}"


def _mem_gb() -> float:
    try:
        with open("/proc/meminfo") as handle:
            return int(handle.readline().split()[1]) / 2**20
    except OSError:
        return float("nan")


MAKERS = {"ani1x": (synthetic_ani1x, "synthetic.h5"), "md17": (synthetic_md17, "synthetic.npz"),
          "extxyz": (synthetic_extxyz, "synthetic.extxyz")}


def check_arguments(args) -> None:
    """Sizes and counts in range, one line each (round 20: ``--n 0`` said "synthetic.h5: not in the ANI-1x
    layout" of a temporary file, ``--batch-sizes 0`` was torch's ValueError traceback after the cache build)."""
    from torchmdx.devices import check_threads, worker_limit
    from torchmdx.errors import ConfigError

    for option, values, least in (("--n", [args.n], 1), ("--batch-sizes", args.batch_sizes, 1),
                                  ("--workers", args.workers, 0), ("--synthetic", [args.synthetic], 1),
                                  ("--batch-size", [args.batch_size], 1), ("--max-batches", [args.max_batches], 0),
                                  ("--synthetic-extxyz", [args.synthetic_extxyz], 1),
                                  ("--synthetic-db", [args.synthetic_db], 1),
                                  ("--chunk-atoms", [args.chunk_atoms], 1)):
        for value in values:
            if value is not None and value < least:
                raise ConfigError(f"{option} must be >= {least}, got {value}")
    if max(args.workers) > worker_limit():
        raise ConfigError(f"--workers must be at most {worker_limit()} (4 x this machine's CPUs), "
                          f"got {max(args.workers)}")
    check_threads(args.threads, "--threads")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="number of structures")
    parser.add_argument("--format", choices=sorted(MAKERS), default="ani1x")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    parser.add_argument("--mmap", action="store_true", help="memory-map the per-atom arrays")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep the files")
    parser.add_argument("--synthetic", type=int, default=None, metavar="N",
                        help="at scale: N synthetic ANI-1x conformations, each stage in a fresh process (time, peak RSS)")
    parser.add_argument("--batch-size", type=int, default=32, help="--synthetic: structures per batch")
    parser.add_argument("--max-batches", type=int, default=0, help="--synthetic: stop after this many batches (0: an epoch)")
    parser.add_argument("--synthetic-extxyz", type=int, default=None, metavar="N",
                        help="at scale: an extxyz of N synthetic MPtrj-like frames: streamed cache build and whole "
                             "read, each in a fresh process (time, peak RSS)")
    parser.add_argument("--synthetic-db", type=int, default=None, metavar="N",
                        help="at scale: an ASE database of N synthetic MPtrj-like rows: streamed cache build and data "
                             "info, whole reads, each in a fresh process (time, peak RSS)")
    parser.add_argument("--chunk-atoms", type=int, default=None,
                        help="--synthetic-extxyz, --synthetic-db: atoms per chunk of the streamed build (default 2^20)")
    parser.add_argument("--skip-whole", action="store_true",
                        help="--synthetic-extxyz, --synthetic-db: do not time the whole read")
    args = parser.parse_args(argv)
    check_arguments(args)
    if args.synthetic:
        return run_synthetic(args)
    if args.synthetic_extxyz:
        return run_synthetic_extxyz(args)
    if args.synthetic_db:
        return run_synthetic_db(args)

    import torch
    from torch_geometric.loader import DataLoader

    from torchmdx.data import H5Dataset, build_cache
    from torchmdx.data.loader import BatchLoader

    if args.threads:
        torch.set_num_threads(args.threads)

    work = args.keep or Path(tempfile.mkdtemp(prefix="torchmdx-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    maker, name = MAKERS[args.format]
    raw = work / name
    rows = []
    t = time.perf_counter()
    maker(raw, args.n)
    rows.append(("write synthetic raw file", args.n, time.perf_counter() - t))
    fmt = "ase" if args.format == "extxyz" else args.format
    try:
        t = time.perf_counter()
        cache = build_cache(raw, fmt, cache_dir=work / "cache")
        rows.append((f"build cache ({fmt} -> HDF5)", args.n, time.perf_counter() - t))
        t = time.perf_counter()
        build_cache(raw, fmt, cache_dir=work / "cache")
        rows.append(("check cache is current", args.n, time.perf_counter() - t))
        t = time.perf_counter()
        dataset = H5Dataset(cache, mmap=args.mmap)
        rows.append(("open H5Dataset" + (" (mmap)" if args.mmap else ""), len(dataset), time.perf_counter() - t))
        t = time.perf_counter()
        for k in range(len(dataset)):
            dataset[k]
        rows.append(("index every item (no batching)", len(dataset), time.perf_counter() - t))
        for workers in args.workers:
            for batch_size in args.batch_sizes:
                for name, loader_cls in (("PyG DataLoader", DataLoader), ("BatchLoader", BatchLoader)):
                    loader = loader_cls(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                        generator=torch.Generator().manual_seed(0))
                    t = time.perf_counter()
                    seen = 0
                    for batch in loader:
                        seen += batch.num_graphs
                    rows.append((f"epoch {name}, batch {batch_size}, workers {workers}", seen,
                                 time.perf_counter() - t))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"torchmdx data benchmark: {args.n} structures, {args.format} layout, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'stage':<48} {'structures':>11} {'seconds':>9} {'structures/s':>14}")
    print("-" * 85)
    for stage, count, seconds in rows:
        print(f"{stage:<48} {count:>11} {seconds:>9.3f} {count / seconds:>14,.0f}")
    return 0


if __name__ == "__main__":
    from torchmdx.cli.main import run_script

    sys.exit(run_script(main))  # a TorchmdxError is one error line (torchmdx bench runs this file)
