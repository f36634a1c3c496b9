"""bench/count_step_ops.py: kernel-like operations of a training step, counted on the CPU."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_counts_the_three_parts_without_views():
    spec = importlib.util.spec_from_file_location("count_step_ops", ROOT / "bench" / "count_step_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parts = module.count_step(batch_size=2, atoms=5)
    forward, forces, double = (sum(ops.values()) for ops in parts.values())
    assert 0 < forward < forces < double  # each derivative order costs more kernels than the last
    for ops in parts.values():
        assert not set(ops) & module.NO_KERNEL
    # the ET-MD17 model: 6 layers, each applies SiLU in its filters and update (at least once per layer)
    assert parts["forward"]["silu"] >= 6 and parts["loss backward (double backward)"]["silu_backward"] >= 6
