"""GATr's restructured layers (one matrix product per equivariant linear map, products of
multivectors as outer products times a flattened table, the norm without per-grade sums where
the inner product is definite, the point features as one batched product, the softmax
normalised after the sum, the radial basis shared by the blocks) compute the function of the
formulation they replaced. That formulation is written out here, independently, on the same
parameters: the linear maps as the einsum of the weights with the basis, the products by the
algebra's dense [D, D, D] tables, per-grade norms, the point features channel by channel,
graph_attention's softmax and sum. Energies and forces agree to 1e-10 in float64 for every
algebra, with and without the join, the distance-aware attention and the sign average."""

import math

import numpy as np
import pytest
import torch
from ase.build import molecule

import torchmdx
from torchmdx.nn.gatr.algebra import ALGEBRAS
from torchmdx.nn.gatr.model import _trivector_point_readout
from torchmdx.nn.graph_attention import (aggregate, cutoff_weights, edge_scores, edge_softmax, query_key_value_bias,
                                         with_self_edges)

F64 = torch.float64


def _t(a):
    return torch.as_tensor(np.array(a), dtype=F64)


def old_linear(layer, mv, s=None):
    ga = layer.buffers_[0].algebra
    D = ga.dim
    matrix = torch.einsum("oim,mab->oaib", layer.weight, _t(ga.linear_basis)).reshape(layer.out_mv * D, -1)
    out = (mv.reshape(*mv.shape[:-2], -1) @ matrix.T).reshape(*mv.shape[:-2], layer.out_mv, D)
    grade0 = query_key_value_bias(layer.mv_bias) if layer.qkv else layer.mv_bias
    if layer.s_to_mv is not None and s is not None:
        grade0 = grade0 + s @ layer.s_to_mv.T
    out = torch.cat([out[..., :1] + grade0.unsqueeze(-1), out[..., 1:]], dim=-1)
    s_out = None
    if layer.mv_to_s is not None:
        s_out = mv[..., 0] @ layer.mv_to_s.T
        if layer.scalar is not None and s is not None:
            s_out = s_out + layer.scalar(s)
        elif layer.s_bias is not None:
            s_out = s_out + (query_key_value_bias(layer.s_bias) if layer.qkv else layer.s_bias)
    return out, s_out


def old_norm(norm, mv, s):
    ga = norm.buffers_[0].algebra
    onehot = np.zeros((ga.dim, ga.n + 1))
    onehot[np.arange(ga.dim), ga.grades] = 1.0
    per_grade = (mv * mv * _t(ga.inner_weights)) @ _t(onehot)
    squared = per_grade.abs().sum(-1).mean(-1, keepdim=True)
    mv = mv / torch.sqrt(squared + norm.eps).unsqueeze(-1)
    return mv, (norm.scalar_norm(s) if norm.scalar_norm is not None else s)


def old_bilinear(bilinear, mv, reference):
    ga = bilinear.buffers_[0].algebra
    both, _ = old_linear(bilinear.left_right, mv)
    g, j = bilinear.gp_channels, bilinear.join_channels
    out = torch.einsum("...i,...j,ijk->...k", both[..., :g, :], both[..., g:2 * g, :], _t(ga.gp))
    if j:
        joined = torch.einsum("...i,...j,ijk->...k", both[..., 2 * g:2 * g + j, :], both[..., 2 * g + j:, :], _t(ga.join))
        out = torch.cat([out, joined * reference.unsqueeze(-1).unsqueeze(-1)], dim=-2)
    return out


def old_point_features(att, name, mv):
    w_index, w_sign, p_index, p_sign = _trivector_point_readout(name)
    N = mv.shape[0]
    w = mv[..., w_index] * w_sign
    p = mv[..., p_index] * torch.tensor(p_sign, dtype=F64)
    p2 = (p * p).sum(-1)
    phi = torch.cat([(w * w).unsqueeze(-1), p2.unsqueeze(-1), w.unsqueeze(-1) * p], dim=-1)
    psi = torch.cat([-p2.unsqueeze(-1), -(w * w).unsqueeze(-1), 2.0 * w.unsqueeze(-1) * p], dim=-1)
    return phi.reshape(N, att.H, -1), psi.reshape(N, att.H, -1)


def old_attention(att, name, mv, s, receivers, senders, phi, distances):
    ga = att.buffers_[0].algebra
    N, C, S, H, D = mv.shape[0], att.C, att.S, att.H, att.dim
    qkv_mv, qkv_s = old_linear(att.qkv, mv, s)
    q_mv, k_mv, v_mv = qkv_mv[:, :C], qkv_mv[:, C:2 * C], qkv_mv[:, 2 * C:]
    q_s, k_s, v_s = qkv_s[:, :S], qkv_s[:, S:2 * S], qkv_s[:, 2 * S:]
    queries = [(q_mv * _t(ga.inner_weights)).reshape(N, H, -1), q_s.reshape(N, H, -1)]
    keys = [k_mv.reshape(N, H, -1), k_s.reshape(N, H, -1)]
    if att.distance:
        q_phi, _ = old_point_features(att, name, q_mv)
        _, k_psi = old_point_features(att, name, k_mv)
        queries.append(q_phi * att.distance_scale.view(1, H, 1))
        keys.append(k_psi)
    features = (C // H) * D + S // H + (5 * (C // H) if att.distance else 0)
    scores = edge_scores(torch.cat(queries, -1), torch.cat(keys, -1), receivers, senders) / math.sqrt(features)
    if att.radial is not None:
        scores = scores + att.radial(distances)
    alpha = edge_softmax(scores, receivers, phi, N)
    out = aggregate(alpha, torch.cat([v_mv.reshape(N, H, -1), v_s.reshape(N, H, -1)], dim=-1), receivers, senders, N)
    c = C // H
    return old_linear(att.out, out[..., :c * D].reshape(N, C, D), out[..., c * D:].reshape(N, S))


def old_representation(rep, z, pos, batch, num_structures, edge_index, distances, mask=None, return_hidden=False):
    name = rep.algebra_name
    N = z.shape[0]
    points, s = rep.embed(z, pos, batch, num_structures)
    phi = cutoff_weights(distances, rep.attention_cutoff, mask)
    receivers, senders, phi = with_self_edges(edge_index, phi, N)
    lengths = torch.cat([distances, torch.zeros(N, dtype=distances.dtype)])
    copies = 2 if rep.config.averages_sign else 1
    if copies == 2:
        points, s = torch.cat([points, -points]), torch.cat([s, s])
        receivers, senders = torch.cat([receivers, receivers + N]), torch.cat([senders, senders + N])
        phi, lengths = torch.cat([phi, phi]), torch.cat([lengths, lengths])
    mv, s = old_linear(rep.input, points, s)
    for block in rep.blocks:
        a_mv, a_s = old_attention(block.attention, name, *old_norm(block.norm1, mv, s), receivers, senders, phi, lengths)
        mv, s = mv + a_mv, s + a_s
        mlp = block.mlp
        n_mv, n_s = old_norm(block.norm2, mv, s)
        reference = n_mv[..., mlp.pseudoscalar].mean(-1)
        m, h = old_linear(mlp.first, n_mv, n_s)
        x = old_bilinear(mlp.bilinear, m, reference)
        x = x * torch.nn.functional.gelu(x[..., :1])
        m_mv, m_s = old_linear(mlp.last, x, torch.nn.functional.gelu(h))
        mv, s = mv + m_mv, s + m_s
    mv, s = old_norm(rep.final_norm, mv, s)
    y = rep.readout(mv, s)
    return 0.5 * (y[:N] + y[N:]) if copies == 2 else y


def molecules():
    zs, ps, bs = [], [], []
    for b, formula in enumerate(["CH3CH2OH", "H2O", "CH3CHO"]):
        atoms = molecule(formula)
        atoms.rattle(0.05, seed=b)
        zs.append(torch.tensor(atoms.numbers))
        ps.append(torch.tensor(atoms.positions, dtype=F64))
        bs.append(torch.full((len(atoms),), b))
    return torch.cat(zs), torch.cat(ps), torch.cat(bs)


CASES = [(name, {}) for name in ALGEBRAS] + [
    ("projective", {"join": False, "distance_aware": False, "sign_average": False}),
    ("euclidean", {"join": True, "radial_bias": False}),
    ("conformal", {"join": True, "cutoff_upper": None, "mlp_multiplier": 3}),
]


@pytest.mark.parametrize("name, overrides", CASES)
def test_energies_and_forces_equal_the_replaced_formulation(name, overrides):
    model = torchmdx.build_model({"architecture": "gatr", "algebra": name, "channels": 4, "scalar_channels": 8,
                                  "num_layers": 2, "num_heads": 2, "cutoff_upper": 3.0, "dtype": "float64",
                                  "seed": 1, **overrides})
    model.set_normalisation(atomref={1: -13.6, 6: -1029.0, 8: -2040.0}, scale=0.7, shift=0.05)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # biases away from their zero initialisation, so that every term is tested
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    z, pos, batch = molecules()
    new = model(z, pos, batch, num_structures=3)
    rep = model.representation
    forward = rep.forward
    rep.forward = lambda *args, **kwargs: old_representation(rep, *args, **kwargs)
    try:
        old = model(z, pos, batch, num_structures=3)
    finally:
        rep.forward = forward
    assert new["energy"].dtype == F64 and old["forces"].abs().max() > 1e-2
    torch.testing.assert_close(new["energy"], old["energy"], rtol=0, atol=1e-10)
    torch.testing.assert_close(new["forces"], old["forces"], rtol=0, atol=1e-10)
    # and the comparison can fail: a perturbed parameter moves the energies far beyond it
    with torch.no_grad():
        rep.blocks[0].mlp.first.weight.add_(1e-3)
    moved = model(z, pos, batch, num_structures=3)["energy"]
    assert (moved - old["energy"]).abs().max() > 1e-8
