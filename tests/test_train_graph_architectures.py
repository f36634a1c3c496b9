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
    # GATr with its geometric routes alive at initialisation (configs/sweep_equivariance.yaml's choice)
    "gatr_geometric": {"architecture": "gatr", "algebra": "projective", "channels": 4, "scalar_channels": 8,
                       "num_layers": 2, "num_heads": 2, "cutoff_upper": 4.0, "seed": 0,
                       "distance_normalised": True, "join_reference": "input"},
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


def inert_entries(architecture) -> dict:
    """{parameter name: bool mask} of the entries the energy and forces do not depend on, found in
    float64: an energy + force loss on two batches gives them a gradient of round-off size only
    (< 1e-14 of the largest; exact zeros too: the rows of elements absent from the batches), and moving them by 0.5 changes no energy or force (checked here,
    so that a real dependence is never hidden). GATr's and the transformer's attention key biases
    and score-bias constants were such entries (q.(k + b) shifts every score of a query alike) and
    are gone; what is left is listed in the test below."""
    model = torchmdx.build_model({**SMALL[architecture], "dtype": "float64"})
    batches = [molecules([6, 9, 5], seed=1, box=6.0), molecules([7, 4], seed=2, box=6.0)]
    for z, pos, batch, energy_ref, forces_ref in batches:
        out = model(z, pos, batch, create_graph=True, num_structures=int(batch.max()) + 1)
        (0.3 * ((out["energy"] - energy_ref) ** 2).sum() + ((out["forces"] - forces_ref) ** 2).mean()).backward()
    grads = {name: p.grad.abs() for name, p in model.named_parameters() if p.grad is not None}
    largest = max(float(g.max()) for g in grads.values())
    inert = {name: g < 1e-14 * largest for name, g in grads.items() if bool((g < 1e-14 * largest).any())}
    z, pos, batch, _, _ = batches[0]
    before = model(z, pos, batch, num_structures=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in inert:
                p[inert[name]] += 0.5
    after = model(z, pos, batch, num_structures=3)
    torch.testing.assert_close(after["energy"], before["energy"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(after["forces"], before["forces"], rtol=1e-9, atol=1e-10)
    return inert


def test_no_parameter_of_gatr_or_the_transformer_is_inert():
    """Their attention key biases and score-bias constants, which the energy cannot depend on
    (softmax is shift-invariant), are gone (torchmdx.nn.graph_attention): no parameter is inert
    as a whole, and no bias or other vector entry is. What stays inert: the embedding rows of
    elements absent from the batches (exact zeros) and, in GATr, coefficients of equivariant basis
    maps on multivector components that molecules' points leave empty (exact zeros) or reach only
    in paths that cancel (block 2 through the join: round-off), among them the whole input layer's
    grade-0-to-scalar map (an atom's point has no grade 0); the transformer has nothing else."""
    batches = [molecules([6, 9, 5], seed=1, box=6.0), molecules([7, 4], seed=2, box=6.0)]
    present = torch.unique(torch.cat([b[0] for b in batches]))
    for architecture in ("gatr", "transformer"):
        inert = inert_entries(architecture)
        model = torchmdx.build_model({**SMALL[architecture], "dtype": "float64"})
        absent = torch.ones(model.representation.embedding.weight.shape[0], dtype=torch.bool)
        absent[present] = False
        embedding = inert.pop("representation.embedding.weight")
        assert torch.equal(embedding, absent.unsqueeze(1).expand_as(embedding)), architecture
        for name, p in model.named_parameters():
            if name in inert and name != "representation.input.mv_to_s":  # GATr: points have no grade 0
                assert not bool(inert[name].all()), (architecture, name)
                assert p.dim() > 1, (architecture, name)
        if architecture == "transformer":
            assert not inert, sorted(inert)
        else:
            assert all(name.endswith((".weight", ".mv_to_s")) and "mlp.0" not in name and "mlp.2" not in name
                       and "head" not in name for name in inert), sorted(inert)


@pytest.mark.gpu
@pytest.mark.parametrize("architecture", sorted(SMALL))
def test_captured_steps_equal_eager_steps_gpu(architecture):
    inert = inert_entries(architecture)
    reference = torchmdx.build_model({**SMALL[architecture], "dtype": "float32"}).cuda()
    graphed = copy.deepcopy(reference)
    runner, stats, start, lr = captured_against_eager(reference, graphed, architecture, atoms=10, structures=6, short=4,
                                                         box=7.0)
    assert runner.disabled_reason is None, (architecture, runner.notes)
    assert (stats["captures"], stats["replays"], stats["skipped"]) == (1, 6, 0), stats
    assert_same_training(reference, graphed, start, lr, architecture, inert=inert)
