"""``torchmdx evaluate``: error table, JSON, parity plot and learning curve; the numbers are
checked against predictions made through a different path (ASE Atoms -> Potential.predict)."""

import json

import numpy as np
import pytest
import yaml

from torchmdx.cli.main import main




@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_data):
    base = tmp_path_factory.mktemp("evaluate")
    config = {
        "data": {"path": str(shared_data / "md17" / "md17_ethanol_xtb.npz"), "cache_dir": str(base / "cache"),
                 "train_size": 32, "val_size": 8, "test_size": 12, "batch_size": 8},
        "model": {"embedding_dimension": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8, "cutoff_upper": 4.0,
                  "backend": "torch", "seed": 0},
        "train": {"lr": 1e-3, "lr_warmup_steps": 2},
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                    "num_sanity_val_steps": 0},
        "run_dir": str(base / "run"),
    }
    (base / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(base / "config.yaml")]) == 0
    return {"config": base / "config.yaml", "run_dir": base / "run"}


def _png_shape(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path).shape


def test_evaluate_test_split_writes_table_json_and_plots(run, tmp_path, capsys):
    from torchmdx.data import H5Dataset, load_split
    from torchmdx.nn.model_file import load_model

    out = tmp_path / "eval"
    model_path = run["run_dir"] / "model.pt"
    rc = main(["evaluate", str(model_path), "--data", str(run["config"]), "--run", str(run["run_dir"]),
               "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "quantity" in printed and "energy per atom" in printed and "meV/Å" in printed
    report = json.loads((out / "errors.json").read_text())
    assert report["split"] == "test" and report["metrics"]["n_structures"] == 12
    assert report["units"] == {"energy": "meV", "energy_per_atom": "meV/atom", "forces": "meV/Å"}
    # independent: the run's test indices, structures as ASE Atoms, Potential.predict
    split = load_split(run["run_dir"] / "splits.npz")
    cache = json.loads((run["run_dir"] / "data_summary.json").read_text())["cache"]
    dataset = H5Dataset(cache)
    model = load_model(model_path)
    e_err, f_err, per_atom = [], [], []
    for i in split.test:
        atoms = dataset.to_atoms(int(i))
        p = model.predict(atoms)
        e_err.append(p["energy"] - atoms.get_potential_energy())
        per_atom.append(e_err[-1] / len(atoms))
        f_err.append(p["forces"] - atoms.get_forces())
    e_err, per_atom, f_err = np.array(e_err), np.array(per_atom), np.concatenate(f_err)
    metrics = report["metrics"]
    assert metrics["energy_mae"] == pytest.approx(1000 * np.abs(e_err).mean(), rel=1e-5)
    assert metrics["energy_rmse"] == pytest.approx(1000 * np.sqrt((e_err ** 2).mean()), rel=1e-5)
    assert metrics["energy_per_atom_mae"] == pytest.approx(1000 * np.abs(per_atom).mean(), rel=1e-5)
    assert metrics["forces_mae"] == pytest.approx(1000 * np.abs(f_err).mean(), rel=1e-4)
    assert metrics["forces_rmse"] == pytest.approx(1000 * np.sqrt((f_err ** 2).mean()), rel=1e-4)
    table = (out / "errors.txt").read_text()
    assert f"{metrics['forces_mae']:.4f}" in table and "(12 structures, 108 atoms)" in table
    height, width, _ = _png_shape(out / "parity.png")
    assert width > 2 * height * 0.8  # two panels side by side
    assert _png_shape(out / "learning_curve.png")[0] > 100


def test_evaluate_a_data_file_and_other_splits(run, tmp_path, shared_data, capsys):
    model_path = run["run_dir"] / "model.pt"
    # a plain MD17 xyz file (3 DFT frames): every structure
    rc = main(["evaluate", str(model_path), "--data", str(shared_data / "md17" / "ethanol_snip.xyz"),
               "--out", str(tmp_path / "snip"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "snip" / "errors.json").read_text())
    assert report["split"] == "all" and report["metrics"]["n_structures"] == 3
    # the validation split of the config, read from the run folder
    rc = main(["evaluate", str(model_path), "--data", str(run["config"]), "--split", "val",
               "--out", str(tmp_path / "val"), "--no-progress"])
    assert rc == 0
    assert json.loads((tmp_path / "val" / "errors.json").read_text())["metrics"]["n_structures"] == 8
    capsys.readouterr()


def test_evaluate_errors_are_one_line(run, tmp_path, shared_data, capsys):
    model_path = run["run_dir"] / "model.pt"
    cases = [
        (["--data", str(shared_data / "md17" / "ethanol_snip.xyz"), "--split", "test"], "needs --run RUN_DIR"),
        (["--data", str(tmp_path / "none.extxyz")], "none.extxyz: file not found"),
        # polymers contain N and Cl, which the ethanol model has never seen
        (["--data", str(shared_data / "polymer" / "polymers_xtb.extxyz")], "which this model does not know"),
    ]
    for extra, expected in cases:
        assert main(["evaluate", str(model_path), *extra, "--out", str(tmp_path / "x"), "--cache-dir",
                     str(tmp_path / "cache"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1, err
    assert main(["evaluate", str(tmp_path / "missing.pt"), "--data", str(run["config"])]) == 2
    assert "missing.pt: model file not found" in capsys.readouterr().err
