"""Bad inputs, round 3 (docs/bad_inputs.md, "Round 3"): sweep, slmc, OpenMM export, data dtypes,
split-file scalars, md.atom_order and bench_accuracy.py report. Each row was a traceback or
silently wrong before; now one ``error:`` line, exit status 2 and nothing written.

Each row: a setup ``(tmp_path, shared_data) -> CLI arguments`` and the fragments the error line
must hold; every file under ``tmp_path`` must come out unchanged (bytes and modification time;
nothing added or removed). Python-API cases follow the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from torchmdx.cli.main import main

from test_bad_inputs_md import one_error_line, snapshot
from test_bad_inputs_more import (_config, _ethanol, _lj_and_argon, _npz, _split_file, _train_with_split,
                                  refused_without_writes)

ROOT = Path(__file__).resolve().parents[1]
ANI1X = ("ani", "ani1x_xtb.h5")


# ---------------------------------------------------------------------------------- sweep
def sweep_grid_key_under_run_dir(t, s):
    # run_dir.x was accepted and then overwritten by each point's own run folder: two identical trainings
    return ["sweep", _config(t, s), "--grid", "run_dir.x=1,2", "--out", t / "sweep", "--dry-run"]


def sweep_variant_name_not_text(t, s):
    values = yaml.safe_load(_config(t, s).read_text())
    values["sweep"] = {"variants": {1: {"model.num_layers": 2}}}  # TypeError traceback building the point id
    (t / "config.yaml").write_text(yaml.safe_dump(values))
    return ["sweep", t / "config.yaml", "--out", t / "sweep", "--dry-run"]


def sweep_devices_not_a_count(t, s):
    # int('abc') traceback after the plan and the splits were written
    return ["sweep", _config(t, s), "--grid", "model.num_layers=1,2", "--out", t / "sweep", "--devices", "abc"]


def sweep_devices_repeated(t, s):
    return ["sweep", _config(t, s), "--grid", "model.num_layers=1,2", "--out", t / "sweep", "--devices", "0,0"]


def sweep_out_under_a_file(t, s):
    (t / "file").write_text("a file\n")  # NotADirectoryError traceback from mkdir
    return ["sweep", _config(t, s), "--grid", "model.num_layers=1,2", "--out", t / "file" / "sweep", "--dry-run"]


def sweep_report_without_a_sweep(t, s):
    # made the folder, wrote a plan and splits, then said 'no finished points yet'
    return ["sweep", _config(t, s), "--out", t / "nothing_here", "--report"]


def train_run_dir_under_a_file(t, s):
    (t / "file").write_text("a file\n")
    return ["train", _config(t, s), "--run-dir", t / "file" / "run"]


# ---------------------------------------------------------------------------------- slmc
def _slmc_config(t, **changes):
    values = {"lattice": {"L": 4, "temperature": 0.1},
              "data": {"chains": 2, "thermalize_sweeps": 1, "sweeps": 4, "every": 1},
              "effective": {"layers": [1], "heads": 2, "epochs": 3, "batch_size": 4, "patience": 2},
              "slmc": {"chains": 2, "steps": 4}, "seed": 0, "threads": 1, "run_dir": str(t / "run")}
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        values[section][key] = value
    (t / "slmc.yaml").write_text(yaml.safe_dump(values))
    return t / "slmc.yaml"


def slmc_too_few_configurations(t, s):
    # 4 configurations: 3 fitted the 6 linear parameters exactly, 1 validated with rmse 0 by
    # construction; the run finished with beta*rmse 0.000 and acceptance 0
    return ["slmc", _slmc_config(t, data__chains=1), "--no-progress"]


def slmc_lattice_too_large_for_memory(t, s):
    # torch's allocator RuntimeError ("can't allocate memory") was a traceback
    return ["slmc", _slmc_config(t, lattice__L=1_000_000), "--no-progress"]


def slmc_resume_from_another_file(t, s):
    import torch

    (t / "run").mkdir()
    torch.save({"weights": torch.zeros(3)}, t / "run" / "checkpoint.pt")  # said 'data.chains ... started with None'
    return ["slmc", _slmc_config(t), "--no-progress", "--resume"]


# ---------------------------------------------------------------------------------- export --openmm
def _tiny_model(t):
    import torchmdx
    from torchmdx.nn.model_file import save_potential

    save_potential(torchmdx.build_model({"embedding_dimension": 8, "num_layers": 1, "num_heads": 2, "num_rbf": 4,
                                         "cutoff_upper": 4.0, "backend": "torch", "seed": 0}), t / "model.pt")
    (t / "water.xyz").write_text("3\nwater\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\n")
    return t / "model.pt"


def openmm_atoms_reversed_range(t, s):
    # '0,2-1' silently meant atom 0 only
    return ["export", "--openmm", _tiny_model(t), "-o", t / "out.pt", "--structure", t / "water.xyz", "--atoms", "0,2-1"]


def openmm_structure_is_a_folder(t, s):
    (t / "folder").mkdir()
    return ["export", "--openmm", _tiny_model(t), "-o", t / "out.pt", "--structure", t / "folder"]


# ---------------------------------------------------------------------------------- data dtypes
def extxyz_energy_true(t, s):
    text = ("2\nProperties=species:S:1:pos:R:3 energy=T\nH 0 0 0\nH 0.7 0 0\n"
            "2\nProperties=species:S:1:pos:R:3 energy=F\nH 0 0 0\nH 0.75 0 0\n")
    (t / "frames.extxyz").write_text(text)  # read as energies 1.0 and 0.0
    return ["data", "info", t / "frames.extxyz", "--cache-dir", t / "cache"]


def _ani1x(t, s, **changes):
    import h5py

    with h5py.File(s.joinpath(*ANI1X), "r") as source, h5py.File(t / "ani.h5", "w") as target:
        group = target.create_group("C2H4O")
        for key, value in source["C2H4O"].items():
            data = value[()]
            group.create_dataset(key, data=changes[key](data) if key in changes else data)
    return ["data", "info", t / "ani.h5", "--format", "ani1x", "--cache-dir", t / "cache"]


def ani1x_text_coordinates(t, s):
    return _ani1x(t, s, coordinates=lambda x: x.astype("S8"))  # numpy isfinite traceback


def ani1x_true_false_energies(t, s):
    return _ani1x(t, s, **{"gfn2xtb.energy": lambda e: e < 0})  # read as 1.0 Hartree each


def ani1x_compound_forces(t, s):
    def compound(f):
        return np.zeros(f.shape, dtype=[("x", "f8"), ("y", "f8")])

    return _ani1x(t, s, **{"gfn2xtb.forces": compound})  # numpy isnan traceback


def ani1x_true_false_atomic_numbers(t, s):
    return _ani1x(t, s, atomic_numbers=lambda z: z > 0)  # every atom hydrogen


def npz_true_false_energies(t, s):
    return ["data", "info", _npz(t, s, E=_ethanol(s)["E"] < 0), "--cache-dir", t / "cache"]


def npz_complex_forces(t, s):
    # the imaginary part was dropped
    return ["data", "info", _npz(t, s, F=_ethanol(s)["F"].astype(np.complex128) + 1j), "--cache-dir", t / "cache"]


def npz_text_positions(t, s):
    return ["data", "info", _npz(t, s, R=_ethanol(s)["R"].astype("U12")), "--cache-dir", t / "cache"]


def npz_true_false_atomic_numbers(t, s):
    return ["data", "info", _npz(t, s, z=_ethanol(s)["z"] > 0), "--cache-dir", t / "cache"]


split_n_structures_text = _train_with_split(n_structures=np.str_("ten"))      # int('ten') traceback
split_n_structures_array = _train_with_split(n_structures=np.array([1, 2]))   # int(array) traceback
split_seed_fraction = _train_with_split(seed=np.float64(0.5))                 # truncated to 0
split_n_structures_text.__name__ = "split_n_structures_text"
split_n_structures_array.__name__ = "split_n_structures_array"
split_seed_fraction.__name__ = "split_seed_fraction"


# ---------------------------------------------------------------------------------- md
def md_atom_order_with_ase_engine(t, s):
    # ASE's integrators keep the input order: the option was silently ignored
    return ["md", *_lj_and_argon(t), "--engine", "ase", "--atom-order", "hilbert", "--out", t / "a.extxyz"]


CASES = [
    (sweep_grid_key_under_run_dir, ["key 'run_dir.x' is set by the sweep itself"]),
    (sweep_variant_name_not_text, ["variant name 1 of 'sweep.variants' must be a non-empty text"]),
    (sweep_devices_not_a_count, ["--devices 'abc': give auto, a GPU count"]),
    (sweep_devices_repeated, ["--devices '0,0'", "distinct GPU ids"]),
    (sweep_out_under_a_file, ["sweep folder", "file is a file, not a folder"]),
    (sweep_report_without_a_sweep, ["nothing_here: no sweep here (no sweep.json)"]),
    (train_run_dir_under_a_file, ["run_dir", "file is a file, not a folder"]),
    (slmc_too_few_configurations, ["give 4 configurations: 3 to fit and 1 to validate", ">= 6 to fit",
                                   ">= 2 to validate"]),
    (slmc_lattice_too_large_for_memory, ["ran out of memory (one array of"]),
    (slmc_resume_from_another_file, ["checkpoint.pt: not a checkpoint of torchmdx slmc"]),
    (openmm_atoms_reversed_range, ["--atoms: range '2-1' is empty"]),
    (openmm_structure_is_a_folder, ["--structure:", "folder is a folder"]),
    (extxyz_energy_true, ["frames.extxyz: frame 0: energy True is not a number"]),
    (ani1x_text_coordinates, ["ani.h5:/C2H4O: 'coordinates' must be real numbers, got text values"]),
    (ani1x_true_false_energies, ["'gfn2xtb.energy' must be real numbers, got true/false values"]),
    (ani1x_compound_forces, ["'gfn2xtb.forces' must be real numbers, got compound values"]),
    (ani1x_true_false_atomic_numbers, ["'atomic_numbers' must be real numbers, got true/false values"]),
    (npz_true_false_energies, ["bad.npz: E must be real numbers, got true/false values"]),
    (npz_complex_forces, ["bad.npz: F must be real numbers, got complex values"]),
    (npz_text_positions, ["bad.npz: R must be real numbers, got text values"]),
    (npz_true_false_atomic_numbers, ["atomic numbers must be whole numbers, got bool values"]),
    (split_n_structures_text, ["split.npz: 'n_structures' is 'ten'", "expected one whole number"]),
    (split_n_structures_array, ["split.npz: 'n_structures' is an array of shape (2,)"]),
    (split_seed_fraction, ["split.npz: 'seed' is 0.5"]),
    (md_atom_order_with_ase_engine, ["--atom-order 'hilbert' needs the native engine"]),
]


@pytest.mark.parametrize("setup, fragments", CASES, ids=[c[0].__name__ for c in CASES])
def test_refused_with_one_line_and_nothing_written(tmp_path, shared_data, capsys, monkeypatch, setup, fragments):
    refused_without_writes(tmp_path, shared_data, capsys, monkeypatch, setup, fragments)


def test_whole_number_split_scalars_still_load(tmp_path):
    """The scalar check refuses only what is not one whole number: 20.0 (float) is 20 as before."""
    from torchmdx.data.splits import load_split

    path = _split_file(tmp_path, n_structures=np.float64(40.0), seed=np.int64(3))
    split = load_split(path, 40)
    assert split.n_structures == 40 and split.seed == 3 and split.sizes() == {"train": 16, "val": 8, "test": 8}


def test_slmc_smallest_allowed_data_runs(tmp_path, capsys):
    """The configuration-count check is exact: 8 configurations (6 to fit the 6 linear
    parameters of L = 4, 2 to validate) pass it and the study runs to its summary."""
    assert main(["slmc", str(_slmc_config(tmp_path)), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    fits = {m["name"]: m["fit"] for m in summary["models"]}
    assert set(fits) == {"linear", "transformer-1"}
    # 6 fitted, 2 held out: a real validation error, not the 0 of a single held-out configuration
    assert all(f["configurations"] == 8 and f["val_rmse"] > 0 for f in fits.values())


# ---------------------------------------------------------------------------------- OpenMM plug-in
def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)


def test_openmm_plugin_without_openmm_ml_says_what_to_install():
    """Without openmm-ml, importing the plug-in module is one OpenMMError naming the install
    command (was a bare ModuleNotFoundError)."""
    done = _python("import sys\nsys.modules['openmmml'] = None\n"
                   "from torchmdx.openmm.errors import OpenMMError\n"
                   "try:\n    import torchmdx.openmm.mlpotential\nexcept OpenMMError as exc:\n    print('ERR', exc)\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ERR openmm-ml is not installed") and "pip install 'torchmdx[openmm]'" in done.stdout


def test_openmm_plugin_imported_before_openmm_ml():
    """Importing the plug-in first made openmm-ml's entry-point loading find it half-initialised
    (AttributeError traceback); now the import gives the module openmm-ml registered."""
    pytest.importorskip("openmmml")
    done = _python("import sys\nimport torchmdx.openmm.mlpotential as m\n"
                   "from openmmml.mlpotential import MLPotential\n"
                   "print(m is sys.modules['torchmdx.openmm.mlpotential'], "
                   "type(MLPotential._implFactories['torchmdx']) is m.TorchmdxPotentialImplFactory)\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]


# ---------------------------------------------------------------------------------- bench_accuracy.py report


GOOD = {"side": "torchmdx", "data": "ethanol", "parameters": 10, "budget_s": 60.0, "sizes": [7, 5, 2],
        "points": [{"t": 10.0, "step": 5, "forces_mae": 50.0, "energy_mae": 5.0}]}

REPORT_CASES = [
    ([1, 2], "not a scores file of this benchmark"),                                 # AttributeError
    ({**GOOD, "points": [{"t": 1.0}]}, "point 0 needs numbers t, step (whole)"),     # KeyError
    ({**GOOD, "points": "abc"}, "'points' must be a list"),                          # TypeError
    ({**GOOD, "points": [{**GOOD["points"][0], "step": 5.5}]}, "point 0 needs numbers"),  # format-code ValueError
    ({**GOOD, "data": ["x"]}, "'data' must be a name"),                             # unhashable list
    ({**GOOD, "data": "../../outside"}, "must be a data set name, not a path"),     # png written outside --out
    ({**GOOD, "budget_s": "x"}, "'budget_s' must be a number or null"),            # TypeError
    ({**GOOD, "parameters": "many"}, "'parameters' must be a whole number or null"),
]


@pytest.mark.parametrize("scores, fragment", REPORT_CASES, ids=[c[1].split()[0] + str(i) for i, c in
                                                               enumerate(REPORT_CASES)])
def test_report_refuses_a_bad_scores_file(bench, tmp_path, capsys, scores, fragment):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "scores_torchmdx.json").write_text(json.dumps(scores))
    before = snapshot(tmp_path)
    one_error_line(bench.main(["report", str(tmp_path / "run")]), capsys.readouterr(), [fragment])
    assert snapshot(tmp_path) == before


def test_report_out_under_a_file(bench, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "scores_torchmdx.json").write_text(json.dumps(GOOD))
    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    one_error_line(bench.main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "file" / "x")]),
                   capsys.readouterr(), ["--out", "file is a file, not a folder"])
    assert snapshot(tmp_path) == before


def test_report_with_a_zero_reference_error_has_no_ratio(bench):
    """A reference run whose final force MAE is 0 (ZeroDivisionError before): the table is
    written, its ratio cells are '–', the other numbers are there."""
    ref = {**GOOD, "side": "torchmdnet", "label": "TorchMD-NET 3.0.0",
           "points": [{"t": 10.0, "step": 5, "forces_mae": 0.0, "energy_mae": 0.0}]}
    table, derived = bench.comparison({"torchmdnet": ref, "torchmdx": {**GOOD, "label": "torchmdx"}})
    assert "f_ratio" not in derived and "e_ratio" not in derived
    row = next(line for line in table.splitlines() if line.startswith("| final test force MAE"))
    assert row.split("|")[2:5] == [" 0.0 ", " 50.0 ", " – "]
