"""Langevin noise under the MD engine's atom order (``md.atom_order``): the per-atom noise is
drawn in the input order and then permuted, so a sorted run follows the unsorted one with the
same seed (float64, CPU), not merely another valid trajectory."""

from __future__ import annotations

import numpy as np
import torch

from test_locality import _cut, _Frames, small_model


def _langevin_frames(structures, order, seed=3):
    from torchmdx.md.engine import Simulation

    sim = Simulation(small_model(4), structures, ensemble="langevin", friction_per_ps=50.0, timestep_fs=0.5,
                     dtype=torch.float64, temperature_K=300.0, max_temperature_K=1e7, seed=seed, atom_order=order)
    rep = _Frames()
    sim.run(12, reporters=[rep], every=3)
    return sim, rep.frames


def test_langevin_trajectory_is_the_same_in_any_atom_order(shared_data):
    # two structures in one batch: the order is a permutation within each structure
    structures = [_cut(shared_data, radius=5.0), _cut(shared_data, radius=4.0)]
    ref_sim, ref = _langevin_frames(structures, "input")
    srt_sim, srt = _langevin_frames(structures, "hilbert")
    assert ref_sim.atom_perm is None
    n = sum(len(a) for a in structures)
    assert srt_sim.atom_perm is not None and not np.array_equal(srt_sim.atom_perm, np.arange(n))
    assert [o.step for o in srt] == [o.step for o in ref] == [0, 3, 6, 9, 12]
    for a, b in zip(ref, srt):
        for key in ("positions", "velocities", "forces"):
            np.testing.assert_allclose(getattr(b, key), getattr(a, key), rtol=0, atol=1e-9, err_msg=f"{key} {a.step}")
        np.testing.assert_allclose(b.potential, a.potential, rtol=0, atol=1e-9)
    # the noise matters at this tolerance: another seed gives a visibly different trajectory
    _, other = _langevin_frames(structures, "input", seed=4)
    assert np.abs(other[-1].velocities - ref[-1].velocities).max() > 1e-4
    assert np.abs(ref[-1].positions - ref[0].positions).max() > 1e-4  # the atoms moved
