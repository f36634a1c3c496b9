"""The native MD engine against independent references: ASE's VelocityVerlet with ASE's own
Lennard-Jones calculator, energy conservation and its dt² scaling, canonical temperature
averages and fluctuations, conservation of momentum, bit-for-bit restarts, batching, the Verlet
skin, FIRE against ASE's FIRE, and clean stops."""

import math

import numpy as np
import pytest
import torch
from ase import Atoms, units as ase_units
from ase.build import bulk
from ase.calculators.lj import LennardJones as AseLennardJones
from ase.cluster import Icosahedron
from ase.io import read

from torchmdx import units
from torchmdx.errors import SimulationError
from torchmdx.md.engine import Reporter, Simulation
from torchmdx.md.io import TrajectoryWriter, load_restart
from torchmdx.md.run import TrajectoryReporter
from torchmdx.nn.analytic import LennardJones
from torchmdx.nn.base import Potential

EPS, SIG = 0.0104, 3.4  # argon, eV and Å
F64 = torch.float64


class Recorder(Reporter):
    """Keeps every observation."""

    def __init__(self):
        self.observations = []

    def report(self, simulation, observation):
        self.observations.append(observation)

    def array(self, name):
        return np.array([getattr(o, name) for o in self.observations])


def cluster(seed=3, rattle=0.1):
    atoms = Icosahedron("Ar", 2)  # 13 atoms
    atoms.rattle(rattle, seed=seed)
    return atoms


def lj(shift="force"):
    return LennardJones(EPS, SIG, shift=shift)


def test_kinetic_energy_and_temperature_units_by_hand():
    """Two argon atoms at ±100 m/s: K = 2 · ½ m v² = 39.948 · 1.66054e-27 kg · (100 m/s)² / e."""
    atoms = Atoms("Ar2", positions=[[0, 0, 0], [5, 0, 0]])
    sim = Simulation(lj(), atoms, dtype=F64, temperature_K=0)
    v_angstrom_per_fs = 100.0 * 1e10 / 1e15  # 100 m/s = 0.001 Å/fs
    v_internal = v_angstrom_per_fs / units.FS_TO_ASE_TIME  # Å per ASE time unit
    sim.initialize(velocities=[[v_internal, 0, 0], [-v_internal, 0, 0]])
    kinetic = float(sim.kinetic_energy()[0])
    m_ar = atoms.get_masses()[0] * 1.66053904e-27
    by_hand = 2 * 0.5 * m_ar * 100.0**2 / 1.6021766208e-19
    assert kinetic == pytest.approx(by_hand, rel=1e-6)
    # two atoms, centre of mass at rest: N_f = 3·2 - 3 = 3, T = 2K / (3 k_B)
    assert float(sim.temperature()[0]) == pytest.approx(2 * by_hand / (3 * 8.617330337217213e-05), rel=1e-6)


def test_nve_matches_ase_velocity_verlet_step_for_step():
    atoms = cluster()
    sim = Simulation(lj("energy"), atoms, timestep_fs=5.0, temperature_K=40.0, dtype=F64, seed=1, skin=0.3)
    sim.initialize()
    velocities = sim.state.velocities.numpy().copy()
    ours = Recorder()
    steps = 300
    sim.run(steps, every=1, reporters=[ours])

    reference = atoms.copy()
    reference.calc = AseLennardJones(epsilon=EPS, sigma=SIG, rc=3 * SIG, smooth=False)
    reference.set_velocities(velocities)  # same units: Å per ASE time unit
    from ase.md.verlet import VelocityVerlet

    dyn = VelocityVerlet(reference, timestep=5.0 * ase_units.fs)
    positions, speeds = [reference.get_positions()], [reference.get_velocities()]
    for _ in range(steps):
        dyn.run(1)
        positions.append(reference.get_positions())
        speeds.append(reference.get_velocities())
    np.testing.assert_allclose(ours.array("positions"), np.array(positions), rtol=0, atol=1e-10)
    np.testing.assert_allclose(ours.array("velocities"), np.array(speeds), rtol=0, atol=1e-12)
    assert ours.observations[-1].potential[0] == pytest.approx(reference.get_potential_energy(), abs=1e-10)


def _nve_energy_error(timestep_fs, duration_fs, replicas=4):
    atoms = cluster(rattle=0.05)
    sim = Simulation(lj("force"), [atoms] * replicas, timestep_fs=timestep_fs, temperature_K=30.0, dtype=F64, seed=2)
    sim.initialize()
    rec = Recorder()
    steps = int(duration_fs / timestep_fs)
    summary = sim.run(steps, every=max(1, steps // 100), reporters=[rec])
    total = rec.array("conserved")  # NVE: U + K
    kinetic = rec.array("kinetic")
    return np.abs(total - total[0]).max() / len(atoms), kinetic.std(), summary


def test_nve_conserves_energy_with_second_order_error():
    """Force-shifted LJ, 13-atom clusters at 30 K, 5 ps.

    Bound: the total energy stays within 2e-6 eV/atom of its start (the kinetic energy itself
    fluctuates by ~1e-3 eV), and halving the time step reduces the error about 4× (velocity
    Verlet is second order).
    """
    err5, kinetic_std, summary = _nve_energy_error(5.0, 5000.0)
    err25, _, _ = _nve_energy_error(2.5, 5000.0)
    assert err5 < 2e-6
    assert err5 * 13 < 1e-2 * kinetic_std
    assert 2.5 < err5 / err25 < 6.0
    assert abs(summary.energy_drift_eV_per_atom) <= err5 + 1e-15


@pytest.mark.parametrize("ensemble, friction, tau", [("langevin", 10.0, None), ("bussi", None, 100.0), ("nose-hoover", None, 100.0)])
def test_thermostat_average_temperature(ensemble, friction, tau):
    """8 replicas of a 13-atom argon cluster at 30 K, 9.6 ps at 8 fs, the first 1.9 ps discarded.

    Tolerances: the mean temperature within 3% of the target (its statistical error is about
    0.6%); for langevin and bussi (canonical kinetic energy) the relative fluctuation of the
    instantaneous temperature within 15% of sqrt(2/N_f) (N_f = 36).
    """
    target = 30.0
    kwargs = {"friction_per_ps": friction} if friction else {"tau_fs": tau}
    sim = Simulation(lj(), [cluster(rattle=0.02)] * 8, timestep_fs=8.0, ensemble=ensemble,
                     temperature_K=target, dtype=F64, seed=11, **kwargs)
    sim.initialize()
    rec = Recorder()
    sim.run(1200, every=4, reporters=[rec])
    temperature = rec.array("temperature")[len(rec.observations) // 5:]
    assert temperature.mean() == pytest.approx(target, rel=0.03)
    if ensemble != "nose-hoover":
        relative = temperature.std() / temperature.mean()
        assert relative == pytest.approx(math.sqrt(2 / 36), rel=0.15)
    # the thermostat's energy bookkeeping: U + K + (energy taken by the bath) is conserved
    conserved = rec.array("conserved")
    assert np.abs(conserved - conserved[0]).max() / 13 < 5e-5


@pytest.mark.parametrize("ensemble", ["nve", "langevin", "bussi", "nose-hoover"])
def test_total_momentum_stays_zero(ensemble):
    sim = Simulation(lj(), [cluster(seed=k) for k in range(3)], timestep_fs=5.0, ensemble=ensemble,
                     temperature_K=50.0, friction_per_ps=20.0, dtype=F64, seed=5)
    sim.initialize()
    s = sim.system
    assert float(s.momentum(sim.state.velocities).abs().max()) < 1e-12
    sim.run(200, every=50)
    momentum = s.momentum(sim.state.velocities)
    scale = float((s.masses.unsqueeze(-1) * sim.state.velocities).abs().sum())
    assert float(momentum.abs().max()) < 1e-12 * scale


def _periodic_argon():
    atoms = bulk("Ar", "fcc", a=5.3, cubic=True).repeat((2, 2, 2))  # 32 atoms, 10.6 Å box
    atoms.positions -= 0.02  # atoms on the faces sit just outside: wrapped at the first build
    atoms.rattle(0.05, seed=8)
    return atoms


@pytest.mark.parametrize(
    "ensemble, every_step",
    [("langevin", True), ("bussi", True), ("nose-hoover", True), ("langevin", False), ("nose-hoover", False)],
)
def test_restart_continues_bit_for_bit(tmp_path, ensemble, every_step):
    """Run A: 30 steps, write the restart file, 30 more. Run B: a new engine from the file, 30
    steps. Periodic box (wrapping), stochastic thermostats (generator state) and the
    Nosé–Hoover chain variables, per-step checks (CPU default) and chunked checks with replays
    (GPU default): every tensor must be identical."""
    def make():
        return Simulation(LennardJones(EPS, SIG, cutoff=4.6), _periodic_argon(), timestep_fs=5.0,
                          ensemble=ensemble, temperature_K=60.0, friction_per_ps=5.0, tau_fs=50.0,
                          dtype=F64, seed=3, skin=0.6, check_interval=7, check_every_step=every_step)

    restart = tmp_path / "restart.pt"
    a = make()
    inverse_cell = np.linalg.inv(a.system.cell[0].numpy())
    assert (a.system.positions_from_templates().numpy() @ inverse_cell).min() < 0  # atoms outside the box
    a.initialize()
    frac = a.state.positions.numpy() @ inverse_cell
    assert frac.min() >= 0 and frac.max() < 1  # wrapped at the first list build
    a.run(30, every=10, restart_path=restart)
    assert load_restart(restart)["step"] == 30
    a.run(30, every=10)

    b = make()
    b.load_restart(restart)
    assert b.state.step == 30
    b.run(30, every=10)
    assert b.state.step == a.state.step == 60
    for name in ("positions", "velocities", "forces", "energy", "thermostat_energy"):
        assert torch.equal(getattr(a.state, name), getattr(b.state, name)), name
    for key, value in a.integrator.state_dict().items():
        assert torch.equal(value, b.integrator.state_dict()[key]), key
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


def test_batch_of_different_molecules_equals_separate_runs():
    """An argon cluster and a neon-argon cluster in one batch move exactly as when run alone."""
    pot = LennardJones({18: EPS, 10: 0.0031}, {18: SIG, 10: 2.75}, cutoff=9.0, shift="force")
    first = cluster(seed=1)
    second = Icosahedron("Ne", 2)[:7]
    second.numbers[0] = 18
    second.rattle(0.05, seed=2)
    rng = np.random.default_rng(0)
    v1, v2 = rng.normal(0, 0.005, (13, 3)), rng.normal(0, 0.01, (7, 3))
    runs = []
    for structures, velocities in (([first, second], np.vstack([v1, v2])), ([first], v1), ([second], v2)):
        sim = Simulation(pot, structures, timestep_fs=4.0, dtype=F64, temperature_K=0)
        sim.initialize(velocities=velocities)
        sim.run(150, every=50)
        runs.append(sim.state.positions.numpy())
    np.testing.assert_allclose(runs[0][:13], runs[1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(runs[0][13:], runs[2], rtol=0, atol=1e-12)


def test_verlet_skin_and_replays_do_not_change_the_trajectory():
    """Chunked mode (as on a GPU): a tiny skin (the list goes stale inside most chunks: they are
    replayed with per-step checks) and a large skin give the same trajectory as rebuilding at
    every step."""
    atoms = cluster()
    final = {}
    replays = {}
    for label, skin, every_step in (("tiny", 0.02, False), ("large", 1.5, False), ("every-step", 0.0, True)):
        sim = Simulation(lj(), atoms, timestep_fs=5.0, temperature_K=80.0, dtype=F64, seed=4, skin=skin,
                         check_interval=10, check_every_step=every_step)
        sim.initialize()
        summary = sim.run(200, every=100)
        final[label] = sim.state.positions.clone()
        replays[label] = summary.replays
    assert replays["tiny"] > 0 and replays["large"] == 0
    torch.testing.assert_close(final["tiny"], final["every-step"], rtol=0, atol=1e-12)
    torch.testing.assert_close(final["large"], final["every-step"], rtol=0, atol=1e-12)


def _minimum_image(delta, cell):
    frac = delta @ torch.linalg.inv(cell)
    return (frac - torch.round(frac)) @ cell


def test_fixed_capacity_list_gives_the_same_trajectory():
    """The static, capacity-padded list of the CUDA-graph path (padding rows i = j = N-1 masked,
    refilled in place, reallocated when it grows) gives the exact-list trajectory, open and
    periodic, including rebuilds and a capacity reallocation (run eagerly here on the CPU).
    Mode "device" is the graph step's own list, rebuilt at every step with fixed capacity
    (overflow -> careful replay -> larger buffers), positions wrapped at each check point."""
    for potential, atoms in ((lj(), cluster()), (LennardJones(EPS, SIG, cutoff=4.6), _periodic_argon())):
        final = {}
        for mode in ("exact", "fixed", "device"):
            sim = Simulation(potential, atoms, timestep_fs=5.0, temperature_K=80.0, dtype=F64, seed=4, skin=0.05,
                             check_interval=10, check_every_step=False)
            ff = sim.forcefield
            ff.fixed_capacity = mode != "exact"
            ff.rebuild_each_step = mode == "device"
            sim.initialize()
            if mode != "exact":
                assert ff.capacity > int(ff.neighbors.num_pairs) and not bool(ff.neighbors.mask[-1])
                ff.capacity = 1  # the next rebuild must reallocate the buffers
            summary = sim.run(100, every=50)
            if mode == "device":
                # the first fast chunk overflowed its one-row list and was replayed carefully
                assert summary.replays >= 1 and ff.capacity > 1
                assert ff.neighbors.edge_index.shape[1] == ff.capacity  # the step's own list
            else:
                assert summary.neighbor_list_builds >= 2
            final[mode] = sim.state.positions.clone()
            if mode != "exact":
                assert sim.forcefield.layout_version >= 2
        for mode in ("fixed", "device"):
            delta = final[mode] - final["exact"]
            if sim.system.cell is not None:
                delta = _minimum_image(delta, sim.system.cell[0])
            assert float(delta.abs().max()) < 1e-12, mode


def test_fire_minimisation_matches_ase_fire():
    from ase.optimize import FIRE

    atoms = cluster(rattle=0.3, seed=9)
    sim = Simulation(lj("energy"), atoms, dtype=F64, temperature_K=0)
    sim.initialize()
    result = sim.minimize(fmax=1e-4, max_steps=2000)
    assert result.converged and result.fmax < 1e-4
    assert result.energy_end[0] < result.energy_start[0]
    reference = atoms.copy()
    reference.calc = AseLennardJones(epsilon=EPS, sigma=SIG, rc=3 * SIG, smooth=False)
    FIRE(reference, logfile=None).run(fmax=1e-4, steps=2000)
    # the same minimum (another local minimum of this cluster lies > 1e-3 eV away)
    assert result.energy_end[0] == pytest.approx(reference.get_potential_energy(), abs=1e-6)


class NaNBeyond(Potential):
    """Lennard-Jones whose energy turns NaN once the centre of the atoms passes x = ``limit`` (Å)
    (a function of the positions, so replays of a chunk see the same NaN at the same step)."""

    def __init__(self, limit):
        super().__init__()
        self.inner = lj()
        self.cutoff = self.inner.cutoff
        self.limit = limit

    def atomic_energies(self, graph):
        energies = self.inner.atomic_energies(graph)
        beyond = graph.pos[:, 0].detach().mean() > self.limit
        return energies * torch.where(beyond, float("nan"), 1.0)  # NaN energies and forces


@pytest.mark.parametrize("every_step", [True, False])
def test_nan_forces_stop_cleanly_keeping_last_good_state(tmp_path, every_step):
    """The cluster translates by 0.2 Å per step (forces sum to zero, so its centre moves
    uniformly); the model turns NaN half-way between steps 36 and 37."""
    restart = tmp_path / "run.restart.pt"
    trajectory = tmp_path / "run.extxyz"
    atoms = Icosahedron("Ar", 2)
    dt = 5.0
    speed = 0.2 / (dt * units.FS_TO_ASE_TIME)  # Å per ASE time unit
    limit = atoms.positions[:, 0].mean() + 0.2 * 36.5
    sim = Simulation(NaNBeyond(limit), atoms, timestep_fs=dt, dtype=F64, check_interval=10, max_temperature_K=1e9,
                     check_every_step=every_step)
    sim.initialize(velocities=np.tile([speed, 0.0, 0.0], (13, 1)))
    reporter = TrajectoryReporter(TrajectoryWriter(trajectory, 1))
    with pytest.raises(SimulationError) as err:
        sim.run(100, every=10, reporters=[reporter], restart_path=restart, restart_every=20)
    reporter.close()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("simulation stopped at step 37: the forces are not finite (NaN/inf) on atom 0 of structure 0")
    assert "last good state (step 36)" in message and str(restart) in message
    frames = read(trajectory, index=":")
    assert [f.info["step"] for f in frames] == [0, 10, 20, 30, 36]
    assert np.isfinite(frames[-1].positions).all() and np.isfinite(frames[-1].get_forces()).all()
    saved = load_restart(restart)
    assert saved["step"] == 36 and torch.isfinite(saved["forces"]).all()


def test_exploding_temperature_stops():
    atoms = cluster()
    atoms.positions[0] = atoms.positions[1] + [1.5, 0, 0]  # two atoms almost on top of each other
    sim = Simulation(lj(), atoms, timestep_fs=5.0, temperature_K=30.0, dtype=F64, max_temperature_K=1000.0)
    sim.initialize()
    with pytest.raises(SimulationError, match=r"temperature of structure 0 reached .* K, above max_temperature 1000 K"):
        sim.run(100, every=10)
