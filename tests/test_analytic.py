"""Analytic potentials against independent references: ASE's Lennard-Jones calculator, energies
computed by hand, finite differences; model-file round trips."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.lj import LennardJones as AseLennardJones
from ase.cluster import Icosahedron

import torchmdx
from torchmdx.errors import ModelError
from torchmdx.nn.analytic import HarmonicBonds, LennardJones, Morse, SumPotential

EPS, SIG = 0.0104, 3.4  # argon-like, eV and Å


def _evaluate(potential, atoms, stress=False):
    cell = torch.tensor(atoms.cell.array) if atoms.pbc.any() else None
    pbc = torch.tensor(atoms.pbc) if atoms.pbc.any() else None
    out = potential.double()(
        torch.tensor(atoms.numbers), torch.tensor(atoms.positions), None, cell, pbc, stress=stress, per_atom=True
    )
    return {k: v.detach().numpy() for k, v in out.items()}


def test_lennard_jones_matches_ase_cluster():
    atoms = Icosahedron("Ar", 2)
    atoms.rattle(0.05, seed=1)
    atoms.calc = AseLennardJones(epsilon=EPS, sigma=SIG, rc=3 * SIG, smooth=False)
    out = _evaluate(LennardJones(EPS, SIG), atoms)
    assert out["energy"][0] == pytest.approx(atoms.get_potential_energy(), rel=1e-12)
    np.testing.assert_allclose(out["forces"], atoms.get_forces(), atol=1e-13)
    np.testing.assert_allclose(out["energies"], atoms.get_potential_energies(), atol=1e-13)


def test_lennard_jones_matches_ase_periodic_stress():
    atoms = bulk("Ar", "fcc", a=5.3, cubic=True).repeat((3, 3, 3))
    atoms.rattle(0.05, seed=2)
    atoms.set_cell(atoms.cell.array @ np.array([[1.0, 0.02, 0.0], [0.0, 1.0, 0.03], [0.0, 0.0, 1.0]]), scale_atoms=True)
    cutoff = 7.0
    atoms.calc = AseLennardJones(epsilon=EPS, sigma=SIG, rc=cutoff, smooth=False)
    out = _evaluate(LennardJones(EPS, SIG, cutoff=cutoff), atoms, stress=True)
    assert out["energy"][0] == pytest.approx(atoms.get_potential_energy(), rel=1e-12)
    np.testing.assert_allclose(out["forces"], atoms.get_forces(), atol=1e-12)
    ase_stress = atoms.get_stress(voigt=False)
    np.testing.assert_allclose(out["stress"][0], ase_stress, atol=1e-12)


def test_lennard_jones_dimer_by_hand_and_shifts():
    r, rc = 3.9, 8.0
    dimer = Atoms("Ar2", positions=[[0, 0, 0], [r, 0, 0]])

    def lj(x):
        return 4 * EPS * ((SIG / x) ** 12 - (SIG / x) ** 6)

    def dlj(x):
        return 4 * EPS * (-12 * SIG**12 / x**13 + 6 * SIG**6 / x**7)

    e_none = _evaluate(LennardJones(EPS, SIG, cutoff=rc, shift="none"), dimer)["energy"][0]
    e_energy = _evaluate(LennardJones(EPS, SIG, cutoff=rc, shift="energy"), dimer)["energy"][0]
    out_force = _evaluate(LennardJones(EPS, SIG, cutoff=rc, shift="force"), dimer)
    assert e_none == pytest.approx(lj(r), rel=1e-13)
    assert e_energy == pytest.approx(lj(r) - lj(rc), rel=1e-13)
    assert out_force["energy"][0] == pytest.approx(lj(r) - lj(rc) - (r - rc) * dlj(rc), rel=1e-13)
    # force-shifted: F = -(φ'(r) - φ'(rc)) along the bond; zero at the cutoff
    assert out_force["forces"][1, 0] == pytest.approx(-(dlj(r) - dlj(rc)), rel=1e-12)
    just_inside = Atoms("Ar2", positions=[[0, 0, 0], [rc - 1e-6, 0, 0]])
    assert abs(_evaluate(LennardJones(EPS, SIG, cutoff=rc, shift="force"), just_inside)["forces"][1, 0]) < 1e-9
    beyond = Atoms("Ar2", positions=[[0, 0, 0], [rc + 0.1, 0, 0]])
    assert _evaluate(LennardJones(EPS, SIG, cutoff=rc), beyond)["energy"][0] == 0.0


def test_lennard_jones_mixing_rules_by_hand():
    eps = {18: 0.0104, 10: 0.0031}
    sig = {18: 3.4, 10: 2.75}
    pot = LennardJones(eps, sig, cutoff=9.0, shift="none")
    r = 3.3
    pair = Atoms("ArNe", positions=[[0, 0, 0], [0, r, 0]])
    e_mix, s_mix = np.sqrt(eps[18] * eps[10]), 0.5 * (sig[18] + sig[10])
    expected = 4 * e_mix * ((s_mix / r) ** 12 - (s_mix / r) ** 6)
    assert _evaluate(pot, pair)["energy"][0] == pytest.approx(expected, rel=1e-13)
    with pytest.raises(ModelError, match=r"atom 1 is element Xe \(Z=54\).*it knows: Ne, Ar"):
        pot.check_elements(torch.tensor([18, 54]))


def test_morse_dimer_by_hand():
    depth, r0, width, rc = 0.5, 1.2, 1.7, 5.0
    pot = Morse(depth, r0, width, cutoff=rc)
    r = 1.5
    dimer = Atoms("H2", positions=[[0, 0, 0], [0, 0, r]])

    def phi(x):
        return depth * ((1 - np.exp(-width * (x - r0))) ** 2 - 1)

    out = _evaluate(pot, dimer)
    assert out["energy"][0] == pytest.approx(phi(r) - phi(rc), rel=1e-13)
    dphi = 2 * depth * width * (1 - np.exp(-width * (r - r0))) * np.exp(-width * (r - r0))
    assert out["forces"][1, 2] == pytest.approx(-dphi, rel=1e-12)


def test_harmonic_bonds_by_hand_batched_and_periodic():
    # a bent triatomic: bonds 0-1 and 1-2
    positions = np.array([[0.0, 0.0, 0.0], [1.1, 0.0, 0.0], [1.6, 0.9, 0.0]])
    bonds, r0, k = [[0, 1], [1, 2]], [1.0, 1.05], [20.0, 15.0]
    pot = HarmonicBonds(bonds, r0, k).double()
    d01 = np.linalg.norm(positions[1] - positions[0])
    d12 = np.linalg.norm(positions[2] - positions[1])
    expected = 0.5 * k[0] * (d01 - r0[0]) ** 2 + 0.5 * k[1] * (d12 - r0[1]) ** 2
    mol = Atoms("OCO", positions=positions)
    assert _evaluate(pot, mol)["energy"][0] == pytest.approx(expected, rel=1e-13)
    # two replicas in one batch, the second shifted across a periodic boundary of a 10 Å box
    box = np.eye(3) * 10.0
    shifted = positions + np.array([9.5, 0.0, 0.0])
    shifted[shifted[:, 0] >= 10.0, 0] -= 10.0
    pos = torch.tensor(np.concatenate([positions + 3.0, shifted]))
    out = pot(
        torch.tensor([8, 6, 8] * 2), pos, torch.tensor([0, 0, 0, 1, 1, 1]),
        torch.tensor(np.stack([box, box])), torch.tensor([[True] * 3] * 2),
    )
    np.testing.assert_allclose(out["energy"].detach().numpy(), [expected, expected], rtol=1e-12)
    with pytest.raises(ModelError, match="molecule of 3 atoms"):
        pot.check_elements(torch.tensor([8, 6, 8, 1]))


def test_harmonic_bonds_from_atoms_finds_bonds(shared_data):
    from ase.io import read

    atoms = read(shared_data / "systems" / "caffeine.xyz")
    pot = HarmonicBonds.from_atoms(atoms)
    assert len(pot.hparams()["bonds"]) == 25  # caffeine C8H10N4O2: 25 covalent bonds
    assert _evaluate(pot, atoms)["energy"][0] == pytest.approx(0.0, abs=1e-20)


@pytest.mark.parametrize(
    "potential",
    [
        LennardJones(EPS, SIG, shift="force"),
        LennardJones({18: EPS, 10: 0.0031}, {18: SIG, 10: 2.75}, cutoff=8.0),
        Morse(0.3, 3.8, 1.2, cutoff=8.0),
        HarmonicBonds([[0, 1], [1, 2]], [3.6, 3.7], [1.0, 2.0], num_atoms=13, cutoff=6.0),
    ],
    ids=["lj", "lj-mixed", "morse", "bonds"],
)
def test_forces_are_minus_energy_gradient(potential):
    atoms = Icosahedron("Ar", 2)
    atoms.numbers[[0, 5]] = 10
    atoms.rattle(0.1, seed=7)
    out = _evaluate(potential, atoms)
    h = 1e-5
    for a, c in [(0, 0), (3, 1), (12, 2)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[a, c] += h
        minus.positions[a, c] -= h
        numeric = -(_evaluate(potential, plus)["energy"][0] - _evaluate(potential, minus)["energy"][0]) / (2 * h)
        assert out["forces"][a, c] == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_sum_potential_adds_terms():
    atoms = Icosahedron("Ar", 2)
    lj, morse = LennardJones(EPS, SIG), Morse(0.2, 3.8, 1.0, cutoff=7.0)
    total = _evaluate(SumPotential([lj, morse]), atoms)["energy"][0]
    assert total == pytest.approx(_evaluate(lj, atoms)["energy"][0] + _evaluate(morse, atoms)["energy"][0], rel=1e-13)


@pytest.mark.parametrize(
    "potential",
    [
        LennardJones({18: EPS, 10: 0.0031}, {18: SIG, 10: 2.75}, cutoff=8.0, shift="force"),
        Morse(0.3, 3.8, 1.2),
        HarmonicBonds([[0, 1], [1, 2]], [3.6, 3.7], [1.0, 2.0], num_atoms=13, cutoff=6.0),
        SumPotential([LennardJones(EPS, SIG), HarmonicBonds([[0, 1]], [3.6], [1.0], num_atoms=13)]),
    ],
    ids=["lj", "morse", "bonds", "sum"],
)
def test_model_file_round_trip(tmp_path, potential):
    path = tmp_path / "analytic.pt"
    potential.save(path)
    loaded = torchmdx.load_model(path)
    assert type(loaded) is type(potential) and loaded.hparams() == potential.hparams()
    atoms = Icosahedron("Ar", 2)
    atoms.numbers[0] = 10
    atoms.rattle(0.1, seed=3)
    np.testing.assert_array_equal(_evaluate(loaded, atoms)["forces"], _evaluate(potential, atoms)["forces"])
