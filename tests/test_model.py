"""ET potential: symmetry, finite differences, periodic images, cutoff smoothness, batching,
masked / padded neighbor lists, force training, dipole head, normalisation, errors (float64, CPU).
"""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms

from torchmdx.errors import ConfigError, ModelError, NeighborListError, TorchmdxError
from torchmdx.kernels.neighbors_ref import neighbor_list
from torchmdx.nn import ETPotential, build_model




SMALL = dict(embedding_dimension=16, num_layers=2, num_heads=4, num_rbf=8, dtype="float64")


def small_model(seed=0, perturb=True, **overrides) -> ETPotential:
    """A small float64 ET whose biases, LayerNorm weights etc. are moved off their initial
    values, so every parameter influences the result."""
    model = ETPotential({**SMALL, "seed": seed, **overrides})
    if perturb:
        g = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("means", "offset")):
                    continue
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def random_molecule(n, seed, box=4.5, min_dist=0.9, elements=(1, 6, 7, 8)):
    rng = np.random.default_rng(seed)
    pos = []
    while len(pos) < n:
        p = rng.uniform(0, box, 3)
        if all(np.linalg.norm(p - q) > min_dist for q in pos):
            pos.append(p)
    z = rng.choice(elements, n)
    return torch.tensor(z), torch.tensor(np.array(pos))


def random_rotation(seed, reflect=False):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q @ np.diag(np.sign(np.diag(r)))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    if reflect:
        q = q @ np.diag([1.0, 1.0, -1.0])
    return torch.tensor(q)


def evaluate(model, z, pos, **kw):
    out = model(z, pos, **kw)
    return out["energy"].detach(), out["forces"].detach()


HEADS = [
    dict(),
    dict(output_model="gated_equivariant", vector_cutoff=True, rbf_type="gauss", neighbor_embedding=False),
    dict(distance_influence="keys", attn_activation="tanh", activation="ssp", cutoff_lower=0.6),
]


# ------------------------------------------------------------------------------ symmetry
@pytest.mark.parametrize("variant", range(len(HEADS)))
def test_random_molecules_invariance_and_equivariance(variant):
    model = small_model(seed=variant, **HEADS[variant])
    for case in range(3):
        z, pos = random_molecule(12, seed=10 * variant + case)
        e0, f0 = evaluate(model, z, pos)
        for reflect in (False, True):
            rot = random_rotation(case, reflect)
            shift = torch.tensor([1.3, -7.2, 40.0], dtype=torch.float64)
            e1, f1 = evaluate(model, z, pos @ rot.T + shift)
            torch.testing.assert_close(e1, e0, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(f1, f0 @ rot.T, rtol=1e-8, atol=1e-9 * float(f0.abs().max()))
        perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(case))
        e2, f2 = evaluate(model, z[perm], pos[perm])
        torch.testing.assert_close(e2, e0, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(f2, f0[perm], rtol=1e-8, atol=1e-9 * float(f0.abs().max()))
        assert float(f0.abs().max()) > 1e-3  # forces are not trivially zero


@pytest.mark.parametrize("name", ["alanine_dipeptide", "caffeine", "testosterone", "chignolin"])
def test_real_structures_symmetry(shared_data, name):
    atoms = ase.io.read(shared_data / "systems" / f"{name}.xyz")
    model = small_model(seed=3, output_model="gated_equivariant")
    z = torch.tensor(atoms.get_atomic_numbers())
    pos = torch.tensor(atoms.get_positions())
    e0, f0 = evaluate(model, z, pos)
    rot = random_rotation(7, reflect=True)
    e1, f1 = evaluate(model, z, pos @ rot.T - 3.0)
    scale = float(f0.abs().max())
    assert abs(float(e1 - e0)) <= 1e-6 * abs(float(e0))
    torch.testing.assert_close(f1, f0 @ rot.T, rtol=0, atol=1e-6 * scale)
    perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(1))
    e2, f2 = evaluate(model, z[perm], pos[perm])
    assert abs(float(e2 - e0)) <= 1e-6 * abs(float(e0))
    torch.testing.assert_close(f2, f0[perm], rtol=0, atol=1e-6 * scale)


# ------------------------------------------------------------------------------ forces
@pytest.mark.parametrize("variant", range(len(HEADS)))
def test_forces_are_central_finite_differences(variant):
    model = small_model(seed=20 + variant, **HEADS[variant])
    z, pos = random_molecule(8, seed=99 + variant)
    _, forces = evaluate(model, z, pos)
    h = 1e-5
    fd = torch.zeros_like(pos)
    with torch.no_grad():
        for a in range(len(z)):
            for k in range(3):
                plus, minus = pos.clone(), pos.clone()
                plus[a, k] += h
                minus[a, k] -= h
                e_plus = model(z, plus, forces=False)["energy"].detach()
                e_minus = model(z, minus, forces=False)["energy"].detach()
                fd[a, k] = -(e_plus - e_minus) / (2 * h)
    scale = float(forces.abs().max())
    torch.testing.assert_close(forces, fd, rtol=0, atol=1e-5 * scale)


def test_force_training_gradients_match_finite_differences():
    """create_graph=True: d/dθ of a force loss equals a finite difference in one parameter."""
    model = small_model(seed=5)
    z, pos = random_molecule(7, seed=5)
    target = torch.randn(pos.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    param = model.representation.layers[0].dv_proj.weight

    def loss():
        out = model(z, pos, create_graph=True)
        return ((out["forces"] - target) ** 2).sum() + out["energy"].sum() ** 2

    value = loss()
    (grad,) = torch.autograd.grad(value, [param])
    idx = (3, 2)
    h = 1e-6
    with torch.no_grad():
        param[idx] += h
    up = float(loss().detach())
    with torch.no_grad():
        param[idx] -= 2 * h
    down = float(loss().detach())
    with torch.no_grad():
        param[idx] += h
    assert float(grad[idx]) == pytest.approx((up - down) / (2 * h), rel=1e-5)


@pytest.mark.parametrize("variant", range(len(HEADS)))
def test_self_edges_equal_the_self_loop_branch(variant):
    """The reference message path's two layouts (ETRepresentation.forward): self edges appended to
    the edge list with every layer's filters from one product, and the per-layer self-loop
    branch (what traced graphs use): same energies, forces and force-loss parameter gradients
    in float64."""
    model = small_model(seed=7, **HEADS[variant])
    z, pos = random_molecule(8, seed=7)
    rep = model.representation
    results = []
    for self_edges in (True, False):
        forward = rep.forward
        rep.forward = lambda *a, _f=forward, _s=self_edges, **kw: _f(*a, **{**kw, "self_edges": _s})
        try:
            out = model(z, pos, create_graph=True)
            loss = (out["forces"] ** 2).sum() + out["energy"].sum() ** 2
            grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
        finally:
            rep.forward = forward
        results.append((out["energy"].detach(), out["forces"].detach(), grads))
    (e1, f1, g1), (e2, f2, g2) = results
    torch.testing.assert_close(e1, e2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f1, f2, rtol=1e-11, atol=1e-12)
    compared = 0
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
            compared += int(a.abs().max() > 0)
    assert compared > 10


# ------------------------------------------------------------------------------ periodic
def periodic_case(triclinic, seed):
    rng = np.random.default_rng(seed)
    cell = np.diag([10.6, 11.2, 10.3])
    if triclinic:
        cell[1, 0], cell[2, 0], cell[2, 1] = 2.0, -1.5, 1.1
    frac = rng.uniform(0, 1, (14, 3))
    atoms = Atoms(numbers=rng.choice([1, 6, 8], 14), scaled_positions=frac, cell=cell, pbc=True)
    return atoms


def atoms_energy_forces(model, atoms):
    out = model(atoms)
    return out["energy"].detach(), out["forces"].detach()


@pytest.mark.parametrize("triclinic", [False, True])
def test_periodic_replica_has_eight_times_the_energy(triclinic):
    model = small_model(seed=11, vector_cutoff=True)
    atoms = periodic_case(triclinic, seed=4)
    e1, f1 = atoms_energy_forces(model, atoms)
    big = atoms.repeat((2, 2, 2))
    e8, f8 = atoms_energy_forces(model, big)
    assert float(e8) == pytest.approx(8 * float(e1), rel=1e-10)
    n = len(atoms)
    for r in range(8):  # ASE's repeat lists the copies one after the other
        torch.testing.assert_close(f8[r * n:(r + 1) * n], f1, rtol=1e-8, atol=1e-10)
    # the periodic structure really interacts with its images (differs from the open one)
    e_open, _ = evaluate(model, torch.tensor(atoms.numbers), torch.tensor(atoms.positions))
    assert abs(float(e_open - e1)) > 1e-3


def test_mean_reduction_is_intensive_under_replication():
    model = small_model(seed=12, reduce_op="mean")
    atoms = periodic_case(False, seed=5)
    e1, _ = atoms_energy_forces(model, atoms)
    e8, _ = atoms_energy_forces(model, atoms.repeat((2, 2, 2)))
    assert float(e8) == pytest.approx(float(e1), rel=1e-10)


@pytest.mark.parametrize("triclinic", [False, True])
def test_energy_invariant_to_wrapping(triclinic):
    model = small_model(seed=13)
    atoms = periodic_case(triclinic, seed=6)
    e0, f0 = atoms_energy_forces(model, atoms)
    moved = atoms.copy()
    shifts = np.random.default_rng(1).integers(-3, 4, (len(atoms), 3))
    moved.positions += shifts @ atoms.cell.array  # atoms several images away
    e1, f1 = atoms_energy_forces(model, moved)
    moved.wrap()
    e2, f2 = atoms_energy_forces(model, moved)
    for e, f in ((e1, f1), (e2, f2)):
        assert float(e) == pytest.approx(float(e0), rel=1e-11)
        torch.testing.assert_close(f, f0, rtol=1e-8, atol=1e-10)


def test_stress_is_strain_derivative():
    model = small_model(seed=14)
    atoms = periodic_case(True, seed=7)
    out = model(atoms, stress=True)
    stress = out["stress"].detach()[0]
    volume = abs(np.linalg.det(atoms.cell.array))
    h = 1e-5
    for a, b in [(0, 0), (1, 2), (2, 1), (2, 2)]:
        energies = []
        for sign in (1, -1):
            eps = np.zeros((3, 3))
            eps[a, b] += sign * h / 2
            eps[b, a] += sign * h / 2
            strained = atoms.copy()
            strained.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
            energies.append(float(model(strained, forces=False)["energy"].detach()))
        fd = (energies[0] - energies[1]) / (2 * h) / volume
        assert float(stress[a, b]) == pytest.approx(fd, rel=1e-5, abs=1e-9)


# ------------------------------------------------------------------------------ cutoff
def energy_along_separation(model, distances):
    """A CH fragment approached by an O atom along x (the H stays > 4.5 Å from O): E(d), F(d)."""
    z = torch.tensor([6, 1, 8])
    out_e, out_f = [], []
    for d in distances:
        pos = torch.tensor([[0.0, 0.0, 0.0], [-0.6, 0.85, 0.1], [d, 0.0, 0.0]], dtype=torch.float64)
        e, f = evaluate(model, z, pos)
        out_e.append(float(e))
        out_f.append(f.numpy())
    return np.array(out_e), np.array(out_f)


@pytest.mark.parametrize("rbf_type", ["expnorm", "gauss"])
def test_vector_cutoff_energy_and_forces_continuous_at_cutoff(rbf_type):
    model = small_model(seed=15, vector_cutoff=True, rbf_type=rbf_type, cutoff_upper=4.0)
    # the O atom crosses r = 4 Å from the C atom (the H atom is further away)
    eps = np.array([1e-3, 1e-5, 1e-7])
    e_in, f_in = energy_along_separation(model, 4.0 - eps)
    e_out, f_out = energy_along_separation(model, 4.0 + eps)
    jumps = np.abs(e_in - e_out)
    assert jumps[-1] < 1e-10 and jumps[0] > jumps[1] > jumps[2]
    assert np.abs(f_in[-1] - f_out[-1]).max() < 1e-8
    # far outside the cutoff the O atom does not interact at all: E = E(C-H) + E(O alone)
    e_far, f_far = energy_along_separation(model, [9.0])
    assert abs(e_far[0] - e_out[-1]) < 1e-9 and np.abs(f_far[0][2]).max() < 1e-12


def test_standard_et_jumps_at_the_cutoff_when_value_biases_are_nonzero():
    """TorchMD-NET's default ET (vector_cutoff False) weights only the attention by the cutoff:
    the vector message s3 ⊗ d of a neighbour entering the cutoff is switched on abruptly when the
    value filter's bias is non-zero. This is the behaviour imported checkpoints must reproduce;
    ``vector_cutoff: true`` removes it (previous test)."""
    model = small_model(seed=16, cutoff_upper=4.0)
    e_in, _ = energy_along_separation(model, [4.0 - 1e-9])
    e_out, _ = energy_along_separation(model, [4.0 + 1e-9])
    assert abs(e_in[0] - e_out[0]) > 1e-6
    with torch.no_grad():
        for layer in model.representation.layers:
            layer.dv_proj.bias.zero_()
    e_in, _ = energy_along_separation(model, [4.0 - 1e-9])
    e_out, _ = energy_along_separation(model, [4.0 + 1e-9])
    assert abs(e_in[0] - e_out[0]) < 1e-7


# ------------------------------------------------------------------------------ batching, lists
def test_batch_equals_individual_structures(shared_data):
    model = small_model(seed=17)
    structures = [ase.io.read(shared_data / "systems" / f"{n}.xyz") for n in ("caffeine", "alanine_dipeptide")]
    structures.append(periodic_case(True, seed=8))
    batch_out = {k: v.detach() for k, v in model(structures).items()}
    start = 0
    for b, atoms in enumerate(structures):
        e, f = atoms_energy_forces(model, atoms)
        assert float(batch_out["energy"][b]) == pytest.approx(float(e), rel=1e-12)
        torch.testing.assert_close(batch_out["forces"][start:start + len(atoms)], f, rtol=1e-9, atol=1e-12)
        start += len(atoms)


def test_padded_and_skin_neighbor_lists_give_the_same_result():
    model = small_model(seed=18, cutoff_upper=4.0)
    atoms = periodic_case(True, seed=9)
    z = torch.tensor(atoms.numbers)
    pos = torch.tensor(atoms.positions)
    cell = torch.tensor(atoms.cell.array).unsqueeze(0)
    pbc = torch.tensor([[True, True, True]])
    batch = torch.zeros(len(z), dtype=torch.long)
    e0, f0 = evaluate(model, z, pos, cell=cell, pbc=pbc)
    # Verlet skin: list built at cutoff + 1 Å, fixed capacity with padding rows
    skin = neighbor_list(pos, 5.0, batch, cell, pbc, max_pairs=4000)
    assert not bool(skin.overflow) and not bool(skin.mask.all())
    assert bool((skin.distances[skin.mask] >= 4.0).any())  # pairs beyond the cutoff are present
    e1, f1 = evaluate(model, z, pos, batch=batch, cell=cell, pbc=pbc, neighbors=skin)
    assert float(e1) == pytest.approx(float(e0), rel=1e-12)
    torch.testing.assert_close(f1, f0, rtol=1e-9, atol=1e-12)


def test_ase_atoms_input_and_predict(shared_data):
    model = small_model(seed=19)
    atoms = ase.io.read(shared_data / "systems" / "caffeine.pdb")
    e, f = evaluate(model, torch.tensor(atoms.numbers), torch.tensor(atoms.positions))
    out = model.predict(atoms)
    assert isinstance(out["energy"], float) and out["forces"].shape == (len(atoms), 3)
    assert out["energy"] == pytest.approx(float(e), rel=1e-12)
    np.testing.assert_allclose(out["forces"], f.numpy(), rtol=1e-10, atol=1e-12)
    many = model.predict([atoms, atoms[:10]])
    assert many["energy"].shape == (2,) and many["forces"][1].shape == (10, 3)


# ------------------------------------------------------------------------------ heads, normalisation
def test_dipole_head_is_equivariant_and_origin_independent():
    model = small_model(seed=21, dipole=True)
    z, pos = random_molecule(9, seed=21)
    mu0 = model(z, pos)["dipole"].detach()
    assert mu0.shape == (1, 3) and float(mu0.norm()) > 1e-4
    rot = random_rotation(2, reflect=True)
    mu1 = model(z, pos @ rot.T + 5.0)["dipole"].detach()
    torch.testing.assert_close(mu1, mu0 @ rot.T, rtol=1e-9, atol=1e-12)


def test_energy_normalisation():
    """E = scale * E_model + shift * n + sum atomref(z) + energy_offset (per structure)."""
    model = small_model(seed=22)
    z, pos = random_molecule(10, seed=22)
    base, base_f = evaluate(model, z, pos)
    atomref = {1: -13.6, 6: -1029.5, 7: -1485.3, 8: -2042.6}
    model.set_normalisation(atomref=atomref, scale=2.5, shift=0.125, energy_offset=-7.0, elements=[1, 6, 7, 8])
    e, f = evaluate(model, z, pos)
    expected = 2.5 * float(base) + 0.125 * len(z) + sum(atomref[int(a)] for a in z) - 7.0
    assert float(e) == pytest.approx(expected, rel=1e-14, abs=1e-9)
    torch.testing.assert_close(f, 2.5 * base_f)
    assert e.dtype == torch.float64
    out = {k: v.detach() for k, v in model(z, pos, per_atom=True).items()}
    assert float(out["energies"].sum()) == pytest.approx(float(out["energy"]), rel=1e-14)
    # the normalisation stays float64 (exact) even in a float32 model
    model32 = small_model(seed=22, dtype="float32").set_normalisation(atomref=atomref, scale=2.5)
    model32.float()
    assert model32.atomref.dtype == torch.float64 and model32.normalisation()["atomref"][6] == -1029.5


# ------------------------------------------------------------------------------ errors
def test_one_line_errors():
    model = small_model(seed=23).set_normalisation(elements=[1, 6, 8])
    z, pos = random_molecule(5, seed=23, elements=(1, 6, 8))
    z[3] = 7
    with pytest.raises(ModelError) as err:
        model(z, pos)
    msg = str(err.value)
    assert "atom 3" in msg and "N" in msg and "H, C, O" in msg and "\n" not in msg
    z[3] = 150
    with pytest.raises(ModelError, match="atom 3 .*150"):
        small_model(seed=23)(z, pos)
    z[3] = 6
    pos[4] = pos[1]
    with pytest.raises(ModelError, match="atoms 1 and 4 are on top of each other"):
        model(z, pos)
    pos[4, 0] = float("nan")
    with pytest.raises(NeighborListError, match="atom 4"):
        model(z, pos)
    with pytest.raises(ConfigError, match="model.num_layer' does not exist.*num_layers"):
        build_model({"num_layer": 3})
    with pytest.raises(ConfigError, match="num_heads"):
        build_model({"embedding_dimension": 30, "num_heads": 8})
    with pytest.raises(ConfigError, match="rbf_type"):
        build_model({"rbf_type": "bessel"})
    with pytest.raises(TorchmdxError):
        model(z, pos, pbc=torch.tensor([True, True, True]))


def test_cutoff_larger_than_half_box_is_refused():
    model = small_model(seed=24)  # cutoff 5 Å
    atoms = periodic_case(False, seed=10)
    atoms.set_cell(np.diag([9.0, 12.0, 12.0]), scale_atoms=True)
    with pytest.raises(NeighborListError, match="structure 0.*half the perpendicular width"):
        model(atoms)


def test_auto_backend_trains_on_the_reference_message_path():
    """backend 'auto': a training-mode call with gradients on takes AUTO_TRAINING_BACKEND (the
    reference path; its double backward is the reference anyway), evaluation keeps 'auto' (the
    fused kernels on CUDA); an explicit backend is never replaced."""
    from torchmdx.nn.potential import AUTO_TRAINING_BACKEND

    model = small_model()
    model.train()
    assert model.message_backend() == AUTO_TRAINING_BACKEND == "torch"
    with torch.no_grad():
        assert model.message_backend() == "auto"
    model.eval()
    assert model.message_backend() == "auto"
    model.train()
    model.backend = "triton"
    assert model.message_backend() == "triton"


@pytest.mark.parametrize("small", [False, True], ids=["product", "reduction"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_stack_equals_the_layers_one_by_one(small, bias):
    """nn.et.linear_stack: one product with stacked weights gives each layer's own output (float64),
    and gradients reach every layer's weight and bias and the input as with separate layers."""
    from torchmdx.nn.et import linear_stack

    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, width, bias=bias).double() for width in (8, 8, 24)]
    x = torch.randn(5, 3, 8, dtype=torch.float64, requires_grad=True)
    stacked = linear_stack(layers, x, small)
    separate = [layer(x) for layer in layers]
    for got, want in zip(stacked, separate):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    weights = [torch.randn_like(t) for t in separate]
    params = [x] + [p for layer in layers for p in layer.parameters()]
    g_stacked = torch.autograd.grad(sum((t * w).sum() for t, w in zip(stacked, weights)), params)
    g_separate = torch.autograd.grad(sum((t * w).sum() for t, w in zip(separate, weights)), params)
    for got, want in zip(g_stacked, g_separate):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert linear_stack(layers[:1], x, small)[0].shape == (5, 3, 8)


def test_padding_rows_spread_over_the_atoms_change_no_bit(monkeypatch):
    """The padding rows of a fixed-capacity list (i = j = N - 1, mask False) are read and
    scattered at a spread atom r mod N (``nn.base.spread_where``: no pile-up of atomics on one
    atom on a GPU). Adding their exact zeros elsewhere changes no bit: energy and forces equal
    those with the padding left on atom N - 1, and the padded rows' vectors stay 0."""
    from torchmdx.nn import base, layers

    index = torch.tensor([3, 3, 4, 4, 4])
    keep = torch.tensor([True, True, False, False, True])
    assert base.spread_where(keep, index, 3).tolist() == [3, 3, 2, 0, 4]  # rows 2, 3 -> 2 % 3, 3 % 3
    model = small_model(seed=18, cutoff_upper=4.0)
    atoms = periodic_case(True, seed=9)
    z, pos = torch.tensor(atoms.numbers), torch.tensor(atoms.positions)
    cell, pbc = torch.tensor(atoms.cell.array).unsqueeze(0), torch.tensor([[True, True, True]])
    batch = torch.zeros(len(z), dtype=torch.long)
    padded = neighbor_list(pos, 5.0, batch, cell, pbc, max_pairs=4000)
    pad = ~padded.mask
    assert int(pad.sum()) > 100 and bool((padded.edge_index[:, pad] == len(z) - 1).all())
    vectors, distances, valid = base.masked_edges(pos, padded.edge_index[0], padded.edge_index[1], None, 4.0,
                                                  padded.mask)
    assert bool((vectors[pad] == 0).all()) and not bool(valid[pad].any())
    from torchmdx.nn.traced import TracedForces

    offsets = padded.shifts.to(pos.dtype) @ cell[0]

    def both():  # the model's own forward, and the traced graph built on masked_edges (MD, calculator)
        eager = evaluate(model, z, pos, batch=batch, cell=cell, pbc=pbc, neighbors=padded)
        traced = TracedForces(model, compile=False, fused_message=False)(z, pos, batch, 1, padded.edge_index, offsets,
                                                                         padded.mask)  # exact filters, as eager
        return eager[0], eager[1], traced[0], traced[1]

    calls = []
    for module in (base, layers):  # count the spread calls: both paths take them
        monkeypatch.setattr(module, "spread_where", lambda *a, f=base.spread_where: calls.append(1) or f(*a))
    spread = both()
    assert len(calls) >= 3  # masked_edges (traced graph), the neighbour embedding (both paths)
    for module in (base, layers):  # the padding's adds back on atom N - 1
        monkeypatch.setattr(module, "spread_where", lambda keep, index, num_atoms: index)
    piled = both()
    assert all(torch.equal(a, b) for a, b in zip(spread, piled))
    torch.testing.assert_close(spread[3], spread[1], rtol=1e-9, atol=1e-12)  # traced = eager forces
