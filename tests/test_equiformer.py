"""Equiformer (model.architecture: equiformer) in float64 on the CPU, against independent references:

- E(3): the energy is unchanged by rotations, reflections, translations and permutations of the
  atoms; the hidden l = 1 and l = 2 features rotate with e3nn's Wigner-D matrices (and change
  sign as (-1)^l under inversion: the natural-parity irreps 1o, 2e);
- forces and stress equal central finite differences of the energy;
- a 2x2x2 periodic supercell has its cell's energy per atom and forces;
- energy and forces are continuous where an atom crosses the cutoff, and a neighbor list with a
  Verlet skin or padding rows gives the energy of the exact list;
- one-line errors for an unknown architecture, unknown keys and irreps that cannot be built;
- a model file round-trips (kind, hyper-parameters, weights, normalisation) and the ASE
  calculator gives the model's numbers.
Training, export, evaluation and MD with it: tests/test_equiformer_train.py.
"""

import contextlib
import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from e3nn import o3

import torchmdx
from torchmdx.errors import ConfigError, TorchmdxError
from torchmdx.kernels.neighbors import neighbor_list
from torchmdx.nn.base import Graph, edge_vectors

F64 = torch.float64
TINY = {"architecture": "equiformer", "lmax": 2, "channels": 8, "num_layers": 2, "num_heads": 2,
        "feature_channels": 16, "num_rbf": 8, "radial_hidden": [16], "cutoff_upper": 4.0,
        "dtype": "float64", "seed": 0}


def tiny(**overrides):
    model = torchmdx.build_model({**TINY, **overrides}).eval()
    # a non-trivial normalisation, so that it is part of what is checked
    return model.set_normalisation(atomref={1: -13.6, 6: -1029.0, 8: -2040.0}, scale=0.7, shift=0.05)


@pytest.fixture(scope="module")
def model():
    return tiny()


def ethanol(seed=0):
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=seed)
    return atoms


def as_tensors(atoms):
    return (torch.tensor(atoms.numbers, dtype=torch.long), torch.tensor(atoms.positions, dtype=F64))


def energy_forces(model, z, pos, **kw):
    out = model(z, pos, **kw)
    return out["energy"].detach(), out["forces"].detach()


def hidden_features(model, z, pos):
    """The irreps features after the embedding and after each block (but the scalar-only last)."""
    nl = neighbor_list(pos, model.cutoff)
    vectors = edge_vectors(pos, nl.edge_index, None, None, None)
    graph = Graph(z, pos, torch.zeros_like(z), 1, nl.edge_index, vectors, vectors.norm(dim=-1), nl.mask)
    _, hidden = model.atomic_energies(graph, return_hidden=True)
    return [h.detach() for h in hidden]


@contextlib.contextmanager
def float64_default():
    """e3nn builds Wigner-D matrices in torch's default dtype (float32: errors ~2e-7)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def wigner_d(l, alpha, beta, gamma):
    with float64_default():
        return o3.wigner_D(l, alpha, beta, gamma)


def random_rotation(seed):
    g = torch.Generator().manual_seed(seed)
    alpha, beta, gamma = (torch.rand(3, generator=g, dtype=F64) * torch.tensor([2 * math.pi, math.pi, 2 * math.pi], dtype=F64))
    with float64_default():
        return alpha, beta, gamma, o3.angles_to_matrix(alpha, beta, gamma)


# ---------------------------------------------------------------------------- E(3) symmetry
def test_energy_invariant_under_rotation_reflection_translation_permutation(model):
    z, pos = as_tensors(ethanol())
    energy, forces = energy_forces(model, z, pos)
    assert energy.abs().item() > 1.0  # the atomic references are in it
    _, _, _, rot = random_rotation(1)
    reflection = torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=F64)) @ rot
    assert torch.det(reflection) < 0
    shift = torch.tensor([3.0, -7.5, 0.25], dtype=F64)
    perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(2))
    cases = {
        "rotation": (z, pos @ rot.T, rot),
        "reflection": (z, pos @ reflection.T, reflection),
        "translation": (z, pos + shift, torch.eye(3, dtype=F64)),
        "permutation": (z[perm], pos[perm], torch.eye(3, dtype=F64)),
    }
    for name, (z2, pos2, matrix) in cases.items():
        e2, f2 = energy_forces(model, z2, pos2)
        assert torch.allclose(e2, energy, rtol=0, atol=1e-10), name
        expected = (forces @ matrix.T)[perm] if name == "permutation" else forces @ matrix.T
        assert torch.allclose(f2, expected, rtol=0, atol=1e-10), name
    # and the check can fail: a deformation changes the energy
    e3, _ = energy_forces(model, z, pos * 1.02)
    assert (e3 - energy).abs().item() > 1e-4


def test_hidden_l1_and_l2_features_rotate_with_wigner_d(model):
    z, pos = as_tensors(ethanol(seed=3))
    alpha, beta, gamma, rot = random_rotation(5)
    before = hidden_features(model, z, pos)
    rotated = hidden_features(model, z, pos @ rot.T)
    inverted = hidden_features(model, z, -pos)
    irreps = model.representation.irreps_node
    assert [ir.l for _, ir in irreps] == [0, 1, 2] and [ir.p for _, ir in irreps] == [1, -1, 1]
    checked = set()
    for h0, h1, h2 in zip(before, rotated, inverted):
        for (mul, ir), block in zip(irreps, irreps.slices()):
            x0 = h0[:, block].reshape(-1, mul, ir.dim)
            x1 = h1[:, block].reshape(-1, mul, ir.dim)
            x2 = h2[:, block].reshape(-1, mul, ir.dim)
            d = wigner_d(ir.l, alpha, beta, gamma)
            if ir.l == 1:
                torch.testing.assert_close(d, rot, rtol=0, atol=1e-13)  # e3nn's l = 1 basis is (x, y, z)
            assert x0.abs().max() > 1e-3  # non-trivial features (else the check cannot fail)
            torch.testing.assert_close(x1, x0 @ d.T, rtol=0, atol=1e-9)
            torch.testing.assert_close(x2, (-1) ** ir.l * x0, rtol=0, atol=1e-9)
            if ir.l > 0:  # a rotation changes them (the identity would pass trivially otherwise)
                assert (x1 - x0).abs().max() > 1e-3
            checked.add(ir.l)
    assert checked == {0, 1, 2}
    # the whole feature vector with e3nn's block-diagonal D, on the embedding of a reflected molecule
    reflection = -rot
    reflected = hidden_features(model, z, pos @ reflection.T)
    with float64_default():
        big_d = irreps.D_from_matrix(reflection)
    for h0, h3 in zip(before, reflected):
        torch.testing.assert_close(h3, h0 @ big_d.T, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------- derivatives
def test_forces_are_minus_the_gradient_by_finite_differences(model):
    z, pos = as_tensors(ethanol(seed=4))
    _, forces = energy_forces(model, z, pos)
    h = 1e-4  # energies ~4e3 eV (atomic references): rounding 1e-12 eV / 2h, truncation ~h²
    for atom, axis in [(0, 0), (2, 1), (5, 2), (8, 0)]:
        plus, minus = pos.clone(), pos.clone()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        numeric = -(model(z, plus, forces=False)["energy"] - model(z, minus, forces=False)["energy"]).item() / (2 * h)
        assert forces[atom, axis].item() == pytest.approx(numeric, rel=1e-6, abs=1e-8)
    assert forces.abs().max() > 1e-3


def test_bessel_basis_by_hand_and_its_model_forces():
    from torchmdx.nn.equiformer.layers import BesselRBF

    rc, k = 4.0, 5
    with float64_default():  # (the model builds it in its own dtype)
        basis = BesselRBF(0.0, rc, k, trainable=False)
    r = np.array([0.0, 0.3, 1.7, 3.99, 4.0, 5.2])
    d = r / rc
    u = np.where(d < 1, 1 - 21 * d**5 + 35 * d**6 - 15 * d**7, 0.0)  # p = 5
    n = np.arange(1, k + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        by_hand = u[:, None] * np.sqrt(2 / rc) * np.where(r[:, None] > 0, np.sin(n * np.pi * d[:, None]) / r[:, None],
                                                             n * np.pi / rc)
    np.testing.assert_allclose(basis(torch.tensor(r)).numpy(), by_hand, rtol=1e-12, atol=1e-15)
    model = tiny(rbf_type="bessel", num_rbf=k, trainable_rbf=True)
    z, pos = as_tensors(ethanol(seed=10))
    _, forces = energy_forces(model, z, pos)
    h = 1e-4
    plus, minus = pos.clone(), pos.clone()
    plus[3, 1] += h
    minus[3, 1] -= h
    numeric = -(model(z, plus, forces=False)["energy"] - model(z, minus, forces=False)["energy"]).item() / (2 * h)
    assert forces[3, 1].item() == pytest.approx(numeric, rel=1e-6, abs=1e-8)


def periodic_box(seed=0, n=8, width=9.0):
    """n atoms (H, C, O) at random in a triclinic cell wider than twice the cutoff, no two closer than 0.9 Å."""
    rng = np.random.default_rng(seed)
    cell = np.array([[width, 0.0, 0.0], [1.1, width * 0.95, 0.0], [-0.7, 0.9, width * 1.05]])
    frac = []
    while len(frac) < n:
        trial = rng.random(3)
        cart = trial @ cell
        if all(np.linalg.norm(_minimum_image(cart - f @ cell, cell)) > 0.9 for f in frac):
            frac.append(trial)
    numbers = rng.choice([1, 6, 8], size=n)
    return Atoms(numbers=numbers, scaled_positions=np.array(frac), cell=cell, pbc=True)


def _minimum_image(delta, cell):
    frac = delta @ np.linalg.inv(cell)
    return (frac - np.round(frac)) @ cell


def test_stress_is_the_strain_derivative_by_finite_differences(model):
    atoms = periodic_box(seed=1)
    out = model.predict(atoms, stress=True)
    volume = atoms.get_volume()
    h = 1e-4  # energies ~1e4 eV: rounding ~1e-12 eV / (2h V), truncation ~h²
    for k, l in [(0, 0), (1, 2), (2, 1), (2, 2)]:
        energies = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[k, l] += sign * h / 2
            strain[l, k] += sign * h / 2  # symmetric strain: σ_kl = (1/V) ∂E/∂ε_kl
            strained = atoms.copy()
            strained.set_cell(atoms.cell[:] @ strain, scale_atoms=True)
            energies.append(model.predict(strained, forces=False)["energy"])
        numeric = (energies[0] - energies[1]) / (2 * h) / volume
        assert out["stress"][k, l] == pytest.approx(numeric, rel=1e-5, abs=1e-9)
    assert np.abs(out["stress"]).max() > 1e-5


def test_force_and_stress_loss_gradients_equal_finite_differences():
    """The training objective's double backward (forces and stress are derivatives of the energy,
    the loss is differentiated again w.r.t. the weights) through e3nn's tensor products, the
    attention softmax and the layer norms: parameter gradients equal central differences."""
    model = tiny(seed=1).train()
    atoms = periodic_box(seed=3, n=6)
    z = torch.tensor(atoms.numbers)
    pos = torch.tensor(atoms.positions, dtype=F64)
    cell = torch.tensor(atoms.cell[:], dtype=F64)
    pbc = torch.ones(3, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    f_ref = torch.randn(len(z), 3, generator=g, dtype=F64)
    s_ref = 1e-2 * torch.randn(1, 3, 3, generator=g, dtype=F64)

    def loss():
        out = model(z, pos, cell=cell, pbc=pbc, stress=True, create_graph=True)
        return ((out["forces"] - f_ref) ** 2).sum() + 1e4 * ((out["stress"] - s_ref) ** 2).sum()

    params = dict(model.named_parameters())
    picks = [("representation.blocks.0.attention.radial.net.0.weight", (3, 2)),
             ("representation.blocks.1.attention.alpha_dot", (1, 1)),
             ("representation.blocks.0.attention.value_dtp.tp.weight", (5,)),
             ("representation.blocks.0.norm_attention.weight", (4,)),
             ("representation.edge_degree.radial.net.3.weight", (7, 1)),
             ("representation.embedding.weight", (8, 2))]
    grads = torch.autograd.grad(loss(), [params[name] for name, _ in picks])
    h = 1e-5
    for (name, index), grad in zip(picks, grads):
        value = params[name].data[index].item()
        with torch.no_grad():
            params[name].data[index] = value + h
            up = loss().item()
            params[name].data[index] = value - h
            down = loss().item()
            params[name].data[index] = value
        numeric = (up - down) / (2 * h)
        assert grad[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-9), name
        assert abs(numeric) > 1e-6, name  # the parameter matters (else the check is empty)


def test_supercell_has_the_energy_per_atom_of_its_cell(model):
    cell = periodic_box(seed=2, n=9)
    big = cell.repeat((2, 2, 2))
    small_out, big_out = model.predict(cell), model.predict(big)
    assert big_out["energy"] / len(big) == pytest.approx(small_out["energy"] / len(cell), rel=1e-12, abs=1e-10)
    # ase's repeat puts the copies one after another: each copy has the cell's forces
    np.testing.assert_allclose(big_out["forces"], np.tile(small_out["forces"], (8, 1)), rtol=0, atol=1e-10)
    assert np.abs(small_out["forces"]).max() > 1e-3
    # and the periodic images matter: the same atoms without periodicity differ
    open_atoms = cell.copy()
    open_atoms.pbc = False
    assert abs(model.predict(open_atoms)["energy"] - small_out["energy"]) > 1e-4


# ---------------------------------------------------------------------------- cutoff and neighbor lists
def test_energy_and_forces_are_continuous_where_an_atom_crosses_the_cutoff(model):
    """A water molecule and an oxygen atom approaching along x: around r = cutoff the energy
    changes by O(δ²) and the forces by O(δ) (cosine cutoff on every edge term), and beyond it
    the far atom adds exactly its isolated energy."""
    water = molecule("H2O")  # in the yz plane: an atom at O + (r, 0, 0) is r from O, farther from H
    rc = model.cutoff
    oxygen = water.positions[0]

    def pair(r):
        atoms = water + Atoms("O", positions=[oxygen + [r, 0.0, 0.0]])
        return model.predict(atoms)

    outs = {d: pair(rc + d) for d in (-1e-3, -1e-4, 1e-4, 1e-3)}
    separate = model.predict(water)["energy"] + model.predict(Atoms("O", positions=[[0, 0, 0]]))["energy"]
    assert outs[1e-4]["energy"] == pytest.approx(separate, abs=1e-12)
    assert abs(outs[-1e-4]["energy"] - separate) < 1e-8
    assert abs(outs[-1e-3]["energy"] - separate) > abs(outs[-1e-4]["energy"] - separate)
    assert np.abs(outs[-1e-4]["forces"] - outs[1e-4]["forces"]).max() < 1e-5
    # and inside, the interaction is not negligible (the test can fail)
    assert abs(pair(rc - 0.5)["energy"] - separate) > 1e-5


def test_skin_and_padded_neighbor_lists_give_the_exact_lists_numbers(model):
    z, pos = as_tensors(ethanol(seed=6))
    exact = model(z, pos)
    skin = model(z, pos, neighbors=model.neighbors(pos, None, None, None, cutoff=model.cutoff + 1.5))
    padded = model(z, pos, neighbors=model.neighbors(pos, None, None, None, max_pairs=200))
    for other in (skin, padded):
        torch.testing.assert_close(other["energy"], exact["energy"], rtol=0, atol=1e-11)
        torch.testing.assert_close(other["forces"], exact["forces"], rtol=0, atol=1e-11)


def test_batch_equals_separate_structures(model):
    # methane rattled: in the exact Td geometry its l = 1 features vanish, and their normalisation
    # turns float64 noise of 1e-16 (which depends on the batch's summation order and the CPU's BLAS)
    # into force differences of 1e-8, larger than the check's 1e-10
    a, b = ethanol(seed=7), molecule("CH4")
    b.rattle(0.02, seed=3)
    together = model.predict([a, b])
    np.testing.assert_allclose(together["energy"], [model.predict(a)["energy"], model.predict(b)["energy"]], rtol=0, atol=1e-10)
    np.testing.assert_allclose(together["forces"][1], model.predict(b)["forces"], rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("model_values, message", [
    ({"architecture": "mace"}, "config key 'model.architecture' must be one of et, equiformer"),
    ({"architecture": "equiformer", "lmaxx": 2}, "config key 'model.lmaxx' does not exist (did you mean 'lmax'?)"),
    ({"architecture": "equiformer", "embedding_dimension": 64},
     "config key 'model.embedding_dimension' belongs to architecture 'et', but model.architecture is 'equiformer'"),
    ({"architecture": "equiformer", "num_heads": 3}, "config key 'model.num_heads' must divide every multiplicity"),
    ({"architecture": "equiformer", "irreps_node": "64x0e+16x3o"}, "config key 'model.irreps_node' has degree l=3 above lmax (2); choices: degrees 0..2"),
    ({"architecture": "equiformer", "irreps_node": "64x0x"}, "config key 'model.irreps_node' is not an irreps string"),
    ({"architecture": "equiformer", "irreps_node": "16x1o"}, "config key 'model.irreps_node' has no scalar (0e) channels"),
    ({"architecture": "equiformer", "lmax": 3, "channels": 4}, "config key 'model.channels' must be at least 2^lmax = 8"),
    ({"architecture": "equiformer", "lmax": 9}, "config key 'model.lmax' must be between 0 and 6"),
    ({"architecture": "et", "lmax": 2}, "config key 'model.lmax' belongs to architecture 'equiformer'"),
])
def test_bad_model_configs_are_one_line_errors(model_values, message, tmp_path):
    from torchmdx.train.config import build_run_config

    for build in (lambda: torchmdx.build_model(model_values),
                  lambda: build_run_config({"data": {"path": "x"}, "model": model_values}, check_data=False)):
        with pytest.raises(ConfigError) as info:
            build()
        text = str(info.value)
        assert message in text and "\n" not in text


def test_num_heads_error_names_the_choices():
    with pytest.raises(ConfigError, match=r"choices: 1, 2, 4, 8, 16, 32; got 3$"):
        torchmdx.build_model({"architecture": "equiformer", "num_heads": 3})


def test_explicit_irreps_with_both_parities_stay_invariant():
    model = tiny(irreps_node="8x0e+4x0o+4x1o+4x1e+2x2e+2x2o")
    z, pos = as_tensors(ethanol(seed=8))
    reflection = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=F64))
    e0, f0 = energy_forces(model, z, pos)
    e1, f1 = energy_forces(model, z, pos @ reflection)
    torch.testing.assert_close(e1, e0, rtol=0, atol=1e-10)
    torch.testing.assert_close(f1, f0 @ reflection, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------- files and calculator
def test_model_file_round_trip_and_calculator(model, tmp_path):
    from torchmdx.md.calculator import Calculator

    path = tmp_path / "equiformer.pt"
    model.set_normalisation(elements=[1, 6, 8])
    try:
        model.save(path)
        payload = torch.load(path, weights_only=True)
        assert payload["kind"] == "equiformer" and payload["hparams"]["architecture"] == "equiformer"
        assert payload["cutoff"] == model.cutoff and payload["elements"] == [1, 6, 8]
        loaded = torchmdx.load_model(path)
        assert type(loaded).__name__ == "EquiformerPotential" and loaded.hparams() == model.hparams()
        assert loaded.normalisation() == model.normalisation()
        atoms = ethanol(seed=9)
        ref = model.predict(atoms)
        out = loaded.predict(atoms)
        assert out["energy"] == ref["energy"]
        np.testing.assert_array_equal(out["forces"], ref["forces"])
        # an element the training set did not have: one line
        with pytest.raises(TorchmdxError, match="element N .* known elements: H, C, O"):
            loaded.predict(Atoms("N2", positions=[[0, 0, 0], [1.1, 0, 0]]))
        # float32 copy: the normalisation stays float64, numbers agree to float32 rounding
        single = torchmdx.load_model(path, dtype="float32")
        assert single.dtype == torch.float32 and single.atomref.dtype == F64
        assert single.predict(atoms)["energy"] == pytest.approx(ref["energy"], abs=1e-3)
        # the ASE calculator, from the file
        atoms.calc = Calculator(str(path), device="cpu", dtype="float64")
        assert atoms.get_potential_energy() == pytest.approx(ref["energy"], abs=1e-10)
        np.testing.assert_allclose(atoms.get_forces(), ref["forces"], rtol=0, atol=1e-10)
    finally:
        model.set_normalisation(elements=range(100))


def test_shipped_equiformer_configs_load_and_build(shared_data):
    """configs/equiformer_*.yaml: valid sections (data files present), the paper's irreps and
    heads, a model of the paper's size (Equiformer MD17, lmax 2: ~3.5 M parameters)."""
    from pathlib import Path

    from torchmdx.train.config import load_run_config

    root = Path(__file__).resolve().parents[1] / "configs"
    names = sorted(p.name for p in root.glob("equiformer_*.yaml"))
    assert names == ["equiformer_md17.yaml", "equiformer_polymer_forces_only.yaml", "equiformer_qm9.yaml"]
    for name in names:
        cfg = load_run_config(root / name)
        assert cfg.model_config.architecture == "equiformer", name
        assert str(cfg.model_config.node_irreps()) == "128x0e+64x1o+32x2e", name
    md17 = load_run_config(root / "equiformer_md17.yaml")
    assert (md17.train.force_weight, md17.train.energy_weight, md17.train.lr) == (80.0, 1.0, 5e-4)
    assert load_run_config(root / "equiformer_polymer_forces_only.yaml").train.energy_weight == 0.0
    model = torchmdx.build_model(md17.to_dict()["model"])
    count = sum(p.numel() for p in model.parameters())
    assert 3.0e6 < count < 3.6e6, count


def test_no_host_reads_besides_the_input_checks(model):
    """What a CUDA-graph capture needs: with the neighbor list and num_structures given, a forward
    with forces reads nothing back from the device except the element and overlap checks (both
    skipped while a CUDA graph is captured, as for the ET)."""
    from torch.overrides import TorchFunctionMode

    class HostReads(TorchFunctionMode):  # as in tests/test_model_sync.py
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in {"item", "__bool__", "__int__", "__float__", "__index__", "tolist"}:
                self.seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    z, pos = as_tensors(ethanol(seed=11))
    nl = neighbor_list(pos, model.cutoff)
    with HostReads() as reads:
        model(z, pos, neighbors=nl, num_structures=1)
    assert reads.seen == ["__bool__", "__bool__"]
    model.tracing = True  # the traced/captured mode: no overlap check
    try:
        with HostReads() as reads:
            graph_energy = model(z, pos, neighbors=nl, num_structures=1)["energy"]
    finally:
        model.tracing = False
    assert reads.seen == ["__bool__"]  # the element check (skipped by itself during a capture)
    assert torch.equal(graph_energy, model(z, pos)["energy"])


def test_traced_graph_equals_the_eager_model_and_its_training_gradients():
    """The whole-model graph (nn.traced.TracedForces, run uncompiled here: the compiled graph is
    the same function through inductor, ~2 min on a CPU): energies and forces of a batch of two
    structures, and the parameter gradients of an energy + force loss (the double backward
    through the traced forces), against the eager model in float64."""
    from torchmdx.nn.traced import TracedForces, compile_mode

    model = tiny(seed=4).train()
    z, pos = as_tensors(ethanol(seed=12))
    z = torch.cat([z, z[:4]])
    pos = torch.cat([pos, pos[:4] + torch.tensor([20.0, 0.0, 0.0], dtype=F64)])
    batch = torch.tensor([0] * 9 + [1] * 4)
    nl = neighbor_list(pos, model.cutoff, batch, max_pairs=120)
    out = model(z, pos, batch, neighbors=nl, num_structures=2, create_graph=True)
    energy_ref = torch.tensor([-1.0, 2.0], dtype=F64)
    forces_ref = torch.linspace(-1, 1, 3 * len(z), dtype=F64).reshape(-1, 3)

    def loss_of(energy, forces):
        return 0.3 * ((energy - energy_ref) ** 2).sum() + ((forces - forces_ref) ** 2).mean()

    loss_of(out["energy"], out["forces"]).backward()
    eager = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    traced = TracedForces(model, training=True, compile=False)
    energy, forces, _ = traced(z, pos, batch, 2, nl.edge_index, None, nl.mask)
    torch.testing.assert_close(energy, out["energy"].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(forces, out["forces"].detach(), rtol=1e-10, atol=1e-12)
    loss_of(energy, forces).backward()
    checked = 0
    for name, p in model.named_parameters():
        if name in eager:
            torch.testing.assert_close(p.grad, eager[name], rtol=1e-9, atol=1e-12, msg=name)
            checked += int(eager[name].abs().max() > 0)
    assert checked > 10
    # compile: auto keeps it off the whole graph until its compile time is measured; whole is allowed
    assert compile_mode("auto", "cuda", len(z), model) == "parts"
    assert compile_mode("whole", "cuda", len(z), model) == "whole"
    et = torchmdx.build_model({"embedding_dimension": 8, "num_layers": 1, "num_heads": 2, "num_rbf": 4})
    assert compile_mode("auto", "cuda", len(z), et) == "whole"
