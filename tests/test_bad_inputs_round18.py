"""Bad inputs, round 18 (branch bad18): md thermostat/barostat options beside an explicit ensemble that does
not use them (a warning), ``export -o model.ckpt``, ``predict``'s flags that are not booleans, ``cpu:1`` as a
device, and the hunt's further finds (see docs/bad_inputs.md, round 18).
"""

from __future__ import annotations

import numpy as np
import pytest

import torchmdx
from torchmdx.cli.main import main
from torchmdx.errors import ConfigError, ModelError
from test_bad_inputs_round9 import TINY
from bad_inputs_common import (  # the helpers rounds 17-19 share
    lj_file as _lj,
    argon_file as _argon,
    tiny_model as _tiny_model,
    water as _water,
    refused as _refused,
    water_npz,
)


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
             ["om.CKPT: .ckpt names a training checkpoint, and this writes an OpenMM module"], tmp_path)


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


# ---------------------------------------------------------------------------------- option names in messages
def test_label_names_the_option_out_of_range(tmp_path, capsys):
    """``label --skip -1`` (or ``--every 0``, ``--max-frames 0``) said "--skip must be >= 0, --every >= 1 and
    --max-frames >= 1", whichever was wrong, without its value."""
    _argon(tmp_path)
    _lj(tmp_path)
    base = ["label", tmp_path / "ar.xyz", "-o", tmp_path / "l.extxyz", "--method", f"model:{tmp_path / 'lj.pt'}"]
    for extra, message in ((["--skip", "-1"], "error: --skip must be >= 0, got -1"),
                           (["--every", "0"], "error: --every must be >= 1, got 0"),
                           (["--max-frames", "0"], "error: --max-frames must be >= 1, got 0")):
        assert _refused(capsys, base + extra, [], tmp_path) == message


def test_md_nan_and_seed_refusals_name_the_flag(tmp_path, capsys, monkeypatch):
    """``md --dt nan`` and ``md --seed -1`` were "config key 'md.dt' must be a finite number" and "config key
    'md.seed' must be between 0 and ..." for options given on the command line (a config file's key keeps its
    name, now with its file)."""
    monkeypatch.chdir(tmp_path)
    _argon(tmp_path)
    _lj(tmp_path)
    base = ["md", "ar.xyz", "--model", "lj.pt", "--out", "o/t.extxyz", "--no-progress"]
    assert _refused(capsys, base + ["--dt", "nan"], [], tmp_path) == "error: --dt must be a finite number, got nan"
    assert _refused(capsys, base + ["--seed", "-1"], [], tmp_path) == \
        "error: --seed must be between 0 and 4294967295 (2**32 - 1), got -1"
    (tmp_path / "s.yaml").write_text("md:\n  seed: -1\n")
    _refused(capsys, base + ["--config", "s.yaml"], ["error: config key 'md.seed' in s.yaml must be between 0"],
             tmp_path)


# ---------------------------------------------------------------------------------- a start above the limit
@pytest.mark.parametrize("engine", ["native", "ase"])
def test_md_start_hotter_than_max_temperature_is_one_line_before_any_step(tmp_path, capsys, monkeypatch, engine):
    """``md --max-temperature 1`` (below the drawn velocities' 242 K): the native engine said "the simulation is
    exploding: reduce the time step or check the model" before any step; the ASE engine ran a step, wrote its
    trajectory, log and restart file and stopped "at step 1"."""
    monkeypatch.chdir(tmp_path)
    _argon(tmp_path)
    _lj(tmp_path)
    line = _refused(capsys, ["md", "ar.xyz", "--model", "lj.pt", "--engine", engine, "--steps", "3",
                             "--max-temperature", "1", "--out", "o/t.extxyz", "--no-progress"],
                    ["error: the initial state cannot be simulated: structure 0 starts at 242.4 K (its initial "
                     "velocities), above max_temperature 1 K, before any step: raise max_temperature "
                     "(--max-temperature) above the starting temperature, or start colder"], tmp_path)
    assert "exploding" not in line and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------- xyz cut after a count line
def test_xyz_frame_cut_after_its_atom_count_is_named(tmp_path, capsys):
    """A file of only "3" (or a last frame cut after its count line): ``data info`` printed ASE's traceback
    ("RuntimeError: generator raised StopIteration"); md, label and export quoted "generator raised
    StopIteration"."""
    (tmp_path / "h.xyz").write_text("3\n")
    (tmp_path / "last.xyz").write_text('3\nenergy=-1.0 pbc="F F F"\nO 0 0 0\nH 1 0 0\nH 0 1 0\n3\n')
    _lj(tmp_path)
    _tiny_model().save(tmp_path / "m.pt")
    ends = ("the file ends early: a frame's atom-count line has no atom lines after it (truncated, e.g. an "
            "interrupted write or copy?)")
    _refused(capsys, ["data", "info", tmp_path / "h.xyz"], [f"h.xyz: frame 0: {ends}"], tmp_path)
    _refused(capsys, ["data", "info", tmp_path / "last.xyz"], [f"last.xyz: frame 1: {ends}"], tmp_path)
    _refused(capsys, ["md", tmp_path / "h.xyz", "--model", tmp_path / "lj.pt", "--out", tmp_path / "o" / "t.extxyz"],
             [f"h.xyz: {ends}"], tmp_path)
    _refused(capsys, ["label", tmp_path / "h.xyz", "-o", tmp_path / "l.extxyz", "--method",
                      f"model:{tmp_path / 'lj.pt'}"], [f"h.xyz: {ends}"], tmp_path)
    _refused(capsys, ["export", "--openmm", tmp_path / "m.pt", "-o", tmp_path / "om.pt", "--structure",
                      tmp_path / "h.xyz"], [f"h.xyz: {ends}"], tmp_path)


# ---------------------------------------------------------------------------------- sweep --set beside --grid
def test_sweep_set_of_a_swept_key_is_refused(tmp_path, capsys, monkeypatch):
    """``sweep --grid model.num_layers=1,2 --set model.num_layers=3`` trained 1 and 2: the grid's values replaced
    the --set at every point, without a word (a config's sweep.grid and sweep.variants likewise)."""
    monkeypatch.chdir(tmp_path)  # caches (data/cache under the working folder) stay out of the checkout
    water_npz(tmp_path)
    config = {"data": {"path": "e.npz", "train_size": 12, "val_size": 4},
              "model": dict(TINY), "sweep": {"grid": {"model.num_heads": [1, 2]},
                                             "variants": {"small": {"model.embedding_dimension": 8}}}}
    import yaml

    (tmp_path / "s.yaml").write_text(yaml.safe_dump(config))
    base = ["sweep", tmp_path / "s.yaml", "--dry-run", "--out", tmp_path / "out"]
    _refused(capsys, base + ["--grid", "model.num_layers=1,2", "--set", "model.num_layers=3"],
             ["error: --set 'model.num_layers=3': --grid sweeps 'model.num_layers' too, and its values replace this "
              "one at every point; drop the --set, or give the values in the grid"], tmp_path)
    _refused(capsys, base + ["--set", "model.num_heads=4"],
             ["error: --set 'model.num_heads=4': the config's sweep.grid sweeps 'model.num_heads' too"], tmp_path)
    _refused(capsys, base + ["--set", "model.embedding_dimension=16"],
             ["error: --set 'model.embedding_dimension=16': sweep.variants.small sets 'model.embedding_dimension' "
              "too, and the variant's value replaces this one in its points"], tmp_path)
    capsys.readouterr()
    assert main([str(a) for a in base + ["--grid", "model.num_layers=1,2", "--set", "train.lr=0.002"]]) == 0
    assert "4 points, 0 finished, 4 to run" in capsys.readouterr().out  # the same data and config pass


# ---------------------------------------------------------------------------------- torch files in the wrong place
def test_torch_file_given_as_structure_or_data_is_named(tmp_path, capsys):
    """``md model.pt`` (the model as the structure): "m.pt: cannot read a structure with ASE (pt)"; ``data info
    model.pt`` / ``evaluate --data model.pt``: "npz without the MD17 keys ... found: archive/.data/serialization_id,
    archive/.format_version, ..." (40 archive members on one line)."""
    _tiny_model().save(tmp_path / "m.pt")
    _lj(tmp_path)
    model = tmp_path / "m.pt"
    _refused(capsys, ["md", model, "--model", tmp_path / "lj.pt", "--out", tmp_path / "o" / "t.extxyz"],
             ["m.pt: a torch file (a model, checkpoint or MD restart file), not a structure; give a model with "
              "--model and a restart file with --restart"], tmp_path)
    _refused(capsys, ["label", model, "-o", tmp_path / "l.extxyz", "--method", f"model:{tmp_path / 'lj.pt'}"],
             ["m.pt: a torch file (a model, checkpoint or MD restart file), not structures"], tmp_path)
    _refused(capsys, ["export", "--openmm", model, "-o", tmp_path / "om.pt", "--structure", model],
             ["--structure: ", "m.pt: a torch file (a model, checkpoint or MD restart file), not a structure"],
             tmp_path)
    data_line = ("m.pt: a torch file (a model, checkpoint or MD restart file), not a data file; give the data (npz, "
                 "extxyz, xyz, h5, db, QM9 folder) or a config with a data: section")
    for argv in (["data", "info", model], ["data", "info", model, "--format", "md17"],
                 ["evaluate", model, "--data", model, "--out", tmp_path / "ev"]):
        line = _refused(capsys, argv, [data_line], tmp_path)
        assert "archive/" not in line
    np.savez(tmp_path / "many.npz", **{f"k{i:02d}": np.zeros(1) for i in range(30)})
    line = _refused(capsys, ["data", "info", tmp_path / "many.npz"], ["found: k00, k01", "k11, ... (30 in all)"],
                    tmp_path)
    assert "k12" not in line


# ---------------------------------------------------------------------------------- Potential.save('')
@pytest.mark.parametrize("name", ["", "  "])
def test_save_to_an_empty_name_is_refused(tmp_path, monkeypatch, name):
    """``model.save("")`` said ": is a folder; give a file name" (``Path('')`` is the current folder); ``"  "``
    wrote a model file named two spaces."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as info:
        _tiny_model().save(name)
    assert str(info.value) == f"save: the path is empty ({name!r}); give a file name such as model.pt"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- a Calculator after a NaN
def test_calculator_is_not_poisoned_by_a_structure_with_a_nan(tmp_path):
    """The Calculator keeps the local origin (the atoms' mean) while the atoms stay the same: after one water
    with a NaN position (refused, naming atom 0 rather than the NaN atom), every later water on the same
    calculator was refused as "atom 0 has a non-finite position [nan, nan, nan]". Likewise one atom at 1e200 Å
    pushed the others of every later structure to -inf in a float32 model."""
    from torchmdx import Calculator
    from torchmdx.errors import TorchmdxError

    model = _tiny_model()
    model.save(tmp_path / "m.pt")
    good = _water()
    good.calc = Calculator(tmp_path / "m.pt")
    reference = good.get_potential_energy()
    calculator = Calculator(tmp_path / "m.pt")
    for where, value, said in ((1, np.nan, "has a non-finite position"),  # round 19: 1e200 is beyond float32
                               (2, 1e200, r"\(H\) is at \[1e\+200, 1e\+200, 1e\+200\] Å: finite, but beyond the "
                                          "range of float32")):
        bad = _water()
        bad.positions[where] = value
        bad.calc = calculator
        with pytest.raises(TorchmdxError, match=rf"atom {where} {said}"):
            bad.get_potential_energy()
        again = _water()
        again.calc = calculator
        assert again.get_potential_energy() == reference
    bad = _water()
    bad.positions[1] = np.nan
    with pytest.raises(TorchmdxError, match=r"atom 1 has a non-finite position"):  # was atom 0
        model.predict(bad)
