"""Experiment (issue 16 item 5): the small-molecule whole graph over all N x N atom pairs instead of
a neighbor list.

For a molecule of N <= 64 atoms (not periodic) the ET can take every ordered pair (i, j) as an
edge, row-major (e = i N + j), the diagonal and the pairs beyond the cutoff masked. Then

    gather of the receivers  x[i_e]  ->  x[:, None] broadcast over j
    gather of the senders    x[j_e]  ->  x[None, :] broadcast over i
    scatter-add to receivers (index_add over i_e)  ->  a sum over j of the [N, N, ...] tensor

so inductor sees reductions where the neighbor-list graph has gathers and atomic scatters (the
backward of a gather is a scatter too), and no neighbor list is built inside the CUDA graph.
The dense forms are swapped in for the experiment only (:func:`dense_pairs`: the reference
message, the neighbour embedding and the edge vectors); the model, weights and tracing are the
calculator's (``nn.traced.TracedForces``).

    python bench/bench_dense_pairs.py --data .benchdata [--systems alanine_dipeptide,caffeine,testosterone]

Prints, per system: ms per replay of the calculator's whole-graph call (neighbor list rebuilt
inside the graph, ``model_setup.graph_call``) and of the dense call, kernels per replay, and each
one's force error against the float64 reference (same weights, the eager reference path).
``--device cpu`` checks the dense forms against the neighbor-list path (float64, no timing).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpu_timing  # noqa: E402
from gpu_timing import cuda_time, error_text, replay_kernels  # noqa: E402
from model_setup import graph_call, make_model, read_xyz  # noqa: E402


def dense_message(q, k, v, vec, dk, dv, cutoff_weight, unit_vectors, edge_index, num_heads, *, edge_mask=None,
                  self_loop=None, attn_activation="silu", vector_cutoff=False):
    """``message_ref.et_message`` for the N x N pair layout (edge_index is not read)."""
    from torchmdx.kernels.message_ref import ACTIVATIONS

    n, f = q.shape
    h, d = num_heads, f // num_heads
    act = ACTIVATIONS[attn_activation]
    prod = q.view(n, 1, h, d) * k.view(1, n, h, d)
    if dk is not None:
        prod = prod * dk.view(n, n, h, d)
    attn = act(prod.sum(-1))  # [N, N, H]
    phi = cutoff_weight.view(n, n, 1)
    v_j = v.view(1, n, h, 3 * d)
    if vector_cutoff:
        v_j = v_j * phi.unsqueeze(-1)
    else:
        attn = attn * phi
    if dv is not None:
        v_j = v_j * dv.view(n, n, h, 3 * d)
    if edge_mask is not None:
        weight = edge_mask.to(q.dtype).view(n, n, 1)
        v_j = v_j * weight.unsqueeze(-1)
        attn = attn * weight
    s1, s2, s3 = torch.split(v_j, d, dim=-1)
    out_x = (s1 * attn.unsqueeze(-1)).sum(1).reshape(n, f)
    vec_j = vec.view(1, n, 3, h, d)
    msg_vec = vec_j * s2.unsqueeze(2) + s3.unsqueeze(2) * unit_vectors.view(n, n, 3, 1, 1)
    out_vec = msg_vec.sum(1).reshape(n, 3, f)
    if self_loop is not None:
        dk0, dv0, phi0 = self_loop
        prod0 = (q * k).view(n, h, d)
        if dk0 is not None:
            prod0 = prod0 * dk0.view(1, h, d)
        attn0 = act(prod0.sum(-1))
        v0 = v.view(n, h, 3 * d)
        if vector_cutoff:
            v0 = v0 * phi0
        else:
            attn0 = attn0 * phi0
        if dv0 is not None:
            v0 = v0 * dv0.view(1, h, 3 * d)
        s1_0, s2_0, _ = torch.split(v0, d, dim=-1)
        out_x = out_x + (s1_0 * attn0.unsqueeze(-1)).reshape(n, f)
        out_vec = out_vec + (vec.view(n, 3, h, d) * s2_0.unsqueeze(1)).reshape(n, 3, f)
    return out_x, out_vec


def dense_neighbor_embedding(self, z, x, edge_index, rbf, cutoff_weight, valid=None):
    """``layers.NeighborEmbedding.forward`` for the N x N pair layout."""
    n, f = x.shape
    w = self.distance_proj(rbf) * cutoff_weight.unsqueeze(-1)
    neighbours = (w.view(n, n, f) * self.embedding(z).view(1, n, f)).sum(1)
    return self.combine(torch.cat([x, neighbours], dim=-1))


def dense_edges(pos, receivers, senders, offsets, cutoff, mask=None):
    """``base.masked_edges`` for the N x N pair layout (``mask``: the off-diagonal pairs)."""
    n = pos.shape[0]
    vectors = (pos.unsqueeze(0) - pos.unsqueeze(1)).reshape(n * n, 3)  # pos_j - pos_i, e = i N + j
    length2 = (vectors * vectors).sum(-1)
    valid = length2 < cutoff * cutoff
    if mask is not None:
        valid = valid & mask
    safe = torch.where(valid.unsqueeze(-1), vectors, torch.ones_like(vectors))
    distances = torch.where(valid, safe.norm(dim=-1), torch.zeros_like(length2))
    return vectors, distances, valid


@contextlib.contextmanager
def dense_pairs():
    """Swap the dense forms in (the message function is looked up at each call)."""
    from torchmdx.kernels import message_ref
    from torchmdx.nn import layers, traced

    saved = message_ref.et_message, layers.NeighborEmbedding.forward, traced.masked_edges
    message_ref.et_message = dense_message
    layers.NeighborEmbedding.forward = dense_neighbor_embedding
    traced.masked_edges = dense_edges
    try:
        yield
    finally:
        message_ref.et_message, layers.NeighborEmbedding.forward, traced.masked_edges = saved


def pair_inputs(n: int, device):
    """(edge_index [2, N N] row-major, off-diagonal mask [N N])."""
    i = torch.arange(n, device=device).repeat_interleave(n)
    j = torch.arange(n, device=device).repeat(n)
    return torch.stack([i, j]), i != j


def dense_call(model, z, pos, compile=True):
    """(replay, (energy, forces)) of the dense whole graph, captured as one CUDA graph on CUDA."""
    from torchmdx.nn.traced import TracedForces

    traced = TracedForces(model, compile=compile)
    edge_index, mask = pair_inputs(len(z), pos.device)
    batch = torch.zeros(len(z), dtype=torch.long, device=pos.device)
    static_pos = pos.clone()

    def run():
        with dense_pairs():
            return traced(z, static_pos, batch, 1, edge_index, None, mask)

    out = run()  # traces and compiles
    if pos.device.type != "cuda":
        return run, out[:2]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()
    return graph.replay, out[:2]


def check_cpu(data: Path, systems) -> None:
    """float64 on the CPU: the dense graph (uncompiled) against the model's own eager evaluation."""
    for name in systems:
        z_np, pos_np, _, _ = read_xyz(data / f"{name}.xyz")
        z = torch.tensor(z_np)
        pos = torch.tensor(pos_np, dtype=torch.float64)
        model = make_model("torch", dtype="float64")
        out = model(z, pos)
        energy_ref, forces_ref = out["energy"], out["forces"]
        _, (energy, forces) = dense_call(model, z, pos, compile=False)
        print(f"{name}: |dE| {float((energy.sum() - energy_ref.sum()).abs()):.2e} eV, "
              f"max |dF| {float((forces - forces_ref).abs().max()):.2e} eV/Å")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(".benchdata"))
    parser.add_argument("--systems", default="alanine_dipeptide,caffeine,testosterone")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    systems = args.systems.split(",")
    gpu_timing.DEVICE = args.device
    if args.device == "cpu":
        check_cpu(args.data, systems)
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| system (atoms) | neighbor-list graph ms | dense ms | kernels (list / dense) | max force error vs float64 (list / dense) |")
    print("|---|---|---|---|---|")
    for name in systems:
        z_np, pos_np, _, _ = read_xyz(args.data / f"{name}.xyz")
        z = torch.tensor(z_np, device="cuda")
        pos = torch.tensor(pos_np, dtype=torch.float32, device="cuda")
        model = make_model("torch")
        reference = make_model("torch", dtype="float64")
        reference.load_state_dict(model.state_dict())
        forces64 = reference(z, pos.double())["forces"]
        cells = []
        kernels = []
        errors = []
        tops = []
        for make in (lambda: graph_call(model, z, pos, None, None, traced=True),
                     lambda: dense_call(model, z, pos)):
            try:
                replay, (energy, forces) = make()
                cells.append(f"{cuda_time(replay, 20, args.repeats):.3f}")
                counted = replay_kernels(replay)
                kernels.append(f"{counted['launches']} ({counted['gpu_ms']:.3f} ms GPU)")
                tops.append(counted["top"])
                scale = float(forces64.abs().max())
                errors.append(f"{float((forces.double() - forces64).abs().max()) / scale:.2e}")
            except Exception as exc:  # noqa: BLE001 - one failed cell must not end the table
                cells.append(error_text(exc))
                kernels.append("-")
                errors.append("-")
        print(f"| {name} ({len(z_np)}) | {cells[0]} | {cells[1]} | {' / '.join(kernels)} | {' / '.join(errors)} |",
              flush=True)
        for label, top in zip(("list", "dense"), tops):
            print(f"    {name} {label}, largest kernels (name, µs, launches): {top}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
