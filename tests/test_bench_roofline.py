"""bench/roofline.py on the CPU: the FLOP model against a count of a real evaluation, the byte
model against a hand count, the bound classification, the profiler adapter and the printer.

The FLOP check runs the ET message of a tiny graph (forward, and the receiver / sender
backward kernels' work) with scalars that count their own operations; the counted code is
checked against the torch reference (forward) and autograd (every gradient), so the count is
of a real evaluation, and the per-edge counts must equal the module's coefficients.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import roofline  # noqa: E402


# --------------------------------------------------------------------------- counted scalars
class Counted:
    """A float that counts +, -, *, / and exp (one each; negation free) in ``Counted.ops``."""

    ops = 0

    def __init__(self, v):
        self.v = float(v)

    @staticmethod
    def _v(x):
        return x.v if isinstance(x, Counted) else float(x)

    def _op(self, value):
        Counted.ops += 1
        return Counted(value)

    def __add__(self, o):
        return self._op(self.v + self._v(o))

    __radd__ = __add__

    def __sub__(self, o):
        return self._op(self.v - self._v(o))

    def __rsub__(self, o):
        return self._op(self._v(o) - self.v)

    def __mul__(self, o):
        return self._op(self.v * self._v(o))

    __rmul__ = __mul__

    def __truediv__(self, o):
        return self._op(self.v / self._v(o))

    def __rtruediv__(self, o):
        return self._op(self._v(o) / self.v)

    def __neg__(self):
        return Counted(-self.v)

    def exp(self):
        return self._op(math.exp(self.v))


def silu(x, derivative=False):
    s = 1.0 / (1.0 + (-x).exp())
    y = x * s
    return (y, s * (1.0 + x * (1.0 - s))) if derivative else y


def total(terms):
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def counted(fn):
    Counted.ops = 0
    result = fn()
    return result, Counted.ops


def tiny_inputs(seed=0, n=4, f=6, heads=2):
    g = torch.Generator().manual_seed(seed)
    edges = [(0, 1), (0, 2), (1, 0), (1, 3), (2, 0), (2, 3), (3, 1), (3, 2)]  # sorted by receiver
    e = len(edges)
    t = dict(q=torch.randn(n, f, generator=g), k=torch.randn(n, f, generator=g), v=torch.randn(n, 3 * f, generator=g),
             vec=torch.randn(n, 3, f, generator=g), z=torch.randn(e, 4 * f, generator=g),
             phi=torch.rand(e, generator=g), unit=torch.nn.functional.normalize(torch.randn(e, 3, generator=g), dim=-1))
    t = {k: x.double().requires_grad_(True) for k, x in t.items()}
    gm, gu = torch.randn(n, f, generator=g).double(), torch.randn(n, 3, f, generator=g).double()
    return t, torch.tensor(edges).t(), heads, gm, gu


def channel(h, c, block, d):
    """Index of channel c of head h in block ``block`` (0: s1, 1: s2, 2: s3) of a [3F] row."""
    return h * 3 * d + block * d + c


class Edge:
    """Counted per-edge work of the three message kernels (module docstring of bench/roofline.py)."""

    def __init__(self, t, e, i, j, heads, gm=None, gu=None):
        C = Counted
        f = t["q"].shape[1]
        self.f, self.h, self.d = f, heads, f // heads
        row = lambda x: [C(float(v)) for v in x.detach()]  # noqa: E731
        self.q, self.k, self.v = row(t["q"][i]), row(t["k"][j]), row(t["v"][j])
        self.vec = [row(t["vec"][j, x]) for x in range(3)]
        self.z = row(t["z"][e])
        self.phi = C(float(t["phi"][e].detach()))
        self.dd = row(t["unit"][e])
        if gm is not None:
            self.gm, self.gu = row(gm[i]), [row(gu[i, x]) for x in range(3)]

    def heads_of(self):
        return [[h * self.d + c for c in range(self.d)] for h in range(self.h)]

    def forward(self, m, u):
        f, d = self.f, self.d
        act = [silu(x) for x in self.z]
        dk, dv = act[:f], act[f:]
        p = [total([self.q[c] * self.k[c] * dk[c] for c in chans]) for chans in self.heads_of()]
        a = [silu(x) for x in p]
        s = [self.v[c] * dv[c] * self.phi for c in range(3 * f)]
        for h in range(self.h):
            for c in range(d):
                ch = h * d + c
                m[ch] = m[ch] + a[h] * s[channel(h, c, 0, d)]
                for x in range(3):
                    u[x][ch] = u[x][ch] + (self.vec[x][ch] * s[channel(h, c, 1, d)] + s[channel(h, c, 2, d)] * self.dd[x])

    def _attention(self, filters_derivative):
        f = self.f
        pairs = [silu(x, filters_derivative) for x in self.z]
        if filters_derivative:
            act, dact = [y for y, _ in pairs], [dy for _, dy in pairs]
        else:
            act, dact = pairs, None
        dk, dv = act[:f], act[f:]
        p = [total([self.q[c] * self.k[c] * dk[c] for c in chans]) for chans in self.heads_of()]
        aa = [silu(x, True) for x in p]
        vd = [self.v[c] * dv[c] for c in range(3 * f)]
        s = [x * self.phi for x in vd]
        return dk, dv, dact, [y for y, _ in aa], [dy for _, dy in aa], vd, s

    def _upstream(self, a, s):
        d = self.d
        gA = [total([self.gm[ch] * s[channel(h, ch - h * d, 0, d)] for ch in chans]) for h, chans in enumerate(self.heads_of())]
        gs = [None] * (3 * self.f)
        for h, chans in enumerate(self.heads_of()):
            for ch in chans:
                c = ch - h * d
                gs[channel(h, c, 0, d)] = self.gm[ch] * a[h]
                gs[channel(h, c, 1, d)] = total([self.gu[x][ch] * self.vec[x][ch] for x in range(3)])
                gs[channel(h, c, 2, d)] = total([self.gu[x][ch] * self.dd[x] for x in range(3)])
        return gA, gs

    def receiver(self, gq):
        """dL/dq_i (accumulated), dL/dz [4F], dL/dphi, dL/dd [3] of this edge."""
        f, d = self.f, self.d
        dk, dv, dact, a, da, vd, s = self._attention(True)
        gA, gs = self._upstream(a, s)
        gd = [total([self.gu[x][h * d + c] * s[channel(h, c, 2, d)] for h in range(self.h) for c in range(d)])
              for x in range(3)]
        gp = [gA[h] * da[h] for h in range(self.h)]
        gz = [None] * (4 * f)
        for h, chans in enumerate(self.heads_of()):
            for ch in chans:
                gq[ch] = gq[ch] + gp[h] * self.k[ch] * dk[ch]
                gz[ch] = gp[h] * self.q[ch] * self.k[ch] * dact[ch]
        for c in range(3 * f):
            gz[f + c] = gs[c] * self.v[c] * self.phi * dact[f + c]
        gphi = total([gs[c] * vd[c] for c in range(3 * f)])
        return gz, gphi, gd

    def sender(self, gk, gv, gvec):
        """dL/dk_j, dL/dv_j, dL/dvec_j (accumulated) from this edge."""
        f, d = self.f, self.d
        dk, dv, _, a, da, vd, s = self._attention(False)
        gA, gs = self._upstream(a, s)
        gp = [gA[h] * da[h] for h in range(self.h)]
        for h, chans in enumerate(self.heads_of()):
            for ch in chans:
                gk[ch] = gk[ch] + gp[h] * self.q[ch] * dk[ch]
        for c in range(3 * f):
            gv[c] = gv[c] + gs[c] * dv[c] * self.phi
        for h, chans in enumerate(self.heads_of()):
            for ch in chans:
                for x in range(3):
                    gvec[x][ch] = gvec[x][ch] + self.gu[x][ch] * s[channel(h, ch - h * d, 1, d)]


def values(rows):
    return torch.tensor([[x.v if isinstance(x, Counted) else x for x in r] for r in rows], dtype=torch.float64)


def test_forward_flops_equal_a_counted_evaluation():
    from torchmdx.kernels import message_ref

    t, edge_index, heads, _, _ = tiny_inputs()
    n, f = t["q"].shape
    e = edge_index.shape[1]
    m = [[Counted(0.0)] * f for _ in range(n)]
    u = [[[Counted(0.0)] * f for _ in range(3)] for _ in range(n)]
    _, ops = counted(lambda: [Edge(t, k, int(edge_index[0, k]), int(edge_index[1, k]), heads).forward(m[int(edge_index[0, k])],
                                                                                                       u[int(edge_index[0, k])])
                              for k in range(e)])
    dk, dv = torch.nn.functional.silu(t["z"][:, :f]), torch.nn.functional.silu(t["z"][:, f:])
    m_ref, u_ref = message_ref.et_message(t["q"], t["k"], t["v"], t["vec"], dk, dv, t["phi"], t["unit"], edge_index, heads,
                                          vector_cutoff=True)
    assert torch.allclose(values(m), m_ref, atol=1e-12)
    assert torch.allclose(torch.stack([values(x) for x in u]), u_ref, atol=1e-12)
    assert ops == e * roofline.per_edge_flops("forward", f, heads) == e * (39 * f + 3 * heads)


def test_backward_flops_equal_a_counted_evaluation():
    from torchmdx.kernels import message_ref

    t, edge_index, heads, gm, gu = tiny_inputs(1)
    n, f = t["q"].shape
    e = edge_index.shape[1]
    dk, dv = torch.nn.functional.silu(t["z"][:, :f]), torch.nn.functional.silu(t["z"][:, f:])
    m_ref, u_ref = message_ref.et_message(t["q"], t["k"], t["v"], t["vec"], dk, dv, t["phi"], t["unit"], edge_index, heads,
                                          vector_cutoff=True)
    names = ("q", "k", "v", "vec", "z", "phi", "unit")
    ref = dict(zip(names, torch.autograd.grad((m_ref, u_ref), [t[x] for x in names], (gm, gu))))
    edges = [Edge(t, k, int(edge_index[0, k]), int(edge_index[1, k]), heads, gm, gu) for k in range(e)]
    gq = [[Counted(0.0)] * f for _ in range(n)]
    rec, rec_ops = counted(lambda: [edges[k].receiver(gq[int(edge_index[0, k])]) for k in range(e)])
    gk = [[Counted(0.0)] * f for _ in range(n)]
    gv = [[Counted(0.0)] * (3 * f) for _ in range(n)]
    gvec = [[[Counted(0.0)] * f for _ in range(3)] for _ in range(n)]
    _, snd_ops = counted(lambda: [edges[k].sender(gk[int(edge_index[1, k])], gv[int(edge_index[1, k])],
                                                  gvec[int(edge_index[1, k])]) for k in range(e)])
    close = lambda a, b: torch.allclose(a, b, atol=1e-11)  # noqa: E731
    assert close(values(gq), ref["q"]) and close(values(gk), ref["k"]) and close(values(gv), ref["v"])
    assert close(torch.stack([values(x) for x in gvec]), ref["vec"])
    assert close(values([r[0] for r in rec]), ref["z"])
    assert close(torch.tensor([r[1].v for r in rec], dtype=torch.float64), ref["phi"])
    assert close(values([r[2] for r in rec]), ref["unit"])
    assert rec_ops == e * roofline.per_edge_flops("receiver", f, heads) == e * (81 * f + 7 * heads - 4)
    assert snd_ops == e * roofline.per_edge_flops("sender", f, heads) == e * (56 * f + 7 * heads)
    # merged: one kernel does both; the filter values (4 FLOPs x 4F) are evaluated once
    assert roofline.per_edge_flops("merged", f, heads) == rec_ops // e + snd_ops // e - 16 * f


def test_message_work_hand_count():
    """N = 10 atoms, E = 40 edges, F = 8, H = 2, K = 4, chunks of 4 channels (C = 2); the
    counts written out by hand from the module docstring's formulas."""
    shape = roofline.MessageShape(atoms=10, edges=40, features=8, heads=2, rbf=4, layers=1, chunk_channels=4)
    assert shape.chunks == 2
    w = roofline.message_work(shape)
    assert set(w) == {"_message_fwd_kernel", "_message_bwd_receiver_kernel", "_message_bwd_sender_kernel",
                      "_filter_preact_kernel", "_filter_rbf_grad_kernel"}
    # FLOPs: (E + N) per-edge terms; forward 39*8 + 3*2 = 318
    assert w["_message_fwd_kernel"].flops == 50 * 318
    assert w["_message_bwd_receiver_kernel"].flops == 50 * (81 * 8 + 14 - 4)
    assert w["_message_bwd_sender_kernel"].flops == 50 * (56 * 8 + 14)
    # filter products: 2 * 40 * 4 * 32 = 10240 (+ bias 40 * 32 = 1280); tf32x3 executes 3x the product
    assert w["_filter_preact_kernel"].flops == 10240 + 1280 and w["_filter_preact_kernel"].executed == 3 * 10240 + 1280
    assert w["_filter_preact_kernel"].unit == "tf32" and w["_message_fwd_kernel"].unit == "fp32"
    assert w["_filter_rbf_grad_kernel"].flops == 10240
    # bytes: forward 40 * (16*8 + 25) + 10 * (48*8 + 16) = 6120 + 4000
    assert w["_message_fwd_kernel"].bytes == 6120 + 4000
    assert w["_message_fwd_kernel"].issued_bytes == 10120 + 40 * 28 * 8
    # receiver 40 * (32*8 + 25 + 16*2) + 10 * (76*8 + 16) = 12520 + 6240
    assert w["_message_bwd_receiver_kernel"].bytes == 12520 + 6240
    # sender 40 * (16*8 + 33) + 10 * (76*8 + 16) = 6440 + 6240
    assert w["_message_bwd_sender_kernel"].bytes == 6440 + 6240
    # preact 40 * (16 + 128) + 16*8*4 + 16*8 = 5760 + 512 + 128; rbf grad 40 * (128 + 16 + 1) + 512
    assert w["_filter_preact_kernel"].bytes == 6400 and w["_filter_rbf_grad_kernel"].bytes == 5800 + 512

    merged = roofline.message_work(roofline.MessageShape(10, 40, 8, 2, 4, 1, chunk_channels=4, sender_side="merged"))
    assert "_message_bwd_sender_kernel" not in merged
    assert merged["_message_bwd_receiver_kernel"].flops == 50 * (121 * 8 + 28 - 4)
    assert merged["_message_bwd_receiver_kernel"].bytes == 12520 + 6240 + 10 * 28 * 8
    # reverse: the sender kernel walks the receiver segments, no permutation index (8 B per edge) read
    reverse = roofline.message_work(roofline.MessageShape(10, 40, 8, 2, 4, 1, chunk_channels=4, sender_side="reverse"))
    assert reverse["_message_bwd_receiver_kernel"].bytes == w["_message_bwd_receiver_kernel"].bytes
    assert reverse["_message_bwd_sender_kernel"].flops == w["_message_bwd_sender_kernel"].flops
    assert reverse["_message_bwd_sender_kernel"].bytes == 40 * (16 * 8 + 25) + 6240
    inkernel = roofline.message_work(roofline.MessageShape(10, 40, 8, 2, 4, 1, filters="kernel", precision="tf32"))
    assert "_filter_preact_kernel" not in inkernel
    assert inkernel["_message_fwd_kernel"].flops == 50 * 318 + 40 * 2 * 4 * 32
    assert inkernel["_message_bwd_receiver_kernel"].flops == 50 * (81 * 8 + 10) + 40 * 2 * 2 * 4 * 32
    assert inkernel["_message_fwd_kernel"].unit == "tf32"
    # filter tables: no products; per edge r (4 B) instead of z's 16F row, the layer's coefficients
    # (2048 intervals x 4 x 4F x 4 B = 2048 * 64 * 8) once, 64F bytes per edge issued from L2
    table = roofline.message_work(roofline.MessageShape(10, 40, 8, 2, 4, 1, chunk_channels=4, filters="table"))
    assert set(table) == {"_message_fwd_kernel", "_message_bwd_receiver_kernel", "_message_bwd_sender_kernel"}
    coefficients = 2048 * 64 * 8
    assert table["_message_fwd_kernel"].flops == w["_message_fwd_kernel"].flops
    assert table["_message_fwd_kernel"].bytes == 40 * 29 + coefficients + 4000
    assert table["_message_fwd_kernel"].issued_bytes == 40 * 29 + coefficients + 4000 + 40 * 28 * 8 + 40 * 64 * 8
    # receiver: r, the edge's 25 B and 5 gradient columns per chunk (20 * 2), no z read or dL/dz write
    assert table["_message_bwd_receiver_kernel"].bytes == 40 * (29 + 40) + coefficients + 6240
    assert table["_message_bwd_sender_kernel"].bytes == 40 * 37 + coefficients + 6240
    padded = roofline.message_work(roofline.MessageShape(10, 40, 8, 2, 4, 1, edge_rows=50))
    assert padded["_filter_rbf_grad_kernel"].flops == 2 * 50 * 4 * 32
    assert padded["_message_fwd_kernel"].flops == w["_message_fwd_kernel"].flops  # padding rows are not walked


def test_peaks_by_gpu_name():
    assert roofline.peaks_for("NVIDIA H100 80GB HBM3")[0] == "H100 SXM"
    assert roofline.peaks_for("NVIDIA H200")[0] == "H200"
    assert roofline.peaks_for("NVIDIA H200")[1]["hbm"] == 4.8e12
    for name in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA A100-SXM4-80GB", "cpu", "NVIDIA H200 NVL"):
        assert roofline.peaks_for(name) is None, name


@pytest.mark.parametrize("compute,memory,us,expected", [
    (0.05, 0.10, 100.0, "latency"),
    (0.05, 0.10, 3.0, "launch"),
    (0.05, 0.60, 100.0, "memory"),
    (0.70, 0.30, 100.0, "compute"),
    (0.25, 0.19, 2.0, "compute"),  # one utilisation above 20 %: not latency, whatever the launch time
    (None, 0.5, 100.0, "memory"),
    (0.5, None, 100.0, "compute"),
    (None, 0.1, 100.0, "latency"),
    (None, None, 1.0, "-"),
])
def test_bound(compute, memory, us, expected):
    assert roofline.bound(compute, memory, us) == expected


@pytest.mark.parametrize("name,group", [
    ("_message_fwd_kernel", "message forward"),
    ("_message_bwd_receiver_kernel", "receiver backward"),
    ("_message_bwd_sender_kernel", "sender backward"),
    ("_cell_pairs_kernel", "neighbour list"),
    ("_fill_kernel", "neighbour list"),
    ("_filter_preact_kernel", "GEMMs"),
    ("sm80_xmma_gemm_f32f32_f32f32_f32_nn_n_tilesize32x32x8_stage3_warpsize1", "GEMMs"),
    ("void cutlass::Kernel2<cutlass_80_simt_sgemm_64x64_8x5_nn_align1>(cutla", "GEMMs"),
    ("triton_red_fused_mul_sum_unsqueeze_5", "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel>", "elementwise"),
    ("void at::native::(anonymous namespace)::indexFuncLargeIndex<float>", "other"),
    ("Memset (Device)", "other"),
])
def test_groups(name, group):
    assert roofline.group_of(name) == group


def fake_profile():
    """Two profiled calls: device events (kernels) and CPU operators, one with FLOPs."""
    def kernel(name, us):
        return SimpleNamespace(name=name, device_type="DeviceType.CUDA", time_range=SimpleNamespace(start=0.0, end=us))

    def op(name, flops, kernels, children=()):
        """A CPU operator; as in kineto, its kernels hang under its runtime launch call."""
        launch = SimpleNamespace(name="cudaLaunchKernel", device_type="DeviceType.CPU", flops=None, cpu_children=[],
                                 kernels=[SimpleNamespace(name=k, duration=us) for k, us in kernels])
        return SimpleNamespace(name=name, device_type="DeviceType.CPU", flops=flops, kernels=[],
                               cpu_children=[launch, *children])

    events = []
    for _ in range(2):
        events += [kernel("_message_fwd_kernel", 300.0), kernel("_message_fwd_kernel", 300.0),
                   kernel("sm80_xmma_gemm_f32f32_f32f32_f32_nn_n", 90.0), kernel("triton_poi_fused_add_0", 2.0),
                   mm := op("aten::mm", 3.0e9, [("sm80_xmma_gemm_f32f32_f32f32_f32_nn_n", 90.0)]),
                   op("aten::linear", 5.0e9, [], [mm]),  # prof.events() is flat: parents and children
                   op("aten::add", None, [("triton_poi_fused_add_0", 2.0)])]
    return events


def test_records_from_profiler():
    records = {r.name: r for r in roofline.records_from_profiler(fake_profile(), calls=2)}
    assert records["_message_fwd_kernel"].ms == pytest.approx(0.6) and records["_message_fwd_kernel"].launches == 2
    assert records["_message_fwd_kernel"].flops is None
    gemm = records["sm80_xmma_gemm_f32f32_f32f32_f32_nn_n"]
    assert gemm.ms == pytest.approx(0.09) and gemm.launches == 1 and gemm.flops == pytest.approx(3.0e9)
    assert records["triton_poi_fused_add_0"].ms == pytest.approx(0.002)


def test_rows_and_table_known_gpu():
    shape = roofline.MessageShape(atoms=2489, edges=104436)
    work = roofline.message_work(shape)
    records = roofline.records_from_profiler(fake_profile(), calls=2)
    rows = roofline.build_rows(records, work, roofline.PEAKS["H200"])
    by = {r.name: r for r in rows}
    fwd = by["_message_fwd_kernel"]
    assert fwd.source == "model" and fwd.flops == 2 * work["_message_fwd_kernel"].flops
    assert fwd.flops_per_s == pytest.approx(fwd.flops / 0.6e-3)
    assert fwd.compute_util == pytest.approx(fwd.flops / 0.6e-3 / 67e12)
    assert fwd.memory_util == pytest.approx(2 * work["_message_fwd_kernel"].bytes / 0.6e-3 / 4.8e12)
    # ~0.44 GB per 0.6 ms: 15 % of 4.8 TB/s; ~0.02 of FP32: latency-bound
    assert fwd.bound == "latency"
    gemm = by["sm80_xmma_gemm_f32f32_f32f32_f32_nn_n"]
    assert gemm.source == "profiler" and gemm.unit == "fp32" and gemm.memory_util is None
    assert gemm.compute_util == pytest.approx(3.0e9 / 0.09e-3 / 67e12)  # 50 %: compute-bound
    assert gemm.bound == "compute"
    assert by["triton_poi_fused_add_0"].bound == "-"  # nothing known about its work
    assert [r.group for r in rows] == ["message forward", "GEMMs", "elementwise"]
    text = roofline.table(rows, "NVIDIA H200", title="dhfr")
    assert "% HBM" in text and "bound" in text and "latency" in text and "H200" in text
    assert "| **message forward** |" in text
    assert "GPU time 0.692 ms per call in 4 launches." in text
    totals = roofline.group_totals(rows)
    assert totals["message forward"][0] == pytest.approx(0.6) and totals["GEMMs"][2] == pytest.approx(0.09 / 0.692)


def test_table_unknown_gpu_has_no_percent_columns():
    work = roofline.message_work(roofline.MessageShape(atoms=2489, edges=104436))
    records = roofline.records_from_profiler(fake_profile(), calls=2)
    rows = roofline.build_rows(records, work, None)
    assert all(r.compute_util is None and r.memory_util is None and r.bound == "-" for r in rows)
    text = roofline.table(rows, "NVIDIA A100-SXM4-80GB")
    lines = text.splitlines()
    assert sum("not in bench/roofline.py's peak table" in line for line in lines) == 1
    assert "peak" not in lines[1] and "HBM" not in lines[1] and "| bound |" not in text
    json_rows = roofline.rows_json(rows)
    assert json_rows[0]["kernel"] == "_message_fwd_kernel" and json_rows[0]["flops"] == rows[0].flops


def test_table_folds_long_groups():
    records = [roofline.KernelRecord(f"triton_poi_fused_{k}", 0.01 * (k + 1), 1) for k in range(12)]
    rows = roofline.build_rows(records, {}, roofline.PEAKS["H100 SXM"])
    text = roofline.table(rows, "NVIDIA H100 80GB HBM3", max_rows_per_group=5)
    assert "(7 more)" in text and "triton_poi_fused_11" in text and "triton_poi_fused_0 " not in text
