"""Compiling the traced training step in a background process while training goes on.

``train.cuda_graph_compile: background`` (issue 15, "compile fast, and once"). The traced,
compiled step (:class:`torchmdx.nn.traced.TracedForces` with ``training=True``) runs about
twice as fast as the captured eager step, but compiling it takes about two minutes per batch
shape on an H100 host, and a time-limited run loses more to that wait than it gains. Here the
run starts on the captured eager step at once, and a child process (``python -m
torchmdx.train.precompile SPEC``) builds the same potential from a model file, traces the same
function for the same input shapes and compiles it (forward and backward), which fills
inductor's FX-graph cache and the AOTAutograd cache (:mod:`torchmdx.nn.compile_cache`). When
the child is done, the training step switches to the traced graph: its compile in the training
process is then a cache hit (the tracing and the cache load, seconds instead of minutes: 34 ->
6.5 s for a 2-layer ET on this project's CPU), and the step is captured again.

A compiled graph is keyed by its content, so the child must trace exactly what the training
process will: the potential comes from :func:`torchmdx.nn.model_file.save_potential` of the
training model (its structure and buffers; the weights are graph inputs and do not matter),
and each request names the shapes the step's traced call will see (:class:`Signature`). Nothing
from the child is trusted beyond the cache: a child that fails or a cache that does not hit
only costs the in-process compile the run would have paid anyway (or, when the child failed,
the step stays on the eager graph with one note).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch


@dataclass(frozen=True)
class Signature:
    """The input shapes of one traced call: ``atoms`` rows of z/pos/batch, ``structures``,
    ``pairs`` edge rows (the neighbor list's capacity), whether image ``offsets`` [pairs, 3] and
    a valid-row ``mask`` [pairs] are given, and the positions' dtype and device."""

    atoms: int
    structures: int
    pairs: int
    offsets: bool
    mask: bool
    dtype: str
    device: str


def signature(z: torch.Tensor, pos: torch.Tensor, structures: int, edge_index: torch.Tensor,
              offsets: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> Signature:
    """The :class:`Signature` of a traced call with these inputs (shapes only, no device read)."""
    return Signature(int(z.shape[0]), int(structures), int(edge_index.shape[1]), offsets is not None,
                     mask is not None, str(pos.dtype).replace("torch.", ""), str(pos.device))


class BackgroundCompile:
    """Requests for compiled traced steps, served by one child process at a time.

    ``request(sig)`` queues a signature (once); ``poll()`` (host only: a ``Popen.poll``) starts
    the next child when none runs and returns the signatures that became ready since the last
    poll; ``ready(sig)``: has a child compiled it; ``usable(sig, capturing)``: may the training
    step run the traced graph for it now (requests it if not); ``log`` / ``news()``: one line per
    finished child and per switch; ``failure``: the first child's error line, after which nothing
    more is requested.
    """

    def __init__(self, potential, workdir: Optional[str] = None, python: str = sys.executable):
        self.potential = potential
        self.workdir = Path(workdir) if workdir is not None else None
        self.python = python
        self.failure: Optional[str] = None
        self.log: list[str] = []
        self._model_file: Optional[Path] = None
        self._queued: list[Signature] = []
        self._requested: set = set()
        self._ready: set = set()
        self._warm: set = set()
        self.loading: Optional[float] = None
        self._said = 0
        self._running: Optional[tuple] = None  # (Popen, [Signature], started, log path)

    def request(self, sig: Signature) -> None:
        if self.failure is None and sig not in self._requested:
            self._requested.add(sig)
            self._queued.append(sig)

    def ready(self, sig: Signature) -> bool:
        return sig in self._ready

    def usable(self, sig: Signature, capturing: bool) -> bool:
        """May a step with this signature run the traced graph now? Only once the child has
        compiled it, and inside a CUDA-graph capture only after an eager call here has loaded it
        (nothing may compile during a capture). A signature not compiled yet is requested."""
        if sig not in self._ready:
            self.request(sig)
            return False
        if capturing:
            return sig in self._warm
        if sig not in self._warm:
            self._warm.add(sig)
            self.loading = time.monotonic()  # the caller's first traced call loads the graph
        return True

    def loaded(self) -> None:
        """After the first traced call of a signature: log how long loading it took (a cache
        hit: seconds; a miss would be the whole compile, which the log then shows)."""
        if self.loading is not None:
            self.log.append(f"switched a batch shape to the compiled step; loading it took "
                            f"{time.monotonic() - self.loading:.1f} s")
            self.loading = None

    def news(self) -> list[str]:
        """Log lines not yet returned by this method."""
        lines, self._said = self.log[self._said:], len(self.log)
        return lines

    @property
    def busy(self) -> bool:
        return self._running is not None or bool(self._queued)

    def poll(self) -> list[Signature]:
        done: list[Signature] = []
        if self._running is not None:
            process, sigs, started, log = self._running
            code = process.poll()
            if code is None:
                return done
            self._running = None
            text = log.read_text(errors="replace") if log.is_file() else ""
            if code == 0:
                self._ready.update(sigs)
                done = list(sigs)
                self.log.append(f"compiled {len(sigs)} step shape(s) in the background in {time.monotonic() - started:.0f} s")
            else:
                last = [line for line in text.splitlines() if line.strip()]
                self.failure = (last[-1] if last else f"exit status {code}")[:200]
                self._queued.clear()
                return done
        if self._queued and self.failure is None:
            try:
                self._start(self._queued)
            except Exception as exc:  # noqa: BLE001 - no child (model file, spawn): the run goes on without it
                self.failure = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
            self._queued = []
        return done

    def wait(self, timeout: Optional[float] = None) -> list[Signature]:
        """Poll until nothing is queued or running, or ``timeout`` s have passed (tests); returns
        what became ready."""
        done, deadline = [], None if timeout is None else time.monotonic() + timeout
        while True:
            done += self.poll()
            if not self.busy or self.failure is not None:
                return done
            if deadline is not None and time.monotonic() > deadline:
                return done
            time.sleep(0.2)

    def stop(self) -> None:
        """End a running child (the run is over; what it compiled so far stays in the cache)."""
        if self._running is not None:
            process = self._running[0]
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
            self._running = None
        self._queued.clear()

    # ------------------------------------------------------------------ the child
    def _folder(self) -> Path:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="torchmdx_precompile_"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self.workdir

    def _start(self, sigs: list) -> None:
        from torchmdx.nn import compile_cache
        from torchmdx.nn.model_file import save_potential

        folder = self._folder()
        if self._model_file is None:
            self._model_file = save_potential(self.potential, folder / "model.pt")
        index = len(self.log) + 1
        spec = folder / f"request{index}.json"
        spec.write_text(json.dumps({"model": str(self._model_file), "signatures": [asdict(s) for s in sigs],
                                    "settings": process_settings()}))
        log = folder / f"request{index}.log"
        env = dict(os.environ)
        root = compile_cache.ensure()  # the child writes where this process will read
        if root is not None:
            env[compile_cache.CACHE_ENV] = str(root)
        env.setdefault("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
        with open(log, "w") as out:
            process = subprocess.Popen([self.python, "-m", "torchmdx.train.precompile", str(spec)], stdout=out,
                                       stderr=subprocess.STDOUT, env=env)
        self._running = (process, list(sigs), time.monotonic(), log)
        self.log.append(f"compiling {len(sigs)} batch shape(s) of the training step in the background "
                        f"(process {process.pid}, log {log}); training goes on meanwhile")


def process_settings() -> dict:
    """The process-wide torch settings that reach compiled code (and so the compile cache's
    keys): the child takes this process's. Found by the end-to-end test: the CPU code inductor
    writes depends on the thread count, and the training process may run on other threads than
    a fresh process (the tests run on one)."""
    return {"threads": torch.get_num_threads(), "matmul_precision": torch.get_float32_matmul_precision(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "cudnn_tf32": torch.backends.cudnn.allow_tf32, "default_dtype": str(torch.get_default_dtype())}


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


def compile_signatures(potential, signatures) -> None:
    """Trace and compile ``potential``'s training graph (forward and backward) for each
    signature, as :class:`~torchmdx.train.graphed.GraphedTrainStep` will call it."""
    from torchmdx.nn.traced import TracedForces

    generator = torch.Generator().manual_seed(0)
    elements = getattr(potential, "elements", None) or [1, 6, 7, 8]
    traced = TracedForces(potential, training=True)
    for sig in signatures:
        started = time.monotonic()
        energy, forces, _ = traced(*inputs_for(sig, elements, generator))
        (energy.sum() + forces.pow(2).sum()).backward()
        print(f"compiled {sig} in {time.monotonic() - started:.1f} s", flush=True)


def main(argv=None) -> int:
    from torchmdx.nn.model_file import load_model

    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    apply_settings(spec.get("settings") or {})
    signatures = [Signature(**s) for s in spec["signatures"]]
    potential = load_model(spec["model"], device=signatures[0].device if signatures else None)
    if signatures:
        potential = potential.to(getattr(torch, signatures[0].dtype))
    potential.train()
    compile_signatures(potential, signatures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
