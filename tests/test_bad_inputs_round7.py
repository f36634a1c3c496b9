"""Bad inputs, round 7: nothing lost, nothing silent.

Labels far beyond physical (an energy of 1e30 eV, a force of 1e10 eV/Å, one frame thousands of eV
off the rest: trained into NaN or garbage silently), per-structure labels that are not one value
(an extxyz group key ``polymer="1 2"`` became the group "[1 2]"; an energy of three numbers), the
electron count of ``torchmdx label`` frames against ``--charge`` / ``--multiplicity`` (tblite
stopped on the frame), and a sweep folder copied to another path (refused on resume: the plan's
split paths differ). DDP's loss normalisation is tested in tests/test_ddp_loss.py.

Table rows: a setup ``(tmp_path, shared_data) -> CLI arguments`` and the fragments the one
``error:`` line must hold; every file under ``tmp_path`` must come out unchanged (caches go to a
folder beside it). Tests of behaviour follow.
"""

from __future__ import annotations

import shutil
import sys
import types

import numpy as np
import pytest
import yaml
from ase import units as ase_units

from test_bad_inputs_more import _ethanol, refused_without_writes
from test_bad_inputs_md import one_error_line

#: the reference factors: ASE's (CODATA 2014), not torchmdx.units
KCAL_PER_MOL_IN_EV = ase_units.kcal / ase_units.mol
HARTREE_IN_EV = ase_units.Hartree


def _cache(t):
    return t.parent / (t.name + "-cache")  # outside the folder whose files must not change


def _train_config(t, data_path, **data):
    config = {"data": {"path": str(data_path), "cache_dir": str(_cache(t)), "train_size": 10, "val_size": 5,
                       "test_size": 5, "batch_size": 5, **data},
              "model": {"embedding_dimension": 8, "num_layers": 1, "num_heads": 2, "num_rbf": 4, "cutoff_upper": 4.0,
                        "backend": "torch"},
              "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
              "run_dir": str(t / "run")}
    (t / "config.yaml").write_text(yaml.safe_dump(config))
    return t / "config.yaml"


def _npz(t, s, name="bad.npz", **changes):
    arrays = {**_ethanol(s), **changes}
    np.savez(t / name, **arrays)
    return t / name


def _ethanol_extxyz(t, s, name="frames.extxyz", frames=20, change=None):
    """The ethanol frames in eV and eV/Å as extxyz; ``change(k, atoms)`` edits frame k."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    arrays = _ethanol(s, frames)
    images = []
    for k in range(frames):
        atoms = Atoms(numbers=arrays["z"], positions=arrays["R"][k])
        energy, forces = float(arrays["E"].reshape(-1)[k]) * KCAL_PER_MOL_IN_EV, arrays["F"][k] * KCAL_PER_MOL_IN_EV
        atoms.info["polymer"] = "PE"
        if change is not None:
            energy, forces = change(k, atoms, energy, forces.copy())
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        images.append(atoms)
    write(t / name, images, format="extxyz")
    return t / name


# ---------------------------------------------------------------------------------- absurd labels
def train_npz_energy_1e30(t, s):
    E = _ethanol(s)["E"].copy()
    E[5] = 1e30  # kcal/mol: trained into NaN
    return ["train", _train_config(t, _npz(t, s, E=E))]


def train_extxyz_force_1e10(t, s):
    def change(k, atoms, energy, forces):
        if k == 2:
            forces[4, 1] = 1e10
        return energy, forces
    return ["train", _train_config(t, _ethanol_extxyz(t, s, change=change))]


def train_extxyz_energy_far_from_the_rest(t, s):
    # 2000 eV more in frame 7 of 9-atom ethanol: 222 eV/atom off the per-element fit, under the
    # absolute bound (ten times Thomas-Fermi: 55 keV for ethanol's atoms)
    def change(k, atoms, energy, forces):
        return (energy + 2000.0 if k == 7 else energy), forces
    return ["train", _train_config(t, _ethanol_extxyz(t, s, change=change))]


# ---------------------------------------------------------------------------------- label shapes
def extxyz_group_label_of_two_numbers(t, s):
    def change(k, atoms, energy, forces):
        atoms.info["polymer"] = np.array([1, 2])  # written as polymer="1 2"; was the group "[1 2]"
        return energy, forces
    return ["data", "info", _ethanol_extxyz(t, s, change=change), "--group-key", "polymer",
            "--cache-dir", _cache(t)]


def extxyz_energy_of_three_numbers(t, s):
    path = _ethanol_extxyz(t, s)
    text = path.read_text().replace("energy=", "energy=\"1.0 2.0 3.0\" old_energy=", 1)
    path.write_text(text)
    return ["data", "info", path, "--cache-dir", _cache(t)]


def npz_energy_vector_per_frame(t, s):
    E = np.repeat(_ethanol(s)["E"].reshape(-1, 1), 3, axis=1)  # already one line (round 7 checked it)
    return ["data", "info", _npz(t, s, E=E), "--cache-dir", _cache(t)]


# ---------------------------------------------------------------------------------- label options
def label_fractional_charge(t, s):
    _ethanol_extxyz(t, s, frames=2)
    return ["label", t / "frames.extxyz", "-o", t / "out.extxyz", "--charge", "0.5"]


CASES = [
    (train_npz_energy_1e30, ["bad.npz: structure 5: energy 4.33641e+28 eV", "beyond any energy of its 9 atoms",
                             "set data.check_labels: false"]),
    (train_extxyz_force_1e10, ["frames.extxyz: structure 2 (atom 4): force", "10000000000.0",
                               "beyond the 1e+04 eV/Å", "data.check_labels: false"]),
    (train_extxyz_energy_far_from_the_rest, ["frames.extxyz: structure 7: energy", "from the dataset's "
                                                "per-element fit", "data.check_labels: false"]),
    (extxyz_group_label_of_two_numbers, ["frames.extxyz: frame 0: group key 'polymer' holds 2 values ([1, 2])",
                                         "expected one name or number per structure"]),
    (extxyz_energy_of_three_numbers, ["frames.extxyz: frame 0: energy 'energy' holds 3 values ([1.0, 2.0, 3.0])",
                                      "expected one number per frame"]),
    (npz_energy_vector_per_frame, ["bad.npz: E has shape (20, 3)", "expected (20,) or (20, 1)"]),
    (label_fractional_charge, ["--charge must be a whole number, got 0.5 (an integer is expected)"]),
]


@pytest.mark.parametrize("setup, fragments", CASES, ids=[c[0].__name__ for c in CASES])
def test_refused_with_one_line_and_nothing_written(tmp_path, shared_data, capsys, monkeypatch, setup, fragments):
    refused_without_writes(tmp_path, shared_data, capsys, monkeypatch, setup, fragments)


# ---------------------------------------------------------------------------------- behaviour: labels
def test_data_info_prints_the_summary_and_the_label_problem(tmp_path, shared_data, capsys):
    """``torchmdx data info`` shows what training would refuse: the summary on stdout, then the
    label check's one line on stderr, exit status 1; sound data: no such line, status 0."""
    from torchmdx.cli.main import main

    E = _ethanol(shared_data)["E"].copy()
    E[5] = 1e30
    bad = _npz(tmp_path, shared_data, E=E)
    good = _npz(tmp_path, shared_data, name="good.npz")
    assert main(["data", "info", str(bad), "--cache-dir", str(_cache(tmp_path))]) == 1
    out, err = capsys.readouterr()
    assert "structures" in out.lower() and err.count("\n") == 1
    assert err.startswith("error: ") and "bad.npz: structure 5: energy 4.33641e+28 eV" in err, err
    assert main(["data", "info", str(good), "--cache-dir", str(_cache(tmp_path))]) == 0
    out, err = capsys.readouterr()
    assert "error" not in err and "structures" in out.lower()


def test_label_limits_against_hand_computed_bounds():
    """The force limit is 1e4 eV/Å per component; the energy bound of a structure is ten times
    the Thomas-Fermi energy of its atoms, 10 * 0.7687 * Σ Z^(7/3) Hartree (computed here with
    ASE's Hartree): for H2 418.4 eV. Just inside passes, just outside is named."""
    from torchmdx.data.label_check import check_labels, energy_bounds
    from torchmdx.data.structures import Structures
    from torchmdx.errors import DataError

    bound_h2 = 10 * 0.7687 * 2 * HARTREE_IN_EV
    bound_water = 10 * 0.7687 * (8 ** (7 / 3) + 2) * HARTREE_IN_EV

    def structures(energy, force):
        z = np.array([1, 1, 8, 1, 1, 1, 1])
        pos = np.array([[0, 0, 0], [0, 0, 0.74], [5, 0, 0], [5.96, 0, 0], [5, 0.96, 0], [9, 0, 0], [9, 0, 0.74]], float)
        forces = np.zeros((7, 3))
        forces[3, 2] = force
        return Structures(z=z, pos=pos, energy=np.array(energy, dtype=float), offsets=np.array([0, 2, 5, 7]),
                          forces=forces, metadata={"source": "x.extxyz"})

    assert energy_bounds(structures([-1.0, -2, -1], 0.0)) == pytest.approx([bound_h2, bound_water, bound_h2], rel=1e-6)
    check_labels(structures([-0.999 * bound_h2, -2.0, -1.0], 9.9e3))
    with pytest.raises(DataError, match=r"x.extxyz: structure 0: energy .* beyond any energy of its 2 atoms"):
        check_labels(structures([-1.001 * bound_h2, -2.0, -1.0], 0.0))
    with pytest.raises(DataError, match=r"x.extxyz: structure 1 \(atom 1\): force \[0.0, 0.0, -10100.0\]"):
        check_labels(structures([-1.0, -2.0, -1.0], -1.01e4))


def test_check_labels_false_trains_on_the_same_data(tmp_path, shared_data):
    """``data.check_labels: false`` sets up (references, statistics) the data that are refused
    otherwise; the default (null) and true check."""
    from torchmdx.data.datamodule import TorchmdxDataModule
    from torchmdx.errors import DataError

    E = _ethanol(shared_data)["E"].copy()
    E[5] = 1e6  # kcal/mol, 43 keV: within float range, far beyond physical
    path = _npz(tmp_path, shared_data, E=E)
    config = {"path": str(path), "cache_dir": str(tmp_path / "cache"), "train_size": 10, "val_size": 5, "test_size": 5}
    for value in (None, True):
        with pytest.raises(DataError, match="structure 5: energy"):
            TorchmdxDataModule({**config, "check_labels": value}).setup("fit")
    module = TorchmdxDataModule({**config, "check_labels": False})
    module.setup("fit")
    assert float(module.dataset.structures.energy[5]) == pytest.approx(1e6 * KCAL_PER_MOL_IN_EV, rel=1e-9)


@pytest.mark.parametrize("parts", [("md17", "md17_ethanol_xtb.npz"), ("md17", "md17_aspirin_xtb.npz"),
                                   ("polymer", "polymers_xtb.extxyz"), ("qm9", "qm9_20.db"),
                                   ("ani", "ani1x_xtb.h5")])
def test_shared_datasets_pass_the_label_check(shared_data, parts):
    """No real dataset of the project is refused (molecules, polymers with isolated atoms, QM9
    total energies, ANI-1x off-equilibrium conformations)."""
    from torchmdx.data import read_structures
    from torchmdx.data.label_check import check_labels

    check_labels(read_structures(shared_data.joinpath(*parts)))


def test_group_label_of_several_values_is_refused_in_the_builder():
    from torchmdx.data.structures import StructureBuilder
    from torchmdx.errors import DataError

    builder = StructureBuilder("api")
    builder.add([1, 1], [[0, 0, 0], [0, 0, 0.74]], [-1.0], group="H2")
    builder.add([1, 1], [[0, 0, 0], [0, 0, 0.75]], [-1.0], group=7)
    with pytest.raises(DataError, match=r"api: group label \[1, 2\] holds 2 values"):
        builder.add([1, 1], [[0, 0, 0], [0, 0, 0.76]], [-1.0], group=np.array([1, 2]))
    assert builder.group_names == ["H2", "7"]


# ---------------------------------------------------------------------------------- behaviour: label
@pytest.fixture
def fake_tblite(monkeypatch):
    """A stand-in ``tblite.ase`` whose calculator records the frames it is asked to label (tblite
    is not installed here): the electron check must stop a bad frame before it."""
    calls = []

    class TBLite:
        def __init__(self, **kwargs):
            calls.append(kwargs)
            raise RuntimeError("fake tblite: must not be reached for a refused frame")

    package, module = types.ModuleType("tblite"), types.ModuleType("tblite.ase")
    module.TBLite = TBLite
    package.ase = module
    monkeypatch.setitem(sys.modules, "tblite", package)
    monkeypatch.setitem(sys.modules, "tblite.ase", module)
    return calls


def _molecules(t, *specs):
    from ase import Atoms
    from ase.io import write

    images = []
    for symbols, info in specs:
        atoms = Atoms(symbols, positions=[[1.1 * k, 0.3 * k, 0] for k in range(len(symbols))])
        atoms.info.update(info)
        images.append(atoms)
    write(t / "in.extxyz", images, format="extxyz")
    return t / "in.extxyz"


@pytest.mark.parametrize("specs, options, fragments", [
    # water with charge +1 and a singlet: 9 electrons
    ([("OH2", {})], ["--charge", "1", "--multiplicity", "1"],
     ["frame 0 (in.extxyz:0): 9 electrons (atomic numbers add up to 10, charge 1 from --charge)",
      "cannot have multiplicity 1", "an odd count needs an even"]),
    # the second frame's own multiplicity (a hydrogen atom as a triplet)
    ([("OH2", {}), ("H", {"multiplicity": 3})], ["--multiplicity", "2"],
     ["frame 0 (in.extxyz:0): 10 electrons"]),
    ([("OH2", {"multiplicity": 1}), ("H", {"multiplicity": 3})], [],
     ["frame 1 (in.extxyz:1): 1 electrons", "cannot have multiplicity 3 (from atoms.info['multiplicity'])"]),
    ([("H", {})], ["--charge", "3"], ["frame 0 (in.extxyz:0): -2 electrons", "cannot exceed the nuclear charge"]),
], ids=["odd_singlet", "even_doublet", "info_triplet_of_one_electron", "negative_count"])
def test_label_electron_count_against_multiplicity(tmp_path, capsys, fake_tblite, specs, options, fragments):
    from torchmdx.cli.main import main

    path = _molecules(tmp_path, *specs)
    capsys.readouterr()
    one_error_line(main(["label", str(path), "-o", str(tmp_path / "out.extxyz"), "--no-progress", *options]),
                   capsys.readouterr(), fragments)
    assert fake_tblite == [] and not (tmp_path / "out.extxyz").exists()
    assert not (tmp_path / "out.extxyz.partial").exists()


def test_label_consistent_electron_counts_reach_tblite(tmp_path):
    """Water singlet, OH doublet, O2 triplet, H+ (no electrons, singlet), a frame without a
    multiplicity: accepted; a lanthanide (f electrons in xTB's core) is left to tblite."""
    from torchmdx.md.label import LabelOptions, check_electrons
    from ase import Atoms

    frames = [Atoms("OH2"), Atoms("OH", info={"multiplicity": 2}), Atoms("O2", info={"multiplicity": 3}),
              Atoms("H", info={"charge": 1, "multiplicity": 1}), Atoms("NO"), Atoms("CeO", info={"multiplicity": 1})]
    check_electrons(frames, LabelOptions())
    check_electrons([Atoms("OH2")], LabelOptions(charge=2, multiplicity=3))


# ---------------------------------------------------------------------------------- behaviour: sweep
def _sweep_config(t, s):
    config = {"data": {"path": str(s / "md17" / "md17_ethanol_xtb.npz"), "train_size": 8, "val_size": 8,
                       "test_size": 8, "batch_size": 8, "cache_dir": str(t / "cache")},
              "model": {"architecture": "transformer", "embedding_dimension": 8, "num_layers": 1, "num_heads": 2,
                        "num_rbf": 4, "bias_hidden": 8, "cutoff_upper": 4.0},
              "train": {"lr": 1e-3, "lr_warmup_steps": 2, "early_stopping_patience": None},
              "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False,
                          "num_sanity_val_steps": 0}}
    (t / "sweep.yaml").write_text(yaml.safe_dump(config))
    return t / "sweep.yaml"


def test_copied_sweep_folder_resumes_and_a_changed_split_is_one_line(tmp_path, shared_data, capsys, monkeypatch):
    """A sweep folder A whose point was interrupted after its checkpoint, copied to B: `sweep
    --out B` resumed nothing ("--resume: config key 'data.split_file' is '.../B/splits/...' but the
    run ... was started with '.../A/splits/...'"). Now the split files are compared by content:
    B's point continues from its checkpoint (one note line); a B whose split file holds other
    indices is one line saying to delete the point's run."""
    from torchmdx.cli.main import main
    from torchmdx.data.splits import load_split, save_split
    from torchmdx.train import run as run_module
    from torchmdx.train.sweep import RESULT, RUNS, SPLITS

    config = _sweep_config(tmp_path, shared_data)
    assert main(["sweep", str(config), "--out", str(tmp_path / "A")]) == 0
    (point,) = [p.name for p in (tmp_path / "A" / RUNS).iterdir()]
    (tmp_path / "A" / RUNS / point / RESULT).unlink()  # killed after its checkpoint
    shutil.copytree(tmp_path / "A", tmp_path / "B")
    shutil.copytree(tmp_path / "A", tmp_path / "C")
    shutil.rmtree(tmp_path / "A")  # moved, not only copied

    trained = []
    original = run_module.train

    def counting(cfg, resume=False, callbacks=None):
        trained.append((str(cfg.run_dir), resume))
        return original(cfg, resume=resume, callbacks=callbacks)

    monkeypatch.setattr(run_module, "train", counting)
    capsys.readouterr()
    assert main(["sweep", str(config), "--out", str(tmp_path / "B")]) == 0
    out = capsys.readouterr().out
    assert trained == [(str(tmp_path / "B" / RUNS / point), True)]
    assert f"note: sweep point {point}: its run was started with data.split_file {tmp_path / 'A'}" in out
    assert (tmp_path / "B" / RUNS / point / RESULT).is_file()
    saved = yaml.safe_load((tmp_path / "B" / RUNS / point / "config.resolved.yaml").read_text())
    assert saved["data"]["split_file"] == str(tmp_path / "B" / SPLITS / "train_8.npz")

    # C's split file holds another training set than the run trained on
    split_path = tmp_path / "C" / SPLITS / "train_8.npz"
    split = load_split(split_path)
    split.train = np.sort(np.r_[split.train[1:], np.setdiff1d(np.arange(split.n_structures),
                                                              np.r_[split.train, split.val, split.test])[:1]])
    save_split(split, split_path)
    trained.clear()
    capsys.readouterr()
    line = one_error_line(main(["sweep", str(config), "--out", str(tmp_path / "C")]), capsys.readouterr(),
                          [f"sweep point {point}: its run in {tmp_path / 'C' / RUNS / point} trained on another split",
                           "the train indices differ", f"delete {tmp_path / 'C' / RUNS / point} to train the point"])
    assert trained == [] and line
