"""Bad inputs, round 11: nothing lost, nothing silent.

The ASE Calculator in ASE workflows (slab stress, a model shared by two calculators, float32
positions far from the origin), device names, model and config files behind symbolic links,
YAML 1.1 corner cases (base-60 and leading-zero numbers, a key twice in a ``--set`` value) and
the environment variable ``TORCHMDX_RANK_WAIT_S`` (see docs/bad_inputs.md, round 11).

Table rows: a setup ``(tmp_path, shared_data) -> CLI arguments`` and the fragments the one
``error:`` line must hold; every file under ``tmp_path`` must come out unchanged. Tests of
behaviour follow.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from ase.build import bulk, molecule

import torchmdx
from test_bad_inputs_more import _config, refused_without_writes
from test_bad_inputs_round10 import _argon, _md
from test_bad_inputs_round9 import TINY


def _model(tmp_path, name="m.pt"):
    model = torchmdx.build_model(TINY)
    model.set_normalisation(elements=[1, 6, 8])
    model.save(tmp_path / name)
    return tmp_path / name


# ---------------------------------------------------------------------------------- CLI rows
def md_on_the_meta_device(t, s):  # "Tensor.item() cannot be called on meta tensors" (traceback)
    return _md(t, _argon(t), "--device", "meta")


def _links(t):
    """A folder beside ``t`` for links (the unchanged-files check of ``t`` cannot stat a loop)."""
    folder = t.parent / (t.name + "_links")
    folder.mkdir(exist_ok=True)
    return folder


def md_model_a_symlink_loop(t, s):  # "model file not found", though the name is there
    _argon(t)
    os.symlink(_links(t) / "loop.pt", _links(t) / "loop.pt")
    return ["md", t / "ar.extxyz", "--model", _links(t) / "loop.pt", "--steps", "2", "--out", t / "md.extxyz",
            "--no-progress"]


def train_config_a_dangling_symlink(t, s):  # "config file not found": the link is there
    os.symlink(t / "moved.yaml", _links(t) / "config.yaml")
    return ["train", _links(t) / "config.yaml"]


def train_config_a_folder(t, s):
    (t / "config.yaml").mkdir()
    return ["train", t / "config.yaml"]


def train_set_value_with_a_key_twice(t, s):  # PyYAML kept the last lr, silently
    return ["train", _config(t, s), "--set", "train={lr: 0.01, lr: 0.0001}"]


ROWS = [
    (md_on_the_meta_device, ["error: --device 'meta': the meta device holds no numbers (shapes only); use cpu or cuda"]),
    (md_model_a_symlink_loop, ["loop.pt: is a symbolic link that loops back on itself"]),
    (train_config_a_dangling_symlink, ["config.yaml: is a symbolic link to the missing", "moved.yaml"]),
    (train_config_a_folder, ["config.yaml: is a folder, not a config file"]),
    (train_set_value_with_a_key_twice, ["--set 'train={lr: 0.01, lr: 0.0001}': key 'lr' is given twice; keep one"]),
]


@pytest.mark.parametrize("setup, fragments", ROWS, ids=[row[0].__name__ for row in ROWS])
def test_refused_in_one_line(tmp_path, shared_data, capsys, monkeypatch, setup, fragments):
    refused_without_writes(tmp_path, shared_data, capsys, monkeypatch, setup, fragments)


# ---------------------------------------------------------------------------------- Calculator
def test_stress_of_a_slab_without_vacuum_vectors_is_refused_not_nan(tmp_path):
    """pbc [T, F, F] or [T, T, F] with zero open rows: the stress divided by the cell's zero volume,
    and get_stress returned six NaN without a word; now ASE's PropertyNotImplementedError in one
    line (energies and forces still work). With vacuum vectors in the open rows a slab has its
    stress (ASE's convention: test_bad_inputs_round10 checks it against finite differences)."""
    from ase.calculators.calculator import PropertyNotImplementedError

    calc = torchmdx.Calculator(_model(tmp_path))
    for pbc in ([True, False, False], [True, True, False]):
        atoms = molecule("CH4")
        atoms.cell, atoms.pbc = np.diag([10.0 if p else 0.0 for p in pbc]), pbc
        atoms.calc = calc
        assert np.isfinite(atoms.get_potential_energy())
        with pytest.raises(PropertyNotImplementedError,
                           match=re.escape(f"stress of a structure with pbc {pbc} divides by the volume of its cell, "
                                           "which is 0")):
            atoms.get_stress()
        atoms.cell = [10.0, 10.0, 10.0]  # vacuum vectors in the open rows: a finite stress
        assert np.isfinite(atoms.get_stress()).all()
    atoms = molecule("CH4")
    atoms.cell, atoms.pbc = [10.0, 10.0, 10.0], True
    atoms.calc = calc
    assert np.isfinite(atoms.get_stress()).all()


def test_a_second_calculator_leaves_the_shared_model_alone(tmp_path):
    """Calculator(model, dtype="float64") converted the caller's Potential in place: the model
    itself and an earlier Calculator(model) (which still fed float32 positions into float64
    weights) changed silently. Now a model that must change is copied."""
    import torch

    model = torchmdx.load_model(_model(tmp_path))
    atoms = molecule("CH3OH")
    first = torchmdx.Calculator(model)
    atoms.calc = first
    e32 = atoms.get_potential_energy()
    second = torchmdx.Calculator(model, dtype="float64")
    assert next(model.parameters()).dtype == torch.float32          # the caller's model is unchanged
    assert next(second.potential.parameters()).dtype == torch.float64
    first.reset()
    assert atoms.get_potential_energy() == e32                      # the first calculator is unchanged
    assert torchmdx.Calculator(model).potential is model            # no copy when nothing must change


def test_float32_positions_far_from_the_origin_keep_their_precision(tmp_path):
    """A float32 model 10^6 Å from the origin: positions kept 0.06 Å steps, energies were off by
    0.03 eV and forces by 0.06 eV/Å against float64, silently. Positions are now taken relative
    to an origin near the atoms (in float64), so the far copy agrees with the near one."""
    path = _model(tmp_path)
    near = molecule("CH3OH")
    near.calc = torchmdx.Calculator(path, dtype="float32")
    reference = near.calc.__class__(path, dtype="float64")
    for shift in (1e4, 1e6):
        far = molecule("CH3OH")
        far.positions += shift
        far.calc = torchmdx.Calculator(path, dtype="float32")
        exact = far.copy()
        exact.calc = reference
        assert abs(far.get_potential_energy() - exact.get_potential_energy()) < 1e-5
        assert np.abs(far.get_forces() - exact.get_forces()).max() < 1e-5
        assert abs(far.get_potential_energy() - near.get_potential_energy()) < 1e-5
    # periodic: the same translation leaves energy, forces and stress alone
    crystal = bulk("C", "diamond", a=3.57, cubic=True).repeat(3)
    crystal.calc = torchmdx.Calculator(path, dtype="float64")
    moved = crystal.copy()
    moved.positions += 1e5
    moved.calc = torchmdx.Calculator(path, dtype="float64")
    assert abs(crystal.get_potential_energy() - moved.get_potential_energy()) < 1e-8
    assert np.abs(crystal.get_stress() - moved.get_stress()).max() < 1e-8


@pytest.mark.parametrize("where", ["load_model", "Calculator", "md.load_potential"])
def test_meta_device_is_refused(tmp_path, where):
    """device="meta" was accepted; the first prediction raised "Tensor.item() cannot be called on
    meta tensors" (a traceback)."""
    from torchmdx.errors import ConfigError
    from torchmdx.md.loading import load_potential

    path = _model(tmp_path)
    call = {"load_model": lambda: torchmdx.load_model(path, device="meta"),
            "Calculator": lambda: torchmdx.Calculator(path, device="meta"),
            "md.load_potential": lambda: load_potential(path, device="meta")}[where]
    with pytest.raises(ConfigError, match=r"'meta': the meta device holds no numbers \(shapes only\); use cpu or cuda$"):
        call()


def test_model_file_behind_links(tmp_path):
    """A symbolic-link loop, a dangling link or a folder was "model file not found"."""
    from torchmdx.errors import ModelError

    os.symlink(tmp_path / "b.pt", tmp_path / "a.pt")
    os.symlink(tmp_path / "a.pt", tmp_path / "b.pt")
    os.symlink(tmp_path / "gone.pt", tmp_path / "dangling.pt")
    (tmp_path / "folder.pt").mkdir()
    cases = {"a.pt": "is a symbolic link that loops back on itself",
             "dangling.pt": f"is a symbolic link to the missing {tmp_path / 'gone.pt'}",
             "folder.pt": "is a folder, not a model file", "none.pt": "model file not found"}
    for name, message in cases.items():
        with pytest.raises(ModelError, match=f"^{re.escape(f'{tmp_path / name}: {message}')}$"):
            torchmdx.load_model(tmp_path / name)
    os.symlink(_model(tmp_path), tmp_path / "link.pt")  # a link to a model file still loads
    assert torchmdx.load_model(tmp_path / "link.pt").elements == [1, 6, 8]


# ---------------------------------------------------------------------------------- YAML
def _yaml(tmp_path, text):
    from torchmdx.config import load_yaml

    (tmp_path / "c.yaml").write_text(text)
    return load_yaml(tmp_path / "c.yaml")


def test_yaml_base_60_numbers_are_text(tmp_path):
    """YAML 1.1 reads 12:00:00:00 as the int 3888000 (base 60): Lightning's DD:HH:MM:SS for 12
    days was refused as "must be str | null, got 3888000"; now it is the text, as in YAML 1.2."""
    from torchmdx.train.config import TrainerConfig
    from torchmdx.config import from_dict

    values = _yaml(tmp_path, "trainer:\n  max_time: 12:00:00:00\nx: 1:30\ny: 1e-3\nz: 7\n")
    assert values == {"trainer": {"max_time": "12:00:00:00"}, "x": "1:30", "y": "1e-3", "z": 7}
    assert from_dict(TrainerConfig, values["trainer"], "trainer").max_time == "12:00:00:00"


def test_yaml_leading_zero_is_decimal(tmp_path):
    """``max_epochs: 010`` was 8 (YAML 1.1 octal), silently; now ten, as YAML 1.2 reads it (and as
    ``--set trainer.max_epochs=010``). Hex stays hex."""
    from torchmdx.config import apply_overrides

    assert _yaml(tmp_path, "a: 010\nb: -007\nc: 0x10\nd: 0\ne: 1_000\n") == {"a": 10, "b": -7, "c": 16, "d": 0,
                                                                              "e": 1000}
    assert apply_overrides({}, ["trainer.max_epochs=010"]) == {"trainer": {"max_epochs": 10}}


def test_set_value_with_a_key_twice(tmp_path):
    from torchmdx.config import apply_overrides
    from torchmdx.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^--set 'train=\{lr: 1, lr: 2\}': key 'lr' is given twice; keep one$"):
        apply_overrides({}, ["train={lr: 1, lr: 2}"])
    assert apply_overrides({}, ["train={lr: 1, ema_decay: 2}"]) == {"train": {"lr": 1, "ema_decay": 2}}


# ---------------------------------------------------------------------------------- environment
@pytest.mark.parametrize("value", ["abc", "nan", "-5", "0", "inf"])
def test_rank_wait_seconds_must_be_a_positive_number(monkeypatch, value):
    """TORCHMDX_RANK_WAIT_S=abc was float()'s ValueError traceback on the waiting ranks; nan or -5
    gave up at once ("after nan s") while rank 0 was still building the cache."""
    from torchmdx.data.ranks import rank_wait_seconds, wait_for
    from torchmdx.errors import DataError

    monkeypatch.setenv("TORCHMDX_RANK_WAIT_S", value)
    message = (f"^environment variable TORCHMDX_RANK_WAIT_S is {value!r}; expected a number of seconds > 0 "
               r"\(unset it for the default, 21600 s\)$")
    with pytest.raises(DataError, match=message):
        wait_for(lambda: "ready", "x", say=lambda line: None)
    monkeypatch.setenv("TORCHMDX_RANK_WAIT_S", " 2.5 ")
    assert rank_wait_seconds() == 2.5
    monkeypatch.delenv("TORCHMDX_RANK_WAIT_S")
    assert rank_wait_seconds() == 21600.0


@pytest.mark.parametrize("value, traceback", [("0", False), ("false", False), ("off", False), ("", False),
                                              ("1", True), ("yes", True)])
def test_traceback_variable_set_to_zero_means_off(tmp_path, capsys, monkeypatch, value, traceback):
    """TORCHMDX_TRACEBACK=0 (turning tracebacks off) showed them: any non-empty text counted as on."""
    from torchmdx.cli.main import main
    from torchmdx.errors import ConfigError

    monkeypatch.setenv("TORCHMDX_TRACEBACK", value)
    args = ["train", str(tmp_path / "none.yaml")]
    if traceback:
        with pytest.raises(ConfigError):
            main(args)
        return
    assert main(args) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'none.yaml'}: config file not found\n"


def test_predict_of_float32_positions_far_from_the_origin(tmp_path):
    """``Potential.predict`` (the Python API) had the Calculator's float32 loss: 2.1934 eV at the
    origin, 2.1625 eV 10^6 Å away. Each structure of a list is now centred on its own atoms."""
    model = torchmdx.load_model(_model(tmp_path))
    exact = torchmdx.load_model(_model(tmp_path, "m64.pt"), dtype="float64")
    near = model.predict(molecule("CH3OH"))
    far = molecule("CH3OH")
    far.positions += 1e6
    got, reference = model.predict([far, molecule("H2O")]), exact.predict([far, molecule("H2O")])
    assert abs(got["energy"][0] - near["energy"]) < 1e-5
    assert np.abs(got["energy"] - reference["energy"]).max() < 1e-5
    assert np.abs(got["forces"][0] - reference["forces"][0]).max() < 1e-5
    crystal = bulk("C", "diamond", a=3.57, cubic=True).repeat(3)
    moved = crystal.copy()
    moved.positions += 1e5
    a, b = exact.predict(crystal, stress=True), exact.predict(moved, stress=True)
    assert abs(a["energy"] - b["energy"]) < 1e-8 and np.abs(a["stress"] - b["stress"]).max() < 1e-8


def test_yaml_merge_keys_are_read(tmp_path):
    """``<<: *base`` (YAML merge keys, which PyYAML's safe loader reads) was refused as "not valid
    YAML ...: could not determine a constructor for the tag 'tag:yaml.org,2002:merge'": the
    duplicate-key check constructed the ``<<`` key itself. A key given twice beside a merge is
    still refused; the merged keys may be overridden."""
    from torchmdx.errors import ConfigError

    text = "a: &base {lr: 0.1, ema_decay: 0.9}\nb:\n  <<: *base\n  lr: 0.2\n"
    assert _yaml(tmp_path, text) == {"a": {"lr": 0.1, "ema_decay": 0.9}, "b": {"lr": 0.2, "ema_decay": 0.9}}
    with pytest.raises(ConfigError, match=r"c\.yaml: key 'lr' is given twice \(lines 4 and 5\); keep one$"):
        _yaml(tmp_path, text + "  lr: 0.3\n")


def test_yaml_unhashable_key(tmp_path, capsys):
    """``train: {[1]: 2}`` was a ``TypeError: unhashable type: 'list'`` traceback."""
    from torchmdx.cli.main import main

    (tmp_path / "c.yaml").write_text("train: {[1]: 2}\n")
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'c.yaml'}: not valid YAML at line 1, column 9: found unhashable key\n"
