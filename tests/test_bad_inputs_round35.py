"""Bad inputs, round 35 (branch bad35): round 34's leftovers (createMixedSystem's System against the topology,
coordinates far from the origin, evaluate of a model whose cutoff is not its --run's), then new inputs (an xyz atom
count larger than the file, a sub-command or choice misspelt, label's --method misspelt); see docs/bad_inputs.md,
round 35.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from ase.io import write

from bad_inputs_common import lj_file, refused, refused_exactly, tiny_model, water, water_npz
from test_bad_inputs_md import snapshot

FAR_TAIL = ("beyond 1e+10 Å from the origin: float64 coordinates that large are {spacing} Å apart, so the distances "
            "between atoms come out wrong; give coordinates near the origin (move the structure there)")


# ------------------------------------------------------------------------------ round 34's leftovers
def _water_topology():
    from openmm import app

    topology = app.Topology()
    residue = topology.addResidue("HOH", topology.addChain())
    for name, element in (("O", app.element.oxygen), ("H1", app.element.hydrogen), ("H2", app.element.hydrogen)):
        topology.addAtom(name, element, residue)
    return topology


def test_create_mixed_system_compares_the_system_with_the_topology(tmp_path):
    """``createMixedSystem(topology, system, atoms)`` with a System of 2 particles for a topology of 3 atoms read a
    position that does not exist ("particles 0 and 2 (ML atoms) are on top of each other" at the first energy);
    one of 5 particles ran with atoms the topology does not describe."""
    pytest.importorskip("openmmml")
    import openmm
    from openmmml import MLPotential

    from torchmdx.openmm.errors import OpenMMError

    tiny_model().save(tmp_path / "m.pt")
    potential = MLPotential("torchmdx", modelPath=str(tmp_path / "m.pt"))
    for particles in (2, 5):
        system = openmm.System()
        for _ in range(particles):
            system.addParticle(1.0)
        with pytest.raises(OpenMMError) as info:
            potential.createMixedSystem(_water_topology(), system, [0, 1, 2])
        assert str(info.value) == (
            f"MLPotential('torchmdx'): the System has {particles} particle(s) but the topology has 3 atom(s); "
            "createMixedSystem(topology, system, atoms) needs the System made from this topology "
            "(forcefield.createSystem(topology)): one particle per atom, in the topology's order")


def test_coordinates_far_from_the_origin_are_named(tmp_path, capsys, monkeypatch):
    """Positions offset by 1e30 Å were "atoms 0 and 1 are on top of each other (distance 0 Å)" (round 34's
    leftover); by 1e15 Å (float64 steps of 0.125 Å) the Calculator gave a wrong energy without a word, and md's
    float32 line advised --dtype float64, which cannot hold them either."""
    from torchmdx.errors import ModelError
    from torchmdx.md.calculator import Calculator

    monkeypatch.chdir(tmp_path)
    model = tiny_model()
    for offset, spacing in ((1e15, "0.125"), (1e30, "1.41e+14")):
        atoms = water()
        atoms.positions += offset
        atoms.calc = Calculator(model)
        with pytest.raises(ModelError) as info:
            atoms.get_potential_energy()
        assert str(info.value) == f"atom 0 is at [{offset:g}, {offset:g}, {offset:g}] Å, " + \
            FAR_TAIL.format(spacing=spacing)
        with pytest.raises(ModelError) as info:  # the model called directly (Potential.predict)
            model.predict(atoms)
        assert str(info.value).startswith(f"atom 0 is at [{offset:g}, {offset:g}, {offset:g}] Å, beyond 1e+10 Å")
    # a data file (its frame 1) and md's structure
    frames = []
    for offset in (0, 1e30):
        atoms = water()
        atoms.positions += offset
        atoms.info["energy"] = -1.0
        atoms.arrays["forces"] = np.zeros((3, 3))
        frames.append(atoms)
    write(tmp_path / "far.extxyz", frames)
    refused_exactly(capsys, ["data", "info", "far.extxyz"],
                    "error: far.extxyz: atom 0 of structure 1 is at [1e+30, 1e+30, 1e+30] Å, "
                    + FAR_TAIL.format(spacing="1.41e+14"), tmp_path)
    lj_file(tmp_path)
    atoms = water()
    atoms.positions += 1e15
    write(tmp_path / "far.xyz", atoms)
    for dtype in ("float32", "float64"):
        refused_exactly(capsys, ["md", "far.xyz", "--model", "lj.pt", "--steps", "2", "--dtype", dtype],
                        "error: far.xyz: atom 0 is at [1e+15, 1e+15, 1e+15] Å, " + FAR_TAIL.format(spacing="0.125"),
                        tmp_path)
    # 1e9 Å is still taken (the same energy as at the origin, to float32's precision)
    near, offset = water(), water()
    offset.positions += 1e9
    near.calc, offset.calc = Calculator(model), Calculator(model)
    assert offset.get_potential_energy() == pytest.approx(near.get_potential_energy(), abs=1e-5)


def _run_folder(tmp_path, cutoff):
    """A run folder of the 20-water e.npz whose config trained a model of ``cutoff`` Å, with a learning curve."""
    from torchmdx.data.splits import Split, save_split

    run = tmp_path / "run"
    (run / "logs" / "csv").mkdir(parents=True)
    save_split(Split(np.arange(12), np.arange(12, 16), np.arange(16, 20), 20), run / "splits.npz")
    (run / "config.resolved.yaml").write_text(yaml.safe_dump({"data": {"path": "e.npz"},
                                                              "model": {"cutoff_upper": cutoff}}))
    (run / "logs" / "csv" / "metrics.csv").write_text(
        "epoch,lr,step,train_forces_mae,train_loss,val_forces_mae,val_loss\n0,,24,,,900.0,1.5\n"
        "0,0.0001,24,950.0,1.7,,\n1,,49,,,800.0,1.2\n1,0.0002,49,850.0,1.3,,\n")
    return run


def test_evaluate_a_model_whose_cutoff_is_not_the_runs(tmp_path, capsys, monkeypatch):
    """``evaluate m.pt --run RUN`` where RUN's config trained a 3 Å model and m.pt has 4 Å: scored without a word,
    RUN's learning curve written beside m.pt's report as if it were m.pt's; a model that records no run (so the
    split may hold its training structures) was only the "records no training run" warning."""
    from torchmdx.cli.main import main
    from torchmdx.train.provenance import run_record

    monkeypatch.chdir(tmp_path)
    water_npz(tmp_path)
    run = _run_folder(tmp_path, 3.0)
    model = tiny_model()  # cutoff 4 Å
    model.save(tmp_path / "norec.pt")
    model.training_record = run_record(run)  # the run's own split (a sweep over the cutoff shares it)
    model.save(tmp_path / "rec.pt")
    said = ("has cutoff 4 Å, but --run run trained a model of cutoff 3 Å (run/config.resolved.yaml "
            "model.cutoff_upper), so {name} is not that run's model")
    capsys.readouterr()
    assert main(["evaluate", "rec.pt", "--data", "e.npz", "--run", "run", "--no-progress", "--cache-dir", "c"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: rec.pt " + said.format(name="rec.pt") + ": it records the same split (its test errors "
                   "are fair), but the run's learning curve is not its own and is left out of the report"]
    assert sorted(p.name for p in (tmp_path / "evaluate_test").iterdir()) == ["errors.json", "errors.txt",
                                                                                "parity.png"]
    refused_exactly(capsys, ["evaluate", "norec.pt", "--data", "e.npz", "--run", "run", "--out", "o", "--cache-dir",
                             "c"],
                    "error: norec.pt " + said.format(name="norec.pt") + ", and norec.pt records no training run: the "
                    "test split of run may hold its training structures, so its errors would come out too good; give "
                    "the model's own run folder as --run, leave it out, or pass --allow-other-run to evaluate anyway",
                    tmp_path)
    # the run's own cutoff: evaluated with its learning curve, as before
    (run / "config.resolved.yaml").write_text(yaml.safe_dump({"data": {"path": "e.npz"},
                                                              "model": {"cutoff_upper": 4.0}}))
    assert main(["evaluate", "rec.pt", "--data", "e.npz", "--run", "run", "--no-progress", "--cache-dir", "c",
                 "--out", "o2"]) == 0
    assert (tmp_path / "o2" / "learning_curve.png").is_file()


# ------------------------------------------------------------------------------ new inputs
def test_xyz_atom_count_larger_than_the_file(tmp_path, capsys, monkeypatch):
    """An xyz whose first atom count exceeds the lines that follow: 5 over one atom line was ASE's "Frame has 1
    atoms, expected 5"; 10**12 ran for hours (ASE's index scan reads a line per atom, past the end of the file)."""
    monkeypatch.chdir(tmp_path)
    lj_file(tmp_path)
    for count in (5, 10**12):
        (tmp_path / "a.xyz").write_text(f"{count}\n\nAr 0 0 0\n")
        line = (f"a.xyz: line 1: frame 0's atom count is {count}, but only 1 line(s) follow its comment line: the "
                "count is too large (make it 1?), or the file is cut short")
        refused_exactly(capsys, ["data", "info", "a.xyz"], "error: " + line, tmp_path)
        refused_exactly(capsys, ["md", "a.xyz", "--model", "lj.pt", "--steps", "2"], "error: " + line, tmp_path)


def test_misspelt_command_or_choice_says_which_was_meant(tmp_path, capsys, monkeypatch):
    """``torchmdx trian``, ``data inof``, ``evaluate --split TEST``, ``md --engine nativ``: argparse's "invalid
    choice" listed the choices without saying which was probably meant."""
    from torchmdx.cli.main import main

    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    for argv, line in (
            (["trian", "c.yaml"], "torchmdx: error: argument command: invalid choice: 'trian' (did you mean 'train'?; "
                                  "choose from 'train', 'md', 'evaluate', 'data', 'export', 'bench', 'slmc', 'sweep', "
                                  "'label')"),
            (["data", "inof", "e.npz"], "torchmdx data: error: argument action: invalid choice: 'inof' (did you mean "
                                        "'info'?; choose from 'info', 'prepare', 'clean')"),
            (["evaluate", "m.pt", "--data", "e.npz", "--split", "TEST"],
             "torchmdx evaluate: error: argument --split: invalid choice: 'TEST' (did you mean 'test'?; choose from "
             "'test', 'val', 'train', 'all')"),
            (["md", "x.xyz", "--engine", "nativ"], "torchmdx md: error: argument --engine: invalid choice: 'nativ' "
                                                   "(did you mean 'native'?; choose from 'native', 'ase')")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == line
    with pytest.raises(SystemExit):  # nothing close: the choices alone, as before
        main(["xyzzy"])
    assert capsys.readouterr().err.splitlines()[-1].endswith("invalid choice: 'xyzzy' (choose from 'train', 'md', "
                                                             "'evaluate', 'data', 'export', 'bench', 'slmc', 'sweep', "
                                                             "'label')")
    assert snapshot(tmp_path) == before


def test_label_method_misspelt_says_which_was_meant(tmp_path, capsys, monkeypatch):
    """``label --method lj.pt`` (a model file without model:), ``modle:lj.pt``, ``gfn2``: "is not known; choices:
    ..." without saying which was meant."""
    monkeypatch.chdir(tmp_path)
    lj_file(tmp_path)
    write(tmp_path / "ar.xyz", water())
    choices = "; choices: gfn2-xtb, gfn1-xtb, ipea1-xtb, model:<model file>"
    for method, hint in (("lj.pt", " (a model file is given as model:<file>: did you mean 'model:lj.pt'?)"),
                         ("modle:lj.pt", " (did you mean 'model:lj.pt'?)"),
                         ("gfn2", " (did you mean 'gfn2-xtb'?)"),
                         ("emt", "")):
        refused_exactly(capsys, ["label", "ar.xyz", "--method", method, "-o", "l.extxyz"],
                        f"error: --method {method!r} is not known{hint}{choices}", tmp_path)
    assert refused(capsys, ["label", "ar.xyz", "--method", "modle:lj.pt", "-o", "l.extxyz"], ["model:lj.pt"],
                   tmp_path)
