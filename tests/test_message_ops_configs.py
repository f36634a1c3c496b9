"""Every ET option through the whole-model traced graph with the fused message operators (the default for
inference graphs since 2026-12-07, nn.traced.FUSED_MESSAGE_IN_GRAPH): the graph's energies, per-atom
energies and forces against the eager model with exact filters, float64 on the CPU (the operators' torch
fallback of the same tables), for each option that changes the message or its filters. The graph must hold
one forward operator per layer (the operators' path, not the reference message)."""

from __future__ import annotations

import pytest
import torch

import torchmdx
from torchmdx.nn.traced import TracedForces

from test_message_ops import graph_nodes
from test_model_compiled import SMALL_ET  # small float64 ET: 2 layers, vector_cutoff, gated equivariant head
from test_model_compiled import _inputs as _structures  # an open and a periodic structure, one batch
from test_traced import _list

#: options of nn.config.ModelConfig that change the message, its filters or what reads them
VARIANTS = {
    "default": {},
    "keys_only": dict(distance_influence="keys"),
    "values_only": dict(distance_influence="values"),
    "no_filters": dict(distance_influence="none"),
    "plain_cutoff": dict(vector_cutoff=False),
    "attn_tanh": dict(attn_activation="tanh"),
    "attn_ssp": dict(attn_activation="ssp"),
    "filter_act_mish": dict(activation="mish"),
    "gauss_rbf": dict(rbf_type="gauss"),
    "trainable_rbf": dict(trainable_rbf=True),
    "cutoff_lower": dict(cutoff_lower=0.8),
    "no_neighbor_embedding": dict(neighbor_embedding=False),
    "scalar_head_mean": dict(output_model="scalar", reduce_op="mean"),
    "one_head": dict(num_heads=1),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_traced_graph_with_the_operators_equals_eager(name):
    model = torchmdx.build_model(dict(SMALL_ET, **VARIANTS[name])).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # frozen, as the calculator and the MD engine trace it
    z, pos, batch, cell, pbc = _structures()
    nl, offsets = _list(model, pos, batch, cell, pbc, max_pairs=120)  # capacity-padded, as the MD engine
    traced = TracedForces(model, compile=False)
    energy, forces, atomic = traced(z, pos, batch, 2, nl.edge_index, offsets, nl.mask)
    ref = model(z, pos, batch, cell, pbc, per_atom=True)
    forward, backward, _ = graph_nodes(traced)
    assert forward == backward == len(model.representation.layers)
    scale = float(ref["forces"].abs().max())
    # tables of 2 048 intervals against the exact filters: within 1e-9 (relative to the largest force)
    assert float((forces - ref["forces"]).abs().max()) <= 1e-8 * scale
    torch.testing.assert_close(energy, ref["energy"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(atomic, ref["energies"], rtol=1e-9, atol=1e-9)
