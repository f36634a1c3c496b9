"""The captured training step (``train.cuda_graph``) for the architectures other than the ET.

``train.cuda_graph: auto`` turns the captured step on only for architectures whose captured step
has been checked on a GPU (``Potential.captured_training_auto``: the ET so far). What decides it
for the others:

- CPU: the training step must have no data-dependent host work (``.item()``, boolean-mask
  indexing, shapes from tensor values): nothing of that kind can be captured in a CUDA graph.
  :class:`torchmdx.nn.traced.TracedForces` traces energy + forces with fake tensors (static
  shapes only), so a model that traces there has none; its parameter gradients of an energy +
  force loss must equal the eager double backward (float64).
- GPU (``-m gpu``): :class:`~torchmdx.train.graphed.GraphedTrainStep` (warm-up, capture, replays)
  follows the eager optimiser steps of a twin model, loss by loss and parameter by parameter.
  When it passes for an architecture, its ``captured_training_auto`` may be set.
"""

import copy

import pytest
import torch

import torchmdx
from torchmdx.kernels.neighbors import neighbor_list
from torchmdx.nn.traced import TracedForces

from test_train_graph import assert_same_training, captured_against_eager, molecules

SMALL = {
    "equiformer": {"architecture": "equiformer", "lmax": 2, "channels": 8, "num_layers": 2, "num_heads": 2,
                   "feature_channels": 16, "num_rbf": 8, "radial_hidden": [16], "cutoff_upper": 4.0, "seed": 0},
    "gatr": {"architecture": "gatr", "algebra": "projective", "channels": 4, "scalar_channels": 8, "num_layers": 2,
             "num_heads": 2, "cutoff_upper": 4.0, "seed": 0},
    "transformer": {"architecture": "transformer", "embedding_dimension": 16, "num_layers": 2, "num_heads": 2,
                    "num_rbf": 8, "bias_hidden": 16, "cutoff_upper": 4.0, "seed": 0},
}


@pytest.mark.parametrize("architecture", sorted(SMALL))
def test_training_step_traces_with_static_shapes_and_gives_the_eager_gradients(architecture):
    model = torchmdx.build_model({**SMALL[architecture], "dtype": "float64"})
    z, pos, batch, energy_ref, forces_ref = molecules([6, 9, 5], seed=1, box=6.0)
    structures = 3
    # a capacity-padded list, as the captured step builds it (masked rows past the real pairs)
    exact = neighbor_list(pos, model.cutoff, batch).edge_index.shape[1]
    nl = neighbor_list(pos, model.cutoff, batch, max_pairs=exact + 24)
    assert not bool(nl.overflow) and not bool(nl.mask.all())

    def loss_of(energy, forces):
        return 0.3 * ((energy - energy_ref) ** 2).sum() + ((forces - forces_ref) ** 2).mean()

    out = model(z, pos, batch, neighbors=nl, create_graph=True, num_structures=structures)
    loss_of(out["energy"], out["forces"]).backward()
    eager = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert eager, architecture

    traced = TracedForces(model, training=True, compile=False)  # fake-tensor trace: static shapes only
    energy, forces, _ = traced(z, pos, batch, structures, nl.edge_index, None, nl.mask)
    torch.testing.assert_close(energy, out["energy"].detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(forces, out["forces"].detach(), rtol=1e-9, atol=1e-10)
    loss_of(energy, forces).backward()
    for name, p in model.named_parameters():
        if name not in eager:
            assert p.grad is None or not bool(p.grad.any()), name
            continue
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-8, atol=1e-11, msg=f"{architecture}: {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("architecture", sorted(SMALL))
def test_captured_steps_equal_eager_steps_gpu(architecture):
    reference = torchmdx.build_model({**SMALL[architecture], "dtype": "float32"}).cuda()
    graphed = copy.deepcopy(reference)
    runner, stats, start, lr = captured_against_eager(reference, graphed, architecture, atoms=10, structures=6, short=4,
                                                         box=7.0)
    assert runner.disabled_reason is None, (architecture, runner.notes)
    assert (stats["captures"], stats["replays"], stats["skipped"]) == (1, 6, 0), stats
    assert_same_training(reference, graphed, start, lr, architecture)
