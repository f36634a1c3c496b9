"""Bad inputs, round 6: nothing lost, nothing silent.

sGDML npz files that name their own units (``e_unit`` / ``r_unit``: an npz in eV was read as
kcal/mol), a NaN among an ANI-1x conformation's computed forces (dropped as "not computed"),
``evaluate --run`` naming a folder without the run's split (the split was drawn again), export
options that apply to ``--openmm`` only (``--dtype float64`` wrote a float32 model file), ``label``
continuing a partial file of another method (mixed labels) or a damaged one (traceback), ``md
--index`` before the first frame (ASE read frame 0), damaged sweep plan/result files (JSON
tracebacks), and in the Python API model files with malformed header fields (tracebacks), NaN
normalisation buffers (NaN energies, silently), ``load_model(dtype=torch.int32/float16)`` and
``Calculator(cuda_graph="no")`` (``bool("no")`` is True), ``torchmdx evaluate`` of an analytic
potential (StopIteration), ``train --resume`` with a damaged ``config.resolved.yaml`` (traceback)
and a copied run folder resumed (model.pt exported from the other folder's best checkpoint).

Table rows: a setup ``(tmp_path, shared_data) -> CLI arguments`` and the fragments the one
``error:`` line must hold; every file under ``tmp_path`` must come out unchanged. Each row was a
traceback or silently wrong before (noted per row). Tests of behaviour follow.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from ase import units as ase_units

from test_bad_inputs_more import _config, _ethanol, refused_without_writes

ANI1X = ("ani", "ani1x_xtb.h5")

#: the reference factors: ASE's (CODATA 2014), not torchmdx.units
KCAL_PER_MOL_IN_EV = ase_units.kcal / ase_units.mol
BOHR_IN_ANGSTROM = ase_units.Bohr


def _sgdml_npz(t, s, name="units.npz", **extra):
    arrays = _ethanol(s, frames=10)
    np.savez(t / name, **arrays, **{k: np.array(v) for k, v in extra.items()})
    return t / name


def _lj(t, name="lj.pt", epsilon=0.0104):
    from torchmdx.nn.analytic import LennardJones

    LennardJones(epsilon, 3.4).save(t / name)
    return t / name


# ---------------------------------------------------------------------------------- npz units
def npz_unknown_energy_unit(t, s):
    # the key was ignored: read as kcal/mol
    return ["data", "info", _sgdml_npz(t, s, e_unit="bananas"), "--cache-dir", t / "cache"]


def npz_energy_unit_option_disagrees_with_the_file(t, s):
    # the option won silently over the file's own 'eV'
    return ["data", "info", _sgdml_npz(t, s, e_unit="eV"), "--energy-unit", "kcal/mol", "--cache-dir", t / "cache"]


def npz_unit_not_text(t, s):
    return ["data", "info", _sgdml_npz(t, s, r_unit=1.0), "--cache-dir", t / "cache"]


# ---------------------------------------------------------------------------------- ANI-1x
def ani1x_nan_among_computed_forces(t, s):
    # conformation 3 was dropped and counted as "without gfn2xtb.forces"
    import h5py

    with h5py.File(s.joinpath(*ANI1X), "r") as source, h5py.File(t / "ani.h5", "w") as target:
        group = target.create_group("C2H4O")
        for key, value in source["C2H4O"].items():
            data = value[()]
            if key == "gfn2xtb.forces":
                data[3, 2, 1] = np.nan
            group.create_dataset(key, data=data)
    return ["data", "info", t / "ani.h5", "--format", "ani1x", "--cache-dir", t / "cache"]


# ---------------------------------------------------------------------------------- evaluate
def evaluate_run_folder_missing(t, s):
    # evaluated on a split drawn again from data.seed, exit 0
    return ["evaluate", _lj(t), "--data", _config(t, s), "--run", t / "runs" / "typo", "--out", t / "report"]


def evaluate_run_folder_without_split(t, s):
    (t / "not_a_run").mkdir()
    return ["evaluate", _lj(t), "--data", _config(t, s), "--run", t / "not_a_run", "--out", t / "report"]


# ---------------------------------------------------------------------------------- export
def _checkpoint(t):
    import torchmdx

    model = torchmdx.build_model({"embedding_dimension": 8, "num_layers": 1, "num_heads": 2, "num_rbf": 4,
                                  "cutoff_upper": 4.0, "backend": "torch", "seed": 0})
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model": model.hparams()}}, t / "last.ckpt")
    return t / "last.ckpt"


def export_dtype_without_openmm(t, s):
    # wrote a float32 model file, exit 0
    return ["export", _checkpoint(t), "-o", t / "model.pt", "--dtype", "float64"]


def export_atoms_without_openmm(t, s):
    (t / "water.xyz").write_text("3\nwater\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\n")
    return ["export", _checkpoint(t), "-o", t / "model.pt", "--structure", t / "water.xyz", "--atoms", "0-1"]


# ---------------------------------------------------------------------------------- label
def _argon_frames(t, count=4):
    from ase.cluster import Icosahedron
    from ase.io import write

    frames = []
    for k in range(count):
        atoms = Icosahedron("Ar", 2)
        atoms.positions *= 1 + 0.01 * k
        frames.append(atoms)
    write(t / "frames.extxyz", frames)
    return t / "frames.extxyz"


def _partial(t, text):
    (t / "out.extxyz.partial").write_bytes(text)
    return ["label", _argon_frames(t), "--method", f"model:{_lj(t, 'lj2.pt', 0.02)}", "-o", t / "out.extxyz",
            "--no-progress"]


def label_continues_a_partial_file_of_another_method(t, s):
    # the first two frames kept model:lj.pt's labels, the rest got lj2.pt's: one file, two methods
    from torchmdx.cli.main import main

    frames = _argon_frames(t)
    assert main(["label", str(frames), "--method", f"model:{_lj(t)}", "-o", str(t / "first.extxyz"),
                 "--no-progress"]) == 0
    lines = (t / "first.extxyz").read_text().splitlines(keepends=True)
    text = "".join(lines[:2 * (int(lines[0]) + 2)]).encode()
    (t / "first.extxyz").unlink()
    return _partial(t, text)


def label_partial_file_not_text(t, s):
    return _partial(t, b"\xff\xfe\x00 not text\n")  # UnicodeDecodeError traceback


def label_partial_file_with_a_damaged_frame(t, s):
    return _partial(t, b"1\nProperties=species:S:1:pos:R:3 label_index=0\nAr 0 x 0\n")  # ASE's ValueError traceback


# ---------------------------------------------------------------------------------- md
def md_index_before_the_first_frame(t, s):
    # ASE reads -9 of 4 frames as frame 0: the run started from the wrong structure, exit 0
    return ["md", _argon_frames(t), "--model", _lj(t), "--index", "-9", "--steps", 2, "--out", t / "md.extxyz",
            "--no-progress"]


def md_empty_structure_name(t, s):
    # an empty name in a config (structure: '') or on the command line said ".: structure file not found"
    return ["md", "", "--model", _lj(t), "--steps", 2, "--out", t / "md.extxyz", "--no-progress"]


# ---------------------------------------------------------------------------------- sweep
def _dry_sweep(t, s):
    from torchmdx.cli.main import main

    config = _config(t, s)
    assert main(["sweep", str(config), "--grid", "model.num_layers=1,2", "--out", str(t / "sweep"), "--dry-run"]) == 0
    return config


def sweep_report_with_a_damaged_result(t, s):
    # a result file emptied by a crash (or cut short by a copy): JSONDecodeError traceback
    config = _dry_sweep(t, s)
    point = json.loads((t / "sweep" / "sweep.json").read_text())["points"][0]["id"]
    (t / "sweep" / "runs" / point).mkdir(parents=True)
    (t / "sweep" / "runs" / point / "sweep_result.json").write_text('{"point": ')
    return ["sweep", config, "--grid", "model.num_layers=1,2", "--out", t / "sweep", "--report"]


def sweep_with_a_damaged_plan(t, s):
    config = _dry_sweep(t, s)
    (t / "sweep" / "sweep.json").write_text("")  # JSONDecodeError traceback
    return ["sweep", config, "--grid", "model.num_layers=1,2", "--out", t / "sweep", "--report"]


CASES = [
    (npz_unknown_energy_unit, ["units.npz: e_unit 'bananas' is not an energy unit torchmdx knows",
                               "set data.energy_unit (--energy-unit)"]),
    (npz_energy_unit_option_disagrees_with_the_file, ["units.npz: the file says its energy unit is 'eV' (e_unit), "
                                                      "but energy_unit 'kcal/mol' was given"]),
    (npz_unit_not_text, ["units.npz: r_unit must be one unit name (text)"]),
    (ani1x_nan_among_computed_forces, ["ani.h5:/C2H4O: non-finite gfn2xtb.forces (nan) in conformation 3 (atom 2)",
                                       "only all-NaN forces mean 'not computed'"]),
    (evaluate_run_folder_missing, ["--run", "typo: no such folder"]),
    (evaluate_run_folder_without_split, ["not_a_run: no splits.npz in it", "the run's split is unknown"]),
    (export_dtype_without_openmm, ["--dtype applies to OpenMM exports (--openmm) only"]),
    (export_atoms_without_openmm, ["--structure applies to OpenMM exports (--openmm) only"]),
    (label_continues_a_partial_file_of_another_method, ["out.extxyz.partial: frame 0 was labelled with 'model:",
                                                        "lj.pt', not 'model:", "--force to start afresh"]),
    (label_partial_file_not_text, ["out.extxyz.partial: the partial file of an earlier run cannot be read",
                                   "UnicodeDecodeError"]),
    (label_partial_file_with_a_damaged_frame, ["out.extxyz.partial: the partial file of an earlier run cannot be read"]),
    (md_index_before_the_first_frame, ["frames.extxyz holds 4 frame(s) (0 to 3): --index -9 selects none"]),
    (md_empty_structure_name, ["the structure argument names an empty structure file ('')"]),
    (sweep_report_with_a_damaged_result, ["sweep_result.json: the point's result cannot be read",
                                          "delete it and run the sweep again"]),
    (sweep_with_a_damaged_plan, ["sweep.json: the sweep's plan cannot be read", "finished points are kept"]),
]


@pytest.mark.parametrize("setup, fragments", CASES, ids=[c[0].__name__ for c in CASES])
def test_refused_with_one_line_and_nothing_written(tmp_path, shared_data, capsys, monkeypatch, setup, fragments):
    refused_without_writes(tmp_path, shared_data, capsys, monkeypatch, setup, fragments)


# ---------------------------------------------------------------------------------- behaviour
def test_npz_units_keys_are_read(tmp_path, shared_data):
    """The ethanol frames written in eV and Bohr with sGDML's unit keys read back as the original
    kcal/mol and Å file (reference: ase.units' factors); the same values
    without the keys are still kcal/mol and Å. (The eV file read 23 x too small before.)"""
    from torchmdx.data import read_structures

    original = _ethanol(shared_data, frames=10)
    converted = {"R": original["R"] / BOHR_IN_ANGSTROM, "z": original["z"], "E": original["E"] * KCAL_PER_MOL_IN_EV,
                 "F": original["F"] * KCAL_PER_MOL_IN_EV * BOHR_IN_ANGSTROM}
    np.savez(tmp_path / "ev_bohr.npz", **converted, e_unit=np.array("eV"), r_unit=np.array("Bohr"))
    np.savez(tmp_path / "plain.npz", **original)
    reference = read_structures(tmp_path / "plain.npz")
    np.testing.assert_allclose(reference.energy, original["E"].ravel() * KCAL_PER_MOL_IN_EV, rtol=1e-12)
    got = read_structures(tmp_path / "ev_bohr.npz")
    np.testing.assert_allclose(got.energy, reference.energy, rtol=1e-12)
    np.testing.assert_allclose(got.pos, reference.pos, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.forces, reference.forces, rtol=1e-12, atol=1e-12)
    # an option that agrees with the file (another spelling of the same unit) is fine
    again = read_structures(tmp_path / "ev_bohr.npz", energy_unit="ev", length_unit="a0")
    np.testing.assert_allclose(again.energy, reference.energy, rtol=1e-12)


def _tiny_et_payload(tmp_path):
    import torchmdx

    model = torchmdx.build_model({"embedding_dimension": 8, "num_layers": 1, "num_heads": 2, "num_rbf": 4,
                                  "cutoff_upper": 4.0, "backend": "torch", "seed": 0})
    model.save(tmp_path / "model.pt")
    return torch.load(tmp_path / "model.pt", weights_only=True)


def _nan(name):
    def change(payload):
        payload["state_dict"][name] = torch.full_like(payload["state_dict"][name], float("nan"))
    change.__name__ = f"nan_{name}"
    return change


PAYLOADS = [
    # (change to a valid model file's payload, fragment of the ModelError); each was a traceback or loaded
    (lambda p: p.update(format_version="abc"), "format_version 'abc' is not a whole number"),  # ValueError
    (lambda p: p.update(format_version=None), "format_version None is not a whole number"),   # TypeError
    (lambda p: p.update(kind=["et"]), "the model kind ['et'] is not a name"),                 # unhashable list
    (lambda p: p.update(hparams=[1, 2]), "hparams is a list, expected a mapping"),            # dict() TypeError
    (lambda p: p.pop("state_dict"), "no state_dict, expected a mapping of weight names"),     # KeyError
    (lambda p: p.update(state_dict=[1]), "a state_dict that is a list"),                      # load_state_dict
    (_nan("shift"), "weight tensors hold NaN or infinite values (e.g. shift)"),               # NaN energies
    (_nan("scale"), "(e.g. scale)"),
    (_nan("atomref"), "(e.g. atomref)"),
]


@pytest.mark.parametrize("change, fragment", PAYLOADS, ids=[f"payload{k}" for k in range(len(PAYLOADS))])
def test_load_model_of_a_malformed_model_file(tmp_path, change, fragment):
    import torchmdx
    from torchmdx.errors import ModelError

    payload = copy.deepcopy(_tiny_et_payload(tmp_path))
    change(payload)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ModelError, match=r"bad\.pt: ") as caught:
        torchmdx.load_model(tmp_path / "bad.pt")
    assert fragment in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ModelError):
        torchmdx.Calculator(str(tmp_path / "bad.pt"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.int32, torch.bfloat16])
def test_load_model_refuses_dtypes_it_does_not_run(tmp_path, dtype):
    """'float16' (text) was refused but torch.float16 loaded (unchecked); torch.int32 was
    nn.Module.to's TypeError traceback."""
    import torchmdx
    from torchmdx.errors import ModelError

    _tiny_et_payload(tmp_path)
    with pytest.raises(ModelError, match=r"^dtype must be one of float32, float64, got torch\.\w+$"):
        torchmdx.load_model(tmp_path / "model.pt", dtype=dtype)


@pytest.mark.parametrize("value", ["no", "false", "off"])
def test_calculator_cuda_graph_must_be_a_switch(tmp_path, value):
    """bool("no") is True: on a GPU the calculator captured CUDA graphs when asked not to (on the
    CPU it said "cuda_graph needs a CUDA device")."""
    import torchmdx
    from torchmdx.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^Calculator cuda_graph must be 'auto', True or False, got"):
        torchmdx.Calculator(str(_lj(tmp_path)), cuda_graph=value)


def test_evaluate_an_analytic_potential(tmp_path, capsys):
    """A Lennard-Jones model file (buffers, no parameters) was a StopIteration traceback in
    ``torchmdx evaluate`` (its dtype was read from the first parameter). Reference: the frames
    labelled by ``torchmdx label`` with the same model (through the ASE calculator): errors 0."""
    from ase.io import read

    from torchmdx.cli.main import main

    frames, model = _argon_frames(tmp_path), _lj(tmp_path)
    assert main(["label", str(frames), "--method", f"model:{model}", "-o", str(tmp_path / "labelled.extxyz"),
                 "--no-progress"]) == 0
    assert len(read(tmp_path / "labelled.extxyz", ":")) == 4
    assert main(["evaluate", str(model), "--data", str(tmp_path / "labelled.extxyz"), "--out", str(tmp_path / "report"),
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "report" / "errors.json").read_text())["metrics"]
    assert metrics["n_structures"] == 4 and metrics["n_atoms"] == 52
    # meV and meV/Å; the extended XYZ text keeps about 8 decimals
    assert metrics["energy_mae"] < 1e-4 and metrics["forces_mae"] < 1e-4


# ---------------------------------------------------------------------------------- train --resume
def _trained_run(t, s, name="run", epochs=1):
    from torchmdx.cli.main import main

    config = _config(t, s)
    assert main(["train", str(config), "--run-dir", str(t / name), "--set", f"trainer.max_epochs={epochs}",
                 "--set", "train.lr_warmup_steps=1"]) == 0
    return config


def train_resume_with_a_damaged_saved_config(t, s):
    # yaml's multi-line ParserError traceback
    config = _trained_run(t, s)
    (t / "run" / "config.resolved.yaml").write_text("data: [\n")
    return ["train", config, "--run-dir", t / "run", "--resume", "--set", "trainer.max_epochs=2"]


CASES_TRAIN = [
    (train_resume_with_a_damaged_saved_config, ["--resume:", "config.resolved.yaml: not valid YAML at line 2",
                                                "the run's saved config is damaged"]),
]


@pytest.mark.parametrize("setup, fragments", CASES_TRAIN, ids=[c[0].__name__ for c in CASES_TRAIN])
def test_train_refused_with_one_line_and_nothing_written(tmp_path, shared_data, capsys, monkeypatch, setup,
                                                         fragments):
    refused_without_writes(tmp_path, shared_data, capsys, monkeypatch, setup, fragments)


def test_resumed_copy_of_a_run_exports_its_own_best_checkpoint(tmp_path, shared_data):
    """A run folder copied (B = copy of A) and resumed: Lightning keeps the best checkpoint's path
    inside A, so B's model.pt was exported from A's best.ckpt, another run's weights once A went
    on training. Reference: `torchmdx export` of B's own best.ckpt."""
    import shutil

    import torchmdx
    from torchmdx.cli.main import main

    config = _trained_run(tmp_path, shared_data, "A")
    shutil.copytree(tmp_path / "A", tmp_path / "B")
    assert main(["train", str(config), "--run-dir", str(tmp_path / "A"), "--resume", "--set", "trainer.max_epochs=3",
                 "--set", "train.lr_warmup_steps=1"]) == 0  # A goes on: its best.ckpt changes
    assert main(["train", str(config), "--run-dir", str(tmp_path / "B"), "--resume", "--set", "trainer.max_epochs=1",
                 "--set", "train.lr_warmup_steps=1"]) == 0  # B: nothing more to train, model.pt exported again
    for run in ("A", "B"):
        assert main(["export", str(tmp_path / run / "checkpoints" / "best.ckpt"), "-o", str(tmp_path / f"{run}.pt")]) == 0
    own, other = (torchmdx.load_model(tmp_path / f"{run}.pt").state_dict() for run in ("B", "A"))
    assert any(not torch.equal(own[k], other[k]) for k in own)  # the two runs' best weights differ
    got = torchmdx.load_model(tmp_path / "B" / "model.pt").state_dict()
    assert all(torch.equal(got[k], own[k]) for k in own)
