"""The fused table-mode message as custom operators (torchmdx.kernels.message_ops) and the whole-model
traced graph that calls them (TracedForces ``fused_message``, nn.traced.FUSED_MESSAGE_IN_GRAPH).

Main process (CPU, no interpreter): the operators run the torch reference of the same tables there
(their fallback), which checks everything around the kernels: the receiver segments against
EdgeLayout's, the autograd wiring (values and every input gradient, r and the self edge's filters
included, against ``reference_tabulated`` in float64), ``torch.library.opcheck`` (schema, fake
tensors, autograd registration, AOT dispatch), the traced graph (one forward and one backward
operator node per layer, no per-edge message tensors left, energies and forces equal to the eager
model, central finite differences), the same graph compiled by inductor, the switch (off by
default, never in a training graph, no change to the state dict), and the refusals (no second
derivative, no table gradient).
Interpreter subprocess (TRITON_INTERPRET=1, one for all cases, as in test_filter_table.py): the
operators with the Triton kernels (sorted, merged and reverse sender sides, float64 and float32,
keys only) against the reference, opcheck on the kernel path, and the traced graph with the kernels
against the eager fused model (filters from the same tables) and finite differences.
"""

from __future__ import annotations

import sys
import zlib

import pytest
import torch

from test_filter_table import table_inputs
from test_message_triton import interpreter_subprocess, rel_err, write_case_results

import torchmdx
from torchmdx.kernels import message_ops
from torchmdx.kernels.filter_table import FilterTable
from torchmdx.kernels.message_triton_grad import reference_tabulated
from torchmdx.nn import traced as traced_module
from torchmdx.nn.traced import TracedForces

from test_model_compiled import SMALL_ET  # the same small float64 ET as test_traced.py
from test_model_compiled import _inputs as _structures  # an open and a periodic structure, one batch
from test_traced import _list, assert_forces_are_minus_the_energy_gradient

GRADIENTS = ("q", "k", "v", "vec", "r", "phi", "unit", "dk0", "dv0")


# --------------------------------------------------------------------------- helpers
def _tables(coefficients, dtype, keys=True, values=True):
    return (FilterTable(coefficients["key"].to(dtype), 0.5, 4.0) if keys else None,
            FilterTable(coefficients["value"].to(dtype), 0.5, 4.0) if values else None)


def _message(t, edge_index, mask, tables, heads, *, reference=False, symmetric=False, vector_cutoff=True):
    kw = dict(edge_mask=mask, self_loop=(t.get("dk0"), t.get("dv0"), t["phi0"]), vector_cutoff=vector_cutoff)
    args = (t["q"], t["k"], t["v"], t["vec"], t["r"], *tables, t["phi"], t["unit"], edge_index, heads)
    if reference:
        return reference_tabulated(*args, **kw)
    return message_ops.TableMessage(symmetric=symmetric).tabulated(*args, **kw)


def check_operator(seed_name, tol, *, heads=2, sender_side="auto", symmetric=False, keys=True, values=True,
                   vector_cutoff=True, **make_opts):
    """The forward operator and its backward (through autograd) against the reference of the same
    tables in float64: m, u and the gradients of every input (r, phi, unit and dk0 / dv0 included)."""
    from torchmdx.kernels import message_triton

    dtype = make_opts.get("dtype", torch.float64)
    t, edge_index, mask, coefficients = table_inputs(zlib.crc32(seed_name.encode()), heads=heads,
                                                     symmetric=symmetric, **make_opts)
    if not keys:
        t.pop("dk0", None)
    if not values:
        t.pop("dv0", None)
    t64 = {name: x.detach().double().requires_grad_(x.requires_grad) for name, x in t.items()}
    names = [name for name in GRADIENTS if name in t]
    message_triton.CONFIG.sender_side = sender_side
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # NaN-filled torch.empty: unwritten outputs fail
    try:
        m, u = _message(t, edge_index, mask, _tables(coefficients, dtype, keys, values), heads, symmetric=symmetric,
                        vector_cutoff=vector_cutoff)
        g = torch.Generator().manual_seed(11)
        gm, gu = (torch.randn(x.shape, generator=g, dtype=torch.float64) for x in (m, u))
        grads = torch.autograd.grad((m, u), [t[x] for x in names], (gm.to(m), gu.to(u)))
    finally:
        torch.use_deterministic_algorithms(old)
        message_triton.CONFIG.sender_side = "auto"
    mr, ur = _message(t64, edge_index, mask, _tables(coefficients, torch.float64, keys, values), heads, reference=True,
                      vector_cutoff=vector_cutoff)
    grads_ref = torch.autograd.grad((mr, ur), [t64[x] for x in names], (gm, gu))
    errors = {"m": rel_err(m, mr), "u": rel_err(u, ur)}
    errors.update({"d" + name: rel_err(a, b) for name, a, b in zip(names, grads, grads_ref)})
    bad = {name: err for name, err in errors.items() if not err <= tol}
    assert not bad, f"relative errors above {tol:g}: {bad} (all: {errors})"
    assert {"dr", "dphi", "dunit", "dq", "dk", "dv", "dvec"} <= set(errors)
    return errors


def opcheck_operators(dtype=torch.float64):
    """``torch.library.opcheck`` on both operators (float64, a small padded list, self edge)."""
    t, edge_index, mask, coefficients = table_inputs(5, dtype=dtype, symmetric=True)
    rowptr, rowend = message_ops.segments(edge_index, t["q"].shape[0], mask)
    tensors = [t[name] for name in ("q", "k", "v", "vec", "r")] + [coefficients["key"].to(dtype),
                                                                    coefficients["value"].to(dtype)]
    tensors += [t["phi"], t["unit"], edge_index, rowptr, rowend, mask, t["dk0"], t["dv0"], t["phi0"]]
    constants = [2, 0.5, 4.0, "silu", True, True]
    torch.library.opcheck(torch.ops.torchmdx.et_message_table.default, (*tensors, *constants))
    n, f = t["q"].shape
    g = torch.Generator().manual_seed(3)
    grad_m = torch.randn(n, f, generator=g, dtype=torch.float64).to(dtype)
    grad_u = torch.randn(n, 3, f, generator=g, dtype=torch.float64).to(dtype)
    plain = [x.detach() if torch.is_tensor(x) else x for x in tensors]
    for self_filters in (False, True):
        torch.library.opcheck(torch.ops.torchmdx.et_message_table_backward.default,
                              (grad_m, grad_u, *plain, *constants, self_filters))


def _model(backend="auto"):
    model = torchmdx.build_model(dict(SMALL_ET, backend=backend)).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # frozen: what the calculator and the MD engine trace
    return model


def graph_nodes(traced):
    """(forward op nodes, backward op nodes, per-edge message nodes) of the one traced graph: the
    last are nodes whose value has E rows of the values' width 3F ([E, 3F], [E, 3, F], [E, H, 3D]),
    which only the reference message makes (the neighbor embedding is [E, F] wide)."""
    (graph,) = traced._graphs.values()
    graph_module = getattr(graph, "graph_module", graph)
    ops = [n.target for n in graph_module.graph.nodes if n.op == "call_function"]
    forward = sum(op is torch.ops.torchmdx.et_message_table.default for op in ops)
    backward = sum(op is torch.ops.torchmdx.et_message_table_backward.default for op in ops)
    return forward, backward, graph_module


def per_edge_message_nodes(graph_module, edges, width):
    found = []
    for node in graph_module.graph.nodes:
        value = node.meta.get("val")
        if node.op == "call_function" and torch.is_tensor(value) and value.dim() >= 2 and value.shape[0] == edges \
                and value[0].numel() == 3 * width:
            found.append(str(node.target))
    return found


def check_traced_model(compile=False, backend="auto", tol=1e-9, finite_differences=True):
    """The traced graph with the operators against the eager model (energies, per-atom energies,
    forces; a second call with moved positions reuses the graph), its nodes, and central finite
    differences of its energy."""
    model = _model(backend)
    z, pos, batch, cell, pbc = _structures()
    nl, offsets = _list(model, pos, batch, cell, pbc, max_pairs=120)  # capacity-padded, as the MD engine
    traced = TracedForces(model, compile=compile, fused_message=True)
    for shift in (0.0, 0.03):
        moved = pos + shift * torch.arange(27, dtype=pos.dtype).reshape(9, 3).cos()
        ref = model(z, moved, batch, cell, pbc, per_atom=True)
        energy, forces, atomic = traced(z, moved, batch, 2, nl.edge_index, offsets, nl.mask)
        assert rel_err(energy, ref["energy"]) < tol, (rel_err(energy, ref["energy"]), tol)
        assert rel_err(atomic, ref["energies"]) < tol, (rel_err(atomic, ref["energies"]), tol)
        assert rel_err(forces, ref["forces"]) < tol, (rel_err(forces, ref["forces"]), tol)
    assert traced.traces == 1
    forward, backward, graph_module = graph_nodes(traced)
    layers = SMALL_ET["num_layers"]
    assert (forward, backward) == (layers, layers), (forward, backward)
    width = SMALL_ET["embedding_dimension"]
    assert per_edge_message_nodes(graph_module, nl.edge_index.shape[1], width) == []
    # the operators get contiguous tensors (made so in the graph, not copied inside at every call)
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and "torchmdx" in str(node.target):
            values = [a.meta["val"] for a in node.args if isinstance(a, torch.fx.Node) and torch.is_tensor(a.meta.get("val"))]
            assert values and all(v.is_contiguous() for v in values), node
    if finite_differences:
        assert_forces_are_minus_the_energy_gradient(traced, z, pos, batch, nl, offsets)
    return lambda: traced(z, pos, batch, 2, nl.edge_index, offsets, nl.mask)


# --------------------------------------------------------------------------- main process (fallback)
def test_segments_equal_the_edge_layout():
    """segments() (recorded once per traced graph) gives EdgeLayout's receiver segments: random
    sorted lists with padding rows on the last atom, masks, an atom with no edges, no edges."""
    from torchmdx.kernels.message_triton_spec import EdgeLayout

    g = torch.Generator().manual_seed(0)
    for case in range(20):
        n = int(torch.randint(1, 9, (1,), generator=g))
        e = int(torch.randint(0, 30, (1,), generator=g)) if case else 0
        receivers = torch.sort(torch.randint(0, n, (e,), generator=g)).values
        edge_index = torch.stack([receivers, torch.randint(0, n, (e,), generator=g)])
        for mask in (None, torch.rand(e, generator=g) > 0.4):
            rowptr, rowend = message_ops.segments(edge_index, n, mask)
            layout = EdgeLayout(edge_index, n, mask)
            assert torch.equal(rowptr, layout.rowptr) and torch.equal(rowend, layout.rowend), (case, mask)
            assert rowptr.dtype == layout.rowptr.dtype and rowend.dtype == layout.rowend.dtype


def test_segments_compiled_by_inductor():
    """The traced graph's segments are inductor's code (searchsorted, cumsum), not aten's: the same
    numbers on a capacity-padded list with a mask (the operators' fallback does not read them, so
    the compiled model test does not check them)."""
    from torchmdx.kernels.message_triton_spec import EdgeLayout

    n = 6
    receivers = torch.tensor([0, 0, 1, 3, 3, 3, 4, 5, 5, 5, 5, 5])
    edge_index = torch.stack([receivers, receivers.flip(0)])
    mask = torch.tensor([1, 0, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    compiled = torch.compile(lambda e, m: message_ops.segments(e, n, m), dynamic=False, fullgraph=True)
    rowptr, rowend = compiled(edge_index, mask)
    layout = EdgeLayout(edge_index, n, mask)
    assert torch.equal(rowptr, layout.rowptr) and torch.equal(rowend, layout.rowend)


@pytest.mark.parametrize("name", ["sorted", "symmetric", "keys_only"])
def test_operator_wiring_against_the_reference(name):
    """Without the interpreter the operators compute the reference inside: this checks the autograd
    wiring (the backward operator's gradients, the per-edge buffer's columns, the self edge's filters)."""
    options = {"sorted": dict(padding=40), "symmetric": dict(symmetric=True),
               "keys_only": dict(values=False, with_dv=False, vector_cutoff=False)}[name]
    check_operator(name, 1e-12, **options)


def test_opcheck():
    opcheck_operators()


def test_second_derivatives_and_table_gradients_are_refused():
    t, edge_index, mask, coefficients = table_inputs(3)
    m, u = _message(t, edge_index, mask, _tables(coefficients, torch.float64), 2)
    (gq,) = torch.autograd.grad((m * m).sum() + (u * u).sum(), [t["q"]], create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(gq.sum(), [t["k"]])
    key = coefficients["key"].clone().requires_grad_(True)
    tables = (FilterTable(key, 0.5, 4.0), None)
    m, _ = _message(t, edge_index, mask, tables, 2)
    with pytest.raises(NotImplementedError, match="key table"):
        torch.autograd.grad(m.sum(), [key])


@pytest.mark.parametrize("compiled", [False, True], ids=["traced", "traced+inductor"])
def test_traced_graph_with_the_operators(compiled):
    """The traced graph (and inductor's C++ compilation of it) with one forward and one backward
    operator per layer and no per-edge message left, against the eager model: the operators' tables
    against the eager exact filters (2 048 intervals: within 1e-9)."""
    check_traced_model(compile=compiled, finite_differences=not compiled)


def test_the_switch(monkeypatch):
    """On by default for inference graphs only (the operators, no per-edge message nodes); the
    module switch off traces the reference message; the state dict and buffers are unchanged."""
    model = _model()
    keys = list(model.state_dict())
    buffers = [name for name, _ in model.named_buffers()]
    z, pos, batch, cell, pbc = _structures()
    nl, offsets = _list(model, pos, batch, cell, pbc, max_pairs=120)  # capacity-padded, as the MD engine
    edges, width = nl.edge_index.shape[1], SMALL_ET["embedding_dimension"]
    assert traced_module.FUSED_MESSAGE_IN_GRAPH is True
    on = TracedForces(model, compile=False)
    on(z, pos, batch, 2, nl.edge_index, offsets, nl.mask)
    assert graph_nodes(on)[:2] == (2, 2)
    monkeypatch.setattr(traced_module, "FUSED_MESSAGE_IN_GRAPH", False)
    off = TracedForces(model, compile=False)
    off(z, pos, batch, 2, nl.edge_index, offsets, nl.mask)
    forward, backward, graph_module = graph_nodes(off)
    assert (forward, backward) == (0, 0) and per_edge_message_nodes(graph_module, edges, width)
    assert TracedForces(model, compile=False, fused_message=False).ops is False
    assert TracedForces(model, compile=False, training=True).ops is False  # training keeps its graph
    assert list(model.state_dict()) == keys and [name for name, _ in model.named_buffers()] == buffers


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_calculator_graph_with_the_operators(shared_data, monkeypatch):
    """ET-MD17 size, chignolin, float32: the calculator's CUDA graph (GraphedForces, list rebuilt
    inside, traced graph compiled by inductor with the operators) against the float64 eager model
    (exact filters) and the float32 eager fused model (same tables), also after the atoms moved."""
    from ase.io import read

    from torchmdx.md.cuda_graph import GraphedForces

    config = dict(SMALL_ET, embedding_dimension=128, num_layers=6, num_heads=8, num_rbf=32, cutoff_upper=5.0)
    atoms = read(shared_data / "systems" / "chignolin.xyz")
    z = torch.tensor(atoms.numbers, device="cuda")
    pos64 = torch.tensor(atoms.positions, device="cuda")
    reference = torchmdx.build_model(dict(config, backend="torch")).cuda().eval()
    fast = torchmdx.build_model(dict(config, dtype="float32", backend="triton")).cuda().eval()
    fast.load_state_dict(reference.state_dict())
    for p in fast.parameters():
        p.requires_grad_(False)
    monkeypatch.setattr(traced_module, "FUSED_MESSAGE_IN_GRAPH", True)
    graphed = GraphedForces(fast, atoms, torch.device("cuda"), torch.float32, traced=True)
    for shift in (0.0, 0.02):
        moved = pos64 + shift * torch.arange(pos64.numel(), device="cuda", dtype=pos64.dtype).reshape(-1, 3).cos()
        energy, forces, _ = graphed(moved.float())
        forces = forces.clone()
        exact = reference(z, moved)["forces"]
        eager = fast(z, moved.float())["forces"]
        scale = float(exact.abs().max())
        assert float((forces.double() - exact).abs().max()) / scale < 1e-4
        assert float((forces - eager).abs().max()) / scale < 1e-5
    graph = list(graphed.forcefield.traced._graphs.values())[-1]
    ops = [n.target for n in graph.graph_module.graph.nodes if n.op == "call_function"]
    assert sum(op is torch.ops.torchmdx.et_message_table.default for op in ops) == 6


# --------------------------------------------------------------------------- interpreter cases
#: name -> check_operator options, tolerance (float32 against the float64 reference)
OPERATOR_CASES = {
    "sorted_f64": (dict(padding=40), 1e-11),
    "merged_f64": (dict(symmetric=True, sender_side="merged"), 1e-11),
    "reverse_f64": (dict(symmetric=True, sender_side="reverse", padding=40), 1e-11),
    "reverse_f32": (dict(symmetric=True, sender_side="reverse", dtype=torch.float32), 3e-5),
    "keys_only_std_f64": (dict(values=False, with_dv=False, vector_cutoff=False), 1e-11),
}


class _Launches:
    """Counts the fused forward and backward launches (the operators must run the kernels)."""

    def __enter__(self):
        from torchmdx.kernels import message_triton, message_triton_autograd

        self.counts = {"forward": 0, "backward": 0}
        self.apply, self.backward = message_triton._FusedMessageFunction.apply, message_triton_autograd._fused_backward
        apply, backward = self.apply, self.backward

        def counted_apply(*a):
            self.counts["forward"] += 1
            return apply(*a)

        def counted_backward(*a, **k):
            self.counts["backward"] += 1
            return backward(*a, **k)

        message_triton._FusedMessageFunction.apply = counted_apply
        message_triton_autograd._fused_backward = counted_backward
        return self.counts

    def __exit__(self, *exc):
        from torchmdx.kernels import message_triton, message_triton_autograd

        message_triton._FusedMessageFunction.apply = self.apply
        message_triton_autograd._fused_backward = self.backward


def case_operator(name):
    options, tol = OPERATOR_CASES[name]
    with _Launches() as counts:
        check_operator(name, tol, **options)
    assert counts == {"forward": 1, "backward": 1}, counts


def case_opcheck():
    with _Launches() as counts:
        opcheck_operators()
    assert counts["forward"] > 0 and counts["backward"] > 0, counts


def case_traced_model():
    """The eager model with backend 'triton' interpolates its filters from the same tables (frozen,
    the interpreter): the traced graph with the operators equals it to rounding."""
    call = check_traced_model(compile=False, backend="triton", tol=1e-11)
    with _Launches() as counts:
        call()
    layers = SMALL_ET["num_layers"]
    assert counts == {"forward": layers, "backward": layers}, counts


def run_interpreter_cases(out_path):
    cases = [(name, lambda name=name: case_operator(name)) for name in OPERATOR_CASES]
    write_case_results(out_path, cases + [("opcheck", case_opcheck), ("traced_model", case_traced_model)])


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory, shared_data):
    return interpreter_subprocess(__file__, tmp_path_factory.mktemp("message_ops"), shared_data)


@pytest.mark.parametrize("name", list(OPERATOR_CASES) + ["opcheck", "traced_model"])
def test_interpreter(interpreter_results, name):
    error = interpreter_results[name]
    assert error is None, error


if __name__ == "__main__":
    torch.set_num_threads(1)
    __import__("interpreter_speedup").install()  # tests/interpreter_speedup.py
    run_interpreter_cases(sys.argv[1])
