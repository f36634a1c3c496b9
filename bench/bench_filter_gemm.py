"""Tile sweep of the fused message's two filter products (issue 16): the pre-activation
z = rbf W^T + b ([E, 32] x [32, 512] -> [E, 512], ``_filter_preact_kernel``) and its input
gradient dL/drbf = dL/dz W ([E, 512] x [512, 32], ``_filter_rbf_grad_kernel``), against cuBLAS
(float32 FMA and TF32) in the same run.

Why: on the DHFR graph profile (2026-12-05) the pre-activation ran 12 times for 2.53 ms (21 % of
the call) at 1.08 TB/s and 9.9 % of the TF32 peak, i.e. bound by neither: its tiles (64 x 128,
4 warps; today ``message_triton_autograd.GEMM_TILES``, :func:`today_tiles`) were never swept. Each row gives the
median µs per launch (CUDA events), the bytes/s of its compulsory traffic (rbf, W read, z
written) and the largest relative error against a float64 product of the same inputs.

    python bench/bench_filter_gemm.py [--edges 5660,104436,1022612] [--json OUT.json]

CPU: ``--device cpu`` runs each variant once through the Triton interpreter on a small input
(a smoke test of the launch code; times mean nothing there).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_timing  # noqa: E402

from torchmdx.io_utils import atomic_write  # noqa: E402

PREACT_TILES = [(bm, bn, w) for bm, bn, w in itertools.product((32, 64, 128, 256), (64, 128, 256), (4, 8))
                if bm * bn <= 256 * 128]
GRAD_TILES = [(bm, bn, w) for bm, bn, w in itertools.product((32, 64, 128), (32, 64, 128), (4, 8))]


def today_tiles() -> dict:
    """{kernel: (rows, columns, warps)} of the tiles the model launches today
    (``message_triton_autograd.GEMM_TILES``, the float32 tiles)."""
    from torchmdx.kernels.message_triton_autograd import GEMM_TILES

    return {kernel: (bm, bn, 4) for kernel, (bm, bn) in GEMM_TILES.items()}


#: tl.dot precisions tried on today's tiles besides tf32x3: plain float32 multiply-adds ("ieee")
#: and one TF32 pass ("tf32", which the precision gate refused for the model: see the error column)
OTHER_PRECISIONS = ("ieee", "tf32")


def _time_us(fn, warmup: int = 5, repeats: int = 20) -> float:
    """Median µs per launch (``gpu_timing.cuda_time``); NaN on the CPU, where one call is made."""
    if not torch.cuda.is_available():
        fn()
        return float("nan")
    return 1000.0 * gpu_timing.cuda_time(fn, warmup, repeats)


def _with_tf32(allowed: bool, product):
    """``product`` as a call that runs with cuBLAS TF32 allowed or not (the setting restored)."""
    def run():
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = allowed
        try:
            product()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    return run


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def sweep(edges: int, device: str, channels: int = 512, radial: int = 32, precision: str = "tf32x3") -> list:
    """Rows (dict) for one edge count: every tile of both kernels and the cuBLAS products."""
    import triton

    from torchmdx.kernels import _message_kernels as kernels
    from torchmdx.kernels.message_triton_spec import _pow2

    g = torch.Generator(device=device).manual_seed(0)
    rbf = torch.rand(edges, radial, device=device, generator=g)
    weight = torch.randn(channels, radial, device=device, generator=g) / radial ** 0.5
    bias = torch.randn(channels, device=device, generator=g) * 0.1
    grad_z = torch.randn(edges, channels, device=device, generator=g)
    z_ref = rbf.double() @ weight.double().T + bias.double()
    grbf_ref = grad_z.double() @ weight.double()
    z = torch.empty(edges, channels, device=device)
    grbf = torch.empty(edges, radial, device=device)
    kp = max(16, _pow2(radial))
    fp = 4
    rows = []

    def add(kernel, variant, fn, out, ref, traffic):
        us = _time_us(fn)
        rows.append({"edges": edges, "kernel": kernel, "variant": variant, "us": us,
                     "GB_s": traffic / (us * 1e3) if us == us else None, "rel_error": _rel_error(out, ref)})
        print(f"{edges:>9} {kernel:<8} {variant:<26} {us:9.1f} µs  {rows[-1]['GB_s'] or 0:8.0f} GB/s  "
              f"rel err {rows[-1]['rel_error']:.2e}", flush=True)

    def preact(bm, bn, warps, prec):
        return lambda: kernels._filter_preact_kernel[(triton.cdiv(edges, bm), triton.cdiv(channels, bn))](
            rbf, weight, bias, z, edges, channels, K=radial, KP=kp, BM=bm, BN=bn, PREC=prec, num_warps=warps)

    def rbf_grad(bm, bn, warps, prec):
        return lambda: kernels._filter_rbf_grad_kernel[(triton.cdiv(edges, bm),)](
            grad_z, weight, grad_z, grbf, edges, channels, K=radial, KP=kp, BM=bm, BN=bn,
            HAS_MASK=False, PREC=prec, num_warps=warps)

    preact_bytes = fp * (edges * radial + channels * radial + edges * channels)
    grad_bytes = fp * (edges * channels + channels * radial + edges * radial)
    today = today_tiles()
    for kernel, launch, tiles, out, ref, traffic, product in (
            ("preact", preact, PREACT_TILES, z, z_ref, preact_bytes, lambda: torch.addmm(bias, rbf, weight.T, out=z)),
            ("rbf_grad", rbf_grad, GRAD_TILES, grbf, grbf_ref, grad_bytes, lambda: torch.mm(grad_z, weight, out=grbf))):
        bm0, bn0, warps0 = today[kernel]
        for bm, bn, warps in tiles:
            add(kernel, f"triton {bm}x{bn} w{warps}", launch(bm, bn, warps, precision), out, ref, traffic)
        for other in OTHER_PRECISIONS:  # today's tile with another tl.dot precision (error column)
            add(kernel, f"precision {other} {bm0}x{bn0} w{warps0}", launch(bm0, bn0, warps0, other), out, ref, traffic)
        for label, tf32 in (("cublas fp32", False), ("cublas tf32", True)):
            add(kernel, label, _with_tf32(tf32, product), out, ref, traffic)
    return rows


def _edge_counts(text: str) -> list:
    """``--edges``: comma-separated positive integers (argparse turns the ValueError into one line)."""
    counts = [int(e) for e in text.split(",")]
    if any(c <= 0 for c in counts):
        raise ValueError(text)
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", type=_edge_counts, default="5660,104436,1022612",
                        help="comma-separated positive edge counts (default: chignolin, DHFR, STMV)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA GPU here (use --device cpu for the interpreter smoke test)")
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        global PREACT_TILES, GRAD_TILES, OTHER_PRECISIONS
        PREACT_TILES, GRAD_TILES = PREACT_TILES[:1], GRAD_TILES[:1]
        OTHER_PRECISIONS = ("ieee",)  # the interpreter runs no tensor-core precision
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter)"
    print(f"# bench_filter_gemm on {gpu}, torch {torch.__version__}; µs per launch, C = 512, K = 32", flush=True)
    rows = []
    for edges in args.edges:
        rows += sweep(edges, args.device)
    best = {}
    for row in rows:
        key = (row["edges"], row["kernel"])
        if row["variant"].startswith("triton") and (key not in best or row["us"] < best[key]["us"]):
            best[key] = row
    print("\n| edges | kernel | best Triton tile | µs | GB/s | today's tile µs | cuBLAS fp32 µs | cuBLAS tf32 µs |")
    print("|---|---|---|---|---|---|---|---|")
    default = {kernel: f"triton {bm}x{bn} w{warps}" for kernel, (bm, bn, warps) in today_tiles().items()}
    for (edges, kernel), row in best.items():
        pick = {r["variant"]: r["us"] for r in rows if r["edges"] == edges and r["kernel"] == kernel}
        print(f"| {edges} | {kernel} | {row['variant'][7:]} | {row['us']:.1f} | {row['GB_s'] or 0:.0f} | "
              f"{pick.get(default[kernel], float('nan')):.1f} | {pick['cublas fp32']:.1f} | {pick['cublas tf32']:.1f} |")
    if args.json:
        with atomic_write(args.json, "w") as handle:
            json.dump({"gpu": gpu, "torch": torch.__version__, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
