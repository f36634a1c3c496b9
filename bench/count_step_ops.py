#!/usr/bin/env python3
"""Kernel-like operations of one ET training step, counted on the CPU (no GPU needed).

A captured training step on the GPU is latency-bound: each of its small kernels costs ~2-3 µs
whatever its size, so the number of kernels sets the step time. This script counts, with a
``TorchDispatchMode``, the aten operations that launch a kernel (views, reshapes and host reads
left out) in the three parts of a force-training step of ``configs/et_md17.yaml``'s model on
aspirin-sized molecules: the energy forward, the forces (``autograd.grad`` with
``create_graph=True``) and the loss backward (the double backward). The optimiser, EMA and
error sums are a few fused kernels on the GPU and are not counted.

    python bench/count_step_ops.py [--batch 8] [--atoms 21] [--top 12]

Use it to see what a change to the model or the loss does to the kernel count before a GPU is
at hand (docs/training.md, "Time to an accurate model").
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: aten operations that launch no kernel on the GPU (views, metadata, host reads)
NO_KERNEL = {"view", "t", "unsqueeze", "expand", "squeeze", "slice", "select", "detach", "split", "as_strided",
             "reshape", "permute", "alias", "_unsafe_view", "transpose", "unbind", "_reshape_alias",
             "split_with_sizes", "narrow", "chunk", "_local_scalar_dense"}


class KernelCount(TorchDispatchMode):
    """Counts the aten operations dispatched inside it, by name, less :data:`NO_KERNEL`."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count_step(batch_size: int = 8, atoms: int = 21, seed: int = 0) -> dict:
    """{part: Counter of operations} for one force-training step (module docstring)."""
    from torchmdx.config import load_yaml
    from torchmdx.kernels.neighbors import neighbor_list
    from torchmdx.nn import ETPotential

    values = dict(load_yaml(ROOT / "configs" / "et_md17.yaml")["model"])
    values["backend"] = "torch"
    model = ETPotential(values)
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(batch_size * atoms, 3, generator=g) * 6.0 + torch.repeat_interleave(
        torch.arange(batch_size) * 50.0, atoms).unsqueeze(-1)
    z = torch.randint(1, 9, (batch_size * atoms,), generator=g)
    batch = torch.repeat_interleave(torch.arange(batch_size), atoms)
    energy, forces = torch.randn(batch_size, generator=g), torch.randn(batch_size * atoms, 3, generator=g)
    neighbors = neighbor_list(pos, model.cutoff, batch, max_pairs=batch_size * atoms * (atoms - 1))
    leaf = pos.clone().requires_grad_(True)
    parts = {}
    with KernelCount() as counted:
        e = model(z, leaf, batch, neighbors=neighbors, forces=False, num_structures=batch_size)["energy"]
    parts["forward"] = counted.ops
    with KernelCount() as counted:
        f = -torch.autograd.grad(e.sum(), leaf, create_graph=True)[0]
    parts["forces (create_graph)"] = counted.ops
    with KernelCount() as counted:
        loss = 0.2 * ((e - energy) ** 2).mean() + 0.8 * ((f - forces) ** 2).mean()
        loss.backward()
    parts["loss backward (double backward)"] = counted.ops
    return parts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--atoms", type=int, default=21)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    parts = count_step(args.batch, args.atoms)
    total = 0
    for name, ops in parts.items():
        n = sum(ops.values())
        total += n
        top = ", ".join(f"{op} {k}" for op, k in ops.most_common(args.top))
        print(f"{name:34s} {n:6d}   {top}")
    print(f"{'total':34s} {total:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
