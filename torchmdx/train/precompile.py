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
from the child is trusted beyond the cache: a child that fails or is killed leaves its shapes
on the eager graph with one note, and the first load of a shape refuses to compile
(:func:`no_compile`), so a cache that does not hit costs the tracing and the key computation
(seconds), never an in-line compile: the shape stays eager, with one note. Each batch shape
(:class:`Signature`) is requested once, compiled once its neighbor capacity has settled
(:data:`SETTLE_STEPS`), by one of up to :func:`default_children` children running at once, and
switches on its own.

Only where it can pay (:func:`switch_payback`): given the run's time left
(:attr:`BackgroundCompile.time_left`, from Lightning's ``max_time`` and the remaining steps), no
child is started once less than a compile plus a switch's pay-back time is left, and no compiled
shape is switched to once less than the pay-back time is left; each with one line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from torchmdx.train.precompile_child import process_settings


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


#: after this many children failed (a compiler that fails for every shape), nothing more is requested
MAX_FAILED_CHILDREN = 2

#: steps a batch shape runs at one neighbor capacity before its traced graph is compiled
SETTLE_STEPS = 24


#: the compiled step's speed over the captured eager step, s: 1.55x on an H100 (ani1x-large, 2026-12-06:
#: 115 against 69-75 steps/s)
COMPILED_SPEEDUP = 1.55

#: what a switch to a compiled shape stalls the training thread (the trace, the cache load and a
#: fresh capture): 10-19 s on an H100 host (2026-12-06). The estimate until a switch of this run
#: has been timed (then their mean)
SWITCH_STALL_S = 15.0

#: a child's compile of its shapes: 93-150 s on an H100 host (2026-12-05/06). The estimate until a
#: child of this run has finished (then the longest), or, before that, while this host has none on
#: record (:data:`COMPILE_TIMES_FILE`)
COMPILE_S = 120.0

#: this host's child compile times of earlier runs (seconds, newest last; at most
#: :data:`COMPILE_TIMES_KEPT`), a JSON list beside the compile cache: a run's first estimate is the
#: longest of the last five, so a host that compiles in 30 s does not keep short runs from compiling
COMPILE_TIMES_FILE = "background_compile_times.json"
COMPILE_TIMES_KEPT = 20


def switch_payback(speedup: float = COMPILED_SPEEDUP) -> float:
    """How many switch stalls L of run time must be left for a switch to pay, with the compiled
    step s = ``speedup`` times faster: in the R s left, the eager step does R / t steps and the
    switched one (R - L) s / t, more only when R > L s / (s - 1) (2.8 L at s = 1.55)."""
    return speedup / (speedup - 1.0)


def default_children() -> int:
    """Children compiling at once: one per four cores of this process's CPU set (at least one,
    at most four): a 16-core GPU host compiles four batch shapes at a time, a 2-core machine one."""
    from torchmdx.devices import usable_cpus

    return max(1, min(4, usable_cpus() // 4))


class CacheMiss(BaseException):
    """Raised in the training process when the first call of a background-compiled graph would
    compile instead of loading it from the cache (:func:`no_compile`). A ``BaseException``, so
    that no ``except Exception`` on its way (dynamo's error wrapping, the traced graph's retry
    with fallback options) turns it into a second, in-line compile."""


@contextlib.contextmanager
def no_compile():
    """While active, inductor's code generation (``fx_codegen_and_compile``: reached only when its
    FX-graph cache did not hit, forward or backward) raises :class:`CacheMiss` instead. What a
    miss costs is then bounded by the tracing and the key computation (seconds), not the compile."""
    import torch._inductor.compile_fx as compile_fx

    original = compile_fx.fx_codegen_and_compile

    def refuse(gm, *args, **kwargs):
        raise CacheMiss("the compile cache has no entry for this graph")

    compile_fx.fx_codegen_and_compile = refuse
    try:
        yield
    finally:
        compile_fx.fx_codegen_and_compile = original


def matches(sig: Signature, key: tuple, capacity: int) -> bool:
    """Is ``sig`` the traced call of the training step's graph with ``key`` (atoms, structures,
    periodic) and neighbor ``capacity``?"""
    return (sig.atoms, sig.structures, sig.offsets, sig.pairs) == (key[0], key[1], bool(key[2]), capacity)


def describe(sig: Signature) -> str:
    return f"{sig.atoms} atoms, {sig.structures} structures, {sig.pairs} pairs{', periodic' if sig.offsets else ''}"


class BackgroundCompile:
    """Requests for compiled traced steps, served by one child process at a time.

    ``request(sig)`` queues a signature (once per run); ``poll()`` (host only: a ``Popen.poll``)
    takes what a finished child compiled (it writes one line per signature as it finishes it, so a
    killed child's earlier signatures still count) and starts the next child, for everything
    queued meanwhile; it returns the signatures that became ready. ``usable(sig, capturing)``: may
    the training step run the traced graph for it now (requests it if not). ``log`` /
    ``news()``: one line per child, per switch and per failure. A signature whose child failed
    or was killed, whose first load missed the cache (:class:`CacheMiss`) or failed, stays on the
    model's autograd (``failed``); ``failure``: set when no child can be started, or after
    :data:`MAX_FAILED_CHILDREN` failed, after which nothing more is requested.

    No warm-up of the compiler runs in this process while the child compiles: a side thread that
    paid the once-per-process compile costs (a small CPU compile) shortened the switch on an H100
    by 3 s (15.9 -> 12.9 s) but, since nothing may run beside a CUDA-graph capture, held the first
    capture until it ended: the first epoch of the ET-MD17 run took 51 s instead of 1.5 s
    (docs/benchmarks/2026-12-05-h100-e). It was removed.
    """

    def __init__(self, potential, workdir: Optional[str] = None, python: str = sys.executable,
                 max_children: Optional[int] = None, settle_steps: Optional[int] = None):
        self.potential = potential
        self.workdir = Path(workdir) if workdir is not None else None
        self.python = python
        self.failure: Optional[str] = None
        self.log: list[str] = []
        self.requests = 0  # children started
        self.failed_children = 0
        self._model_file: Optional[Path] = None
        self._queued: list[Signature] = []
        self._requested: set = set()
        self._ready: set = set()
        self._warm: set = set()
        self.failed: set = set()
        self._loading: Optional[tuple] = None  # (Signature, started, the no_compile context)
        self._said = 0
        #: children running: (Popen, [Signature], started, log path, done path) each
        self._running: list[tuple] = []
        #: most children at once (each compiles its own shapes; inductor's compile of one shape is
        #: mostly one core's work, so a 16-core host runs four beside the training process)
        self.max_children = default_children() if max_children is None else max(1, int(max_children))
        #: steps a batch shape runs at one neighbor capacity before it is compiled (:meth:`poll_step`)
        self.settle_steps = SETTLE_STEPS if settle_steps is None else max(0, int(settle_steps))
        #: seconds the run has left (a callable returning a number, or None when not known);
        #: None: always compile and switch (:meth:`pays_to_switch`, :meth:`poll`)
        self.time_left: Optional[Callable[[], Optional[float]]] = None
        self.stalls: list[float] = []  # seconds each switch of this run stalled the training thread
        self.compile_times: list[float] = []  # seconds each finished child of this run took
        #: where this host's compile times are kept (:data:`COMPILE_TIMES_FILE`; False: not looked up
        #: yet, then the compile cache's folder; None: nowhere)
        self.times_file = False
        self.declined: set = set()  # shapes not compiled, or not switched to, for lack of run time
        self._compiles_closed = False  # too little time left for any further compile

    def stall_estimate(self) -> float:
        """Seconds a switch stalls training: the mean of this run's switches, else :data:`SWITCH_STALL_S`."""
        return sum(self.stalls) / len(self.stalls) if self.stalls else SWITCH_STALL_S

    def compile_estimate(self) -> float:
        """Seconds a child takes: the longest of this run's children, else of this host's last five
        on record (:meth:`recorded_compile_times`), else :data:`COMPILE_S`."""
        if self.compile_times:
            return max(self.compile_times)
        recorded = self.recorded_compile_times()
        return max(recorded[-5:]) if recorded else COMPILE_S

    def _times_file(self) -> Optional[Path]:
        """:data:`COMPILE_TIMES_FILE` in the compile cache's folder (None: no lasting cache)."""
        if self.times_file is False:
            from torchmdx.nn import compile_cache

            root = compile_cache.ensure()
            self.times_file = None if root is None else root / COMPILE_TIMES_FILE
        return self.times_file

    def recorded_compile_times(self) -> list:
        """This host's child compile times of earlier runs (seconds, newest last); an unreadable
        record counts as none (it is an estimate only, and the next finished child rewrites it)."""
        path = self._times_file()
        try:
            values = json.loads(path.read_text()) if path is not None and path.is_file() else []
            return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]
        except (OSError, ValueError, TypeError):
            return []

    def _record_compile_time(self, seconds: float) -> None:
        self.compile_times.append(seconds)
        path = self._times_file()
        if path is None:
            return
        from torchmdx.io_utils import atomic_write

        try:
            with atomic_write(path, "w") as out:
                json.dump((self.recorded_compile_times() + [round(seconds, 1)])[-COMPILE_TIMES_KEPT:], out)
        except OSError:
            pass  # a read-only cache folder: the estimate stays this run's own

    def _left(self) -> Optional[float]:
        left = None if self.time_left is None else self.time_left()
        return float(left) if left is not None and math.isfinite(left) else None

    def pays_to_switch(self, sig: Signature) -> bool:
        """Is enough of the run left for a switch of ``sig`` to the compiled step to repay its stall
        (:func:`switch_payback` x :meth:`stall_estimate`)? Unknown time left: yes. A shape declined
        once stays on the captured eager step (the time left only shrinks), with one line."""
        if sig in self.declined:
            return False
        left, need = self._left(), switch_payback() * self.stall_estimate()
        if left is None or left >= need:
            return True
        self.declined.add(sig)
        self.log.append(f"not switching the batch shape ({describe(sig)}) to the compiled step: {left:.0f} s of the "
                        f"run left, less than the {need:.0f} s a switch (a ~{self.stall_estimate():.0f}-s stall) needs "
                        f"to repay itself; it keeps the captured eager step")
        return False

    def request(self, sig: Signature) -> None:
        if self.failure is None and sig not in self._requested:
            self._requested.add(sig)
            self._queued.append(sig)

    def ready(self, sig: Signature) -> bool:
        return sig in self._ready and sig not in self.failed

    def usable(self, sig: Signature, capturing: bool) -> bool:
        """May a step with this signature run the traced graph now? Only once the child has
        compiled it, and inside a CUDA-graph capture only after an eager call here has loaded it
        (nothing may compile during a capture). A signature not compiled yet is requested. The
        first (eager) call of a signature loads it under :func:`no_compile`, inside :meth:`step`."""
        if sig in self.failed:
            return False
        if sig not in self._ready:
            self.request(sig)
            return False
        if sig in self._warm:
            return True
        if capturing or self._loading is not None or not self.pays_to_switch(sig):
            return False
        guard = no_compile()
        guard.__enter__()
        self._loading = (sig, time.monotonic(), guard)
        return True

    @contextlib.contextmanager
    def step(self):
        """Around one training step: a signature whose load began in it (:meth:`usable`) is warm
        afterwards, with one line saying how long loading took; a :class:`CacheMiss` marks it
        failed (one line) and propagates (the caller redoes the step on the model's autograd)."""
        try:
            yield
        except CacheMiss:
            if self._loading is not None:
                sig, started = self._loading[:2]
                self.failed.add(sig)
                self.log.append(f"the compile cache missed for the background-compiled batch shape ({describe(sig)}: "
                                f"its entry does not match this process's key, found after "
                                f"{time.monotonic() - started:.1f} s); that shape keeps the model's autograd")
            raise
        else:
            if self._loading is not None and self._loading[0] not in self.failed:
                sig, started = self._loading[:2]
                self._warm.add(sig)
                self.stalls.append(time.monotonic() - started)
                self.log.append(f"switched a batch shape ({describe(sig)}) to the compiled step; loading it took "
                                f"{self.stalls[-1]:.1f} s")
        finally:
            if self._loading is not None:
                self._loading[2].__exit__(None, None, None)
                self._loading = None

    def load_failed(self, reason: str) -> None:
        """The first call of the loading signature raised (not a miss): it stays eager, one line."""
        if self._loading is not None:
            sig = self._loading[0]
            self.failed.add(sig)
            self.log.append(f"the background-compiled batch shape ({describe(sig)}) did not load ({reason}); "
                            f"that shape keeps the model's autograd")

    def holds(self, key: tuple, capacity: int) -> bool:
        """Is a compile of the shape ``key`` (atoms, structures, periodic) at neighbor ``capacity``
        running or done (and not failed)? Then :class:`~torchmdx.train.graphed.GraphedTrainStep`
        keeps that capacity (:data:`~torchmdx.train.graphed.HOLD_REQUESTED`): growing it would
        make the compile stale."""
        for sig in self._ready | {sig for child in self._running for sig in child[1]}:
            if sig not in self.failed and sig not in self.declined and matches(sig, key, capacity):
                return True
        return False

    def news(self) -> list[str]:
        """Log lines not yet returned by this method."""
        lines, self._said = self.log[self._said:], len(self.log)
        return lines

    @property
    def busy(self) -> bool:
        return bool(self._running) or bool(self._queued)

    def poll(self, live=None) -> list[Signature]:
        """Take what finished children compiled and start children for the queued signatures.

        ``live(sig)`` (optional) says what to do with a queued signature: True, compile it now;
        None, not yet (its batch shape's neighbor capacity may still grow: keep it queued); False,
        never (stale: the shape's capacity changed since it was asked for; it is forgotten, so
        that it is asked for again if that capacity comes back). Returns the signatures that
        became ready."""
        done: list[Signature] = []
        for child in list(self._running):
            process, sigs, started, log, finished = child
            code = process.poll()
            if code is None:
                continue
            self._running.remove(child)
            compiled = _finished(finished)
            ready = [sig for sig in sigs if sig in compiled]
            done += ready
            self._ready.update(ready)
            lost = [sig for sig in sigs if sig not in compiled]
            if ready:
                self._record_compile_time(time.monotonic() - started)
                self.log.append(f"compiled {len(ready)} step shape(s) in the background in "
                                f"{self.compile_times[-1]:.0f} s")
            if lost:
                self.failed.update(lost)
                self.failed_children += 1
                text = log.read_text(errors="replace") if log.is_file() else ""
                last = [line for line in text.splitlines() if line.strip()]
                why = "killed by signal " + str(-code) if code < 0 else (last[-1] if last else f"exit status {code}")
                self.log.append(f"the background compile failed for {len(lost)} batch shape(s) "
                                f"({'; '.join(describe(s) for s in lost)}): {why[:200]}; they keep the model's autograd")
                if self.failed_children >= MAX_FAILED_CHILDREN and self.failure is None:
                    self.failure = f"{self.failed_children} children failed"
                    self.log.append(f"the background compile stops: {self.failure}; shapes not compiled yet keep "
                                    f"the model's autograd")
                    self._queued.clear()
        if not self._queued or self.failure is not None:
            return done
        now, later = [], []
        for sig in self._queued:
            verdict = True if live is None else live(sig)
            if verdict:
                now.append(sig)
            elif verdict is None:
                later.append(sig)
            else:
                self._requested.discard(sig)  # stale: may be asked for again
        self._queued = later
        if now and not self._compiles_closed:
            left = self._left()
            estimate = None if left is None else self.compile_estimate()  # reads the host's record once
            need = None if left is None else estimate + switch_payback() * self.stall_estimate()
            if left is not None and left < need:
                self._compiles_closed = True
                self.log.append(f"no more batch shapes compiled in the background: {left:.0f} s of the run left, less "
                                f"than a compile (~{estimate:.0f} s) and the "
                                f"{need - estimate:.0f} s a switch then needs to repay itself; "
                                f"shapes not compiled yet keep the captured eager step")
        if self._compiles_closed:  # the time left only shrinks: these shapes stay eager
            self.declined.update(now)
            now = []
        free = self.max_children - len(self._running)
        if not now or free <= 0:
            self._queued = now + later
            return done
        # the shapes ready to compile, split over the free children in turn (one child: all of them)
        groups = [now[k::free] for k in range(min(free, len(now)))]
        for k, group in enumerate(groups):
            try:
                self._start(group)
            except Exception as exc:  # noqa: BLE001 - no child (model file, spawn): the run goes on without it
                self.failure = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
                for unstarted in groups[k:]:  # children already started keep their shapes
                    self.failed.update(unstarted)
                self.failed.update(self._queued)
                self._queued = []
                self.log.append(f"the background compile failed ({self.failure}); the step keeps the model's autograd")
                break
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
        """End the running children (the run is over; what they compiled so far stays in the cache)."""
        for process, *_ in self._running:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
        self._running = []
        self._queued.clear()

    # ------------------------------------------------------------------ for GraphedTrainStep
    def use(self, step, z, pos, structures: int, neighbors, periodic: bool) -> bool:
        """May ``step``'s traced call with these inputs run the traced graph (:meth:`usable`)?
        Makes ``step.traced`` when it does (one :class:`TracedForces` for every shape)."""
        offsets = neighbors.shifts if periodic else None  # only its presence and shape count
        sig = signature(z, pos, structures, neighbors.edge_index, offsets, neighbors.mask)
        capturing = step.enabled and torch.cuda.is_current_stream_capturing()
        if not self.usable(sig, capturing):
            return False
        if step.traced is None:
            from torchmdx.nn.traced import TracedForces

            step.traced = TracedForces(step.model, training=True)
        return True

    def poll_step(self, step) -> None:
        """Before a step of ``step``: start children, or take what finished ones compiled: those
        shapes' graphs (only theirs) are dropped, and captured again after one eager step through
        the traced graph (its load); the log's new lines become the step's notes. A shape is
        compiled only once its graph has run :attr:`settle_steps` steps at its present neighbor
        capacity (a capacity that grows later makes the compiled graph useless: ANI-1x on an H100,
        2026-12-05, grew its four buckets' capacities nine times in the first minute, and the
        child compiled a shape that was stale when it finished)."""
        def live(sig: Signature):
            for graph in step._graphs.values():
                if (sig.atoms, sig.structures, sig.offsets) == (graph.key[0], graph.key[1], bool(graph.key[2])):
                    if sig.pairs != graph.capacity:
                        return False  # its capacity grew since: stale
                    return True if graph.steps_at_capacity >= self.settle_steps else None
            return False  # its shape is gone

        ready = [sig for sig in self.poll(live) if self.pays_to_switch(sig)]
        for line in self.news():
            step._note(line)
        for graph in step._graphs.values():
            if any(matches(sig, graph.key, graph.capacity) for sig in ready):
                step._drop(graph, eager_steps=step.warmup_steps - 1)

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
        self.requests += 1
        index = self.requests
        spec, log, finished = (folder / f"request{index}.{ext}" for ext in ("json", "log", "done"))
        finished.unlink(missing_ok=True)  # a reused work folder: only this child's lines count
        spec.write_text(json.dumps({"model": str(self._model_file), "signatures": [asdict(s) for s in sigs],
                                    "settings": process_settings(), "done": str(finished)}))
        env = dict(os.environ)
        root = compile_cache.ensure()  # the child writes where this process will read
        if root is not None:
            env[compile_cache.CACHE_ENV] = str(root)
        env.setdefault("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
        with open(log, "w") as out:
            process = subprocess.Popen([self.python, "-m", "torchmdx.train.precompile_child", str(spec)], stdout=out,
                                       stderr=subprocess.STDOUT, env=env)
        self._running.append((process, list(sigs), time.monotonic(), log, finished))
        self.log.append(f"compiling {len(sigs)} batch shape(s) of the training step in the background "
                        f"(process {process.pid}, log {log}); training goes on meanwhile")


def _finished(path: Path) -> set:
    """The signatures a child wrote as compiled (one JSON object a line; a torn last line of a
    killed child is ignored)."""
    out = set()
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            out.add(Signature(**json.loads(line)))
        except (ValueError, TypeError):
            continue
    return out
