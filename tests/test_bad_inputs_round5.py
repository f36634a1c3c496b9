"""Bad inputs, round 5 (docs/bad_inputs.md, "Round 5"): round 4's leftovers and the Python API.

``torchmdx label``'s tblite options checked before tblite is needed, a NaN energy in an ASE
database named as such, ``Potential.predict``/``potential(list)`` with a structure without atoms
at the end of the list, analytic potentials built with NaN or text parameters, ``load_model`` of
something that is not a path, md's ``--minimize-steps``, and sweep points whose data are checked
(and named) before anything is written.

Table rows: a setup ``(tmp_path, shared_data) -> CLI arguments`` and the fragments the one
``error:`` line must hold; every file under ``tmp_path`` must come out unchanged. Each row was a
traceback, silently accepted, or said something else before (noted per row). Tests of behaviour
follow.
"""

from __future__ import annotations

import numpy as np
import pytest

from test_bad_inputs_more import ETHANOL, _config, _write_argon, refused_without_writes


def _water(t):
    from ase.build import molecule
    from ase.io import write

    write(t / "water.xyz", molecule("H2O"))
    return t / "water.xyz"


def _label(*options):
    """A setup: ``torchmdx label`` of one water molecule with ``options`` (tblite is not installed
    here: every row below said "--method gfn2-xtb needs the tblite package" instead)."""
    def setup(t, s):
        return ["label", _water(t), "-o", t / "out.extxyz", "--no-progress", *options]

    setup.__name__ = "label_" + "_".join(o.strip("-").replace("-", "_").replace(".", "p") for o in options)
    return setup


def label_tblite_option_with_a_model(t, s):
    # --charge 1 with a model: was ignored silently (the model takes no charge)
    from torchmdx.nn.analytic import LennardJones

    LennardJones(0.0104, 3.4).save(t / "lj.pt")
    return ["label", _water(t), "-o", t / "out.extxyz", "--method", f"model:{t / 'lj.pt'}", "--charge", "1",
            "--no-progress"]


def db_nan_energy_of_a_calculator(t, s):
    # SQLite stores a NaN energy as NULL: read back as "no energy 'energy' (keys: none; data: none)"
    import ase
    import ase.db
    from ase.calculators.singlepoint import SinglePointCalculator

    db = ase.db.connect(str(t / "frames.db"))
    for energy in (-1.0, float("nan")):
        atoms = ase.Atoms("H2", positions=[[0, 0, 0], [0.7, 0, 0]])
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=np.zeros((2, 3)))
        db.write(atoms)
    return ["data", "info", t / "frames.db", "--cache-dir", t / "cache"]


def md_minimize_negative_steps(t, s):
    # ran: the relaxation was skipped (no FIRE step) without a word
    from torchmdx.nn.analytic import LennardJones

    LennardJones(0.0104, 3.4).save(t / "lj.pt")
    return ["md", _write_argon(t), "--model", t / "lj.pt", "--minimize", "--minimize-steps", "-1", "--steps", "2",
            "--out", t / "md.extxyz", "--no-progress"]


def md_pressure_without_pbc(t, s):
    # said "got pbc=[np.False_, np.False_, np.False_]" (numpy 2's repr)
    from torchmdx.nn.analytic import LennardJones

    LennardJones(0.0104, 3.4).save(t / "lj.pt")
    return ["md", _write_argon(t), "--model", t / "lj.pt", "--engine", "ase", "--ensemble", "langevin",
            "--pressure", "1", "--steps", "2", "--out", t / "md.extxyz", "--no-progress"]


def sweep_grid_point_with_a_missing_data_file(t, s):
    # only the first point's data path was checked: the plan was written, the point failed when it trained
    return ["sweep", _config(t, s), "--grid", f"data.path={s.joinpath(*ETHANOL)},{t / 'missing.npz'}",
            "--out", t / "sweep", "--dry-run"]


CASES = [
    (_label("--charge", "nan"), ["--charge must be a finite number, got nan"]),
    (_label("--charge", "0.5"), ["--charge must be a whole number, got 0.5"]),
    (_label("--multiplicity", "0"), ["--multiplicity must be >= 1", "got 0"]),
    (_label("--accuracy", "0"), ["--accuracy must be > 0", "got 0.0"]),
    (_label("--accuracy", "inf"), ["--accuracy must be a finite number, got inf"]),
    (_label("--max-iterations", "0"), ["--max-iterations must be >= 1, got 0"]),
    (_label("--electronic-temperature", "-5"), ["--electronic-temperature must be > 0 K", "got -5.0"]),
    (_label("--electronic-temperature", "nan"), ["--electronic-temperature must be a finite number, got nan"]),
    (label_tblite_option_with_a_model, ["--charge sets tblite's calculation: it does not apply to --method model:"]),
    (db_nan_energy_of_a_calculator, ["frames.db: row 2: no energy 'energy', though the row was written with a "
                                     "calculator", "store a NaN energy as an empty value"]),
    (md_minimize_negative_steps, ["--minimize-steps must be >= 1 step (with --minimize), got -1"]),
    (md_pressure_without_pbc, ["periodic in x, y and z, got pbc=[False, False, False]"]),
    (sweep_grid_point_with_a_missing_data_file, ["sweep point (data.path=", "missing.npz: file not found"]),
]


@pytest.mark.parametrize("setup, fragments", CASES, ids=[c[0].__name__ for c in CASES])
def test_refused_with_one_line_and_nothing_written(tmp_path, shared_data, capsys, monkeypatch, setup, fragments):
    refused_without_writes(tmp_path, shared_data, capsys, monkeypatch, setup, fragments)


# ---------------------------------------------------------------------------------- label options
def test_label_options_in_range_still_reach_the_method_check(tmp_path, capsys, monkeypatch):
    """Valid tblite options pass the new checks: the next line is the missing-tblite one (or, with
    tblite installed, labelling starts); a model: method with no tblite option still labels."""
    from torchmdx.cli.main import main
    from torchmdx.md.label import LabelOptions, check_options

    check_options(LabelOptions(charge=-1, multiplicity=2, accuracy=0.1, max_iterations=10, electronic_temperature=1.0))
    check_options(LabelOptions(method="model:x.pt"))  # the defaults (None) are not "given"
    pytest.importorskip("ase")
    try:
        import tblite  # noqa: F401
    except ImportError:
        monkeypatch.chdir(tmp_path)
        rc = main(["label", str(_water(tmp_path)), "-o", "out.extxyz", "--charge", "0", "--multiplicity", "1",
                   "--no-progress"])
        assert rc == 2 and "needs the tblite package" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- predict on lists
def test_predict_keeps_a_structure_without_atoms_at_the_end(tmp_path):
    """[H2, empty] gave one energy and one forces array (B was read as batch.max() + 1): the
    empty structure at the end of the list was dropped. Reference: each structure alone."""
    import ase

    import torchmdx

    model = torchmdx.build_model({"embedding_dimension": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8,
                                  "cutoff_upper": 4.0, "seed": 3, "dtype": "float64"})
    h2 = ase.Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]], cell=[8, 8, 8], pbc=True)
    empty = ase.Atoms(cell=[8, 8, 8], pbc=True)
    alone = model.predict(h2, stress=True)
    out = model.predict([h2, empty], stress=True)
    assert out["energy"].shape == (2,) and len(out["forces"]) == 2 and out["stress"].shape == (2, 3, 3)
    np.testing.assert_allclose(out["energy"], [alone["energy"], 0.0], rtol=0, atol=1e-10)
    np.testing.assert_allclose(out["forces"][0], alone["forces"], rtol=0, atol=1e-10)
    assert out["forces"][1].shape == (0, 3)
    direct = model([h2, empty, empty], forces=False)
    assert tuple(direct["energy"].shape) == (3,)


# ---------------------------------------------------------------------------------- analytic potentials
@pytest.mark.parametrize("config, message", [
    ({"kind": "lennard_jones", "epsilon": "a", "sigma": 3.4}, "lennard_jones.epsilon must be a number, got 'a'"),
    ({"kind": "lennard_jones", "epsilon": float("nan"), "sigma": 3.4},
     "lennard_jones.epsilon must be a finite number, got nan"),
    ({"kind": "lennard_jones", "epsilon": {18: 0.01}, "sigma": {18: float("inf")}},
     r"lennard_jones.sigma\[18\] must be a finite number, got inf"),
    ({"kind": "lennard_jones", "epsilon": {1.5: 0.01}, "sigma": 3.4},
     "atomic number 1.5 is not between 1 and 118"),
    ({"kind": "lennard_jones", "epsilon": -0.01, "sigma": 3.4}, "lennard_jones.epsilon must be >= 0 eV, got -0.01"),
    ({"kind": "lennard_jones", "epsilon": 0.01, "sigma": 3.4, "cutoff": float("inf")},
     "lennard_jones: cutoff must be a finite number, got inf"),
    ({"kind": "morse", "depth": float("nan")}, "morse: depth must be a finite number, got nan"),
    ({"kind": "morse", "cutoff": -1.0}, "morse: cutoff must be > 0 Å, got -1"),
    ({"kind": "harmonic_bonds", "bonds": [[0, 1]], "r0": float("nan")},
     "harmonic_bonds: r0 must be a finite number, got nan"),
    ({"kind": "harmonic_bonds", "bonds": [[0, 1], [1, 2]], "r0": 1.0, "k": [1.0, 2.0, 3.0]},
     r"harmonic_bonds: k must be one number or one per bond \(2\), got 3"),
    ({"kind": "harmonic_bonds", "bonds": [[0, 1]], "r0": 1.5, "cutoff": 1.0},
     r"cutoff \(1 Å\) must be longer than the longest bond's r0 \(1.5 Å\)"),
])
def test_analytic_potentials_refuse_bad_parameters(config, message):
    """Were a ValueError traceback (text), NaN energies (NaN), a hydrogen parameter (1.5 -> 1),
    or a potential whose every bond lies beyond its cutoff (zero energy)."""
    import torchmdx
    from torchmdx.errors import ModelError

    with pytest.raises(ModelError, match=message):
        torchmdx.build_model(config)


def test_analytic_potentials_with_good_parameters_unchanged():
    """numpy and 0-d tensor parameters and string atomic numbers (as a YAML file gives them) pass;
    energies against the formula."""
    import ase
    import torch

    import torchmdx
    from torchmdx.nn.analytic import HarmonicBonds

    lj = torchmdx.build_model({"kind": "lennard_jones", "epsilon": {"18": np.float64(0.0104)}, "sigma": {18: 3.4},
                               "shift": "none"})
    r = 3.8
    atoms = ase.Atoms("Ar2", positions=[[0, 0, 0], [r, 0, 0]])
    expected = 4 * 0.0104 * ((3.4 / r) ** 12 - (3.4 / r) ** 6)
    assert lj.predict(atoms)["energy"] == pytest.approx(expected, rel=1e-5)
    bonds = HarmonicBonds([[0, 1]], r0=torch.tensor(1.0), k=np.float32(4.0))
    pair = ase.Atoms("H2", positions=[[0, 0, 0], [1.2, 0, 0]])
    assert bonds.predict(pair)["energy"] == pytest.approx(0.5 * 4.0 * 0.2 ** 2, rel=1e-5)


def test_load_model_of_something_not_a_path():
    """load_model(None) and load_model(5) were TypeError tracebacks (pathlib)."""
    import torchmdx
    from torchmdx.errors import ModelError

    for value in (None, 5, ""):
        with pytest.raises(ModelError, match="load_model: expected the path of a model file, got"):
            torchmdx.load_model(value)


# ---------------------------------------------------------------------------------- sweep
def test_sweep_point_too_large_for_the_data_is_named_and_nothing_written(tmp_path, shared_data, capsys, monkeypatch):
    """A grid point whose training set is larger than the data: the line named the data file only,
    and the sweep folder was left behind empty (made before the sizes were checked)."""
    from test_bad_inputs_md import one_error_line

    from torchmdx.cli.main import main

    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path, shared_data)
    rc = main(["sweep", str(config), "--grid", "data.train_size=8,100000", "--out", str(tmp_path / "sweep"),
               "--dry-run"])
    one_error_line(rc, capsys.readouterr(), ["sweep point (data.train_size=100000):",
                                             "is larger than the 2000 structures available"])
    assert not (tmp_path / "sweep").exists()
