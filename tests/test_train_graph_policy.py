"""The captured step's host-side capacity policy with the background compile, driven on the CPU
(torchmdx.train.graphed_sim): a shape sent to a compile child keeps its capacity, so no compile
goes stale (the cause of ANI-1x's stale shapes: 2026-12-06, docs/training.md)."""

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
