"""One ET layer's message step alone, on the edges of a benchmark system (``bench_model.py --kernels``).

- :func:`kernel_inputs`: one ET-MD17 layer's message inputs on a system's edges (random features,
  edge features from the geometry), cached per system;
- :func:`message_call`: the message step by variant label (``ref``, ``fused``, ``fused_kernel``,
  ``fused_gemm``, ``_merged``, ``fused_table``, ``given``, ``given_leaf``, ``nofilter``);
- :func:`kernel_step`: ms of forward and forward + backward per label, peak memory, GPU kernel time,
  and optionally the error against a float64 reference (used by ``--sweep``, ``model_sweep.py``);
- :func:`bench_kernels`: the ``--kernels`` row (labels :data:`KERNEL_LABELS`) with lower bounds.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import torch

import gpu_timing
from gpu_timing import cuda_time, error_text, gpu_busy_ms, peak_mib
from model_setup import read_xyz


_KERNEL_INPUTS = {}


def kernel_inputs(name, data_dir):
    """One ET-MD17 layer's message inputs on the edges of ``name`` (cached per system): random
    atom features and filter weights; edge features from the geometry (unit vectors, Gaussian
    RBF rows and a cosine cutoff of the distance), so the list is symmetric as the model's are
    (the merged sender side needs that)."""
    from torchmdx.kernels.neighbors import neighbor_list

    if name not in _KERNEL_INPUTS:
        z_np, pos_np, _, _ = read_xyz(data_dir / f"{name}.xyz")
        pos = torch.tensor(pos_np, dtype=torch.float32, device=gpu_timing.DEVICE)
        nb = neighbor_list(pos, 5.0)
        n, f, k = len(z_np), 128, 32
        g = torch.Generator(device=gpu_timing.DEVICE).manual_seed(0)

        def r(*shape, scale=1.0):
            return (scale * torch.randn(*shape, device=gpu_timing.DEVICE, generator=g)).requires_grad_(True)

        distance = nb.distances.float()
        unit = (nb.vectors.float() / distance[:, None]).requires_grad_(True)
        rbf = gaussian_rbf(distance, k).requires_grad_(True)
        phi = (0.5 * (torch.cos(distance * math.pi / 5.0) + 1.0)).requires_grad_(True)
        t = dict(q=r(n, f), k=r(n, f), v=r(n, 3 * f), vec=r(n, 3, f), rbf=rbf, r=distance.clone().requires_grad_(True),
                 wk=r(f, k, scale=k ** -0.5), bk=r(f, scale=0.1), wv=r(3 * f, k, scale=k ** -0.5), bv=r(3 * f, scale=0.1),
                 phi=phi, unit=unit, dk0=r(f), dv0=r(3 * f))
        with torch.no_grad():
            t["dk"] = torch.nn.functional.silu(torch.nn.functional.linear(t["rbf"], t["wk"], t["bk"])).requires_grad_(True)
            t["dv"] = torch.nn.functional.silu(torch.nn.functional.linear(t["rbf"], t["wv"], t["bv"])).requires_grad_(True)
        _KERNEL_INPUTS[name] = (t, nb.edge_index, n, nb.edge_index.shape[1])
    return _KERNEL_INPUTS[name]


#: the edge features of :func:`kernel_inputs`: Gaussian RBFs on [0, CUTOFF] Å, cosine cutoff
CUTOFF = 5.0


def gaussian_rbf(distance, k=32):
    """exp(-4 (r - c_j)^2) for k centres c_j evenly on [0, CUTOFF] Å: the RBF rows of :func:`kernel_inputs`."""
    centres = torch.linspace(0.0, CUTOFF, k, device=distance.device, dtype=distance.dtype)
    return torch.exp(-4.0 * (distance[:, None] - centres) ** 2)


_TABLES = {}


def filter_tables(t):
    """(key table, value table) of the filters act(rbf(r) W^T + b) of ``t``'s weights, tabulated in r on
    [0, CUTOFF] (:mod:`torchmdx.kernels.filter_table`; the place frozen models run), cached per weights."""
    from torchmdx.kernels.filter_table import build_filter_table

    key = (t["wk"].data_ptr(), t["wv"].data_ptr(), t["wk"].dtype)
    if key not in _TABLES:
        def table(w, b):
            w64, b64 = w.detach().double(), b.detach().double()
            fn = lambda r: torch.nn.functional.silu(gaussian_rbf(r, w.shape[1]) @ w64.t() + b64)  # noqa: E731
            return build_filter_table(fn, 0.0, CUTOFF, dtype=w.dtype, device=w.device)

        _TABLES[key] = (table(t["wk"], t["bk"]), table(t["wv"], t["bv"]))
    return _TABLES[key]


def message_call(t, edge_index, label):
    """One layer's message step on the inputs ``t``. ``label``: ``ref`` (torch reference),
    ``fused`` (the default ``message_triton.CONFIG``), ``fused_kernel`` (filters
    evaluated inside the kernels from the RBF rows with tl.dot), ``fused_gemm`` (filters from
    one matrix product before the kernels, which apply the activation), a suffix ``_merged``
    (the sender side inside the receiver kernel, ``CONFIG.sender_side``), ``given`` (filters
    act(rbf W^T + b) by torch / cuBLAS, then the kernels with given dk / dv), ``given_leaf``
    (the kernels alone on given dk / dv that are leaves), ``nofilter`` (no distance
    influence: the gathers and attention without filters, a lower bound of the kernels),
    ``fused_table`` (the filters interpolated from tables in the edge length, :func:`filter_tables`: what
    frozen models run; the other ``CONFIG`` fields as set), ``ref_table`` (its torch reference: the RBF
    rows computed from ``t['r']``, so dL/dr is exact)."""
    from torchmdx.kernels import message_triton

    self_loop = (t["dk0"], t["dv0"], torch.ones((), device=t["q"].device))
    rest = (t["phi"], t["unit"], edge_index, 8)
    if label == "fused_table":
        key_table, value_table = filter_tables(t)
        old = message_triton.CONFIG
        message_triton.CONFIG = replace(old, filters="table")
        try:
            return message_triton.FusedMessage(symmetric=True).tabulated(
                t["q"], t["k"], t["v"], t["vec"], t["r"], key_table, value_table, *rest, self_loop=self_loop,
                vector_cutoff=True)
        finally:
            message_triton.CONFIG = old
    if label == "ref_table":  # the reference of fused_table: the filters from the RBF rows of the lengths r
        rbf = gaussian_rbf(t["r"], t["wk"].shape[1])
        return message_triton.reference_filtered(t["q"], t["k"], t["v"], t["vec"], rbf, t["wk"], t["bk"], t["wv"],
                                                 t["bv"], *rest, self_loop=self_loop, vector_cutoff=True)
    if label == "ref" or label.startswith("fused"):
        old = message_triton.CONFIG
        parts = label.split("_")[1:]
        message_triton.CONFIG = replace(old, **({"filters": parts[0]} if parts and parts[0] != "merged" else {}),
                                        **({"sender_side": "merged"} if "merged" in parts else {}))
        try:
            if label == "ref":
                return message_triton.reference_filtered(t["q"], t["k"], t["v"], t["vec"], t["rbf"], t["wk"], t["bk"],
                                                         t["wv"], t["bv"], *rest, self_loop=self_loop, vector_cutoff=True)
            return message_triton.et_message_filtered(t["q"], t["k"], t["v"], t["vec"], t["rbf"], t["wk"], t["bk"],
                                                      t["wv"], t["bv"], *rest, self_loop=self_loop, vector_cutoff=True,
                                                      symmetric=True)
        finally:
            message_triton.CONFIG = old
    if label == "given":
        dk = torch.nn.functional.silu(torch.nn.functional.linear(t["rbf"], t["wk"], t["bk"]))
        dv = torch.nn.functional.silu(torch.nn.functional.linear(t["rbf"], t["wv"], t["bv"]))
    elif label == "given_leaf":
        dk, dv = t["dk"], t["dv"]
    else:
        dk = dv = None
        self_loop = (None, None, self_loop[2])
    return message_triton.et_message(t["q"], t["k"], t["v"], t["vec"], dk, dv, *rest, self_loop=self_loop,
                                     vector_cutoff=True)


GRAD_INPUTS = ("q", "k", "v", "vec", "rbf", "phi", "unit")
GRAD_INPUTS_GIVEN = ("q", "k", "v", "vec", "dk", "dv", "phi", "unit")
GRAD_INPUTS_NOFILTER = ("q", "k", "v", "vec", "phi", "unit")
GRAD_INPUTS_TABLE = ("q", "k", "v", "vec", "r", "phi", "unit")


def grad_inputs(label):
    """The inputs a force evaluation differentiates for the message variant ``label``."""
    return {"given_leaf": GRAD_INPUTS_GIVEN, "nofilter": GRAD_INPUTS_NOFILTER,
            "fused_table": GRAD_INPUTS_TABLE}.get(label, GRAD_INPUTS)


_REFERENCE64 = {}


def kernel_step(name, data_dir, check=False, labels=("fused",)):
    """ms of one layer's message step (forward; forward + backward for forces) on ``name``."""
    t, edge_index, n, e = kernel_inputs(name, data_dir)
    row = {"atoms": n, "edges": e}
    for label in labels:
        wrt = grad_inputs(label)

        def forward():
            with torch.no_grad():
                return message_call(t, edge_index, label)

        def forward_backward():
            m, u = message_call(t, edge_index, label)
            return torch.autograd.grad(m.sum() + u.square().sum(), [t[x] for x in wrt])

        try:
            row[f"{label}_fwd_ms"] = round(cuda_time(forward, 3, 20), 3)
            row[f"{label}_fwd_bwd_ms"] = round(cuda_time(forward_backward, 3, 20), 3)
            row[f"{label}_fwd_bwd_peak_MiB"] = round(peak_mib(forward_backward), 1)
            busy, per_kernel = gpu_busy_ms(forward_backward)
            row[f"{label}_fwd_bwd_gpu_ms"] = round(busy, 3)
            row[f"{label}_fwd_bwd_top"] = {k: round(v, 3) for k, v in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:6]}
        except Exception as exc:  # noqa: BLE001
            row[f"{label}_error"] = error_text(exc)
    if check:  # the error of the first label's place: fused_table against ref_table, else fused against ref
        label, reference = ("fused_table", "ref_table") if labels[0] == "fused_table" else ("fused", "ref")
        wrt = grad_inputs(label)
        m, u = message_call(t, edge_index, label)
        grads = torch.autograd.grad(m.sum() + u.square().sum(), [t[x] for x in wrt])
        if (name, reference) not in _REFERENCE64:  # the same inputs for every variant: one float64 reference each
            t64 = {k: v.detach().double().requires_grad_(True) for k, v in t.items()}
            m64, u64 = message_call(t64, edge_index, reference)
            grads64 = torch.autograd.grad(m64.sum() + u64.square().sum(), [t64[x] for x in wrt])
            _REFERENCE64[(name, reference)] = tuple(x.detach() for x in (m64, u64) + grads64)
            del t64, m64, u64, grads64
        errs = [float((a.detach().double() - b).norm() / b.norm())
                for a, b in zip((m, u) + grads, _REFERENCE64[(name, reference)])]
        row["max_rel_err_vs_f64"] = max(errs)
    return row


#: the message-step variants of ``--kernels`` (see :func:`message_call`; env BENCH_KERNEL_LABELS)
KERNEL_LABELS = tuple(os.environ.get("BENCH_KERNEL_LABELS",
                                     "ref,fused_kernel,fused_gemm,fused_gemm_merged,fused_table,given_leaf,nofilter").split(","))


def bench_kernels(name, data_dir, results):
    """One layer's message step alone on the edges of ``name`` (random features), reference vs fused."""
    row = kernel_step(name, data_dir, labels=KERNEL_LABELS)
    e = row["edges"]
    # lower bounds per layer (docs/kernels_message.md): filter flops of the 4 passes that evaluate
    # or differentiate W e(r) (forward, receiver backward x2, sender backward); gathered bytes
    row["filter_gflop_fwd_bwd"] = round(4 * 2 * e * 32 * 4 * 128 / 1e9, 2)
    row["gather_MB_fwd_bwd"] = round(e * (7 + 7 + 5) * 128 * 4 / 1e6, 1)
    results.setdefault("kernels", {})[name] = row
    print("kernels", name, row, flush=True)
