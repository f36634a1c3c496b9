"""Fused Triton ET message (torchmdx.kernels.message_triton) against the torch reference.

CPU: the kernels run under the Triton interpreter in ONE subprocess (TRITON_INTERPRET=1 must be
set before triton is imported, and must not leak into other tests); each case below is a test
whose result that subprocess reports. Every case compares the fused forward and every input
gradient with the reference (message_ref, itself checked against a per-edge loop in
test_model_message.py), float64 tightly, float32 against a float64 reference. Outputs come from
``torch.empty`` filled with NaN (deterministic mode), so an element a kernel forgets to write
fails the comparison.

GPU (``@pytest.mark.gpu``): larger random inputs, CUDA-graph capture, determinism and a full
model (energy + forces) with the fused path against the reference path.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- shared helpers


def make_inputs(seed, *, atoms=7, heads=2, head_dim=8, num_rbf=12, degree=4, dtype=torch.float64, device="cpu",
                filters="filtered", with_dk=True, with_dv=True, masked=True, padding=3, empty_atom=2,
                self_loop=True, no_edges=False, symmetric=False):
    """Random inputs of one ET message call: edges sorted by receiver, atom ``empty_atom``
    receives nothing, ``padding`` trailing rows (N-1, N-1) with mask False as in fixed-capacity
    neighbor lists, ~20 % of the real edges masked out.

    ``symmetric``: a symmetric list as a full neighbor list is one: every edge (i <- j) has its
    reverse (j <- i) with the same rbf / filters / cutoff / mask and the opposite unit vector;
    one pair twice (two periodic images) and one atom's own image (i <- i, both directions);
    ``empty_atom`` then neither receives nor sends."""
    g = torch.Generator().manual_seed(seed)
    f = heads * head_dim
    n = atoms
    pairs = sorted({(int(a), int(b)) for a, b in torch.randint(0, n, (n * degree, 2), generator=g).tolist() if a != b})
    if empty_atom is not None:
        pairs = [p for p in pairs if p[0] != empty_atom and not (symmetric and p[1] == empty_atom)]
    if symmetric and not no_edges:
        base = sorted({(min(a, b), max(a, b)) for a, b in pairs})
        base += [base[0], (base[-1][0], base[-1][0])]  # a second image of a pair; an atom's own image
        directed = sorted([(a, b, p, 1.0) for p, (a, b) in enumerate(base)] + [(b, a, p, -1.0) for p, (a, b) in enumerate(base)])
        pairs = [(a, b) for a, b, _, _ in directed]
        representative = {}
        for row, (_, _, p, _) in enumerate(directed):
            representative.setdefault(p, row)
        mirror = torch.tensor([representative[p] for _, _, p, _ in directed] + list(range(len(directed), len(directed) + padding)))
        sign = torch.tensor([s for _, _, _, s in directed] + [1.0] * padding, dtype=torch.float64)
    if no_edges:
        pairs, padding = [], 0
    i = [p[0] for p in pairs] + [n - 1] * padding
    j = [p[1] for p in pairs] + [n - 1] * padding
    edge_index = torch.tensor([i, j], dtype=torch.long).reshape(2, -1)
    e = edge_index.shape[1]
    mask = None
    if masked or padding:
        mask = torch.rand(e, generator=g) > (0.2 if masked else -1.0)
        mask[len(pairs):] = False

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    unit = r(e, 3)
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-3)
    t = dict(
        q=r(n, f), k=r(n, f), v=r(n, 3 * f), vec=r(n, 3, f),
        phi=torch.rand(e, generator=g, dtype=torch.float64).to(dtype), unit=unit,
    )
    if filters == "filtered":
        t["rbf"] = torch.rand(e, num_rbf, generator=g, dtype=torch.float64).to(dtype)
        if with_dk:
            t["wk"], t["bk"] = r(f, num_rbf, scale=num_rbf ** -0.5), r(f, scale=0.3)
        if with_dv:
            t["wv"], t["bv"] = r(3 * f, num_rbf, scale=num_rbf ** -0.5), r(3 * f, scale=0.3)
    else:
        if with_dk:
            t["dk"] = r(e, f)
        if with_dv:
            t["dv"] = r(e, 3 * f)
    if symmetric and not no_edges:  # each edge takes its representative's values; units flip
        for name in ("phi", "rbf", "dk", "dv"):
            if name in t:
                t[name] = t[name][mirror]
        t["unit"] = t["unit"][mirror] * sign.to(dtype)[:, None]
        if mask is not None:
            mask = mask[mirror]
            mask[len(pairs):] = False
    if self_loop:
        if with_dk:
            t["dk0"] = r(f)
        if with_dv:
            t["dv0"] = r(3 * f)
    t = {name: x.to(device).requires_grad_(True) for name, x in t.items()}
    if self_loop:
        t["phi0"] = torch.tensor(1.0, dtype=dtype, device=device)
    return t, edge_index.to(device), (mask.to(device) if mask is not None else None)


def call(module, t, edge_index, mask, heads, *, attn="silu", filter_act="silu", vector_cutoff=False,
         reference=False, filters="auto", sender_side=None):
    """The fused (or, with ``reference``, the torch) message on the inputs of :func:`make_inputs`;
    ``filters`` is where the fused path evaluates the radial filters (``CONFIG.filters``);
    ``sender_side`` given: ``CONFIG.sender_side`` and the call declares a symmetric list."""
    from torchmdx.kernels import message_ref

    kw = {}
    if not reference:
        module.CONFIG.filters = filters
        module.CONFIG.sender_side = sender_side or "auto"
        kw["symmetric"] = sender_side is not None
    self_loop = (t.get("dk0"), t.get("dv0"), t["phi0"]) if "phi0" in t else None
    kw.update(edge_mask=mask, self_loop=self_loop, attn_activation=attn, vector_cutoff=vector_cutoff)
    if "rbf" in t:
        fn = module.reference_filtered if reference else module.et_message_filtered
        return fn(t["q"], t["k"], t["v"], t["vec"], t["rbf"], t.get("wk"), t.get("bk"), t.get("wv"), t.get("bv"),
                  t["phi"], t["unit"], edge_index, heads, filter_activation=filter_act, **kw)
    fn = message_ref.et_message if reference else module.et_message
    return fn(t["q"], t["k"], t["v"], t["vec"], t.get("dk"), t.get("dv"), t["phi"], t["unit"], edge_index, heads, **kw)


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def compare(module, t, edge_index, mask, heads, tol, seed=0, **kw):
    """Fused forward and all input gradients vs the reference evaluated in float64."""
    t64 = {name: x.detach().double().requires_grad_(x.requires_grad) for name, x in t.items()}
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # torch.empty is then NaN-filled: unwritten outputs fail
    try:
        m, u = call(module, t, edge_index, mask, heads, **kw)
    finally:
        torch.use_deterministic_algorithms(old)
    mr, ur = call(module, t64, edge_index, mask, heads, reference=True, **kw)
    errors = {"m": rel_err(m, mr), "u": rel_err(u, ur)}
    g = torch.Generator().manual_seed(seed + 7)
    gm = torch.randn(mr.shape, generator=g, dtype=torch.float64)
    gu = torch.randn(ur.shape, generator=g, dtype=torch.float64)
    names = [name for name, x in t.items() if x.requires_grad]
    torch.use_deterministic_algorithms(True)
    try:
        grads = torch.autograd.grad((m, u), [t[x] for x in names], (gm.to(m), gu.to(u)))
    finally:
        torch.use_deterministic_algorithms(old)
    grads_ref = torch.autograd.grad((mr, ur), [t64[x] for x in names], (gm.to(mr), gu.to(ur)))
    for name, a, b in zip(names, grads, grads_ref):
        errors["d" + name] = rel_err(a, b)
    bad = {name: err for name, err in errors.items() if not err <= tol}
    assert not bad, f"relative errors above {tol:g}: {bad} (all: {errors})"
    return errors


# --------------------------------------------------------------------------- interpreter cases
# name -> (make_inputs options, call options, tolerance)
FILTERED_CASES = {
    "filtered_both_std_silu_f64": (dict(), dict(), 1e-11),
    "filtered_both_vcut_tanh_ssp_f64": (dict(), dict(attn="tanh", filter_act="ssp", vector_cutoff=True), 1e-11),
    "filtered_values_mish_vcut_D6_H3_f64": (
        dict(with_dk=False, heads=3, head_dim=6), dict(filter_act="mish", vector_cutoff=True), 1e-11),
    "filtered_keys_sigmoid_f64": (dict(with_dv=False, heads=4, head_dim=4), dict(attn="sigmoid", filter_act="tanh"), 1e-11),
    "filtered_heavy_padding_f64": (dict(padding=40), dict(vector_cutoff=True), 1e-11),
    "filtered_both_std_f32": (dict(dtype=torch.float32, heads=4, head_dim=8, num_rbf=16), dict(), 3e-5),
}
# each filtered case twice: filters in the kernels (tl.dot) and from one matrix product (gemm)
CASES = {
    **{f"{name}_{place}": (make, dict(call, filters=place), tol)
       for name, (make, call, tol) in FILTERED_CASES.items() for place in ("kernel", "gemm")},
    "given_both_sigmoid_nomask_noself_f64": (
        dict(filters="given", masked=False, padding=0, self_loop=False), dict(attn="sigmoid"), 1e-11),
    "given_keys_ssp_f64": (dict(filters="given", with_dv=False), dict(attn="ssp"), 1e-11),
    "given_values_vcut_f64": (dict(filters="given", with_dk=False), dict(vector_cutoff=True), 1e-11),
    "none_filters_H1_f64": (dict(filters="given", with_dk=False, with_dv=False, heads=1), dict(), 1e-11),
    "no_edges_self_loop_f64": (dict(no_edges=True), dict(), 1e-11),
    "given_both_vcut_f32": (dict(dtype=torch.float32, filters="given"), dict(vector_cutoff=True, attn="tanh"), 3e-5),
    # symmetric lists, sender side merged into the receiver kernel
    "merged_gemm_std_f64": (dict(symmetric=True), dict(filters="gemm", sender_side="merged"), 1e-11),
    "merged_kernel_vcut_tanh_ssp_f64": (
        dict(symmetric=True), dict(filters="kernel", sender_side="merged", vector_cutoff=True, attn="tanh",
                                   filter_act="ssp"), 1e-11),
    "merged_values_mish_D6_H3_f64": (
        dict(symmetric=True, with_dk=False, heads=3, head_dim=6, padding=10),
        dict(filters="gemm", sender_side="merged", filter_act="mish"), 1e-11),
    "merged_given_keys_noself_f64": (
        dict(symmetric=True, filters="given", with_dv=False, self_loop=False), dict(sender_side="merged"), 1e-11),
    "merged_none_filters_H1_f64": (
        dict(symmetric=True, filters="given", with_dk=False, with_dv=False, heads=1), dict(sender_side="merged"), 1e-11),
    "merged_no_edges_f64": (dict(symmetric=True, no_edges=True), dict(sender_side="merged"), 1e-11),
    "merged_gemm_f32": (dict(symmetric=True, dtype=torch.float32, heads=4, head_dim=8, num_rbf=16),
                        dict(filters="gemm", sender_side="merged"), 3e-5),
}

# the same symmetric cases with the sender kernel over each atom's own segment (the reverse edges)
CASES.update({name.replace("merged", "reverse"): (make, dict(call, sender_side="reverse"), tol)
              for name, (make, call, tol) in list(CASES.items()) if name.startswith("merged_")})


def case_message(name):
    from torchmdx.kernels import message_triton

    make_opts, call_opts, tol = CASES[name]
    seed = zlib.crc32(name.encode())
    heads = make_opts.get("heads", 2)
    t, edge_index, mask = make_inputs(seed, **make_opts)
    modes, sides = [], []
    apply = message_triton._FusedMessageFunction.apply
    message_triton._FusedMessageFunction.apply = lambda spec, *args: (
        modes.append((spec.dk_mode, spec.dv_mode)) or sides.append((spec.merged, spec.reverse)) or apply(spec, *args))
    try:
        compare(message_triton, t, edge_index, mask, heads, tol, seed=seed, **call_opts)
    finally:
        message_triton._FusedMessageFunction.apply = apply
    expected = (2 if call_opts.get("filters") == "kernel" else 3) if "rbf" in t else 1
    assert modes and all(mode in (0, expected) for pair in modes for mode in pair), f"filter modes run: {modes}"
    side = call_opts.get("sender_side")
    assert sides and all(pair == (side == "merged", side == "reverse") for pair in sides), sides


def case_gemm_backward_twice():
    """The gemm place's backward leaves the saved state as it found it (it recomputes z and
    overwrites only that copy with dL/dz): two backward passes of one graph (retain_graph) give
    the same gradients, bit for bit."""
    from torchmdx.kernels import message_triton

    t, edge_index, mask = make_inputs(41, padding=20)
    m, u = call(message_triton, t, edge_index, mask, 2, filters="gemm")
    loss = m.sum() + (u * u).sum()
    wrt = [t[name] for name in ("q", "k", "v", "vec", "rbf", "phi", "unit", "wk", "bk", "wv", "bv")]
    first = torch.autograd.grad(loss, wrt, retain_graph=True)
    second = torch.autograd.grad(loss, wrt)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def case_merged_needs_symmetric_list():
    """The merged and reverse sender sides really come from the reverse edges: declared on a list
    that is not symmetric, dL/dk, dL/dv, dL/dvec are wrong (while the sorted sender side is right)."""
    from torchmdx.kernels import message_triton

    t, edge_index, mask = make_inputs(31)
    errors = compare(message_triton, t, edge_index, mask, 2, 1e-11, filters="gemm")
    assert max(errors.values()) < 1e-11
    for side in ("merged", "reverse"):
        try:
            compare(message_triton, t, edge_index, mask, 2, 1e-11, filters="gemm", sender_side=side)
        except AssertionError as exc:
            assert "'dk'" in str(exc) and "'dq'" not in str(exc).split("(all")[0], str(exc)
        else:
            raise AssertionError(f"the {side} sender side gave the right gradients on a non-symmetric list")


def case_filter_products():
    """The GEMM place's two filter products (Triton) against torch: z = rbf W^T + b and
    dL/drbf = dL/dz W with masked rows zeroed; odd sizes (tiles are partly outside)."""
    from torchmdx.kernels import message_triton as mt

    g = torch.Generator().manual_seed(13)
    for dtype, tol in ((torch.float64, 1e-13), (torch.float32, 1e-6)):
        e, f, k = 77, 12, 10
        rbf = torch.rand(e, k, generator=g, dtype=torch.float64).to(dtype)
        wk, bk = torch.randn(f, k, generator=g, dtype=torch.float64).to(dtype), torch.randn(f, generator=g, dtype=torch.float64).to(dtype)
        wv, bv = torch.randn(3 * f, k, generator=g, dtype=torch.float64).to(dtype), torch.randn(3 * f, generator=g, dtype=torch.float64).to(dtype)
        z = mt._preactivation(rbf, *mt._stack_filters(wk, bk, wv, bv))
        z_ref = torch.addmm(torch.cat([bk, bv]).double(), rbf.double(), torch.cat([wk, wv]).double().t())
        assert rel_err(z, z_ref) < tol, f"z {dtype}: {rel_err(z, z_ref)}"
        assert rel_err(mt._preactivation(rbf, *mt._stack_filters(None, None, wv, bv)), z_ref[:, f:]) < tol
        gz = torch.randn(e, 4 * f, generator=g, dtype=torch.float64).to(dtype)
        mask = torch.rand(e, generator=g) > 0.3
        grbf = mt._rbf_gradient(gz, mt._stack_filters(wk, bk, wv, bv)[0], mask.view(torch.uint8))
        grbf_ref = torch.where(mask[:, None], gz.double() @ torch.cat([wk, wv]).double(), 0.0)
        assert rel_err(grbf, grbf_ref) < tol, f"dL/drbf {dtype}: {rel_err(grbf, grbf_ref)}"
        assert (grbf[~mask] == 0).all()


def case_double_backward():
    """create_graph=True: the gradients are themselves differentiable (through the reference)
    and their derivatives equal the reference's."""
    from torchmdx.kernels import message_triton

    t, edge_index, mask = make_inputs(11)
    t64 = {name: x.detach().requires_grad_(x.requires_grad) for name, x in t.items()}
    names = ["q", "k", "rbf", "unit", "phi"]
    out = []
    for tensors, reference in ((t, False), (t64, True)):
        m, u = call(message_triton, tensors, edge_index, mask, 2, reference=reference)
        g = torch.autograd.grad((m * m).sum() + (u * u.roll(1, 0)).sum(), [tensors[x] for x in names], create_graph=True)
        s = sum((gi * torch.cos(torch.arange(gi.numel(), dtype=gi.dtype)).view_as(gi)).sum() for gi in g)
        out.append(torch.autograd.grad(s, [tensors[x] for x in ("q", "v", "rbf", "wk", "wv")]))
    for a, b, name in zip(out[0], out[1], ("q", "v", "rbf", "wk", "wv")):
        assert rel_err(a, b) < 1e-11, f"second derivative w.r.t. {name}: {rel_err(a, b)}"


def case_weight_gradients(filters):
    """Filter weights get gradients with loss.backward() (engine runs their nodes) and are
    skipped when only input gradients are asked for; both give the reference's numbers."""
    from torchmdx.kernels import message_triton

    t, edge_index, mask = make_inputs(12)
    t64 = {name: x.detach().requires_grad_(x.requires_grad) for name, x in t.items()}
    m, u = call(message_triton, t, edge_index, mask, 2, filters=filters)
    (m.sum() + (u * u).sum()).backward()
    assert message_triton.LAST_BACKWARD["weight_gradients"] is True
    mr, ur = call(message_triton, t64, edge_index, mask, 2, reference=True)
    (mr.sum() + (ur * ur).sum()).backward()
    for name in ("wk", "bk", "wv", "bv", "dk0", "dv0", "rbf", "q", "k"):
        assert rel_err(t[name].grad, t64[name].grad) < 1e-11, name
    m, u = call(message_triton, t, edge_index, mask, 2, filters=filters)
    (grbf,) = torch.autograd.grad(m.sum() + (u * u).sum(), [t["rbf"]])
    assert message_triton.LAST_BACKWARD["weight_gradients"] is False
    assert rel_err(grbf, t64["rbf"].grad) < 1e-11


def case_model(shared_data):
    """A small float64 ETPotential: the fused path (backend 'triton') gives the reference
    path's energy and forces, with a plain and a fixed-capacity (padded, masked) neighbor list."""
    import numpy as np

    from torchmdx.kernels import message_triton
    from torchmdx.kernels.neighbors_ref import neighbor_list
    from torchmdx.nn import ETPotential

    calls = []
    apply = message_triton._FusedMessageFunction.apply
    message_triton._FusedMessageFunction.apply = lambda spec, *args: calls.append((spec.merged, spec.reverse)) or apply(
        spec, *args)
    data = np.load(Path(shared_data) / "md17" / "md17_ethanol_xtb.npz")
    z = torch.tensor(data["z"], dtype=torch.long)
    pos = torch.tensor(data["R"][0], dtype=torch.float64)
    results = {}
    for sender_side in ("sorted", "merged", "reverse"):  # the model's full lists are symmetric
        message_triton.CONFIG.sender_side = sender_side
        for vector_cutoff, label in ((False, "plain"), (True, "padded")):
            config = dict(embedding_dimension=16, num_layers=2, num_heads=2, num_rbf=8, dtype="float64", seed=3,
                          vector_cutoff=vector_cutoff, cutoff_upper=4.0)
            fused = ETPotential(config, backend="triton").eval()
            ref = ETPotential(config, backend="torch").eval()
            with torch.no_grad():
                for p in ref.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            fused.load_state_dict(ref.state_dict())
            kw = {}
            if label == "padded":
                kw["neighbors"] = neighbor_list(pos, 4.0, max_pairs=z.numel() * (z.numel() - 1) + 5)
            a, b = fused(z, pos, **kw), ref(z, pos, **kw)
            results[(sender_side, vector_cutoff, label)] = (rel_err(a["energy"], b["energy"]),
                                                            rel_err(a["forces"], b["forces"]))
    message_triton.CONFIG.sender_side = "auto"
    message_triton._FusedMessageFunction.apply = apply
    expected = [(False, False)] * 4 + [(True, False)] * 4 + [(False, True)] * 4
    assert calls == expected, f"fused kernel calls (merged, reverse) {calls}, expected one per layer and model"
    bad = {k: v for k, v in results.items() if not max(v) < 1e-11}
    assert not bad, f"energy / force relative errors: {results}"


def case_training():
    """Training on forces (create_graph=True, then loss.backward()) through the fused path gives
    the reference path's forces and parameter gradients: the differentiable backward must not
    double-count paths between its inputs (q depends on rbf through the earlier layer)."""
    from torchmdx.nn import ETPotential

    g = torch.Generator().manual_seed(4)
    z = torch.randint(1, 9, (10,), generator=g)
    pos = 1.5 * torch.randn(10, 3, generator=g, dtype=torch.float64)
    batch = torch.arange(2).repeat_interleave(5)
    config = dict(embedding_dimension=16, num_layers=2, num_heads=2, num_rbf=8, seed=5, dtype="float64")
    results = []
    for backend in ("triton", "torch"):
        model = ETPotential(config, backend=backend).train()
        out = model(z, pos, batch, create_graph=True)
        loss = out["energy"].square().mean() + 10 * out["forces"].square().mean()
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results.append((out["forces"].detach(), grads))
    (forces, grads), (forces_ref, grads_ref) = results
    assert rel_err(forces, forces_ref) < 1e-11, f"forces with create_graph: {rel_err(forces, forces_ref)}"
    assert set(grads) == set(grads_ref)
    bad = {name: rel_err(grads[name], grads_ref[name]) for name in grads_ref
           if not rel_err(grads[name], grads_ref[name]) < 1e-10}
    assert not bad, f"parameter gradients differ: {bad}"


def run_interpreter_cases(out_path, shared_data):
    """Subprocess entry: run every case, write {case: None | error text}."""
    cases = [(name, lambda name=name: case_message(name)) for name in CASES]
    cases += [("filter_products", case_filter_products), ("double_backward", case_double_backward),
              ("weight_gradients_kernel", lambda: case_weight_gradients("kernel")),
              ("weight_gradients_gemm", lambda: case_weight_gradients("gemm")),
              ("merged_needs_symmetric_list", case_merged_needs_symmetric_list),
              ("gemm_backward_twice", case_gemm_backward_twice),
              ("model", lambda: case_model(shared_data)), ("training", case_training)]
    write_case_results(out_path, cases)


def write_case_results(out_path, cases):
    """Run each (name, function) and write {name: None | error text} as JSON to ``out_path``."""
    import traceback

    results = {}
    for name, fn in cases:
        try:
            fn()
            results[name] = None
        except Exception:  # noqa: BLE001 - reported to the parent test
            results[name] = traceback.format_exc(limit=4)
    Path(out_path).write_text(json.dumps(results))


def interpreter_subprocess(test_file, out_dir: Path, shared_data) -> dict:
    """Run ``test_file``'s ``__main__`` (its interpreter cases) in a subprocess with
    TRITON_INTERPRET=1 and return its {case: None | error text}."""
    pytest.importorskip("triton")
    out = out_dir / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(test_file), str(out), str(shared_data)], env=env, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"interpreter subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory, shared_data):
    return interpreter_subprocess(__file__, tmp_path_factory.mktemp("message_triton"), shared_data)


@pytest.mark.parametrize("name", list(CASES) + ["filter_products", "double_backward", "weight_gradients_kernel", "weight_gradients_gemm",
                                  "merged_needs_symmetric_list", "gemm_backward_twice", "model", "training"])
def test_interpreter(interpreter_results, name):
    error = interpreter_results[name]
    assert error is None, error


def test_segment_ends_skip_trailing_masked_rows():
    """EdgeLayout's segments (receiver order and sender order) end after their last valid row,
    checked against a brute-force scan on random sorted edge lists with random masks."""
    pytest.importorskip("triton")
    from torchmdx.kernels.message_triton import EdgeLayout

    g = torch.Generator().manual_seed(0)
    cases = []
    for _ in range(100):
        n = int(torch.randint(1, 8, (1,), generator=g))
        e = int(torch.randint(0, 30, (1,), generator=g))
        i = torch.sort(torch.randint(0, n, (e,), generator=g)).values
        cases.append((n, i, torch.randint(0, n, (e,), generator=g), torch.rand(e, generator=g) > 0.4))
    # a capacity-padded list (12 padding rows i = j = N - 1, masked, after the last atom's own rows),
    # every row masked, every row valid
    i = torch.tensor([0, 0, 1, 2, 2, 2, 4] + [4] * 12)
    j = torch.tensor([1, 2, 0, 0, 1, 4, 2] + [4] * 12)
    padded = torch.tensor([True] * 7 + [False] * 12)
    cases += [(5, i, j, padded), (5, i, j, torch.zeros_like(padded)), (5, i, j, torch.ones_like(padded))]
    for n, i, j, mask in cases:
        e = len(i)
        layout = EdgeLayout(torch.stack([i, j]), n, mask)
        colptr, colend, perm = layout.sender_order()
        for a in range(n):
            rows = [x for x in range(e) if i[x] == a]
            valid = [x for x in rows if mask[x]]
            assert int(layout.rowptr[a]) == (rows[0] if rows else int(layout.rowptr[a]))
            assert int(layout.rowend[a]) == (valid[-1] + 1 if valid else int(layout.rowptr[a]))
            sent = [t for t in range(e) if j[perm[t]] == a]
            assert sent == list(range(int(colptr[a]), int(colptr[a + 1])))
            valid = [t for t in sent if mask[perm[t]]]
            assert int(colend[a]) == (valid[-1] + 1 if valid else int(colptr[a]))


def test_cpu_without_interpreter_uses_reference():
    """In this (non-interpreted) process CPU tensors take the reference path: same numbers."""
    pytest.importorskip("triton")
    from torchmdx.kernels import message_triton

    if message_triton.interpreted():
        pytest.skip("this process runs the Triton interpreter")
    t, edge_index, mask = make_inputs(5)
    assert not message_triton.supported(t["q"])
    m, u = call(message_triton, t, edge_index, mask, 2)
    mr, ur = call(message_triton, t, edge_index, mask, 2, reference=True)
    assert torch.equal(m, mr) and torch.equal(u, ur)


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("filters,vector_cutoff,attn", [("kernel", False, "silu"), ("kernel", True, "tanh"),
                                                        ("gemm", False, "silu"), ("gemm", True, "tanh"),
                                                        ("given", False, "ssp")])
def test_gpu_random(dtype, tol, filters, vector_cutoff, attn):
    from torchmdx.kernels import message_triton

    t, edge_index, mask = make_inputs(21, atoms=300, heads=8, head_dim=16, num_rbf=32, degree=40, dtype=dtype,
                                      device="cuda", filters="given" if filters == "given" else "filtered",
                                      padding=50, empty_atom=7)
    place = "auto" if filters == "given" else filters
    errors = compare(message_triton, t, edge_index, mask, 8, tol, attn=attn, vector_cutoff=vector_cutoff, filters=place)
    print(dtype, filters, vector_cutoff, attn, {k: f"{v:.1e}" for k, v in errors.items()})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("filters,block_edges,num_warps,side", [("gemm", 16, 4, "merged"), ("gemm", 8, 4, "merged"),
                                                                 ("kernel", 16, 4, "merged"), ("gemm", 8, 4, "reverse"),
                                                                 ("kernel", 16, 4, "reverse"), ("gemm", 4, 1, "merged"),
                                                                 ("gemm", 8, 2, "reverse")])
def test_gpu_random_merged_sender_side(dtype, tol, filters, block_edges, num_warps, side):
    """The sender side from the reverse edges on a symmetric list (300 atoms, with periodic-image
    and self-image edges), merged into the receiver kernel or in a sender kernel of its own,
    against the reference, at the launch shapes the benchmark sweeps."""
    from dataclasses import replace

    from torchmdx.kernels import message_triton

    t, edge_index, mask = make_inputs(24, atoms=300, heads=8, head_dim=16, num_rbf=32, degree=20, dtype=dtype,
                                      device="cuda", padding=50, empty_atom=7, symmetric=True)
    old = message_triton.CONFIG
    message_triton.CONFIG = replace(old, block_edges=block_edges, num_warps=num_warps)
    try:
        errors = compare(message_triton, t, edge_index, mask, 8, tol, filters=filters, sender_side=side,
                         vector_cutoff=True)
    finally:
        message_triton.CONFIG = old
    print(dtype, filters, block_edges, num_warps, side, {k: f"{v:.1e}" for k, v in errors.items()})


@pytest.mark.gpu
def test_gpu_deterministic_and_graph_capture():
    """Two runs are bitwise equal (segment sums, no atomics), and forward + backward captured in
    a CUDA graph (no host synchronisation inside) replay to the eager numbers on new inputs."""
    from torchmdx.kernels import message_triton

    t, edge_index, mask = make_inputs(22, atoms=200, heads=8, head_dim=16, num_rbf=32, degree=30,
                                      dtype=torch.float32, device="cuda", padding=20)
    names = ["q", "k", "v", "vec", "rbf", "phi", "unit"]

    def step(tensors):
        m, u = call(message_triton, tensors, edge_index, mask, 8)
        return (m, u) + torch.autograd.grad(m.square().sum() + u.square().sum(), [tensors[x] for x in names])

    first, second = step(t), step(t)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    static = {name: x.detach().clone().requires_grad_(x.requires_grad) for name, x in t.items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(static)
    g = torch.Generator(device="cuda").manual_seed(23)
    new = {name: (x.detach() + 0.1 * torch.randn(x.shape, device="cuda", generator=g)).requires_grad_(x.requires_grad)
           for name, x in t.items()}
    with torch.no_grad():
        for name in static:
            static[name].copy_(new[name])
    graph.replay()
    eager = step(new)
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


def random_molecule(atoms=120, device="cuda"):
    """(z, pos float64) of ``atoms`` random H/C/N/O atoms in an 11 Å box, no pair closer than 1 Å."""
    import numpy as np

    rng = np.random.default_rng(0)
    pos = []
    while len(pos) < atoms:
        p = rng.uniform(0, 11, 3)
        if all(np.linalg.norm(p - x) > 1.0 for x in pos):
            pos.append(p)
    return torch.tensor(rng.choice([1, 6, 7, 8], len(pos)), device=device), torch.tensor(np.array(pos), device=device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_gpu_model_energy_forces(dtype, tol):
    """ET-MD17 hyper-parameters on a 120-atom random molecule: fused path vs reference path
    (the reference evaluated in float64 for the float32 run)."""
    from torchmdx.nn import ETPotential

    z, pos = random_molecule()
    config = dict(dtype="float64", seed=0, vector_cutoff=True)
    ref = ETPotential(config, backend="torch").cuda()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fused = ETPotential({**config, "dtype": "float32" if dtype == torch.float32 else "float64"}, backend="triton").cuda()
    fused.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in ref.state_dict().items()})
    a, b = fused(z, pos.to(dtype)), ref(z, pos)
    e_err, f_err = rel_err(a["energy"], b["energy"]), rel_err(a["forces"], b["forces"])
    print(dtype, "energy", e_err, "forces", f_err)
    assert e_err < tol and f_err < tol


if __name__ == "__main__":
    torch.set_num_threads(1)  # this subprocess only: tiny tensors, shared CPU cores
    __import__("interpreter_speedup").install()  # tests/interpreter_speedup.py
    run_interpreter_cases(sys.argv[1], sys.argv[2])
