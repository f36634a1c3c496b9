"""Equiformer through the same training, export, evaluation, calculator and MD as the ET, on the
real ethanol sample (GFN2-xTB energies and forces), CPU, tiny model:

- joint energy + force training (EMA, cosine schedule) lowers the validation force error well
  below the same seeded model's before training, measured here; the run folder's model file and
  resolved config know the architecture;
- ``torchmdx export`` of the best checkpoint gives the run's model file, ``torchmdx evaluate``
  reports its errors;
- NVE MD with the trained model (native engine, float64) conserves the total energy, with the
  error falling ~4x when the time step is halved (velocity Verlet is second order);
- ``torchmdx md`` runs it with the native and the ASE engines, which agree at step 0 with
  ``Potential.predict``;
- force-only training (energy_weight 0, re-fitted references) runs and resumes.
"""

import csv
import json

import numpy as np
import pytest
import torch
import yaml
from ase.io import write

from torchmdx.cli.main import main
from torchmdx.md.engine import Reporter, Simulation
from torchmdx.md.io import read_thermo
from torchmdx.nn.model_file import load_model
from torchmdx.train.config import load_run_config
from torchmdx.train.evaluate import error_metrics, predict
from torchmdx.train.export import potential_from_checkpoint
from torchmdx.train.run import prepare

pytestmark = pytest.mark.slow

TINY = {"architecture": "equiformer", "lmax": 2, "channels": 16, "num_layers": 2, "num_heads": 2,
        "feature_channels": 32, "num_rbf": 16, "radial_hidden": [32], "cutoff_upper": 4.0, "seed": 0}
EPOCHS = 6


def write_config(path, shared_data, cache_dir, run_dir, data=None, train=None, trainer=None):
    config = {
        "data": {"path": str(shared_data / "md17" / "md17_ethanol_xtb.npz"), "cache_dir": str(cache_dir),
                 "train_size": 96, "val_size": 40, "test_size": 40, "batch_size": 8, "inference_batch_size": 40,
                 "num_workers": 0, **(data or {})},
        "model": dict(TINY),
        "train": {"energy_weight": 0.2, "force_weight": 0.8, "lr": 3e-3, "lr_warmup_steps": 20,
                  "lr_schedule": "cosine", "lr_min": 1e-4, "ema_decay": 0.95, "early_stopping_patience": None,
                  **(train or {})},
        "trainer": {"max_epochs": EPOCHS, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                    "num_sanity_val_steps": 0, **(trainer or {})},
        "run_dir": str(run_dir),
    }
    path.write_text(yaml.safe_dump(config))
    return path


def epoch_rows(run_dir):
    out = {}
    with open(run_dir / "logs" / "csv" / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key not in ("epoch", "step") and value not in ("", None) and not key.endswith("_step"):
                    out.setdefault(int(row["epoch"]), {})[key] = float(value)
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory, shared_data, cache_dir):
    base = tmp_path_factory.mktemp("equiformer")
    config = write_config(base / "config.yaml", shared_data, cache_dir, base / "run")
    cfg = load_run_config(config)
    datamodule, module = prepare(cfg, run_dir=None)
    start = error_metrics(predict(module.model, datamodule.dataset, datamodule.split["val"], batch_size=40))
    assert main(["train", str(config)]) == 0
    return {"config": config, "run_dir": base / "run", "start": start, "cfg": cfg}


def test_training_lowers_the_force_error(joint_run):
    run_dir = joint_run["run_dir"]
    rows = epoch_rows(run_dir)
    assert sorted(rows) == list(range(EPOCHS))
    start, final = joint_run["start"]["forces_mae"], rows[EPOCHS - 1]["val_forces_mae"]
    assert start > 600  # meV/Å: the untrained model, of the order of the force RMS
    print(f"val force MAE {start:.0f} -> {final:.0f} meV/Å", {e: round(r["val_forces_mae"]) for e, r in rows.items()})
    assert final < 0.5 * start, (start, final)
    assert rows[EPOCHS - 1]["val_forces_mae"] < rows[1]["val_forces_mae"] < rows[0]["val_forces_mae"]
    resolved = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
    assert resolved["model"]["architecture"] == "equiformer" and resolved["model"]["lmax"] == 2
    payload = torch.load(run_dir / "model.pt", weights_only=True)
    assert payload["kind"] == "equiformer" and payload["elements"] == [1, 6, 8]


def test_export_and_evaluate(joint_run, tmp_path, capsys):
    run_dir = joint_run["run_dir"]
    out = tmp_path / "exported.pt"
    assert main(["export", str(run_dir / "checkpoints" / "best.ckpt"), "-o", str(out)]) == 0
    exported, model = load_model(out), load_model(run_dir / "model.pt")
    assert type(exported).__name__ == "EquiformerPotential"
    for name, value in model.state_dict().items():
        assert torch.equal(exported.state_dict()[name], value), name
    # the raw (non-EMA) weights differ from the EMA ones
    raw = potential_from_checkpoint(run_dir / "checkpoints" / "best.ckpt", ema=False)
    assert any(not torch.equal(raw.state_dict()[k], v) for k, v in model.state_dict().items())
    capsys.readouterr()
    assert main(["evaluate", str(out), "--data", str(joint_run["config"]), "--run", str(run_dir),
                 "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "eval" / "errors.json").read_text())
    assert report["split"] == "test" and report["metrics"]["n_structures"] == 40
    assert report["metrics"]["forces_mae"] < 0.5 * joint_run["start"]["forces_mae"]


class Recorder(Reporter):
    def __init__(self):
        self.conserved = []

    def report(self, simulation, observation):
        self.conserved.append(float(np.asarray(observation.conserved).sum()))


def _ethanol(joint_run):
    """The first test-split structure of the run, as ASE Atoms."""
    from ase import Atoms

    datamodule, _ = prepare(joint_run["cfg"], run_dir=joint_run["run_dir"])
    structure = datamodule.dataset[int(datamodule.split["test"][0])]
    return Atoms(numbers=structure.z.numpy(), positions=structure.pos.double().numpy())


def test_nve_md_with_the_trained_model_conserves_energy(joint_run):
    model = load_model(joint_run["run_dir"] / "model.pt", dtype="float64")
    atoms = _ethanol(joint_run)
    errors = {}
    for dt, steps in ((0.5, 120), (0.25, 240)):  # 60 fs at 300 K
        sim = Simulation(model, atoms, timestep_fs=dt, ensemble="nve", temperature_K=300.0, dtype=torch.float64, seed=3)
        sim.initialize()
        rec = Recorder()
        sim.run(steps, every=steps // 50, reporters=[rec])
        total = np.array(rec.conserved)
        errors[dt] = np.abs(total - total[0]).max() / len(atoms)
    print("NVE max |ΔE|/atom", errors)
    # eV/atom over 60 fs: below 1 % of the kinetic energy per atom (3/2 k_B T = 0.039 eV at 300 K)
    assert errors[0.5] < 4e-4, errors
    assert 2.5 < errors[0.5] / errors[0.25] < 6.0, errors


def test_md_cli_native_and_ase_engines(joint_run, tmp_path):
    atoms = _ethanol(joint_run)
    xyz = tmp_path / "ethanol.xyz"
    write(xyz, atoms)
    model_path = joint_run["run_dir"] / "model.pt"
    expected = load_model(model_path, dtype="float64").predict(atoms)["energy"]
    for engine in ("native", "ase"):
        out = tmp_path / f"{engine}.extxyz"
        rc = main(["md", str(xyz), "--model", str(model_path), "--engine", engine, "--steps", "10", "--every", "5",
                   "--dt", "0.5", "--temperature", "300", "--ensemble", "langevin", "--friction", "1",
                   "--dtype", "float64", "--out", str(out), "--no-progress"])
        assert rc == 0, engine
        rows = read_thermo(tmp_path / f"{engine}.csv")
        assert [r["step"] for r in rows] == [0, 5, 10]
        assert rows[0]["potential_eV"] == pytest.approx(expected, abs=1e-6), engine


def test_force_only_training_runs_and_resumes(tmp_path, shared_data, cache_dir):
    config = write_config(tmp_path / "force_only.yaml", shared_data, cache_dir, tmp_path / "run",
                          data={"train_size": 40, "val_size": 16, "test_size": 0},
                          train={"energy_weight": 0.0, "force_weight": 1.0}, trainer={"max_epochs": 2})
    assert main(["train", str(config)]) == 0
    assert main(["train", str(config), "--resume", "--set", "trainer.max_epochs=3"]) == 0
    rows = epoch_rows(tmp_path / "run")
    assert sorted(rows) == [0, 1, 2]
    # the re-fitted atomic references give absolute energies: errors far below the ~4e4 eV scale
    assert rows[2]["val_energy_mae"] < 1e5  # meV
    assert rows[2]["val_forces_mae"] < rows[0]["val_forces_mae"]
