"""The ASE calculator: forces and stress against finite differences, per-atom energies, reuse of
the neighbor list, element errors, ASE optimisers and cell filters."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.lj import LennardJones as AseLennardJones
from ase.io import read

import torchmdx
from torchmdx.errors import ModelError
from torchmdx.md.calculator import Calculator
from torchmdx.nn.analytic import HarmonicBonds, LennardJones, SumPotential

EPS, SIG = 0.0104, 3.4


@pytest.fixture(scope="module")
def et_model_file(tmp_path_factory):
    """A small randomly initialised ET model file (float32 when saved)."""
    model = torchmdx.build_model(
        {"embedding_dimension": 16, "num_layers": 2, "num_heads": 2, "num_rbf": 8, "cutoff_upper": 4.0, "seed": 3}
    )
    path = tmp_path_factory.mktemp("models") / "et.pt"
    model.save(path)
    return path


def _numeric_forces(atoms, indices, h=1e-4):
    out = {}
    for a in indices:
        for c in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.calc = minus.calc = atoms.calc
            plus.positions[a, c] += h
            minus.positions[a, c] -= h
            out[a, c] = -(plus.get_potential_energy() - minus.get_potential_energy()) / (2 * h)
    return out


def test_et_forces_equal_finite_differences(shared_data, et_model_file):
    atoms = read(shared_data / "systems" / "alanine_dipeptide.xyz")
    atoms.calc = Calculator(et_model_file, dtype="float64")
    forces = atoms.get_forces()
    for (a, c), value in _numeric_forces(atoms, [0, 21]).items():
        assert forces[a, c] == pytest.approx(value, rel=1e-6, abs=1e-8)
    energies = atoms.get_potential_energies()
    assert energies.shape == (len(atoms),)
    assert energies.sum() == pytest.approx(atoms.get_potential_energy(), rel=1e-12)
    assert atoms.calc.get_property("free_energy") == atoms.get_potential_energy()


def _lj_crystal():
    atoms = bulk("Ar", "fcc", a=5.2, cubic=True).repeat((3, 3, 3))
    # a triclinic, strained, rattled crystal so that every stress component is non-trivial
    atoms.set_cell(atoms.cell.array @ np.array([[1.0, 0.03, 0.0], [0.01, 0.98, 0.02], [0.0, 0.0, 1.02]]), scale_atoms=True)
    atoms.rattle(0.05, seed=4)
    return atoms


def test_stress_equals_strain_derivative():
    atoms = _lj_crystal()
    atoms.calc = Calculator(LennardJones(EPS, SIG, cutoff=7.0, shift="force"), dtype=torch.float64)
    stress = atoms.get_stress(voigt=False)
    volume = atoms.get_volume()
    h = 1e-6
    voigt_pairs = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]
    for i, j in voigt_pairs:
        energies = []
        for sign in (1, -1):
            strained = atoms.copy()
            eps = np.zeros((3, 3))
            eps[i, j] += sign * h / 2
            eps[j, i] += sign * h / 2
            deform = np.eye(3) + eps
            strained.set_cell(atoms.cell.array @ deform, scale_atoms=False)
            strained.positions = atoms.positions @ deform
            strained.calc = atoms.calc
            energies.append(strained.get_potential_energy())
        numeric = (energies[0] - energies[1]) / (2 * h) / volume
        assert stress[i, j] == pytest.approx(numeric, rel=1e-5, abs=1e-9), (i, j)
    # and ASE's own Lennard-Jones agrees on the energy-shifted form
    ase_atoms = atoms.copy()
    ase_atoms.calc = AseLennardJones(epsilon=EPS, sigma=SIG, rc=7.0, smooth=False)
    ours = atoms.copy()
    ours.calc = Calculator(LennardJones(EPS, SIG, cutoff=7.0), dtype=torch.float64)
    np.testing.assert_allclose(ours.get_stress(), ase_atoms.get_stress(), atol=1e-12)


def test_reuses_neighbor_list_while_only_positions_change():
    atoms = _lj_crystal()
    calc = Calculator(LennardJones(EPS, SIG, cutoff=6.0), dtype=torch.float64, skin=1.0)
    atoms.calc = calc
    atoms.get_forces()
    assert calc.neighbor_list_builds == 1 and calc.effective_skin == 1.0
    reference = atoms.copy()
    reference.calc = AseLennardJones(epsilon=EPS, sigma=SIG, rc=6.0, smooth=False)
    # small moves (< skin/2): no rebuild, and the results equal a fresh evaluation
    for k in range(3):
        atoms.rattle(0.03, seed=10 + k)
        reference.positions = atoms.positions
        np.testing.assert_allclose(atoms.get_forces(), reference.get_forces(), atol=1e-12)
        assert atoms.get_potential_energy() == pytest.approx(reference.get_potential_energy(), rel=1e-12)
    assert calc.neighbor_list_builds == 1
    # a large move rebuilds
    atoms.positions[0] += [0.7, 0.0, 0.0]
    reference.positions = atoms.positions
    np.testing.assert_allclose(atoms.get_forces(), reference.get_forces(), atol=1e-12)
    assert calc.neighbor_list_builds == 2
    # a small homogeneous strain keeps the list (no pair can have come within the cutoff) ...
    for factor, builds in [(1.01, 2), (0.98, 2), (0.85, 3)]:
        atoms.set_cell(atoms.cell.array * factor, scale_atoms=True)
        reference.set_cell(atoms.cell, scale_atoms=False)
        reference.positions = atoms.positions
        assert atoms.get_potential_energy() == pytest.approx(reference.get_potential_energy(), rel=1e-12)
        np.testing.assert_allclose(atoms.get_stress(), reference.get_stress(), atol=1e-12)
        # ... a large compression (pairs from beyond cutoff + skin come within the cutoff) rebuilds
        assert calc.neighbor_list_builds == builds, factor


def test_unknown_element_is_one_line_model_error():
    lj = LennardJones({18: EPS, 10: 0.0031}, {18: SIG, 10: 2.75})
    atoms = Atoms("ArNeXe", positions=[[0, 0, 0], [3.5, 0, 0], [0, 3.5, 0]])
    atoms.calc = Calculator(lj)
    with pytest.raises(ModelError) as err:
        atoms.get_potential_energy()
    assert "\n" not in str(err.value)
    assert "atom 2 is element Xe (Z=54)" in str(err.value)


def test_missing_model_file_is_model_error(tmp_path):
    with pytest.raises(ModelError, match="model file not found"):
        Calculator(tmp_path / "nope.pt")


def test_stress_of_a_molecule_is_not_implemented():
    from ase.calculators.calculator import PropertyNotImplementedError

    atoms = molecule("H2O")
    atoms.calc = Calculator(LennardJones(0.01, 1.0))
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()


def test_bfgs_relaxes_a_molecule(shared_data):
    """Harmonic bonds + a weak LJ repulsion between all atoms: distort caffeine, relax it back."""
    from ase.optimize import BFGS

    atoms = read(shared_data / "systems" / "caffeine.xyz")
    equilibrium = atoms.copy()
    bonds = HarmonicBonds.from_atoms(atoms, k=20.0, cutoff=3.0)
    atoms.rattle(0.08, seed=5)
    atoms.calc = Calculator(SumPotential([bonds]), dtype=torch.float64)
    start = atoms.get_potential_energy()
    converged = BFGS(atoms, logfile=None).run(fmax=1e-3, steps=300)
    assert converged
    assert np.abs(atoms.get_forces()).max() < 1e-3
    assert atoms.get_potential_energy() < 1e-6 < start
    # every bond length restored to its reference
    pairs = np.array(bonds.hparams()["bonds"])
    lengths = np.linalg.norm(atoms.positions[pairs[:, 0]] - atoms.positions[pairs[:, 1]], axis=1)
    reference = np.linalg.norm(equilibrium.positions[pairs[:, 0]] - equilibrium.positions[pairs[:, 1]], axis=1)
    np.testing.assert_allclose(lengths, reference, atol=1e-3)


def test_cell_filter_relaxes_a_crystal():
    """FIRE on ASE's UnitCellFilter (positions and cell): forces and stress go to zero."""
    from ase.filters import UnitCellFilter
    from ase.optimize import FIRE

    atoms = bulk("Ar", "fcc", a=5.3, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.03, seed=1)
    atoms.calc = Calculator(LennardJones(EPS, SIG, cutoff=5.0, shift="force"), dtype=torch.float64, skin=0.3)
    start_energy, start_stress = atoms.get_potential_energy(), np.abs(atoms.get_stress()).max()
    converged = FIRE(UnitCellFilter(atoms), logfile=None).run(fmax=1e-4, steps=300)
    assert converged
    assert np.abs(atoms.get_stress()).max() < 1e-4 < start_stress
    assert np.abs(atoms.get_forces()).max() < 1e-4
    assert atoms.get_potential_energy() < start_energy


def test_graphed_forces_logic_equals_the_potential_and_regrows_its_list():
    """The calculator's CUDA-graph function (run eagerly here: the same code that is captured)
    rebuilds its fixed-capacity list each call; a list too small for the pairs is detected,
    regrown and recomputed, and results equal a plain potential call (open and periodic)."""
    from torchmdx.md.cuda_graph import GraphedForces

    potential = LennardJones(EPS, SIG, cutoff=7.0)
    for atoms in (molecule("CH3CH2OH"), bulk("Ar", "fcc", a=5.26, cubic=True).repeat((3, 3, 3))):
        graphed = GraphedForces(potential, atoms, "cpu", torch.float64, skin=0.3, use_graph=False)
        rng = np.random.default_rng(0)
        for call in range(3):
            positions = torch.as_tensor(atoms.positions + rng.normal(scale=0.05, size=atoms.positions.shape))
            if call == 1:
                graphed.forcefield.capacity = 1  # the in-step list overflows: regrow and recompute
                graphed.forcefield._static = None
            energy, forces, atomic = graphed(positions)
            cell = torch.as_tensor(atoms.cell.array).unsqueeze(0) if atoms.pbc.any() else None
            pbc = torch.as_tensor(atoms.pbc).unsqueeze(0) if atoms.pbc.any() else None
            ref = potential(torch.as_tensor(atoms.numbers), positions, None, cell, pbc, per_atom=True)
            torch.testing.assert_close(energy, ref["energy"], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(forces, ref["forces"], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(atomic, ref["energies"], rtol=1e-12, atol=1e-12)
        assert graphed.regrowths == 1 and graphed.forcefield.capacity > 1


def test_cuda_graph_option_needs_cuda():
    from torchmdx.errors import ConfigError

    with pytest.raises(ConfigError, match="cuda_graph needs a CUDA device"):
        Calculator(LennardJones(EPS, SIG, cutoff=7.0), device="cpu", cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_calculator_graph_path_equals_eager_in_ase_md(shared_data):
    """ASE VelocityVerlet with the graph-replay calculator (compiled ET, list rebuilt in the
    graph) follows the eager calculator's trajectory."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    config = {"embedding_dimension": 32, "num_layers": 2, "num_heads": 4, "num_rbf": 16, "vector_cutoff": True,
              "cutoff_upper": 4.0, "seed": 3}
    start = read(shared_data / "systems" / "alanine_dipeptide.xyz")
    start.set_velocities(np.random.default_rng(0).normal(scale=0.01, size=(len(start), 3)))
    final = {}
    for graph in (False, True):
        atoms = start.copy()
        atoms.calc = Calculator(torchmdx.build_model(config), device="cuda", cuda_graph=graph, compile=graph)
        VelocityVerlet(atoms, timestep=0.5 * units.fs).run(30)
        final[graph] = atoms.get_positions()
        if graph:
            assert atoms.calc._graphed is not None and atoms.calc._graphed.captures == 1
    np.testing.assert_allclose(final[True], final[False], atol=2e-5)
