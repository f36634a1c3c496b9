"""torchmdx.lattice: the exact spin-fermion weight, effective models, SLMC sampler (float64, CPU)."""

import itertools
import math

import numpy as np
import pytest
import torch

from torchmdx.lattice.effective import (EquivariantTransformer, LinearEffectiveModel, load_effective,
                                        save_effective)
from torchmdx.lattice.fermions import DoubleExchangeModel, random_spins
from torchmdx.lattice.geometry import SquareLattice
from torchmdx.lattice.observables import integrated_autocorrelation_time, staggered_magnetisation, structure_factor
from torchmdx.lattice.sampler import ChainState, LocalProposal, effective_energy_fn, local_metropolis, slmc_step


# ---------------------------------------------------------------------------- exact weight
def _fock_operators(n_modes: int) -> list:
    """Annihilation operators c_a on the 2^n Fock space (Jordan-Wigner, mode 0 first), sparse."""
    from scipy import sparse

    a = sparse.csr_matrix(np.array([[0.0, 1.0], [0.0, 0.0]]))  # |1> -> |0>
    z = sparse.csr_matrix(np.diag([1.0, -1.0]))  # (-1)^n
    eye = sparse.identity(2, format="csr")
    ops = []
    for k in range(n_modes):
        op = sparse.identity(1, format="csr")
        for m in range(n_modes):
            op = sparse.kron(op, z if m < k else a if m == k else eye, format="csr")
        ops.append(op)
    return ops


def _many_body_grand_potential(L, t, J, T, mu, spins):
    """Ω = -T log Tr exp(-(H - μN)/T) with H built term by term in the Fock space of the 2L²
    modes (i, σ), from the Hamiltonian's definition: nearest-neighbour bonds to +x and +y of
    every site, and (J/2) S_i · Σ_σσ' c†_iσ σ_σσ' c_iσ'. Also <H> and <N>/2N."""
    n_sites = L * L
    c = _fock_operators(2 * n_sites)
    cd = [op.T.tocsr() for op in c]  # real matrices
    dim = c[0].shape[0]
    H = np.zeros((dim, dim), dtype=complex)
    for x, y in itertools.product(range(L), range(L)):
        i = x * L + y
        for j in (((x + 1) % L) * L + y, x * L + (y + 1) % L):
            for s in (0, 1):
                H += -t * (cd[2 * i + s] @ c[2 * j + s] + cd[2 * j + s] @ c[2 * i + s]).toarray()
    pauli = [np.array([[0, 1], [1, 0]]), np.array([[0, -1j], [1j, 0]]), np.array([[1, 0], [0, -1]])]
    for i in range(n_sites):
        for a in range(3):
            for s, s2 in itertools.product((0, 1), (0, 1)):
                if pauli[a][s, s2] != 0:
                    H += 0.5 * J * spins[i, a] * pauli[a][s, s2] * (cd[2 * i + s] @ c[2 * i + s2]).toarray()
    N = sum(cd[k] @ c[k] for k in range(2 * n_sites)).toarray()
    assert np.allclose(H, H.conj().T)
    e, v = np.linalg.eigh(H - mu * N)
    logz = np.logaddexp.reduce(-e / T)
    w = np.exp(-e / T - logz)
    n_exp = (w * (v.conj() * (N @ v)).sum(0).real).sum()
    h_exp = (w * (v.conj() * (H @ v)).sum(0).real).sum()
    return -T * logz, h_exp, n_exp / (2 * n_sites)


@pytest.mark.parametrize("T,mu", [(0.5, 0.3), (0.1, -1.2)])
def test_free_energy_equals_many_body_partition_function_2x2(T, mu):
    lattice = SquareLattice(2)
    model = DoubleExchangeModel(lattice, t=1.0, J=2.5, temperature=T, mu=mu)
    spins = random_spins(3, 4, torch.Generator().manual_seed(3))
    obs = model.observables(spins)
    for b in range(3):
        omega, energy, filling = _many_body_grand_potential(2, 1.0, 2.5, T, mu, spins[b].numpy())
        assert obs["omega"][b].item() == pytest.approx(omega, abs=1e-10)
        assert obs["energy"][b].item() == pytest.approx(energy, abs=1e-9)
        assert obs["filling"][b].item() == pytest.approx(filling, abs=1e-10)
    # the exact energy depends on the spins (not a constant of the test)
    assert obs["omega"].std() > 1e-3


def test_mu_for_filling():
    lattice = SquareLattice(4)
    model = DoubleExchangeModel(lattice, t=1.0, J=3.0, temperature=0.1)
    spins = random_spins(8, 16, torch.Generator().manual_seed(0))
    # bipartite lattice: half filling at μ = 0 for every spin configuration (particle-hole symmetry)
    assert model.mu_for_filling(0.5, spins) == pytest.approx(0.0, abs=1e-8)
    mu = model.mu_for_filling(0.3, spins)
    model.mu = mu
    assert model.observables(spins)["filling"].mean().item() == pytest.approx(0.3, abs=1e-8)
    assert mu < -0.5


# ---------------------------------------------------------------------------- effective models
def _random_rotation(generator, reflect=False):
    q, r = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=generator))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    if reflect:
        q = q @ torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    return q


def _scrambled_transformer(L=4, layers=3):
    model = EquivariantTransformer(L, layers=layers, heads=3, n_shells=3, conv_shells=2)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64, generator=g))
    return model


@pytest.mark.parametrize("reflect", [False, True])
def test_transformer_invariant_under_global_spin_rotations(reflect):
    model = _scrambled_transformer()
    g = torch.Generator().manual_seed(5)
    spins = random_spins(6, 16, g)
    R = _random_rotation(g, reflect)
    assert torch.det(R).item() == pytest.approx(-1.0 if reflect else 1.0)
    with torch.no_grad():
        e, e_rot = model(spins), model(spins @ R.T)
        eff, eff_rot = model.effective_spins(spins), model.effective_spins(spins @ R.T)
    torch.testing.assert_close(e_rot, e, rtol=0, atol=1e-12)
    torch.testing.assert_close(eff_rot, eff @ R.T, rtol=0, atol=1e-12)
    # not invariant under rotating a single spin: the energy does see the configuration
    local = spins.clone()
    local[:, 0] = local[:, 0] @ R.T
    with torch.no_grad():
        assert (model(local) - e).abs().max() > 1e-3


def test_transformer_equivariant_under_lattice_translations_and_point_group():
    L = 4
    model = _scrambled_transformer(L)
    lattice = SquareLattice(L)
    spins = random_spins(5, L * L, torch.Generator().manual_seed(8))
    with torch.no_grad():
        e, eff = model(spins), model.effective_spins(spins)
        for shift in [(1, 0), (0, 3), (2, 1)]:
            moved = lattice.translate(spins, shift)
            torch.testing.assert_close(model(moved), e, rtol=0, atol=1e-12)
            torch.testing.assert_close(model.effective_spins(moved), lattice.translate(eff, shift), rtol=0, atol=1e-12)
        # 90° rotation and a mirror of the lattice (the positional terms depend on distance only)
        grid = spins.reshape(-1, L, L, 3)
        for image in (torch.rot90(grid, 1, dims=(1, 2)), torch.flip(grid, dims=(1,))):
            torch.testing.assert_close(model(image.reshape(-1, L * L, 3)), e, rtol=0, atol=1e-12)
        # a permutation that is not a lattice symmetry changes the energy
        perm = torch.randperm(L * L, generator=torch.Generator().manual_seed(1))
        assert (model(spins[:, perm]) - e).abs().max() > 1e-3


def test_linear_model_is_zero_layer_transformer_and_fit_recovers_couplings():
    L = 4
    g = torch.Generator().manual_seed(2)
    truth = LinearEffectiveModel(L, 4)
    with torch.no_grad():
        truth.e0.fill_(-3.0)
        truth.couplings.copy_(torch.tensor([0.3, -0.1, 0.05, 0.02], dtype=torch.float64))
    spins = random_spins(50, L * L, g)
    with torch.no_grad():
        energies = truth(spins)
    fitted = LinearEffectiveModel(L, 4)
    fitted.fit(spins, energies)
    torch.testing.assert_close(fitted.couplings, truth.couplings, rtol=0, atol=1e-10)
    # pair sums against a direct double loop over the first shell (nearest neighbours)
    lattice = SquareLattice(L)
    direct = sum((spins[:, i] * spins[:, j]).sum(-1) for i in range(16) for j in range(i + 1, 16)
                 if lattice.distances_squared[i, j] == 1)
    torch.testing.assert_close(fitted.features(spins)[:, 0], direct)
    transformer = EquivariantTransformer(L, layers=0, n_shells=4)
    transformer.init_from_linear(fitted)
    with torch.no_grad():
        torch.testing.assert_close(transformer(spins), energies, rtol=0, atol=1e-10)


def test_new_layers_start_as_identity_maps():
    """A transformer with value weights 0 is its readout (the linear model); one grown from a
    trained shallower transformer starts as the same function."""
    spins = random_spins(4, 16, torch.Generator().manual_seed(4))
    linear = LinearEffectiveModel(4, 3)
    with torch.no_grad():
        linear.couplings.copy_(torch.tensor([0.2, -0.1, 0.05], dtype=torch.float64))
    fresh = EquivariantTransformer(4, layers=2, heads=3, n_shells=3, conv_shells=2)
    fresh.init_from_linear(linear)
    shallow = _scrambled_transformer(layers=2)
    deep = EquivariantTransformer(4, layers=4, heads=3, n_shells=3, conv_shells=2)
    deep.grow_from(shallow)
    with torch.no_grad():
        torch.testing.assert_close(fresh(spins), linear(spins), rtol=0, atol=1e-12)
        torch.testing.assert_close(deep(spins), shallow(spins), rtol=0, atol=1e-12)
        # and the grown layers can change it
        deep.layers[3].wv.add_(0.3)
        assert (deep(spins) - shallow(spins)).abs().max() > 1e-3


def test_effective_model_file_round_trip(tmp_path):
    model = _scrambled_transformer()
    save_effective(model, tmp_path / "m.pt", {"note": "x"})
    loaded, meta = load_effective(tmp_path / "m.pt")
    spins = random_spins(4, 16, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(spins), model(spins), rtol=0, atol=0)
    assert meta == {"note": "x"}


# ---------------------------------------------------------------------------- sampler
TETRAHEDRON = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64) / math.sqrt(3)


def _all_configurations(n_sites, spin_set):
    idx = torch.tensor(list(itertools.product(range(len(spin_set)), repeat=n_sites)))
    return spin_set[idx], idx


def _state_index(spins, spin_set):
    k = (spins @ spin_set.T).argmax(-1)  # [B, N]
    base = len(spin_set) ** torch.arange(spins.shape[1] - 1, -1, -1)
    return (k * base).sum(-1)


def _chi_square_p(counts, expected):
    from scipy.stats import chi2

    keep = expected >= 5
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = ((obs - exp) ** 2 / exp).sum()
    return chi2.sf(stat, len(obs) - 1)


@pytest.mark.parametrize("accept_all", [False, True])
def test_slmc_keeps_the_exact_distribution_on_a_discrete_2x2_lattice(accept_all):
    """Chains drawn from the exact distribution exp(-Ω/T) over the 4^4 configurations of a
    2 x 2 lattice with tetrahedral spins stay distributed that way after SLMC steps with a
    poor effective model; without the exact correction (accept_all) they drift to
    exp(-E_eff/T) and the same test fails."""
    T = 0.25
    lattice = SquareLattice(2)
    model = DoubleExchangeModel(lattice, t=1.0, J=3.0, temperature=T, mu=-1.0)
    configs, _ = _all_configurations(4, TETRAHEDRON)
    omega = model.energy(configs)
    p = torch.softmax(-omega / T, 0).numpy()
    effective = LinearEffectiveModel(2, 1)
    with torch.no_grad():
        effective.couplings.fill_(-0.4)  # ferromagnetic: a quite different distribution
    eff_fn = effective_energy_fn(effective)
    p_eff = torch.softmax(-eff_fn(configs) / T, 0).numpy()
    assert 0.5 * np.abs(p - p_eff).sum() > 0.2
    g = torch.Generator().manual_seed(1234)
    n_chains = 20000
    start = torch.multinomial(torch.from_numpy(p), n_chains, replacement=True, generator=g)
    spins = configs[start].clone()
    state = ChainState(spins, model.energy(spins), eff_fn(spins))
    proposal = LocalProposal(spin_set=TETRAHEDRON)
    accepted = 0.0
    for _ in range(3):
        state, accept, _ = slmc_step(state, model.energy, eff_fn, 1 / T, 6, proposal, g, accept_all=accept_all)
        accepted += accept.double().mean().item() / 3
    counts = np.bincount(_state_index(state.spins, TETRAHEDRON).numpy(), minlength=len(p))
    p_value = _chi_square_p(counts, n_chains * p)
    torch.testing.assert_close(state.energy, model.energy(state.spins))  # the carried energies are right
    if accept_all:
        assert p_value < 1e-10
    else:
        assert 0.05 < accepted < 0.95  # the correction really rejects and accepts
        assert p_value > 1e-3


def test_slmc_with_the_exact_energy_as_effective_model_always_accepts():
    lattice = SquareLattice(4)
    model = DoubleExchangeModel(lattice, t=1.0, J=4.0, temperature=0.1, mu=-1.0)
    g = torch.Generator().manual_seed(0)
    spins = random_spins(3, 16, g)
    state = ChainState(spins, model.energy(spins), model.energy(spins))
    for _ in range(2):
        state, accept, info = slmc_step(state, model.energy, model.energy, 10.0, 5, LocalProposal(step=0.5), g)
        assert accept.all()
        torch.testing.assert_close(info["log_ratio"], torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-10)


def test_local_metropolis_samples_a_single_spin_in_a_field():
    """One spin, E = -h S_z: the Metropolis chain gives <S_z> = coth(βh) - 1/(βh)."""
    beta_h = 2.0

    def energy(s):
        return -s[:, 0, 2]

    g = torch.Generator().manual_seed(7)
    spins = random_spins(2000, 1, g)
    spins, e, _ = local_metropolis(energy, spins, energy(spins), beta_h, 60, LocalProposal(step=0.8), g)
    sz = []
    for _ in range(5):
        spins, e, _ = local_metropolis(energy, spins, e, beta_h, 10, LocalProposal(step=0.8), g)
        sz.append(spins[:, 0, 2].mean().item())
    expected = 1 / math.tanh(beta_h) - 1 / beta_h
    assert np.mean(sz) == pytest.approx(expected, abs=0.015)


# ---------------------------------------------------------------------------- observables
def test_structure_factor_of_ordered_states():
    L = 4
    lattice = SquareLattice(L)
    ferro = torch.zeros(1, 16, 3, dtype=torch.float64)
    ferro[..., 2] = 1.0
    sign = torch.tensor([(-1.0) ** (x + y) for x, y in lattice.coords.tolist()], dtype=torch.float64)
    neel = ferro * sign[None, :, None]
    sq_f, sq_n = structure_factor(ferro, lattice)[0], structure_factor(neel, lattice)[0]
    m_point = (L // 2) * L + L // 2
    assert sq_f[0].item() == pytest.approx(16) and sq_f[1:].abs().max() < 1e-12
    assert sq_n[m_point].item() == pytest.approx(16) and sq_n.sum().item() == pytest.approx(16)
    assert staggered_magnetisation(neel, lattice).item() == pytest.approx(1.0)
    # Σ_q S(q) = Σ_j |S_j|² = N for any configuration
    spins = random_spins(3, 16, torch.Generator().manual_seed(0))
    torch.testing.assert_close(structure_factor(spins, lattice).sum(-1), torch.full((3,), 16.0, dtype=torch.float64))


def test_integrated_autocorrelation_time_of_ar1():
    """AR(1) with coefficient φ: τ_int = (1 + φ) / (2 (1 - φ)) (= 0.5 for white noise)."""
    rng = np.random.default_rng(0)
    for phi in (0.0, 0.8):
        x = np.zeros((8, 20000))
        noise = rng.standard_normal(x.shape)
        for k in range(1, x.shape[1]):
            x[:, k] = phi * x[:, k - 1] + noise[:, k]
        tau, _ = integrated_autocorrelation_time(x)
        assert tau == pytest.approx((1 + phi) / (2 * (1 - phi)), rel=0.1)
