"""Bad inputs, round 19 (branch bad19): round 18's leftovers (a finite position beyond float32, the list item
``predict`` refuses, a ``--grid`` key the config's grid has too, a structure file named twice, misleading output
extensions, ``data info --cache-dir FILE``) and the hunt's further finds (see docs/bad_inputs.md, round 19).
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.io import write

from torchmdx.cli.main import main
from torchmdx.errors import ModelError
from test_bad_inputs_round9 import TINY
from bad_inputs_common import (  # the helpers rounds 17-19 share
    lj_file as _lj,
    argon_file as _argon,
    tiny_model as _tiny_model,
    water as _water,
    refused as _refused,
    water_npz,
)


# ---------------------------------------------------------------------------------- beyond float32's range
def test_finite_position_beyond_float32_is_named_as_such(tmp_path):
    """An atom at 1e200 Å in a float32 model was "atom 2 has a non-finite position [inf, 0.93, 0.0]": the value
    is finite in the input, and the line now says it is beyond float32's range (predict, model(atoms), the
    Calculator)."""
    from torchmdx import Calculator

    model = _tiny_model()
    far = _water()
    far.positions[2, 0] = 1e200
    expected = ("atom 2 (H) is at [1e+200, 0.93, 0.0] Å: finite, but beyond the range of float32 (at most 3.4e+38), "
                "the dtype it is computed in; check the structure, or compute in float64")
    for call in (lambda: model.predict(far), lambda: model(far)):
        with pytest.raises(ModelError) as info:
            call()
        assert str(info.value) == expected
    with pytest.raises(ModelError) as info:
        model.predict([_water(), far])
    assert str(info.value) == "structure 1: " + expected
    model.save(tmp_path / "m.pt")
    far.calc = Calculator(tmp_path / "m.pt")
    with pytest.raises(ModelError) as info:
        far.get_potential_energy()
    assert str(info.value) == expected
    assert np.isfinite(model.double().predict(far)["energy"])  # float64 holds it


@pytest.mark.parametrize("engine", ["native", "ase"])
def test_md_position_beyond_float32_names_file_and_atom(tmp_path, capsys, monkeypatch, engine):
    """md: "positions are nan Å apart" (native, after a RuntimeWarning) or "structure 0: atom 3 has a non-finite
    position [..., inf, ...]" -> the file, the atom, the value and --dtype."""
    monkeypatch.chdir(tmp_path)
    _argon(tmp_path, far=1e200)
    _lj(tmp_path)
    line = _refused(capsys, ["md", "ar.xyz", "--model", "lj.pt", "--steps", "2", "--out", "o/t.extxyz",
                             "--no-progress", "--engine", engine],
                    ["ar.xyz: atom 3 (Ar) is at [", "1e+200", "beyond the range of float32", "--dtype float64"],
                    tmp_path)
    assert "nan" not in line


# ---------------------------------------------------------------------------------- predict's list items
def test_predict_names_the_list_item_that_is_not_atoms():
    """``predict([atoms, "x"])`` said "got str" without naming the item; ``predict({"a": atoms})`` said "got str"
    too (a dict iterates over its keys)."""
    model = _tiny_model()
    cases = [
        ([_water(), "x"], "expected an ase.Atoms or a non-empty list of ase.Atoms: item 1 of the list of 2 has type "
                          "str, not ase.Atoms"),
        ((_water(), _water(), 5), "item 2 of the tuple of 3 has type int, not ase.Atoms"),
        ({"a": _water()}, "got dict (give its values: list(d.values()))"),
        ([], "got an empty list"),
    ]
    for given, fragment in cases:
        with pytest.raises(ModelError) as info:
            model.predict(given)
        assert fragment in str(info.value)


# ---------------------------------------------------------------------------------- --grid over sweep.grid
def _sweep_config(tmp_path, grid=None):
    import yaml

    water_npz(tmp_path)
    config = {"data": {"path": "e.npz", "train_size": 12, "val_size": 4}, "model": dict(TINY)}
    if grid is not None:
        config["sweep"] = {"grid": grid}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "s.yaml"


def test_sweep_grid_key_also_in_config_grid_warns(tmp_path, capsys, monkeypatch):
    """A --grid key that the config's sweep.grid sweeps too took the command line's values without a word. The
    command line still wins (as --set over a config value), with one warning line naming both value lists."""
    monkeypatch.chdir(tmp_path)  # caches (data/cache under the working folder) stay out of the checkout
    config = _sweep_config(tmp_path, {"model.num_layers": [2, 4, 8]})
    base = ["sweep", str(config), "--dry-run", "--out", str(tmp_path / "out")]
    capsys.readouterr()
    assert main(base + ["--grid", "model.num_layers=1,2"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: --grid gives 'model.num_layers' the values [1, 2], replacing the values [2, 4, 8] "
                        f"that sweep.grid in {config} gives it; the sweep trains the command line's"]
    assert "2 points, 0 finished, 2 to run" in captured.out
    assert main(["sweep", str(config), "--dry-run", "--out", str(tmp_path / "out2"),
                 "--grid", "model.num_layers=2,4,8"]) == 0  # the same values: nothing to say
    assert "warning" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------- md: a file named twice
def test_md_structure_file_named_twice_is_refused(tmp_path, capsys, monkeypatch):
    """``md ar.xyz ar.xyz`` ran the file twice, as two structures (t.0.extxyz, t.1.extxyz): --replicas is the
    way to run copies (the two differ only in their velocities either way). ``./ar.xyz`` is the same file too."""
    monkeypatch.chdir(tmp_path)
    _argon(tmp_path)
    _lj(tmp_path)
    base = ["--model", "lj.pt", "--steps", "2", "--out", "o/t.extxyz", "--no-progress"]
    _refused(capsys, ["md", "ar.xyz", "ar.xyz", *base],
             ["error: the structure argument names ar.xyz twice: each file is read once; for copies of a structure "
              "run together, give it once with --replicas N"], tmp_path)
    _refused(capsys, ["md", "ar.xyz", "./ar.xyz", *base],
             ["names ./ar.xyz twice (ar.xyz and ./ar.xyz are the same file)"], tmp_path)
    (tmp_path / "c.yaml").write_text("md:\n  structure: [ar.xyz, ar.xyz]\n")
    _refused(capsys, ["md", "--config", "c.yaml", *base],
             ["error: config key 'md.structure' in c.yaml names ar.xyz twice"], tmp_path)
    _argon(tmp_path, "ar2.xyz")
    assert main(["md", "ar.xyz", "ar2.xyz", *base]) == 0  # two files, even of equal content: two structures
    assert sorted(p.name for p in (tmp_path / "o").glob("t.*.extxyz")) == ["t.0.extxyz", "t.1.extxyz"]


def test_md_config_key_messages_name_their_file_once(tmp_path, capsys, monkeypatch):
    """A config value that md's own checks refuse read "config key 'md.index' in c.yaml in c.yaml ..." (the
    name with its file was put in front of a line that held it already)."""
    monkeypatch.chdir(tmp_path)
    _argon(tmp_path)
    _lj(tmp_path)
    (tmp_path / "c.yaml").write_text("md:\n  index: x\n")
    line = _refused(capsys, ["md", "ar.xyz", "--config", "c.yaml", "--model", "lj.pt", "--out", "o/t.extxyz"],
                    ["error: config key 'md.index' in c.yaml 'x' is not a frame selection"], tmp_path)
    assert line.count("c.yaml") == 1
    (tmp_path / "c.yaml").write_text("md:\n  structure: ['']\n")
    line = _refused(capsys, ["md", "--config", "c.yaml", "--model", "lj.pt", "--out", "o/t.extxyz"],
                    ["error: config key 'md.structure' in c.yaml names an empty structure file ('')"], tmp_path)
    assert line.count("c.yaml") == 1


# ---------------------------------------------------------------------------------- md outputs' extensions
def test_md_outputs_with_another_formats_extension_are_refused(tmp_path, capsys, monkeypatch):
    """``--restart-out r.extxyz`` wrote a torch file under a trajectory's name (ASE then fails on it) and
    ``--summary s.csv`` JSON under a table's; ``--log l.json`` a CSV. An extension of another known format is
    refused naming both; one of no known format (.txt, none) and JSON's .yaml stay accepted."""
    monkeypatch.chdir(tmp_path)
    _argon(tmp_path)
    _lj(tmp_path)
    base = ["md", "ar.xyz", "--model", "lj.pt", "--steps", "2", "--every", "1", "--out", "o/t.extxyz",
            "--no-progress"]
    _refused(capsys, base + ["--restart-out", "r.extxyz"],
             ["error: --restart-out r.extxyz: .extxyz names an extended-XYZ trajectory, and the restart file is a "
              "torch file; give it a .pt name, e.g. md.restart.pt"], tmp_path)
    _refused(capsys, base + ["--summary", "s.CSV"],
             ["error: --summary s.CSV: .csv names a CSV table, and the summary is JSON; give it a .json name"],
             tmp_path)
    _refused(capsys, base + ["--log", "l.json"],
             ["error: --log l.json: .json names JSON, and the thermo log is a CSV table; give it a .csv name"],
             tmp_path)
    assert main(base + ["--restart-out", "o/r.ckpt", "--summary", "o/s.yaml", "--log", "o/l.txt"]) == 0
    assert {p.name for p in (tmp_path / "o").iterdir()} >= {"r.ckpt", "s.yaml", "l.txt", "t.extxyz"}


# ---------------------------------------------------------------------------------- data --cache-dir FILE
def test_data_info_cache_dir_that_is_a_file_is_refused(tmp_path, capsys, monkeypatch, shared_data):
    """``data info --cache-dir FILE`` was taken without a word (it only looks for a cache there); ``data
    prepare`` said so only after reading the data. Both refuse it first, a config's data.cache_dir too."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cf").write_text("not a folder\n")
    source = shared_data / "md17" / "ethanol_snip.xyz"
    for command in ("info", "prepare"):
        _refused(capsys, ["data", command, source, "--cache-dir", "cf"],
                 ["error: --cache-dir cf: cf is a file, not a folder; give the cache folder"], tmp_path)
    _refused(capsys, ["data", "info", source, "--cache-dir", "cf/sub"],
             ["error: --cache-dir cf/sub: cf is a file, not a folder"], tmp_path)
    (tmp_path / "d.yaml").write_text(f"data:\n  path: {source}\n  cache_dir: cf\n")
    _refused(capsys, ["data", "info", "d.yaml"],
             ["error: config key 'data.cache_dir' in d.yaml: cf: cf is a file, not a folder"], tmp_path)


# ---------------------------------------------------------------------------------- train: monitor, logging
def _train_config(tmp_path):
    _sweep_config(tmp_path)  # e.npz: energies and forces, no stress
    (tmp_path / "t.yaml").write_text(
        "data: {path: e.npz, train_size: 12, val_size: 4, batch_size: 4}\n"
        f"model: {dict(TINY)}\n"
        "trainer: {max_epochs: 1, accelerator: cpu, enable_progress_bar: false, num_sanity_val_steps: 0}\n"
        "run_dir: runs/t\n")
    return tmp_path / "t.yaml"


def test_train_monitor_of_a_label_the_data_lack_is_refused(tmp_path, capsys, monkeypatch):
    """``train.monitor: val_stress_mae`` on data without stress trained a whole epoch, then stopped with
    Lightning's traceback ("Early stopping conditioned on metric `val_stress_mae` which is not available");
    ``trainer.log_every_n_steps: -5`` was taken as 5 (Lightning's step % -5)."""
    monkeypatch.chdir(tmp_path)
    config = _train_config(tmp_path)
    argv = ["train", config, "--set", "train.monitor=val_stress_mae", "--set", "data.cache_dir=c"]
    assert main([str(a) for a in argv]) == 2  # builds the data cache (kept): the second call changes nothing
    _refused(capsys, argv, ["error: config key 'train.monitor' is 'val_stress_mae' but ", "e.npz has no stress, so it "
                            "is never logged (no best checkpoint, no early stopping); monitor val_loss or "
                            "val_energy_mae"], tmp_path)
    assert not (tmp_path / "runs").exists()
    _refused(capsys, ["train", config, "--set", "trainer.log_every_n_steps=-5"],
             ["error: config key 'trainer.log_every_n_steps' must be >= 0 (0: no per-step logging), got -5"],
             tmp_path)


def test_evaluate_names_its_options_not_config_keys(tmp_path, capsys, monkeypatch):
    """``evaluate --format xyz`` said "config key 'data.format' must be one of ...", and ``--cache-dir ''``
    "config key 'data.cache_dir' is empty": no config was given, the options were."""
    monkeypatch.chdir(tmp_path)
    _sweep_config(tmp_path)
    _tiny_model().save(tmp_path / "m.pt")
    _refused(capsys, ["evaluate", "m.pt", "--data", "e.npz", "--format", "xyz"],
             ["error: --format must be one of md17, rmd17, md17-xyz, qm9, ani1, ani1x, ase, cache, got 'xyz'"],
             tmp_path)


# ---------------------------------------------------------------------------------- ANI HDF5 shapes and types
def _ani(path, layout, **datasets):
    import h5py

    rng = np.random.default_rng(0)
    water = np.array([[0.0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    coordinates = water + rng.normal(0, 0.02, (5, 3, 3))
    if layout == "ani1x":
        values = {"atomic_numbers": np.array([8, 1, 1]), "coordinates": coordinates,
                  "m.energy": rng.normal(-76, 0.01, 5), "m.forces": rng.normal(0, 0.01, (5, 3, 3))}
        name = "H2O"
    else:
        values = {"coordinates": coordinates.astype(np.float32), "species": np.array([b"O", b"H", b"H"]),
                  "energies": rng.normal(-76, 0.01, 5)}
        name = "gdb_s01/gdb_s01-0"
    values.update(datasets)
    with h5py.File(path, "w") as h5:
        group = h5.create_group(name)
        for key, value in values.items():
            group[key] = value
    return path


def test_ani_h5_atoms_and_energies_of_odd_shapes_say_what_fits(tmp_path, capsys):
    """ANI-1x ``atomic_numbers`` of shape (1, 3): "'coordinates' has shape (5, 3, 3) but there are 1 atomic
    numbers; expected (n, 1, 3)" (blaming the coordinates); energies of shape (5, 1): "has shape (5, 1) for 5
    conformations" without what fits; ANI-1 ``species`` as numbers: "unknown element symbol '8'"."""
    cache = ["--cache-dir", tmp_path / "c"]
    x = ["--format", "ani1x", "--energy-key", "m.energy", "--forces-key", "m.forces", *cache]
    path = _ani(tmp_path / "z.h5", "ani1x", atomic_numbers=np.array([[8, 1, 1]]))
    _refused(capsys, ["data", "info", path, *x],
             ["z.h5:/H2O: 'atomic_numbers' has shape (1, 3); expected (atoms,), one entry per atom"], tmp_path)
    path = _ani(tmp_path / "e.h5", "ani1x", **{"m.energy": np.zeros((5, 1))})
    _refused(capsys, ["data", "info", path, *x],
             ["e.h5:/H2O: 'm.energy' has shape (5, 1) for 5 conformations (coordinates); expected (5,), one energy "
              "per conformation"], tmp_path)
    path = _ani(tmp_path / "s.h5", "ani1", species=np.array([8, 1, 1]))
    _refused(capsys, ["data", "info", path, "--format", "ani1", *cache],
             ["s.h5:/gdb_s01/gdb_s01-0: 'species' holds numbers (8, 1, 1), not element symbols: the ANI-1 layout "
              "names the elements (b'O', b'H'); a file of atomic numbers is the ANI-1x layout"], tmp_path)
    path = _ani(tmp_path / "s2.h5", "ani1", species=np.array([[b"O", b"H", b"H"]]))
    _refused(capsys, ["data", "info", path, "--format", "ani1", *cache],
             ["'species' has shape (1, 3); expected (atoms,)"], tmp_path)


# ---------------------------------------------------------------------------------- slmc keys that do nothing
def test_slmc_retrain_beyond_steps_warns_and_proposals_without_runs_refused(tmp_path, capsys):
    """``slmc.retrain_every: 10`` with ``slmc.steps: 4`` ran without one refit, without a word (a warning now, as
    md's options that do nothing); ``data.previous_proposals: true`` without ``data.previous_runs`` said "none
    of data.previous_runs holds proposals_*.pt" of an empty list."""
    from test_bad_inputs_round3 import _slmc_config

    from torchmdx.lattice.config import load_slmc_config, unused_warnings

    config = _slmc_config(tmp_path, slmc__retrain_every=10)
    assert unused_warnings(load_slmc_config(config, [], None)) == [
        "config key 'slmc.retrain_every' is 10 but slmc.steps is 4: no refit happens (one every 10 steps, before the "
        "last); lower it below 4, or set 0 (never)"]
    assert unused_warnings(load_slmc_config(config, ["slmc.retrain_every=2"], None)) == []
    _refused(capsys, ["slmc", _slmc_config(tmp_path, data__previous_proposals=True), "--no-progress"],
             ["error: config key 'data.previous_proposals' is true but data.previous_runs is empty: there is no "
              "earlier run to take proposals from"], tmp_path)


# ---------------------------------------------------------------------------------- export --atoms ranges
def test_export_atoms_range_far_beyond_the_structure_is_one_line(tmp_path, capsys):
    """``export --openmm --atoms 0-9999999999`` built the list of ten billion indices before checking them: "ran
    out of memory (MemoryError): check the sizes asked for (--replicas, batch sizes, ...)". The range is checked
    against the structure first."""
    from torchmdx.cli.export_cmd import parse_atoms
    from torchmdx.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_atoms("0-9999999999", 3)
    assert str(info.value) == "--atoms: atom 3 is outside the structure's 3 atoms (0-based: 0..2)"
    with pytest.raises(ConfigError, match=r"atom 9 is outside"):
        parse_atoms("0,9-99999999999", 3)
    assert parse_atoms("1-2,0", 3) == [1, 2, 0]
    _tiny_model().save(tmp_path / "m.pt")
    write(tmp_path / "w.xyz", _water())
    _refused(capsys, ["export", "--openmm", tmp_path / "m.pt", "-o", tmp_path / "om.pt", "--structure",
                      tmp_path / "w.xyz", "--atoms", "0-9999999999"],
             ["error: --atoms: atom 3 is outside the structure's 3 atoms (0-based: 0..2)"], tmp_path)


def test_sweep_grid_with_an_empty_value_names_it():
    """``--grid model.num_layers=1,,2`` said "give one or more comma-separated values" of a grid that gave two."""
    from torchmdx.errors import ConfigError
    from torchmdx.train.sweep_plan import parse_grid

    with pytest.raises(ConfigError) as info:
        parse_grid(["model.num_layers=1,,2"])
    assert str(info.value) == ("--grid 'model.num_layers=1,,2': value 2 of 3 is empty (two commas in a row, or one at "
                               "the start or end); give each value once: v1,v2,...")
    with pytest.raises(ConfigError, match=r"value 3 of 3 is empty"):
        parse_grid(["model.num_layers=1,2,"])
    with pytest.raises(ConfigError, match=r"give one or more comma-separated values"):
        parse_grid(["model.num_layers= "])
