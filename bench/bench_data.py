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
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ELEMENTS = np.array([1, 6, 7, 8])


def synthetic_ani1x(path: Path, n: int, seed: int = 0) -> None:
    import h5py

    rng = np.random.default_rng(seed)
    per_group = 200
    with h5py.File(path, "w") as h5:
        made, g = 0, 0
        while made < n:
            count = min(per_group, n - made)
            natoms = int(rng.integers(5, 31))
            z = np.sort(rng.choice(ELEMENTS, size=natoms, p=[0.5, 0.3, 0.1, 0.1]))
            grp = h5.create_group(f"mol{g:05d}")
            grp["atomic_numbers"] = z.astype(np.uint8)
            grp["coordinates"] = (rng.normal(size=(count, natoms, 3)) * 1.5).astype(np.float32)
            grp["wb97x_dz.energy"] = -40.0 * natoms + rng.normal(size=count) * 0.01
            grp["wb97x_dz.forces"] = rng.normal(size=(count, natoms, 3)) * 0.05
            made += count
            g += 1


def synthetic_md17(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    natoms = 21
    np.savez(path, R=rng.normal(size=(n, natoms, 3)), z=rng.choice(ELEMENTS, size=natoms),
             E=rng.normal(size=(n, 1)) - 400000.0, F=rng.normal(size=(n, natoms, 3)))


def synthetic_extxyz(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as out:
        for k in range(n):
            natoms = int(rng.integers(5, 31))
            z = rng.choice(["H", "C", "N", "O"], size=natoms)
            out.write(f"{natoms}\nProperties=species:S:1:pos:R:3:forces:R:3 energy={-40.0 * natoms:.6f} "
                      f"family=f{k % 50} pbc=\"F F F\"\n")
            for s, p, f in zip(z, rng.normal(size=(natoms, 3)), rng.normal(size=(natoms, 3))):
                out.write(f"{s} {p[0]:.6f} {p[1]:.6f} {p[2]:.6f} {f[0]:.6f} {f[1]:.6f} {f[2]:.6f}\n")


MAKERS = {"ani1x": (synthetic_ani1x, "synthetic.h5"), "md17": (synthetic_md17, "synthetic.npz"),
          "extxyz": (synthetic_extxyz, "synthetic.extxyz")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="number of structures")
    parser.add_argument("--format", choices=sorted(MAKERS), default="ani1x")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    parser.add_argument("--mmap", action="store_true", help="memory-map the per-atom arrays")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep the files")
    args = parser.parse_args(argv)

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
    sys.exit(main())
