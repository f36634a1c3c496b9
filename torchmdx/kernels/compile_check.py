"""Compile the Triton kernels that a computation launches for a GPU architecture, without a GPU.

Two steps, in two processes (the Triton interpreter is chosen when ``triton`` is imported):

1. :func:`record_launches`, in a process with ``TRITON_INTERPRET=1``: runs a function on CPU
   tensors through the interpreter (so every launch sees real data and the code after it runs
   as it would on a GPU) and records each distinct launch: the kernel, the kind of each
   argument (tensor dtype and 16-byte alignment, or the integer / float value), the
   compile-time constants and the launch options (``num_warps``, ``num_stages``, ``maxnreg``).
2. :func:`compile_launch`, in a process without the interpreter: rebuilds arguments of the same
   kinds, lets Triton's own binder specialise them as a real launch would (alignment,
   divisibility by 16, integers equal to 1), and compiles the kernel through Triton's NVIDIA
   back end (ptxas ships with the ``triton`` wheel) for ``sm_<arch>``. The report gives the
   registers per thread, local memory (spills) and shared memory of the cubin
   (``cuobjdump -res-usage``), or the compiler's error.

This is what CI can check about the GPU code paths on a machine without a GPU: every launch the
wrappers make compiles for Hopper (and Ampere), and how many registers it takes (the kernels of
this package are latency-bound, so registers decide occupancy: docs/kernels_message.md). It
uses Triton internals (``create_function_from_signature``, ``JITFunction._pack_args``); the
report says so in one line when they change.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

#: launch keyword arguments that are compiler options, not kernel parameters
OPTION_NAMES = ("num_warps", "num_stages", "maxnreg", "num_ctas")


@dataclass(frozen=True)
class Launch:
    """One distinct kernel launch: ``module:qualname`` of the kernel, its arguments (a tensor as
    ``("tensor", dtype name, 16-byte aligned)``, a scalar as its value), and keyword arguments
    (constants and options). Hashable: equal launches compile to the same binary."""

    kernel: str
    args: Tuple[Any, ...]
    kwargs: Tuple[Tuple[str, Any], ...]

    @property
    def name(self) -> str:
        return self.kernel.rsplit(":", 1)[-1]

    def constants(self) -> Dict[str, Any]:
        return {k: v for k, v in self.kwargs if k not in OPTION_NAMES}

    def options(self) -> Dict[str, Any]:
        return {k: v for k, v in self.kwargs if k in OPTION_NAMES}

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "args": [list(a) if isinstance(a, tuple) else a for a in self.args],
                "kwargs": [list(kv) for kv in self.kwargs]}

    @classmethod
    def from_json(cls, data: dict) -> "Launch":
        return cls(data["kernel"], tuple(tuple(a) if isinstance(a, list) else a for a in data["args"]),
                   tuple((k, v) for k, v in data["kwargs"]))


def _describe(value) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype).replace("torch.", ""), value.data_ptr() % 16 == 0)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


@contextlib.contextmanager
def record_launches(into: List[Launch]):
    """Within the block, every interpreted kernel launch is appended to ``into`` (once per
    distinct launch) and then runs as usual. Needs ``TRITON_INTERPRET=1`` before ``triton`` was
    imported."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run
    seen = set(into)

    def run(self, *args, grid, warmup, **kwargs):
        kept = {k: v for k, v in kwargs.items() if k not in ("debug", "instrumentation_mode", "fpsan_homomorphic_casts")}
        launch = Launch(f"{self.fn.__module__}:{self.fn.__qualname__}", tuple(_describe(a) for a in args),
                        tuple(sorted((k, _describe(v)) for k, v in kept.items())))
        if launch not in seen:
            seen.add(launch)
            into.append(launch)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield into
    finally:
        InterpretedFunction.run = original


@dataclass
class CompileReport:
    """What compiling one launch for ``sm_<arch>`` gave."""

    launch: Launch
    arch: int
    seconds: float
    registers: Optional[int] = None
    local_bytes: Optional[int] = None  # per thread: register spills (and stack)
    shared_bytes: Optional[int] = None
    error: Optional[str] = None
    constants: Dict[str, Any] = field(default_factory=dict)
    ptx: Optional[str] = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None


def _argument(desc):
    if isinstance(desc, tuple) and desc and desc[0] == "tensor":
        dtype = getattr(torch, desc[1])
        base = torch.zeros(4, dtype=dtype)
        return base if desc[2] else base[1:]  # [1:] of a 1- to 8-byte type is not 16-byte aligned
    return desc


def _cuobjdump() -> Optional[Path]:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return tool if tool.exists() else None


def _resources(cubin: bytes) -> Dict[str, int]:
    """REG / LOCAL / SHARED / STACK of the (single) function in a cubin, by cuobjdump."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([str(tool), "-res-usage", handle.name], capture_output=True, text=True,
                              check=False).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|LOCAL|SHARED|STACK):(\d+)", text)}


def compile_launch(launch: Launch, arch: int = 90) -> CompileReport:
    """Compile ``launch`` for ``sm_<arch>`` (CUDA, warp size 32) as a real launch would
    specialise it. Must run where Triton is not in interpreter mode."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    start = time.perf_counter()
    module, qualname = launch.kernel.split(":")
    fn = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    if not isinstance(fn, JITFunction):
        return CompileReport(launch, arch, 0.0, error="Triton is in interpreter mode here (TRITON_INTERPRET=1)")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    args = [_argument(a) for a in launch.args]
    kwargs = dict(launch.kwargs)
    report = CompileReport(launch, arch, 0.0, constants=launch.constants())
    try:
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    except Exception as exc:  # noqa: BLE001 - compiler errors have no stable type; the report carries them
        message = str(exc).strip().splitlines()
        report.error = f"{type(exc).__name__}: {message[-1] if message else ''}"[:500]
    else:
        usage = _resources(compiled.asm["cubin"])
        report.registers = usage.get("REG")
        report.local_bytes = usage.get("LOCAL", 0) + usage.get("STACK", 0) if usage else None
        report.shared_bytes = int(compiled.metadata.shared)
        report.ptx = compiled.asm.get("ptx")
    report.seconds = time.perf_counter() - start
    return report


def compile_all(launches: List[Launch], arch: int = 90,
                progress: Optional[Callable[[CompileReport], None]] = None) -> List[CompileReport]:
    """:func:`compile_launch` for each launch, in order."""
    reports = []
    for launch in launches:
        reports.append(compile_launch(launch, arch))
        if progress is not None:
            progress(reports[-1])
    return reports


def format_table(reports: List[CompileReport]) -> str:
    """A text table: kernel, the constants and launch options (num_warps, ...) that tell its launches
    apart, registers, local memory (spills), shared memory, compile seconds, status."""
    varying: Dict[str, set] = {}
    for name in {r.launch.name for r in reports}:
        values: Dict[str, set] = {}
        for r in reports:
            if r.launch.name == name:
                for key, value in {**r.constants, **r.launch.options()}.items():
                    values.setdefault(key, set()).add(repr(value))
        varying[name] = {key for key, seen in values.items() if len(seen) > 1}
    head = ["kernel", "variant", "arch", "registers", "local B", "shared B", "compile s", "status"]
    rows = [head]
    for r in reports:
        variant = " ".join(f"{k}={v}" for k, v in sorted({**r.constants, **r.launch.options()}.items())
                           if k in varying[r.launch.name])
        rows.append([r.launch.name, variant or "-", f"sm_{r.arch}",
                     str(r.registers if r.registers is not None else "-"),
                     str(r.local_bytes if r.local_bytes is not None else "-"),
                     str(r.shared_bytes if r.shared_bytes is not None else "-"), f"{r.seconds:.1f}",
                     "ok" if r.ok else str(r.error)])
    widths = [max(len(row[c]) for row in rows) for c in range(len(head) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows)


# ---------------------------------------------------------------------------------- scenarios
def _message_scenario(*, dtype, filters="gemm", vector_cutoff=False, given=False, attn="silu", filter_act="silu",
                      sender_side="sorted", tables=False, launch=None):
    """One ET message call at TorchMD-NET's MD17 sizes (F = 128, H = 8, K = 32) on a few atoms
    with masked and padding rows and a self edge (every pair both ways, so the call may declare
    the list symmetric; the values are random: this is compiled, not checked), forward, the
    force-evaluation backward (inputs only) and the training backward (filter weights too).
    ``tables``: the filters interpolated from tables in the edge length (forces only: tables
    have no weight gradients). ``launch``: other :class:`~torchmdx.kernels.message_triton.LaunchConfig`
    fields (block_edges, num_warps, table_storage, ...)."""

    def run():
        from torchmdx.kernels import message_triton

        g = torch.Generator().manual_seed(0)
        heads, f, k, n = 8, 128, 32, 4
        pairs = [(0, 1), (0, 2), (1, 0), (1, 3), (2, 0), (3, 1)]
        padding = 2
        edge_index = torch.tensor([[a for a, _ in pairs] + [n - 1] * padding,
                                   [b for _, b in pairs] + [n - 1] * padding])
        e = edge_index.shape[1]
        mask = torch.ones(e, dtype=torch.bool)
        mask[1] = mask[4] = False  # the pair (0, 2) both ways
        mask[len(pairs):] = False
        r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
        q, key, v, vec = r(n, f), r(n, f), r(n, 3 * f), r(n, 3, f)
        unit = torch.nn.functional.normalize(torch.randn(e, 3, generator=g, dtype=torch.float64), dim=-1)
        unit = unit.to(dtype).requires_grad_()
        phi = torch.rand(e, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        self_loop = (r(f), r(3 * f), torch.tensor(1.0, dtype=dtype))
        kwargs = dict(edge_mask=mask, self_loop=self_loop, attn_activation=attn, vector_cutoff=vector_cutoff)
        old = message_triton.CONFIG
        message_triton.CONFIG = message_triton.LaunchConfig(filters=filters, sender_side=sender_side, **(launch or {}))
        kwargs["symmetric"] = True
        try:
            for weights in ((False,) if tables else (False, True)):
                if tables:
                    from torchmdx.kernels.filter_table import FilterTable

                    lengths = (0.5 + 4 * torch.rand(e, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
                    key_table, value_table = (FilterTable(torch.randn(64, 4, c, generator=g, dtype=torch.float64).to(dtype),
                                                          0.0, 5.0) for c in (f, 3 * f))
                    m, u = message_triton.FusedMessage(symmetric=True).tabulated(
                        q, key, v, vec, lengths, key_table, value_table, phi, unit, edge_index, heads, **{
                            name: value for name, value in kwargs.items() if name != "symmetric"})
                    inputs = [q, key, v, vec, lengths, phi, unit]
                elif given:
                    dk, dv = r(e, f), r(e, 3 * f)
                    m, u = message_triton.et_message(q, key, v, vec, dk, dv, phi, unit, edge_index, heads, **kwargs)
                    inputs = [q, key, v, vec, dk, dv, phi, unit]
                else:
                    rbf = torch.rand(e, k, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
                    wk, bk, wv, bv = r(f, k), r(f), r(3 * f, k), r(3 * f)
                    m, u = message_triton.et_message_filtered(q, key, v, vec, rbf, wk, bk, wv, bv, phi, unit,
                                                              edge_index, heads, filter_activation=filter_act,
                                                              **kwargs)
                    inputs = [q, key, v, vec, rbf, phi, unit] + ([wk, bk, wv, bv] if weights else [])
                torch.autograd.grad((m.sum() + u.sum(),), inputs)
        finally:
            message_triton.CONFIG = old

    return run


def _neighbor_scenario(*, periodic, method, capacity, device_check=False):
    """A Triton neighbor list of 40 random atoms (cutoff 5 Å) in a 12 Å box, open or periodic,
    brute force or cell list, exact or fixed capacity; then the displacement check of the MD skin.
    ``device_check``: two periodic structures of 20 atoms with the cell geometry built on the
    device (``cell_check="device"``: the captured training step's general kernel flags)."""

    def run():
        from torchmdx.kernels import neighbors_triton

        g = torch.Generator().manual_seed(1)
        pos = torch.rand(40, 3, generator=g, dtype=torch.float64).float() * 12.0
        cell = torch.eye(3) * 12.0 if periodic else None
        pbc = torch.tensor([True, True, True]) if periodic else None
        if device_check:
            batch = torch.arange(2).repeat_interleave(20)
            neighbors_triton.neighbor_list(pos, 5.0, batch, cell.expand(2, 3, 3), pbc.expand(2, 3), method=method,
                                           max_pairs=2000, cell_check="device")
            return
        neighbors_triton.neighbor_list(pos, 5.0, cell=cell, pbc=pbc, method=method,
                                       max_pairs=2000 if capacity else None)
        neighbors_triton.needs_rebuild(pos + 0.1, pos, 1.0, cell=cell, pbc=pbc)

    return run


def scenarios() -> Dict[str, Callable[[], None]]:
    """Named computations whose launches are compiled: the message step as the model runs it
    (float32 with the filters from one product, inside the kernels or from tables, vector cutoff, the
    sender side merged into the receiver kernel or from the reverse edges, given filters, float64 for
    tests) and the neighbor lists (brute / cell, open / periodic, exact / fixed capacity)."""
    out = {
        "message float32 gemm": _message_scenario(dtype=torch.float32),
        "message float32 gemm vector-cutoff": _message_scenario(dtype=torch.float32, vector_cutoff=True),
        "message float32 gemm merged": _message_scenario(dtype=torch.float32, sender_side="merged"),
        "message float32 kernel": _message_scenario(dtype=torch.float32, filters="kernel"),
        "message float32 given": _message_scenario(dtype=torch.float32, given=True),
        "message float64 gemm": _message_scenario(dtype=torch.float64),
        "message float32 table": _message_scenario(dtype=torch.float32, tables=True, vector_cutoff=True),
        "message float32 table merged": _message_scenario(dtype=torch.float32, tables=True, vector_cutoff=True,
                                                          sender_side="merged"),
        "message float32 table reverse": _message_scenario(dtype=torch.float32, tables=True, vector_cutoff=True,
                                                           sender_side="reverse"),
        # the launch-table entries of frozen models on Hopper (2026-12-07) and the compact tables
        "message float32 table merged 4x1": _message_scenario(dtype=torch.float32, tables=True, vector_cutoff=True,
                                                              sender_side="merged",
                                                              launch=dict(block_edges=4, num_warps=1)),
        "message float32 table reverse 8x2": _message_scenario(dtype=torch.float32, tables=True, vector_cutoff=True,
                                                               sender_side="reverse",
                                                               launch=dict(block_edges=8, num_warps=2)),
        "message float32 table compact": _message_scenario(dtype=torch.float32, tables=True, vector_cutoff=True,
                                                           launch=dict(table_storage="compact")),
    }
    for periodic in (False, True):
        for method in ("brute", "cell"):
            for capacity in (False, True):
                name = f"neighbors {'periodic' if periodic else 'open'} {method}{' capacity' if capacity else ''}"
                out[name] = _neighbor_scenario(periodic=periodic, method=method, capacity=capacity)
    for method in ("brute", "cell"):
        out[f"neighbors periodic {method} device-check"] = _neighbor_scenario(periodic=True, method=method,
                                                                             capacity=True, device_check=True)
    return out


def record_scenarios(names: Optional[List[str]] = None) -> List[Launch]:
    """Run the named scenarios (all by default) under the interpreter and return their distinct
    launches, in first-launch order."""
    launches: List[Launch] = []
    table = scenarios()
    for name in names or list(table):
        with record_launches(launches):
            table[name]()
    return launches


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m torchmdx.kernels.compile_check [--arch 90 [--arch 80]] [--json FILE]
    [--only SUBSTRING]``: record the scenarios' launches under the interpreter (a subprocess),
    compile each for the architectures, print the table; exit 1 if one failed to compile."""
    import argparse
    import json
    import os
    import sys
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m torchmdx.kernels.compile_check", description=main.__doc__)
    parser.add_argument("--arch", type=int, action="append", help="CUDA compute capability x10 (default 90)")
    parser.add_argument("--json", help="write the reports here as JSON")
    parser.add_argument("--only", default="", help="scenarios whose name contains this")
    parser.add_argument("--record", help=argparse.SUPPRESS)  # internal: the interpreter subprocess
    args = parser.parse_args(argv)
    names = [name for name in scenarios() if args.only in name]
    if args.record:
        launches = record_scenarios(names)
        with open(args.record, "w") as handle:
            json.dump([launch.to_json() for launch in launches], handle)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.json")
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "torchmdx.kernels.compile_check", "--record", path, "--only", args.only]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "recording failed", file=sys.stderr)
            return 2
        with open(path) as handle:
            launches = [Launch.from_json(item) for item in json.load(handle)]
    reports = []
    for arch in args.arch or [90]:
        reports += compile_all(launches, arch, progress=lambda r: print(
            f"  {r.launch.name} sm_{r.arch}: {'ok' if r.ok else r.error} ({r.seconds:.1f} s)", flush=True))
    print(format_table(reports))
    if args.json:
        from torchmdx.io_utils import atomic_write

        rows = [dict(kernel=r.launch.name, arch=r.arch, registers=r.registers, local_bytes=r.local_bytes,
                     shared_bytes=r.shared_bytes, seconds=round(r.seconds, 2), error=r.error,
                     constants={k: v for k, v in r.constants.items()}) for r in reports]
        with atomic_write(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    raise SystemExit(main())
