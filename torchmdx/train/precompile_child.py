"""The compile child of :class:`torchmdx.train.precompile.BackgroundCompile`: ``python -m
torchmdx.train.precompile_child SPEC`` takes the training process's torch settings
(:func:`process_settings`, :func:`apply_settings`), loads the model file SPEC names, and traces
and compiles its training graph for each requested batch shape (:func:`compile_signatures`),
which fills the compile cache the training process then loads. The parent side (when to start a
child, when to switch a shape) is :mod:`torchmdx.train.precompile`."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:  # the parent module imports this one
    from torchmdx.train.precompile import Signature


def process_settings() -> dict:
    """The process-wide torch settings that reach compiled code (and so the compile cache's
    keys): the child takes this process's. Found by the end-to-end test: the CPU code inductor
    writes depends on the thread count, and the training process may run on other threads than
    a fresh process (the tests run on one)."""
    return {"threads": torch.get_num_threads(), "matmul_precision": torch.get_float32_matmul_precision(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "cudnn_tf32": torch.backends.cudnn.allow_tf32, "default_dtype": str(torch.get_default_dtype()),
            "fp32_precision": _backend_precisions()}


#: the per-backend float32 precision flags (newer torch); compiled code's cache keys read them
#: (``cuda_matmul_settings``), and ``torch.set_float32_matmul_precision`` pins them even when
#: the legacy value it reports does not change ("highest" before and after: 'none' -> 'ieee')
FP32_PRECISION_FLAGS = ("cuda.matmul", "mkldnn.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.conv", "mkldnn.rnn")


def _backend(path: str):
    """``torch.backends.<path>`` (e.g. "cuda.matmul"); AttributeError in a torch without it."""
    obj = torch.backends
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _backend_precisions() -> dict:
    out = {}
    for path in FP32_PRECISION_FLAGS:
        try:
            out[path] = str(_backend(path).fp32_precision)
        except AttributeError:  # an older torch without the flag
            continue
    return out


def apply_settings(settings: dict) -> None:
    """Apply :func:`process_settings` of the training process in the child; only those that
    differ are set (setting one to the value it has is not always a no-op: the matmul precision
    setter also pins the newer per-backend precision flags, which compiled code's keys see)."""
    now = process_settings()
    if settings.get("threads") and settings["threads"] != now["threads"]:
        torch.set_num_threads(int(settings["threads"]))
    if settings.get("matmul_precision") and settings["matmul_precision"] != now["matmul_precision"]:
        torch.set_float32_matmul_precision(settings["matmul_precision"])
    if "deterministic" in settings and settings["deterministic"] != now["deterministic"]:
        torch.use_deterministic_algorithms(bool(settings["deterministic"]))
    if "cudnn_tf32" in settings and settings["cudnn_tf32"] != now["cudnn_tf32"]:
        torch.backends.cudnn.allow_tf32 = bool(settings["cudnn_tf32"])
    if settings.get("default_dtype") and settings["default_dtype"] != now["default_dtype"]:
        torch.set_default_dtype(getattr(torch, settings["default_dtype"].replace("torch.", "")))
    # after the matmul precision, whose setter pins these flags (found by a test-order cache miss:
    # the training process had called the setter, the child had not)
    current = _backend_precisions()
    for path, value in (settings.get("fp32_precision") or {}).items():
        if path in current and current[path] != value:
            _backend(path).fp32_precision = value


def inputs_for(sig: Signature, elements, generator: torch.Generator) -> tuple:
    """Inputs of a traced call with this signature: (z, pos, batch, structures, edge_index,
    offsets, mask). Values are arbitrary but valid (atomic numbers of ``elements``, receivers
    sorted, no self pairs); only their shapes and dtypes reach the compiled graph's key."""
    dtype, device = getattr(torch, sig.dtype), torch.device(sig.device)
    n, b, e = sig.atoms, sig.structures, sig.pairs
    elements = torch.as_tensor(list(elements) or [1], dtype=torch.long)
    z = elements[torch.randint(0, len(elements), (n,), generator=generator)]
    pos = torch.rand(n, 3, generator=generator, dtype=torch.float64) * 4.0
    batch = torch.sort(torch.randint(0, max(b, 1), (n,), generator=generator)).values
    receivers = torch.sort(torch.randint(0, n, (e,), generator=generator)).values
    senders = (receivers + 1 + torch.randint(0, max(n - 1, 1), (e,), generator=generator)) % max(n, 1)
    edge_index = torch.stack([receivers, senders])
    offsets = torch.zeros(e, 3, dtype=dtype, device=device) if sig.offsets else None
    mask = (torch.rand(e, generator=generator) > 0.1).to(device) if sig.mask else None
    return (z.to(device), pos.to(device=device, dtype=dtype), batch.to(device), b, edge_index.to(device), offsets,
            mask)


def compile_signatures(potential, signatures, done: Optional[str] = None) -> None:
    """Trace and compile ``potential``'s training graph (forward and backward) for each
    signature, as :class:`~torchmdx.train.graphed.GraphedTrainStep` will call it; each one
    finished is appended to the file ``done`` (one JSON line, :func:`torchmdx.train.precompile._finished`)."""
    from torchmdx.nn.traced import TracedForces

    generator = torch.Generator().manual_seed(0)
    elements = getattr(potential, "elements", None) or [1, 6, 7, 8]
    traced = TracedForces(potential, training=True)
    for sig in signatures:
        started = time.monotonic()
        energy, forces, _ = traced(*inputs_for(sig, elements, generator))
        (energy.sum() + forces.pow(2).sum()).backward()
        print(f"compiled {sig} in {time.monotonic() - started:.1f} s", flush=True)
        if done is not None:
            with open(done, "a") as out:
                out.write(json.dumps(asdict(sig)) + "\n")


def main(argv=None) -> int:
    from torchmdx.nn.model_file import load_model
    from torchmdx.train.precompile import Signature

    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    apply_settings(spec.get("settings") or {})
    signatures = [Signature(**s) for s in spec["signatures"]]
    potential = load_model(spec["model"], device=signatures[0].device if signatures else None)
    if signatures:
        potential = potential.to(getattr(torch, signatures[0].dtype))
    potential.train()
    compile_signatures(potential, signatures, spec.get("done"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
