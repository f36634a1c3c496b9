"""Variants of the small-molecule call side by side (issue 16 item 5): the whole-model graph on the
neighbor list, on all pairs, with the fused message as custom operators, and the per-part path.

For a molecule of n <= 64 atoms (not periodic) the whole-model graph can take every ordered pair
(i, j) as an edge (``torchmdx.kernels.pairs``): gathers become broadcasts, the scatter-adds of the
messages (and of the gathers' backward) sums over the senders, and no neighbor list is built or
checked inside the CUDA graph. ``torchmdx.nn.traced.PAIR_LAYOUT_MAX_ATOMS`` turns it on. The variant
``ops`` is the neighbor-list graph with the fused Triton message (filters from tables) as custom
operators inside it (``torchmdx.nn.traced.FUSED_MESSAGE_IN_GRAPH``, ``torchmdx.kernels.message_ops``):
inductor fuses around two opaque calls per layer instead of compiling the reference message;
``parts`` is what ``compile: auto`` runs above 64 atoms (the fused kernels with each layer's dense parts
compiled, the call in one CUDA graph). This script measures the variants (``--variants``) in one run
on one GPU:

- the calculator's energy + forces call (``model_setup.graph_call``, traced whole graph, one CUDA
  graph replay): ms per call, kernels and GPU time per replay, the five largest kernels, and the
  force error against a float64 evaluation of the same weights;
- native MD (NVE, CUDA graph per step, fused integrator): steps/s.

    python bench/bench_dense_pairs.py --data .benchdata [--systems alanine_dipeptide,caffeine,testosterone]
        [--variants list,pairs]     # variants: list, pairs, ops, parts (default list,pairs)
    python bench/bench_dense_pairs.py --data .benchdata --systems alanine_dipeptide,chignolin --variants list,ops,parts

``--device cpu`` checks the pairs and ops graphs against the model's own evaluation in float64 (no timing);
``--cpu-kernels`` adds inductor's C++ kernel counts of the list and ops graphs (a proxy, minutes per system).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpu_timing  # noqa: E402
from bench_md import tame  # noqa: E402
from gpu_timing import cuda_time, error_text, replay_kernels  # noqa: E402
from model_setup import graph_call, make_model, read_xyz  # noqa: E402
from torchmdx.nn import traced as traced_module  # noqa: E402

#: variant -> (PAIR_LAYOUT_MAX_ATOMS, FUSED_MESSAGE_IN_GRAPH, compile mode of the call and of MD)
VARIANTS = {"list": (0, False, "whole"), "pairs": (64, False, "whole"), "ops": (0, True, "whole"),
            "parts": (0, False, "parts")}


def check_cpu(data: Path, systems) -> None:
    """float64 on the CPU: the traced graph (uncompiled) in the all-pairs layout, and on the neighbor
    list with the message operators (their torch fallback on the CPU), against the model's own
    evaluation."""
    from torchmdx.kernels.neighbors import neighbor_list
    from torchmdx.kernels.pairs import pair_index
    from torchmdx.nn.traced import TracedForces

    for name in systems:
        z_np, pos_np, _, _ = read_xyz(data / f"{name}.xyz")
        z = torch.tensor(z_np)
        pos = torch.tensor(pos_np, dtype=torch.float64)
        model = make_model("torch", dtype="float64")
        for p in model.parameters():
            p.requires_grad_(False)
        out = model(z, pos)
        batch = torch.zeros_like(z)
        edge_index, mask = pair_index(1, len(z))
        pairs = TracedForces(model, compile=False)(z, pos, batch, 1, edge_index, None, mask, pairs=len(z))
        nl = neighbor_list(pos, model.cutoff, batch)
        ops = TracedForces(model, compile=False, fused_message=True)(z, pos, batch, 1, nl.edge_index, None, nl.mask)
        for variant, (energy, forces, _) in (("pairs", pairs), ("ops", ops)):
            print(f"{name} {variant}: |dE| {float((energy.sum() - out['energy'].detach().sum()).abs()):.2e} eV, "
                  f"max |dF| {float((forces - out['forces']).abs().max()):.2e} eV/Å")


def count_cpu_kernels(data: Path, systems) -> None:
    """A proxy on the CPU (no combo kernels, no atomics there): the C++ kernels inductor generates for the
    float32 whole graph on the neighbor list, with the reference message and with the message operators,
    and the graph's aten nodes (inductor's graph cache off, so that it generates them)."""
    import torch._inductor.config as inductor_config
    import torch._inductor.metrics as metrics

    from torchmdx.kernels.neighbors import neighbor_list
    from torchmdx.nn.traced import TracedForces

    inductor_config.fx_graph_cache = False
    for name in systems:
        z_np, pos_np, _, _ = read_xyz(data / f"{name}.xyz")
        z, pos = torch.tensor(z_np), torch.tensor(pos_np, dtype=torch.float32)
        model = make_model("torch")
        for p in model.parameters():
            p.requires_grad_(False)
        batch = torch.zeros_like(z)
        pairs = neighbor_list(pos, model.cutoff, batch).edge_index.shape[1]
        nl = neighbor_list(pos, model.cutoff, batch, max_pairs=int(1.2 * pairs))
        for variant, ops in (("list", False), ("ops", True)):
            metrics.reset()
            traced = TracedForces(model, fused_message=ops)
            traced(z, pos, batch, 1, nl.edge_index, None, nl.mask)
            (graph,) = traced._graphs.values()
            nodes = [n for n in graph.graph_module.graph.nodes if n.op == "call_function"]
            print(f"{name} {variant}: {metrics.generated_kernel_count} generated C++ kernels, {len(nodes)} aten nodes "
                  f"({sum('torchmdx' in str(n.target) for n in nodes)} message operators)", flush=True)


def md_steps_per_s(model, atoms, steps: int, compile: str = "whole") -> float:
    from torchmdx.md.engine import Simulation

    sim = Simulation(model, [atoms], timestep_fs=0.5, ensemble="nve", temperature_K=300.0, device="cuda",
                     dtype=torch.float32, seed=0, max_temperature_K=1e12, compile=compile)
    sim.initialize()
    sim.run(40, every=40)
    return max(sim.run(steps, every=steps).steps_per_s for _ in range(2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(".benchdata"))
    parser.add_argument("--systems", default="alanine_dipeptide,caffeine,testosterone")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--md-steps", type=int, default=400, help="timed MD steps per repetition (0: no MD)")
    parser.add_argument("--variants", default="list,pairs", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--cpu-kernels", action="store_true",
                        help="with --device cpu: inductor's C++ kernel counts of the list and ops graphs (minutes)")
    args = parser.parse_args(argv)
    systems = args.systems.split(",")
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    gpu_timing.DEVICE = args.device
    if args.device == "cpu":
        check_cpu(args.data, systems)
        if args.cpu_kernels:
            count_cpu_kernels(args.data, systems)
        return 0
    from ase import Atoms

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| system (atoms) | variant | ms per call | kernels, GPU ms per replay | max force error vs float64 | MD steps/s |")
    print("|---|---|---|---|---|---|")
    for name in systems:
        z_np, pos_np, _, _ = read_xyz(args.data / f"{name}.xyz")
        z = torch.tensor(z_np, device="cuda")
        pos = torch.tensor(pos_np, dtype=torch.float32, device="cuda")
        for variant in variants:
            max_atoms, ops, mode = VARIANTS[variant]
            traced_module.PAIR_LAYOUT_MAX_ATOMS = max_atoms
            traced_module.FUSED_MESSAGE_IN_GRAPH = ops
            model = make_model("triton" if mode == "parts" else "torch")
            if mode == "parts":
                model.set_compiled(True)
            else:  # frozen, as the MD engine and the calculator freeze a model (the operators' filter tables)
                for p in model.parameters():
                    p.requires_grad_(False)
            reference = make_model("torch", dtype="float64")
            reference.load_state_dict(model.state_dict())  # the same weights (the seed draws differ by dtype)
            forces64 = reference(z, pos.double())["forces"]
            scale = float(forces64.abs().max())
            cells, top = [], None
            try:
                replay, (_, forces, _) = graph_call(model, z, pos, None, None, traced=mode == "whole")
                counted = replay_kernels(replay)
                top = counted["top"]
                cells += [f"{cuda_time(replay, 20, args.repeats):.3f}", f"{counted['launches']}, {counted['gpu_ms']:.3f}",
                          f"{float((forces.double() - forces64).abs().max()) / scale:.2e}"]
            except Exception as exc:  # noqa: BLE001 - one failed cell must not end the table
                cells += [error_text(exc), "-", "-"]
            try:
                atoms = Atoms(numbers=z_np, positions=pos_np)
                md_model = tame(make_model("triton" if mode == "parts" else "torch"), atoms)  # a trained model's forces
                cells.append(f"{md_steps_per_s(md_model, atoms, args.md_steps, mode):.0f}" if args.md_steps else "-")
            except Exception as exc:  # noqa: BLE001
                cells.append(error_text(exc))
            print(f"| {name} ({len(z_np)}) | {variant} | {' | '.join(cells)} |", flush=True)
            if top:
                print(f"    largest kernels (name, µs, launches): {top}", flush=True)
    traced_module.PAIR_LAYOUT_MAX_ATOMS = 0
    traced_module.FUSED_MESSAGE_IN_GRAPH = False
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
