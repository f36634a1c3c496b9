"""`torchmdx data info / prepare`: summaries and every bad-input case of the issue.

Each bad input must give exit status 2, exactly one line `error: <file>: <problem>` on stderr, no
traceback, and no file written.
"""

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from torchmdx.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
KCAL = 0.0433641039  # eV per kcal/mol, by hand
HARTREE = 27.21138602  # eV per Hartree, by hand


def run_cli(capsys, *argv):
    code = main(["data", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code, out, err, expected):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0] == f"error: {expected}", lines[0]


# ------------------------------------------------------------------------------------------------
# summaries
def test_info_json_md17(shared_data, capsys, tmp_path):
    path = shared_data / "md17" / "md17_ethanol_xtb.npz"
    code, out, err = run_cli(capsys, "info", path, "--json", "--cache-dir", tmp_path)
    assert code == 0, err
    info = json.loads(out)
    raw = np.load(path)
    assert info["n_structures"] == 2000 and info["n_atoms"] == 18000 and info["elements"] == [1, 6, 8]
    assert info["energy_mean_eV"] == pytest.approx(raw["E"].mean() * KCAL, rel=1e-9)
    assert info["energy_std_eV"] == pytest.approx(raw["E"].std() * KCAL, rel=1e-9)
    assert info["force_rms_eV_per_A"] == pytest.approx(np.sqrt((raw["F"] ** 2).mean()) * KCAL, rel=1e-9)
    assert info["format"] == "md17" and info["groups"] is None
    assert list(tmp_path.iterdir()) == []  # info writes nothing


def test_info_text_ani1x_with_keys(shared_data, capsys):
    path = shared_data / "ani" / "ani1x_xtb.h5"
    code, out, err = run_cli(capsys, "info", path, "--format", "ani1x", "--energy-key", "gfn2xtb.energy",
                             "--forces-key", "gfn2xtb.forces")
    assert code == 0, err
    with h5py.File(path) as h5:
        n = sum(h5[g]["gfn2xtb.energy"].shape[0] for g in h5)
    assert f"structures   {n}" in out
    assert "elements     H (1) x2560, C (6) x920, N (7) x160, O (8) x400" in out
    assert "(key gfn2xtb.energy)" in out and "forces       rms" in out and "groups       15" in out


def test_info_json_polymers_groups(shared_data, capsys):
    code, out, err = run_cli(capsys, "info", shared_data / "polymer" / "polymers_xtb.extxyz", "--group-key", "polymer",
                             "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["n_structures"] == 900 and info["groups"] == {g: 150 for g in ["PE", "PEO", "PVC", "PVA", "PAN", "PMMA"]}
    assert info["elements"] == [1, 6, 7, 8, 17] and info["energy_per_atom_std_eV"] > 0


def test_info_and_prepare_with_config(shared_data, capsys, tmp_path):
    cache = tmp_path / "cache"
    config = tmp_path / "data.yaml"
    config.write_text(
        f"data:\n  path: {shared_data / 'polymer' / 'polymers_xtb.extxyz'}\n  group_key: polymer\n"
        f"  cache_dir: {cache}\n  split_by_group: false\n  test_groups: [PMMA]\n  train_size: 0.9\n"
        "  val_size: 0.1\n  seed: 5\nmodel:\n  cutoff: 5.0\n"
    )
    code, out, err = run_cli(capsys, "prepare", config)
    assert code == 0, err and out.startswith("cache written: ")
    built = Path(out.split(": ", 1)[1].strip())
    assert built.is_file() and built.parent == cache
    code, out, err = run_cli(capsys, "prepare", config)
    assert out.strip() == f"cache is current: {built}"
    code, out, err = run_cli(capsys, "info", config, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["cache"] == str(built)
    assert info["split"]["test"] == 150 and info["split"]["train"] == 675 and info["split"]["val"] == 75
    assert info["split"]["groups"]["test"] == ["PMMA"] and "PMMA" not in info["split"]["groups"]["train"]
    assert set(info["atomic_references_eV"]) == {"1", "6", "7", "8", "17"}
    code, out, err = run_cli(capsys, "info", config)
    assert "split        train 675, val 75, test 150; test groups: PMMA" in out


def test_subprocess_entry_point(shared_data, tmp_path):
    """The real command line: JSON on stdout; a mistake is one line on stderr, exit 2, no traceback."""
    ok = subprocess.run([sys.executable, str(ROOT / "cli.py"), "data", "info", "--json",
                         str(shared_data / "qm9" / "qm9_20.db")], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    info = json.loads(ok.stdout)
    assert info["n_structures"] == 20 and info["n_atoms"] == 135 and info["elements"] == [1, 6, 7, 8]
    assert info["force_rms_eV_per_A"] is None and info["extras"]["homo"] == "eV"
    bad = subprocess.run([sys.executable, str(ROOT / "cli.py"), "data", "info", str(tmp_path / "gone.npz")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == f"error: {tmp_path / 'gone.npz'}: file not found\n"


# ------------------------------------------------------------------------------------------------
# bad input, one case per line of the issue
def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _md17_arrays(n=10, natoms=3, seed=0):
    rng = np.random.default_rng(seed)
    return {"R": rng.normal(size=(n, natoms, 3)), "z": np.array([8, 1, 1][:natoms]),
            "E": rng.normal(size=(n, 1)) - 47000.0, "F": rng.normal(size=(n, natoms, 3))}


def test_missing_file(capsys, tmp_path):
    code, out, err = run_cli(capsys, "info", tmp_path / "nope.npz")
    assert_one_error_line(code, out, err, f"{tmp_path / 'nope.npz'}: file not found")
    code, out, err = run_cli(capsys, "info", tmp_path / "nope.yaml")
    assert_one_error_line(code, out, err, f"{tmp_path / 'nope.yaml'}: config file not found")


def test_unknown_format(shared_data, capsys):
    path = shared_data / "md17" / "md17_ethanol_xtb.npz"
    code, out, err = run_cli(capsys, "info", path, "--format", "xyz9")
    assert_one_error_line(code, out, err,
                          "unknown format 'xyz9'; known formats: md17, rmd17, md17-xyz, qm9, ani1, ani1x, ase, cache")


def test_npz_without_expected_keys(capsys, tmp_path):
    arrays = _md17_arrays()
    path = _npz(tmp_path / "partial.npz", R=arrays["R"], z=arrays["z"])
    code, out, err = run_cli(capsys, "info", path)
    assert_one_error_line(code, out, err, f"{path}: npz without the MD17 keys (R, z, E) or revised-MD17 keys "
                                          "(nuclear_charges, coords, energies); found: R, z")
    code, out, err = run_cli(capsys, "prepare", path, "--format", "md17", "--cache-dir", tmp_path / "c")
    assert_one_error_line(code, out, err, f"{path}: not in the sGDML/MD17 npz (R, z, E, F) layout: missing key(s) E; "
                                          "found: R, z")
    assert not (tmp_path / "c").exists() or list((tmp_path / "c").iterdir()) == []


def test_h5_without_expected_keys(shared_data, capsys, tmp_path):
    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as h5:
        h5["mol/coords"] = np.zeros((2, 3, 3))
        h5["mol/energy"] = np.zeros(2)
    code, out, err = run_cli(capsys, "info", path)
    assert_one_error_line(code, out, err, f"{path}: HDF5 file in neither the ANI-1 layout (coordinates, species, "
                                          "energies) nor the ANI-1x layout (coordinates, atomic_numbers, "
                                          "<method>.energy); datasets found: coords, energy")
    code, out, err = run_cli(capsys, "info", path, "--format", "ani1x")
    assert_one_error_line(code, out, err, f"{path}: not in the ANI-1x layout: no group holds both 'coordinates' and "
                                          "'atomic_numbers'; datasets found: coords, energy")
    ani1x = shared_data / "ani" / "ani1x_xtb.h5"
    code, out, err = run_cli(capsys, "info", ani1x, "--energy-key", "wb97x_dz.energy")
    assert_one_error_line(code, out, err, f"{ani1x}:/C2H3N: no 'wb97x_dz.energy' dataset; found: atomic_numbers, "
                                          "coordinates, gfn2xtb.energy, gfn2xtb.forces")


def test_shapes_disagree(capsys, tmp_path):
    arrays = _md17_arrays()
    arrays["E"] = arrays["E"][:9]
    path = _npz(tmp_path / "short.npz", **arrays)
    code, out, err = run_cli(capsys, "info", path)
    assert_one_error_line(code, out, err, f"{path}: E has shape (9, 1) but R has 10 frames; expected (10,) or (10, 1)")
    arrays = _md17_arrays()
    arrays["F"] = arrays["F"][:, :2]
    path = _npz(tmp_path / "forces.npz", **arrays)
    code, out, err = run_cli(capsys, "info", path)
    assert_one_error_line(code, out, err, f"{path}: F has shape (10, 2, 3) but R has shape (10, 3, 3)")
    # the revised-MD17 layout: the same checks, named with its own keys
    names = {"R": "coords", "z": "nuclear_charges", "E": "energies", "F": "forces"}
    for key, cut, expected in [
        ("E", lambda a: a[:9, 0], "energies has shape (9,) but coords has 10 frames; expected (10,) or (10, 1)"),
        ("F", lambda a: a[:, :2], "forces has shape (10, 2, 3) but coords has shape (10, 3, 3)"),
        ("z", lambda a: a[:2], "nuclear_charges has shape (2,) but coords has 3 atoms per frame"),
        ("R", lambda a: a[:, :, :2], "coords has shape (10, 3, 2), expected (frames, atoms, 3)"),
    ]:
        arrays = _md17_arrays()
        arrays[key] = cut(arrays[key])
        path = _npz(tmp_path / f"rmd17_{key}.npz", **{names[k]: v for k, v in arrays.items()})
        code, out, err = run_cli(capsys, "info", path)
        assert_one_error_line(code, out, err, f"{path}: {expected}")


def test_non_finite_values(capsys, tmp_path):
    arrays = _md17_arrays()
    arrays["R"][3, 2, 1] = np.nan
    path = _npz(tmp_path / "nan.npz", **arrays)
    cache = tmp_path / "cache"
    code, out, err = run_cli(capsys, "prepare", path, "--cache-dir", cache)
    assert_one_error_line(code, out, err, f"{path}: non-finite coordinates (nan) in structure 3 (atom 2)")
    assert not cache.exists() or list(cache.iterdir()) == []  # nothing half-written
    arrays = _md17_arrays()
    arrays["E"][5, 0] = np.inf
    path = _npz(tmp_path / "inf.npz", **arrays)
    code, out, err = run_cli(capsys, "info", path)
    assert_one_error_line(code, out, err, f"{path}: non-finite energy (inf) in structure 5")


def test_element_out_of_range(shared_data, capsys, tmp_path):
    arrays = _md17_arrays()
    arrays["z"] = np.array([8, 0, 1])
    path = _npz(tmp_path / "z0.npz", **arrays)
    code, out, err = run_cli(capsys, "info", path)
    assert_one_error_line(code, out, err, f"{path}: invalid atomic number 0 in structure 0 (atom 1); expected 1..118")
    config = tmp_path / "c.yaml"
    polymers = shared_data / "polymer" / "polymers_xtb.extxyz"
    config.write_text(f"data:\n  path: {polymers}\n  max_z: 17\n")  # 17 embedding rows: Z = 0..16
    code, out, err = run_cli(capsys, "info", config)
    assert_one_error_line(code, out, err, f"{polymers}: element Cl (Z=17) in structure 300 is beyond the model's "
                                          "range (max_z=17: atomic numbers below 17)")
    config.write_text(f"data:\n  path: {polymers}\n  max_z: 18\n  atomref: fit\n  train_size: 0.5\n")
    assert run_cli(capsys, "info", config)[0] == 0


def test_group_key_absent(shared_data, capsys):
    path = shared_data / "polymer" / "polymers_xtb.extxyz"
    code, out, err = run_cli(capsys, "info", path, "--group-key", "family")
    assert_one_error_line(code, out, err, f"{path}: frame 0: group key 'family' not found; keys present: polymer, "
                                          "smiles, theory")


def test_split_larger_than_data(shared_data, capsys, tmp_path):
    config = tmp_path / "c.yaml"
    path = shared_data / "md17" / "ethanol_snip.xyz"
    config.write_text(f"data:\n  path: {path}\n  train_size: 2\n  val_size: 1\n  test_size: 1\n")
    code, out, err = run_cli(capsys, "info", config)
    assert_one_error_line(code, out, err, f"{path}: split train 2 + val 1 + test 1 = 4 structures is larger than "
                                          "the 3 structures available")


def test_bad_config_key(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  path: x.npz\n  batch: 3\n")
    code, out, err = run_cli(capsys, "info", config)
    assert code == 2 and err.startswith("error: config key 'data.batch' does not exist")


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("data_*.yaml")), ids=lambda p: p.name)
def test_example_configs(config, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    code, out, err = run_cli(capsys, "info", config, "--json", "--cache-dir", tmp_path)
    assert code == 0, err
    info = json.loads(out)
    assert info["n_structures"] == sum(v for k, v in info["split"].items() if k in ("train", "val", "test", "unused"))
    assert info["split"]["train"] > 0 and info["atomic_references_eV"]


def test_units_that_cannot_be_determined(capsys, tmp_path):
    import ase.db
    from ase import Atoms

    path = tmp_path / "qm9_like.db"
    with ase.db.connect(path) as db:
        db.write(Atoms("CH4", positions=np.random.default_rng(0).normal(size=(5, 3))), data={"energy_U0": -40.5})
    code, out, err = run_cli(capsys, "info", path, "--format", "qm9")
    assert_one_error_line(code, out, err, f"{path}: the unit of 'energy_U0' cannot be determined (no "
                                          "_property_unit_dict in the metadata); pass energy_unit")
    code, out, err = run_cli(capsys, "info", path, "--format", "qm9", "--energy-unit", "Hartree", "--json")
    assert code == 0 and json.loads(out)["energy_mean_eV"] == pytest.approx(-40.5 * HARTREE, rel=1e-9)


def test_info_says_when_one_composition_cannot_separate_the_references(capsys, tmp_path):
    """MD17 ethanol frames all have C2H6O: one composition for 3 elements (rank 1); the ANI-1x
    sample has 15 formulas of H, C, N, O (every element determined: no note)."""
    code, out, err = run_cli(capsys, "info", ROOT / "configs" / "demo.yaml", "--cache-dir", tmp_path)
    assert code == 0, err
    note = [line for line in out.splitlines() if line.startswith("note")]
    assert len(note) == 1 and "1 composition(s) in the training split for 3 elements" in note[0]
    code, out, err = run_cli(capsys, "info", ROOT / "configs" / "data_ani1x.yaml", "--cache-dir", tmp_path)
    assert code == 0, err
    assert not [line for line in out.splitlines() if line.startswith("note")]
