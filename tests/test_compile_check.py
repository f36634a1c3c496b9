"""The Triton kernels compile for the GPUs they are written for, checked on a machine without one.

``torchmdx.kernels.compile_check`` records every distinct launch of the message step and the
neighbor lists under the Triton interpreter (a subprocess) and compiles each launch, specialised
as a real launch would be, for sm_90 (H100 / H200) and sm_80 (A100) with Triton's own NVIDIA
back end. CI has no GPU; this is what catches a kernel that the interpreter runs but the
compiler refuses (tl.dot shapes, layouts, a Triton upgrade), and a float32 kernel of the
default path that spills registers to local memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402

import triton.language as tl  # noqa: E402

from torchmdx.kernels import compile_check  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _nvidia_backend_works() -> bool:
    try:
        make_backend(GPUTarget("cuda", 90, 32))
        return compile_check._cuobjdump() is not None
    except Exception:  # noqa: BLE001 - a triton build without the NVIDIA back end
        return False


pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" or not _nvidia_backend_works(),
    reason="needs Triton's NVIDIA back end (ptxas, cuobjdump ship with the triton wheel) outside the interpreter",
)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "reports.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-m", "torchmdx.kernels.compile_check", "--arch", "90", "--arch", "80",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), f"compile_check wrote no report (exit {done.returncode}):\n{done.stderr[-3000:]}"
    return json.loads(out.read_text()), done


@pytest.mark.slow
def test_every_launch_compiles_for_hopper_and_ampere(reports):
    rows, done = reports
    failed = [f"{r['kernel']} sm_{r['arch']} {r['constants']}: {r['error']}" for r in rows if r["error"]]
    assert not failed, "\n".join(failed)
    assert done.returncode == 0, done.stdout[-2000:]
    kernels = {r["kernel"] for r in rows}
    # the scenarios reach every kernel of the message step and of the neighbor lists
    assert {"_message_fwd_kernel", "_message_bwd_receiver_kernel", "_message_bwd_sender_kernel",
            "_filter_preact_kernel", "_filter_rbf_grad_kernel"} <= kernels
    assert {"_brute_kernel", "_extent_kernel", "_bin_kernel", "_scatter_kernel", "_cell_pairs_kernel", "_fill_kernel",
            "_displacement_kernel"} <= kernels
    assert {r["arch"] for r in rows} == {80, 90}
    # both filter places, both cutoff variants, given filters and float64 were recorded
    modes = {(r["constants"].get("DK_MODE"), r["constants"].get("VCUT"), r["constants"].get("PREC"))
             for r in rows if r["kernel"] == "_message_fwd_kernel"}
    assert {(3, False, "tf32x3"), (3, True, "tf32x3"), (2, False, "tf32x3"), (1, False, "tf32x3"),
            (3, False, "fma")} <= modes


@pytest.mark.slow
def test_default_float32_message_path_does_not_spill_on_hopper(reports):
    """The GEMM place (DK_MODE 3, the default) exists to cut registers: none of its float32
    kernels may use local memory on sm_90 (the merged sender side included), and the default
    message kernels stay well under the 255-register ceiling (the in-kernel filter place hit
    it: 254 registers and spills; the merged receiver kernel, which does the work of two
    kernels, reaches it at 16 edges x 4 warps without spilling)."""
    rows, _ = reports
    default = [r for r in rows if r["arch"] == 90 and r["constants"].get("PREC") == "tf32x3"
               and (r["constants"].get("DK_MODE") == 3 or r["kernel"].startswith("_filter_"))]
    assert len(default) >= 6 and any(r["constants"].get("MERGED") for r in default)
    spilled = [f"{r['kernel']}: {r['local_bytes']} B local" for r in default if r["local_bytes"]]
    assert not spilled, spilled
    for r in default:
        if r["kernel"].startswith("_message_") and not r["constants"].get("MERGED"):
            assert r["registers"] < 200, (r["kernel"], r["registers"])


@triton.jit
def _bad_block_kernel(x_ptr, N: tl.constexpr):
    """A block of N lanes: the compiler refuses N that is not a power of two."""
    offs = tl.arange(0, N)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) * 2.0)


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)


def test_compile_error_is_reported_not_raised():
    def compiled(n):
        launch = compile_check.Launch(f"{__name__}:_bad_block_kernel", (("tensor", "float32", True),),
                                      (("N", n), ("num_warps", 4)))
        return compile_check.compile_launch(launch, 90)

    good, bad = compiled(8), compiled(6)
    assert good.ok and good.registers > 0
    assert not bad.ok and bad.registers is None
    assert "\n" not in bad.error and "power of 2" in bad.error


def test_launch_is_specialised_like_a_real_launch():
    """Alignment and divisibility of the arguments reach the compiler as Triton's binder
    sees them: an aligned source and a length divisible by 16 vectorise the copy
    (128-bit loads), an unaligned source does not."""
    def ptx(aligned, n):
        launch = compile_check.Launch(f"{__name__}:_copy_kernel",
                                      (("tensor", "float32", aligned), ("tensor", "float32", True), n),
                                      (("BLOCK", 1024), ("num_warps", 4)))
        report = compile_check.compile_launch(launch, 90)
        assert report.ok, report.error
        return report

    fast, slow = ptx(True, 4096), ptx(False, 4096)
    assert "ld.global.v4" in fast.ptx
    assert "ld.global.v4" not in slow.ptx and "ld.global" in slow.ptx
    assert compile_check.Launch.from_json(json.loads(json.dumps(fast.launch.to_json()))) == fast.launch
