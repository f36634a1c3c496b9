"""GATr (model.architecture: gatr) in float64 on the CPU, against independent references:

- the generated algebras satisfy the axioms: associativity, v² = Q(v) for every vector (the
  Clifford relation, with the signature), anticommuting basis vectors, grades of products,
  reversion an anti-automorphism; G(3,0,0) equals the Pauli-matrix algebra;
- the equivariant linear basis commutes with random group elements (reflections and
  translations) and spans every linear map that does (the numerical commutant);
- the join changes sign under reflections, and the join of two points contains the points of
  their line; points reflect and translate as points (the projective point with a sign);
- every layer and the whole stack of blocks are equivariant on random multivectors;
- the energy is invariant under rotations, reflections, translations and permutations in each
  algebra (the projective one by its sign average: without it a mirror image changes the energy);
- forces equal finite differences; energies are continuous where an atom crosses the cutoff;
  padded / skin neighbor lists give the same energies;
- one-line errors (unknown algebra, periodic input), a model file round-trips.
"""

import numpy as np
import pytest
import torch
from ase.build import molecule

import torchmdx
from torchmdx.errors import ConfigError, ModelError
from torchmdx.nn.gatr import algebra as ga_mod
from torchmdx.nn.gatr.algebra import ALGEBRAS, action_matrix, algebra, embed_points, random_versor, reflection_vector, versor

F64 = torch.float64
TINY = {"architecture": "gatr", "channels": 4, "scalar_channels": 8, "num_layers": 2, "num_heads": 2,
        "cutoff_upper": 4.0, "dtype": "float64", "seed": 0}


def tiny(algebra_name, **overrides):
    model = torchmdx.build_model({**TINY, "algebra": algebra_name, **overrides}).eval()
    return model.set_normalisation(atomref={1: -13.6, 6: -1029.0, 8: -2040.0}, scale=0.7, shift=0.05)


def ethanol(seed=0):
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=seed)
    return torch.tensor(atoms.numbers, dtype=torch.long), torch.tensor(atoms.positions, dtype=F64)


def random_rotation(seed):
    q = np.random.default_rng(seed).normal(size=4)
    a, b, c, d = q / np.linalg.norm(q)
    return torch.tensor([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                         [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
                         [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d]], dtype=F64)


# ---------------------------------------------------------------------------- the algebras
@pytest.mark.parametrize("name", ALGEBRAS)
def test_tables_satisfy_the_clifford_axioms(name):
    ga = algebra(name)
    rng = np.random.default_rng(0)
    gp = ga.gp
    # associativity on every triple of basis blades: (e_a e_b) e_c == e_a (e_b e_c)
    left = np.einsum("abk,kcl->abcl", gp, gp)
    right = np.einsum("bck,akl->abcl", gp, gp)
    assert np.array_equal(left, right)
    # the identity, and the Clifford relation v v = Q(v) for random vectors (with the signature)
    one = np.zeros(ga.dim)
    one[0] = 1.0
    x = rng.normal(size=ga.dim)
    assert np.allclose(ga.product(one, x), x) and np.allclose(ga.product(x, one), x)
    for _ in range(5):
        c = rng.normal(size=ga.n)
        v = ga.vector(c)
        expected = np.zeros(ga.dim)
        expected[0] = float(np.sum(np.array(ga.signature) * c * c))
        assert np.allclose(ga.product(v, v), expected, atol=1e-12)
    # basis vectors anticommute; squares are the signature
    for i in range(ga.n):
        for j in range(ga.n):
            ei, ej = ga.vector(np.eye(ga.n)[i]), ga.vector(np.eye(ga.n)[j])
            if i == j:
                assert ga.product(ei, ei)[0] == ga.signature[i]
            else:
                assert np.array_equal(ga.product(ei, ej), -ga.product(ej, ei))
    # grades: a product of grades r and s has grades |r-s| .. r+s in steps of 2; the outer product is grade r+s
    for a in range(ga.dim):
        for b in range(ga.dim):
            out = np.nonzero(gp[a, b])[0]
            r, s = ga.grades[a], ga.grades[b]
            for k in out:
                g = ga.grades[k]
                assert abs(r - s) <= g <= r + s and (g - abs(r - s)) % 2 == 0
            wedge = np.nonzero(ga.outer[a, b])[0]
            assert all(ga.grades[k] == r + s for k in wedge)
            if len(wedge):
                assert np.array_equal(ga.outer[a, b], gp[a, b] * (ga.grades == r + s))
    # reversion is an anti-automorphism: (x y)~ = y~ x~
    x, y = rng.normal(size=(2, ga.dim))
    assert np.allclose(ga.reverse * ga.product(x, y), ga.product(ga.reverse * y, ga.reverse * x))
    # the pseudoscalar commutes with vectors in odd dimension, anticommutes in even dimension
    e1 = ga.vector(np.eye(ga.n)[-1])
    pseudo = np.zeros(ga.dim)
    pseudo[ga.pseudoscalar] = 1.0
    sign = 1 if ga.n % 2 else -1
    assert np.allclose(ga.product(pseudo, e1), sign * ga.product(e1, pseudo))


def test_euclidean_algebra_is_the_pauli_matrix_algebra():
    """An independent model of G(3,0,0): e_i -> Pauli matrices σ_i, the geometric product -> matrix product."""
    ga = algebra("euclidean")
    sigma = [np.array([[0, 1], [1, 0]], complex), np.array([[0, -1j], [1j, 0]]), np.array([[1, 0], [0, -1]], complex)]

    def matrix(x):
        out = np.zeros((2, 2), complex)
        for blade in range(ga.dim):
            m = np.eye(2, dtype=complex)
            for i in range(3):
                if blade >> i & 1:
                    m = m @ sigma[i]
            out += x[blade] * m
        return out

    rng = np.random.default_rng(1)
    for _ in range(5):
        x, y = rng.normal(size=(2, ga.dim))
        assert np.allclose(matrix(ga.product(x, y)), matrix(x) @ matrix(y))


@pytest.mark.parametrize("name", ALGEBRAS)
def test_linear_basis_is_equivariant_and_complete(name):
    ga = algebra(name)
    rng = np.random.default_rng(2)
    actions = [action_matrix(name, *random_versor(name, rng, k)) for k in (1, 2, 3, 2)]
    for matrix in ga.linear_basis:
        for rho in actions:
            assert np.allclose(matrix @ rho, rho @ matrix, atol=1e-9)
    # the commutant: every M with M rho = rho M for these group elements (vec(M rho - rho M) = 0)
    d = ga.dim
    constraints = np.concatenate([np.kron(np.eye(d), rho.T) - np.kron(rho, np.eye(d)) for rho in actions])
    singular = np.linalg.svd(constraints, compute_uv=False)
    commutant = int((singular < 1e-8 * singular[0]).sum())
    assert commutant == len(ga.linear_basis) == {"euclidean": 4, "projective": 9, "conformal": 20}[name]
    # the basis maps are linearly independent
    assert np.linalg.matrix_rank(ga.linear_basis.reshape(len(ga.linear_basis), -1)) == len(ga.linear_basis)


@pytest.mark.parametrize("name", ALGEBRAS)
def test_products_commute_with_the_group_and_the_join_flips_under_reflections(name):
    ga = algebra(name)
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(2, ga.dim))
    join = lambda a, b: np.einsum("i,j,ijk->k", a, b, ga.join)  # noqa: E731
    for count in (1, 2, 3):
        u, parity = random_versor(name, rng, count)
        rho = action_matrix(name, u, parity)
        assert np.allclose(rho @ ga.product(x, y), ga.product(rho @ x, rho @ y), atol=1e-9)
        assert np.isclose(ga.inner_weights @ ((rho @ x) * (rho @ y)), ga.inner_weights @ (x * y), atol=1e-9)
        assert np.allclose(join(rho @ x, rho @ y), (-1) ** parity * (rho @ join(x, y)), atol=1e-9)


def test_projective_join_of_two_points_is_their_line():
    ga = algebra("projective")
    point = lambda x: embed_points("projective", torch.tensor(x, dtype=F64)).numpy()  # noqa: E731
    join = lambda a, b: np.einsum("i,j,ijk->k", a, b, ga.join)  # noqa: E731
    a, b = np.array([0.3, -1.0, 2.0]), np.array([1.5, 0.2, -0.4])
    line = join(point(a), point(b))
    assert np.all(ga.grades[np.nonzero(np.abs(line) > 1e-12)[0]] == 2)
    on_line = point(a + 0.37 * (b - a))
    off_line = point(a + np.array([0.1, 0.2, 0.3]))
    assert np.abs(join(line, on_line)).max() < 1e-12  # the plane through a line and a point on it: none
    assert np.abs(join(line, off_line)).max() > 1e-3


@pytest.mark.parametrize("name", ALGEBRAS)
def test_points_reflect_and_translate_as_points(name):
    rng = np.random.default_rng(4)
    x = rng.normal(size=3)
    normal = rng.normal(size=3)
    normal /= np.linalg.norm(normal)
    offset = 0.0 if name == "euclidean" else 0.8
    rho = action_matrix(name, *versor(name, [reflection_vector(name, normal, offset)]))
    sign = {"projective": 1.0, "conformal": -1.0, "euclidean": 0.0}[name]
    mirrored = x - 2 * (normal @ x + sign * offset) * normal
    point = lambda p: embed_points(name, torch.tensor(p, dtype=F64)).numpy()  # noqa: E731
    parity = -1.0 if name == "projective" else 1.0  # the projective point is a pseudo-trivector
    assert np.allclose(rho @ point(x), parity * point(mirrored), atol=1e-12)
    if name != "euclidean":  # two parallel planes: a translation by 2 (δ2 - δ1) along the normal
        planes = [reflection_vector(name, normal, 0.3), reflection_vector(name, normal, 1.0)]
        rho = action_matrix(name, *versor(name, planes))
        moved = rho @ point(x)
        step = 2 * 0.7 * normal * (1 if name == "projective" else -1)
        assert np.allclose(moved, point(x + step), atol=1e-12) or np.allclose(moved, point(x - step), atol=1e-12)
        assert not np.allclose(moved, point(x), atol=1e-3)
    if name == "conformal":  # the inner product of two points is minus half their squared distance
        ga = algebra(name)
        y = rng.normal(size=3)
        assert np.isclose(ga.inner_weights @ (point(x) * point(y)), -0.5 * np.sum((x - y) ** 2))


# ---------------------------------------------------------------------------- layers
def _act(rho, mv):
    return mv @ torch.as_tensor(rho, dtype=F64).T


@pytest.mark.parametrize("name", ALGEBRAS)
def test_layers_and_blocks_are_equivariant_on_random_multivectors(name):
    from torchmdx.nn.gatr.layers import gated_gelu

    model = tiny(name, join=True, num_layers=2)
    rep = model.representation
    b = rep.buffers_module
    rng = np.random.default_rng(5)
    g = torch.Generator().manual_seed(0)
    n = 5
    mv = torch.randn(n, 4, b.algebra.dim, generator=g, dtype=F64)
    s = torch.randn(n, 8, generator=g, dtype=F64)
    receivers = torch.tensor([0, 0, 1, 2, 3, 4, 4, 0, 1, 2, 3, 4])
    senders = torch.tensor([1, 2, 0, 4, 4, 3, 0, 0, 1, 2, 3, 4])
    phi = torch.tensor([0.9, 0.4, 0.9, 0.7, 0.2, 0.2, 0.5, 1, 1, 1, 1, 1], dtype=F64)
    lengths = torch.tensor([1.1, 2.5, 1.1, 3.0, 3.8, 3.8, 2.2, 0, 0, 0, 0, 0], dtype=F64)  # radial bias input
    block = rep.blocks[0]
    for count in (1, 2, 3):  # reflections (odd), rotations / translations (even)
        u, parity = random_versor(name, rng, count)
        rho = action_matrix(name, u, parity)
        a = _act(rho, mv)
        checks = {
            "linear": (lambda x: block.attention.qkv(x, s)[0]),
            "norm": (lambda x: block.norm1(x, s)[0]),
            "gated_gelu": gated_gelu,
            "geometric product": (lambda x: b.geometric_product(x, x.flip(0))),
            "bilinear with join": (lambda x: block.mlp.bilinear(x, x[..., b.algebra.pseudoscalar].mean(-1))),
            "attention": (lambda x: block.attention(x, s, receivers, senders, phi, lengths)[0]),
            "blocks": (lambda x: rep.features(x, s, receivers, senders, phi, distances=lengths)[0]),
        }
        for what, fn in checks.items():
            out, out_of_transformed = fn(mv), fn(a)
            assert out.abs().max() > 1e-3, what
            torch.testing.assert_close(out_of_transformed, _act(rho, out), rtol=0, atol=1e-8, msg=what)
        # the invariant outputs: scalars and the energy readout
        s1 = rep.features(mv, s, receivers, senders, phi, distances=lengths)
        s2 = rep.features(a, s, receivers, senders, phi, distances=lengths)
        torch.testing.assert_close(rep.readout(*s2), rep.readout(*s1), rtol=0, atol=1e-9)
        if count == 2:  # and the check can fail: the same inputs, transformed, but not their images
            assert (rep.features(a, s, receivers, senders, phi)[0] - rep.features(mv, s, receivers, senders, phi)[0]).abs().max() > 1e-3


# ---------------------------------------------------------------------------- the potential
@pytest.mark.parametrize("name", ALGEBRAS)
def test_energy_invariant_under_rotation_reflection_translation_permutation(name):
    model = tiny(name)
    z, pos = ethanol()
    out = model(z, pos)
    energy, forces = out["energy"].detach(), out["forces"].detach()
    rot = random_rotation(1)
    reflection = torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=F64)) @ rot
    shift = torch.tensor([3.0, -7.5, 0.25], dtype=F64)
    perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(2))
    cases = {"rotation": (z, pos @ rot.T, rot), "reflection": (z, pos @ reflection.T, reflection),
             "translation": (z, pos + shift, torch.eye(3, dtype=F64)),
             "permutation": (z[perm], pos[perm], torch.eye(3, dtype=F64))}
    for what, (z2, pos2, matrix) in cases.items():
        out2 = model(z2, pos2)
        assert torch.allclose(out2["energy"], energy, rtol=0, atol=1e-10), what
        expected = (forces @ matrix.T)[perm] if what == "permutation" else forces @ matrix.T
        assert torch.allclose(out2["forces"], expected, rtol=0, atol=1e-10), what
    assert (model(z, pos * 1.02)["energy"] - energy).abs().item() > 1e-4  # the check can fail


def test_projective_points_are_pseudo_trivectors_and_only_the_join_sees_their_sign():
    """Without the sign average a mirror image of a chiral molecule changes the projective
    model's energy, through the join only: the other layers keep the e0-free components apart
    from the e0 ideal, so the network sees the positions only through even functions of the
    points (distance-aware scores, cutoff weights); nested joins can build the signed volume
    of four points. An achiral molecule (ethanol's mirror plane z = 0) keeps its energy."""
    mirror = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=F64))

    def molecule_tensors(rattle):
        atoms = molecule("CH3CH2OH")
        if rattle:
            atoms.rattle(0.2, seed=1)
        return torch.tensor(atoms.numbers), torch.tensor(atoms.positions, dtype=F64)

    def mirror_change(join, sign_average, rattle, noise_seeds=(3,)):
        changes = []
        for noise_seed in noise_seeds:
            model = torchmdx.build_model({"architecture": "gatr", "algebra": "projective", "channels": 4,
                                          "scalar_channels": 8, "num_layers": 3, "num_heads": 2, "dtype": "float64",
                                          "seed": 1, "distance_aware": False, "join": join,
                                          "sign_average": sign_average})
            with torch.no_grad():  # weights away from the initialisation (as after training)
                g = torch.Generator().manual_seed(noise_seed)
                for p in model.parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            z, pos = molecule_tensors(rattle)
            energy = lambda p: model(z, p, forces=False)["energy"].item()  # noqa: E731
            changes.append(abs(energy(pos @ mirror.T) - energy(pos)))
        return max(changes)

    # The signed volume reaches the energy only through nested joins, so its size depends much on
    # the weights (1e-16 to 2e-9 over noise seeds 3-8 since the key bias went; 1e-5 before): the
    # largest over six weight draws must stand clear of round-off, where the other cases sit.
    assert mirror_change(join=True, sign_average=False, rattle=True, noise_seeds=range(3, 9)) > 1e-10
    assert mirror_change(join=True, sign_average=False, rattle=False) < 1e-12  # achiral: no change
    assert mirror_change(join=False, sign_average=False, rattle=True) < 1e-12
    assert mirror_change(join=True, sign_average=True, rattle=True) < 1e-12


def test_hidden_multivectors_rotate_with_the_molecule():
    model = tiny("conformal")
    z, pos = ethanol(seed=3)
    rot = random_rotation(7)
    graph_args = lambda p: model.representation(  # noqa: E731
        z, p, torch.zeros_like(z), 1, *_edges(model, p), return_hidden=True)[1]
    hidden, rotated = graph_args(pos), graph_args(pos @ rot.T)
    # the algebra's action of this rotation: a versor from two planes through the origin
    rho = _rotation_action("conformal", rot.numpy())
    for (mv0, s0), (mv1, s1) in zip(hidden, rotated):
        torch.testing.assert_close(mv1, _act(rho, mv0), rtol=0, atol=1e-9)
        torch.testing.assert_close(s1, s0, rtol=0, atol=1e-9)
        assert (mv1 - mv0).abs().max() > 1e-3


def _edges(model, pos):
    from torchmdx.kernels.neighbors import neighbor_list

    nl = neighbor_list(pos, model.cutoff)
    return nl.edge_index, nl.distances, nl.mask


def _rotation_action(name, rot):
    """ρ of a rotation matrix, as the product of two reflections (Householder: R = H2 H1)."""
    e = np.eye(3)
    # R = H(n2) H(n1) for a rotation: n1 ⟂ axis, n2 = normalised (n1 + R n1) rotated by ... solve numerically
    w, v = np.linalg.eig(rot)
    axis = np.real(v[:, np.argmin(np.abs(w - 1))])
    n1 = np.cross(axis, e[np.argmin(np.abs(axis))])
    n1 /= np.linalg.norm(n1)
    m = rot @ n1
    n2 = n1 + m
    n2 /= np.linalg.norm(n2)
    u, parity = versor(name, [reflection_vector(name, n2), reflection_vector(name, n1)])
    return action_matrix(name, u, parity)


def test_forces_are_minus_the_gradient_by_finite_differences():
    model = tiny("projective")
    z, pos = ethanol(seed=4)
    forces = model(z, pos)["forces"].detach()
    h = 1e-4
    for atom, axis in [(0, 0), (5, 2), (8, 1)]:
        plus, minus = pos.clone(), pos.clone()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        numeric = -(model(z, plus, forces=False)["energy"] - model(z, minus, forces=False)["energy"]).item() / (2 * h)
        assert forces[atom, axis].item() == pytest.approx(numeric, rel=1e-6, abs=1e-8)
    assert forces.abs().max() > 1e-3


def test_energy_is_continuous_where_an_atom_crosses_the_cutoff():
    model = tiny("conformal", cutoff_upper=3.0)
    z = torch.tensor([6, 8, 1])
    base = torch.tensor([[0.0, 0.0, 0.0], [1.2, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    energies = []
    for r in (3.0 - 1e-7, 3.0 + 1e-7):
        pos = base.clone()
        pos[2, 1] = r  # the H atom crosses the carbon's cutoff sphere (it is further from O)
        energies.append(model(z, pos, forces=False)["energy"].item())
    assert abs(energies[0] - energies[1]) < 1e-9
    far = base.clone()
    far[2, 1] = 2.0
    assert abs(model(z, far, forces=False)["energy"].item() - energies[0]) > 1e-4


def test_whole_structure_attention_and_padded_lists():
    from torchmdx.kernels.neighbors import neighbor_list

    model = tiny("euclidean", cutoff_upper=None)
    z, pos = ethanol(seed=6)
    energy = model(z, pos)["energy"]
    n = len(z)
    # every pair of the molecule is an edge
    assert model.neighbors(pos, torch.zeros_like(z), None, None).edge_index.shape[1] == n * (n - 1)
    padded = neighbor_list(pos, model.cutoff, max_pairs=n * (n - 1) + 17)
    assert padded.mask is not None and int(padded.mask.sum()) == n * (n - 1)
    torch.testing.assert_close(model(z, pos, neighbors=padded)["energy"], energy, rtol=0, atol=1e-12)
    # a cutoff model with a Verlet-skin list (pairs beyond the cutoff masked) equals the exact list
    cut = tiny("projective")
    skin = neighbor_list(pos, cut.cutoff + 1.0, max_pairs=200)
    skin.mask = skin.mask & (skin.distances < cut.cutoff)
    torch.testing.assert_close(cut(z, pos, neighbors=skin)["energy"], cut(z, pos)["energy"], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- inputs and files
def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"model.algebra") as info:
        torchmdx.build_model({"architecture": "gatr", "algebra": "hyperbolic"})
    assert "\n" not in str(info.value) and "projective" in str(info.value)
    with pytest.raises(ConfigError, match="num_heads"):
        torchmdx.build_model({"architecture": "gatr", "channels": 6, "num_heads": 4})
    with pytest.raises(ConfigError, match="sign_average"):
        torchmdx.build_model({"architecture": "gatr", "algebra": "conformal", "sign_average": True})
    with pytest.raises(ConfigError, match="belongs to architecture 'gatr'"):
        torchmdx.build_model({"algebra": "conformal"})
    model = tiny("euclidean")
    z, pos = ethanol()
    with pytest.raises(ModelError, match="non-periodic") as info:
        model(z, pos, cell=torch.eye(3, dtype=F64) * 12.0, pbc=torch.tensor([True, True, True]))
    assert "\n" not in str(info.value)
    model(z, pos, cell=torch.eye(3, dtype=F64) * 12.0, pbc=[False, False, False])  # a cluster is fine
    with pytest.raises(ModelError, match="unknown geometric algebra"):
        ga_mod.algebra("hyperbolic")


def test_model_file_round_trip_and_calculator(tmp_path):
    from ase.build import molecule as ase_molecule

    model = tiny("conformal")
    path = tmp_path / "gatr.pt"
    model.save(path)
    loaded = torchmdx.load_model(path, dtype="float64")
    assert loaded.kind == "gatr" and loaded.config.algebra == "conformal"
    z, pos = ethanol()
    torch.testing.assert_close(loaded(z, pos)["energy"], model(z, pos)["energy"], rtol=0, atol=1e-12)
    atoms = ase_molecule("CH3CH2OH")
    atoms.calc = torchmdx.Calculator(str(path), device="cpu", dtype="float64")
    expected = model(torch.tensor(atoms.numbers), torch.tensor(atoms.positions, dtype=F64))
    assert atoms.get_potential_energy() == pytest.approx(expected["energy"].item(), abs=1e-9)
    np.testing.assert_allclose(atoms.get_forces(), expected["forces"].detach().numpy(), atol=1e-9)


@pytest.mark.parametrize("values", [
    {**TINY, "algebra": "projective"}, {**TINY, "algebra": "conformal"},
    {"architecture": "transformer", "embedding_dimension": 8, "num_layers": 1, "num_heads": 2, "num_rbf": 4,
     "bias_hidden": 8, "dtype": "float64", "seed": 0},
])
def test_forward_and_training_step_read_nothing_from_the_device(values):
    """What CUDA-graph capture needs: with the neighbor list given and the checks off (as during
    capture, where they skip themselves), energies, forces and the parameter gradients of a force
    loss involve no host read (recorded as in tests/test_model_sync.py)."""
    from test_model_sync import HostReads

    from torchmdx.kernels.neighbors import neighbor_list

    model = torchmdx.build_model(values)
    z, pos = ethanol()
    batch = torch.zeros_like(z)
    nl = neighbor_list(pos, model.cutoff, max_pairs=100)
    model.tracing = True  # no overlap / image checks
    model.check_elements = lambda z: None  # the element check skips itself during capture, too
    with HostReads() as reads:
        out = model(z, pos, batch, neighbors=nl, create_graph=True, num_structures=1)
        (out["forces"] ** 2).sum().backward()
    assert reads.seen == []
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
