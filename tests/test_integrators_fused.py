"""Fused integrator steps (torchmdx/md/integrators_fused.py) against the eager integrators, the
reference: float64 on the CPU, every ensemble, one structure and a batch of two different
molecules, the engine's atom order set (Langevin noise permuted inside the fused function), a
fixed seed. The plain (uncompiled) pure functions must equal the eager step bit for bit; the
compiled ones (torch.compile, inductor's C++ on the CPU) to rounding; the random generator must
end in the same state; restart files written by a fused run continue in a fused or an eager run."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.cluster import Icosahedron

from torchmdx.errors import ConfigError
from torchmdx.md.engine import Simulation
from torchmdx.nn.analytic import LennardJones

ENSEMBLES = ["nve", "langevin", "bussi", "nose-hoover"]
FIELDS = ("positions", "velocities", "forces", "energy", "thermostat_energy")
STEPS = 25


def structures(kind):
    first = Icosahedron("Ar", 2)  # 13 atoms
    first.rattle(0.1, seed=3)
    if kind == "one":
        return [first]
    second = Icosahedron("Ne", 2)[:7]  # another molecule: 7 atoms, neon and one argon
    second.numbers[0] = 18
    second.rattle(0.05, seed=2)
    return [first, second]


def make(ensemble, kind, fuse, **kwargs):
    pot = LennardJones({18: 0.0104, 10: 0.0031}, {18: 3.4, 10: 2.75}, cutoff=9.0, shift="force")
    options = dict(timestep_fs=4.0, ensemble=ensemble, temperature_K=60.0, friction_per_ps=20.0, tau_fs=40.0,
                   dtype=torch.float64, seed=11, atom_order="hilbert", fuse_integrator=fuse)
    options.update(kwargs)
    sim = Simulation(pot, structures(kind), **options)
    sim.initialize()
    return sim


def assert_same(a, b, atol):
    for name in FIELDS:
        x, y = getattr(a.state, name), getattr(b.state, name)
        if atol == 0:
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=name)
    for key, value in a.integrator.state_dict().items():
        other = b.integrator.state_dict()[key]
        assert torch.equal(value, other) if atol == 0 else torch.allclose(value, other, rtol=0, atol=atol), key
    assert a.state.step == b.state.step
    assert torch.equal(a.generator.get_state(), b.generator.get_state())  # the same draws, in the same order


@pytest.mark.parametrize("kind", ["one", "two"])
@pytest.mark.parametrize("ensemble", ENSEMBLES)
def test_plain_fused_functions_equal_the_eager_step_bit_for_bit(ensemble, kind):
    eager = make(ensemble, kind, False)
    plain = make(ensemble, kind, False)
    plain.integrator.set_fused(True, compile=False)
    assert eager.atom_perm is not None  # the engine's order differs from the input order
    eager.run(STEPS, every=5)
    plain.run(STEPS, every=5)
    assert_same(eager, plain, atol=0)
    calls = plain.integrator.fused.calls
    assert sum(calls.values()) == 2 * STEPS, calls  # every step went through the two functions
    # the thermostats did something (else equality would say little)
    if ensemble != "nve":
        moved = eager.state.thermostat_energy if ensemble != "nose-hoover" else eager.integrator.v_xi
        assert moved.abs().min() > 0


@pytest.mark.parametrize("kind", ["one", "two"])
@pytest.mark.parametrize("ensemble", ENSEMBLES)
def test_compiled_fused_step_equals_the_eager_step(ensemble, kind):
    eager = make(ensemble, kind, False)
    fused = make(ensemble, kind, True)
    eager.run(STEPS, every=5)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    fused.run(STEPS, every=5)
    assert_same(eager, fused, atol=1e-12)
    functions = fused.integrator.fused._functions
    assert len(functions) == 2 and torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 2
    for fn in functions.values():  # what ran is torch.compile's wrapper of the pure function
        assert fn.compiled is True and fn.fn is fn.torch_compiled
        assert hasattr(fn.fn, "_torchdynamo_orig_callable")
    assert sum(fused.integrator.fused.calls.values()) == 2 * STEPS


def test_per_structure_sums_of_a_batch_match_separate_runs():
    """Kinetic energies and centre-of-mass velocities per structure: Nosé–Hoover chain (per
    structure scaling from the kinetic energy) of two molecules in one batch equals each alone."""
    together = make("nose-hoover", "two", True, atom_order="input")
    v = np.random.default_rng(0).normal(0, 0.01, (20, 3))
    together.initialize(velocities=v)
    together.run(STEPS, every=5)
    alone = []
    for part, rows in ((structures("two")[:1], slice(0, 13)), (structures("two")[1:], slice(13, 20))):
        pot = together.potential
        sim = Simulation(pot, part, timestep_fs=4.0, ensemble="nose-hoover", temperature_K=60.0, tau_fs=40.0,
                         dtype=torch.float64, atom_order="input", fuse_integrator=True)
        sim.initialize(velocities=v[rows])
        sim.run(STEPS, every=5)
        alone.append(sim.state.positions)
    torch.testing.assert_close(together.state.positions, torch.cat(alone), rtol=0, atol=1e-12)


@pytest.mark.parametrize("ensemble", ["langevin", "nose-hoover"])
def test_restart_of_a_fused_run_continues_fused_and_eager(tmp_path, ensemble):
    restart = tmp_path / "restart.pt"
    a = make(ensemble, "two", True)
    a.run(20, every=10, restart_path=restart)
    a.run(10, every=10)
    for fuse in (True, False):
        b = make(ensemble, "two", fuse)
        b.load_restart(restart)
        assert b.state.step == 20
        b.run(10, every=10)
        assert_same(a, b, atol=1e-12)


def test_a_compile_failure_falls_back_to_the_plain_functions(monkeypatch, capsys):
    """A compiler error (here forced) costs one note line; the step runs the same operations."""
    from torchmdx.md import integrators_fused

    def broken(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("inductor exploded")

        return fail

    monkeypatch.setattr(integrators_fused.torch, "compile", broken)
    eager, fused = make("langevin", "two", False), make("langevin", "two", True)
    eager.run(10, every=5)
    fused.run(10, every=5)
    assert_same(eager, fused, atol=0)
    assert all(fn.compiled is False for fn in fused.integrator.fused._functions.values())
    err = capsys.readouterr().err
    assert "compiling the fused integrator (langevin_before) failed (inductor exploded)" in err
    assert err.count("note: compiling the fused integrator") == 2  # once per function, not per step


def test_engine_option():
    assert make("nve", "one", False).integrator.fused is None
    assert make("nve", "one", "auto").integrator.fused is None  # auto: only with a compiled model (not on the CPU)
    assert make("nve", "one", True).integrator.fused is not None
    with pytest.raises(ConfigError, match="fuse_integrator"):
        make("nve", "one", "yes")


def test_count_step_ops_md_mode(shared_data):
    """bench/count_step_ops.py --md: the eager Langevin step's kernels, and the fused step's:
    only the random draw outside the compiled functions, inductor kernels for each."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import count_step_ops

    parts = count_step_ops.count_md_step("langevin", "alanine_dipeptide", 2, shared_data / "systems", "input")
    eager = parts["eager"]
    assert eager["randn"] == 1 and eager["index_add"] == 3 and sum(eager.values()) > 30
    assert dict(parts["fused (outside compiled)"]) == {"randn": 1}
    kernels = parts["fused inductor kernels"]
    assert set(kernels) == {"langevin_before", "verlet_after"} and all(n >= 1 for n in kernels.values())
    assert sum(kernels.values()) < sum(eager.values())


# ---------------------------------------------------------------------------- GPU (skipped on the CPU)
@pytest.mark.gpu
@pytest.mark.parametrize("ensemble", ENSEMBLES)
def test_gpu_fused_step_in_the_cuda_graph_equals_eager(ensemble):
    """float64 Lennard-Jones, two molecules, the engine's atom order: the fused integrator
    (Triton kernels) inside the captured CUDA-graph step against the eager integrator in the
    same captured step (the same random draws)."""
    eager = make(ensemble, "two", False, device="cuda", check_every_step=False, cuda_graph=True)
    graph = make(ensemble, "two", True, device="cuda", check_every_step=False, cuda_graph=True)
    eager.run(STEPS, every=5)
    graph.run(STEPS, every=5)
    # no fallback: still fused, still graphed
    assert graph.integrator.fused is not None and graph._graphed is not None and graph._graphed.captures >= 1
    assert_same(eager, graph, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("ensemble", ["nve", "langevin"])
def test_gpu_fused_step_with_the_compiled_model(shared_data, ensemble):
    """fuse_integrator="auto" with the default compiled whole-model graph, float32 ET on alanine
    dipeptide: the same trajectory as the eager integrator in the same graph."""
    import torchmdx
    from ase.io import read

    atoms = read(shared_data / "systems" / "alanine_dipeptide.xyz")
    runs = []
    for fuse in (False, "auto"):
        model = torchmdx.build_model({"embedding_dimension": 32, "num_layers": 2, "num_heads": 4, "num_rbf": 16,
                                      "vector_cutoff": True, "cutoff_upper": 4.0, "seed": 3})
        sim = Simulation(model, atoms, ensemble=ensemble, device="cuda", seed=7, temperature_K=300.0,
                         fuse_integrator=fuse)
        sim.initialize()
        sim.run(60, every=10)
        runs.append(sim)
    eager, fused = runs
    assert fused.integrator.fused is not None and fused._graphed is not None
    np.testing.assert_allclose(fused.state.positions.cpu(), eager.state.positions.cpu(), atol=2e-5)
    np.testing.assert_allclose(fused.state.velocities.cpu(), eager.state.velocities.cpu(), atol=2e-5)


def test_non_finite_check_equals_the_engines_flag():
    """The fused epilogue's check (one compiled kernel in the captured step) against
    ``RunLoop._bad_flag``, the reference: finite, inf and NaN forces or energies, an already set flag."""
    from torchmdx.md.integrators_fused import FusedFunctions

    sim = make("nve", "two", False)
    fused = FusedFunctions(compile=True).get("non_finite", "cpu")
    forces, energy = sim.state.forces.clone(), sim.state.energy.clone()
    cases = [(forces, energy)]
    for where, value in ((forces, float("inf")), (forces, float("nan")), (energy, float("-inf")), (energy, float("nan"))):
        f, e = forces.clone(), energy.clone()
        (f if where is forces else e).view(-1)[1] = value
        cases.append((f, e))
    for f, e in cases:
        sim.state.forces, sim.state.energy = f, e
        for bad in (torch.tensor(False), torch.tensor(True)):
            assert torch.equal(fused(bad, f, e), bad | sim._bad_flag(sim.state))
    assert fused.compiled is True


class _ScaledLJ(LennardJones):
    """Lennard-Jones times a buffer the test sets to NaN mid-run (the captured graph reads it in place)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("factor", torch.ones((), dtype=torch.float64))

    def atomic_energies(self, graph):
        return super().atomic_energies(graph) * self.factor.to(graph.pos.dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("fused_epilogue", [True, False])
def test_gpu_non_finite_forces_mid_run_stop_the_captured_step(monkeypatch, fused_epilogue):
    """Forces that turn NaN in the middle of a chunk of replays: the captured step's flag (the fused
    epilogue's compiled check, or the reference op by op) makes the engine replay the chunk with checks
    and stop with the engine's one line, the same either way."""
    from torchmdx.errors import SimulationError
    from torchmdx.md import cuda_graph

    monkeypatch.setattr(cuda_graph, "FUSED_EPILOGUE", fused_epilogue)
    pot = _ScaledLJ({18: 0.0104, 10: 0.0031}, {18: 3.4, 10: 2.75}, cutoff=9.0, shift="force")
    sim = Simulation(pot, structures("two"), timestep_fs=4.0, temperature_K=60.0, dtype=torch.float64, seed=11,
                     fuse_integrator=True, device="cuda", check_every_step=False, cuda_graph=True, compile=False)
    sim.initialize()
    sim.run(10, every=10)
    assert sim._graphed is not None and sim._graphed.captures >= 1
    sim.potential.factor.fill_(float("nan"))  # the engine's copy (moved to the GPU), read in place by the graph
    with pytest.raises(SimulationError, match=r"^simulation stopped at step 11: the forces are not finite"):
        sim.run(10, every=10)
    assert sim.state.step == 10  # stopped at the last good step
