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

``--md ENSEMBLE`` counts instead the integrator's part of one native-engine MD step (the force
call is a stub; the model's graph is counted by ``bench_model.py``), eager and fused
(``torchmdx/md/integrators_fused.py``): the eager step's aten kernels; for the fused step the
aten kernels left outside the compiled functions (the random draws) and the kernels inductor
generated for the compiled functions on this machine's device (on the CPU C++ loops, so only a
guide to the Triton kernel count on a GPU; ``--device cuda`` counts those):

    python bench/count_step_ops.py --md langevin --system alanine_dipeptide [--replicas 1] [--device cuda]
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


ENSEMBLES = ("nve", "langevin", "bussi", "nose-hoover")


def md_integrator(ensemble: str, system: str = "alanine_dipeptide", replicas: int = 1, data=None,
                  device="cpu", dtype=torch.float64, atom_order: str = "input"):
    """(integrator, state, generator) for ``replicas`` copies of ``system`` (an .xyz in ``data``,
    default ``../shared/data/systems``); forces and velocities random but fixed."""
    from ase.io import read

    from torchmdx.md.engine import order_structures
    from torchmdx.md.integrators import make_integrator
    from torchmdx.md.system import MDState, System

    data = Path(data) if data else ROOT.parent / "shared" / "data" / "systems"
    atoms = read(data / f"{system}.xyz")
    structures, perm = order_structures([atoms.copy() for _ in range(replicas)], atom_order)
    s = System.from_atoms(structures, device, dtype)
    perm_t = None if perm is None else torch.as_tensor(perm, device=s.device)
    integrator = make_integrator(ensemble, s, 0.5, 300.0, atom_perm=perm_t)
    g = torch.Generator(device=s.device).manual_seed(0)
    positions = s.positions_from_templates()
    velocities = s.maxwell_boltzmann(300.0, g)
    forces = torch.randn(positions.shape, generator=g, dtype=dtype, device=s.device)
    zeros = torch.zeros(s.num_structures, dtype=dtype, device=s.device)
    return integrator, MDState(positions, velocities, forces, zeros, zeros.clone(), 0), g


def _no_forces(state) -> None:
    """The force call's stand-in: forces and energy stay as they are."""


def count_md_step(ensemble: str, system: str = "alanine_dipeptide", replicas: int = 1, data=None,
                  atom_order: str = "input", device="cpu", dtype=torch.float64) -> dict:
    """{"eager": Counter, "fused (outside compiled)": Counter, "fused inductor kernels": {function: n}}
    for one step of ``ensemble`` (module docstring)."""
    from torch._inductor import config as inductor_config
    from torch._inductor import metrics

    integrator, state, g = md_integrator(ensemble, system, replicas, data, device, dtype, atom_order)
    integrator.step(state, _no_forces, g)  # warm (first-call work of the eager ops)
    with KernelCount() as counted:
        integrator.step(state, _no_forces, g)
    out = {"eager": counted.ops}
    integrator.set_fused(True)
    kernels = {}
    original = integrator.fused.get

    def counting_get(name, device, **constants):
        fn = original(name, device, **constants)

        def call(*tensors):
            # outside KernelCount (dynamo compiles nothing under a dispatch mode): the compiled
            # function's kernels are inductor's, counted once when it compiles
            from torch.utils._python_dispatch import _disable_current_modes

            before = metrics.generated_kernel_count
            with _disable_current_modes():
                result = fn(*tensors)
            kernels.setdefault(name, metrics.generated_kernel_count - before)
            return result

        return call

    integrator.fused.get = counting_get
    with inductor_config.patch(fx_graph_cache=False):  # a cache hit would generate (count) nothing
        integrator.step(state, _no_forces, g)
        with KernelCount() as counted:
            integrator.step(state, _no_forces, g)
    integrator.fused.get = original
    out["fused (outside compiled)"] = counted.ops
    out["fused inductor kernels"] = kernels
    return out


def main_md(args) -> int:
    ensembles = ENSEMBLES if args.md == "all" else (args.md,)
    print(f"integrator kernels of one MD step, {args.system} x {args.replicas} (force call not counted)")
    for ensemble in ensembles:
        parts = count_md_step(ensemble, args.system, args.replicas, args.data, args.atom_order, args.device,
                              getattr(torch, args.dtype))
        eager, outside, kernels = parts["eager"], parts["fused (outside compiled)"], parts["fused inductor kernels"]
        top = ", ".join(f"{op} {k}" for op, k in eager.most_common(args.top))
        print(f"{ensemble:12s} eager {sum(eager.values()):4d}   {top}")
        fused = sum(outside.values()) + sum(kernels.values())
        per_fn = ", ".join(f"{name} {n}" for name, n in kernels.items())
        rest = ", ".join(f"{op} {k}" for op, k in outside.most_common(args.top)) or "none"
        print(f"{'':12s} fused {fused:4d}   inductor ({args.device}): {per_fn}; aten outside: {rest}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--atoms", type=int, default=21)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--md", choices=ENSEMBLES + ("all",), help="count an MD step's integrator instead")
    parser.add_argument("--system", default="alanine_dipeptide", help="--md: a system of --data")
    parser.add_argument("--replicas", type=int, default=1, help="--md: copies of the system in the batch")
    parser.add_argument("--atom-order", default="input", help="--md: input, hilbert or morton")
    parser.add_argument("--data", default=None, help="--md: folder of the systems (default ../shared/data/systems)")
    parser.add_argument("--device", default="cpu", help="--md: cpu or cuda (on cuda inductor's Triton kernels are counted)")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"], help="--md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.md:
        return main_md(args)
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
