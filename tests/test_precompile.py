"""Background compilation of the traced training step (torchmdx.train.precompile,
``train.cuda_graph_compile: background``): the child process fills the compile cache so that the
training process's own compile of the same graph is a cache hit, and the training step switches
to the traced graph without changing what a step computes."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

from torchmdx.nn import ETPotential
from torchmdx.nn.traced import TracedForces
from torchmdx.train import precompile
from torchmdx.train.config import TrainConfig
from torchmdx.train.graphed import GraphedTrainStep, packed_shape, shape_from_counts
from torchmdx.train.module import training_objective
from torchmdx.train import precompile_child
from torchmdx.train.precompile import BackgroundCompile, Signature, signature
from torchmdx.train.precompile_child import inputs_for

TINY = {"embedding_dimension": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8, "cutoff_upper": 4.0, "seed": 0}
JOINT = TrainConfig(energy_weight=0.2, force_weight=0.8)


def molecules(counts, seed=0, dtype=torch.float64):
    """Structures of ``counts`` atoms (H, C, O) spread in 6 Å boxes, with random labels."""
    g = torch.Generator().manual_seed(seed)
    n = sum(counts)
    z = torch.tensor([1, 6, 8], dtype=torch.long)[torch.randint(0, 3, (n,), generator=g)]
    batch = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    grid = torch.stack(torch.meshgrid(*[torch.arange(3.0)] * 3, indexing="ij"), -1).reshape(-1, 3) * 1.6
    pos = torch.cat([grid[torch.randperm(27, generator=g)[:c]] for c in counts]).to(dtype)
    pos = pos + 0.1 * torch.rand(n, 3, generator=g, dtype=dtype)
    energy = torch.randn(len(counts), generator=g, dtype=dtype)
    forces = torch.randn(n, 3, generator=g, dtype=dtype)
    return z, pos, batch, energy, forces


def test_inputs_for_a_signature_have_its_shapes_and_valid_edges():
    sig = Signature(atoms=10, structures=3, pairs=40, offsets=True, mask=True, dtype="float32", device="cpu")
    z, pos, batch, structures, edge_index, offsets, mask = inputs_for(sig, [1, 8], torch.Generator().manual_seed(1))
    assert z.shape == (10,) and set(z.tolist()) <= {1, 8} and pos.shape == (10, 3) and pos.dtype == torch.float32
    assert structures == 3 and batch.shape == (10,) and bool((batch[1:] >= batch[:-1]).all())
    assert edge_index.shape == (2, 40) and bool((edge_index[0, 1:] >= edge_index[0, :-1]).all())
    assert not bool((edge_index[0] == edge_index[1]).any())  # no atom is its own neighbour
    assert offsets.shape == (40, 3) and mask.shape == (40,) and mask.dtype == torch.bool
    assert signature(z, pos, structures, edge_index, offsets, mask) == sig


class _FakeProcess:
    """A finished child (``code``: its exit status; negative: killed by that signal)."""

    pid = 0

    def __init__(self, code):
        self.code = code

    def poll(self):
        return self.code

    def wait(self, timeout=None):
        return self.code

    def terminate(self):
        pass


class _InstantBackground(BackgroundCompile):
    """Children that are done at the next poll, through the real :meth:`BackgroundCompile.poll`:
    each writes the signatures it 'compiled' (compiling nothing) to its done file, except those
    for which ``fail(sig)`` holds: then it ends as a killed child (SIGKILL) after the others.
    ``started``: the signatures of every child, in order."""

    def __init__(self, model, fail=None, workdir=None, max_children=1, settle_steps=0):
        super().__init__(model, workdir=workdir, max_children=max_children, settle_steps=settle_steps)
        self.fail = fail or (lambda sig: False)
        self.started = []

    def _start(self, sigs):
        self.requests += 1
        self.started.append(list(sigs))
        folder = self._folder()
        log, done = folder / f"request{self.requests}.log", folder / f"request{self.requests}.done"
        good = [sig for sig in sigs if not self.fail(sig)]
        done.write_text("".join(json.dumps(asdict(sig)) + "\n" for sig in good))
        self._running.append((_FakeProcess(0 if len(good) == len(sigs) else -9), list(sigs), 0.0, log, done))


def _uncompiled_traced(*args, **kwargs):
    """TracedForces without inductor (the traced graph run as is): same numbers, no compile time."""
    return TracedForces(*args, **{**kwargs, "compile": False})


def _pair(dtype=torch.float64):
    """A model and a copy of it with its own AdamW (the eager reference)."""
    reference = ETPotential({**TINY, "dtype": "float64"})
    model = ETPotential({**TINY, "dtype": "float64"})
    model.load_state_dict(reference.state_dict())
    return (model, torch.optim.AdamW(model.parameters(), lr=1e-3)), (reference, torch.optim.AdamW(reference.parameters(), lr=1e-3))


@pytest.mark.parametrize("fail", [False, True])
def test_background_switch_keeps_every_step_equal_to_the_eager_step_float64(monkeypatch, tmp_path, fail):
    """Steps before the switch run the model's autograd, steps after it the traced graph: the
    parameters follow the eager reference step for step (float64); a failed child leaves one note
    and the eager path."""
    import torchmdx.nn.traced as traced_module

    monkeypatch.setattr(traced_module, "TracedForces", _uncompiled_traced)
    monkeypatch.setattr(precompile, "BackgroundCompile", functools.partial(
        _InstantBackground, fail=(lambda sig: True) if fail else None, workdir=str(tmp_path)))
    (model, opt), (reference, opt_ref) = _pair()
    step = GraphedTrainStep(model, opt, functools.partial(training_objective, JOINT), traced="background")
    eager = GraphedTrainStep(reference, opt_ref, functools.partial(training_objective, JOINT))
    assert step.background is not None and step.traced is None
    used = []
    with pytest.warns(RuntimeWarning):
        for k in range(4):
            z, pos, batch, energy, forces = molecules([5, 7, 4], seed=k)
            out = step.step(z, pos, batch, energy, forces)
            ref = eager.step(z, pos, batch, energy, forces)
            assert float(out.loss) == pytest.approx(float(ref.loss), rel=1e-11), k
            used.append(step.traced is not None and step.traced.traces > 0)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    if fail:
        assert not any(used) and len(step.background.failed) == 1
        assert sum("background compile failed" in note for note in step.notes) == 1, step.notes
        assert any("killed by signal 9" in note for note in step.notes), step.notes
    else:
        # step 0 requests the shape, step 1's poll starts the child, step 2's takes the result
        assert used == [False, False, True, True]
        assert step.traced.traces == 1
        assert any("compiled 1 step shape" in note for note in step.notes)
        step.background.poll_step(step)  # the next step's poll reports the switch
        assert any("loading it took" in note for note in step.notes), step.notes


def _periodic(counts, seed):
    """:func:`molecules` in 9 Å periodic boxes (cell [B, 3, 3], pbc [B, 3])."""
    z, pos, batch, energy, forces = molecules(counts, seed=seed)
    cell = (9.0 * torch.eye(3, dtype=pos.dtype)).expand(len(counts), 3, 3).clone()
    pbc = torch.ones(len(counts), 3, dtype=torch.bool)
    return z, pos, batch, energy, forces, cell, pbc


def _batches(kind, seed):
    """(args, kwargs) of GraphedTrainStep.step for three batch shapes: a plain batch of 3
    molecules, a packed batch (a 24-atom bucket, 4 structure slots: the ANI-1x/QM9 path) and a
    periodic batch."""
    from torchmdx.data.packing import pack

    if kind == "plain":
        return molecules([5, 7, 4], seed=seed), {}
    if kind == "packed":
        counts = [3, 8, 6] if seed % 2 else [6, 4, 5]  # the first (odd seed) has the larger pair bound
        z, pos, batch, energy, forces = molecules(counts, seed=seed)
        p = pack(z, pos, energy, forces, np.array(counts), 24, 4, pad_z=1)
        return (p.z, p.pos, p.batch, p.energy, p.forces), dict(
            shape=packed_shape(p), n_atoms=p.n_atoms, structure_weight=p.structure_weight, atom_weight=p.atom_weight)
    z, pos, batch, energy, forces, cell, pbc = _periodic([6, 6], seed)
    return (z, pos, batch, energy, forces), dict(shape=shape_from_counts([6, 6], periodic=True), cell=cell, pbc=pbc)


SCHEDULE = ["plain", "packed", "plain", "periodic", "packed", "plain", "periodic", "packed", "plain", "periodic",
            "packed", "periodic"]


def test_several_batch_shapes_each_requested_once_compiled_in_turn_switched_alone(monkeypatch, tmp_path):
    """Plain, packed and periodic shapes in one run (fake children, the traced graph without
    inductor): every signature is requested once and compiled by one child at a time; each
    shape switches on its own (the plain and periodic shapes to the traced graph, each traced
    once); the child of the packed shape is killed, which leaves that shape on the model's
    autograd with one note; every step equals the eager reference (float64)."""
    import torchmdx.nn.traced as traced_module

    monkeypatch.setattr(traced_module, "TracedForces", _uncompiled_traced)
    packed_atoms = 24
    monkeypatch.setattr(precompile, "BackgroundCompile", functools.partial(
        _InstantBackground, fail=lambda sig: sig.atoms == packed_atoms, workdir=str(tmp_path)))
    (model, opt), (reference, opt_ref) = _pair()
    step = GraphedTrainStep(model, opt, functools.partial(training_objective, JOINT), traced="background")
    eager = GraphedTrainStep(reference, opt_ref, functools.partial(training_objective, JOINT))
    traced_at = {}
    with pytest.warns(RuntimeWarning):
        for k, kind in enumerate(SCHEDULE):
            args, kwargs = _batches(kind, seed=k)
            before = step.traced.traces if step.traced is not None else 0
            out = step.step(*args, **kwargs)
            ref = eager.step(*args, **kwargs)
            assert float(out.loss) == pytest.approx(float(ref.loss), rel=1e-11), (k, kind)
            if step.traced is not None and step.traced.traces > before:
                traced_at.setdefault(kind, k)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    background = step.background
    requested = [sig for child in background.started for sig in child]
    assert len(requested) == len(set(requested)) == 3  # each shape once
    # one child at a time: the packed shape, asked for while the plain one's child ran, got its own
    assert [[s.atoms for s in child] for child in background.started] == [[16], [24], [12]]
    assert {s.atoms for s in background.failed} == {packed_atoms}
    assert set(traced_at) == {"plain", "periodic"} and step.traced.traces == 2  # loaded once each
    assert traced_at["plain"] == 2 and traced_at["periodic"] == 6
    failures = [note for note in step.notes if "background compile failed" in note]
    assert len(failures) == 1 and "24 atoms" in failures[0], step.notes
    assert sum("switched a batch shape" in note for note in step.notes) == 2


def test_a_finished_child_drops_only_the_graphs_of_its_shapes(monkeypatch, tmp_path):
    """On a GPU a switch is a recapture: only the graph whose (atoms, structures, periodic,
    capacity) the child compiled is dropped; the other shapes keep replaying their graphs."""
    monkeypatch.setattr(precompile, "BackgroundCompile", functools.partial(_InstantBackground, workdir=str(tmp_path)))
    (model, opt), _ = _pair()
    step = GraphedTrainStep(model, opt, functools.partial(training_objective, JOINT), traced="background")
    for kind in ("plain", "periodic"):
        args, kwargs = _batches(kind, seed=0)
        step.step(*args, **kwargs)
    assert len(step._graphs) == 2
    for graph in step._graphs.values():
        graph.graph, graph.eager_steps = "captured", step.warmup_steps  # as if captured
    ready = [Signature(g.key[0], g.key[1], g.capacity, bool(g.key[2]), True, "float64", "cpu")
             for g in step._graphs.values() if not g.key[2]]
    background = step.background
    background._running = [(_FakeProcess(0), ready, 0.0, tmp_path / "x.log", tmp_path / "x.done")]
    (tmp_path / "x.done").write_text("".join(json.dumps(asdict(sig)) + "\n" for sig in ready))
    background._queued.clear()
    background.poll_step(step)
    dropped = {g.key[2]: g.graph is None for g in step._graphs.values()}
    assert dropped == {False: True, True: False}


def test_a_shape_is_compiled_only_after_settling_at_its_capacity_and_a_stale_one_is_forgotten(monkeypatch, tmp_path):
    """``settle_steps``: a batch shape's traced graph is compiled only after its graph ran that many
    steps at one neighbor capacity. A capacity that grows first makes the queued signature stale:
    it is never compiled (ANI-1x on an H100 compiled a shape whose capacity had grown meanwhile),
    and the signature of the new capacity is compiled once it has settled. Steps equal the eager
    reference throughout (float64)."""
    import torchmdx.nn.traced as traced_module

    monkeypatch.setattr(traced_module, "TracedForces", _uncompiled_traced)
    monkeypatch.setattr(precompile, "BackgroundCompile", functools.partial(
        _InstantBackground, workdir=str(tmp_path), settle_steps=3))
    (model, opt), (reference, opt_ref) = _pair()
    step = GraphedTrainStep(model, opt, functools.partial(training_objective, JOINT), traced="background")
    eager = GraphedTrainStep(reference, opt_ref, functools.partial(training_objective, JOINT))
    # one key (16 atoms, 3 structures): pair bounds 74 -> capacity 128, then 136 -> capacity 192
    counts = [[5, 7, 4], [5, 7, 4], [2, 12, 2], [2, 12, 2], [5, 7, 4], [2, 12, 2], [5, 7, 4]]
    background = step.background
    started_after = []
    with pytest.warns(RuntimeWarning):
        for k, c in enumerate(counts):
            z, pos, batch, energy, forces = molecules(c, seed=k)
            out = step.step(z, pos, batch, energy, forces)
            ref = eager.step(z, pos, batch, energy, forces)
            assert float(out.loss) == pytest.approx(float(ref.loss), rel=1e-11), k
            started_after.append([[sig.pairs for sig in child] for child in background.started])
    # the 128-pair signature was asked for at step 0 but only 2 steps ran at that capacity: never compiled
    assert started_after[:5] == [[]] * 5
    # the 192-pair capacity from step 2 on: steps 2, 3, 4 -> compiled at step 5's poll
    assert started_after[5] == [[192]] and started_after[6] == [[192]]
    assert background.requests == 1 and not background.failed
    assert step.traced is not None and step.traced.traces == 1  # switched at step 6
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_several_children_at_once_split_the_ready_shapes_and_each_is_polled_on_its_own(tmp_path):
    """``max_children`` 2: three ready signatures go to two children (the first two shapes each
    lead one); a queued signature whose verdict is 'not yet' waits and one that is stale is
    dropped and may be asked for again; a child that finishes frees its place for the next."""
    background = _InstantBackground(ETPotential(TINY), workdir=str(tmp_path), max_children=2)
    sigs = [Signature(10 + k, 2, 64, False, True, "float32", "cpu") for k in range(5)]
    verdict = {sigs[0]: True, sigs[1]: True, sigs[2]: True, sigs[3]: None, sigs[4]: False}
    for sig in sigs:
        background.request(sig)
    assert background.poll(verdict.get) == []
    assert [[s.atoms for s in child] for child in background.started] == [[10, 12], [11]]
    assert background._queued == [sigs[3]] and sigs[4] not in background._requested
    background.request(sigs[4])  # stale signatures may come back
    assert sigs[4] in background._queued
    verdict.update({sigs[3]: True, sigs[4]: True})
    ready = background.poll(verdict.get)  # the two children are done: their shapes, then new children
    assert sorted(s.atoms for s in ready) == [10, 11, 12]
    assert [[s.atoms for s in child] for child in background.started][2:] == [[13], [14]]
    assert sorted(s.atoms for s in background.poll()) == [13, 14] and not background.busy
    assert precompile.default_children() >= 1


def test_a_second_child_that_cannot_start_fails_only_its_own_shapes(tmp_path):
    """Two children wanted, the second cannot start (spawn error): the first keeps its shape and
    hands it over; only the second group's shape fails, with one line; nothing more is asked."""
    background = _InstantBackground(ETPotential(TINY), workdir=str(tmp_path), max_children=2)
    start = background._start

    def start_once(sigs):
        if background.started:
            raise OSError("no more processes")
        start(sigs)

    background._start = start_once
    first, second = (Signature(10 + k, 2, 64, False, True, "float32", "cpu") for k in range(2))
    background.request(first)
    background.request(second)
    assert background.poll() == []
    assert background.failed == {second} and background.failure.startswith("OSError")
    assert [line for line in background.news() if "failed" in line] == [
        "the background compile failed (OSError: no more processes); the step keeps the model's autograd"]
    assert background.poll() == [first] and background.ready(first) and not background.ready(second)


@pytest.fixture
def own_compile_cache(tmp_path):
    """An empty compile cache for this test (torchmdx.nn.compile_cache), restored afterwards."""
    from torchmdx.nn import compile_cache

    old, state = dict(os.environ), dict(compile_cache._state)
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    os.environ["TORCHMDX_COMPILE_CACHE"] = str(tmp_path / "cache")
    compile_cache._state["dir"] = None
    try:
        yield tmp_path / "cache"
    finally:
        os.environ.clear()
        os.environ.update(old)
        compile_cache._state.update(state)


def test_a_cache_miss_at_the_switch_is_caught_before_compiling(monkeypatch, tmp_path, own_compile_cache):
    """The child says it compiled the shape but the cache has no entry for the training process's
    key (here: the fake child compiled nothing). The switch's load must not compile in-line: the
    miss stops it before inductor generates code (nothing is written to the cache), the step is
    redone on the model's autograd (equal to the eager reference, float64), the shape stays there
    with one note, and is not traced again."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(precompile, "BackgroundCompile", functools.partial(_InstantBackground, workdir=str(tmp_path)))
    (model, opt), (reference, opt_ref) = _pair()
    step = GraphedTrainStep(model, opt, functools.partial(training_objective, JOINT), traced="background")
    eager = GraphedTrainStep(reference, opt_ref, functools.partial(training_objective, JOINT))
    counters.clear()
    import torch._inductor.compile_fx as compile_fx

    generated = []  # inductor's code generation as it really ran (no_compile puts a refusal in its place)
    real_codegen = compile_fx.fx_codegen_and_compile

    @functools.wraps(real_codegen)
    def counted(*args, **kwargs):
        generated.append(1)
        return real_codegen(*args, **kwargs)

    monkeypatch.setattr(compile_fx, "fx_codegen_and_compile", counted)
    with pytest.warns(RuntimeWarning):
        for k in range(5):
            z, pos, batch, energy, forces = molecules([5, 7, 4], seed=k)
            out = step.step(z, pos, batch, energy, forces)
            ref = eager.step(z, pos, batch, energy, forces)
            assert float(out.loss) == pytest.approx(float(ref.loss), rel=1e-11), k
            if k == 2:  # the switch: a trace, and no code generated (an in-line compile would have)
                assert step.traced is not None and step.traced.traces == 1
                assert not generated, f"inductor generated code {len(generated)} time(s) at the switch"
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert step.traced.traces == 1 and len(step.background.failed) == 1
    assert counters["inductor"].get("fxgraph_cache_miss", 0) >= 1
    written = [f for f in (own_compile_cache / "inductor").rglob("*") if f.is_file()]
    assert not [f for f in written if "fxgraph" in str(f) or f.suffix in (".so", ".cpp")], written
    misses = [note for note in step.notes if "compile cache missed" in note]
    assert len(misses) == 1 and not any("switched a batch shape" in note for note in step.notes), step.notes
    import torch._inductor.compile_fx as compile_fx

    assert compile_fx.fx_codegen_and_compile.__name__ == "fx_codegen_and_compile"  # the guard is gone


def test_a_child_that_cannot_start_is_a_failure_not_an_exception(tmp_path, monkeypatch):
    """The model file cannot be written (here: the work folder is a file): poll() records the
    failure, and the training step would carry on without the background compile."""
    blocker = tmp_path / "work"
    blocker.write_text("a file, not a folder")
    background = BackgroundCompile(ETPotential(TINY), workdir=str(blocker))
    background.request(Signature(12, 2, 64, False, True, "float32", "cpu"))
    assert background.poll() == []
    assert background.failure is not None and not background.busy
    background.request(Signature(13, 2, 64, False, True, "float32", "cpu"))
    assert not background.busy  # nothing more is requested after a failure


@pytest.mark.slow
def test_training_step_switches_through_a_cache_hit_of_the_real_child(tmp_path):
    """End to end on the CPU: GraphedTrainStep(traced="background") with the real child process
    and the real compiler. The training process's compile of the step's own traced call (not a
    re-creation of it) must hit the cache the child filled, and the compiled steps keep following
    the eager reference (float64)."""
    from torch._dynamo.utils import counters

    from torchmdx.nn import compile_cache

    reference = ETPotential({**TINY, "dtype": "float64"})
    model = ETPotential({**TINY, "dtype": "float64"})
    model.load_state_dict(reference.state_dict())
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    eager = GraphedTrainStep(reference, opt_ref, functools.partial(training_objective, JOINT))
    old, state = dict(os.environ), dict(compile_cache._state)
    try:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        os.environ["TORCHMDX_COMPILE_CACHE"] = str(tmp_path / "cache")
        compile_cache._state["dir"] = None
        step = GraphedTrainStep(model, opt, functools.partial(training_objective, JOINT), traced="background")
        step.background.workdir = tmp_path / "work"
        counters.clear()
        switched_at = None
        with pytest.warns(RuntimeWarning):
            for k in range(400):
                z, pos, batch, energy, forces = molecules([5, 7, 4], seed=k % 5)
                out = step.step(z, pos, batch, energy, forces)
                ref = eager.step(z, pos, batch, energy, forces)
                assert float(out.loss) == pytest.approx(float(ref.loss), rel=1e-9), k
                if step.traced is not None and step.traced.traces:
                    switched_at = k
                    break
                if step.background is None:
                    break
                step.background.wait(timeout=2.0)  # let the child work between steps
    finally:
        if getattr(step, "background", None) is not None:
            step.background.stop()
        os.environ.clear()
        os.environ.update(old)
        compile_cache._state.update(state)
    logs = "".join(p.read_text() for p in (tmp_path / "work").glob("*.log"))
    assert switched_at is not None, (step.notes, logs)
    # the switch's load refuses to compile (no_compile): a switch is a hit, a miss would be a note
    assert counters["inductor"].get("fxgraph_cache_hit", 0) >= 2, (dict(counters["inductor"]), logs)
    assert not any("compile cache missed" in note for note in step.notes), step.notes
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)


def test_a_killed_real_child_leaves_its_shape_eager_with_one_note_and_the_next_shape_gets_a_child(tmp_path):
    """A real child killed (SIGKILL) before it finished: its shape is failed (never used, not
    requested again), one line says so, and a shape asked for later still gets its own child."""
    import signal

    background = BackgroundCompile(ETPotential(TINY), workdir=str(tmp_path), max_children=1)
    first = Signature(12, 2, 64, False, True, "float32", "cpu")
    second = Signature(20, 3, 128, False, True, "float32", "cpu")
    background.request(first)
    background.poll()
    process = background._running[0][0]
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    background.request(second)
    assert background.poll() == []
    try:
        assert background.failed == {first} and background.failure is None
        assert not background.usable(first, capturing=False) and first not in background._queued
        lines = [line for line in background.news() if "failed" in line]
        assert len(lines) == 1 and "killed by signal 9" in lines[0] and "12 atoms" in lines[0], lines
        assert len(background._running) == 1 and background._running[0][1] == [second]  # its own child
    finally:
        background.stop()


def test_a_torn_last_line_of_the_done_file_is_ignored(tmp_path):
    sig = Signature(12, 2, 64, False, True, "float32", "cpu")
    done = tmp_path / "request1.done"
    done.write_text(json.dumps(asdict(sig)) + "\n" + '{"atoms": 20, "struc')
    assert precompile._finished(done) == {sig}
    assert precompile._finished(tmp_path / "missing.done") == set()


@pytest.mark.slow
def test_real_children_compile_two_shapes_in_turn_and_each_switch_hits_the_cache(tmp_path, own_compile_cache):
    """The real child and compiler with two batch shapes (plain and periodic) asked for at once:
    the second waits for the first's child, each shape switches on its own through a cache hit
    (no code generated in the training process), and the steps follow the eager reference."""
    from torch._dynamo.utils import counters

    (model, opt), (reference, opt_ref) = _pair()
    step = GraphedTrainStep(model, opt, functools.partial(training_objective, JOINT), traced="background")
    eager = GraphedTrainStep(reference, opt_ref, functools.partial(training_objective, JOINT))
    step.background.workdir = tmp_path / "work"
    counters.clear()
    switched = {}
    try:
        with pytest.warns(RuntimeWarning):
            for k in range(600):
                kind = ("plain", "periodic")[k % 2]
                args, kwargs = _batches(kind, seed=k % 4)
                before = step.traced.traces if step.traced is not None else 0
                out = step.step(*args, **kwargs)
                ref = eager.step(*args, **kwargs)
                assert float(out.loss) == pytest.approx(float(ref.loss), rel=1e-9), (k, kind)
                if step.traced is not None and step.traced.traces > before:
                    switched[kind] = k
                if len(switched) == 2 or step.background.failed:
                    break
                step.background.wait(timeout=1.0)
    finally:
        step.background.stop()
    logs = "".join(p.read_text() for p in (tmp_path / "work").glob("*.log"))
    assert set(switched) == {"plain", "periodic"}, (step.notes, logs)
    assert step.background.requests == 2 and len(list((tmp_path / "work").glob("request*.json"))) == 2
    # a switch is a hit (its load refuses to compile); forward and backward of each shape
    assert not any("compile cache missed" in note for note in step.notes), step.notes
    assert counters["inductor"].get("fxgraph_cache_hit", 0) >= 4, (dict(counters["inductor"]), logs)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)


def test_process_settings_round_trip_in_a_child():
    """What the child applies is what the training process had (threads, matmul precision, ...)."""
    settings = {**precompile_child.process_settings(), "threads": 1, "matmul_precision": "high"}
    script = ("import json, sys; from torchmdx.train import precompile_child as p; "
              "p.apply_settings(json.loads(sys.argv[1])); print(json.dumps(p.process_settings()))")
    run = subprocess.run([sys.executable, "-c", script, json.dumps(settings)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == settings


def test_the_per_backend_fp32_precision_flags_reach_the_child():
    """``torch.set_float32_matmul_precision("highest")`` in the training process reports the same
    legacy value as a fresh process ("highest") but pins the per-backend flags ('none' -> 'ieee'),
    which compiled code's cache keys read: the child must take the flags too (a full make test
    missed the cache when an earlier test in the process had called the setter)."""
    script = ("import json, sys, torch; from torchmdx.train import precompile_child as p; "
              "before = p.process_settings(); p.apply_settings(json.loads(sys.argv[1])); "
              "print(json.dumps([before, p.process_settings()]))")
    previous = {path: value for path, value in precompile_child._backend_precisions().items()}
    try:
        torch.set_float32_matmul_precision("highest")
        settings = precompile_child.process_settings()
        run = subprocess.run([sys.executable, "-c", script, json.dumps(settings)], capture_output=True, text=True,
                             timeout=120)
    finally:
        for path, value in previous.items():
            precompile_child._backend(path).fp32_precision = value
    assert run.returncode == 0, run.stderr
    before, after = json.loads(run.stdout.strip().splitlines()[-1])
    assert settings["fp32_precision"].get("cuda.matmul") == "ieee"
    assert before["fp32_precision"]["cuda.matmul"] == "none"  # a fresh process differs ...
    assert after == settings  # ... until it applies the training process's settings


def test_background_compile_leaves_room_in_the_capacity():
    """With the background compile a capacity chosen from the pairs seen gets BACKGROUND_ROOM more
    (and the bound itself when that is within BOUND_FRACTION): a compiled shape whose capacity
    grows later is stale. Without it, pair_headroom alone (both rounded to CAPACITY_ROUNDING)."""
    from types import SimpleNamespace

    from torchmdx.train.graphed import BACKGROUND_ROOM, BOUND_FRACTION, GraphedTrainStep
    from torchmdx.train.graphed_common import round_capacity

    room = GraphedTrainStep._room
    plain, background = SimpleNamespace(background=None), SimpleNamespace(background=object())
    assert room(plain, 1000, 100_000) == round_capacity(1000)
    assert room(background, 1000, 100_000) == round_capacity(int(BACKGROUND_ROOM * 1000))
    assert round_capacity(int(BACKGROUND_ROOM * 1000)) > round_capacity(1000)
    # ANI-1x-like bucket: 216 atoms of at most 11-atom molecules, bound 216 x 10 = 2160 pairs, 1536 seen
    bound = 2160
    assert bound <= BOUND_FRACTION * BACKGROUND_ROOM * 1536
    assert room(background, 1536, bound) == round_capacity(bound)
    assert room(plain, 1536, bound) == round_capacity(1536)
    # never beyond the bound
    assert room(background, 5000, 4000) == round_capacity(4000) and room(plain, 5000, 4000) == round_capacity(4000)
