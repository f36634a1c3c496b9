"""The native engine's CUDA-graph path equals its eager path (GPU only; skipped on the CPU)."""

import numpy as np
import pytest
import torch
from ase.io import read

import torchmdx
from torchmdx.md.engine import Simulation

pytestmark = pytest.mark.gpu

SMALL_ET = {"embedding_dimension": 32, "num_layers": 2, "num_heads": 4, "num_rbf": 16,
            "vector_cutoff": True, "cutoff_upper": 4.0, "seed": 3}


def _run(atoms, ensemble, cuda_graph, steps, skin=0.5, shrink_capacity=False, **kwargs):
    model = torchmdx.build_model(SMALL_ET)
    # the graph runs use the compiled model (the default on CUDA), the eager ones the plain model
    sim = Simulation(model, atoms, ensemble=ensemble, device="cuda", dtype=torch.float32, seed=7, skin=skin,
                     check_every_step=False, cuda_graph=cuda_graph, compile=cuda_graph, temperature_K=300.0, **kwargs)
    sim.initialize()
    if shrink_capacity:
        sim.forcefield.capacity = 1  # the next rebuild must grow the buffers: a new capture
    summary = sim.run(steps, every=10)
    return sim, summary


@pytest.fixture(scope="module")
def peptide(shared_data):
    return read(shared_data / "systems" / "alanine_dipeptide.xyz")


def test_nve_graph_equals_eager(peptide):
    eager, _ = _run(peptide, "nve", False, 60)
    graph, summary = _run(peptide, "nve", True, 60)
    # 22 atoms: the whole model is one traced + compiled graph ("whole"); larger systems compile parts
    assert graph._graphed is not None and graph._graphed.captures >= 1 and graph.compile_mode != "off"
    assert graph.traced == (graph.compile_mode == "whole") and graph.compiled == (graph.compile_mode == "parts")
    np.testing.assert_allclose(graph.state.positions.cpu(), eager.state.positions.cpu(), atol=2e-5)
    np.testing.assert_allclose(graph.state.velocities.cpu(), eager.state.velocities.cpu(), atol=2e-5)
    np.testing.assert_allclose(graph.state.energy.cpu(), eager.state.energy.cpu(), rtol=1e-6, atol=1e-4)
    assert graph.state.step == 60 and summary.steps == 60


def test_rebuilds_and_capacity_growth_recapture(peptide):
    # a tiny skin forces many rebuilds; the shrunken capacity forces a reallocation and a new capture
    eager, _ = _run(peptide, "nve", False, 80, skin=0.05)
    graph, summary = _run(peptide, "nve", True, 80, skin=0.05, shrink_capacity=True)
    assert summary.neighbor_list_builds >= 2 and summary.replays >= 1  # the one-row list overflowed
    assert graph._graphed.captures >= 2
    np.testing.assert_allclose(graph.state.positions.cpu(), eager.state.positions.cpu(), atol=5e-5)


def test_nose_hoover_graph_equals_eager(peptide):
    eager, _ = _run(peptide, "nose-hoover", False, 40)
    graph, _ = _run(peptide, "nose-hoover", True, 40)
    np.testing.assert_allclose(graph.state.positions.cpu(), eager.state.positions.cpu(), atol=2e-5)
    np.testing.assert_allclose(graph.integrator.xi.cpu(), eager.integrator.xi.cpu(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ensemble", ["langevin", "bussi"])
def test_stochastic_graph_runs_and_keeps_momentum(peptide, ensemble):
    graph, _ = _run(peptide, ensemble, True, 60)
    velocities = graph.state.velocities.double()
    masses = graph.system.masses.double().unsqueeze(-1)
    assert torch.isfinite(graph.state.positions).all()
    assert (masses * velocities).sum(0).abs().max() < 1e-4
    # each replay draws fresh numbers: the generator state advances as in eager mode
    before = graph.generator.get_state()
    graph.run(10, every=10)
    assert not torch.equal(before, graph.generator.get_state())
    assert torch.isfinite(graph.temperature()).all()


def test_periodic_graph_equals_eager(shared_data):
    atoms = read(shared_data / "systems" / "alanine_dipeptide_solvated.xyz")
    eager, _ = _run(atoms, "nve", False, 20)
    graph, _ = _run(atoms, "nve", True, 20)
    # the graph path wraps positions at every check point, the eager one at its list builds
    cell = graph.system.cell[0].double().cpu()
    frac = (graph.state.positions - eager.state.positions).double().cpu() @ torch.linalg.inv(cell)
    delta = (frac - torch.round(frac)) @ cell
    assert float(delta.abs().max()) < 5e-5

