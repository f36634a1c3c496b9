"""Bad inputs, round 15 (branch badin13): '~' in config and model paths, output names ending in '/', an md
minimisation whose atoms collapse, an integer md ``index``, ``data info`` of a config with a split file, and
training forces that are all exactly zero (see docs/bad_inputs.md, round 15).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import yaml
from ase.build import molecule
from ase.io import write

import torchmdx
from torchmdx.cli.main import main
from test_bad_inputs_md import one_error_line, snapshot
from test_bad_inputs_more import _ethanol
from test_bad_inputs_round9 import TINY


def _tiny_model():
    model = torchmdx.build_model(TINY)
    model.set_normalisation(elements=[1, 6, 8])
    return model


def _folders(root):
    return sorted(os.path.relpath(os.path.join(r, d), root) for r, dirs, _ in os.walk(root) for d in dirs)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A home folder of its own ('~'), and a working folder beside it."""
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "home"


# ---------------------------------------------------------------------------------- '~' in paths
def test_training_config_paths_with_a_tilde_are_the_home_folder(home, shared_data):
    """``run_dir: ~/runs/x`` put splits and config.resolved.yaml into a folder named '~' in the current
    folder while Lightning (which expands '~') wrote the checkpoints under the home folder: the run ended in
    "~/runs/x/checkpoints/last.ckpt: checkpoint not found". ``data.cache_dir: ~/cache`` made a folder named
    '~' too, and ``data.split_file: ~/s.npz`` was "split file not found". All three are the home folder's now
    (``data.path`` always was)."""
    from torchmdx.train.config import load_run_config

    config = {"data": {"path": str(shared_data / "md17" / "md17_ethanol_xtb.npz"), "cache_dir": "~/cache",
                       "split_file": "~/s.npz"},
              "model": dict(TINY), "run_dir": "~/runs/x"}
    (home.parent / "work" / "c.yaml").write_text(yaml.safe_dump(config))
    cfg = load_run_config("c.yaml")
    assert cfg.run_dir == str(home / "runs" / "x")
    assert cfg.data_config.cache_dir == str(home / "cache")
    assert cfg.data_config.split_file == str(home / "s.npz")
    # --run-dir=~/y (no shell expansion after '=') and --set run_dir=~/z likewise
    assert load_run_config("c.yaml", run_dir="~/y").run_dir == str(home / "y")
    assert load_run_config("c.yaml", ["run_dir=~/z"]).run_dir == str(home / "z")


def test_data_prepare_cache_dir_with_a_tilde_is_the_home_folder(home, shared_data, capsys):
    (home.parent / "work" / "d.yaml").write_text(yaml.safe_dump(
        {"data": {"path": str(shared_data / "md17" / "md17_ethanol_xtb.npz"), "cache_dir": "~/cache"}}))
    assert main(["data", "prepare", "d.yaml"]) == 0
    assert len(list((home / "cache").glob("*.h5"))) == 1
    assert not (home.parent / "work" / "~").exists()  # was: the cache in work/~/cache


def test_model_files_with_a_tilde_are_the_home_folder(home):
    """``load_model('~/m.pt')`` (and so ``Calculator('~/m.pt')``) was "model file not found" for a file
    that exists; ``save('~/m.pt')`` wrote into a folder named '~' in the current folder."""
    model = _tiny_model()
    model.save("~/m.pt")
    assert (home / "m.pt").is_file() and not (home.parent / "work" / "~").exists()
    assert torchmdx.load_model("~/m.pt").elements == [1, 6, 8]
    calc = torchmdx.Calculator("~/m.pt")
    atoms = molecule("H2O")
    atoms.calc = calc
    assert np.isfinite(atoms.get_potential_energy())


def test_md_config_paths_with_a_tilde_are_the_home_folder(home, capsys):
    """An md config with ``model: ~/m.pt``, ``structure: ~/w.xyz`` said "~/w.xyz: structure file not found";
    ``out: ~/md/t.extxyz`` would have written into a folder named '~' in the current folder."""
    _tiny_model().save(home / "m.pt")
    write(home / "w.xyz", molecule("H2O"))
    (home.parent / "work" / "md.yaml").write_text(yaml.safe_dump({"md": {
        "model": "~/m.pt", "structure": "~/w.xyz", "out": "~/md/t.extxyz", "steps": 2, "every": 1,
        "progress": False}}))
    assert main(["md", "--config", "md.yaml"]) == 0
    assert (home / "md" / "t.extxyz").is_file() and (home / "md" / "t.restart.pt").is_file()
    assert _folders(home.parent / "work") == []


# ---------------------------------------------------------------------------------- outputs ending in '/'
def test_export_output_ending_in_a_slash_is_refused(tmp_path, capsys, monkeypatch):
    """``export ckpt -o models/`` (meaning: into that folder) wrote a model file named 'models'."""
    from test_bad_inputs_round6 import _checkpoint

    monkeypatch.chdir(tmp_path)
    checkpoint = _checkpoint(tmp_path)
    before, folders = snapshot(tmp_path), _folders(tmp_path)
    capsys.readouterr()
    one_error_line(main(["export", str(checkpoint), "-o", "models/"]), capsys.readouterr(),
                   ["models/: ends in '/', so it names a folder; give a file name, e.g. models/model.pt"])
    assert snapshot(tmp_path) == before and _folders(tmp_path) == folders
    (tmp_path / "models").mkdir()  # an existing folder keeps its own line
    one_error_line(main(["export", str(checkpoint), "-o", "models/"]), capsys.readouterr(),
                   ["is a folder; give a file name, e.g. models/model.pt"])


def test_potential_save_to_a_name_ending_in_a_slash_is_refused(tmp_path):
    from torchmdx.errors import ModelError

    with pytest.raises(ModelError, match=r"new/: ends in '/', so it names a folder; give a file name, e\.g\. "
                                         r".*new/model\.pt$"):
        _tiny_model().save(f"{tmp_path}/new/")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option, example", [("--log", "sub/md.csv"), ("--summary", "sub/md.summary.json"),
                                             ("--restart-out", "sub/md.restart.pt"), ("--out", "sub/md.extxyz")])
def test_md_output_ending_in_a_slash_is_refused(tmp_path, capsys, monkeypatch, option, example):
    """``md --log sub/`` wrote the thermo log into a file named 'sub' (and its plot as sub.png)."""
    monkeypatch.chdir(tmp_path)
    _tiny_model().save(tmp_path / "m.pt")
    write(tmp_path / "w.xyz", molecule("H2O"))
    before = snapshot(tmp_path)
    capsys.readouterr()
    one_error_line(main(["md", "w.xyz", "--model", "m.pt", "--steps", "2", "--no-progress", option, "sub/"]),
                   capsys.readouterr(), [f"{option} sub/ ends in '/', so it names a folder; give a file name, "
                                         f"e.g. {example}"])
    assert snapshot(tmp_path) == before and _folders(tmp_path) == []


# ---------------------------------------------------------------------------------- md --minimize
@pytest.mark.parametrize("engine", ["native", "ase"])
def test_md_minimization_that_collapses_atoms_names_file_step_and_cause(tmp_path, capsys, monkeypatch, engine):
    """FIRE with a model that pulls two atoms onto each other (here an untrained one) ended in the model's
    "atoms 0 and 7 are on top of each other (distance 5.5e-07 Å)": no file, no step, no word of the
    minimisation, as if the input held a duplicated atom (the input passed that check)."""
    monkeypatch.chdir(tmp_path)
    _tiny_model().save(tmp_path / "m.pt")
    write(tmp_path / "ethanol.xyz", molecule("CH3CH2OH"))
    before = snapshot(tmp_path)
    capsys.readouterr()
    rc = main(["md", "ethanol.xyz", "--model", "m.pt", "--minimize", "--steps", "2", "--no-progress",
               "--engine", engine])
    captured = capsys.readouterr()
    if rc == 0:
        pytest.skip(f"the untrained model's FIRE run converged with --engine {engine} here")
    line = one_error_line(rc, captured, ["error: ethanol.xyz: the FIRE minimization stopped at step ",
                                         "came on top of each other", "the model pulls them together",
                                         "or run without the minimization"])
    assert "Traceback" not in captured.err and "(distance" not in line
    assert snapshot(tmp_path) == before


def test_simulation_minimize_names_the_structure_and_input_atoms():
    """The Python API's line names the structure and the atoms in the input order (atom_order sorts them)."""
    from torchmdx.errors import SimulationError
    from torchmdx.md.engine import Simulation

    ethanol = molecule("CH3CH2OH")
    lines = []
    for order in ("input", "hilbert"):
        sim = Simulation(_tiny_model(), [molecule("H2O"), ethanol], temperature_K=0, atom_order=order)
        with pytest.raises(SimulationError) as caught:
            sim.minimize(0.05, 500)
        assert caught.value.structure == 1
        lines.append(str(caught.value))
    assert lines[0].startswith("the FIRE minimization stopped at step ") and "of structure 1 came on top" in lines[0]
    pair = {int(a) for a in lines[0].split("atoms ")[1].split(" of")[0].split(" and ")}
    assert all(a < len(ethanol) for a in pair)
    assert {int(a) for a in lines[1].split("atoms ")[1].split(" of")[0].split(" and ")} == pair


# ---------------------------------------------------------------------------------- md config index
@pytest.mark.parametrize("index", [0, -1, 2])
def test_md_config_index_may_be_a_number(tmp_path, index):
    """``index: 0`` in an md config was "config key 'md.index' must be a string, got 0 (int)", although the
    config meant to take it (it turns a non-string index into text)."""
    from torchmdx.errors import ConfigError
    from torchmdx.md.config import md_config

    (tmp_path / "md.yaml").write_text(f"md:\n  index: {index}\n")
    assert md_config(yaml_path=str(tmp_path / "md.yaml")).index == str(index)
    (tmp_path / "bad.yaml").write_text("md:\n  index: 2.5\n")
    with pytest.raises(ConfigError, match=r"config key 'md\.index' must be str \| int, got 2\.5 \(float\)"):
        md_config(yaml_path=str(tmp_path / "bad.yaml"))


# ---------------------------------------------------------------------------------- data info and split files
def test_data_info_of_a_config_shows_the_split_of_its_split_file(tmp_path, shared_data, capsys, monkeypatch):
    """``data info CONFIG`` drew a fresh split and fitted the atom references on it, ignoring
    ``data.split_file`` (which training uses): other sizes and references than the run's, silently; a split
    file that does not fit the data passed."""
    from torchmdx.data.splits import Split, save_split

    monkeypatch.chdir(tmp_path)
    np.savez("e.npz", **_ethanol(shared_data, frames=20))
    idx = np.random.default_rng(0).permutation(20)
    save_split(Split(train=idx[:12], val=idx[12:16], test=idx[16:], n_structures=20, seed=0), "s.npz")
    save_split(Split(train=idx[:12], val=idx[12:16], test=idx[16:18], n_structures=18, seed=0), "other.npz")
    for name, split_file in (("c.yaml", "s.npz"), ("bad.yaml", "other.npz")):
        (tmp_path / name).write_text(yaml.safe_dump({"data": {"path": "e.npz", "cache_dir": "cache",
                                                              "split_file": split_file}}))
    capsys.readouterr()
    assert main(["data", "info", "c.yaml", "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["split"] == {"train": 12, "val": 4, "test": 4, "unused": 0}
    one_error_line(main(["data", "info", "bad.yaml"]), capsys.readouterr(),
                   ["other.npz: split made for 18 structures, but the dataset has 20"])


# ---------------------------------------------------------------------------------- zero forces
def test_training_forces_all_exactly_zero_are_refused(tmp_path, shared_data, capsys, monkeypatch):
    """A file whose forces are all exactly 0 (a converter that wrote zeros where none were computed) was
    trained on silently: a flat energy surface learned, "before training val F MAE 2 meV/Å". Refused before
    the run folder is made; ``train.force_weight: 0`` (or ``data.check_labels: false``) trains on."""
    from torchmdx.train.config import load_run_config
    from torchmdx.train.run import prepare

    monkeypatch.chdir(tmp_path)
    arrays = _ethanol(shared_data, frames=20)
    np.savez("zero.npz", **{**arrays, "F": np.zeros_like(arrays["F"])})
    config = {"data": {"path": "zero.npz", "cache_dir": "cache", "train_size": 12, "val_size": 4, "batch_size": 4},
              "model": dict(TINY), "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1},
              "run_dir": "run"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    one_error_line(main(["train", "c.yaml"]), capsys.readouterr(),
                   ["zero.npz: every force of the 12 training structures is exactly 0: zeros written where no "
                    "forces were computed? set train.force_weight: 0"])
    assert not (tmp_path / "run").exists()
    for override in ("train.force_weight=0", "data.check_labels=false"):
        datamodule, module = prepare(load_run_config("c.yaml", [override]))
        assert datamodule.force_rms == 0.0
