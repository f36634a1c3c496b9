"""The whole-graph path (:class:`torchmdx.nn.traced.TracedForces`) against the eager model.

Energies, per-atom energies and forces of one traced + compiled graph must equal the eager
float64 model (open and periodic structures, capacity-padded lists with masked rows), and its
training mode must give the parameter gradients of a force loss that the eager double backward
gives. Compiled by inductor on the CPU (C++); the GPU tests run the same on CUDA.
"""

import pytest
import torch

import torchmdx
from torchmdx.kernels.neighbors import neighbor_list
from torchmdx.nn.traced import TracedForces

from test_model_compiled import SMALL_ET  # the same small float64 ET
from test_model_compiled import _inputs as _structures  # an open and a periodic structure, one batch


def _list(model, pos, batch, cell, pbc, max_pairs=None):
    """Neighbor list with image offsets n @ cell (Å), as the MD engine passes them."""
    nl = neighbor_list(pos, model.cutoff, batch, cell, pbc, max_pairs=max_pairs)
    offsets = torch.einsum("ek,ekl->el", nl.shifts.to(pos.dtype), cell[batch[nl.edge_index[0]]])
    return nl, offsets


@pytest.mark.parametrize("compiled", [False, True], ids=["traced", "traced+compiled"])
def test_traced_forces_equal_eager(compiled):
    model = torchmdx.build_model(SMALL_ET)
    z, pos, batch, cell, pbc = _structures()
    traced = TracedForces(model, compile=compiled)
    for max_pairs in (None, 120):  # exact list, then capacity-padded (masked rows on the last atom)
        nl, offsets = _list(model, pos, batch, cell, pbc, max_pairs)
        assert max_pairs is None or (not bool(nl.overflow) and int(nl.num_pairs) < max_pairs)
        for shift in (0.0, 0.03):  # a second call reuses the graph with new positions
            moved = pos + shift * torch.arange(27, dtype=pos.dtype).reshape(9, 3).cos()
            ref = model(z, moved, batch, cell, pbc, per_atom=True)
            energy, forces, atomic = traced(z, moved, batch, 2, nl.edge_index, offsets, nl.mask)
            torch.testing.assert_close(energy, ref["energy"], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(atomic, ref["energies"], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(forces, ref["forces"], rtol=1e-9, atol=1e-10)
    assert traced.traces == 2  # one graph per list shape, reused for the shifted positions
    assert traced.small_products > 10  # products rewritten as reductions (nn.traced.small_products) agree too


def test_traced_forces_are_minus_the_energy_gradient():
    """Independent of the eager path: central finite differences of the traced energy."""
    model = torchmdx.build_model(SMALL_ET)
    z, pos, batch, cell, pbc = _structures()
    nl, offsets = _list(model, pos, batch, cell, pbc, max_pairs=150)
    traced = TracedForces(model, compile=False)
    assert_forces_are_minus_the_energy_gradient(traced, z, pos, batch, nl, offsets)


def assert_forces_are_minus_the_energy_gradient(traced, z, pos, batch, nl, offsets, h: float = 1e-5) -> None:
    """The traced forces of atoms 0, 3 and 7 (two structures) against central finite differences of the traced
    energy, to 1e-6 relative (1e-8 absolute)."""
    _, forces, _ = traced(z, pos, batch, 2, nl.edge_index, offsets, nl.mask)
    for atom, axis in ((0, 0), (3, 2), (7, 1)):
        step = torch.zeros_like(pos)
        step[atom, axis] = h
        e_plus = traced(z, pos + step, batch, 2, nl.edge_index, offsets, nl.mask)[0].sum()
        e_minus = traced(z, pos - step, batch, 2, nl.edge_index, offsets, nl.mask)[0].sum()
        assert float(forces[atom, axis]) == pytest.approx(-float(e_plus - e_minus) / (2 * h), rel=1e-6, abs=1e-8)


def test_traced_training_gradients_equal_eager_double_backward():
    """Parameter gradients of an energy + force loss: traced + compiled (AOTAutograd's backward of
    the traced backward) vs the eager model with create_graph=True."""
    model = torchmdx.build_model(SMALL_ET)
    z, pos, batch, _, _ = _structures()
    nl = neighbor_list(pos, model.cutoff, batch, max_pairs=100)
    energy_ref = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    forces_ref = torch.linspace(-1, 1, 27, dtype=torch.float64).reshape(9, 3)

    def loss_of(energy, forces):
        return 0.3 * ((energy - energy_ref) ** 2).sum() + ((forces - forces_ref) ** 2).mean()

    out = model(z, pos, batch, neighbors=nl, create_graph=True, num_structures=2)
    loss_of(out["energy"], out["forces"]).backward()
    eager = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    traced = TracedForces(model, training=True)
    energy, forces, _ = traced(z, pos, batch, 2, nl.edge_index, None, nl.mask)
    loss_of(energy, forces).backward()
    checked = 0
    for name, p in model.named_parameters():
        if name not in eager:  # no part in the loss (eager gives None): nothing or zeros here
            assert p.grad is None or not bool(p.grad.any()), name
            continue
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-8, atol=1e-11, msg=name)
        checked += int(eager[name].abs().max() > 0)
    assert checked > 20  # the gradients are not trivially zero


def test_untraceable_potential_is_refused():
    from torchmdx.nn.analytic import ANALYTIC_KINDS

    kind = next(iter(ANALYTIC_KINDS))
    with pytest.raises(TypeError, match="cannot be traced"):
        TracedForces(torchmdx.build_model({"kind": kind}))


def test_engine_with_traced_model_follows_the_eager_trajectory(shared_data):
    """The native engine with the whole model traced (fixed-capacity list, one compiled graph)
    reproduces the eager engine's NVE trajectory (float64, CPU)."""
    from ase.io import read

    from torchmdx.md.engine import Simulation

    model = torchmdx.build_model(dict(SMALL_ET, embedding_dimension=16, num_layers=2))
    atoms = read(shared_data / "systems" / "alanine_dipeptide.xyz")
    final = {}
    for traced in (False, True):
        sim = Simulation(model, atoms, timestep_fs=0.5, ensemble="nve", temperature_K=300.0, device="cpu",
                         dtype=torch.float64, seed=0, max_temperature_K=1e9, compile="whole" if traced else "off")
        assert sim.traced == traced and sim.compile_mode == ("whole" if traced else "off")
        sim.initialize()
        sim.run(30, every=10)
        final[traced] = (sim.state.positions.clone(), sim.state.forces.clone())
    torch.testing.assert_close(final[True][0], final[False][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(final[True][1], final[False][1], rtol=1e-8, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_traced_float32_on_cuda_matches_float64_reference(shared_data):
    """ET-MD17 size on CUDA: traced + compiled float32 energies/forces against the eager float64
    reference (same weights), and float32 training gradients against the float64 eager ones."""
    from ase.io import read

    config = dict(SMALL_ET, embedding_dimension=128, num_layers=6, num_heads=8, num_rbf=32, cutoff_upper=5.0)
    atoms = read(shared_data / "systems" / "chignolin.xyz")
    z = torch.tensor(atoms.numbers, device="cuda")
    pos64 = torch.tensor(atoms.positions, device="cuda")
    batch = torch.zeros_like(z)
    reference = torchmdx.build_model(dict(config, backend="torch")).cuda()
    fast = torchmdx.build_model(dict(config, dtype="float32")).cuda()
    fast.load_state_dict(reference.state_dict())
    nl = neighbor_list(pos64.float(), 5.0, max_pairs=int(1.2 * neighbor_list(pos64, 5.0).edge_index.shape[1]))
    ref = reference(z, pos64, neighbors=nl, per_atom=True)
    energy, forces, atomic = TracedForces(fast)(z, pos64.float(), batch, 1, nl.edge_index, None, nl.mask)
    force_scale = ref["forces"].abs().max()
    assert float((forces.double() - ref["forces"]).abs().max() / force_scale) < 1e-4
    assert abs(float(energy - ref["energy"])) < 1e-4 * max(1.0, abs(float(ref["energy"])))
    # training: parameter gradients of a force loss
    out = reference(z, pos64, neighbors=nl, create_graph=True)
    (out["forces"] ** 2).mean().backward()
    _, forces32, _ = TracedForces(fast, training=True)(z, pos64.float(), batch, 1, nl.edge_index, None, nl.mask)
    (forces32 ** 2).mean().backward()
    worst = max(float((p32.grad.double() - p64.grad).abs().max() / p64.grad.abs().max().clamp_min(1e-12))
                for p32, p64 in zip(fast.parameters(), reference.parameters()) if p64.grad is not None)
    assert worst < 1e-3


def test_compile_mode_resolution(monkeypatch):
    """'auto' by device and size (the larger bound where the whole graph takes the fused message
    operators); booleans; a potential that cannot be traced gets 'parts'; a wrong value is one
    ConfigError naming the choices."""
    from torchmdx.errors import ConfigError
    from torchmdx.nn import traced as traced_module
    from torchmdx.nn.analytic import LennardJones
    from torchmdx.nn.traced import WHOLE_GRAPH_MAX_ATOMS, WHOLE_GRAPH_MAX_ATOMS_TRACED_MESSAGE, compile_mode

    et = torchmdx.build_model(SMALL_ET)
    assert et.graph_ops and WHOLE_GRAPH_MAX_ATOMS > WHOLE_GRAPH_MAX_ATOMS_TRACED_MESSAGE
    assert compile_mode("auto", "cpu", 10, et) == "off"
    assert compile_mode(None, "cuda", 10, et) == compile_mode(True, "cuda:0", 10, et) == "whole"
    assert compile_mode("auto", "cuda", WHOLE_GRAPH_MAX_ATOMS, et) == "whole"
    assert compile_mode("auto", "cuda", WHOLE_GRAPH_MAX_ATOMS + 1, et) == "parts"
    monkeypatch.setattr(traced_module, "FUSED_MESSAGE_IN_GRAPH", False)  # the message traced in torch
    assert compile_mode("auto", "cuda", WHOLE_GRAPH_MAX_ATOMS_TRACED_MESSAGE, et) == "whole"
    assert compile_mode("auto", "cuda", WHOLE_GRAPH_MAX_ATOMS_TRACED_MESSAGE + 1, et) == "parts"
    monkeypatch.setattr(traced_module, "FUSED_MESSAGE_IN_GRAPH", True)
    assert compile_mode(False, "cuda", 10, et) == compile_mode("off", "cuda", 10, et) == "off"
    assert compile_mode("whole", "cpu", 10, et) == "whole"  # explicit: honoured on the CPU too
    assert compile_mode("whole", "cuda", 10, LennardJones()) == "parts"
    with pytest.raises(ConfigError, match="compile must be one of auto, whole, parts, off"):
        compile_mode("fast", "cuda", 10, et)


def test_calculator_refuses_an_unknown_compile_mode():
    from torchmdx.errors import ConfigError
    from torchmdx.md.calculator import Calculator

    with pytest.raises(ConfigError, match="compile must be one of auto, whole, parts, off"):
        Calculator(torchmdx.build_model(SMALL_ET), compile="fastest")


def test_md_config_compile_values():
    from torchmdx.errors import ConfigError
    from torchmdx.md.config import md_config

    assert md_config({"compile": True}).compile is True and md_config({"compile": "parts"}).compile == "parts"
    with pytest.raises(ConfigError, match="md.compile"):
        md_config({"compile": "fast"})


def test_calculator_graph_function_with_traced_model(shared_data):
    """The calculator's captured function (GraphedForces: fixed-capacity list rebuilt inside,
    here run without a CUDA graph) through the traced model equals the eager model, also after
    the atoms moved (same graph) and after the list outgrew its capacity (a new trace)."""
    from ase.io import read

    from torchmdx.md.cuda_graph import GraphedForces

    model = torchmdx.build_model(dict(SMALL_ET, cutoff_upper=5.0))
    atoms = read(shared_data / "systems" / "caffeine.xyz")
    pos = torch.tensor(atoms.positions)
    z = torch.tensor(atoms.numbers)
    graphed = GraphedForces(model, atoms, torch.device("cpu"), torch.float64, use_graph=False, traced=True)
    for scale in (1.6, 1.61, 1.0):  # 1.0 after 1.6: more pairs than the capacity -> regrow
        moved = pos * scale
        energy, forces, atomic = graphed(moved)
        ref = model(z, moved, per_atom=True)
        # the traced graph interpolates the radial filters from tables (FUSED_MESSAGE_IN_GRAPH; float64,
        # 2 048 intervals: within 1e-9 of the exact filters the eager model evaluates)
        torch.testing.assert_close(energy, ref["energy"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(forces, ref["forces"], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(atomic, ref["energies"], rtol=1e-10, atol=1e-10)
    assert graphed.regrowths == 1 and graphed.forcefield.traced.traces == 2


def test_small_products_of_chained_products():
    """(x @ A) @ B: the second product reads the first one's rewritten result; both become
    reductions and the graph gives the same numbers (the rewrite used to fail with KeyError 'val')."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from torchmdx.nn.traced import small_products

    generator = torch.Generator().manual_seed(0)
    x, a, b = (torch.randn(shape, dtype=torch.float64, generator=generator) for shape in ((5, 4), (4, 6), (6, 3)))
    graph_module = make_fx(lambda x, a, b: (x @ a) @ b)(x, a, b)
    assert small_products(graph_module) == 2
    assert not any(node.target is torch.ops.aten.mm.default for node in graph_module.graph.nodes)
    torch.testing.assert_close(graph_module(x, a, b), (x @ a) @ b, rtol=1e-12, atol=1e-12)


def test_small_products_leave_large_results_to_the_matmul():
    """A short inner dimension with a large result (every layer's radial filters of a small
    molecule: [535, 32] @ [32, 3072], 1.6 M elements) stays one matrix product; the per-layer
    products of a 22-atom molecule (22 x 384) still become reductions; without a bound both do."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from torchmdx.nn.traced import SMALL_OUTPUT, small_products

    generator = torch.Generator().manual_seed(0)
    rbf, filters = torch.randn(535, 32, generator=generator), torch.randn(32, 3072, generator=generator)
    x, weight = torch.randn(22, 128, generator=generator), torch.randn(128, 384, generator=generator)
    assert 535 * 3072 > SMALL_OUTPUT >= 22 * 384

    def products(rbf, filters, x, weight):
        return rbf @ filters, x @ weight

    def targets(graph_module):
        return [node.target for node in graph_module.graph.nodes if node.op == "call_function"]

    bounded = make_fx(products)(rbf, filters, x, weight)
    assert small_products(bounded) == 1
    assert targets(bounded).count(torch.ops.aten.mm.default) == 1
    unbounded = make_fx(products)(rbf, filters, x, weight)
    assert small_products(unbounded, max_output=None) == 2
    assert torch.ops.aten.mm.default not in targets(unbounded)
    for graph_module in (bounded, unbounded):
        for got, want in zip(graph_module(rbf, filters, x, weight), products(rbf, filters, x, weight)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_small_products_inner_bound_of_row_rewrites():
    """``max_row_inner`` leaves a product that qualifies by its few rows but has a long inner
    dimension ([22, 384] @ [384, 128]) a matrix product, keeps the one with a short inner dimension
    ([22, 128] @ [128, 384]) and the short-inner one of many rows ([500, 32] @ [32, 64]) rewritten;
    the numbers are the products'."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from torchmdx.nn.traced import small_products

    generator = torch.Generator().manual_seed(1)
    inputs = (torch.randn(22, 384, generator=generator), torch.randn(384, 128, generator=generator),
              torch.randn(22, 128, generator=generator), torch.randn(128, 384, generator=generator),
              torch.randn(500, 32, generator=generator), torch.randn(32, 64, generator=generator))

    def products(a, b, c, d, e, f):
        return a @ b, c @ d, e @ f

    def inner_of_products(graph_module):
        return sorted(node.args[0].meta["val"].shape[1] for node in graph_module.graph.nodes
                      if node.op == "call_function" and node.target is torch.ops.aten.mm.default)

    every = make_fx(products)(*inputs)
    assert small_products(every, max_output=None) == 3 and inner_of_products(every) == []
    capped = make_fx(products)(*inputs)
    assert small_products(capped, max_output=None, max_row_inner=128) == 2
    assert inner_of_products(capped) == [384]  # the long one stays a product
    for graph_module in (every, capped):
        for got, want in zip(graph_module(*inputs), products(*inputs)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_traced_forces_reads_the_row_inner_bound(monkeypatch):
    """``small_row_inner`` "auto" reads :data:`SMALL_ROW_INNER` at the trace (the MD engine and the calculator
    build TracedForces with the defaults); an explicit value wins; the forces are the eager ones either way."""
    from torchmdx.nn import traced as traced_module

    model = torchmdx.build_model(dict(SMALL_ET, embedding_dimension=64, num_heads=4))  # products of inner 64
    z, pos, batch, cell, pbc = _structures()
    nl, offsets = _list(model, pos, batch, cell, pbc)
    ref = model(z, pos, batch, cell, pbc)
    counts = {}
    for bound, keywords in ((None, {}), (40, {}), (40, dict(small_row_inner=None))):
        monkeypatch.setattr(traced_module, "SMALL_ROW_INNER", bound)
        traced = TracedForces(model, compile=False, small_output=None, **keywords)
        _, forces, _ = traced(z, pos, batch, 2, nl.edge_index, offsets, nl.mask)
        torch.testing.assert_close(forces, ref["forces"], rtol=1e-9, atol=1e-10)
        counts[bound, bool(keywords)] = traced.small_products
    assert counts[40, False] < counts[None, False] == counts[40, True]


def test_traced_forces_product_bounds_change_only_the_kernels():
    """``small_rows`` / ``small_output`` of TracedForces change which products become reductions,
    not the numbers: no rewrite at all (rows 0, results of 0 elements) and rewrites without an
    output bound give the eager forces; a tighter output bound rewrites fewer products."""
    model = torchmdx.build_model(SMALL_ET)
    z, pos, batch, cell, pbc = _structures()
    nl, offsets = _list(model, pos, batch, cell, pbc)
    ref = model(z, pos, batch, cell, pbc)
    counts = {}
    for label, keywords in (("none", dict(small_rows=0, small_output=0)), ("default", {}),
                            ("unbounded", dict(small_output=None)), ("tight", dict(small_output=64))):
        traced = TracedForces(model, compile=False, **keywords)
        energy, forces, _ = traced(z, pos, batch, 2, nl.edge_index, offsets, nl.mask)
        torch.testing.assert_close(energy, ref["energy"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(forces, ref["forces"], rtol=1e-9, atol=1e-10)
        counts[label] = traced.small_products
    assert counts["none"] == 0 < counts["tight"] < counts["default"] <= counts["unbounded"]


def test_training_graph_takes_its_own_row_bound(monkeypatch):
    """``small_rows="auto"`` reads :data:`TRAINING_SMALL_ROWS` for a training graph and
    :data:`SMALL_ROWS` for an inference graph (the inference bound was raised to 192 on a measured
    22-atom win; the training step keeps the bound it was measured with): with the two bounds set
    far apart, each graph rewrites the number of products its own bound allows."""
    from torchmdx.nn import traced as traced_module

    model = torchmdx.build_model(SMALL_ET)
    z, pos, batch, cell, pbc = _structures()
    nl, offsets = _list(model, pos, batch, cell, pbc)
    counts = {}
    for rows, training_rows in ((0, 10**6), (10**6, 0)):
        monkeypatch.setattr(traced_module, "SMALL_ROWS", rows)
        monkeypatch.setattr(traced_module, "TRAINING_SMALL_ROWS", training_rows)
        for training in (False, True):
            forces = TracedForces(model, training=training, compile=False, small_output=None)
            forces(z, pos, batch, 2, nl.edge_index, offsets, nl.mask)
            counts[rows, training] = forces.small_products
    assert counts[10**6, False] > counts[0, False]  # inference follows SMALL_ROWS
    assert counts[0, True] > counts[10**6, True]  # training follows TRAINING_SMALL_ROWS


def test_inference_graphs_of_many_atoms_rewrite_no_product(monkeypatch):
    """Above :data:`SMALL_PRODUCTS_MAX_ATOMS` atoms (all structures together) an "auto" inference
    graph keeps every product a matrix product (measured: cuBLAS wins at 166 atoms); the training
    graph and an explicit ``small_rows`` keep their rewrites; the forces are the eager ones."""
    from torchmdx.nn import traced as traced_module

    model = torchmdx.build_model(SMALL_ET)
    z, pos, batch, cell, pbc = _structures()
    nl, offsets = _list(model, pos, batch, cell, pbc)
    ref = model(z, pos, batch, cell, pbc)
    counts = {}
    for bound in (len(z), len(z) - 1):
        monkeypatch.setattr(traced_module, "SMALL_PRODUCTS_MAX_ATOMS", bound)
        for label, keywords in (("auto", {}), ("rows", dict(small_rows=traced_module.SMALL_ROWS)),
                                ("training", dict(training=True))):
            traced = TracedForces(model, compile=False, **keywords)
            energy, forces, _ = traced(z, pos, batch, 2, nl.edge_index, offsets, nl.mask)
            torch.testing.assert_close(forces.detach(), ref["forces"], rtol=1e-9, atol=1e-10)
            counts[bound, label] = traced.small_products
    above = len(z) - 1
    assert counts[len(z), "auto"] > 0 and counts[above, "auto"] == 0
    assert counts[above, "rows"] == counts[len(z), "rows"] > 0
    assert counts[above, "training"] == counts[len(z), "training"] > 0
