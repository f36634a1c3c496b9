"""OpenMM (issue 23): the TorchScript module for openmm-torch's TorchForce, openmm-ml's
MLPotential("torchmdx") and ``torchmdx export --openmm``, in float64 against torchmdx's own
ASE Calculator (eV, Å) after unit conversion with torchmdx.units.

Three tiers, each skipping with a one-line reason when its package cannot be used here:
- no OpenMM needed: the module itself (nm / kJ/mol) vs the Calculator on a molecule and on
  periodic boxes, atom subsets, returned forces, the scripted neighbor list vs the reference
  list, the export file and its metadata, one-line errors, the CLI;
- openmm + openmmml (torchmdx[openmm], works with the pinned torch): MLPotential through
  openmm.PythonForce: energies/forces on the Reference and CPU platforms, NVE under OpenMM's
  VerletIntegrator, an ML ligand in MM water (createMixedSystem);
- openmmtorch: the same through TorchForce. Its only PyPI wheel (1.5) loads only beside the CUDA
  build of torch 2.9.0, so these run in such an environment (scripts/openmm_torchforce_env.sh)
  and skip under torchmdx's pinned torch 2.13.0 with the import error as the reason.
"""

import sys
from typing import Optional

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.io import read

import torchmdx
from torchmdx import units
from torchmdx.errors import ModelError
from torchmdx.md.calculator import Calculator
from torchmdx.openmm import OpenMMError
from torchmdx.openmm.export import (box_check, build_module, export_openmm, load_module, metadata, read_metadata,
                                    save_module, with_atoms)
from torchmdx.openmm.forces import openmmtorch_problem
from torchmdx.openmm.neighbors import pairs_within

F64 = torch.float64
ELEMENTS = [1, 6, 7, 8]
EV_TO_KJ = units.EV_TO_KJ_PER_MOL
FORCE_EV_A_TO_KJ_NM = units.EV_TO_KJ_PER_MOL * units.NM_TO_ANGSTROM  # eV/Å -> kJ/mol/nm
# a triclinic box in OpenMM's reduced form (a along x, b in the xy plane, |b_x|, |c_x| <= a_x/2,
# |c_y| <= b_y/2), perpendicular widths above twice the 4 Å cutoff
TRICLINIC = np.array([[11.0, 0.0, 0.0], [2.5, 10.5, 0.0], [-3.0, 4.0, 10.0]])


def _openmm_problem():
    try:
        import openmm  # noqa: F401
        import openmmml  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"openmm/openmmml not importable ({str(exc).splitlines()[0]}); pip install 'torchmdx[openmm]'"
    return None


OPENMM_PROBLEM = _openmm_problem()
TORCH_PROBLEM = OPENMM_PROBLEM or openmmtorch_problem()
needs_openmm = pytest.mark.skipif(OPENMM_PROBLEM is not None, reason=str(OPENMM_PROBLEM))
needs_openmmtorch = pytest.mark.skipif(TORCH_PROBLEM is not None, reason=str(TORCH_PROBLEM))


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model():
    """A small float64 ET (smooth at the cutoff: vector_cutoff) with a real normalisation and
    elements H, C, N, O."""
    m = torchmdx.build_model({"embedding_dimension": 16, "num_layers": 2, "num_heads": 2, "num_rbf": 8,
                              "cutoff_upper": 4.0, "vector_cutoff": True, "seed": 3, "dtype": "float64"})
    return m.set_normalisation(atomref={1: -13.6, 6: -1029.0, 7: -1485.0, 8: -2040.0}, scale=0.7, shift=0.05,
                               elements=ELEMENTS).eval()


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("openmm") / "model.pt"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def generic(model_file, tmp_path_factory):
    """(path, module) of a generic export (atoms not set)."""
    path = tmp_path_factory.mktemp("openmm") / "model_openmm.pt"
    return path, export_openmm(model_file, path)


@pytest.fixture(scope="module")
def peptide(shared_data):
    return read(shared_data / "systems" / "alanine_dipeptide.xyz")


@pytest.fixture(scope="module")
def water_box(shared_data):
    """~100 atoms of the solvated peptide in a periodic 10 Å cube (atoms near opposite faces
    interact through the boundary), plus the same atoms with some moved by whole lattice vectors."""
    full = read(shared_data / "systems" / "alanine_dipeptide_solvated.xyz")
    centre = full.positions.mean(axis=0)
    keep = np.all(np.abs(full.positions - centre) < 5.0, axis=1)
    atoms = Atoms(numbers=full.numbers[keep], positions=full.positions[keep] - centre + 5.0, cell=np.eye(3) * 10.0, pbc=True)
    return atoms


def _calc_reference(atoms, model):
    atoms = atoms.copy()
    atoms.calc = Calculator(model, dtype="float64", skin=0.0)
    return atoms.get_potential_energy() * EV_TO_KJ, atoms.get_forces() * FORCE_EV_A_TO_KJ_NM


def _module_energy_forces(module, positions_nm, box_nm=None):
    pos = torch.tensor(positions_nm, dtype=F64, requires_grad=True)
    box = None if box_nm is None else torch.tensor(box_nm, dtype=F64)
    if module.outputs_forces:
        energy, forces = module(pos, box)
        return float(energy), forces.numpy()
    energy = module(pos, box)
    (grad,) = torch.autograd.grad(energy, pos)
    return float(energy.detach()), -grad.numpy()


def _assert_close(energy, forces, ref_energy, ref_forces):
    assert energy == pytest.approx(ref_energy, rel=1e-12, abs=1e-8)
    assert np.abs(forces - ref_forces).max() <= 1e-8 * max(1.0, np.abs(ref_forces).max())


# ---------------------------------------------------------------------------------------------- no OpenMM
def test_unit_constants_are_inverse_and_match_ase():
    import ase.units

    assert units.EV_TO_KJ_PER_MOL * units.KJ_PER_MOL_TO_EV == pytest.approx(1.0, rel=1e-15)
    assert units.EV_TO_KJ_PER_MOL == pytest.approx(ase.units.mol / ase.units.kJ, rel=1e-15)
    assert units.ANGSTROM_TO_NM * units.NM_TO_ANGSTROM == 1.0


@pytest.mark.parametrize("case", ["open", "cubic", "triclinic", "far_images"])
def test_scripted_neighbor_list_equals_the_reference(case):
    from torchmdx.kernels.neighbors_ref import neighbor_list

    gen = torch.Generator().manual_seed(7)
    box = None if case == "open" else torch.tensor(np.eye(3) * 9.0 if case == "cubic" else TRICLINIC, dtype=F64)
    pos = torch.rand(60, 3, generator=gen, dtype=F64) * 9.0
    if case == "far_images":  # atoms several boxes away: still the minimum image
        pos = pos + torch.randint(-3, 4, (60, 3), generator=gen).to(F64) @ box
    scripted = torch.jit.script(pairs_within)
    edge_index, shifts = scripted(pos, 4.0, box, 500)  # small chunks: several passes
    ref = neighbor_list(pos, 4.0, None, box, None if box is None else torch.ones(3, dtype=torch.bool))
    ours = sorted(zip(edge_index[0].tolist(), edge_index[1].tolist(), map(tuple, shifts.round().long().tolist())))
    theirs = sorted(zip(ref.edge_index[0].tolist(), ref.edge_index[1].tolist(), map(tuple, ref.shifts.round().long().tolist())))
    assert ours == theirs and len(ours) > 100
    assert edge_index[0].tolist() == sorted(edge_index[0].tolist())  # sorted by receiver


def test_module_equals_calculator_on_a_molecule(model, peptide, generic):
    _, module = generic
    module = with_atoms(module, peptide.numbers.tolist())
    energy, forces = _module_energy_forces(module, peptide.positions * units.ANGSTROM_TO_NM)
    _assert_close(energy, forces, *_calc_reference(peptide, model))


@pytest.mark.parametrize("cell", ["cubic", "triclinic"])
def test_module_equals_calculator_in_a_periodic_box(model, water_box, generic, cell):
    atoms = water_box.copy()
    if cell == "triclinic":
        atoms.set_cell(TRICLINIC, scale_atoms=True)
    _, module = generic
    module = with_atoms(module, atoms.numbers.tolist())
    # move every third atom by whole lattice vectors: OpenMM does not wrap positions for a TorchForce
    moved = atoms.positions + (np.arange(len(atoms))[:, None] % 3 == 0) * (np.array([1, -2, 1]) @ atoms.cell.array)
    energy, forces = _module_energy_forces(module, moved * units.ANGSTROM_TO_NM, atoms.cell.array * units.ANGSTROM_TO_NM)
    ref_energy, ref_forces = _calc_reference(atoms, model)
    _assert_close(energy, forces, ref_energy, ref_forces)
    # the box matters: the same positions without it give another energy
    open_energy, _ = _module_energy_forces(module, atoms.positions * units.ANGSTROM_TO_NM)
    assert abs(open_energy - ref_energy) > 1.0


def test_atom_subset_with_returned_forces(model, model_file, peptide):
    """TorchForce passes every particle: the module picks the ML atoms; returned forces are zero
    elsewhere and equal the Calculator's on the ML atoms."""
    module = build_module(model_file, forces="returned")
    ml = [3, 0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    others = np.random.default_rng(0).uniform(-20, 20, size=(30, 3))  # MM particles
    positions = np.concatenate([others[:10], peptide.positions, others[10:]])
    indices = [10 + a for a in ml]
    with_atoms(module, [int(peptide.numbers[a]) for a in ml], indices)
    energy, forces = _module_energy_forces(module, positions * units.ANGSTROM_TO_NM)
    ref_energy, ref_forces = _calc_reference(peptide[ml], model)
    _assert_close(energy, forces[indices], ref_energy, ref_forces)
    rest = np.setdiff1d(np.arange(len(positions)), indices)
    assert np.all(forces[rest] == 0.0)


def test_equiformer_exports_too(shared_data):
    model = torchmdx.build_model({"architecture": "equiformer", "lmax": 1, "channels": 8, "num_layers": 1, "num_heads": 2,
                                  "feature_channels": 8, "num_rbf": 8, "radial_hidden": [8], "cutoff_upper": 4.0,
                                  "dtype": "float64", "seed": 0}).eval()
    atoms = read(shared_data / "systems" / "caffeine.xyz")
    module = build_module(model, atoms.numbers.tolist())
    energy, forces = _module_energy_forces(module, atoms.positions * units.ANGSTROM_TO_NM)
    _assert_close(energy, forces, *_calc_reference(atoms, model))


def test_export_file_records_units_elements_cutoff_and_reloads(generic, peptide, model):
    path, _ = generic
    meta = read_metadata(path)
    assert meta["format"] == "torchmdx-openmm"
    assert meta["units"] == {"positions": "nm", "box": "nm", "energy": "kJ/mol", "forces": "kJ/mol/nm"}
    assert meta["elements"] == ELEMENTS and meta["element_symbols"] == ["H", "C", "N", "O"]
    assert meta["cutoff"] == pytest.approx(0.4) and meta["cutoff_angstrom"] == 4.0
    assert meta["constants"]["energy_from_ev"] == units.EV_TO_KJ_PER_MOL
    assert meta["device"] == "cpu" and meta["forces"] == "autograd" and meta["atomic_numbers"] is None
    assert meta["model"]["kind"] == "et" and meta["model"]["normalisation"]["scale"] == 0.7
    module, _ = load_module(path)
    with_atoms(module, peptide.numbers.tolist())
    energy, _ = _module_energy_forces(module, peptide.positions * units.ANGSTROM_TO_NM)
    assert energy == pytest.approx(_calc_reference(peptide, model)[0], rel=1e-12)


def test_unit_mismatch_is_one_line(model_file, tmp_path):
    path = tmp_path / "ev.pt"
    module = export_openmm(model_file, path, length_unit="angstrom", energy_unit="eV")
    assert module.length_to_angstrom == 1.0 and module.energy_from_ev == 1.0
    with pytest.raises(OpenMMError) as err:
        load_module(path)
    message = str(err.value)
    assert "\n" not in message and "OpenMM passes nm" in message and "length_unit='nm', energy_unit='kJ/mol'" in message
    with pytest.raises(OpenMMError, match="unknown length unit 'furlong'"):
        export_openmm(model_file, length_unit="furlong")


def test_elements_the_model_lacks_and_atoms_without_element(generic):
    _, module = generic
    with pytest.raises(OpenMMError) as err:
        with_atoms(module, [6, 1, 16, 1], names=["C1", "H1", "atom 2 (SG, residue CYS 5)", "H2"], source="model.pt")
    assert str(err.value) == ("atom 2 (SG, residue CYS 5) of the ML region is element S (Z=16), which model.pt does not know "
                              "(its elements: H, C, N, O); leave it out of the ML atoms or use a model trained on S")
    with pytest.raises(OpenMMError, match="atom 1 of the ML region has no element"):
        with_atoms(module, [6, None])
    with pytest.raises(OpenMMError, match="2 atom indices were given for 3 atomic numbers"):
        with_atoms(module, [6, 1, 1], [0, 1])


def test_module_without_atoms_box_too_small_and_wrong_count_fail_clearly(generic, model_file):
    module = build_module(model_file)
    script_error = (RuntimeError, torch.jit.Error)  # raised inside TorchScript
    with pytest.raises(script_error, match="has no atoms yet"):
        module(torch.zeros(3, 3, dtype=F64))
    with_atoms(module, [8, 1, 1])
    with pytest.raises(script_error, match="3 atoms"):
        module(torch.zeros(4, 3, dtype=F64))
    pos = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.1, 0.0]], dtype=F64)
    with pytest.raises(script_error, match="use a larger box"):
        module(pos, torch.eye(3, dtype=F64) * 0.7)  # 7 Å < 2 x 4 Å
    with pytest.raises(OpenMMError) as err:
        box_check(np.eye(3) * 7.0, 4.0, "model.pt")
    assert str(err.value) == ("the periodic box is 0.7 nm wide at its narrowest, not more than twice the cutoff of model.pt "
                              "(0.4 nm); use a box at least 0.8 nm wide (minimum image)")


def test_missing_openmm_is_one_line(monkeypatch):
    from torchmdx.openmm import forces

    monkeypatch.setitem(sys.modules, "openmm", None)  # import openmm -> ImportError
    with pytest.raises(OpenMMError) as err:
        forces.import_openmm()
    assert "OpenMM is not installed" in str(err.value) and "pip install 'torchmdx[openmm]'" in str(err.value)
    assert "\n" not in str(err.value)


class _Run:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def _cli(capsys):
    """``torchmdx export ARGS`` in this process (what the console script runs)."""
    from torchmdx.cli.main import main

    def run(*args):
        capsys.readouterr()
        code = main(["export", *map(str, args)])
        out = capsys.readouterr()
        return _Run(code, out.out, out.err)

    return run


def test_cli_export_openmm(_cli, model_file, model, peptide, shared_data, tmp_path):
    out = tmp_path / "ala_openmm.pt"
    structure = shared_data / "systems" / "alanine_dipeptide.xyz"
    run = _cli("--openmm", model_file, "-o", out, "--structure", structure, "--atoms", "0-9,12")
    assert run.returncode == 0, run.stderr
    assert "nm -> kJ/mol, cutoff 0.4 nm, elements H, C, N, O, 11 ML atoms" in run.stdout
    meta = read_metadata(out)
    ml = list(range(10)) + [12]
    assert meta["atoms"] == ml and meta["atomic_numbers"] == peptide.numbers[ml].tolist()
    module, _ = load_module(out)
    energy, forces = _module_energy_forces(module, peptide.positions * units.ANGSTROM_TO_NM)
    ref_energy, ref_forces = _calc_reference(peptide[ml], model)
    _assert_close(energy, forces[ml], ref_energy, ref_forces)
    # bad input: one line, exit status 2, nothing written
    bad = tmp_path / "bad.pt"
    cases = [
        (("--openmm", model_file, "-o", out), f"error: {out}: exists; pass --force to replace it, or choose another name"),
        (("--openmm", model_file, "-o", bad, "--atoms", "1-3"), "error: --atoms needs --structure (the file whose atoms they index)"),
        (("--openmm", model_file, "-o", bad, "--structure", structure, "--atoms", "0-30"),
         "error: --atoms: atom 22 is outside the structure's 22 atoms (0-based: 0..21)"),
        (("--openmm", model_file, "-o", bad, "--structure", shared_data / "systems" / "chignolin.xyz", "--atoms", "0"), None),
        (("--openmm", tmp_path / "nothing.pt", "-o", bad), "error:"),
    ]
    for args, expected in cases:
        run = _cli(*args)
        lines = run.stderr.strip().splitlines()
        if expected is None:  # chignolin's first atom is N: fine
            assert run.returncode == 0, run.stderr
            bad.unlink()
            continue
        assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), run.stderr
        assert not bad.exists()


def test_cli_structure_with_an_element_the_model_lacks(_cli, tmp_path, model_file):
    structure = tmp_path / "h2s.xyz"
    Atoms("SH2", positions=[[0, 0, 0], [1.3, 0, 0], [0, 1.3, 0]]).write(structure)
    run = _cli("--openmm", model_file, "-o", tmp_path / "x.pt", "--structure", structure)
    assert run.returncode == 2
    assert run.stderr.strip() == (f"error: {structure}: atom 0 of the ML region is element S (Z=16), which the model "
                                  "does not know (its elements: H, C, N, O); leave it out of the ML atoms or use a model "
                                  "trained on S")  # the structure file named since round 20


# ---------------------------------------------------------------------------------------------- OpenMM
def _topology(numbers, residue="MOL"):
    import openmm.app as app

    top = app.Topology()
    res = top.addResidue(residue, top.addChain())
    for k, z in enumerate(numbers):
        top.addAtom(f"{app.Element.getByAtomicNumber(int(z)).symbol}{k}", app.Element.getByAtomicNumber(int(z)), res)
    return top


def _context(system, positions_nm, platform="Reference", integrator=None, box_nm=None):
    import openmm

    integrator = integrator or openmm.VerletIntegrator(0.0005)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform))
    if box_nm is not None:
        context.setPeriodicBoxVectors(*box_nm)
    context.setPositions(positions_nm)
    return context


def _state_energy_forces(context, groups=-1):
    from openmm import unit

    state = context.getState(getEnergy=True, getForces=True, groups=groups)
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


def _ml_system(model_file, topology, implementation, **options):
    from openmmml import MLPotential

    if implementation == "python":  # the TorchScript module here; the fast path: tests/test_openmm_fast.py
        options.setdefault("fastPath", False)
    potential = MLPotential("torchmdx", modelPath=str(model_file), implementation=implementation, **options)
    return potential.createSystem(topology, removeCMMotion=False)


def _check_molecule(model_file, model, peptide, implementation, platform):
    system = _ml_system(model_file, _topology(peptide.numbers), implementation)
    context = _context(system, peptide.positions * units.ANGSTROM_TO_NM, platform)
    _assert_close(*_state_energy_forces(context), *_calc_reference(peptide, model))
    return system


def _check_box(model_file, model, water_box, implementation, **options):
    import openmm

    atoms = water_box.copy()
    atoms.set_cell(TRICLINIC, scale_atoms=True)
    top = _topology(atoms.numbers)
    box = atoms.cell.array * units.ANGSTROM_TO_NM
    top.setPeriodicBoxVectors([openmm.Vec3(*row) for row in box])
    system = _ml_system(model_file, top, implementation, **options)
    assert system.usesPeriodicBoundaryConditions()
    context = _context(system, atoms.positions * units.ANGSTROM_TO_NM, "Reference", box_nm=[openmm.Vec3(*r) for r in box])
    _assert_close(*_state_energy_forces(context), *_calc_reference(atoms, model))


def _nve_fluctuation(system, positions_nm, dt_fs, steps):
    import openmm
    from openmm import unit

    context = _context(system, positions_nm, "CPU", openmm.VerletIntegrator(dt_fs * 1e-3))
    context.setVelocitiesToTemperature(300.0, 11)
    total, kinetic = [], []
    for _ in range(steps // 5):
        context.getIntegrator().step(5)
        state = context.getState(getEnergy=True)
        kinetic.append(state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole))
        total.append(kinetic[-1] + state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    return np.std(total), np.std(kinetic), total


def _check_nve(model_file, peptide, implementation):
    """Energy conservation under OpenMM's VerletIntegrator: the total energy fluctuates far less
    than the kinetic energy, without drift, and the fluctuation shrinks as dt² (0.5 -> 0.25 fs)."""
    system = _ml_system(model_file, _topology(peptide.numbers), implementation)
    positions = peptide.positions * units.ANGSTROM_TO_NM
    std_half, std_kin, total = _nve_fluctuation(system, positions, 0.5, 200)
    std_quarter, _, _ = _nve_fluctuation(system, positions, 0.25, 200)
    assert std_half < 0.02 * std_kin
    assert abs(np.mean(total[-10:]) - np.mean(total[:10])) < 3 * std_half + 1e-3
    assert 2.5 < std_half / std_quarter < 6.0


def _solvated_ligand(peptide):
    """ML ligand (alanine dipeptide) in MM TIP3P water (OpenMM's own equilibrated box, waters on
    the ligand removed), PME; the ligand's MM parameters: LJ only (its charges are zero)."""
    import openmm
    import openmm.app as app
    from openmm import unit

    water = app.PDBFile(str(__import__("pathlib").Path(app.__file__).parent / "data" / "tip3p.pdb"))
    box = water.topology.getPeriodicBoxVectors()
    box_nm = np.array([[v.value_in_unit(unit.nanometer) for v in row] for row in box])
    ligand = peptide.positions * units.ANGSTROM_TO_NM
    ligand = ligand - ligand.mean(axis=0) + box_nm.sum(axis=0) / 2
    modeller = app.Modeller(water.topology, water.positions)
    wpos = np.array(water.positions.value_in_unit(unit.nanometer))
    clash = [res for res in water.topology.residues()
             if np.min(np.linalg.norm(wpos[[a.index for a in res.atoms()]][:, None] - ligand[None], axis=-1)) < 0.3]
    modeller.delete(clash)
    forcefield = app.ForceField("amber14/tip3p.xml")
    system = forcefield.createSystem(modeller.topology, nonbondedMethod=app.PME, nonbondedCutoff=0.8 * unit.nanometer,
                                     constraints=app.HBonds, rigidWater=True)
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


def _check_mixed(model_file, model, peptide, implementation):
    import openmm
    from openmmml import MLPotential

    topology, mm_system, positions, ligand, box = _solvated_ligand(peptide)
    options = {"fastPath": False} if implementation == "python" else {}
    potential = MLPotential("torchmdx", modelPath=str(model_file), implementation=implementation, **options)
    mixed = potential.createMixedSystem(topology, mm_system, ligand, forceGroup=1)
    ml_forces = [f for f in mixed.getForces() if f.getName() == "torchmdx"]
    kind = "TorchForce" if implementation == "torchforce" else "PythonForce"  # (SWIG shows plugin forces as Force)
    assert len(ml_forces) == 1 and f' type="{kind}"' in openmm.XmlSerializer.serialize(ml_forces[0]).split("\n")[1]
    integrator = openmm.LangevinMiddleIntegrator(300, 1.0, 0.001)
    context = _context(mixed, positions, "CPU", integrator, box_nm=box)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 20)
    integrator.step(20)
    state = context.getState(getEnergy=True, getPositions=True)
    assert np.isfinite(state.getPotentialEnergy()._value)
    # the ML force group is the model's energy of the ligand alone (minimum image in the box)
    from openmm import unit

    now = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    ml_energy, ml_forces = _state_energy_forces(context, groups={1})
    ligand_atoms = Atoms(numbers=peptide.numbers, positions=now[ligand] * units.NM_TO_ANGSTROM)
    ref_energy, ref_forces = _calc_reference(ligand_atoms, model)
    assert ml_energy == pytest.approx(ref_energy, rel=1e-10)
    assert np.abs(ml_forces[ligand] - ref_forces).max() < 1e-6 * np.abs(ref_forces).max()
    assert np.all(ml_forces[: ligand[0]] == 0)
    assert potential._impl.getMLLongRange() is False


@needs_openmm
def test_mlpotential_is_registered_by_the_entry_point():
    from importlib.metadata import entry_points

    from openmmml import MLPotential
    from torchmdx.openmm.mlpotential import TorchmdxPotentialImplFactory

    names = {ep.name: ep.value for ep in entry_points(group="openmmml.potentials")}
    assert names.get("torchmdx") == "torchmdx.openmm.mlpotential:TorchmdxPotentialImplFactory"
    assert isinstance(MLPotential._implFactories["torchmdx"], TorchmdxPotentialImplFactory)


@needs_openmm
@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_mlpotential_python_force_equals_calculator_on_a_molecule(model_file, model, peptide, platform):
    system = _check_molecule(model_file, model, peptide, "python", platform)
    assert [type(f).__name__ for f in system.getForces()] == ["PythonForce"]


@needs_openmm
def test_mlpotential_python_force_equals_calculator_in_a_triclinic_box(model_file, model, water_box):
    _check_box(model_file, model, water_box, "python")


@needs_openmm
def test_mlpotential_python_force_nve_conserves_energy(model_file, peptide):
    _check_nve(model_file, peptide, "python")


@needs_openmm
def test_mlpotential_python_force_ml_ligand_in_mm_water(model_file, model, peptide):
    _check_mixed(model_file, model, peptide, "python")


@needs_openmm
def test_mlpotential_bad_input_is_one_line(model_file, generic, tmp_path):
    import openmm
    from openmmml import MLPotential

    with pytest.raises(OpenMMError, match=r"MLPotential\('torchmdx'\) needs modelPath="):
        MLPotential("torchmdx")
    with pytest.raises(OpenMMError, match="unknown option"):
        MLPotential("torchmdx", modelPath=str(model_file), lengthScale=0.1)
    potential = MLPotential("torchmdx", modelPath=str(model_file), implementation="python")
    with pytest.raises(OpenMMError) as err:
        potential.createSystem(_topology([6, 1, 16, 1]))
    assert str(err.value).startswith("atom 2 (S2, residue MOL 1) of the ML region is element S (Z=16), which ")
    small = _topology([8, 1, 1])
    small.setPeriodicBoxVectors([openmm.Vec3(0.7, 0, 0), openmm.Vec3(0, 0.7, 0), openmm.Vec3(0, 0, 0.7)])
    with pytest.raises(OpenMMError, match="use a box at least 0.8 nm wide"):
        potential.createSystem(small)
    ev = tmp_path / "ev.pt"
    export_openmm(model_file, ev, length_unit="angstrom", energy_unit="eV")
    with pytest.raises(OpenMMError, match="OpenMM passes nm and expects kJ/mol"):
        MLPotential("torchmdx", modelPath=str(ev), implementation="python").createSystem(_topology([8, 1, 1]))


@needs_openmm
def test_mlpotential_accepts_an_export_and_its_system_survives_xml(generic, model, peptide):
    """modelPath may be an OpenMM export; the PythonForce's computation pickles (the module as
    TorchScript bytes), so XmlSerializer saves the System and the copy gives the same forces."""
    import openmm

    path, _ = generic
    system = _ml_system(path, _topology(peptide.numbers), "python")
    reference = _calc_reference(peptide, model)
    _assert_close(*_state_energy_forces(_context(system, peptide.positions * units.ANGSTROM_TO_NM)), *reference)
    copy = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    _assert_close(*_state_energy_forces(_context(copy, peptide.positions * units.ANGSTROM_TO_NM)), *reference)


# ---------------------------------------------------------------------------------------------- openmm-torch
def _torch_force_system(path, n_particles, periodic):
    import openmm
    from torchmdx.openmm.forces import create_torch_force

    module, _ = load_module(path)
    system = openmm.System()
    for _ in range(n_particles):
        system.addParticle(12.0)
    system.addForce(create_torch_force(module, periodic, path=str(path)))
    return system


@needs_openmmtorch
def test_torchforce_file_equals_calculator_on_a_molecule(model_file, model, peptide, tmp_path):
    path = tmp_path / "ala.pt"
    export_openmm(model_file, path, atomic_numbers=peptide.numbers.tolist())
    system = _torch_force_system(path, len(peptide), False)
    context = _context(system, peptide.positions * units.ANGSTROM_TO_NM)
    _assert_close(*_state_energy_forces(context), *_calc_reference(peptide, model))


@needs_openmmtorch
def test_torchforce_subset_with_returned_forces_in_a_periodic_box(model_file, model, water_box, tmp_path):
    import openmm

    atoms = water_box.copy()
    atoms.set_cell(TRICLINIC, scale_atoms=True)
    ml = list(range(5, len(atoms)))
    path = tmp_path / "box.pt"
    export_openmm(model_file, path, atomic_numbers=atoms.numbers[ml].tolist(), atoms=ml, forces="returned")
    system = _torch_force_system(path, len(atoms), True)
    box = [openmm.Vec3(*row) for row in atoms.cell.array * units.ANGSTROM_TO_NM]
    context = _context(system, atoms.positions * units.ANGSTROM_TO_NM, box_nm=box)
    energy, forces = _state_energy_forces(context)
    ref_energy, ref_forces = _calc_reference(atoms[ml], model)
    _assert_close(energy, forces[ml], ref_energy, ref_forces)
    assert np.all(forces[:5] == 0)


@needs_openmmtorch
def test_mlpotential_torchforce_molecule_box_nve_and_mixed(model_file, model, peptide, water_box):
    _check_molecule(model_file, model, peptide, "torchforce", "Reference")
    _check_box(model_file, model, water_box, "torchforce", outputForces=True)
    _check_nve(model_file, peptide, "torchforce")
    _check_mixed(model_file, model, peptide, "torchforce")


def test_torchforce_skip_reason_is_recorded():
    """Where openmm-torch cannot load, the reason is one line naming the versions (README)."""
    problem = openmmtorch_problem()
    if problem is None:
        pytest.skip("openmmtorch loads here")
    assert "\n" not in problem and ("not installed" in problem or f"this is torch {torch.__version__}" in problem)


# ---------------------------------------------------------------------------------------------- bench/bench_openmm.py
def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_openmm.py"
    spec = importlib.util.spec_from_file_location("bench_openmm_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_table_has_every_row_ns_per_day_and_each_reason_once():
    bench = _bench()
    # 0.5 fs steps: 1000 steps/s = 500 fs/s = 43.2 ns/day
    assert bench.ns_per_day(1000.0) == pytest.approx(43.2)
    assert bench.ns_per_day(None) is None
    why = "skipped: openmm-torch is not installed"
    results = [
        {"system": "a", "label": "native", "steps_per_s": 2000.0, "ns_per_day": bench.ns_per_day(2000.0), "note": ""},
        {"system": "b", "label": "native", "steps_per_s": None, "ns_per_day": None, "note": "failed: timed out"},
        {"system": "a", "label": "x@CUDA", "steps_per_s": None, "ns_per_day": None, "note": why},
        {"system": "b", "label": "x@CUDA", "steps_per_s": None, "ns_per_day": None, "note": why},
    ]
    text = bench.table(results, ["a", "b"], ["native", "x@CUDA", "y@CPU"], {"a": 22, "b": 166})
    lines = text.splitlines()
    assert lines[0] == "| row | a (22 atoms): steps/s, ns/day | b (166 atoms): steps/s, ns/day |"
    assert lines[2] == "| native | 2000.0, 86.40 | failed |"
    assert lines[3] == "| x@CUDA | skipped | skipped |"
    assert lines[4] == "| y@CPU | - | - |"  # not reached (e.g. out of time)
    assert lines[5:] == ["- native: failed: timed out", f"- x@CUDA: {why}"]


def test_bench_torchforce_skip_reason_names_both_torch_versions():
    bench = _bench()
    problem = bench.torchforce_problem(torch.__version__)
    if TORCH_PROBLEM is None:
        assert problem is None
    else:
        assert "2.9.0" in problem and torch.__version__ in problem and "\n" not in problem


@needs_openmm
def test_bench_platform_problem_names_the_platforms_here():
    bench = _bench()
    assert bench.platform_problem("Reference") is None
    problem = bench.platform_problem("NoSuchPlatform")
    assert "no NoSuchPlatform platform" in problem and "Reference" in problem and "\n" not in problem


@needs_openmm
def test_bench_systems_compute_the_calculator_forces(model_file, model, peptide):
    """What the PythonForce rows time: the bench's own Topology + MLPotential System equals the
    Calculator, and the computation its TorchMD-NET PythonForce row runs (torchmdx's
    PythonForceComputation, on a module with the exported ``energy(positions, box)``) gives -dE/dx
    (a harmonic well: F = -2 k x)."""
    from torchmdx.openmm.forces import PythonForceComputation

    import openmm

    bench = _bench()
    system = bench.ml_potential(model_file, implementation="python", device="cpu").createSystem(
        bench.topology_of(peptide), removeCMMotion=False)
    assert [type(f).__name__ for f in system.getForces()] == ["PythonForce"]
    assert [system.getParticleMass(i)._value for i in range(len(peptide))] == pytest.approx(peptide.get_masses(), rel=1e-3)
    context = _context(system, peptide.positions * units.ANGSTROM_TO_NM, "CPU")
    _assert_close(*_state_energy_forces(context), *_calc_reference(peptide, model))

    class Well(torch.nn.Module):
        def forward(self, positions):
            return 3.0 * (positions ** 2).sum()

        @torch.jit.export
        def energy(self, positions, box: Optional[torch.Tensor] = None):
            return self.forward(positions)

    harmonic = bench.masses_system(peptide)
    harmonic.addForce(openmm.PythonForce(PythonForceComputation(torch.jit.script(Well()), periodic=False,
                                                                device="cpu"), {}))
    x = peptide.positions * units.ANGSTROM_TO_NM
    energy, forces = _state_energy_forces(_context(harmonic, x, "Reference"))
    assert energy == pytest.approx(3.0 * (x ** 2).sum(), rel=1e-12)
    np.testing.assert_allclose(forces, -6.0 * x, rtol=1e-12, atol=1e-12)


@needs_openmm
def test_bench_runs_what_it_can_and_skips_the_rest_with_reasons(shared_data, tmp_path):
    import json

    bench = _bench()
    out = tmp_path / "bench_openmm.json"
    assert bench.main(["--device", "cpu", "--platforms", "CPU", "NoSuchPlatform", "--systems", "alanine_dipeptide",
                       "--rows", "openmm-pythonforce", "openmm-pythonforce-script", "openmm-torchforce",
                       "--embedding-dimension", "16",
                       "--num-layers", "1", "--steps", "10", "--warmup", "1", "--repeat", "1", "--budget-s", "0",
                       "--no-isolate", "--data", str(shared_data / "systems"), "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    cells = {r["label"]: r for r in saved["results"]}
    assert list(cells) == ["openmm-pythonforce@CPU", "openmm-pythonforce@NoSuchPlatform", "openmm-pythonforce-script@CPU",
                           "openmm-pythonforce-script@NoSuchPlatform", "openmm-torchforce@CPU",
                           "openmm-torchforce@NoSuchPlatform"]
    for label in ("openmm-pythonforce@CPU", "openmm-pythonforce-script@CPU"):  # the fast path, the TorchScript module
        ran = cells[label]
        assert ran["steps_per_s"] > 0 and ran["timed_steps"] == 10 and ran["note"] == ""
        assert ran["ns_per_day"] == pytest.approx(ran["steps_per_s"] * 0.0432)
    assert cells["openmm-pythonforce@NoSuchPlatform"]["note"].startswith("skipped: OpenMM")
    if TORCH_PROBLEM is not None:
        assert cells["openmm-torchforce@CPU"]["note"].startswith("skipped: ")
        assert cells["openmm-torchforce@CPU"]["steps_per_s"] is None
    assert "| openmm-pythonforce@CPU | " in saved["table"]
