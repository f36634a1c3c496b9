"""Bad inputs, round 13: round 12's leftovers (identical md replicas, slmc.local_sweeps outside
the run-time estimate) and a hunt through interrupted work, evaluate/export options, sweep grids,
environment variables, relative paths and extreme md numbers (see docs/bad_inputs.md, round 13).
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import molecule
from ase.io import read, write

import torchmdx
from torchmdx.cli.main import main
from test_bad_inputs_more import refused_without_writes
from test_bad_inputs_round3 import _slmc_config
from test_bad_inputs_round9 import TINY


def _tiny_model():
    model = torchmdx.build_model(TINY)
    model.set_normalisation(elements=[1, 6, 8])
    return model


# ---------------------------------------------------------------------------------- round 12 leftovers
def _water_with_velocities(path):
    atoms = molecule("H2O")
    atoms.set_velocities(np.random.default_rng(0).normal(0.0, 0.01, (3, 3)))
    write(path, atoms)


@pytest.mark.parametrize("ensemble,identical", [("nve", True), ("langevin", False)])
def test_md_replicas_from_file_velocities_say_when_they_are_identical(tmp_path, capsys, monkeypatch, ensemble,
                                                                       identical):
    """``md --replicas N --velocities file`` in nve (or nose-hoover) ran N identical trajectories and
    said nothing; one note line says so now. A langevin run gets no such note (its copies differ)."""
    monkeypatch.chdir(tmp_path)
    _water_with_velocities(tmp_path / "w.extxyz")
    _tiny_model().save(tmp_path / "m.pt")
    capsys.readouterr()
    assert main(["md", "w.extxyz", "--model", "m.pt", "--replicas", "2", "--velocities", "file", "--steps", "4",
                 "--every", "2", "--ensemble", ensemble, "--out", "t.extxyz", "--no-progress"]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "identical trajectories" in line]
    frames = [read(f"t.{r}.extxyz", ":") for r in range(2)]
    same = np.array_equal(frames[0][-1].positions, frames[1][-1].positions)
    assert same == identical
    if identical:
        assert len(notes) == 1 and notes[0].startswith("note: --replicas 2 copies start from the same velocities")
        assert "--velocities draw" in notes[0]
    else:
        assert notes == []


def test_slmc_local_sweeps_count_in_the_run_time_estimate(tmp_path):
    """``slmc.local_sweeps: 1e9`` (a typo for 1) runs 1.6e10 single-site updates a proposal and was
    not in the estimate (it counts diagonalisations): no warning. Now the estimate counts them and
    the warning names the key; the shipped configs and a few sweeps a proposal stay silent."""
    from pathlib import Path

    from torchmdx.lattice.config import LOCAL_UPDATE_SECONDS, cost_estimate, load_slmc_config, size_warning

    typo = load_slmc_config(_slmc_config(tmp_path, slmc__local_sweeps=1e9))
    cost = cost_estimate(typo)
    assert cost["local_updates"] == 2 * 4 * 16 * 10**9  # (linear + 1 transformer) x 4 steps x N·1e9
    assert cost["local_seconds"] == pytest.approx(cost["local_updates"] * LOCAL_UPDATE_SECONDS)
    line = size_warning(typo)
    assert line.startswith("slmc.local_sweeps = 1e+09: 1.28e+11 single-site updates") and "days on one core" in line
    assert "\n" not in line
    assert size_warning(load_slmc_config(_slmc_config(tmp_path, slmc__local_sweeps=10))) is None
    root = Path(__file__).resolve().parents[1]
    for name in ("slmc_l4.yaml", "slmc_l6.yaml"):
        cfg = load_slmc_config(root / "configs" / name)
        assert cost_estimate(cfg)["local_seconds"] < 3600


# ---------------------------------------------------------------------------------- interrupted work
def _train_config(tmp_path, shared_data, **trainer):
    import yaml

    config = {
        "data": {"path": str(shared_data / "md17" / "md17_ethanol_xtb.npz"), "cache_dir": str(tmp_path / "cache"),
                 "train_size": 16, "val_size": 8, "test_size": 8, "batch_size": 8, "seed": 0},
        "model": dict(TINY),
        "train": {"lr": 1e-3, "lr_warmup_steps": 2},
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "devices": 1, "log_every_n_steps": 1,
                    "enable_progress_bar": False, **trainer},
        "run_dir": str(tmp_path / "run"),
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "config.yaml"


@pytest.mark.parametrize("at_epoch", [1, 0])
def test_train_interrupted_says_how_to_go_on(tmp_path, shared_data, capsys, monkeypatch, at_epoch):
    """Ctrl-C (or SIGTERM: Lightning turns it into the same shutdown) in the first epoch said "continue
    it with --resume (from .../last.ckpt)", and --resume then said "last.ckpt not found; nothing to
    resume". Before the first checkpoint the line now says to run the command again; after it,
    --resume as before."""
    import signal

    import lightning as L

    from torchmdx.train.config import load_run_config
    from torchmdx.train.run import train

    class Stop(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, index):
            if trainer.current_epoch == at_epoch:
                raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    cfg = load_run_config(_train_config(tmp_path, shared_data))
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, callbacks=[Stop()])
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C while it shuts down
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if line.startswith("training interrupted")]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert len(lines) == 1 and last.is_file() == bool(at_epoch)
    if at_epoch:
        assert lines[0] == f"training interrupted; continue it with --resume (from {last})"
    else:
        assert "before its first checkpoint" in lines[0] and "without --resume" in lines[0]
        assert main(["train", str(tmp_path / "config.yaml"), "--set", "trainer.max_epochs=1"]) == 0


# ---------------------------------------------------------------------------------- relative paths
def _md_config_in_a_subfolder(t):
    from ase.build import bulk

    from torchmdx.nn.analytic import LennardJones

    (t / "sub").mkdir()
    LennardJones(0.0104, 3.4, cutoff=5.0).save(t / "sub" / "lj.pt")
    write(t / "sub" / "ar.extxyz", bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 2, 2))
    (t / "sub" / "md.yaml").write_text("md:\n  model: lj.pt\n  structure: ar.extxyz\n  steps: 2\n  out: o.extxyz\n")
    return t / "sub" / "md.yaml"


# ---------------------------------------------------------------------------------- md time constants
def _argon(t):
    from ase.build import bulk

    from torchmdx.nn.analytic import LennardJones

    atoms = bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 2, 2)
    atoms.rattle(0.05, seed=1)
    write(t / "ar.extxyz", atoms)
    LennardJones(0.0104, 3.4, cutoff=5.0).save(t / "lj.pt")
    return ["md", t / "ar.extxyz", "--model", t / "lj.pt", "--steps", "20", "--out", t / "md.extxyz", "--no-progress"]


def md_nose_hoover_tau_of_1e300(t, s):  # NaN at step 1 ("reduce the time step or check the model"), files written
    return _argon(t) + ["--ensemble", "nose-hoover", "--tau", "1e300"]


def md_nose_hoover_tau_of_1e100(t, s):  # the chain's float32 masses overflowed: RuntimeError traceback
    return _argon(t) + ["--ensemble", "nose-hoover", "--tau", "1e100"]


def md_nose_hoover_tau_shorter_than_the_step(t, s):  # blew up, blamed on the time step or the model
    return _argon(t) + ["--ensemble", "nose-hoover", "--tau", "0.1"]


def md_ase_barostat_tau_of_001_fs(t, s):  # ASE's "You have 0 lattice vectors" traceback
    return _argon(t) + ["--engine", "ase", "--pressure", "1", "--barostat-tau", "0.01"]


def md_ase_barostat_tau_of_1e300(t, s):  # OverflowError traceback
    return _argon(t) + ["--engine", "ase", "--pressure", "1", "--barostat-tau", "1e300"]


def md_temperature_of_1e30(t, s):  # ran to exit 0 (a warning line), positions of a 1e30 K gas
    return _argon(t) + ["--temperature", "1e30"]


def md_float32_temperature_of_1e60(t, s):  # "reached nan K ... reduce the time step or check the model"
    return _argon(t) + ["--temperature", "1e60", "--ensemble", "langevin"]


def train_resume_from_another_folder(t, s):  # "--resume: run/checkpoints/last.ckpt not found; nothing to resume"
    import yaml

    (t / "sub" / "run" / "checkpoints").mkdir(parents=True)
    (t / "sub" / "run" / "checkpoints" / "last.ckpt").write_bytes(b"a checkpoint")
    config = yaml.safe_load(_train_config(t, s).read_text())
    config["run_dir"] = "run"
    (t / "sub" / "config.yaml").write_text(yaml.safe_dump(config))
    return ["train", "sub/config.yaml", "--resume"]


def _ethanol_in_the_data_folder(t, s):
    """./data/md17_ethanol.npz (./data is searched for molecule names; the current folder is ``t``)."""
    (t / "data").mkdir(exist_ok=True)
    (t / "data" / "md17_ethanol.npz").symlink_to(s / "md17" / "md17_ethanol_xtb.npz")


def data_info_of_a_molecule_name_without_format(t, s):  # "ethanol: file not found", not naming --format md17
    _ethanol_in_the_data_folder(t, s)
    return ["data", "info", "ethanol", "--cache-dir", t / "cache"]


# ---------------------------------------------------------------------------------- sweep
def sweep_grid_over_the_architecture(t, s):  # "...; set model.architecture: et": no way out for the grid
    return ["sweep", _train_config(t, s), "--grid", "model.architecture=et,transformer", "--dry-run", "--out",
            t / "sweep"]


ROWS = [
    (sweep_grid_over_the_architecture, ["sweep point (model.architecture=transformer): config key 'model.backend' "
                                        "belongs to architecture 'et'", "a --grid over model.architecture keeps the "
                                        "base config's model keys: give each architecture a variant with its own "
                                        "model section instead (sweep.variants"]),
    (data_info_of_a_molecule_name_without_format, ["ethanol: file not found; as an MD17 molecule name it needs the "
                                                   "format md17 (--format md17, or data.format: md17), which finds",
                                                   "data/md17_ethanol.npz"]),
    (train_resume_from_another_folder, ["--resume: run_dir 'run' is relative to the current folder", "where there is "
                                        "no run; sub/run next to the config holds one: pass --run-dir sub/run"]),
    (md_temperature_of_1e30, ["--temperature of 1e+30 K is beyond 1e+12 K", "typical: up to 2000 K"]),
    (md_float32_temperature_of_1e60, ["--temperature of 1e+60 K is beyond 1e+12 K"]),
    (md_nose_hoover_tau_of_1e300, ["--tau of 1e+300 fs is beyond 1e+12 fs"]),
    (md_nose_hoover_tau_of_1e100, ["--tau of 1e+100 fs is beyond 1e+12 fs"]),
    (md_nose_hoover_tau_shorter_than_the_step, ["--tau of 0.1 fs is shorter than 2 time steps (--dt 0.5 fs)"]),
    (md_ase_barostat_tau_of_001_fs, ["--barostat-tau of 0.01 fs is shorter than 2 time steps (--dt 0.5 fs)"]),
    (md_ase_barostat_tau_of_1e300, ["--barostat-tau of 1e+300 fs is beyond 1e+12 fs", "barostat"]),
]


@pytest.mark.parametrize("setup,fragments", ROWS, ids=[row[0].__name__ for row in ROWS])
def test_refused_with_one_line_and_nothing_written(tmp_path, shared_data, capsys, monkeypatch, setup, fragments):
    refused_without_writes(tmp_path, shared_data, capsys, monkeypatch, setup, fragments)


def test_md_config_inputs_are_found_next_to_the_config(tmp_path, monkeypatch):
    """An md config's input files follow train's rule (next to the config first, then the current
    folder): run from another folder it found nothing ("ar.extxyz: structure file not found").
    The same config runs from its own folder, from the parent, and from the parent with the paths
    given on the command line (the current folder's); its output stays in the current folder."""
    _md_config_in_a_subfolder(tmp_path)
    monkeypatch.chdir(tmp_path / "sub")
    assert main(["md", "--config", "md.yaml", "--no-progress"]) == 0
    assert (tmp_path / "sub" / "o.extxyz").is_file()
    monkeypatch.chdir(tmp_path)
    assert main(["md", "--config", "sub/md.yaml", "--no-progress"]) == 0
    assert (tmp_path / "o.extxyz").is_file()
    assert main(["md", "--config", "sub/md.yaml", "--no-progress", "sub/ar.extxyz", "--model", "sub/lj.pt",
                 "--out", "p.extxyz"]) == 0
    assert (tmp_path / "p.extxyz").is_file()


def test_md_time_constants_at_the_bounds_still_run(tmp_path, monkeypatch):
    """The closest valid inputs: Nosé–Hoover with tau = 2 dt and 1e12 fs (native and ASE engines),
    a barostat_tau of 2 dt and of 1e12 fs, and Bussi with a tau far below the step (a full
    rescaling each step: not bounded) run; a barostat_tau without --pressure is not checked."""
    from torchmdx.md.config import md_config

    monkeypatch.chdir(tmp_path)
    base = [str(a) for a in _argon(tmp_path)]
    for extra in (["--ensemble", "nose-hoover", "--tau", "1"], ["--ensemble", "nose-hoover", "--tau", "1e12"],
                  ["--engine", "ase", "--ensemble", "nose-hoover", "--tau", "1", "--pressure", "1",
                   "--barostat-tau", "1e12"],
                  ["--ensemble", "bussi", "--tau", "0.01"]):
        assert main(base + extra + ["--force"]) == 0, extra
    md_config({"engine": "ase", "pressure": 1.0, "barostat_tau": 1.0, "ensemble": "langevin"})
    md_config({"barostat_tau": 0.01, "pressure": None})  # no pressure named at all: refused since round 17
    md_config({"temperature": 1e12, "ensemble": "langevin"})  # the bound itself is accepted (1e9 K: a warning)
    assert main(base + ["--temperature", "5e4", "--force", "--steps", "2"]) == 0


# ---------------------------------------------------------------------------------- evaluate
def test_evaluate_run_of_other_data_does_not_advise_deleting_its_split(tmp_path, shared_data, capsys, monkeypatch):
    """``evaluate model.pt --data other.npz --run RUN`` with data of another size said "RUN/splits.npz:
    split made for 30 structures, but the dataset has 20; delete it or set another split_file": the
    train advice, here pointing at the run's own record of its split. Now one line naming --run and
    the data; the run's split file is left alone. The same run folder with its own data evaluates."""
    from torchmdx.data.splits import random_split, save_split

    monkeypatch.chdir(tmp_path)
    with np.load(shared_data / "md17" / "md17_ethanol_xtb.npz") as source:
        np.savez(tmp_path / "small.npz", R=source["R"][:20], z=source["z"], E=source["E"][:20], F=source["F"][:20])
    _tiny_model().save(tmp_path / "m.pt")
    (tmp_path / "run").mkdir()
    save_split(random_split(30, 20, 5, 5), tmp_path / "run" / "splits.npz")
    before = (tmp_path / "run" / "splits.npz").read_bytes()
    args = ["evaluate", "m.pt", "--data", "small.npz", "--run", "run", "--split", "test", "--out", "report",
            "--cache-dir", "cache", "--no-progress"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --run run: its splits.npz was made for 30 structures, but the dataset has 20 (small.npz): "
                   "the run was trained on other data; give the run's data, or leave out --run to evaluate every "
                   "structure"]
    assert (tmp_path / "run" / "splits.npz").read_bytes() == before and not (tmp_path / "report").exists()
    save_split(random_split(20, 10, 5, 5), tmp_path / "run" / "splits.npz")
    assert main(args) == 0 and (tmp_path / "report" / "errors.json").is_file()


def test_md_simulation_api_bounds_the_nose_hoover_tau():
    """``Simulation(..., ensemble="nose-hoover", tau_fs=1e100)`` (md's Python API) was a RuntimeError
    traceback ("value cannot be converted to type float without overflow": the chain's float32
    masses kT·tau²); tau = 0.1 fs at 0.5 fs steps blew up. The CLI's bounds, one line."""
    from ase.build import bulk

    from torchmdx.errors import ConfigError
    from torchmdx.md.engine import Simulation
    from torchmdx.nn.analytic import LennardJones

    lj = LennardJones(0.0104, 3.4, cutoff=5.0)
    argon = bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 2, 2)
    for tau in (1e100, 0.1):
        with pytest.raises(ConfigError, match=r"tau of .* fs must be between 2 time steps \(1 fs\) and 1e\+12 fs"):
            Simulation(lj, [argon], timestep_fs=0.5, ensemble="nose-hoover", temperature_K=50.0, tau_fs=tau)
    for tau in (1.0, 1e12):
        sim = Simulation(lj, [argon], timestep_fs=0.5, ensemble="nose-hoover", temperature_K=50.0, tau_fs=tau)
        sim.run(5)
        assert np.isfinite(sim.state.positions.numpy()).all()


def test_md_ase_engine_step_that_fails_is_one_line_keeping_the_last_state(tmp_path, capsys, monkeypatch, recwarn):
    """``md --engine ase --pressure 1e300`` collapsed the cell in the first step: ASE's "You have 0
    lattice vectors: volume not defined" traceback, and the restart file was not written. A
    calculator's refusal inside a step (a cell grown singular at -1e300 bar) was a line naming no
    step. Now both stop as any failed step does: one line with the step and the pressure, the last
    good state kept, without numpy's overflow warnings before it. 1 bar runs."""
    monkeypatch.chdir(tmp_path)
    base = [str(a) for a in _argon(tmp_path)] + ["--engine", "ase", "--steps", "5"]
    for pressure, detail in (("1e300", "ValueError: You have 0 lattice vectors"), ("-1e300", "non-finite position")):
        capsys.readouterr()
        assert main(base + [f"--pressure={pressure}", "--force"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: simulation stopped at step 1: the step failed: "), err
        assert detail in err[0] and f"(at {float(pressure):g} bar: check the pressure" in err[0]
        assert "last good state (step 0) kept in the trajectory's last frame and" in err[0]
        assert (tmp_path / "md.restart.pt").is_file()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]  # numpy's overflow lines, on the CLI
    assert main(base + ["--pressure=1", "--force"]) == 0


def test_train_resume_folder_check_leaves_other_runs_alone(tmp_path, monkeypatch):
    """The closest valid inputs of the check above: the run folder given with --run-dir (or --set
    run_dir=...), a config run from its own folder, and a current folder that holds the run too."""
    import argparse

    from torchmdx.cli.train_cmd import _check_resume_folder

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub" / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "sub" / "run" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    cfg = argparse.Namespace(run_dir="run")
    _check_resume_folder(argparse.Namespace(run_dir="run"), argparse.Namespace(config="sub/c.yaml", run_dir="sub/run",
                                                                               overrides=[]))
    _check_resume_folder(cfg, argparse.Namespace(config="sub/c.yaml", run_dir=None, overrides=["run_dir=sub/run"]))
    _check_resume_folder(cfg, argparse.Namespace(config="c.yaml", run_dir=None, overrides=[]))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    _check_resume_folder(cfg, argparse.Namespace(config="sub/c.yaml", run_dir=None, overrides=[]))


def test_molecule_names_with_their_format_and_unknown_names(tmp_path, shared_data, capsys, monkeypatch):
    """The closest valid input of the row above: the name with ``--format md17`` reads the file;
    a name no data folder holds is still the plain "file not found"."""
    monkeypatch.chdir(tmp_path)
    _ethanol_in_the_data_folder(tmp_path, shared_data)
    assert main(["data", "info", "ethanol", "--format", "md17", "--cache-dir", str(tmp_path / "cache"), "--json"]) == 0
    assert '"n_structures": 2000' in capsys.readouterr().out
    assert main(["data", "info", "benzene", "--cache-dir", str(tmp_path / "cache")]) == 2
    assert capsys.readouterr().err.strip() == "error: benzene: file not found"


def test_sweep_over_architectures_as_variants_plans(tmp_path, shared_data, capsys):
    """The closest valid input of the sweep row: each architecture a variant with its own model
    section (docs/sweep.md) plans both points."""
    import yaml

    path = _train_config(tmp_path, shared_data)
    config = yaml.safe_load(path.read_text())
    config["sweep"] = {"variants": {"et": {"model": dict(TINY)},
                                    "tf": {"model": {"architecture": "transformer", "embedding_dimension": 8,
                                                     "num_layers": 1, "num_heads": 2, "num_rbf": 4,
                                                     "cutoff_upper": 4.0}}}}
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["sweep", str(path), "--dry-run", "--out", str(tmp_path / "sweep")]) == 0
    assert "2 points" in capsys.readouterr().out


def test_simulation_api_takes_the_cli_temperature_bound():
    """md's Python API (Simulation) refuses what --temperature refuses (1e30 K ran there, NaN is no
    temperature); the bound itself and 0 K (NVE) are accepted."""
    from ase.build import bulk

    from torchmdx.errors import ConfigError
    from torchmdx.md.engine import Simulation
    from torchmdx.nn.analytic import LennardJones

    model = LennardJones(0.0104, 3.4, cutoff=5.0)
    argon = bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 2, 2)
    for bad in (1e30, float("nan"), -1.0):
        with pytest.raises(ConfigError, match="temperature_K must be between 0 and 1e\\+12 K"):
            Simulation(model, [argon], ensemble="nve", temperature_K=bad)
    Simulation(model, [argon], ensemble="langevin", temperature_K=1e12)
    Simulation(model, [argon], ensemble="nve", temperature_K=0.0)
