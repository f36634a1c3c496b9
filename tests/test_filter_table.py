"""Radial filters tabulated in the edge length (torchmdx.kernels.filter_table) and the fused
message kernels' table mode (filters interpolated in the kernels, ``CONFIG.filters = 'table'``).

Main process (CPU): the cubic Hermite table against the function it tabulates (exact at the
nodes, O(h^4) between them), its lookup's gradient against finite differences, the closed-form
derivative the kernels use against autograd, and the model's rules (tables only for frozen
filters, rebuilt when a weight changes).
Interpreter subprocess (TRITON_INTERPRET=1, one for all cases, as in test_message_triton.py):
the kernels in table mode against the torch reference of the same tables (float64 to 1e-11,
float32 against a float64 reference), sorted and merged sender sides, masks and padding; and
a small ET model whose filters come from tables against the exact filters.
GPU (``-m gpu``): the same on 300 random atoms, and the ET-MD17 model's forces with tables within
2 x the GEMM filters' float32 error against float64 (issue 16's gate).
"""

from __future__ import annotations

import math
import sys
import zlib
from pathlib import Path

import pytest
import torch

from test_message_triton import interpreter_subprocess, make_inputs, random_molecule, rel_err, write_case_results

from torchmdx.kernels.filter_table import FilterTable, build_filter_table, lookup_derivative, table_error

def wave(r):
    """Three smooth test channels of r [n] -> [n, 3] (float64)."""
    return torch.stack([torch.sin(3.0 * r), torch.exp(-(r - 1.5) ** 2), r ** 3 / 10.0], dim=-1)


def test_table_exact_at_nodes_and_fourth_order_between():
    table = build_filter_table(wave, 0.5, 4.5, 64, torch.float64)
    nodes = 0.5 + 4.0 / 64 * torch.arange(64, dtype=torch.float64)
    assert torch.allclose(table.lookup(nodes), wave(nodes), rtol=0, atol=1e-14)
    errors = [table_error(build_filter_table(wave, 0.5, 4.5, g, torch.float64), wave)[0] for g in (32, 64, 128)]
    # halving h divides the value error by ~16 (cubic Hermite: h^4)
    assert 12 < errors[0] / errors[1] < 20 and 12 < errors[1] / errors[2] < 20, errors
    # and stays within the textbook bound h^4 max|f| / 384: sin(3r) has f = 81 sin(3r), max 1
    assert errors[1] <= 1.001 * (4.0 / 64) ** 4 * 81 / 384, errors
    # a cubic is reproduced exactly
    cubic = build_filter_table(lambda r: (r ** 3 - 2 * r)[:, None], 0.0, 2.0, 5, torch.float64)
    assert max(table_error(cubic, lambda r: (r ** 3 - 2 * r)[:, None])) < 1e-13


def test_lookup_gradient_matches_finite_differences_and_closed_form():
    table = build_filter_table(wave, 0.5, 4.5, 16, torch.float64)
    r = torch.tensor([0.6, 1.234, 2.0001, 3.3, 4.49], dtype=torch.float64, requires_grad=True)
    for c in range(3):
        (grad,) = torch.autograd.grad(table.lookup(r)[:, c].sum(), r)
        h = 1e-6
        fd = (table.lookup(r.detach() + h)[:, c] - table.lookup(r.detach() - h)[:, c]) / (2 * h)
        assert torch.allclose(grad, fd, rtol=1e-7, atol=1e-8)
        assert torch.allclose(grad, lookup_derivative(table, r.detach())[:, c], rtol=1e-12, atol=1e-13)


def test_et_filter_table_accuracy():
    """The ET-MD17 filters (32 exp-normal RBFs on [0, 5] Å, SiLU) at the default 2 048
    intervals: values within 3e-7 and derivatives within 2e-5 of each channel's largest
    (measured 1.5e-7 / 1.1e-5; direct float32 evaluation of the derivative: ~1.8e-6), and the
    error falls ~16x per halving of h."""
    from torchmdx.nn.layers import ExpNormalRBF, xavier_linear

    torch.manual_seed(0)
    rbf = ExpNormalRBF(0.0, 5.0, 32, False).double()
    lin = xavier_linear(32, 64).double()

    def filters(r):
        return torch.nn.functional.silu(lin(rbf(r)))

    value, derivative = table_error(build_filter_table(filters, 0.0, 5.0, 2048, torch.float64), filters)
    assert value < 3e-7 and derivative < 2e-5, (value, derivative)
    coarse = table_error(build_filter_table(filters, 0.0, 5.0, 1024, torch.float64), filters)[0]
    assert 10 < coarse / value < 20


def test_compact_table_decodes_to_its_coefficients_within_the_fixed_point_step():
    """The compact buffer: rows c0, c1 bit-identical, the word's c2 (low 20 bits, signed) and c3
    (high 12) times the stored inverse scales equal the dequantized coefficients exactly (a torch
    decode, the same integer operations as the kernels'); each within half a step of the float32 value,
    the step 2^-19 / 2^-11 of the channel's largest or finer; channel slices commute with compacting;
    the filter errors stay those of the float32 table."""
    torch.manual_seed(0)
    weights = torch.randn(8, 32, dtype=torch.float64)

    def fn(r):
        e = torch.exp(-4 * (r[:, None] - torch.linspace(0, 5, 32, dtype=torch.float64)) ** 2)
        return torch.nn.functional.silu(e @ weights.T)

    table = build_filter_table(fn, 0.0, 5.0)  # the default 2 048 intervals
    compact = table.compact()
    assert compact is table.compact() and compact.compact() is compact
    g, c = table.intervals, table.channels
    words = compact.packed.view(torch.int32)
    rows = words[: 3 * g].view(g, 3, c)
    assert torch.equal(rows[:, 0], table.coefficients[:, 0].view(torch.int32))
    assert torch.equal(rows[:, 1], table.coefficients[:, 1].view(torch.int32))
    word = rows[:, 2]
    inverse2, inverse3 = compact.packed[3 * g], compact.packed[3 * g + 1]
    c2 = ((word << 12) >> 12).float() * inverse2
    c3 = (word >> 20).float() * inverse3
    assert torch.equal(c2, compact.coefficients[:, 2]) and torch.equal(c3, compact.coefficients[:, 3])
    for k, bits in ((2, 20), (3, 12)):
        exact = table.coefficients[:, k].double()
        step = exact.abs().amax(0) / (2 ** (bits - 1) - 1)
        assert torch.all((compact.coefficients[:, k].double() - exact).abs() <= step)
        assert torch.all(torch.exp2(torch.log2(compact.packed[3 * g + k - 2]).round()) == compact.packed[3 * g + k - 2])
    assert torch.equal(compact.columns(2, 5).packed.view(torch.int32), table.columns(2, 5).compact().packed.view(torch.int32))
    plain, packed = table_error(table, fn), table_error(compact, fn)
    assert packed[0] <= 1.01 * plain[0] and packed[1] <= 1.01 * plain[1], (plain, packed)
    with pytest.raises(ValueError, match="float32"):
        FilterTable(table.coefficients.double(), 0.0, 5.0).compact()


def test_bad_table_grid_refused():
    with pytest.raises(ValueError, match="r_max > r_min"):
        build_filter_table(wave, 2.0, 1.0, 8)
    with pytest.raises(ValueError, match="one interval"):
        build_filter_table(wave, 0.0, 1.0, 0)


class _WantsTables:
    """A message stand-in that offers tables (the fused message does on CUDA / the interpreter)."""

    filtered = None

    @staticmethod
    def wants_tables(num_atoms, device):
        return True


def _representation(**overrides):
    from torchmdx.nn import ETPotential

    config = dict(embedding_dimension=16, num_layers=2, num_heads=2, num_rbf=8, cutoff_upper=4.0, dtype="float64",
                  **overrides)
    return ETPotential(config, backend="torch").representation


def test_tables_only_for_frozen_filters():
    rep = _representation()
    message = _WantsTables()
    assert not rep.tables_usable(message, 5, torch.device("cpu"))  # weights want gradients (training)
    with torch.no_grad():
        assert rep.tables_usable(message, 5, torch.device("cpu"))
    for p in rep.parameters():
        p.requires_grad_(False)
    assert rep.tables_usable(message, 5, torch.device("cpu"))  # frozen (set_compiled): forces still flow
    assert not rep.tables_usable(lambda *a, **k: None, 5, torch.device("cpu"))  # the reference: no tables


def test_filter_tables_follow_the_weights():
    """Tables are kept between calls and rebuilt when a filter weight changes in place."""
    rep = _representation()
    r = torch.linspace(0.3, 3.9, 50, dtype=torch.float64)

    def exact(layer):
        return rep.layers[layer].act(rep.layers[layer].dv_proj(rep.rbf(r)))

    first = rep.filter_tables(torch.device("cpu"), torch.float64)
    assert rep.filter_tables(torch.device("cpu"), torch.float64) is first
    assert torch.allclose(first[1][1].lookup(r), exact(1), atol=1e-7)
    assert first[0][0].channels == 16 and first[0][1].channels == 48
    assert first[0][1].coefficients.shape == (2048, 4, 48)
    with torch.no_grad():
        rep.layers[1].dv_proj.weight.mul_(1.5)
    second = rep.filter_tables(torch.device("cpu"), torch.float64)
    assert second is not first
    assert torch.allclose(second[1][1].lookup(r), exact(1), atol=1e-7)
    assert not torch.allclose(first[1][1].lookup(r), exact(1), atol=1e-3)


# --------------------------------------------------------------------------- interpreter cases
def table_inputs(seed, *, dtype=torch.float64, device="cpu", heads=2, head_dim=8, intervals=8, **make_opts):
    """make_inputs' random message inputs with the filters as random tables on [0.5, 4] Å and
    edge lengths r (equal on an edge and its reverse in a symmetric list, like rbf there)."""
    t, edge_index, mask = make_inputs(seed, dtype=dtype, device=device, heads=heads, head_dim=head_dim, **make_opts)
    f = heads * head_dim
    g = torch.Generator().manual_seed(seed + 1)
    t["r"] = (0.5 + 3.5 * t.pop("rbf")[:, 0].detach().double()).to(dtype).requires_grad_(True)
    for name in ("wk", "bk", "wv", "bv"):
        t.pop(name, None)

    def smooth(channels):
        """Random smooth filters a sin(w r + p) + b tabulated (float32 rounds r where the table
        is read, so rough random coefficients would measure that rounding, not the kernels)."""
        a, w, p, b = torch.rand(4, channels, generator=g, dtype=torch.float64)
        return build_filter_table(lambda r: a * torch.sin((0.5 + 2.5 * w) * r[:, None] + 6 * p) + b - 0.5,
                                  0.5, 4.0, intervals, torch.float64).coefficients

    coefficients = {"key": smooth(f), "value": smooth(3 * f)}
    return t, edge_index, mask, {k: c.to(device) for k, c in coefficients.items()}


def table_call(module, t, edge_index, mask, coefficients, heads, *, reference=False, sender_side="sorted",
               symmetric=False, vector_cutoff=True, keys=True, values=True, storage="float32", block_edges=None,
               num_warps=None):
    """``storage`` 'compact': the kernels read the compact buffers (float32 calls), the reference
    the same tables' dequantized coefficients."""
    from torchmdx.kernels.message_triton_grad import reference_tabulated

    dtype = t["q"].dtype

    def table(c):
        if storage != "compact":
            return FilterTable(c.to(dtype), 0.5, 4.0)
        compact = FilterTable(c.float(), 0.5, 4.0).compact()
        return compact if dtype == torch.float32 else FilterTable(compact.coefficients.to(dtype), 0.5, 4.0)

    tk = table(coefficients["key"]) if keys else None
    tv = table(coefficients["value"]) if values else None
    kw = dict(edge_mask=mask, self_loop=(t.get("dk0"), t.get("dv0"), t["phi0"]), vector_cutoff=vector_cutoff)
    args = (t["q"], t["k"], t["v"], t["vec"], t["r"], tk, tv, t["phi"], t["unit"], edge_index, heads)
    if reference:
        return reference_tabulated(*args, **kw)
    module.CONFIG.sender_side = sender_side
    module.CONFIG.table_storage = storage
    module.CONFIG.block_edges, module.CONFIG.num_warps = block_edges, num_warps
    try:
        return module.FusedMessage(symmetric=symmetric).tabulated(*args, **kw)
    finally:
        module.CONFIG.table_storage = "auto"
        module.CONFIG.block_edges = module.CONFIG.num_warps = None


def table_compare(module, t, edge_index, mask, coefficients, heads, tol, **kw):
    """Fused forward and every input gradient (r included) vs the reference in float64."""
    t64 = {name: x.detach().double().requires_grad_(x.requires_grad) for name, x in t.items()}
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # NaN-filled torch.empty: unwritten outputs fail
    try:
        m, u = table_call(module, t, edge_index, mask, coefficients, heads, **kw)
        names = [name for name, x in t.items() if x.requires_grad]
        g = torch.Generator().manual_seed(7)
        gm = torch.randn(m.shape, generator=g, dtype=torch.float64)
        gu = torch.randn(u.shape, generator=g, dtype=torch.float64)
        grads = torch.autograd.grad((m, u), [t[x] for x in names], (gm.to(m), gu.to(u)), allow_unused=True)
    finally:
        torch.use_deterministic_algorithms(old)
    mr, ur = table_call(module, t64, edge_index, mask, coefficients, heads, reference=True, **kw)
    grads_ref = torch.autograd.grad((mr, ur), [t64[x] for x in names], (gm.to(mr), gu.to(ur)), allow_unused=True)
    errors = {"m": rel_err(m, mr), "u": rel_err(u, ur)}
    for name, a, b in zip(names, grads, grads_ref):
        if b is not None:
            errors["d" + name] = rel_err(a, b) if a is not None else math.inf
    bad = {name: err for name, err in errors.items() if not err <= tol}
    assert not bad, f"relative errors above {tol:g}: {bad} (all: {errors})"
    assert "dr" in errors
    return errors


#: name -> (table_inputs options, table_call options, tolerance)
TABLE_CASES = {
    "sorted_f64": (dict(), dict(), 1e-11),
    "sorted_std_f64": (dict(padding=40), dict(vector_cutoff=False), 1e-11),
    "merged_f64": (dict(symmetric=True), dict(sender_side="merged", symmetric=True), 1e-11),
    "merged_keys_only_f64": (dict(symmetric=True, with_dv=False), dict(sender_side="merged", symmetric=True, values=False),
                             1e-11),
    "values_only_D6_H3_f64": (dict(heads=3, head_dim=6, with_dk=False), dict(keys=False), 1e-11),
    "sorted_f32": (dict(dtype=torch.float32), dict(), 3e-5),
    "merged_f32": (dict(dtype=torch.float32, symmetric=True), dict(sender_side="merged", symmetric=True), 3e-5),
    "reverse_f64": (dict(symmetric=True, padding=40), dict(sender_side="reverse", symmetric=True), 1e-11),
    "reverse_f32": (dict(dtype=torch.float32, symmetric=True), dict(sender_side="reverse", symmetric=True), 3e-5),
    # compact storage (c2, c3 fixed-point in one word): the kernels decode what the reference's
    # dequantized coefficients hold; 8 coarse intervals make c2 and c3 large, so a wrong decode shows
    "compact_sorted_f32": (dict(dtype=torch.float32, padding=40), dict(storage="compact", vector_cutoff=False), 3e-5),
    "compact_merged_f32": (dict(dtype=torch.float32, symmetric=True),
                           dict(storage="compact", sender_side="merged", symmetric=True), 3e-5),
    # the H100 launch-table entries of frozen models (2026-12-07): 4-edge blocks merged, 8-edge reverse
    "merged_be4_f64": (dict(symmetric=True, padding=40), dict(sender_side="merged", symmetric=True, block_edges=4), 1e-11),
    "reverse_be8_f32": (dict(dtype=torch.float32, symmetric=True), dict(sender_side="reverse", symmetric=True,
                                                                         block_edges=8), 3e-5),
    "compact_reverse_values_f32": (dict(dtype=torch.float32, symmetric=True, with_dk=False),
                                   dict(storage="compact", sender_side="reverse", symmetric=True, keys=False), 3e-5),
}


def case_table(name):
    from torchmdx.kernels import message_triton

    make_opts, call_opts, tol = TABLE_CASES[name]
    heads = make_opts.get("heads", 2)
    t, edge_index, mask, coefficients = table_inputs(zlib.crc32(name.encode()), **make_opts)
    modes = []
    apply = message_triton._FusedMessageFunction.apply
    message_triton._FusedMessageFunction.apply = lambda spec, *a: modes.append((spec.dk_mode, spec.dv_mode)) or apply(spec, *a)
    try:
        table_compare(message_triton, t, edge_index, mask, coefficients, heads, tol, **call_opts)
    finally:
        message_triton._FusedMessageFunction.apply = apply
        message_triton.CONFIG.sender_side = "auto"
    assert modes and all(m in (0, 4) for pair in modes for m in pair) and any(4 in pair for pair in modes), modes


def case_double_backward():
    """create_graph=True in table mode (a Hessian of a frozen model): the gradients are
    differentiable (through the torch reference of the tables) and their derivatives, r's
    included, equal the reference's."""
    from torchmdx.kernels import message_triton

    t, edge_index, mask, coefficients = table_inputs(13, symmetric=True)
    t64 = {name: x.detach().requires_grad_(x.requires_grad) for name, x in t.items()}
    names = ["q", "k", "r", "unit", "phi"]
    out = []
    for tensors, reference in ((t, False), (t64, True)):
        m, u = table_call(message_triton, tensors, edge_index, mask, coefficients, 2, reference=reference,
                          sender_side="merged", symmetric=True)
        g = torch.autograd.grad((m * m).sum() + (u * u.roll(1, 0)).sum(), [tensors[x] for x in names], create_graph=True)
        s = sum((gi * torch.cos(torch.arange(gi.numel(), dtype=gi.dtype)).view_as(gi)).sum() for gi in g)
        out.append(torch.autograd.grad(s, [tensors[x] for x in ("q", "v", "r")]))
    message_triton.CONFIG.sender_side = "auto"
    for a, b, name in zip(out[0], out[1], ("q", "v", "r")):
        assert rel_err(a, b) < 1e-11, f"second derivative w.r.t. {name}: {rel_err(a, b)}"


def case_model(shared_data):
    """A small frozen ET (float64, then float32) with CONFIG.filters = 'table': the kernels ran in
    table mode, energies and forces agree with the exact filters (float64: to the tables'
    interpolation error; float32: within 2 x the GEMM filters' error against float64). Ethanol,
    9 atoms: the interpreter's time grows with the edges, and aspirin (21 atoms, the earlier
    input) took twice as long for the same checks (float32 forces, table vs GEMM: 6.4e-7 vs
    5.5e-7 on aspirin, 2.1e-7 vs 2.6e-7 on ethanol; float64: 1.9e-9 and 1.0e-9)."""
    import numpy as np

    from torchmdx.kernels import message_triton
    from torchmdx.nn import ETPotential

    data = np.load(Path(shared_data) / "md17" / "md17_ethanol_xtb.npz")
    z = torch.tensor(data["z"], dtype=torch.long)
    pos = torch.tensor(data["R"][0], dtype=torch.float64)
    config = dict(embedding_dimension=32, num_layers=2, num_heads=4, num_rbf=16, dtype="float64", seed=3,
                  vector_cutoff=True, cutoff_upper=4.0)
    ref = ETPotential(config, backend="torch").eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    exact = ref(z, pos)

    def fused(dtype, place):
        model = ETPotential({**config, "dtype": "float32" if dtype == torch.float32 else "float64"}, backend="triton")
        model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in ref.state_dict().items()})
        for p in model.parameters():
            p.requires_grad_(False)
        message_triton.CONFIG.filters = "table" if place == "compact" else place
        message_triton.CONFIG.table_storage = "compact" if place == "compact" else "auto"
        modes = []
        apply = message_triton._FusedMessageFunction.apply
        message_triton._FusedMessageFunction.apply = lambda spec, *a: modes.append(spec.dk_mode) or apply(spec, *a)
        try:
            out = model.eval()(z, pos.to(dtype))
            assert message_triton.LAST_CONFIG["table_storage"] == ("compact" if place == "compact" else "float32")
        finally:
            message_triton._FusedMessageFunction.apply = apply
            message_triton.CONFIG.filters = "auto"
            message_triton.CONFIG.table_storage = "auto"
        assert modes == [4 if place in ("table", "compact") else 3] * 2, modes
        return rel_err(out["energy"], exact["energy"]), rel_err(out["forces"], exact["forces"])

    energy64, forces64 = fused(torch.float64, "table")
    assert energy64 < 1e-7 and forces64 < 1e-6, (energy64, forces64)
    gemm32, table32 = fused(torch.float32, "gemm")[1], fused(torch.float32, "table")[1]
    assert table32 <= 2 * gemm32, (table32, gemm32)
    compact32 = fused(torch.float32, "compact")[1]
    assert compact32 <= 2 * gemm32, (compact32, gemm32)


def run_interpreter_cases(out_path, shared_data):
    cases = [(name, lambda name=name: case_table(name)) for name in TABLE_CASES]
    write_case_results(out_path, cases + [("double_backward", case_double_backward),
                                          ("model", lambda: case_model(shared_data))])


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory, shared_data):
    return interpreter_subprocess(__file__, tmp_path_factory.mktemp("filter_table"), shared_data)


@pytest.mark.parametrize("name", list(TABLE_CASES) + ["double_backward", "model"])
def test_interpreter(interpreter_results, name):
    error = interpreter_results[name]
    assert error is None, error


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("sender_side,block_edges,num_warps", [("sorted", None, None), ("merged", None, None),
                                                                ("reverse", None, None), ("merged", 4, 1),
                                                                ("reverse", 8, 2)])
@pytest.mark.parametrize("storage", ["float32", "compact"])
def test_gpu_table_message(dtype, tol, sender_side, block_edges, num_warps, storage):
    """Table mode against the float64 reference at the default launch shapes and at the launch-table
    entries of frozen models (merged, 4 edges, 1 warp; reverse, 8 edges, 2 warps)."""
    from torchmdx.kernels import message_triton

    if storage == "compact" and dtype != torch.float32:
        pytest.skip("compact tables are float32 only")
    t, edge_index, mask, coefficients = table_inputs(31, dtype=dtype, device="cuda", heads=8, head_dim=16,
                                                     intervals=2048, atoms=300, degree=30, padding=50, empty_atom=7,
                                                     symmetric=True)
    errors = table_compare(message_triton, t, edge_index, mask, coefficients, 8, tol, sender_side=sender_side,
                           symmetric=True, storage=storage, block_edges=block_edges, num_warps=num_warps)
    print(dtype, sender_side, block_edges, num_warps, storage, {k: f"{v:.1e}" for k, v in errors.items()})


@pytest.mark.gpu
def test_gpu_model_table_gate():
    """ET-MD17 on a 120-atom random molecule, frozen float32 weights: forces with tables within
    2 x the GEMM filters' error against the float64 fused evaluation (issue 16's gate)."""
    from torchmdx.kernels import message_triton
    from torchmdx.nn import ETPotential

    z, pos = random_molecule()
    config = dict(dtype="float64", seed=0, vector_cutoff=True)
    ref = ETPotential(config, backend="triton").cuda().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    exact = ref(z, pos)["forces"]
    model = ETPotential({**config, "dtype": "float32"}, backend="triton").cuda().eval()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ref.state_dict().items()})
    for p in model.parameters():
        p.requires_grad_(False)
    errors = {}
    for place in ("gemm", "table", "compact"):
        message_triton.CONFIG.filters = "table" if place == "compact" else place
        message_triton.CONFIG.table_storage = "compact" if place == "compact" else "float32"
        try:
            errors[place] = rel_err(model(z, pos.float())["forces"], exact)
        finally:
            message_triton.CONFIG.filters = "auto"
            message_triton.CONFIG.table_storage = "auto"
    print(errors)
    assert errors["table"] <= 2 * errors["gemm"], errors
    assert errors["compact"] <= 2 * errors["gemm"], errors


if __name__ == "__main__":
    torch.set_num_threads(1)
    __import__("interpreter_speedup").install()  # tests/interpreter_speedup.py
    run_interpreter_cases(sys.argv[1], sys.argv[2])
