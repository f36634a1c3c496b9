#!/usr/bin/env python3
"""Kernel-like operations of one Equiformer energy + forces call, counted on the CPU, per module type.

Counts with :class:`count_step_ops.KernelCount` (a ``TorchDispatchMode``; views, reshapes and
host reads left out) the aten operations of the forward (energy) and of the force pass
(``autograd.grad``, no ``create_graph``, as in MD) of ``configs/equiformer_md17.yaml``'s model
(the paper-size MD17 model, 3.24 M parameters) on alanine dipeptide (22 atoms, all pairs within
the 5 Å cutoff). Forward operations are attributed to the outermost module of a known kind
(e3nn ``Linear``, the depth-wise tensor products, gates, layer norms, radial MLPs ...), else to
the innermost module; the force pass is listed by operation name. ``--reference`` runs the
e3nn reference path (the implementation before the grouped fast path) for comparison;
``--time N`` adds the median wall time of N energy + forces calls on one CPU thread.

    python bench/count_equiformer_ops.py [--reference] [--time 5] [--compile] [--top 10] [--config ...]

``--compile`` times the first call of :class:`torchmdx.nn.traced.TracedForces` (trace and
inductor compile on the CPU) for a small 2-layer model (:data:`SMALL`), and counts the
operations of its traced graph run uncompiled (inductor's cache goes to a fresh temporary
directory, so the first call compiles).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from count_step_ops import NO_KERNEL, KernelCount  # noqa: E402

#: module kinds ops are attributed to (outermost match wins), by class name
KINDS = ("GroupedLinear", "Linear", "DepthwiseTensorProduct", "TensorProduct", "GroupedGate", "Gate", "Activation",
         "EquivariantLayerNorm", "RadialMLP", "SmoothLeakyReLU", "LayerNorm", "Embedding", "CosineCutoff",
         "ExpNormalSmearing", "GaussianSmearing", "BesselRBF")
SKIP = ("GraphModule", "Sequential", "ModuleList")


class ModuleKernelCount(KernelCount):
    """:class:`KernelCount` that also counts per module kind (module docstring)."""

    def __init__(self):
        super().__init__()
        self.by_module: collections.Counter = collections.Counter()
        self.stack: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in NO_KERNEL:
            self.by_module[self.owner()] += 1
        return super().__torch_dispatch__(func, types, args, kwargs)

    def owner(self) -> str:
        for name in self.stack:
            if name in KINDS:
                return name
        inner = [name for name in self.stack if name not in SKIP]
        return inner[-1] if inner else "(outside modules)"


@contextlib.contextmanager
def module_stack(counter: ModuleKernelCount):
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    def pre(module, args):
        counter.stack.append(type(module).__name__)

    def post(module, args, out):
        counter.stack.pop()

    handles = [register_module_forward_pre_hook(pre), register_module_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def build(config: Path, dtype: str | None = None):
    from torchmdx.config import load_yaml
    import torchmdx

    values = dict(load_yaml(config)["model"])
    if dtype:
        values["dtype"] = dtype
    return torchmdx.build_model(values).eval()


def alanine_dipeptide():
    from ase.io import read

    atoms = read(ROOT.parent / "shared" / "data" / "systems" / "alanine_dipeptide.xyz")
    return torch.tensor(atoms.numbers, dtype=torch.long), torch.tensor(atoms.positions, dtype=torch.float32)


def count(model, z, pos) -> dict:
    from torchmdx.kernels.neighbors import neighbor_list

    batch = torch.zeros_like(z)
    neighbors = neighbor_list(pos, model.cutoff, batch, max_pairs=len(z) * (len(z) - 1))
    leaf = pos.clone().requires_grad_(True)
    forward = ModuleKernelCount()
    with forward, module_stack(forward):
        e = model(z, leaf, batch, neighbors=neighbors, forces=False, num_structures=1)["energy"]
    with KernelCount() as forces:
        torch.autograd.grad(e.sum(), leaf)
    return {"forward": forward, "forces": forces}


def wall_time(model, z, pos, repeats: int) -> float:
    model(z, pos)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(z, pos)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


#: the small model of the compile-time measurement (tests/test_equiformer.py's model, float32)
SMALL = {"architecture": "equiformer", "lmax": 2, "channels": 8, "num_layers": 2, "num_heads": 2,
         "feature_channels": 16, "num_rbf": 8, "radial_hidden": [16], "cutoff_upper": 4.0, "seed": 0}


def compile_time(z, pos) -> tuple[float, float, int]:
    """(seconds of the first call: trace + inductor compile, seconds of the second call, aten
    operations of the traced graph) of :class:`torchmdx.nn.traced.TracedForces` for
    :data:`SMALL` on the CPU."""
    import tempfile

    import torchmdx
    from torchmdx.kernels.neighbors import neighbor_list
    from torchmdx.nn.traced import TracedForces

    # a fresh inductor cache: a cached graph would make the first call a cache hit
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="torchmdx_inductor_")

    model = torchmdx.build_model(SMALL).eval()
    batch = torch.zeros_like(z)
    nl = neighbor_list(pos, model.cutoff, batch, max_pairs=len(z) * (len(z) - 1))
    traced = TracedForces(model, compile=False)
    traced(z, pos, batch, 1, nl.edge_index, None, nl.mask)  # traces
    with KernelCount() as counted:
        traced(z, pos, batch, 1, nl.edge_index, None, nl.mask)
    traced = TracedForces(model, compile=True)
    t0 = time.perf_counter()
    traced(z, pos, batch, 1, nl.edge_index, None, nl.mask)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    traced(z, pos, batch, 1, nl.edge_index, None, nl.mask)
    return first, time.perf_counter() - t0, sum(counted.ops.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "equiformer_md17.yaml")
    parser.add_argument("--reference", action="store_true", help="the e3nn reference path")
    parser.add_argument("--time", type=int, default=0, metavar="N", help="median of N timed calls")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--compile", action="store_true",
                        help="also time the CPU inductor compile of the traced graph of a small model (minutes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from torchmdx.nn.equiformer.layers import reference_ops

    model = build(args.config)
    z, pos = alanine_dipeptide()
    with reference_ops(args.reference):
        parts = count(model, z, pos)
        print(f"{'reference (e3nn)' if args.reference else 'fast path'}: {args.config.name}, "
              f"alanine dipeptide ({len(z)} atoms)")
        total = 0
        for name, counted in parts.items():
            n = sum(counted.ops.values())
            total += n
            top = ", ".join(f"{op} {k}" for op, k in counted.ops.most_common(args.top))
            print(f"{name:10s} {n:6d}   {top}")
            if isinstance(counted, ModuleKernelCount):
                for kind, k in counted.by_module.most_common():
                    print(f"    {kind:28s} {k:6d}")
        print(f"{'total':10s} {total:6d}")
        if args.time:
            print(f"CPU wall time per energy + forces call (1 thread, median of {args.time}): "
                  f"{1e3 * wall_time(model, z, pos, args.time):.1f} ms")
        if args.compile:
            first, second, ops = compile_time(z, pos)
            print(f"traced graph of the small model ({ops} operations per energy + forces call): first call "
                  f"(trace + inductor compile) {first:.1f} s, second call {1e3 * second:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
