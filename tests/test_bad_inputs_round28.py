"""Bad inputs, round 28 (branch bad28): md restarts and outputs, OpenMM, TorchMD-NET imports and training data in
the units other codes use; see docs/bad_inputs.md, round 28.
"""

from __future__ import annotations

import pytest

from torchmdx.cli.main import main
from bad_inputs_common import argon_file, refused  # the helpers rounds 17-27 share


# ------------------------------------------------------------------------------------------ md restarts
@pytest.mark.parametrize("engine", ["native", "ase"])
def test_md_restart_with_another_model_is_refused(tmp_path, capsys, engine):
    """``md --restart r.pt --model other.pt``: the run took its first step with the saved forces of the first model
    and appended the other model's energies to the same trajectory and log, without a word."""
    from torchmdx.nn.analytic import LennardJones

    LennardJones(0.0104, 3.4).save(tmp_path / "lj.pt")
    LennardJones(0.0312, 3.4).save(tmp_path / "lj3.pt")
    ar = argon_file(tmp_path)
    common = ["--every", "5", "--out", tmp_path / "a.extxyz", "--no-progress", "--engine", engine]
    assert main([str(a) for a in ["md", ar, "--model", tmp_path / "lj.pt", "--steps", "5", *common]]) == 0
    line = refused(capsys, ["md", ar, "--model", tmp_path / "lj3.pt", "--restart", tmp_path / "a.restart.pt",
                            "--steps", "10", *common],
                   ["a.restart.pt: was written by a run of model", "lj.pt", "--model", "lj3.pt is another model",
                    "--velocities file"], tmp_path)
    assert "digest" in line
    # the model the run was made with (another file of the same weights too) continues it
    LennardJones(0.0104, 3.4).save(tmp_path / "copy.pt")
    assert main([str(a) for a in ["md", ar, "--model", tmp_path / "copy.pt", "--restart", tmp_path / "a.restart.pt",
                                  "--steps", "10", *common]]) == 0


def test_md_time_step_in_ps_and_friction_in_1_per_fs_warn(tmp_path, capsys):
    """``--dt 0.001`` (1 fs written in ps) and ``--friction 0.01`` (ASE's 0.01 / units.fs, read in 1/ps: a 100 ps
    coupling) ran without a word: a thousand times too many steps, and a thermostat that holds nothing."""
    from bad_inputs_common import lj_file

    lj, ar = lj_file(tmp_path), argon_file(tmp_path)
    capsys.readouterr()
    assert main([str(a) for a in ["md", ar, "--model", lj, "--steps", "4", "--dt", "0.001", "--ensemble", "langevin",
                                  "--friction", "0.01", "--temperature", "100", "--out", tmp_path / "a.extxyz",
                                  "--no-progress"]]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(lines) == 2, lines
    assert "--dt 0.001 fs is far shorter than molecular dynamics steps" in lines[0] and "in fs" in lines[0]
    assert "--friction 0.01 1/ps couples the Langevin thermostat over 100 ps" in lines[1]
    assert "--friction 10" in lines[1]
    # usual values say nothing
    assert main([str(a) for a in ["md", ar, "--model", lj, "--steps", "4", "--ensemble", "langevin",
                                  "--temperature", "100", "--out", tmp_path / "b.extxyz", "--no-progress"]]) == 0
    assert "warning" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------ TorchMD-NET imports
def test_torchmdnet_md17_checkpoint_is_read_in_kcal_per_mol(tmp_path):
    """A TorchMD-NET checkpoint trained on its MD17 dataset (kcal/mol, as the sGDML files) was read as eV by
    ``load_model`` (and so ``md --model``, the Calculator): energies and forces 23 times too large, silently."""
    from pathlib import Path

    import torch

    import torchmdx
    from bad_inputs_common import water
    from torchmdx.nn import import_torchmdnet

    source = Path(__file__).parent / "data" / "torchmdnet_et_default.ckpt"
    payload = torch.load(source, map_location="cpu", weights_only=False)
    payload["hyper_parameters"]["dataset"] = "MD17"
    torch.save(payload, tmp_path / "md17.ckpt")
    with pytest.warns(UserWarning, match="trained on TorchMD-NET's MD17 dataset, whose energies are kcal/mol"):
        energy = torchmdx.load_model(tmp_path / "md17.ckpt").predict(water())["energy"]
    said = import_torchmdnet(tmp_path / "md17.ckpt", energy_unit="kcal/mol").predict(water())["energy"]
    assert energy == pytest.approx(said)
    raw = import_torchmdnet(source).predict(water())["energy"]  # no dataset recorded: eV, as before, silently
    assert raw == pytest.approx(energy * 23.0605, rel=1e-4)


def test_torchmdnet_second_prior_without_its_arguments_is_not_dropped(tmp_path, capsys):
    """``prior_model: [Atomref, ZBL]`` beside one ``prior_args`` entry: zip() stopped at the shorter list, so the ZBL
    prior was dropped and the model imported (and ran in md) without its repulsion, silently."""
    from pathlib import Path

    import torch

    payload = torch.load(Path(__file__).parent / "data" / "torchmdnet_et_default.ckpt", map_location="cpu",
                         weights_only=False)
    payload["hyper_parameters"]["prior_model"] = ["Atomref", "ZBL"]
    payload["hyper_parameters"]["prior_args"] = payload["hyper_parameters"]["prior_args"][:1]
    torch.save(payload, tmp_path / "zbl.ckpt")
    ar = argon_file(tmp_path)
    refused(capsys, ["md", ar, "--model", tmp_path / "zbl.ckpt", "--steps", "2", "--out", tmp_path / "a.extxyz"],
            ["zbl.ckpt: prior model 'ZBL' is not supported (only Atomref)"], tmp_path)


# --------------------------------------------------------------------------- training data in other units
def _lj_trajectory(path, n=24, force_factor=1.0, per_atom=False):
    """An argon cluster's Lennard-Jones NVE trajectory (1 fs steps) with its energies (eV) and forces (eV/Å) times
    ``force_factor``; ``per_atom``: energies divided by the atom count."""
    import numpy as np
    from ase import units
    from ase.calculators.lj import LennardJones as AseLJ
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.cluster import Icosahedron
    from ase.io import write
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    atoms = Icosahedron("Ar", 2)
    atoms.calc = AseLJ(epsilon=0.0104, sigma=3.4, rc=8.0, smooth=True)
    MaxwellBoltzmannDistribution(atoms, temperature_K=60, rng=np.random.default_rng(0))
    dyn, frames = VelocityVerlet(atoms, 4 * units.fs), []
    for _ in range(n):
        dyn.run(1)
        frame = atoms.copy()
        energy = atoms.get_potential_energy() / (len(atoms) if per_atom else 1)
        frame.calc = SinglePointCalculator(frame, energy=energy, forces=atoms.get_forces() * force_factor)
        frames.append(frame)
    write(path, frames, format="extxyz")
    return path


def test_forces_in_hartree_per_bohr_or_gradients_warn_in_train(tmp_path, capsys, monkeypatch):
    """Forces in Hartree/Bohr given as eV/Å (51 times too small) or the gradient +dE/dR given as forces trained without
    a word; the energy changes between consecutive frames tell the factor (the work of the forces along the step)."""
    monkeypatch.chdir(tmp_path)
    _lj_trajectory(tmp_path / "ha.extxyz", force_factor=1 / 51.422)
    (tmp_path / "t.yaml").write_text(
        "data: {path: ha.extxyz, train_size: 16, val_size: 4}\n"
        "model: {embedding_dimension: 8, num_layers: 1, num_heads: 2, num_rbf: 4, cutoff_upper: 5.0}\n"
        "trainer: {max_epochs: 1, enable_progress_bar: false, num_sanity_val_steps: 0}\nrun_dir: runs/t\n")
    capsys.readouterr()
    assert main(["train", "t.yaml"]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(lines) == 1, lines
    assert "ha.extxyz: the forces do not fit the energies" in lines[0]
    assert "forces in Hartree/Bohr read as eV/Å?" in lines[0]
    # data info says it too, as a note, once the file has a cache (the streamed summary keeps no forces)
    assert main(["data", "info", "t.yaml"]) == 0
    notes = [x for x in capsys.readouterr().out.splitlines() if "the forces do not fit the energies" in x]
    assert len(notes) == 1 and notes[0].startswith("note ")
    # the gradient instead of the forces, energies per atom; consistent labels say nothing
    from torchmdx.data.force_consistency import force_energy_line
    from torchmdx.data.formats import read_structures

    for name, kwargs, words in (("g.extxyz", {"force_factor": -1.0}, "+dE/dR"),
                                ("p.extxyz", {"per_atom": True}, "energies per atom")):
        line = force_energy_line(read_structures(_lj_trajectory(tmp_path / name, **kwargs)), name)
        assert line is not None and words in line, line
    assert force_energy_line(read_structures(_lj_trajectory(tmp_path / "ok.extxyz")), "ok.extxyz") is None


def test_energies_per_atom_warn_in_train(tmp_path, capsys, monkeypatch, shared_data):
    """Energies per atom (E / N, as some conversions write them) trained without a word into a model whose energies do
    not grow with the structure; the atom fractions fit such labels far better than the atom counts."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    from torchmdx.data.formats import read_structures

    monkeypatch.chdir(tmp_path)
    st = read_structures(shared_data / "ani" / "ani1x_xtb.h5")
    frames = []
    for s in range(0, len(st), 15):  # 40 conformers of 15 molecules, 3 to 11 atoms
        a, b = int(st.offsets[s]), int(st.offsets[s + 1])
        atoms = Atoms(numbers=st.z[a:b], positions=st.pos[a:b])
        atoms.calc = SinglePointCalculator(atoms, energy=float(st.energy[s]) / (b - a))
        frames.append(atoms)
    write(tmp_path / "pa.extxyz", frames, format="extxyz")
    (tmp_path / "t.yaml").write_text(
        "data: {path: pa.extxyz, train_size: 30, val_size: 10}\n"
        "model: {embedding_dimension: 8, num_layers: 1, num_heads: 2, num_rbf: 4}\ntrain: {force_weight: 0}\n"
        "trainer: {max_epochs: 1, enable_progress_bar: false, num_sanity_val_steps: 0}\nrun_dir: runs/t\n")
    capsys.readouterr()
    assert main(["train", "t.yaml"]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(lines) == 1, lines
    assert "pa.extxyz: the energies look like energies per atom, not of whole structures" in lines[0]
    assert "multiply each energy by its structure's atom count" in lines[0]
    assert main(["data", "info", "pa.extxyz", "--cache-dir", "nowhere"]) == 0  # the streamed summary
    notes = [x for x in capsys.readouterr().out.splitlines() if "the energies look like energies per atom" in x]
    assert len(notes) == 1 and notes[0].startswith("note ")
    # the total energies say nothing, nor one molecule's frames (one size: nothing to tell them apart)
    from torchmdx.data.energy_per_atom import per_atom_energy_line

    assert per_atom_energy_line(st, "ani1x_xtb.h5") is None
    md17 = read_structures(shared_data / "md17" / "md17_ethanol_xtb.npz")
    md17.energy = md17.energy / 9
    assert per_atom_energy_line(md17, "e.npz") is None


# ------------------------------------------------------------------------------------------- resumed runs
def test_resume_with_another_loss_weight_is_refused_while_val_loss_is_monitored(tmp_path, capsys, monkeypatch):
    """``train --resume --set train.force_weight=1000``: Lightning compared the new val_loss with the best checkpoint's
    val_loss of the old weights, so best.ckpt and model.pt stayed the checkpoint from before the change, silently.
    Another monitor (an error, not the loss) resumes."""
    from test_bad_inputs_round23 import _train_config

    monkeypatch.chdir(tmp_path)
    _train_config(tmp_path, "{max_epochs: 1, enable_progress_bar: false, num_sanity_val_steps: 0}")
    assert main(["train", "t.yaml"]) == 0
    refused(capsys, ["train", "t.yaml", "--resume", "--set", "trainer.max_epochs=2", "--set", "train.force_weight=1000"],
            ["--resume: config key 'train.force_weight' is 1000.0 but the run in runs/t was started with 1.0",
             "train.monitor val_loss", "val_forces_mae"], tmp_path)
    assert main(["train", "t.yaml", "--resume", "--set", "trainer.max_epochs=2", "--set", "train.force_weight=1000",
                 "--set", "train.monitor=val_forces_mae"]) == 0


# ------------------------------------------------------------------------------------------ after round 28
def test_md_restart_into_another_ensemble_says_the_thermostat_starts_afresh(tmp_path, capsys):
    """A Nose-Hoover run continued with ``--ensemble nve`` (or another thermostat) dropped the chain's variables
    without a word (round 28 left it); the same ensemble carries them and says nothing."""
    from bad_inputs_common import lj_file

    lj, ar = lj_file(tmp_path), argon_file(tmp_path)
    common = ["--model", lj, "--every", "5", "--out", tmp_path / "a.extxyz", "--no-progress", "--temperature", "100"]
    assert main([str(a) for a in ["md", ar, "--steps", "5", "--ensemble", "nose-hoover", *common]]) == 0
    capsys.readouterr()
    restart = tmp_path / "a.restart.pt"
    assert main([str(a) for a in ["md", ar, "--restart", restart, "--steps", "10", "--ensemble", "nose-hoover",
                                  *common]]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main([str(a) for a in ["md", ar, "--restart", restart, "--steps", "15", "--ensemble", "nve", *common]]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(lines) == 1, lines
    assert "was written by a nose-hoover run, whose thermostat variables (v_xi, xi)" in lines[0]
    assert "--ensemble nve" in lines[0] and "starts afresh" in lines[0]


def test_simulation_load_restart_from_python_checks_the_model(tmp_path):
    """``Simulation.load_restart`` from Python continued a run with another potential without a word (the CLI
    checked, the method did not); a Simulation made in Python recorded no model in its restart files at all."""
    import torch
    from ase import Atoms

    import torchmdx
    from torchmdx.errors import ConfigError
    from torchmdx.md.engine import Simulation

    def model(seed):
        return torchmdx.build_model({"embedding_dimension": 8, "num_layers": 1, "cutoff_upper": 4.0, "seed": seed})

    atoms = Atoms("OHH", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    first = model(0)
    sim = Simulation(first, atoms, timestep_fs=0.5, dtype=torch.float64, temperature_K=300.0, seed=1)
    sim.run(2, restart_path=tmp_path / "r.pt", restart_every=2)
    same = Simulation(model(0), atoms, timestep_fs=0.5, dtype=torch.float64, temperature_K=300.0, seed=1)
    assert same.load_restart(tmp_path / "r.pt").step == 2
    other = Simulation(model(1), atoms, timestep_fs=0.5, dtype=torch.float64, temperature_K=300.0, seed=1)
    with pytest.raises(ConfigError, match=r"r\.pt: was written by a run of model \(a Python object\) .* but the "
                                          r"Simulation's potential is another model"):
        other.load_restart(tmp_path / "r.pt")
    assert other.load_restart(tmp_path / "r.pt", check_model=False).step == 2  # asked for: allowed
