"""The fast PythonForce of ``MLPotential("torchmdx")`` (torchmdx/openmm/fast.py): torchmdx's own
evaluator (a Calculator: CUDA graph on CUDA, the plain model call on the CPU) instead of the
exported TorchScript module. In float64, on OpenMM's Reference and CPU platforms, its energies
and forces equal the TorchScript PythonForce's (``fastPath=False``) and ``torchmdx.Calculator``'s
(eV, Å, converted with torchmdx.units) on a molecule, a triclinic box (also after the box
changes, as under a barostat) and an ML ligand in MM water; the computation pickles (model file
bytes) and rebuilds lazily; NVE conserves energy. The captured function's logic (packed host
copy, overflow, a new cell without a new GraphedForces) runs eagerly on the CPU; the CUDA graph
itself is a ``gpu`` test.
"""

import pickle

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.io import read

import torchmdx
from torchmdx import units
from torchmdx.md.calculator import Calculator
from torchmdx.openmm import OpenMMError


def _openmm_problem():
    try:
        import openmm  # noqa: F401
        import openmmml  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"openmm/openmmml not importable ({str(exc).splitlines()[0]}); pip install 'torchmdx[openmm]'"
    return None


OPENMM_PROBLEM = _openmm_problem()
pytestmark = pytest.mark.skipif(OPENMM_PROBLEM is not None, reason=str(OPENMM_PROBLEM))

EV_TO_KJ = units.EV_TO_KJ_PER_MOL
FORCE_EV_A_TO_KJ_NM = units.EV_TO_KJ_PER_MOL * units.NM_TO_ANGSTROM  # eV/Å -> kJ/mol/nm
# OpenMM's reduced triclinic form, perpendicular widths above twice the 4 Å cutoff
TRICLINIC = np.array([[11.0, 0.0, 0.0], [2.5, 10.5, 0.0], [-3.0, 4.0, 10.0]])


@pytest.fixture(scope="module")
def model():
    """A small float64 ET, smooth at the cutoff, with a normalisation and elements H, C, N, O."""
    m = torchmdx.build_model({"embedding_dimension": 16, "num_layers": 2, "num_heads": 2, "num_rbf": 8,
                              "cutoff_upper": 4.0, "vector_cutoff": True, "seed": 3, "dtype": "float64"})
    return m.set_normalisation(atomref={1: -13.6, 6: -1029.0, 7: -1485.0, 8: -2040.0}, scale=0.7, shift=0.05,
                               elements=[1, 6, 7, 8]).eval()


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("openmm_fast") / "model.pt"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def peptide(shared_data):
    return read(shared_data / "systems" / "alanine_dipeptide.xyz")


@pytest.fixture(scope="module")
def box_atoms(shared_data):
    """~100 atoms of the solvated peptide in the triclinic box (atoms near opposite faces interact
    through it), some moved by whole lattice vectors (OpenMM's positions need not be wrapped)."""
    full = read(shared_data / "systems" / "alanine_dipeptide_solvated.xyz")
    centre = full.positions.mean(axis=0)
    keep = np.all(np.abs(full.positions - centre) < 5.0, axis=1)
    atoms = Atoms(numbers=full.numbers[keep], positions=full.positions[keep] - centre + 5.0, cell=np.eye(3) * 10.0,
                  pbc=True)
    atoms.set_cell(TRICLINIC, scale_atoms=True)
    atoms.positions[::7] += TRICLINIC[0] - TRICLINIC[2]
    return atoms


def _reference(atoms, model):
    """(kJ/mol, kJ/mol/nm) of torchmdx's Calculator (eager, no skin) on ``atoms``."""
    atoms = atoms.copy()
    atoms.calc = Calculator(model, dtype="float64", skin=0.0)
    return atoms.get_potential_energy() * EV_TO_KJ, atoms.get_forces() * FORCE_EV_A_TO_KJ_NM


def _assert_close(got, ref, rel=1e-12):
    (energy, forces), (ref_energy, ref_forces) = got, ref
    assert energy == pytest.approx(ref_energy, rel=rel, abs=1e-8)
    assert np.abs(forces - ref_forces).max() <= rel * 1e4 * max(1.0, np.abs(ref_forces).max())


def _topology(numbers, box=None):
    import openmm
    import openmm.app as app

    top = app.Topology()
    res = top.addResidue("MOL", top.addChain())
    for k, z in enumerate(numbers):
        element = app.Element.getByAtomicNumber(int(z))
        top.addAtom(f"{element.symbol}{k}", element, res)
    if box is not None:
        top.setPeriodicBoxVectors([openmm.Vec3(*row) for row in np.asarray(box) * units.ANGSTROM_TO_NM])
    return top


def _system(model_file, topology, **options):
    from openmmml import MLPotential

    if "torchmdx" not in MLPotential._implFactories:  # torchmdx on PYTHONPATH without its entry point (GPU machine)
        from torchmdx.openmm.mlpotential import TorchmdxPotentialImplFactory

        MLPotential.registerImplFactory("torchmdx", TorchmdxPotentialImplFactory())
    options.setdefault("implementation", "python")
    potential = MLPotential("torchmdx", modelPath=str(model_file), **options)
    return potential.createSystem(topology, removeCMMotion=False)


def _computation(system):
    """The computation a System's one PythonForce holds, as OpenMM pickled it (the hex of the
    pickle is the ``function`` attribute of the force's XML)."""
    import re

    import openmm

    forces = [f for f in system.getForces() if f.getName() == "torchmdx"]
    assert len(forces) == 1
    xml = openmm.XmlSerializer.serialize(forces[0])
    return pickle.loads(bytes.fromhex(re.search(r'function="([0-9a-f]+)"', xml).group(1)))


def _context(system, atoms, platform="Reference", integrator=None):
    import openmm

    context = openmm.Context(system, integrator or openmm.VerletIntegrator(0.0005),
                             openmm.Platform.getPlatformByName(platform))
    if atoms.pbc.any():
        context.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in atoms.cell.array * units.ANGSTROM_TO_NM])
    context.setPositions(atoms.positions * units.ANGSTROM_TO_NM)
    return context


def _energy_forces(context, groups=-1):
    from openmm import unit

    state = context.getState(getEnergy=True, getForces=True, groups=groups)
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


# ---------------------------------------------------------------------------------------------- equal results
@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_fast_path_equals_script_and_calculator_on_a_molecule(model_file, model, peptide, platform):
    from torchmdx.openmm.fast import FastComputation
    from torchmdx.openmm.forces import PythonForceComputation

    fast = _system(model_file, _topology(peptide.numbers))
    script = _system(model_file, _topology(peptide.numbers), fastPath=False)
    assert isinstance(_computation(fast), FastComputation)
    assert isinstance(_computation(script), PythonForceComputation)
    got = _energy_forces(_context(fast, peptide, platform))
    _assert_close(got, _reference(peptide, model))
    _assert_close(got, _energy_forces(_context(script, peptide, platform)))


def test_fast_path_equals_script_and_calculator_in_a_box_that_changes(model_file, model, box_atoms):
    """A triclinic box with unwrapped positions; then the box and positions scaled by 3 % (what a
    barostat's trial does): the fast computation takes the new cell in place and still equals the
    Calculator and the TorchScript path."""
    import openmm

    topology = _topology(box_atoms.numbers, box_atoms.cell.array)
    fast, script = _system(model_file, topology), _system(model_file, topology, fastPath=False)
    assert fast.usesPeriodicBoundaryConditions()
    fast_context, script_context = _context(fast, box_atoms), _context(script, box_atoms)
    for scale in (1.0, 1.03, 1.03, 1.0):
        atoms = box_atoms.copy()
        atoms.set_cell(box_atoms.cell.array * scale, scale_atoms=True)
        for context in (fast_context, script_context):
            context.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in atoms.cell.array * units.ANGSTROM_TO_NM])
            context.setPositions(atoms.positions * units.ANGSTROM_TO_NM)
        got = _energy_forces(fast_context)
        _assert_close(got, _reference(atoms, model))
        _assert_close(got, _energy_forces(script_context))


def _solvated_ligand(peptide):
    """ML ligand (alanine dipeptide) in OpenMM's TIP3P box (waters on it removed), PME; the
    ligand's MM parameters: LJ only."""
    import openmm
    import openmm.app as app
    from openmm import unit
    from pathlib import Path

    water = app.PDBFile(str(Path(app.__file__).parent / "data" / "tip3p.pdb"))
    box = water.topology.getPeriodicBoxVectors()
    box_nm = np.array([[v.value_in_unit(unit.nanometer) for v in row] for row in box])
    ligand = peptide.positions * units.ANGSTROM_TO_NM
    ligand = ligand - ligand.mean(axis=0) + box_nm.sum(axis=0) / 2
    modeller = app.Modeller(water.topology, water.positions)
    wpos = np.array(water.positions.value_in_unit(unit.nanometer))
    clash = [res for res in water.topology.residues()
             if np.min(np.linalg.norm(wpos[[a.index for a in res.atoms()]][:, None] - ligand[None], axis=-1)) < 0.3]
    modeller.delete(clash)
    system = app.ForceField("amber14/tip3p.xml").createSystem(modeller.topology, nonbondedMethod=app.PME,
                                                              nonbondedCutoff=0.8 * unit.nanometer, rigidWater=True)
    topology = modeller.topology
    residue = topology.addResidue("LIG", topology.addChain())
    nonbonded = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
    first = topology.getNumAtoms()
    for k, z in enumerate(peptide.numbers):
        element = app.Element.getByAtomicNumber(int(z))
        topology.addAtom(f"{element.symbol}{k}", element, residue)
        system.addParticle(element.mass)
        nonbonded.addParticle(0.0, 0.3, 0.4)
    positions = np.concatenate([np.array(modeller.positions.value_in_unit(unit.nanometer)), ligand])
    return topology, system, positions, list(range(first, first + len(peptide))), box


def test_fast_path_ml_ligand_in_mm_water_equals_script_and_calculator(model_file, model, peptide):
    """createMixedSystem: the force's particles are the ligand's; its force group equals the
    Calculator on the ligand alone and the TorchScript path, and is zero on the water."""
    import openmm
    from openmmml import MLPotential

    topology, mm_system, positions, ligand, box = _solvated_ligand(peptide)
    results = {}
    for fast in (True, False):
        potential = MLPotential("torchmdx", modelPath=str(model_file), implementation="python", fastPath=fast)
        mixed = potential.createMixedSystem(topology, mm_system, ligand, forceGroup=1)
        ml = [f for f in mixed.getForces() if f.getName() == "torchmdx"]
        assert len(ml) == 1 and list(ml[0].getParticles()) == ligand
        context = openmm.Context(mixed, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"))
        context.setPeriodicBoxVectors(*box)
        context.setPositions(positions)
        results[fast] = _energy_forces(context, groups={1})
        assert np.isfinite(_energy_forces(context)[0])
    energy, forces = results[True]
    ref_energy, ref_forces = _reference(Atoms(numbers=peptide.numbers, positions=positions[ligand] * units.NM_TO_ANGSTROM),
                                        model)
    _assert_close((energy, forces[ligand]), (ref_energy, ref_forces))
    assert np.all(forces[: ligand[0]] == 0)
    _assert_close(results[True], results[False])


# ---------------------------------------------------------------------------------------------- pickling, NVE
def test_fast_computation_pickles_and_rebuilds_lazily(model_file, model, peptide):
    """The state is the model file's bytes and the options, never the Calculator: a computation
    that has run pickles as a fresh one, builds its Calculator at the first call, and gives the
    same numbers; XmlSerializer round-trips the System."""
    import openmm

    system = _system(model_file, _topology(peptide.numbers))
    computation = _computation(system)
    assert computation.calculator is None and computation.model_bytes == model_file.read_bytes()
    x = peptide.positions * units.ANGSTROM_TO_NM
    first = computation.energy_forces(x)
    assert computation.calculator is not None
    state = pickle.dumps(computation)
    assert len(state) < len(computation.model_bytes) + 4096  # bytes and options only
    copy = pickle.loads(state)
    assert copy.calculator is None and copy.numbers == [int(z) for z in peptide.numbers]
    _assert_close(copy.energy_forces(x), first)
    _assert_close(first, _reference(peptide, model))
    restored = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    _assert_close(_energy_forces(_context(restored, peptide)), first)


def _fluctuation(system, atoms, dt_fs, steps):
    import openmm
    from openmm import unit

    context = _context(system, atoms, "CPU", openmm.VerletIntegrator(dt_fs * 1e-3))
    context.setVelocitiesToTemperature(300.0, 11)
    total, kinetic = [], []
    for _ in range(steps // 5):
        context.getIntegrator().step(5)
        state = context.getState(getEnergy=True)
        kinetic.append(state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole))
        total.append(kinetic[-1] + state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    return np.std(total), np.std(kinetic), total


def test_fast_path_nve_conserves_energy(model_file, peptide):
    """Total energy under OpenMM's VerletIntegrator fluctuates far less than the kinetic energy,
    without drift, and the fluctuation shrinks as dt² (0.5 -> 0.25 fs)."""
    system = _system(model_file, _topology(peptide.numbers))
    std_half, std_kin, total = _fluctuation(system, peptide, 0.5, 200)
    std_quarter, _, _ = _fluctuation(system, peptide, 0.25, 200)
    assert std_half < 0.02 * std_kin
    assert abs(np.mean(total[-10:]) - np.mean(total[:10])) < 3 * std_half + 1e-3
    assert 2.5 < std_half / std_quarter < 6.0


# ---------------------------------------------------------------------------------------------- the graph path's logic
@pytest.fixture
def eager_graph(monkeypatch):
    """GraphedForces run eagerly (use_graph=False: the function a CUDA graph captures, without
    the capture), so the Calculator's graph path can run on the CPU."""
    from torchmdx.md import cuda_graph

    made = []
    original = cuda_graph.GraphedForces.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "use_graph": False})
        made.append(self)

    monkeypatch.setattr(cuda_graph.GraphedForces, "__init__", init)
    return made


def test_graph_path_logic_packs_results_and_keeps_its_function_across_box_changes(model_file, model, box_atoms,
                                                                                   eager_graph):
    """With the Calculator's graph path switched on (run eagerly): one packed host copy gives the
    Calculator's numbers in OpenMM units; a changed box is written into the same GraphedForces
    (set_cell: the list built again, no new function), an overflowing list is regrown."""
    from torchmdx.openmm.fast import FastComputation

    computation = FastComputation(model_file.read_bytes(), "model.pt", box_atoms.numbers, periodic=True)
    x, box = box_atoms.positions * units.ANGSTROM_TO_NM, box_atoms.cell.array * units.ANGSTROM_TO_NM
    eager = computation.energy_forces(x, box)
    computation.calculator.cuda_graph = True  # what device="cuda" chooses
    _assert_close(computation.energy_forces(x, box), eager)
    assert len(eager_graph) == 1
    graphed = eager_graph[0]
    builds = graphed.forcefield.builds
    for scale in (1.03, 0.99):
        atoms = box_atoms.copy()
        atoms.set_cell(box_atoms.cell.array * scale, scale_atoms=True)
        got = computation.energy_forces(atoms.positions * units.ANGSTROM_TO_NM, atoms.cell.array * units.ANGSTROM_TO_NM)
        _assert_close(got, _reference(atoms, model))
    assert len(eager_graph) == 1 and graphed.forcefield.builds == builds + 2
    assert torch.allclose(graphed.system.cell[0].double(), torch.as_tensor(box_atoms.cell.array) * 0.99)
    graphed.forcefield.capacity, graphed.forcefield._static = 1, None  # too few rows: overflow, regrow
    _assert_close(computation.energy_forces(atoms.positions * units.ANGSTROM_TO_NM, atoms.cell.array * units.ANGSTROM_TO_NM),
                  got)
    assert graphed.regrowths == 1 and graphed.forcefield.capacity > 1


def test_graphed_forces_host_copy_equals_its_device_outputs(model, peptide):
    from torchmdx.md.cuda_graph import GraphedForces

    graphed = GraphedForces(model, peptide, "cpu", torch.float64, use_graph=False)
    positions = torch.as_tensor(peptide.positions)
    energy, forces, atomic = (t.clone() for t in graphed(positions))
    packed = graphed.host(positions)
    n = len(peptide)
    assert packed.dtype == torch.float64 and packed.shape == (4 * n + 1,)
    torch.testing.assert_close(packed[:3 * n].view(n, 3), forces, rtol=0, atol=0)
    torch.testing.assert_close(packed[3 * n:4 * n], atomic, rtol=0, atol=0)
    assert float(packed[4 * n]) == float(energy.sum())


# ---------------------------------------------------------------------------------------------- one-line errors
def test_fast_path_bad_input_is_one_line(model_file, tmp_path):
    from openmmml import MLPotential

    from torchmdx.openmm.export import export_openmm

    top = _topology([8, 1, 1])
    cases = [
        ({"fastPath": "yes"}, top, "fastPath must be True or False, got 'yes'"),
        ({"cudaGraph": "no"}, top, "cudaGraph must be 'auto', True or False, got 'no'"),
        ({"cudaGraph": True, "device": "cpu"}, top, "cudaGraph=True needs a CUDA device"),
        ({"compile": "fast"}, top, "compile must be one of"),
        ({"dtype": "float16"}, top, "float16"),
        ({}, _topology([6, 1, 16, 1]), "atom 2 (S2, residue MOL 1) of the ML region is element S (Z=16), which "),
    ]
    if not torch.cuda.is_available():
        cases.append(({"device": "cuda"}, top, "no CUDA GPU is available here"))
    for options, topology, message in cases:
        with pytest.raises(OpenMMError) as err:
            MLPotential("torchmdx", modelPath=str(model_file), implementation="python", **options).createSystem(topology)
        assert message in str(err.value) and "\n" not in str(err.value), (options, str(err.value))
    small = _topology([8, 1, 1], np.eye(3) * 7.0)
    with pytest.raises(OpenMMError, match="use a box at least 0.8 nm wide"):
        _system(model_file, small)
    export = tmp_path / "model_openmm.pt"
    export_openmm(model_file, export)
    with pytest.raises(OpenMMError, match="has no torchmdx model for fastPath=True") as err:
        _system(export, top, fastPath=True)
    assert "\n" not in str(err.value)
    # without fastPath an export runs as TorchScript, as before
    from torchmdx.openmm.forces import PythonForceComputation

    assert isinstance(_computation(_system(export, top)), PythonForceComputation)


def test_auto_takes_the_fast_path_for_a_model_file_even_where_openmm_torch_loads(model_file, peptide, monkeypatch,
                                                                               tmp_path):
    """implementation='auto' picks what was measured fastest: the fast PythonForce for a model file;
    an export (TorchScript only) or fastPath=False goes to a TorchForce where openmm-torch loads."""
    import torchmdx.openmm.forces as forces
    from torchmdx.openmm import export_openmm
    from torchmdx.openmm.fast import FastComputation

    top = _topology(peptide.numbers)
    monkeypatch.setattr(forces, "openmmtorch_problem", lambda: None)  # as if openmm-torch loaded here
    assert isinstance(_computation(_system(model_file, top, implementation="auto")), FastComputation)
    chosen = []
    monkeypatch.setattr(forces, "create_torch_force", lambda module, periodic: chosen.append(module) or
                        __import__("openmm").CustomExternalForce("0"))
    export = tmp_path / "model_openmm.pt"
    export_openmm(model_file, export)
    for path, options in ((export, {}), (model_file, {"fastPath": False})):
        chosen.clear()
        _system(path, top, implementation="auto", **options)
        assert len(chosen) == 1, (path, options)  # the TorchForce path was taken


# ---------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_path_equals_the_eager_cuda_path(model_file, model, peptide, box_atoms):
    """On CUDA the fast PythonForce replays a CUDA graph (list rebuilt in the graph; for the
    molecule the default compiled whole-model graph): its energies and forces equal the eager CUDA
    path's and the float64 Calculator's (a molecule, a box that changes), and 40 NVE steps follow
    the eager trajectory. (The box runs uncompiled: compiling costs minutes, not coverage.)"""
    import openmm

    for atoms, compiled in ((peptide, "auto"), (box_atoms, "off")):
        box = atoms.cell.array if atoms.pbc.any() else None
        graph = _system(model_file, _topology(atoms.numbers, box), device="cuda", compile=compiled)
        eager = _system(model_file, _topology(atoms.numbers, box), device="cuda", cudaGraph=False, compile="off")
        contexts = [_context(graph, atoms), _context(eager, atoms)]
        for scale in ((1.0, 1.02, 1.0) if box is not None else (1.0,)):
            moved = atoms.copy()
            if box is not None:
                moved.set_cell(box * scale, scale_atoms=True)
            for context in contexts:
                if box is not None:
                    context.setPeriodicBoxVectors(*[openmm.Vec3(*r) for r in moved.cell.array * units.ANGSTROM_TO_NM])
                context.setPositions(moved.positions * units.ANGSTROM_TO_NM)
            got = _energy_forces(contexts[0])
            _assert_close(got, _energy_forces(contexts[1]), rel=1e-9)
            _assert_close(got, _reference(moved, model), rel=1e-9)
        if box is None:  # the same Systems (their computations, already compiled and captured), new contexts
            trajectories = []
            for system in (graph, eager):
                context = _context(system, peptide, "CPU", openmm.VerletIntegrator(0.0005))
                context.setVelocitiesToTemperature(300.0, 5)
                context.getIntegrator().step(40)
                trajectories.append(context.getState(getPositions=True).getPositions(asNumpy=True)._value)
            np.testing.assert_allclose(trajectories[0], trajectories[1], atol=1e-7)
