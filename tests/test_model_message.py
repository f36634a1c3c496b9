"""message_ref.et_message against a literal per-edge, per-head loop over the equations in its
docstring (float64), with self loops, masked edges, both cutoff variants and missing filters."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from torchmdx.kernels.message_ref import ACTIVATIONS, et_message




def naive_message(q, k, v, vec, dk, dv, phi, unit, edge_index, heads, mask, self_loop, act, vector_cutoff):
    n, f = q.shape
    d = f // heads
    m = torch.zeros(n, f, dtype=q.dtype)
    u = torch.zeros(n, 3, f, dtype=q.dtype)
    edges = [(int(edge_index[0, e]), int(edge_index[1, e]), e) for e in range(edge_index.shape[1])]
    if self_loop is not None:
        edges += [(a, a, None) for a in range(n)]
    for i, j, e in edges:
        if e is not None and mask is not None and not bool(mask[e]):
            continue
        if e is None:
            dk_e, dv_e, phi_e, d_e = self_loop[0], self_loop[1], float(self_loop[2]), torch.zeros(3, dtype=q.dtype)
        else:
            dk_e = None if dk is None else dk[e]
            dv_e = None if dv is None else dv[e]
            phi_e, d_e = float(phi[e]), unit[e]
        for h in range(heads):
            ch = slice(h * d, (h + 1) * d)
            score = sum(
                float(q[i, c] * k[j, c] * (1.0 if dk_e is None else dk_e[c])) for c in range(h * d, (h + 1) * d)
            )
            a = float(ACTIVATIONS[act](torch.tensor(score, dtype=q.dtype)))
            w = v[j, 3 * h * d:3 * (h + 1) * d].clone()
            if dv_e is not None:
                w = w * dv_e[3 * h * d:3 * (h + 1) * d]
            if vector_cutoff:
                w = w * phi_e
            else:
                a = a * phi_e
            s1, s2, s3 = w[:d], w[d:2 * d], w[2 * d:]
            m[i, ch] += a * s1
            for x in range(3):
                u[i, x, ch] += vec[j, x, ch] * s2 + s3 * d_e[x]
    return m, u


@pytest.mark.parametrize(
    "options",
    [
        dict(vector_cutoff=False, act="silu", with_dk=True, with_dv=True, self_loop=True, masked=True),
        dict(vector_cutoff=True, act="tanh", with_dk=True, with_dv=True, self_loop=True, masked=False),
        dict(vector_cutoff=False, act="ssp", with_dk=False, with_dv=True, self_loop=False, masked=True),
        dict(vector_cutoff=True, act="sigmoid", with_dk=True, with_dv=False, self_loop=True, masked=True),
        dict(vector_cutoff=False, act="mish", with_dk=False, with_dv=False, self_loop=True, masked=False),
    ],
)
def test_message_matches_per_edge_loop(options):
    g = torch.Generator().manual_seed(zlib.crc32(repr(sorted(options.items())).encode()))
    n, f, heads, e = 6, 8, 2, 17
    dt = torch.float64

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dt)

    q, k, v, vec = r(n, f), r(n, f), r(n, 3 * f), r(n, 3, f)
    i = torch.sort(torch.randint(0, n, (e,), generator=g)).values
    j = torch.randint(0, n, (e,), generator=g)
    j = torch.where(j == i, (j + 1) % n, j)
    edge_index = torch.stack([i, j])
    dk = r(e, f) if options["with_dk"] else None
    dv = r(e, 3 * f) if options["with_dv"] else None
    phi = torch.rand(e, generator=g, dtype=dt)
    unit = r(e, 3)
    unit = unit / unit.norm(dim=-1, keepdim=True)
    mask = torch.rand(e, generator=g) > 0.3 if options["masked"] else None
    self_loop = None
    if options["self_loop"]:
        self_loop = (r(f) if dk is not None else None, r(3 * f) if dv is not None else None, torch.tensor(0.7, dtype=dt))
    got_m, got_u = et_message(
        q, k, v, vec, dk, dv, phi, unit, edge_index, heads, edge_mask=mask, self_loop=self_loop,
        attn_activation=options["act"], vector_cutoff=options["vector_cutoff"],
    )
    want_m, want_u = naive_message(
        q, k, v, vec, dk, dv, phi, unit, edge_index, heads, mask, self_loop, options["act"], options["vector_cutoff"]
    )
    torch.testing.assert_close(got_m, want_m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_u, want_u, rtol=1e-12, atol=1e-12)


def test_masked_edges_contribute_nothing_and_need_no_valid_distance():
    """A masked edge with garbage (inf/nan-free but arbitrary) inputs changes nothing."""
    g = torch.Generator().manual_seed(0)
    n, f, heads = 4, 4, 2
    q, k = torch.randn(n, f, generator=g), torch.randn(n, f, generator=g)
    v, vec = torch.randn(n, 3 * f, generator=g), torch.randn(n, 3, f, generator=g)
    edge_index = torch.tensor([[0, 1, 3], [1, 0, 3]])
    dk, dv = torch.randn(3, f, generator=g), torch.randn(3, 3 * f, generator=g)
    phi = torch.tensor([0.5, 0.5, 0.0])
    unit = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0.0, 0, 0]])
    mask = torch.tensor([True, True, False])  # a padding row i = j = N-1
    full = et_message(q, k, v, vec, dk, dv, phi, unit, edge_index, heads, edge_mask=mask)
    trimmed = et_message(q, k, v, vec, dk[:2], dv[:2], phi[:2], unit[:2], edge_index[:, :2], heads)
    torch.testing.assert_close(full[0], trimmed[0])
    torch.testing.assert_close(full[1], trimmed[1])
    assert math.isclose(float(full[1][3].abs().sum()), 0.0)
