"""Equiformer's grouped fast paths (torchmdx/nn/equiformer/fast.py, the layer norm, gate, leaky ReLU
and segment softmax fast paths) against their references beside them: e3nn's own code for the
linear layers, tensor products and gates, the per-degree loops for the layer norm, the -inf
masked softmax; in float64 on random inputs, for single modules and for whole models (energy,
forces, and the parameter gradients of a force loss, the double backward), including irreps with
both parities, repeated and non-adjacent blocks, linear messages, lmax 1 and 3, padded neighbor
lists and batches. The parameter layout (state_dict keys and shapes) is the one before the fast
paths, so model files written before load unchanged.
"""

import contextlib
import hashlib

import pytest
import torch
from e3nn import o3

import torchmdx
from torchmdx.kernels.neighbors import neighbor_list
from torchmdx.nn.equiformer.fast import DepthwiseTensorProductPlan, GroupedGate, GroupedLinear
from torchmdx.nn.equiformer.layers import (
    DepthwiseTensorProduct,
    EquivariantLayerNorm,
    SmoothLeakyReLU,
    gate,
    reference_ops,
)
from torchmdx.nn.equiformer.model import segment_softmax

F64 = torch.float64
TINY = {"architecture": "equiformer", "lmax": 2, "channels": 8, "num_layers": 2, "num_heads": 2,
        "feature_channels": 16, "num_rbf": 8, "radial_hidden": [16], "cutoff_upper": 4.0,
        "dtype": "float64", "seed": 0}


@contextlib.contextmanager
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def randomise(module, seed):
    """Non-trivial values for every parameter (layer norms start at weight 1, bias 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def both(fn):
    """fn() on the fast path and on the reference path."""
    fast = fn()
    with reference_ops():
        reference = fn()
    return fast, reference


@pytest.mark.parametrize("irreps_in, irreps_out, biases", [
    ("8x0e+4x1o+2x2e", "8x0e+4x1o+2x2e", True),
    ("8x0e+4x1o+2x2e", "6x0e+3x1o", False),
    # repeated, non-adjacent blocks (a tensor product's output), an unused input and several outputs
    # of one degree (scalars then gates)
    ("4x0e+4x1o+4x2e+2x1o+2x0e+2x2e+3x1e+2x2e", "5x0e+3x0e+2x1o+3x2e", True),
    ("3x0e+2x0o+2x1o+2x1e", "2x1e+4x0e+1x0o+3x1o+2x2e", True),
    ("2x1o", "3x1o", False),
])
def test_grouped_linear_equals_e3nn_linear(irreps_in, irreps_out, biases):
    with float64_default():
        linear = randomise(GroupedLinear(irreps_in, irreps_out, biases=biases), 1)
        reference = o3.Linear(irreps_in, irreps_out, biases=biases)
    reference.load_state_dict(linear.state_dict())
    x = torch.randn(7, linear.irreps_in.dim, dtype=F64, requires_grad=True)
    fast = linear(x)
    expected = reference(x)
    torch.testing.assert_close(fast, expected, rtol=1e-12, atol=1e-12)
    with reference_ops():
        torch.testing.assert_close(linear(x), expected, rtol=0, atol=0)
    # gradients w.r.t. input and weights
    probe = torch.randn_like(fast)
    grads = torch.autograd.grad((fast * probe).sum(), [x, linear.weight])
    grads_ref = torch.autograd.grad((expected * probe).sum(), [x, reference.weight])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("irreps_in, lmax, target, internal", [
    ("8x0e+4x1o+2x2e", 2, "8x0e+4x1o+2x2e", False),
    ("6x0e", 2, "6x0e+2x1o+2x2e", False),
    ("4x0e+2x0o+2x1e+2x1o", 1, "4x0e+2x0o+2x1e+2x1o", True),
    ("4x0e+4x1o+4x2e+2x3o", 3, "4x0e+4x1o+4x2e+2x3o", False),
])
def test_depthwise_tensor_product_equals_e3nn(irreps_in, lmax, target, internal):
    with float64_default():
        dtp = DepthwiseTensorProduct(irreps_in, o3.Irreps.spherical_harmonics(lmax), target, internal_weights=internal)
        randomise(dtp, 2)
    assert isinstance(dtp.plan, DepthwiseTensorProductPlan)
    edges = 11
    x = torch.randn(edges, dtp.irreps_in.dim, dtype=F64, requires_grad=True)
    vec = torch.randn(edges, 3, dtype=F64, requires_grad=True)
    sh = o3.spherical_harmonics(dtp.irreps_sh, vec, normalize=True, normalization="component")
    w = None if internal else torch.randn(edges, dtp.weight_numel, dtype=F64, requires_grad=True)
    fast, reference = both(lambda: dtp(x, sh, w))
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
    probe = torch.randn_like(fast)
    inputs = [x, vec] + ([dtp.tp.weight] if internal else [w])
    for a, b in zip(*both(lambda: torch.autograd.grad((dtp(x, sh, w) * probe).sum(), inputs, retain_graph=True))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("irreps", ["8x0e+4x1o+2x2e", "4x0e+2x0o+2x1e+2x1o+2x2e", "6x0e", "4x0e+3x1o+2x0e"])
def test_gate_layer_norm_and_leaky_relu_equal_their_references(irreps):
    with float64_default():
        act = gate(irreps)
        norm = randomise(EquivariantLayerNorm(irreps), 3)
    if o3.Irreps(irreps).lmax > 0 or "0o" in irreps:
        assert isinstance(act, GroupedGate)
    x = torch.randn(9, act.irreps_in.dim, dtype=F64, requires_grad=True)
    for module, inp in [(act, x), (norm, torch.randn(9, norm.irreps.dim, dtype=F64, requires_grad=True)),
                        (SmoothLeakyReLU(0.2), torch.randn(9, 5, dtype=F64, requires_grad=True))]:
        fast, reference = both(lambda: module(inp))
        torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
        probe = torch.randn_like(fast)
        params = [inp] + list(module.parameters())
        grads = both(lambda: torch.autograd.grad((module(inp) * probe).sum(), params))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_segment_softmax_equals_its_reference_with_invalid_edges_and_empty_segments():
    g = torch.Generator().manual_seed(5)
    index = torch.tensor([0, 0, 0, 2, 2, 3, 3, 3, 3, 5])  # segments 1 and 4: no edges
    valid = torch.tensor([1, 1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.bool)  # segment 3: invalid only
    weight = torch.rand(10, generator=g, dtype=F64) * valid
    weight[4] = 0.0  # an edge at the cutoff
    z = (30 * torch.randn(10, 3, generator=g, dtype=F64)).requires_grad_(True)
    fast, reference = both(lambda: segment_softmax(z, weight, index, valid, 6))
    torch.testing.assert_close(fast, reference, rtol=1e-13, atol=1e-15)
    assert fast[~valid].abs().max() == 0 and torch.isfinite(fast).all()
    probe = torch.randn_like(fast)
    grads = both(lambda: torch.autograd.grad((segment_softmax(z, weight, index, valid, 6) * probe).sum(), z)[0])
    torch.testing.assert_close(*grads, rtol=1e-12, atol=1e-14)


def random_batch(seed, n=(9, 6), width=4.5):
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(1, 10, (sum(n),), generator=g)
    pos = torch.cat([torch.rand(k, 3, generator=g, dtype=F64) * width + 30.0 * i for i, k in enumerate(n)])
    batch = torch.repeat_interleave(torch.arange(len(n)), torch.tensor(n))
    return z, pos, batch


@pytest.mark.parametrize("overrides", [
    {},
    {"nonlinear_message": False, "channels": 16, "num_heads": 4},
    {"irreps_node": "8x0e+4x0o+4x1e+4x1o+2x2e", "num_heads": 2},
    {"lmax": 1, "rbf_type": "bessel"},
    {"lmax": 3, "channels": 16, "num_layers": 1},
])
def test_model_energy_forces_and_training_gradients_equal_the_reference(overrides):
    """Whole models on a batch of two random structures with a padded neighbor list (invalid rows):
    energies and forces to ~1e-10, and the parameter gradients of an energy + force loss (the
    double backward through the forces)."""
    model = torchmdx.build_model({**TINY, **overrides, "seed": 3})
    randomise(model.representation, 4)  # layer norms, biases: not at their initial values
    model.set_normalisation(scale=0.9, shift=0.1)
    z, pos, batch = random_batch(7)
    nl = neighbor_list(pos, model.cutoff, batch, max_pairs=len(z) * (len(z) - 1) + 13)
    assert not nl.mask.all()

    def run():
        model.zero_grad(set_to_none=True)
        out = model(z, pos, batch, neighbors=nl, num_structures=2, create_graph=True)
        loss = (out["energy"] ** 2).sum() + (out["forces"] ** 2).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out["energy"].detach(), out["forces"].detach(), grads

    (e, f, grads), (e_ref, f_ref, grads_ref) = both(run)
    assert f_ref.abs().max() > 1e-3
    torch.testing.assert_close(e, e_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-10)
    assert grads.keys() == grads_ref.keys() and len(grads) > 20
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-9, atol=1e-10, msg=name)


def test_state_dict_layout_is_the_one_before_the_fast_paths():
    """Keys and shapes of TINY's state_dict as written by the e3nn-only implementation (commit
    46785b4): the fast paths' index tensors and matrices are non-persistent buffers, so model files
    written before load (strictly) and give the same numbers."""
    model = torchmdx.build_model(TINY)
    state = model.state_dict()
    text = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(state.items()))
    assert len(state) == 130
    assert hashlib.sha256(text.encode()).hexdigest() == "8d251f37ac7395dc950578db71e2c2242d522a4a971e5b57c682c34f40ad5466"
    other = torchmdx.build_model({**TINY, "seed": 9})
    other.load_state_dict(state, strict=True)
    z, pos, batch = random_batch(2, n=(7,))
    e1 = model(z, pos)["energy"]
    with reference_ops():
        e2 = other(z, pos)["energy"]
    torch.testing.assert_close(e1, e2, rtol=1e-12, atol=1e-12)
