"""Roofline table of one profiled energy + forces call: where each GPU millisecond goes.

Used by ``bench/bench_model.py --profile SYSTEMS``; importable without a GPU (tests/test_bench_roofline.py).

Each kernel of the profiled call (torch.profiler names, grouped: message forward, receiver
backward, sender backward, neighbour list, GEMMs, elementwise, other) gets its time per call,
its FLOP and byte counts, the FLOP/s and bytes/s it achieves, those as % of the GPU's peaks
(:data:`PEAKS`) and what bounds it (:func:`bound`).

Analytic model of the fused message step (per layer; edges sorted by receiver)
----------------------------------------------------------------------------
Sizes: N atoms, E valid edges (a full list: both directions), F features, H heads (D = F/H),
K radial functions, L layers, C = F / chunk channel chunks (default 32 channels: C = F/32),
E_r rows of the edge buffers (E plus the padding of a fixed-capacity list; E when unknown).
Each atom's self edge (i <- i, filters dk0 / dv0) is counted as one more edge: E' = E + N.
Counting: +, -, *, / and exp are one FLOP each (a negation is free), a sum of n terms costs
n - 1 additions, a segment sum one addition per edge. act = SiLU, x / (1 + exp(-x)) counted as
x * (1 / (1 + exp(-x))): 4 FLOPs, its derivative s (1 + x (1 - s)) 4 more. Vector cutoff (the
ET-MD17 setting), both filters (distance influence 'both').

Forward (``_message_fwd_kernel``), per edge::

    dk, dv = act(z)                              4F values x 4           16F
    p_h    = sum_{c in h} q_ic k_jc dk_c        2 mul + (D - 1) add      3F - H
    a_h    = act(p_h)                                                    4H
    s      = v_j * dv * phi                      3F x 2                  6F
    m_i   += a_h s1                              mul + add               2F
    u_ix  += vec_jx s2 + s3 d_x  (x = 1..3)      (2 mul + 2 add) x 3     12F
                                                                 total   39F + 3H

Receiver backward (``_message_bwd_receiver_kernel``), per edge: the forward recomputed with the
activation derivatives (32F + 3F - H + 8H + 6F), then gA_h = sum gm s1 (2F - H), gs1 = gm a
(F), gs2 = sum_x gu_x vec_x (5F), gs3 = sum_x gu_x d_x (5F), gd_x = sum_c gu_xc s3_c (6F - 3),
gp = gA a' (H), gq += gp k dk (3F), dL/dz_k = gp q k act' (3F), dL/dz_v = gs v phi act'
(9F), gphi = sum gs (v dv) (6F - 1)::

                                                                 total   81F + 7H - 4

Sender backward (``_message_bwd_sender_kernel``), per edge: filters without derivatives (16F),
p, a, a' and s (3F - H + 8H + 6F), gA, gs1, gs2, gs3 (2F - H + F + 5F + 5F), gp (H),
gk += gp q dk (3F), gv += gs dv phi (9F), gvec_x += gu_x s2 (6F)::

                                                                 total   56F + 7H

Merged sender side (``sender_side='merged'``, the receiver kernel also gives the reverse
edge's sender share, filters evaluated once): receiver + sender - 16F = 121F + 14H - 4.
Filters inside the kernels (``filters='kernel'``): + 2 K 4F per edge in the forward and the
sender kernel (the filter product), + 2 x 2 K 4F in the receiver (the product and dL/drbf).

Filter products (``filters='gemm'``, float32 accuracy by three tf32 passes):
``_filter_preact_kernel`` z = rbf W^T + b: 2 E_r K 4F + E_r 4F (forward, and again in the
backward); ``_filter_rbf_grad_kernel`` dL/drbf = dL/dz W: 2 E_r 4F K. The tensor cores execute
3x (tf32x3), 3x (bf16x3), 6x (bf16x6) or 1x (tf32) those products: the % column compares the
executed products with the tensor-core peak of that input type; 'ieee' runs on the FP32 cores.

Bytes: compulsory DRAM traffic, float32 = 4 B, indices int64 = 8 B, mask 1 B: every per-edge
stream once (z [4F], its gradient [4F] written over it, phi, unit vector [3], sender index,
mask, the per-chunk edge gradients [C x 4]) and every per-atom array once (gathered features
are counted once per atom, as if every gather after the first hit L2). ``issued_bytes``
adds the gathers as issued (7F floats per edge in the forward: k_j, v_j, vec_j; 12F + the
reverse 8F in the merged receiver; 5F + 3F in the sender kernel): an upper bound, L2 traffic.

    forward    bytes = E (16F + 25) + N (48F + 16)
    receiver   bytes = E (32F + 25 + 16C) + N (76F + 16)     (+ merged: N 28F)
    sender     bytes = E (16F + 33) + N (76F + 16)           (reverse sender side: E 8 less, no permutation)
    preact     bytes = E_r (4K + 16F) + 16 F K + 16F
    rbf grad   bytes = E_r (16F + 4K + 1) + 16 F K

Kernels outside the model (cuBLAS, inductor, torch): FLOPs from torch.profiler's ``with_flops``
(operator FLOPs shared among the kernels the operator launched, by time), bytes unknown.

Bounds: a kernel whose compute and memory utilisations are both below :data:`LATENCY_FRACTION`
(20 %) is latency-bound ('launch' when its mean launch is shorter than :data:`LAUNCH_US`);
otherwise the larger utilisation names the bound. An unknown GPU gets no % columns and no
bounds (one line says so).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

# --------------------------------------------------------------------------- peaks
#: Peak rates, dense (the datasheets list tensor-core rates "with sparsity": half of those).
#: NVIDIA H100 Tensor Core GPU datasheet (H100 SXM): FP32 67 TFLOPS, TF32 Tensor Core 989
#: TFLOPS with sparsity, BF16 Tensor Core 1 979 TFLOPS with sparsity, GPU memory bandwidth
#: 3.35 TB/s. NVIDIA H200 Tensor Core GPU datasheet (H200 SXM): FP32 67 TFLOPS, TF32 Tensor
#: Core 989 TFLOPS with sparsity, BF16 1 979 TFLOPS with sparsity, 4.8 TB/s (HBM3e).
PEAKS = {
    "H100 SXM": dict(fp32=67e12, tf32=494.5e12, bf16=989.5e12, hbm=3.35e12),
    "H200": dict(fp32=67e12, tf32=494.5e12, bf16=989.5e12, hbm=4.8e12),
}
LATENCY_FRACTION = 0.20
LAUNCH_US = 5.0

GROUPS = ("message forward", "receiver backward", "sender backward", "neighbour list", "GEMMs", "elementwise", "other")
_GROUP_PATTERNS = (
    ("message forward", r"_message_fwd_kernel"),
    ("receiver backward", r"_message_bwd_receiver_kernel"),
    ("sender backward", r"_message_bwd_sender_kernel"),
    ("neighbour list", r"^_(brute|extent|bin|scatter|cell_pairs|fill|displacement)_kernel|neighbo"),
    ("GEMMs", r"_filter_preact_kernel|_filter_rbf_grad_kernel|gemm|cutlass|xmma|nvjet|cublas|triton_tem_|matmul|"
              r"gemv|dot_kernel"),
    ("elementwise", r"elementwise|triton_poi_|triton_per_|triton_red_|reduce_kernel|vectorized|"
                    r"CatArrayBatchedCopy|fused_"),
)


def peaks_for(gpu_name: str) -> Optional[tuple]:
    """(label, peaks) for ``torch.cuda.get_device_name``, or None for a GPU not in the table."""
    name = gpu_name.upper()
    if "H200" in name and "NVL" not in name:
        return "H200", PEAKS["H200"]
    if "H100" in name and ("HBM3" in name or "SXM" in name) and "NVL" not in name and "PCIE" not in name:
        return "H100 SXM", PEAKS["H100 SXM"]
    return None


def group_of(kernel: str) -> str:
    for group, pattern in _GROUP_PATTERNS:
        if re.search(pattern, kernel):
            return group
    return "other"


# --------------------------------------------------------------------------- analytic model
@dataclass(frozen=True)
class MessageShape:
    """Sizes of the message step: atoms, valid edges, features, heads, radial functions,
    layers; ``edge_rows`` the rows of the edge buffers (with padding; default = edges)."""

    atoms: int
    edges: int
    features: int = 128
    heads: int = 8
    rbf: int = 32
    layers: int = 6
    edge_rows: Optional[int] = None
    chunk_channels: int = 32
    filters: str = "gemm"
    sender_side: str = "sorted"
    precision: str = "tf32x3"

    @property
    def chunks(self) -> int:
        head_dim = self.features // self.heads
        heads_per_chunk = max(1, self.chunk_channels // head_dim)
        return -(-self.heads // heads_per_chunk)

    @property
    def rows(self) -> int:
        return self.edges if self.edge_rows is None else self.edge_rows


@dataclass(frozen=True)
class Work:
    """FLOPs and bytes of one launch; ``unit`` names the peak the FLOPs run on ('fp32', 'tf32',
    'bf16'); ``executed`` is the FLOPs the hardware runs (x3 for tf32x3 ...); ``issued_bytes``
    counts gathers as issued."""

    flops: float
    bytes: float
    unit: str = "fp32"
    executed: Optional[float] = None
    issued_bytes: Optional[float] = None


#: per-edge FLOP coefficients (a F + b H + c) of the message kernels (module docstring)
EDGE_FLOPS = {"forward": (39, 3, 0), "receiver": (81, 7, -4), "sender": (56, 7, 0), "merged": (121, 14, -4)}
#: tensor-core passes and the peak they run on, per tl.dot input precision
PRECISION_PASSES = {"tf32x3": (3, "tf32"), "tf32": (1, "tf32"), "bf16x3": (3, "bf16"), "bf16x6": (6, "bf16"),
                    "ieee": (1, "fp32")}


#: intervals of the filter tables (torchmdx.nn.et.FILTER_TABLE_INTERVALS)
TABLE_INTERVALS = 2048


def per_edge_flops(kind: str, features: int, heads: int) -> int:
    a, b, c = EDGE_FLOPS[kind]
    return a * features + b * heads + c


def message_work(shape: MessageShape) -> dict:
    """{kernel name: :class:`Work` of ONE launch} for the fused message step (one layer)."""
    n, e, f, h, k, c = shape.atoms, shape.edges, shape.features, shape.heads, shape.rbf, shape.chunks
    edges = e + n  # the self edge of every atom counted as one more edge
    passes, unit = PRECISION_PASSES.get(shape.precision, (1, "fp32"))
    in_kernel = shape.filters == "kernel"
    dot = 2 * k * 4 * f  # one filter product per edge (both filters)
    merged = shape.sender_side == "merged"
    work = {}

    def kernel_work(kind, elementwise, products, dram, issued):
        flops = edges * elementwise + e * products
        executed = edges * elementwise + e * products * passes if products else None
        return Work(flops, dram, unit if products else "fp32", executed, issued)

    table = shape.filters == "table"  # filters interpolated from tables: no z rows; 64 f bytes per edge from L2
    table_bytes = TABLE_INTERVALS * 4 * 4 * f * 4  # one layer's coefficients, read from DRAM about once
    fwd_bytes = (e * 29 + table_bytes if table else e * (16 * f + 25)) + n * (48 * f + 16)
    work["_message_fwd_kernel"] = kernel_work("forward", per_edge_flops("forward", f, h), dot if in_kernel else 0,
                                              fwd_bytes, fwd_bytes + e * 28 * f + (e * 64 * f if table else 0))
    rec_kind = "merged" if merged else "receiver"
    rec_edge = e * (29 + 20 * c) + table_bytes if table else e * (32 * f + 25 + 16 * c)
    rec_bytes = rec_edge + n * (76 * f + 16) + (n * 28 * f if merged else 0)
    rec_gathers = e * (28 * f + (20 * f if merged else 0) + (64 * f if table else 0))
    work["_message_bwd_receiver_kernel"] = kernel_work(rec_kind, per_edge_flops(rec_kind, f, h),
                                                       2 * dot if in_kernel else 0, rec_bytes, rec_bytes + rec_gathers)
    if not merged:
        perm = 0 if shape.sender_side == "reverse" else 8  # 'reverse' walks the receiver segments: no permutation
        snd_bytes = (e * (29 + perm) + table_bytes if table else e * (16 * f + 25 + perm)) + n * (76 * f + 16)
        work["_message_bwd_sender_kernel"] = kernel_work("sender", per_edge_flops("sender", f, h),
                                                         dot if in_kernel else 0, snd_bytes,
                                                         snd_bytes + e * 20 * f + (e * 64 * f if table else 0))
    if not in_kernel and not table:
        r = shape.rows
        product = 2 * r * k * 4 * f
        work["_filter_preact_kernel"] = Work(product + r * 4 * f, r * (4 * k + 16 * f) + 16 * f * k + 16 * f, unit,
                                             product * passes + r * 4 * f)
        work["_filter_rbf_grad_kernel"] = Work(product, r * (16 * f + 4 * k + 1) + 16 * f * k, unit, product * passes)
    return work


def model_for(kernel: str, work: dict) -> Optional[Work]:
    """The model entry whose name the profiler's kernel name contains."""
    for name, w in work.items():
        if name in kernel:
            return w
    return None


# --------------------------------------------------------------------------- rows
@dataclass
class KernelRecord:
    """One kernel name of a profile, per profiled call: ms, launches, FLOPs from the profiler."""

    name: str
    ms: float
    launches: float
    flops: Optional[float] = None


@dataclass
class Row:
    group: str
    name: str
    ms: float
    launches: float
    flops: Optional[float] = None
    bytes: Optional[float] = None
    unit: str = "fp32"
    executed: Optional[float] = None
    issued_bytes: Optional[float] = None
    source: str = "-"
    compute_util: Optional[float] = None
    memory_util: Optional[float] = None
    bound: str = "-"
    extra: dict = field(default_factory=dict)

    @property
    def flops_per_s(self):
        return None if self.flops is None or self.ms <= 0 else self.flops / (self.ms * 1e-3)

    @property
    def bytes_per_s(self):
        return None if self.bytes is None or self.ms <= 0 else self.bytes / (self.ms * 1e-3)


def bound(compute_util: Optional[float], memory_util: Optional[float], us_per_launch: float,
          latency_fraction: float = LATENCY_FRACTION, launch_us: float = LAUNCH_US) -> str:
    """'compute' / 'memory' (the larger utilisation, when one reaches ``latency_fraction``),
    else 'launch' (mean launch < ``launch_us``) or 'latency'; '-' when neither is known."""
    known = [u for u in (compute_util, memory_util) if u is not None]
    if not known:
        return "-"
    if max(known) < latency_fraction:
        return "launch" if us_per_launch < launch_us else "latency"
    if memory_util is None:
        return "compute"
    if compute_util is None:
        return "memory"
    return "compute" if compute_util >= memory_util else "memory"


def build_rows(records: list, work: dict, peaks: Optional[dict]) -> list:
    """Rows for ``records`` with the analytic model ``work`` (per launch, scaled by the launches
    per call), the profiler's FLOPs for the other kernels, utilisations against ``peaks``."""
    rows = []
    for rec in records:
        row = Row(group_of(rec.name), rec.name, rec.ms, rec.launches)
        model = model_for(rec.name, work)
        if model is not None:
            row.flops, row.bytes, row.unit = model.flops * rec.launches, model.bytes * rec.launches, model.unit
            row.executed = None if model.executed is None else model.executed * rec.launches
            row.issued_bytes = None if model.issued_bytes is None else model.issued_bytes * rec.launches
            row.source = "model"
        elif rec.flops:
            row.flops, row.source = rec.flops, "profiler"
            # cuBLAS float32 products without TF32 run on the FP32 cores (sm80_xmma_..._ffma)
            row.unit = "tf32" if re.search(r"tf32|xmma_gemm_f32f32_tf32|nvjet_tst", rec.name) else "fp32"
        if peaks is not None and rec.ms > 0:
            seconds = rec.ms * 1e-3
            if row.flops is not None:
                executed = row.executed if row.executed is not None else row.flops
                row.compute_util = executed / seconds / peaks[row.unit]
            if row.bytes is not None:
                row.memory_util = row.bytes / seconds / peaks["hbm"]
            row.bound = bound(row.compute_util, row.memory_util, 1e3 * rec.ms / max(rec.launches, 1))
        rows.append(row)
    order = {g: k for k, g in enumerate(GROUPS)}
    rows.sort(key=lambda r: (order[r.group], -r.ms))
    return rows


def group_totals(rows: list) -> dict:
    """{group: (ms, launches, share of the call's GPU time)} of ``rows``."""
    total = sum(r.ms for r in rows) or 1.0
    out = {}
    for group in GROUPS:
        members = [r for r in rows if r.group == group]
        if members:
            ms = sum(r.ms for r in members)
            out[group] = (ms, sum(r.launches for r in members), ms / total)
    return out


# --------------------------------------------------------------------------- printing
def _si(x, unit):
    if x is None:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f} %"


def table(rows: list, gpu_name: str, title: str = "", max_rows_per_group: int = 8) -> str:
    """Markdown table: group subtotal lines, then each group's largest kernels (the rest of a
    group summed in one line). Without peaks for ``gpu_name``: no % columns, one line says so."""
    found = peaks_for(gpu_name)
    lines = []
    if title:
        lines.append(f"{title}")
    if found is None:
        lines.append(f"GPU {gpu_name!r} is not in bench/roofline.py's peak table: no % of peak columns and no bounds.")
        head = "| group | kernel | launches | ms | share | FLOP | FLOP/s | bytes | bytes/s | counts |"
    else:
        label, peaks = found
        lines.append(f"Peaks ({label}, dense): FP32 {_si(peaks['fp32'], 'FLOP/s')}, TF32 tensor {_si(peaks['tf32'], 'FLOP/s')}, "
                     f"BF16 tensor {_si(peaks['bf16'], 'FLOP/s')}, HBM {_si(peaks['hbm'], 'B/s')}.")
        head = ("| group | kernel | launches | ms | share | FLOP | FLOP/s | % peak (unit) | bytes | bytes/s | % HBM "
                "| bound | counts |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    busy = sum(r.ms for r in rows)
    total = busy or 1.0
    totals = group_totals(rows)

    def line(group, name, launches, ms, flops, fps, cu, unit, nbytes, bps, mu, bnd, source):
        cells = [group, name, f"{launches:g}", f"{ms:.3f}", f"{100 * ms / total:.1f} %", _si(flops, ""), _si(fps, "")]
        if found is not None:
            cells.append("-" if cu is None else f"{_pct(cu)} ({unit})")
        cells += [_si(nbytes, "B"), _si(bps, "B/s")]
        if found is not None:
            cells += [_pct(mu), bnd]
        cells.append(source)
        return "| " + " | ".join(cells) + " |"

    for group, (ms, launches, _) in totals.items():
        members = [r for r in rows if r.group == group]
        lines.append(line(f"**{group}**", f"({len(members)} kernels)", launches, ms, None, None, None, "", None, None,
                          None, "", ""))
        for r in members[:max_rows_per_group]:
            lines.append(line(group, r.name[:60], r.launches, r.ms, r.flops, r.flops_per_s, r.compute_util, r.unit,
                              r.bytes, r.bytes_per_s, r.memory_util, r.bound, r.source))
        rest = members[max_rows_per_group:]
        if rest:
            lines.append(line(group, f"({len(rest)} more)", sum(r.launches for r in rest), sum(r.ms for r in rest), None,
                              None, None, "", None, None, None, "", ""))
    lines.append(f"GPU time {busy:.3f} ms per call in {sum(r.launches for r in rows):g} launches.")
    return "\n".join(lines)


def rows_json(rows: list) -> list:
    """Plain rows for the benchmark's JSON."""
    out = []
    for r in rows:
        out.append({"group": r.group, "kernel": r.name, "launches": r.launches, "ms": round(r.ms, 4),
                    "flops": r.flops, "bytes": r.bytes, "issued_bytes": r.issued_bytes, "unit": r.unit,
                    "flops_per_s": r.flops_per_s, "bytes_per_s": r.bytes_per_s, "compute_util": r.compute_util,
                    "memory_util": r.memory_util, "bound": r.bound, "source": r.source})
    return out


# --------------------------------------------------------------------------- profiler
def records_from_profiler(events, calls: int) -> list:
    """:class:`KernelRecord` per kernel name from ``prof.events()`` of ``calls`` profiled calls:
    device events (kernels, memcpy, memset) give time and launches; CPU operators with FLOPs
    (``with_flops=True``) share them among the kernels launched under them (their runtime calls
    carry the kernels), in proportion to time; an operator with FLOP-counted operators below it
    leaves the FLOPs to those."""
    times, counts, flops = {}, {}, {}
    for ev in events:
        device_type = str(getattr(ev, "device_type", ""))
        if device_type.endswith("CUDA"):
            duration = _duration_us(ev)
            times[ev.name] = times.get(ev.name, 0.0) + duration
            counts[ev.name] = counts.get(ev.name, 0) + 1
        elif getattr(ev, "flops", None) and not _flops_below(ev):
            kernels = _kernels_below(ev)  # the launches hang under the operator's runtime calls
            if not kernels:
                continue
            spent = sum(float(getattr(k, "duration", 0.0)) for k in kernels)
            for k in kernels:
                share = float(getattr(k, "duration", 0.0)) / spent if spent > 0 else 1.0 / len(kernels)
                flops[k.name] = flops.get(k.name, 0.0) + ev.flops * share
    return [KernelRecord(name, times[name] / 1e3 / calls, counts[name] / calls,
                         flops[name] / calls if name in flops else None) for name in times]


def _kernels_below(ev) -> list:
    """Kernels launched by ``ev`` or any CPU event under it (cudaLaunchKernel carries them)."""
    out = list(getattr(ev, "kernels", []) or [])
    for child in getattr(ev, "cpu_children", []) or []:
        out += _kernels_below(child)
    return out


def _flops_below(ev) -> bool:
    """Does an operator under ``ev`` have its own FLOPs (then those are counted, not ``ev``'s)?"""
    return any(getattr(c, "flops", None) or _flops_below(c) for c in getattr(ev, "cpu_children", []) or [])


def _duration_us(ev) -> float:
    span = getattr(ev, "time_range", None)
    return float(span.end - span.start) if span is not None else 0.0


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
