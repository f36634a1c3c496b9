"""Bad inputs, round 10: nothing lost, nothing silent.

Round 9's leftovers (md dropping the velocities a structure file carries; an MD17 xyz comment of
two numbers read as its first; a NaN cell called "singular"; a model file edited to scale 0
predicting zero energies) and what the hunt found in export, OpenMM, sweep, label, evaluate and
training (see docs/bad_inputs.md, round 10).

Table rows: a setup ``(tmp_path, shared_data) -> CLI arguments`` and the fragments the one
``error:`` line must hold; every file under ``tmp_path`` must come out unchanged. Tests of
behaviour follow.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from ase.cluster import Icosahedron
from ase.io import read, write

import torchmdx
from test_bad_inputs_more import refused_without_writes
from test_bad_inputs_round7 import _cache
from test_bad_inputs_round9 import TINY


def _argon(t, name="ar.extxyz", momenta=None, **atoms_kw):
    from torchmdx.nn.analytic import LennardJones

    atoms = Icosahedron("Ar", 2)
    for key, value in atoms_kw.items():
        setattr(atoms, key, value)
    if momenta is not None:
        atoms.set_momenta(momenta)
    write(t / name, atoms, format="extxyz")
    if not (t / "lj.pt").exists():
        LennardJones(0.0104, 3.4).save(t / "lj.pt")
    return t / name


def _momenta(seed=0):
    return np.random.default_rng(seed).normal(size=(13, 3)) * 0.5


def _md(t, structure, *options):
    return ["md", *([structure] if not isinstance(structure, list) else structure), "--model", t / "lj.pt",
            "--steps", "2", "--every", "1", "--out", t / "md.extxyz", "--no-progress", "--dtype", "float64", *options]


# ---------------------------------------------------------------------------------- md velocities
def md_nan_velocity_in_the_file(t, s):  # file momenta were ignored; now they are used, so checked
    momenta = _momenta()
    momenta[3, 1] = np.nan
    return _md(t, _argon(t, momenta=momenta))


def md_velocities_file_without_any(t, s):
    return _md(t, _argon(t, "plain.xyz"), "--velocities", "file")


def md_nan_open_row_of_a_slab_cell(t, s):  # the engine wraps with the whole cell: NaN positions
    return _md(t, _argon(t, cell=[[30, 0, 0], [0, 30, 0], [0, 0, np.nan]], pbc=[True, True, False]))


# ---------------------------------------------------------------------------------- data
def md17_xyz_comment_of_two_numbers(t, s):  # the first number was the energy, silently
    text = (s / "md17" / "ethanol_snip.xyz").read_text().splitlines()
    n = int(text[0])
    frame2 = list(text[: n + 2])
    frame2[1] = frame2[1] + " 5"
    (t / "two.xyz").write_text("\n".join(text[: n + 2] + frame2) + "\n")
    return ["data", "info", t / "two.xyz", "--format", "md17-xyz", "--cache-dir", _cache(t)]


# ---------------------------------------------------------------------------------- train
def _train(t, s, data_path=None, **train):
    import yaml

    data_path = data_path or s / "md17" / "md17_ethanol_xtb.npz"
    config = {"data": {"path": str(data_path), "cache_dir": str(_cache(t)), "train_size": 10, "val_size": 5,
                       "test_size": 5, "batch_size": 5},
              "model": {k: v for k, v in TINY.items() if k != "seed"}, "train": train,
              "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
              "run_dir": str(t / "run")}
    (t / "config.yaml").write_text(yaml.safe_dump(config))
    return ["train", t / "config.yaml"]


def _without_forces(t, s):
    arrays = dict(np.load(s / "md17" / "md17_ethanol_xtb.npz"))
    np.savez(t / "noforces.npz", R=arrays["R"][:30], z=arrays["z"], E=arrays["E"][:30])
    return t / "noforces.npz"


def train_stress_on_molecules(t, s):  # refused at the first step: run folder and logs written
    return _train(t, s, stress_weight=1.0)


def train_forces_only_without_forces(t, s):  # advised force_weight 0: then "all weights are 0"
    return _train(t, s, _without_forces(t, s), energy_weight=0.0)


# ---------------------------------------------------------------------------------- sweep
def sweep_variant_key_also_in_the_grid(t, s):  # the grid's values replaced the variant's silently
    import yaml

    config = yaml.safe_load(_train(t, s)[1].read_text())
    config["sweep"] = {"variants": {"small": {"model.embedding_dimension": 4}, "large": {"model.num_layers": 2}}}
    (t / "config.yaml").write_text(yaml.safe_dump(config))
    return ["sweep", t / "config.yaml", "--grid", "model.embedding_dimension=8,16", "--out", t / "sweep", "--dry-run"]


def sweep_same_number_written_twice(t, s):  # 0.001 and 1e-3 (text to YAML 1.1): two identical trainings
    return ["sweep", _train(t, s)[1], "--grid", "train.lr=0.001,1e-3", "--out", t / "sweep", "--dry-run"]


def _hco_model_file(folder):
    """A tiny model for H, C and O, saved as folder/m.pt (returned)."""
    model = torchmdx.build_model(TINY)
    model.set_normalisation(elements=[1, 6, 8])
    model.save(folder / "m.pt")
    return folder / "m.pt"


# ---------------------------------------------------------------------------------- export
def export_an_openmm_export(t, s):  # torch's "warning: ... dispatching to torch.jit.load", then "not a checkpoint"
    from torchmdx.cli.main import main

    model = _hco_model_file(t)
    assert main(["export", "--openmm", str(model), "-o", str(t / "om.pt")]) == 0
    return ["export", t / "om.pt", "-o", t / "again.pt"]


def export_openmm_of_an_openmm_export(t, s):
    return ["export", "--openmm", *export_an_openmm_export(t, s)[1:2], "-o", t / "again.pt"]


def train_resume_with_ema_turned_off(t, s):  # went on training the average, the training weights dropped
    from torchmdx.cli.main import main

    args = [str(a) for a in _train(t, s)]
    assert main(args) == 0
    return [*args, "--resume", "--set", "train.ema_decay=null", "--set", "trainer.max_epochs=2"]


# ---------------------------------------------------------------------------------- label
def label_charged_frames_with_a_model(t, s):  # labelled as if neutral, silently
    from ase.io import read as read_frames

    frames = read_frames(s / "md17" / "ethanol_snip.xyz", ":")
    frames[1].info["charge"] = 1
    write(t / "frames.extxyz", frames, format="extxyz")
    _hco_model_file(t)
    return ["label", t / "frames.extxyz", "-o", t / "labelled.extxyz", "--method", f"model:{t / 'm.pt'}",
            "--no-progress"]


CASES = [
    (md_nan_velocity_in_the_file, ["ar.extxyz: atom 3 (Ar) has the non-finite velocity [", "nan",
                                   "fix the momenta in the file, or pass --velocities draw"]),
    (md_velocities_file_without_any, ["plain.xyz: carries no velocities (ASE momenta), and --velocities file needs "
                                      "them in every structure"]),
    (md_nan_open_row_of_a_slab_cell, ["ar.extxyz: the cell holds non-finite values (rows [[30.0, 0.0, 0.0], "
                                      "[0.0, 30.0, 0.0], [0.0, 0.0, nan]] Å), periodic [True, True, False]"]),
    (md17_xyz_comment_of_two_numbers, ["two.xyz: line 13: expected the energy alone (one number, kcal/mol), got 2 "
                                       "fields '-97208.40600498248 5'"]),
    (train_stress_on_molecules, ["config key 'train.stress_weight' is 1.0 but", "md17_ethanol_xtb.npz has no stress"]),
    (train_forces_only_without_forces, ["config key 'train.energy_weight' is 0 but", "noforces.npz has no forces: "
                                        "nothing to train on (set train.energy_weight > 0 and train.force_weight: 0"]),
    (sweep_variant_key_also_in_the_grid, ["sweep.variants.small sets 'model.embedding_dimension', which the grid "
                                          "sweeps too"]),
    (export_an_openmm_export, ["om.pt: a TorchScript file (for example an OpenMM export), not a torchmdx checkpoint"]),
    (export_openmm_of_an_openmm_export, ["om.pt: is an OpenMM export already (TorchScript, nm and kJ/mol); give the "
                                         "model file (model.pt) or training checkpoint it was exported from"]),
    (train_resume_with_ema_turned_off, ["--resume: config key 'train.ema_decay' is null but the run in",
                                        "was started with 0.99; a resumed run keeps its weight averaging on or off"]),
    (label_charged_frames_with_a_model, ["frame 1 (", "frames.extxyz:1): atoms.info['charge'] is 1, and --method "
                                         "model:", "takes no charge (it would label the frame as if it were neutral)"]),
    (sweep_same_number_written_twice, ["the sweep points (train.lr=0.001) and (train.lr=1e-3) are the same training"]),
]


@pytest.mark.parametrize("setup, fragments", CASES, ids=[c[0].__name__ for c in CASES])
def test_refused_with_one_line_and_nothing_written(tmp_path, shared_data, capsys, monkeypatch, setup, fragments):
    refused_without_writes(tmp_path, shared_data, capsys, monkeypatch, setup, fragments)


# ---------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("engine", ["native", "ase"])
def test_md_starts_from_the_velocities_in_the_structure_file(tmp_path, capsys, engine):
    """A structure file's momenta were dropped (new Maxwell–Boltzmann velocities); both engines
    now start from them, as ASE's MD does, and say so; ``--velocities draw`` draws."""
    from torchmdx.cli.main import main

    momenta = _momenta()
    path = _argon(tmp_path, momenta=momenta)
    capsys.readouterr()
    assert main([str(a) for a in _md(tmp_path, path, "--engine", engine)]) == 0
    err = capsys.readouterr().err
    assert "note: initial velocities from the structure file (their momenta" in err
    np.testing.assert_allclose(read(tmp_path / "md.extxyz", 0).get_momenta(), momenta, atol=1e-12)
    assert main([str(a) for a in _md(tmp_path, path, "--engine", engine, "--velocities", "draw", "--force")]) == 0
    assert "--velocities draw: the velocities in the structure file are not used" in capsys.readouterr().err
    drawn = read(tmp_path / "md.extxyz", 0).get_momenta()
    assert np.abs(drawn - momenta).max() > 0.1 and np.abs(drawn.sum(0)).max() < 1e-6  # MB, zero total momentum


def test_md_draws_velocities_when_the_file_momenta_are_all_zero(tmp_path, capsys):
    """A zero momenta column (a structure that never moved, written with its momenta) would start
    the run at 0 K: under ``auto`` it counts as no velocities (Maxwell-Boltzmann ones are drawn);
    ``--velocities file`` takes the zeros as given."""
    from torchmdx.cli.main import main

    path = _argon(tmp_path, momenta=np.zeros((13, 3)))
    assert "momenta" in read(path).arrays  # the file does carry the column
    capsys.readouterr()
    assert main([str(a) for a in _md(tmp_path, path)]) == 0
    capsys.readouterr()
    assert np.abs(read(tmp_path / "md.extxyz", 0).get_momenta()).max() > 0.01
    assert main([str(a) for a in _md(tmp_path, path, "--velocities", "file", "--force")]) == 0
    assert "note: initial velocities from the structure file (their momenta, 0 K)" in capsys.readouterr().err
    np.testing.assert_array_equal(read(tmp_path / "md.extxyz", 0).get_momenta(), 0.0)


def test_calculator_calls_a_nan_cell_non_finite_not_singular():
    from torchmdx.errors import NeighborListError
    from torchmdx.md.calculator import Calculator
    from torchmdx.nn.analytic import LennardJones

    atoms = Icosahedron("Ar", 2)
    atoms.cell, atoms.pbc = [[30, 0, 0], [0, np.nan, 0], [0, 0, 30]], True
    atoms.calc = Calculator(LennardJones(0.0104, 3.4))
    with pytest.raises(NeighborListError, match=r"^structure 0: the cell holds non-finite values \(rows \[\[30\.0, "
                                                r"0\.0, 0\.0\], \[0\.0, nan, 0\.0\], \[0\.0, 0\.0, 30\.0\]\] Å\)$"):
        atoms.get_potential_energy()


def test_nan_in_the_open_row_of_a_slab_cell_is_ignored_not_zero_energy():
    """A slab's open row may hold anything (kernels.cell_geometry), but 0 * NaN made every pair
    vector NaN: energy 0 and forces 0, silently (Calculator and Potential)."""
    import torch

    from torchmdx.md.calculator import Calculator
    from torchmdx.nn.analytic import LennardJones

    lj = LennardJones(0.0104, 3.4)
    atoms = Icosahedron("Ar", 2)
    atoms.calc = Calculator(lj)
    reference = atoms.get_potential_energy()
    assert reference < -0.4
    slab = Icosahedron("Ar", 2)
    slab.cell, slab.pbc = [[30, 0, 0], [0, 30, 0], [0, 0, np.nan]], [True, True, False]
    slab.calc = Calculator(lj)
    assert slab.get_potential_energy() == pytest.approx(reference, abs=1e-9)
    out = lj(torch.as_tensor(slab.numbers), torch.as_tensor(slab.positions), cell=torch.as_tensor(slab.cell.array),
             pbc=torch.tensor([True, True, False]))
    assert float(out["energy"].detach()) == pytest.approx(reference, abs=1e-9)


def test_a_slab_keeps_its_stress_over_the_volume_of_its_vacuum_row():
    """The NaN fix above must not zero a finite open row: the stress of a slab divides by the
    volume its vacuum vector spans (ASE's convention); zeroing the row gave NaN stress. Checked
    against a central difference of the energy under an in-plane strain, sigma_xx = dE/de_xx / V."""
    from ase.build import fcc111

    from torchmdx.md.calculator import Calculator
    from torchmdx.nn.analytic import LennardJones

    lj = LennardJones(0.0104, 2.3)
    slab = fcc111("Cu", (7, 7, 2), vacuum=6.0)
    slab.pbc = [True, True, False]
    slab.calc = Calculator(lj, dtype="float64")
    stress = slab.get_stress(voigt=False)
    assert np.isfinite(stress).all()

    def energy(e):
        strained = slab.copy()
        strain = np.eye(3) + np.diag([e, 0.0, 0.0])
        strained.set_cell(slab.cell.array @ strain, scale_atoms=True)
        strained.calc = Calculator(lj, dtype="float64")
        return strained.get_potential_energy()

    h = 1e-5
    expected = (energy(h) - energy(-h)) / (2 * h) / slab.get_volume()
    assert abs(expected) > 1e-4
    assert stress[0, 0] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("scale", [0.0, -2.0])
def test_model_file_with_scale_zero_or_negative_is_refused(tmp_path, scale):
    import torch

    from torchmdx.errors import ModelError

    model = torchmdx.build_model(TINY)
    model.set_normalisation(elements=[1, 6, 8], scale=2.0)
    model.save(tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["state_dict"]["scale"] = torch.tensor(scale, dtype=torch.float64)
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(ModelError, match=rf"edited\.pt: buffer 'scale' is {scale:g}, expected a positive number "):
        torchmdx.load_model(tmp_path / "edited.pt")
    assert float(torchmdx.load_model(tmp_path / "m.pt").scale) == 2.0


# ---------------------------------------------------------------------------------- openmm-ml
def _topology_and_system():
    from openmm import System, app

    topology = app.Topology()
    residue = topology.addResidue("ETH", topology.addChain())
    system = System()
    for k, symbol in enumerate("CCOHHHHHH"):
        element = app.Element.getBySymbol(symbol)
        topology.addAtom(f"{symbol}{k}", element, residue)
        system.addParticle(element.mass)
    return topology, system


@pytest.mark.parametrize("atoms, message", [
    ([-1, 0, 1], "ML atom index -1 is outside the topology's 9 atoms (0-based: 0..8)"),  # crashed the process
    ([0, 1, 9], "ML atom index 9 is outside the topology's 9 atoms (0-based: 0..8)"),  # IndexError
    ([0, 0, 1], "ML atom 0 is given twice; each ML atom once"),  # atom 0 counted twice, silently
    ([0, 1.5], "ML atom index 1.5 is not a whole number; give 0-based atom indices of the topology"),  # = atom 1
])
def test_openmm_ml_atom_subsets_that_are_not_atoms_are_one_line(tmp_path, atoms, message):
    pytest.importorskip("openmmml")
    from torchmdx.openmm.errors import OpenMMError
    from torchmdx.openmm.mlpotential import TorchmdxPotentialImpl

    topology, system = _topology_and_system()
    impl = TorchmdxPotentialImpl("torchmdx", _hco_model_file(tmp_path), implementation="python", device="cpu")
    with pytest.raises(OpenMMError, match=f"^{re.escape(message)}$"):
        impl.addForces(topology, system, atoms, 0)
    assert system.getNumForces() == 0
    impl.addForces(topology, system, np.array([2, 0, 1]), 0)  # numpy indices are whole numbers
    assert system.getNumForces() == 1


def test_openmm_ml_device_typo_is_one_line(tmp_path):
    pytest.importorskip("openmmml")
    from torchmdx.openmm.errors import OpenMMError
    from torchmdx.openmm.mlpotential import TorchmdxPotentialImpl

    topology, system = _topology_and_system()
    impl = TorchmdxPotentialImpl("torchmdx", _hco_model_file(tmp_path), implementation="python", device="cdua")
    with pytest.raises(OpenMMError, match=r"^MLPotential\('torchmdx'\): device 'cdua' is not a torch device"):
        impl.addForces(topology, system, None, 0)


def test_evaluate_removes_an_earlier_reports_learning_curve(tmp_path, shared_data, capsys, monkeypatch):
    """``evaluate --run A --out R`` then ``evaluate --out R`` (another model, no run): A's learning
    curve stayed beside the new errors and parity plot, as if it were this model's. A run folder
    given as --out keeps its training curve."""
    from torchmdx.cli.main import main

    monkeypatch.chdir(tmp_path)
    args = [str(a) for a in _train(tmp_path, shared_data)]
    assert main(args) == 0
    run = tmp_path / "run"
    data = str(shared_data / "md17" / "md17_ethanol_xtb.npz")
    common = ["--data", data, "--cache-dir", str(_cache(tmp_path)), "--no-progress"]
    assert main(["evaluate", str(run / "model.pt"), *common, "--run", str(run), "--out", "report"]) == 0
    assert (tmp_path / "report" / "learning_curve.png").is_file()
    capsys.readouterr()
    assert main(["evaluate", str(run / "model.pt"), *common, "--out", "report"]) == 0
    assert "removed report/learning_curve.png: it was an earlier evaluation's" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["errors.json", "errors.txt", "parity.png"]
    curve = (run / "learning_curve.png").read_bytes()
    assert main(["evaluate", str(run / "model.pt"), *common, "--out", str(run)]) == 0
    assert (run / "learning_curve.png").read_bytes() == curve


def test_openmm_ml_output_forces_must_be_a_boolean(tmp_path):
    """``outputForces='false'`` (text) was truthy: the TorchForce got the module's returned forces."""
    pytest.importorskip("openmmml")
    from torchmdx.openmm.errors import OpenMMError
    from torchmdx.openmm.mlpotential import TorchmdxPotentialImpl

    topology, system = _topology_and_system()
    impl = TorchmdxPotentialImpl("torchmdx", _hco_model_file(tmp_path), implementation="python", device="cpu",
                                 outputForces="false")
    with pytest.raises(OpenMMError, match=r"^MLPotential\('torchmdx'\): outputForces must be True or False, "
                                          r"got 'false'$"):
        impl.addForces(topology, system, None, 0)
    impl.addForces(topology, system, None, 0, outputForces=False)  # a per-System boolean is fine
    assert system.getNumForces() == 1


def test_reading_a_torchscript_file_as_a_checkpoint_warns_nothing(tmp_path, shared_data):
    """torch.load's note on a TorchScript archive ("dispatching to torch.jit.load") came out as a
    ``warning:`` line above the one error line (pytest's own capture hides it from the table row)."""
    import warnings

    from torchmdx.errors import ModelError
    from torchmdx.train.export import read_checkpoint

    export_an_openmm_export(tmp_path, shared_data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ModelError, match=r"om\.pt: a TorchScript file \(for example an OpenMM export\), not a "
                                             r"torchmdx checkpoint"):
            read_checkpoint(tmp_path / "om.pt")
    assert [str(w.message) for w in caught] == []
