"""The captured step's host-side capacity policy with the background compile, driven on the CPU
(torchmdx.train.graphed_sim): a shape sent to a compile child keeps its capacity, so no compile
goes stale (the cause of ANI-1x's stale shapes: 2026-12-06, docs/training.md); and the run's time
left decides whether a compile or a switch can still pay (precompile.switch_payback)."""

import json

import numpy as np
import pytest

import torchmdx.train.graphed as graphed
from torchmdx.train.graphed_sim import simulate


def _variable_set(n=1200, seed=3):
    """Molecules of 3-22 atoms; most of their pairs within the cutoff (as ANI-1x at 5 A: 0.96)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(3, 23, n)
    pairs = np.floor(counts * (counts - 1) * rng.uniform(0.85, 1.0, n)).astype(np.int64)
    return counts, pairs


def _wasted(out):
    """Signatures sent to a compile child that never switched to the compiled step (their shape's
    capacity had changed: stale), or that went stale while queued after being started."""
    events, background = out["events"], out["step"].background
    started = {sig for _, kind, sig in events if kind == "started"}
    return sorted(started - background._warm, key=str) + [sig for _, kind, sig in events
                                                           if kind == "stale" and sig in started]


def _run(tmp_path, epochs=40):
    counts, pairs = _variable_set()
    return simulate(counts, pairs, 16, epochs, seed=0, compile_steps=600, workdir=str(tmp_path))


def test_requested_shapes_do_not_go_stale(tmp_path):
    out = _run(tmp_path)
    events, sim = out["events"], out["step"]
    started = [sig for _, kind, sig in events if kind == "started"]
    assert started, "nothing was sent to a compile child"
    assert _wasted(out) == []
    # each shape is compiled once: one started signature per shape
    keys = [(s.atoms, s.structures) for s in started]
    assert len(keys) == len(set(keys))
    # and the compiled graphs are used: every started shape is at the compiled capacity at the end
    for sig in started:
        graph = sim._graphs[(sig.atoms, sig.structures, False)]
        assert graph.capacity == sig.pairs
    assert sim.compiled_steps > 0.5 * out["steps"]
    # held capacities are large enough: real overflows (skipped steps) stay rare
    assert sim.stats["skipped"] <= 0.002 * out["steps"] + 2


def test_without_holding_compiles_go_stale(tmp_path, monkeypatch):
    """The policy before the fix (growth ahead of batches with larger bounds) on the same batches:
    started compiles go stale, and fewer steps run compiled (the test above can fail)."""
    held = _run(tmp_path / "held")["step"].compiled_steps
    monkeypatch.setattr(graphed, "HOLD_REQUESTED", False)
    out = _run(tmp_path / "free")
    assert _wasted(out)
    assert out["step"].compiled_steps < held


@pytest.mark.parametrize("headroom", [None, 1.0])
def test_no_background_policy_unchanged(tmp_path, headroom):
    """Without the background compile nothing is held: capacities still grow to fit (no lost steps)."""
    counts, pairs = _variable_set(n=400)
    out = simulate(counts, pairs, 16, 10, seed=0, background=False, pair_headroom=headroom)
    sim = out["step"]
    assert "held" not in sim.stats
    # capacities still grow after being chosen (ahead of batches, or after an overflow)
    assert any(old > 0 and new > old for _, _, old, new, _ in out["changes"])


def test_hold_released_after_many_overflows(tmp_path, monkeypatch):
    """Held capacities that overflow too often (here: any overflow counts) grow again, with one note."""
    counts, pairs = _variable_set()
    monkeypatch.setattr(graphed, "HOLD_SKIP_FRACTION", 0.0)
    monkeypatch.setattr(graphed, "HOLD_MIN_SKIPPED", 1)
    # pairs of some structures far above what the warm-up batches show: held capacities overflow
    pairs = pairs.copy()
    pairs[::7] = counts[::7] * (counts[::7] - 1)
    pairs[::50] *= 3
    out = simulate(counts, pairs, 16, 40, seed=0, compile_steps=600, workdir=str(tmp_path))
    sim = out["step"]
    assert sim.stats["skipped"] >= 1
    assert sim._hold_off
    assert any("may grow again" in note for note in sim.notes)
    started_at = {}
    for step, kind, sig in out["events"]:
        if kind == "started":
            started_at.setdefault((sig.atoms, sig.structures, False), step)
    assert any(step > started_at.get(key, 1e9) and new > old for step, key, old, new, _ in out["changes"])


# ---------------------------------------------------------------- the time-left rule
def _one_shape(tmp_path, total_steps, compile_steps, seconds_per_step=1.0, epochs=8):
    """One batch shape (equal molecules), ``total_steps`` steps in all at ``seconds_per_step``."""
    counts = np.full(400, 10)
    pairs = counts * (counts - 1)
    return simulate(counts, pairs, 16, epochs, seed=0, compile_steps=compile_steps, workdir=str(tmp_path),
                    time_left=lambda step: (total_steps - step) * seconds_per_step)


def test_a_compile_that_ends_with_time_to_repay_the_switch_is_used(tmp_path):
    """200 one-second steps, the compile requested at ~step 26 (170 s left >= 120 s compile +
    2.8 x 15 s) and done 50 steps later (~124 s left >= 42 s): switched, most steps compiled."""
    out = _one_shape(tmp_path, 200, compile_steps=50)
    sim = out["step"]
    assert [kind for _, kind, _ in out["events"]].count("started") == 1
    assert sim.background._warm and not sim.background.declined
    assert sim.compiled_steps > 0.5 * out["steps"]


def test_a_compile_that_ends_too_late_is_not_switched_to(tmp_path):
    """The same run, the compile done 150 steps later (~24 s left < 2.8 x 15 s): the shape keeps
    the captured eager step (no stall for nothing), with one line saying why."""
    out = _one_shape(tmp_path, 200, compile_steps=150)
    sim, background = out["step"], out["step"].background
    assert [kind for _, kind, _ in out["events"]].count("compiled") == 1
    assert not background._warm and len(background.declined) == 1
    assert sim.compiled_steps == 0
    lines = [note for note in sim.notes if note.startswith("not switching the batch shape")]
    assert len(lines) == 1 and "s of the run left, less than the 42 s" in lines[0], sim.notes


def test_a_run_too_short_to_repay_a_compile_starts_no_child(tmp_path):
    """100 s in all (< 120 s compile + 42 s pay-back): nothing is compiled, one line says so."""
    out = _one_shape(tmp_path, 100, compile_steps=10)
    sim = out["step"]
    assert [kind for _, kind, _ in out["events"]].count("started") == 0
    assert sim.compiled_steps == 0 and sim.background.declined
    assert sum(note.startswith("no more batch shapes compiled in the background") for note in sim.notes) == 1


def test_unknown_time_left_compiles_and_switches_as_before(tmp_path):
    counts = np.full(400, 10)
    out = simulate(counts, counts * (counts - 1), 16, 8, seed=0, compile_steps=150, workdir=str(tmp_path))
    assert out["step"].background._warm and not out["step"].background.declined


def test_switch_payback_is_the_break_even_of_the_stall():
    """Staying eager does R / t steps in R s; switching (R - L) s / t: equal at R = L s / (s - 1)."""
    from torchmdx.train.precompile import switch_payback

    for s in (1.2, 1.55, 3.0):
        r = switch_payback(s) * 10.0  # L = 10 s
        assert (r - 10.0) * s == pytest.approx(r)
    assert switch_payback() == pytest.approx(1.55 / 0.55)


class _Trainer:
    def __init__(self, total, callbacks=()):
        self.global_step, self.callbacks, self._total = 0, list(callbacks), total

    @property
    def estimated_stepping_batches(self):
        if isinstance(self._total, Exception):
            raise self._total
        return self._total


def test_run_time_left_from_steps_left_and_max_time():
    from lightning.pytorch.callbacks import Timer

    from torchmdx.train.module_runner import RunTimeLeft

    now = [100.0]
    trainer = _Trainer(1000)
    left = RunTimeLeft(trainer, clock=lambda: now[0])
    assert left() is None  # first call: nothing timed yet
    trainer.global_step, now[0] = 10, 101.0
    assert left() is None  # fewer than MIN_STEPS steps timed
    trainer.global_step, now[0] = 100, 110.0  # 0.1 s per step, 900 steps left
    assert left() == pytest.approx(90.0)
    timer = Timer(duration="00:00:01:00")
    timer.time_remaining = lambda stage=None: 30.0  # Lightning's max_time remainder
    trainer.callbacks.append(timer)
    assert left() == pytest.approx(30.0)  # the smaller
    # no step bound Lightning can count (an iterable loader, or it cannot tell): max_time only
    for total in (float("inf"), RuntimeError("no length")):
        other = RunTimeLeft(_Trainer(total, [timer]), clock=lambda: now[0])
        other.trainer.global_step = 0
        other()
        other.trainer.global_step, now[0] = 500, 200.0
        assert other() == pytest.approx(30.0)
    assert RunTimeLeft(_Trainer(float("inf")), clock=lambda: now[0])() is None


def test_run_time_left_inside_a_real_lightning_fit(tmp_path):
    """RunTimeLeft against Lightning itself (its Timer and estimated_stepping_batches during fit):
    unknown before 20 timed steps, then at most max_time's remainder, shrinking."""
    import lightning.pytorch as pl
    import torch

    from torchmdx.train.module_runner import RunTimeLeft

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(64, 2), batch_size=2)

    seen = []

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            if not hasattr(self, "left"):
                self.left = RunTimeLeft(trainer)
            seen.append((trainer.global_step, self.left()))

    trainer = pl.Trainer(max_epochs=2, max_time="00:00:10:00", callbacks=[Watch()], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path), accelerator="cpu")
    trainer.fit(Tiny())
    assert len(seen) == 64
    early = [left for step, left in seen if step < RunTimeLeft.MIN_STEPS]
    late = [left for step, left in seen if step >= RunTimeLeft.MIN_STEPS]
    assert all(left is not None and 0 < left <= 600 for left in early)  # the Timer's remainder
    # 64 steps in all: from step 20 the steps left x seconds per step (well under 10 minutes here)
    assert all(left is not None and left < 60 for left in late), late
    assert late[-1] < late[0]


def test_a_hosts_recorded_compile_times_set_the_next_runs_estimate(tmp_path):
    """A finished child's time is kept beside the compile cache; the next run's first estimate is the
    longest of the last five on record, not the 120-s default: a run of 100 s on a host that compiles
    in 20 s does compile (it did not above, with no record); an unreadable record counts as none."""
    from torchmdx.train import precompile
    from torchmdx.train.graphed_sim import SimulatedCompile

    record = tmp_path / precompile.COMPILE_TIMES_FILE
    background = SimulatedCompile(lambda: 0, 10, str(tmp_path / "w1"), times_file=record)
    assert background.compile_estimate() == precompile.COMPILE_S  # nothing on record
    for seconds in (30.0, 18.0, 25.0, 19.0, 20.0, 21.0):
        background._record_compile_time(seconds)
    assert json.loads(record.read_text()) == [30.0, 18.0, 25.0, 19.0, 20.0, 21.0]
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [record.name]  # no temporary file left
    fresh = SimulatedCompile(lambda: 0, 10, str(tmp_path / "w2"), times_file=record)
    assert fresh.compile_estimate() == 25.0  # the longest of the last five: 18, 25, 19, 20, 21
    record.write_text("{not json")
    assert fresh.recorded_compile_times() == [] and fresh.compile_estimate() == precompile.COMPILE_S

    # the short run of test_a_run_too_short_to_repay_a_compile_starts_no_child, on a host with a record
    record.write_text(json.dumps([20.0]))
    counts = np.full(400, 10)
    out = simulate(counts, counts * (counts - 1), 16, 8, seed=0, compile_steps=10, workdir=str(tmp_path / "w3"),
                   time_left=lambda step: 100.0 - step, times_file=record)
    assert [kind for _, kind, _ in out["events"]].count("started") == 1
    assert out["step"].compiled_steps > 0
