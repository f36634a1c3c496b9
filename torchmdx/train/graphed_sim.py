"""The host-side capacity policy of :class:`~torchmdx.train.graphed.GraphedTrainStep`, driven on
the CPU without a GPU (tests, bench/sim_capacity.py).

:class:`SimulatedStep` is a :class:`GraphedTrainStep` whose device parts (the eager step on the
side stream, the capture, the replay, the learning-rate copy) are replaced by host stand-ins that
know each batch's true pair count (given with the batch: per-structure pair counts of a data set
are fixed, so a batch's pairs are their sum). Everything that decides (the shape's graph and
capacity, warm-up, capacity choice, growth ahead of a batch, growth after an overflow in
:meth:`check`, the background compile's request / settle / stale / switch decisions in
:class:`~torchmdx.train.precompile.BackgroundCompile`) is the real code. A compile child is a
stand-in too: it finishes ``compile_steps`` steps after it started.

:func:`simulate` runs epochs of random batches (packed into size buckets as
:class:`~torchmdx.data.packing.DeviceBatchLoader` does) and returns the per-shape record: when
each signature was requested (step, capacity), every capacity change (step, old, new, why),
which signatures went stale, and how many steps replayed a compiled graph.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from torchmdx.train.graphed import GraphedTrainStep
from torchmdx.train.graphed_common import BatchShape
from torchmdx.train.precompile import BackgroundCompile, Signature

__all__ = ["SimulatedCompile", "SimulatedStep", "simulate", "epoch_batches"]


class _Child:
    """Stand-in for a compile child's ``Popen``: done ``steps`` simulated steps after its start."""

    def __init__(self, clock, sigs, done: Path, steps: int):
        self.clock, self.sigs, self.done, self.finish = clock, list(sigs), done, clock() + int(steps)
        self.pid = 0
        self._written = False

    def poll(self):
        if self.clock() < self.finish:
            return None
        if not self._written:
            with open(self.done, "a") as out:
                for sig in self.sigs:
                    out.write(json.dumps(asdict(sig)) + "\n")
            self._written = True
        return 0


class SimulatedCompile(BackgroundCompile):
    """:class:`BackgroundCompile` whose children are :class:`_Child` stand-ins; records requests
    and stale verdicts in ``events`` (step, kind, signature)."""

    def __init__(self, clock, compile_steps: int, workdir: str, max_children: int = 4,
                 settle_steps: Optional[int] = None, times_file=None):
        super().__init__(None, workdir=workdir, max_children=max_children, settle_steps=settle_steps)
        self.clock, self.compile_steps = clock, int(compile_steps)
        self.times_file = times_file  # the host's record of compile times (None: none)
        self.events: list[tuple] = []

    def request(self, sig: Signature) -> None:
        if self.failure is None and sig not in self._requested:
            self.events.append((self.clock(), "requested", sig))
        super().request(sig)

    def poll(self, live=None):
        def watched(sig):
            verdict = live(sig)
            if verdict is False:
                self.events.append((self.clock(), "stale", sig))
            return verdict

        done = super().poll(None if live is None else watched)
        for sig in done:
            self.events.append((self.clock(), "compiled", sig))
        return done

    def _start(self, sigs: list) -> None:
        folder = self._folder()
        self.requests += 1
        done, log = folder / f"request{self.requests}.done", folder / f"request{self.requests}.log"
        done.unlink(missing_ok=True)
        self._running.append((_Child(self.clock, sigs, done, self.compile_steps), list(sigs), time.monotonic(), log,
                              done))
        for sig in sigs:
            self.events.append((self.clock(), "started", sig))
        self.log.append(f"compiling {len(sigs)} batch shape(s) of the training step in the background")


class SimulatedStep(GraphedTrainStep):
    """A :class:`GraphedTrainStep` on the CPU whose device parts are host stand-ins (module
    docstring). Give each batch's true pair count in :attr:`pairs` before :meth:`step`."""

    def __init__(self, *, pair_headroom: Optional[float] = 1.1, warmup_steps: int = 2, max_shapes: int = 8,
                 background: bool = True, compile_steps: int = 7000, settle_steps: Optional[int] = None,
                 max_children: int = 4, workdir: Optional[str] = None, time_left=None, times_file=None):
        model = torch.nn.Linear(1, 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        super().__init__(model, optimizer, lambda *a: None, forces=False, pair_headroom=pair_headroom,
                         warmup_steps=warmup_steps, max_shapes=max_shapes, capture=True, distributed=False)
        self.enabled, self.disabled_reason, self.guarded = True, None, True
        self.clock_steps = 0
        self.pairs = 0
        self.compiled_steps = 0  # steps run through a background-compiled graph
        self.rows = self.real_pairs = 0  # pair rows replayed (capacities) and real pairs in them
        self.changes: list[tuple] = []  # (step, key, old capacity, new capacity, why)
        self._seen: dict = {}
        if background:
            self.background = SimulatedCompile(lambda: self.clock_steps, compile_steps,
                                               workdir or tempfile.mkdtemp(prefix="torchmdx_sim_"),
                                               max_children=max_children, settle_steps=settle_steps,
                                               times_file=times_file)
            if time_left is not None:  # time_left(step) -> seconds the run has left at that simulated step
                self.background.time_left = lambda: time_left(self.clock_steps)

    # ------------------------------------------------------------------ device stand-ins
    def _sync_lr(self) -> None:
        pass

    def _changed_binding(self):
        return None

    def _signature(self, graph, capacity: int) -> Signature:
        return Signature(graph.key[0], graph.key[1], int(capacity), bool(graph.key[2]), False, "float32", "cuda:0")

    def _traced_call(self, graph, capacity, capturing: bool) -> bool:
        if self.background is None or capacity is None:
            return False
        with self.background.step():
            return self.background.usable(self._signature(graph, capacity), capturing)

    def _side_step(self, graph, capacity, traced):
        compiled = self._traced_call(graph, capacity, False) if traced else False
        self.compiled_steps += int(compiled and (capacity is None or self.pairs <= capacity))
        return None, int(self.pairs)

    def _capture(self, graph) -> None:
        graph.compiled = self._traced_call(graph, graph.capacity, True)
        graph.graph, graph.outputs = object(), None
        self.stats["captures"] += 1

    def _replay(self, graph):
        flag = int(self.pairs > graph.capacity)
        s = self.status.tolist()
        self.status.copy_(torch.tensor([s[0] + flag, flag, max(s[2], int(self.pairs))]))
        self.stats["replays"] += 1
        self.rows += graph.capacity
        self.real_pairs += min(int(self.pairs), graph.capacity)
        self.compiled_steps += int(getattr(graph, "compiled", False) and not flag)
        return None

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    # ------------------------------------------------------------------ record of capacity changes
    def _watch(self, why: str) -> None:
        for key, graph in self._graphs.items():
            old = self._seen.get(key)
            if old is not None and graph.capacity != old:
                self.changes.append((self.clock_steps, key, old, graph.capacity, why))
            self._seen[key] = graph.capacity

    def _grow_ahead(self, graph, shape) -> None:
        super()._grow_ahead(graph, shape)
        self._watch("grown ahead of a batch with more predicted pairs")

    def check(self) -> dict:
        self._watch("step")
        out = super().check()
        self._watch("overflow seen by check()")
        return out

    def sim_step(self, shape: BatchShape, pairs: int) -> None:
        """One training step of a batch of this shape with ``pairs`` pairs."""
        self.pairs = int(pairs)
        dummy = torch.zeros(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.step(dummy, dummy, dummy.long(), dummy, shape=shape)
        self._watch("step (warm-up choice, eager overflow)")
        self.clock_steps += 1


def epoch_batches(n: int, batch_size: int, rng: np.random.Generator) -> list:
    """One shuffled epoch of positions 0..n-1 in batches (the last may be smaller)."""
    order = rng.permutation(n)
    return [order[k:k + batch_size] for k in range(0, n, batch_size)]


def simulate(counts, pairs, batch_size: int, epochs: int, *, buckets=None, seed: int = 0, check_every: int = 50,
             **step_args) -> dict:
    """Drive :class:`SimulatedStep` over ``epochs`` random epochs of structures with ``counts``
    atoms and ``pairs`` neighbor pairs each, packed into ``buckets`` (None:
    :func:`~torchmdx.data.packing.atom_buckets`). Returns ``{"step": the SimulatedStep,
    "events": background events, "changes": capacity changes, "stale": stale signatures,
    "requests": {key: [(step, capacity)]}, "steps": steps run, "buckets": buckets}``."""
    from torchmdx.data.packing import atom_buckets, bucket_for

    counts, pairs = np.asarray(counts, dtype=np.int64), np.asarray(pairs, dtype=np.int64)
    if buckets is None:
        buckets = atom_buckets(counts, batch_size, seed=seed)
    sim = SimulatedStep(**step_args)
    rng = np.random.default_rng(seed + 1)
    for _ in range(epochs):
        for local in epoch_batches(counts.size, batch_size, rng):
            c = counts[local]
            atoms = bucket_for(int(c.sum()), buckets)
            shape = BatchShape(atoms=atoms, structures=batch_size + atoms, pair_bound=int((c * (c - 1)).sum()))
            sim.sim_step(shape, int(pairs[local].sum()))
            if sim.clock_steps % check_every == 0:
                sim.check()
        sim.check()
    events = sim.background.events if sim.background is not None else []
    requests: dict = {}
    for step, kind, sig in events:
        if kind == "requested":
            requests.setdefault((sig.atoms, sig.structures, sig.offsets), []).append((step, sig.pairs))
    return {"step": sim, "events": events, "changes": sim.changes, "requests": requests, "steps": sim.clock_steps,
            "stale": [sig for _, kind, sig in events if kind == "stale"], "buckets": list(buckets)}
