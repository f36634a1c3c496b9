"""Stress as a training target: periodic argon boxes labelled by ASE's own Lennard-Jones
calculator (energies, forces, stress), read from extended XYZ.

- reader: the stress (Voigt in the file) arrives as the full 3 x 3 tensor in eV/Å³; other
  units convert by energy / length³ (hand-computed factor); a virial W gives −W / V; a frame
  without one is a one-line error;
- objective: the parameter gradient of the stress loss (a double backward through the strain
  derivative) equals a central finite difference of the loss, float64;
- end to end (with two isolated atoms without a stress in the data): a run with stress_weight
  > 0 logs val/test stress errors and has a lower validation stress error over its epochs than
  the same seeded run without the stress term; ``torchmdx evaluate`` reports the stress row and
  a stress parity panel.
"""

import numpy as np
import pytest
import torch
import yaml
from ase.build import bulk
from ase.calculators.lj import LennardJones as AseLennardJones
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from torchmdx import units
from torchmdx.cli.main import main
from torchmdx.data import read_structures
from torchmdx.errors import DataError

EPS, SIG, RC = 0.0104, 3.4, 5.0


def argon_frames(count=60, seed=0):
    """32-atom fcc argon boxes, lattice constant 5.1-5.5 Å, rattled, with ASE LJ labels."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(count):
        atoms = bulk("Ar", "fcc", a=float(rng.uniform(5.1, 5.5)), cubic=True).repeat((2, 2, 2))
        atoms.rattle(0.12, seed=int(rng.integers(1 << 30)))
        atoms.calc = AseLennardJones(epsilon=EPS, sigma=SIG, rc=RC, smooth=False)
        labels = dict(energy=atoms.get_potential_energy(), forces=atoms.get_forces(), stress=atoms.get_stress())
        atoms.calc = SinglePointCalculator(atoms, **labels)
        frames.append(atoms)
    return frames


def isolated_atom():
    """One argon atom in vacuum (energy 0, no cell, no stress): the reference-energy frames
    that periodic datasets carry."""
    from ase import Atoms

    atom = Atoms("Ar", positions=[[0.0, 0.0, 0.0]])
    atom.calc = SinglePointCalculator(atom, energy=0.0, forces=np.zeros((1, 3)))
    return atom


@pytest.fixture(scope="module")
def stress_data(tmp_path_factory):
    """60 labelled boxes, then two isolated atoms (no stress)."""
    path = tmp_path_factory.mktemp("stress") / "argon_lj.extxyz"
    frames = argon_frames()
    write(path, frames + [isolated_atom(), isolated_atom()])
    return path, frames


def _full(voigt):
    xx, yy, zz, yz, xz, xy = voigt
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def test_reader_gives_the_stress_tensor_in_ev_per_cubic_angstrom(stress_data, tmp_path):
    path, frames = stress_data
    data = read_structures(path)
    stress = np.asarray(data.extras["stress"]).reshape(-1, 3, 3)
    expected = np.stack([_full(a.get_stress()) for a in frames])
    np.testing.assert_allclose(stress[:60], expected, rtol=1e-12, atol=1e-15)
    assert np.isnan(stress[60:]).all()  # the isolated atoms have none
    assert data.extra_units["stress"] == "eV/Å³"
    # the same numbers declared as kcal/mol and Bohr: stress x (kcal/mol in eV) / (Bohr in Å)³
    scaled = read_structures(path, energy_unit="kcal/mol", length_unit="bohr")
    factor = 0.04336410390059322 / 0.5291772105638411 ** 3
    np.testing.assert_allclose(np.asarray(scaled.extras["stress"]).reshape(-1, 3, 3)[:60], expected * factor,
                               rtol=1e-12)
    # a virial instead of a stress: sigma = -W / V
    virial_frames = []
    for atoms in frames[:5]:
        a = atoms.copy()
        a.calc = None
        a.info["energy"] = atoms.get_potential_energy()
        a.arrays["forces"] = atoms.get_forces()
        a.info["virial"] = -_full(atoms.get_stress()) * atoms.get_volume()
        virial_frames.append(a)
    write(tmp_path / "virial.extxyz", virial_frames)
    from_virial = read_structures(tmp_path / "virial.extxyz")
    np.testing.assert_allclose(np.asarray(from_virial.extras["stress"]).reshape(-1, 3, 3), expected[:5], rtol=1e-10)
    # a periodic frame without a stress, others with one
    mixed = [frames[0], virial_frames[1].copy()]
    del mixed[1].info["virial"]
    write(tmp_path / "mixed.extxyz", mixed)
    with pytest.raises(DataError, match=r"frame 1: no stress key 'stress' \(or a virial\), although other frames have one"):
        read_structures(tmp_path / "mixed.extxyz")
    with pytest.raises(DataError, match="stress key 'sigma'"):
        read_structures(path, stress_key="sigma")


def test_stress_loss_gradient_equals_finite_difference(stress_data):
    """d(stress loss)/dθ by autograd (create_graph through σ = (1/V) ∂E/∂ε) vs a central
    difference of the loss in one weight, float64; the batch also holds an isolated atom
    (no stress: NaN reference, NaN prediction) which must add nothing, and no NaN."""
    from torchmdx.nn.atoms import atoms_inputs
    from torchmdx.nn.potential import ETPotential
    from torchmdx.train.config import TrainConfig
    from torchmdx.train.module import training_objective

    _, frames = stress_data
    model = ETPotential({"embedding_dimension": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8,
                         "cutoff_upper": 4.5, "dtype": "float64", "seed": 2, "backend": "torch"})
    batch = frames[:3] + [isolated_atom()]
    inputs = atoms_inputs(batch, torch.device("cpu"), torch.float64)
    reference = torch.tensor(np.stack([_full(a.get_stress()) for a in frames[:3]] + [np.full((3, 3), np.nan)]))
    cfg = TrainConfig(energy_weight=0.0, force_weight=0.0, stress_weight=1.0)
    counts = torch.tensor([len(a) for a in batch])
    out = model(**inputs, forces=False, stress=True)
    assert torch.isnan(out["stress"][3]).all() and torch.isfinite(out["stress"][:3]).all()

    def loss(create_graph):
        out = model(**inputs, forces=False, stress=True, create_graph=create_graph)
        return training_objective(cfg, out["energy"], None, out["energy"].detach(), None, counts,
                                  out["stress"], reference)[0]

    weight = model.representation.layers[0].dv_proj.weight
    (grad,) = torch.autograd.grad(loss(True), [weight])
    assert torch.isfinite(grad).all()
    h = 1e-5
    for index in [(0, 0), (5, 3), (40, 7)]:
        with torch.no_grad():
            weight[index] += h
            up = float(loss(False))
            weight[index] -= 2 * h
            down = float(loss(False))
            weight[index] += h
        assert float(grad[index]) == pytest.approx((up - down) / (2 * h), rel=1e-6, abs=1e-14)
    assert float(grad.abs().max()) > 0


def _config(tmp_path, data_path, stress_weight, run):
    config = {
        "data": {"path": str(data_path), "cache_dir": str(tmp_path / "cache"), "train_size": 40, "val_size": 10,
                 "test_size": 10, "batch_size": 8, "inference_batch_size": 10},
        "model": {"embedding_dimension": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8, "cutoff_upper": 4.5,
                  "backend": "torch", "seed": 0},
        "train": {"energy_weight": 0.1, "force_weight": 1.0, "stress_weight": stress_weight, "lr": 3e-3,
                  "lr_warmup_steps": 5, "lr_schedule": "constant", "ema_decay": None,
                  "early_stopping_patience": None},
        "trainer": {"max_epochs": 8, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                    "num_sanity_val_steps": 0},
        "run_dir": str(tmp_path / run),
    }
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _last_epoch(run_dir):
    import csv

    rows = {}
    with open(run_dir / "logs" / "csv" / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if value not in ("", None):
                    rows.setdefault(int(row["epoch"]), {})[key] = float(value)
    return rows[max(rows)], rows


def test_training_with_stress_weight_lowers_the_stress_error(stress_data, tmp_path, capsys):
    path, _ = stress_data
    for weight, run in ((3.0e4, "with"), (0.0, "without")):
        assert main(["train", str(_config(tmp_path, path, weight, run)), "--run-dir", str(tmp_path / run)]) == 0
    with_stress, history = _last_epoch(tmp_path / "with")
    without, history_without = _last_epoch(tmp_path / "without")
    # validation logs the stress error either way (the data have a stress); training only with the weight
    assert "val_stress_mae" in with_stress and "val_stress_mae" in without
    assert "train_stress_mae" in with_stress and "train_stress_mae" not in without
    # the stress error also falls without the term (the energy surface improves), later: compare
    # the whole learning curves and the last epoch
    curve = np.mean([row["val_stress_mae"] for row in history.values()])
    curve_without = np.mean([row["val_stress_mae"] for row in history_without.values()])
    assert curve < 0.75 * curve_without, (curve, curve_without)
    assert with_stress["val_stress_mae"] < without["val_stress_mae"]
    assert with_stress["val_stress_mae"] < 0.5 * history[min(history)]["val_stress_mae"]
    from PIL import Image

    curve = Image.open(tmp_path / "with" / "learning_curve.png").size  # force, energy, stress, lr panels
    assert curve[0] > 4.5 * curve[1]
    out = tmp_path / "eval"
    assert main(["evaluate", str(tmp_path / "with" / "model.pt"), "--data", str(tmp_path / "with.yaml"),
                 "--run", str(tmp_path / "with"), "--out", str(out), "--threads", "1"]) == 0
    table = (out / "errors.txt").read_text()
    assert "stress" in table and "meV/Å³" in table
    from PIL import Image

    width, height = Image.open(out / "parity.png").size  # energy, force and stress panels side by side
    assert width > 2.5 * height


def test_stress_weight_without_stress_data_is_one_line_error(tmp_path, shared_data, capsys):
    config = {
        "data": {"path": str(shared_data / "md17" / "md17_ethanol_xtb.npz"), "cache_dir": str(tmp_path / "cache"),
                 "train_size": 16, "val_size": 8, "test_size": 8, "batch_size": 8},
        "model": {"embedding_dimension": 8, "num_layers": 1, "num_heads": 2, "num_rbf": 4, "backend": "torch"},
        "train": {"stress_weight": 1.0},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False, "num_sanity_val_steps": 0},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["train", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # refused before the run starts (round 10: was at the first training step, the run folder written)
    assert len(err) == 1 and "config key 'train.stress_weight' is 1.0 but" in err[0] and "has no stress" in err[0], err
    assert not (tmp_path / "run").exists()


def test_data_cli_stress_key_reaches_the_reader(stress_data, tmp_path, capsys):
    import json

    path, _ = stress_data
    capsys.readouterr()
    assert main(["data", "info", str(path), "--json", "--cache-dir", str(tmp_path / "c")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "stress" in json.dumps(info)
    assert main(["data", "info", str(path), "--stress-key", "sigma", "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stress key 'sigma' (or a virial) not found in any frame" in err[0], err
