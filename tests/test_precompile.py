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

import pytest
import torch

from torchmdx.nn import ETPotential
from torchmdx.nn.traced import TracedForces
from torchmdx.train import precompile
from torchmdx.train.config import TrainConfig
from torchmdx.train.graphed import GraphedTrainStep
from torchmdx.train.module import training_objective
from torchmdx.train.precompile import BackgroundCompile, Signature, inputs_for, signature

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


class _InstantBackground(BackgroundCompile):
    """A background compile whose 'child' finishes at the first poll after a request (or fails)."""

    def __init__(self, model, fail=False):
        super().__init__(model)
        self.fail = fail

    def _start(self, sigs):
        self._running = ("instant", list(sigs))

    def poll(self):
        if self._running is None:
            if self._queued and self.failure is None:
                self._start(self._queued)
                self._queued = []
            return []
        _, sigs = self._running
        self._running = None
        if self.fail:
            self.failure = "RuntimeError: no compiler here"
            return []
        self._ready.update(sigs)
        self.log.append(f"compiled {len(sigs)} step shape(s) in the background in 0 s")
        return list(sigs)


def _uncompiled_traced(*args, **kwargs):
    """TracedForces without inductor (the traced graph run as is): same numbers, no compile time."""
    return TracedForces(*args, **{**kwargs, "compile": False})


@pytest.mark.parametrize("fail", [False, True])
def test_background_switch_keeps_every_step_equal_to_the_eager_step_float64(monkeypatch, fail):
    """Steps before the switch run the model's autograd, steps after it the traced graph: the
    parameters follow the eager reference step for step (float64); a failed child leaves one note
    and the eager path."""
    import torchmdx.nn.traced as traced_module

    monkeypatch.setattr(traced_module, "TracedForces", _uncompiled_traced)
    monkeypatch.setattr(precompile, "BackgroundCompile", functools.partial(_InstantBackground, fail=fail))
    reference = ETPotential({**TINY, "dtype": "float64"})
    model = ETPotential({**TINY, "dtype": "float64"})
    model.load_state_dict(reference.state_dict())
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
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
        assert not any(used) and step.background is None
        assert any("background compile failed" in note for note in step.notes)
    else:
        # step 0 requests the shape, step 1's poll starts the child, step 2's takes the result
        assert used == [False, False, True, True]
        assert step.traced.traces == 1
        assert any("compiled 1 step shape" in note for note in step.notes)
        step._poll_background()  # the next step's poll reports the switch
        assert any("loading it took" in note for note in step.notes), step.notes


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
    hits = counters["inductor"].get("fxgraph_cache_hit", 0)
    misses = counters["inductor"].get("fxgraph_cache_miss", 0)
    assert hits >= 1 and misses == 0, (dict(counters["inductor"]), logs)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)


def test_process_settings_round_trip_in_a_child():
    """What the child applies is what the training process had (threads, matmul precision, ...)."""
    settings = {**precompile.process_settings(), "threads": 1, "matmul_precision": "high"}
    script = ("import json, sys; from torchmdx.train import precompile as p; "
              "p.apply_settings(json.loads(sys.argv[1])); print(json.dumps(p.process_settings()))")
    run = subprocess.run([sys.executable, "-c", script, json.dumps(settings)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == settings
