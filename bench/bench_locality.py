#!/usr/bin/env python3
"""Atom locality: neighbour bandwidth and ET energy + forces time with the atoms in the input
order, or sorted along a Hilbert or Morton curve (torchmdx/kernels/locality.py).

For each system (extxyz files; names are looked up in ``--data``, default ``.benchdata`` then
``../shared/data/systems``; a path is used as is):

- bandwidth of the neighbour list (cutoff 5 Å) in four orders: ``input`` (the file's),
  ``shuffled`` (a random permutation, seed 0: the worst case), ``hilbert``, ``morton``:
  mean |i - j|, the fraction of neighbours in the receiver's 32-atom block, the mean number
  of 32-atom sender blocks a block of 32 receivers reads (and of 512-atom blocks per 512
  receivers: roughly what the programs in flight on the whole GPU read), and the block spread
  that ``auto`` compares (RMS distance to the centroid of 32 consecutive atoms), with the
  order ``auto`` picks (``auto_order``: the curve only if it is clearly tighter than the input);
- ms to compute the order itself (``spatial_order``);
- ms per ``model(z, pos)`` call (neighbour list, energy, forces by autograd; what a calculator
  pays) with ``Potential.atom_order`` = input, hilbert, morton, auto (these include the sort
  and the permutations; auto is forced on for the system whatever its size), and ``hilbert_presorted`` (positions sorted once beforehand, the MD engine's
  case: only the kernels' gain); the largest force difference to the input order's (forces
  are returned in the input order in every case);
- peak GPU memory of a call.

The model is the ET with TorchMD-NET's MD17 hyper-parameters (128 channels, 6 layers, 8 heads,
32 exp-normal RBF, cutoff 5 Å, vector cutoff, float32, random weights, seed 0); ``--tiny``: a
16-channel, 1-layer model (CPU smoke test). On the CPU the times are printed but mean nothing
("no timing claims").

    python bench/bench_locality.py --systems dhfr,factorIX,stmv [--device cuda] [--out DIR]

Writes ``bench_locality.json`` to ``--out`` (default ``$OUT`` or the current folder).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from torchmdx.kernels import locality  # noqa: E402
from torchmdx.kernels.locality import (  # noqa: E402
    auto_order, block_spread, blocks_touched, inverse_permutation, neighbor_bandwidth, same_block_fraction,
    spatial_order,
)
from torchmdx.kernels.neighbors import neighbor_list  # noqa: E402

import gpu_timing  # noqa: E402

ET_MD17 = dict(embedding_dimension=128, num_layers=6, num_heads=8, num_rbf=32, rbf_type="expnorm", trainable_rbf=False,
               activation="silu", attn_activation="silu", neighbor_embedding=True, distance_influence="both",
               vector_cutoff=True, cutoff_lower=0.0, cutoff_upper=5.0, max_z=100, dtype="float32", seed=0)
TINY = dict(ET_MD17, embedding_dimension=16, num_layers=1, num_heads=2, num_rbf=8)
CUTOFF = 5.0
BLOCK = 32
ORDERS = ("input", "hilbert", "morton", "auto")


def find_system(name: str, data: list[Path]) -> Path:
    path = Path(name)
    if path.suffix and path.is_file():
        return path
    for folder in data:
        candidate = folder / f"{name}.xyz"
        if candidate.is_file():
            return candidate
    raise SystemExit(f"error: system {name!r} not found in {', '.join(map(str, data))}")


def load(path: Path, device, dtype):
    import ase.io

    atoms = ase.io.read(path)
    z = torch.as_tensor(atoms.numbers, dtype=torch.long, device=device)
    pos = torch.as_tensor(atoms.get_positions(), dtype=dtype, device=device)
    cell = pbc = None
    if atoms.pbc.any():
        cell = torch.as_tensor(atoms.cell.array, dtype=dtype, device=device).unsqueeze(0)
        pbc = torch.as_tensor(atoms.pbc, device=device).unsqueeze(0)
    return z, pos, cell, pbc


def bandwidth_rows(pos, cell, pbc) -> dict:
    n = pos.shape[0]
    orders = {
        "input": torch.arange(n, device=pos.device),
        "shuffled": torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(pos.device),
        "hilbert": spatial_order(pos, cell=cell, pbc=pbc, curve="hilbert", num_structures=1),
        "morton": spatial_order(pos, cell=cell, pbc=pbc, curve="morton", num_structures=1),
    }
    rows = {}
    for name, perm in orders.items():
        nl = neighbor_list(pos[perm], CUTOFF, cell=cell, pbc=pbc)
        rows[name] = {
            "pairs": int(nl.edge_index.shape[1]),
            "mean_abs_i_minus_j": neighbor_bandwidth(nl.edge_index, nl.mask),
            f"same_{BLOCK}_block_fraction": same_block_fraction(nl.edge_index, BLOCK, nl.mask),
            f"sender_blocks_per_{BLOCK}_receivers": blocks_touched(nl.edge_index, BLOCK, nl.mask),
            "sender_blocks_per_512_receivers": blocks_touched(nl.edge_index, 512, nl.mask),
            f"block_spread_{BLOCK}_A": float(block_spread(pos, perm, BLOCK, cell, pbc)),
        }
    auto = auto_order(pos, cell=cell, pbc=pbc, num_structures=1)
    rows["auto_picks"] = "input" if torch.equal(auto, orders["input"]) else locality.AUTO_CURVE
    return rows


def call_rows(model, z, pos, cell, pbc, device, warmup, repeats) -> dict:
    rows = {}
    reference = None
    variants = [(order, order, None) for order in ORDERS]
    variants.append(("hilbert_presorted", "input", spatial_order(pos, cell=cell, pbc=pbc, num_structures=1)))
    locality.LOCALITY_MIN_ATOMS, min_atoms = 0, locality.LOCALITY_MIN_ATOMS  # auto on at any size
    for name, order, presort in variants:
        model.atom_order = order
        z_in, pos_in = (z, pos) if presort is None else (z[presort], pos[presort])

        def call():
            return model(z_in, pos_in, cell=cell, pbc=pbc, num_structures=1)

        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        ms = gpu_timing.cuda_time(call, warmup, max(1, repeats))
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
        out = call()
        forces = out["forces"].detach()
        if presort is not None:
            forces = forces[inverse_permutation(presort)]
        energy = float(out["energy"].detach().sum())
        if reference is None:
            reference = (energy, forces)
        rows[name] = {
            "ms": ms,
            "peak_GiB": peak,
            "energy_eV": energy,
            "energy_diff_vs_input_eV": abs(energy - reference[0]),
            "force_max_abs_diff_vs_input": float((forces - reference[1]).abs().max()) if forces.numel() else 0.0,
            "force_max_abs": float(forces.abs().max()) if forces.numel() else 0.0,
        }
    model.atom_order = "input"
    locality.LOCALITY_MIN_ATOMS = min_atoms
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default="dhfr,factorIX,stmv", help="comma-separated names or extxyz paths")
    parser.add_argument("--data", action="append", default=None,
                        help="folder of <name>.xyz (repeatable; default .benchdata, ../shared/data/systems)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a 16-channel, 1-layer ET (CPU smoke test)")
    parser.add_argument("--bandwidth-only", action="store_true",
                        help="only the neighbour-list measures (no model calls)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)

    from torchmdx.nn import ETPotential

    device = torch.device(args.device)
    gpu_timing.DEVICE = "cuda" if device.type == "cuda" else "cpu"  # timings: CUDA events, or wall clock
    data = [Path(d) for d in args.data] if args.data else [ROOT / ".benchdata",
                                                          ROOT.parent / "shared" / "data" / "systems"]
    hparams = TINY if args.tiny else ET_MD17
    model = ETPotential(dict(hparams)).to(device).eval()
    dtype = next(model.parameters()).dtype
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": hparams,
        "cutoff_A": CUTOFF,
        "timing_claims": device.type == "cuda",
        "systems": [],
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    for name in [s for s in args.systems.split(",") if s]:
        path = find_system(name, data)
        row = {"system": name, "file": str(path)}
        try:
            z, pos, cell, pbc = load(path, device, dtype)
            row["atoms"] = int(z.shape[0])
            row["periodic"] = cell is not None
            row["bandwidth"] = bandwidth_rows(pos, cell, pbc)
            row["order_ms"] = {
                curve: gpu_timing.cuda_time(
                    lambda c=curve: spatial_order(pos, cell=cell, pbc=pbc, curve=c, num_structures=1),
                    args.warmup, max(1, args.repeats))
                for curve in ("hilbert", "morton")
            }
            row["order_ms"]["auto"] = gpu_timing.cuda_time(
                lambda: auto_order(pos, cell=cell, pbc=pbc, num_structures=1), args.warmup, max(1, args.repeats))
            if not args.bandwidth_only:
                row["calls"] = call_rows(model, z, pos, cell, pbc, device, args.warmup, args.repeats)
        except Exception as exc:  # noqa: BLE001 - one system failing (memory) must not lose the others
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc()
            print(f"{name}: {row['error']}", file=sys.stderr)
        result["systems"].append(row)

    claim = "" if device.type == "cuda" else "   (CPU: no timing claims)"
    print(f"device {result['device']}, torch {result['torch']}{claim}")
    print(f"{'system':<28}{'atoms':>7}  {'order':<18}{'|i-j|':>9}{'blk32':>7}{'blocks':>8}{'b512':>6}{'spread':>7}"
          f"{'ms/call':>10}{'x input':>9}{'dF max':>10}")
    for row in result["systems"]:
        if "error" in row:
            print(f"{row['system']:<28}  error: {row['error']}")
            continue
        calls = row.get("calls", {})
        base = calls["input"]["ms"] if calls else None
        for order in ("shuffled", "input", "hilbert", "morton", "auto", "hilbert_presorted"):
            bw = row["bandwidth"].get(order.replace("_presorted", ""))
            if order == "auto":
                bw = row["bandwidth"][row["bandwidth"]["auto_picks"]]
            call = calls.get(order)
            cols = f"{bw['mean_abs_i_minus_j']:>9.1f}{bw[f'same_{BLOCK}_block_fraction']:>7.2f}" \
                   f"{bw[f'sender_blocks_per_{BLOCK}_receivers']:>8.1f}{bw['sender_blocks_per_512_receivers']:>6.1f}" \
                   f"{bw[f'block_spread_{BLOCK}_A']:>7.2f}" if bw else " " * 37
            cols += (f"{call['ms']:>10.3f}{base / call['ms']:>9.2f}{call['force_max_abs_diff_vs_input']:>10.2e}"
                     if call else "")
            print(f"{Path(row['system']).stem:<28}{row['atoms']:>7}  {order:<18}{cols}")
        print(f"{'':<37}auto picks {row['bandwidth']['auto_picks']}; the order itself: hilbert "
              f"{row['order_ms']['hilbert']:.3f} ms, morton {row['order_ms']['morton']:.3f} ms, auto "
              f"{row['order_ms']['auto']:.3f} ms")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "bench_locality.json"
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, target)
    print(f"wrote {target}")
    return 1 if any("error" in row for row in result["systems"]) else 0


if __name__ == "__main__":
    sys.exit(main())
