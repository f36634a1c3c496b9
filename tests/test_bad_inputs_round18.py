"""Bad inputs, round 18 (branch bad18): md thermostat/barostat options beside an explicit ensemble that does
not use them (a warning), ``export -o model.ckpt``, ``predict``'s flags that are not booleans, ``cpu:1`` as a
device, and the hunt's further finds (see docs/bad_inputs.md, round 18).
"""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.cluster import Icosahedron
from ase.io import write

import torchmdx
from torchmdx.cli.main import main
from torchmdx.errors import ConfigError, ModelError
from test_bad_inputs_md import one_error_line, snapshot
from test_bad_inputs_round9 import TINY


def _lj(folder):
    from torchmdx.nn.analytic import LennardJones

    LennardJones(0.0104, 3.4).save(folder / "lj.pt")
    return folder / "lj.pt"


def _argon(folder, name="ar.xyz"):
    write(folder / name, Icosahedron("Ar", 2))
    return folder / name


def _tiny_model():
    model = torchmdx.build_model(TINY)
    model.set_normalisation(elements=[1, 6, 8])
    return model


def _water():
    return Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])


def _refused(capsys, argv, fragments, folder):
    """``argv`` exits 2 with one ``error:`` line holding ``fragments``, no traceback, ``folder`` unchanged."""
    before = snapshot(folder)
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    line = one_error_line(rc, captured, fragments)
    assert snapshot(folder) == before
    return line


# ---------------------------------------------------------------------------------- md options that do nothing
def test_md_thermostat_options_beside_another_ensemble_warn_once(tmp_path, capsys, monkeypatch):
    """``--ensemble nve --friction 5`` (and --tau with langevin, --chain-length with bussi, --barostat-tau without
    a pressure) ran without a word. The run goes on (one option set for every ensemble stays possible), with one
    warning line per option that has no effect."""
    monkeypatch.chdir(tmp_path)
    _argon(tmp_path)
    _lj(tmp_path)
    base = ["md", "ar.xyz", "--model", "lj.pt", "--steps", "2", "--every", "1", "--out", "o/t.extxyz",
            "--no-progress", "--force"]
    capsys.readouterr()
    assert main(base + ["--ensemble", "nve", "--friction", "5", "--tau", "50"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert lines == [
        "warning: --friction has no effect with --ensemble nve (only langevin uses it: the Langevin thermostat's "
        "friction)",
        "warning: --tau has no effect with --ensemble nve (only bussi and nose-hoover use it: the Bussi / "
        "Nosé–Hoover thermostat's time constant)"]
    assert main(base + ["--ensemble", "bussi", "--tau", "50", "--chain-length", "4"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "--chain-length has no effect with --ensemble bussi (only nose-hoover" in err
    (tmp_path / "c.yaml").write_text("md:\n  ensemble: langevin\n  friction: 5\n  pressure: null\n  barostat_tau: 500\n")
    assert main(base + ["--config", "c.yaml"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and ("warning: config key 'md.barostat_tau' in c.yaml has no effect: config key "
                                           "'md.pressure' in c.yaml is not set, so the volume stays constant") in err
    assert main(base + ["--ensemble", "langevin", "--friction", "5"]) == 0  # each option where it belongs: no word
    assert "warning" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------- export -o model.ckpt
def test_export_to_a_checkpoint_name_is_refused(tmp_path, capsys):
    """``export run.ckpt -o model.ckpt`` wrote a model file under a checkpoint's extension; a later ``export
    model.ckpt`` said "not a torchmdx training checkpoint"."""
    _tiny_model().save(tmp_path / "m.pt")
    _refused(capsys, ["export", tmp_path / "m.pt", "-o", tmp_path / "model.ckpt"],
             ["model.ckpt: .ckpt names a training checkpoint, and this writes a model file; give it a .pt name, "
              "e.g. ", "model.pt"], tmp_path)
    _refused(capsys, ["export", "--openmm", tmp_path / "m.pt", "-o", tmp_path / "om.CKPT"],
             ["om.CKPT: .ckpt names a training checkpoint, and this writes a OpenMM module"], tmp_path)


# ---------------------------------------------------------------------------------- predict's flags
@pytest.mark.parametrize("kwargs, message", [
    ({"forces": "no"}, "predict: forces must be True or False, got 'no' (str)"),
    ({"stress": None}, "predict: stress must be True or False, got None (NoneType)"),
    ({"forces": 0}, "predict: forces must be True or False, got 0 (int)"),
])
def test_predict_flags_that_are_not_booleans_are_refused(kwargs, message):
    """``predict(atoms, forces="no")`` computed the forces (any non-empty string is true)."""
    model = _tiny_model()
    with pytest.raises(ModelError) as info:
        model.predict(_water(), **kwargs)
    assert str(info.value) == message
    with pytest.raises(ModelError, match=r"model\(atoms, \.\.\.\): forces must be True or False, got 'no'"):
        model(_water(), forces="no")
    assert "forces" not in model.predict(_water(), forces=np.bool_(False))  # numpy's bool is a bool


# ---------------------------------------------------------------------------------- devices
def test_cpu_index_beyond_cpu0_is_refused(tmp_path, capsys):
    """``load_model(..., device="cpu:1")`` (and ``md --device cpu:1``) were taken as the CPU."""
    path = _lj(tmp_path)
    with pytest.raises(ConfigError) as info:
        torchmdx.load_model(path, device="cpu:1")
    assert str(info.value) == ("device 'cpu:1': there is one CPU device, cpu (cpu:0), which uses all its cores; GPUs "
                               "are cuda, cuda:1, ...")
    assert str(torchmdx.load_model(path, device="cpu:0").cutoff)  # cpu:0 is the CPU
    _argon(tmp_path)
    _refused(capsys, ["md", tmp_path / "ar.xyz", "--model", path, "--device", "cpu:2", "--out", tmp_path / "t.extxyz"],
             ["--device 'cpu:2': there is one CPU device"], tmp_path)
