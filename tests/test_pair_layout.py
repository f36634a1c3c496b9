"""The all-pairs edge layout (:mod:`torchmdx.kernels.pairs`) of the whole-model graph.

Every ordered pair of a structure's atoms is an edge; the ET then gathers by broadcasting and sums
the messages over the senders instead of scatter-adding them. Checked against independent
references: the layout against a brute-force list of pairs, the reference message against its own
neighbor-list form on the same pairs, and the traced energy and forces (float64) against the
neighbor-list graph, finite differences, rotated / reflected / translated / permuted inputs, and
in the MD force field (built once, never rebuilt) against the neighbor-list force field.
"""

import math

import pytest
import torch

import torchmdx
from torchmdx.kernels import pairs
from torchmdx.kernels.message_ref import et_message
from torchmdx.kernels.neighbors import neighbor_list
from torchmdx.nn import traced as traced_module
from torchmdx.nn.analytic import LennardJones
from torchmdx.nn.traced import TracedForces, pair_layout_size

from test_model_compiled import SMALL_ET  # a small float64 ET (cutoff 4 Å)


def test_pair_index_is_every_ordered_pair_of_each_structure():
    edge_index, mask = pairs.pair_index(3, 4)
    expected = [(b * 4 + i, b * 4 + j) for b in range(3) for i in range(4) for j in range(4)]
    assert [tuple(e) for e in edge_index.t().tolist()] == expected  # row e = (b n + i) n + j
    assert mask.tolist() == [i != j for i, j in expected]


@pytest.mark.parametrize("vector_cutoff", [False, True])
@pytest.mark.parametrize("filters", [True, False])
def test_reference_message_on_pairs_equals_its_list_form(vector_cutoff, filters):
    """Same equations, other edge operations: broadcasts and sums against gathers and index_add."""
    generator = torch.Generator().manual_seed(1)
    b, n, h, d = 2, 5, 2, 3
    f, atoms = h * d, b * n
    rand = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    q, k, v, vec = rand(atoms, f), rand(atoms, f), rand(atoms, 3 * f), rand(atoms, 3, f)
    edge_index, off_diagonal = pairs.pair_index(b, n)
    e = edge_index.shape[1]
    dk, dv = (rand(e, f), rand(e, 3 * f)) if filters else (None, None)
    edge_mask = off_diagonal & (torch.rand(e, generator=generator) > 0.2)  # some pairs beyond the cutoff
    phi = torch.rand(e, generator=generator, dtype=torch.float64) * edge_mask
    unit = torch.nn.functional.normalize(rand(e, 3), dim=-1) * edge_mask.unsqueeze(-1)
    self_loop = (rand(f), rand(3 * f), torch.tensor(1.0, dtype=torch.float64)) if filters else None
    options = dict(edge_mask=edge_mask, self_loop=self_loop, vector_cutoff=vector_cutoff)
    listed = et_message(q, k, v, vec, dk, dv, phi, unit, edge_index, h, **options)
    paired = et_message(q, k, v, vec, dk, dv, phi, unit, edge_index, h, pairs=n, **options)
    for a, p in zip(listed, paired):
        torch.testing.assert_close(p, a, rtol=1e-12, atol=1e-12)


def _replicas(count: int = 2):
    """``count`` conformations of one 9-atom molecule (one pair beyond the 4 Å cutoff)."""
    generator = torch.Generator().manual_seed(3)
    z = torch.tensor([6, 1, 1, 8, 1, 7, 6, 1, 1])
    base = torch.rand(9, 3, generator=generator, dtype=torch.float64) * 3.0
    base[8] = base[0] + torch.tensor([4.6, 0.0, 0.0], dtype=torch.float64)  # beyond the cutoff of atom 0
    pos = torch.cat([base + 0.05 * torch.randn(9, 3, generator=generator, dtype=torch.float64) for _ in range(count)])
    return z.repeat(count), pos, torch.arange(count).repeat_interleave(9)


def _pair_call(traced, z, pos, batch, structures=2):
    n = z.shape[0] // structures
    edge_index, mask = pairs.pair_index(structures, n)
    return traced(z, pos, batch, structures, edge_index, None, mask, pairs=n)


def test_traced_pairs_equal_the_neighbor_list_graph():
    model = torchmdx.build_model(SMALL_ET)
    z, pos, batch = _replicas()
    # the list graph with the traced reference message: with the operators (FUSED_MESSAGE_IN_GRAPH) its
    # filters come from tables, which the all-pairs layout does not take
    traced = TracedForces(model, compile=False, fused_message=False)
    nl = neighbor_list(pos, model.cutoff, batch, max_pairs=200)  # capacity-padded, as in MD
    listed = traced(z, pos, batch, 2, nl.edge_index, None, nl.mask)
    paired = _pair_call(traced, z, pos, batch)
    for a, p in zip(listed, paired):
        torch.testing.assert_close(p, a, rtol=1e-10, atol=1e-11)
    eager = model(z, pos, batch, per_atom=True)
    torch.testing.assert_close(paired[1], eager["forces"], rtol=1e-9, atol=1e-10)
    assert traced.traces == 2  # one graph per layout


def test_traced_pairs_forces_are_minus_the_energy_gradient():
    model = torchmdx.build_model(SMALL_ET)
    z, pos, batch = _replicas()
    traced = TracedForces(model, compile=False)
    forces = _pair_call(traced, z, pos, batch)[1]
    h = 1e-5
    for atom, axis in ((0, 0), (8, 2), (13, 1)):  # 8: the atom beyond the cutoff of atom 0
        step = torch.zeros_like(pos)
        step[atom, axis] = h
        plus = _pair_call(traced, z, pos + step, batch)[0].sum()
        minus = _pair_call(traced, z, pos - step, batch)[0].sum()
        assert float(forces[atom, axis]) == pytest.approx(-float(plus - minus) / (2 * h), rel=1e-6, abs=1e-8)


def test_traced_pairs_are_equivariant_and_permutation_invariant():
    model = torchmdx.build_model(SMALL_ET)
    z, pos, batch = _replicas()
    traced = TracedForces(model, compile=False)
    energy, forces, _ = _pair_call(traced, z, pos, batch)
    angle = 0.7
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0],
                             [0.0, 0.0, 1.0]], dtype=torch.float64)
    reflection = torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
    for matrix in (rotation, reflection @ rotation):
        moved = pos @ matrix.T + torch.tensor([1.5, -2.0, 0.3], dtype=torch.float64)
        e2, f2, _ = _pair_call(traced, z, moved, batch)
        torch.testing.assert_close(e2, energy, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(f2, forces @ matrix.T, rtol=1e-9, atol=1e-10)
    order = torch.cat([torch.randperm(9, generator=torch.Generator().manual_seed(b)) + 9 * b for b in range(2)])
    e3, f3, _ = _pair_call(traced, z[order], pos[order], batch)  # atoms permuted within each structure
    torch.testing.assert_close(e3, energy, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f3, forces[order], rtol=1e-9, atol=1e-10)


def test_traced_pairs_graph_has_no_gathers_or_scatters_over_the_edges():
    """The point of the layout: the traced graph keeps no index_select / index_add / index / index_put
    whose index runs over the edges (those over the atoms, the embedding's and the per-structure
    energy sum's, remain)."""
    model = torchmdx.build_model(SMALL_ET)
    z, pos, batch = _replicas()
    nl = neighbor_list(pos, model.cutoff, batch, max_pairs=200)

    def edge_index_ops(edge_index, **call):  # the traced reference message (its per-edge gathers)
        traced = TracedForces(model, compile=False, fused_message=False)
        traced(z, pos, batch, 2, edge_index, **call)
        (graph_module,) = traced._graphs.values()
        edges = edge_index.shape[1]
        count = 0
        for node in graph_module.graph.nodes:
            if node.op != "call_function" or not str(node.target).startswith("aten.index"):
                continue
            tensors = [a for a in torch.utils._pytree.tree_leaves(node.args) if isinstance(a, torch.fx.Node)]
            count += any("val" in a.meta and a.meta["val"].dim() >= 1 and a.meta["val"].shape[0] == edges
                         for a in tensors)
        return count

    edge_index, mask = pairs.pair_index(2, 9)
    assert edge_index_ops(nl.edge_index, offsets=None, mask=nl.mask) > 20
    assert edge_index_ops(edge_index, offsets=None, mask=mask, pairs=9) == 0


def test_pair_layout_size_rules(monkeypatch):
    model = torchmdx.build_model(SMALL_ET)
    assert pair_layout_size(model, [9, 9], periodic=False) is None  # off until measured (0)
    monkeypatch.setattr(traced_module, "PAIR_LAYOUT_MAX_ATOMS", 64)
    assert pair_layout_size(model, [9, 9], periodic=False) == 9
    assert pair_layout_size(model, [9, 8], periodic=False) is None  # structures of different sizes
    assert pair_layout_size(model, [9], periodic=True) is None
    assert pair_layout_size(model, [65], periodic=False) is None
    assert pair_layout_size(LennardJones(0.0104, 3.4), [9], periodic=False) is None  # no pair_layout


def test_md_force_field_on_pairs_follows_the_neighbor_list_trajectory(shared_data, monkeypatch):
    """The native engine with the traced graph (uncompiled here) on the all-pairs layout: built
    once, never rebuilt, and the NVE trajectory of the neighbor-list engine (float64, CPU)."""
    from ase.io import read

    from torchmdx.md.engine import Simulation

    model = torchmdx.build_model(dict(SMALL_ET, embedding_dimension=16, num_layers=2))
    atoms = read(shared_data / "systems" / "alanine_dipeptide.xyz")
    final = {}
    for layout, max_atoms in (("list", 0), ("pairs", 64)):
        monkeypatch.setattr(traced_module, "PAIR_LAYOUT_MAX_ATOMS", max_atoms)
        sim = Simulation(model, [atoms, atoms], timestep_fs=0.5, ensemble="nve", temperature_K=300.0, device="cpu",
                         dtype=torch.float64, seed=0, max_temperature_K=1e9, compile="whole")
        sim.forcefield.traced.compile = False  # the traced graph without inductor: same equations, fast
        assert sim.forcefield.pairs == (22 if layout == "pairs" else None)
        sim.initialize()
        sim.run(30, every=10)
        if layout == "pairs":
            assert sim.forcefield.builds == 1 and sim.forcefield.neighbors.edge_index.shape[1] == 2 * 22 * 22
        final[layout] = (sim.state.positions.clone(), sim.state.forces.clone())
    torch.testing.assert_close(final["pairs"][0], final["list"][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(final["pairs"][1], final["list"][1], rtol=1e-8, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_calculator_graph_on_pairs_equals_the_list_graph(shared_data, monkeypatch):
    """On CUDA: the calculator's captured call (one CUDA graph, inductor-compiled traced model) on
    the all-pairs layout gives the neighbor-list graph's energy and forces (float32 rounding) and
    the float64 model's; after the atoms moved, the same graph replays."""
    from ase.io import read

    from torchmdx.md.cuda_graph import GraphedForces

    atoms = read(shared_data / "systems" / "alanine_dipeptide.xyz")
    model = torchmdx.build_model(dict(SMALL_ET, cutoff_upper=5.0, dtype="float32")).cuda()
    reference = torchmdx.build_model(dict(SMALL_ET, cutoff_upper=5.0)).cuda()
    reference.load_state_dict(model.state_dict())  # the same weights in float64 (the seed draws differ by dtype)
    pos = torch.tensor(atoms.positions, device="cuda")
    z = torch.tensor(atoms.numbers, device="cuda")
    results = {}
    for layout, max_atoms in (("list", 0), ("pairs", 64)):
        monkeypatch.setattr(traced_module, "PAIR_LAYOUT_MAX_ATOMS", max_atoms)
        graphed = GraphedForces(model, atoms, torch.device("cuda"), torch.float32, traced=True)
        assert graphed.forcefield.pairs == (22 if layout == "pairs" else None)
        results[layout] = [tuple(t.clone() for t in graphed(pos * scale)) for scale in (1.0, 1.02)]
        assert graphed.captures == 1
    for scale, (listed, paired) in zip((1.0, 1.02), zip(results["list"], results["pairs"])):
        ref = reference(z, pos * scale)
        torch.testing.assert_close(paired[0].double(), listed[0].double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(paired[1], listed[1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(paired[1].double(), ref["forces"], rtol=1e-4, atol=1e-4)
