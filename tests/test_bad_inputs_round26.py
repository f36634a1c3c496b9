"""Bad inputs, round 26 (branch bad26): the Python API a chemist calls from a notebook (a model called with a float
``batch``, a cell of three lengths, a pbc of two entries, ``forces="no"``, ``num_structures=0``, a ``uint8`` ``z``;
``predict`` of a half-precision model; ``load_model`` of a model object; numpy dtypes; the Calculator's
``calculate(properties=None)`` and ``energy_and_forces`` of text), ``export --openmm --no-ema`` of a model file, and
sweep configs (a cutoff below every distance passed ``--dry-run``, two identical variants, ``sweep: []``); see
docs/bad_inputs.md, round 26.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchmdx
from torchmdx.errors import ConfigError, ModelError
from bad_inputs_common import lj_file, refused_exactly as _exact, tiny_model, water  # the helpers rounds 17-26 share
from test_bad_inputs_round23 import _train_config


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _inputs():
    atoms = water()
    return torch.tensor([8, 1, 1]), torch.tensor(atoms.positions, dtype=torch.float32)


def _refused(call, line, error=ModelError):
    with pytest.raises(error) as info:
        call()
    assert str(info.value) == line
    return info.value


# ---------------------------------------------------------------------------------- model(z, pos, ...)
@pytest.mark.parametrize("keywords, line", [
    # was "index_add_(): Expected dtype int32/int64 for index but got: Float"
    ({"batch": torch.zeros(3)}, "batch must be a 1-D tensor of structure indices (torch.long), one per atom, got "
                                "float32"),
    # was "the cell of the periodic directions is singular (rows [[10.0, 10.0, 10.0], [10.0, 10.0, 10.0], ...])"
    ({"cell": [10.0, 10.0, 10.0], "pbc": [True] * 3},
     "cell must have shape [3, 3] (rows are the cell vectors, Å) or [B, 3, 3], got [3]: for a box of three lengths "
     "a, b, c give torch.diag(torch.tensor([a, b, c]))"),
    # were RuntimeErrors of expand ("The expanded size of the tensor (3) must match ...")
    ({"cell": torch.eye(3)[:2] * 10, "pbc": [True] * 3},
     "cell must have shape [3, 3] (rows are the cell vectors, Å) or [B, 3, 3], got [2, 3]"),
    ({"cell": torch.eye(3) * 10, "pbc": [True, True]},
     "pbc must have shape [3] or [B, 3] (True for each periodic direction), got [2]"),
    # forces="no" computed the forces (a non-empty string is true)
    ({"forces": "no"}, "model(z, pos, ...): forces must be True or False, got 'no' (str)"),
    ({"per_atom": None}, "model(z, pos, ...): per_atom must be True or False, got None (NoneType)"),
    # IndexError "index out of range in self", AttributeError "'str' object has no attribute 'edge_index'"
    ({"num_structures": 0}, "num_structures must be a whole number >= 1 (the structures in the batch), got 0"),
    ({"neighbors": "x"}, "neighbors must be a torchmdx.kernels.neighbors.Neighbors (from model.neighbors(...)) or "
                         "None, got str"),
])
def test_model_call_inputs_are_one_line(model, keywords, line):
    z, pos = _inputs()
    _refused(lambda: model(z, pos, **keywords), line)


def test_uint8_atomic_numbers_are_read_as_numbers(model):
    """A uint8 ``z`` (numpy's choice for small whole numbers) indexed the element table as a mask: "The shape of the
    mask [3] at index 0 does not match the shape of the indexed tensor [100]", a traceback."""
    z, pos = _inputs()
    expected = model(z, pos)["energy"]
    assert torch.equal(model(z.to(torch.uint8), pos)["energy"], expected)


def test_predict_refuses_half_precision_weights():
    """bfloat16: "TypeError: Got unsupported ScalarType BFloat16" (numpy has none); float16 energies were off by
    percents (the Calculator refuses dtype='float16' already)."""
    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        _refused(lambda: tiny_model().to(dtype).predict(water()),
                 f"Potential.predict: the model's weights are {name}; predict runs in float32 or float64: "
                 "model.float() or model.double() first")


def test_load_model_of_a_model_object_and_numpy_dtypes(tmp_path, model):
    """load_model(model) printed the module's repr, 30 lines, as the "one line"; np.float64 as dtype was refused
    ("got <class 'numpy.float64'>")."""
    _refused(lambda: torchmdx.load_model(model),
             "load_model: expected the path of a model file, got a torch module (ETPotential); it is a model already: "
             "use it as it is, e.g. Calculator(model) or model.predict(atoms)")
    _refused(lambda: torchmdx.load_model(np.zeros((50, 3))), "load_model: expected the path of a model file, got a "
                                                              "ndarray")
    model.save(tmp_path / "m.pt")
    assert torchmdx.load_model(tmp_path / "m.pt", dtype=np.float64).predict(water())["forces"].dtype == np.float64
    calc = torchmdx.Calculator(tmp_path / "m.pt", dtype=np.float32)
    assert calc.dtype == torch.float32
    _refused(lambda: torchmdx.Calculator(tmp_path / "m.pt", dtype=np.int64),
             "dtype must be one of float32, float64, got <class 'numpy.int64'>", ConfigError)


def test_calculator_properties_none_and_text_positions(tmp_path, model):
    """calculate(atoms, None): "'NoneType' object is not iterable"; energy_and_forces(atoms, "abc"): "could not
    convert string to float: 'abc'", both tracebacks."""
    calc = torchmdx.Calculator(model)
    atoms = water()
    calc.calculate(atoms, None)
    assert calc.results["energy"] == pytest.approx(model.predict(atoms)["energy"], abs=1e-6)
    _refused(lambda: calc.energy_and_forces(atoms, "abc"),
             "energy_and_forces: positions must be numbers, [3, 3] in Å, got str", ConfigError)


# ---------------------------------------------------------------------------------- export --openmm --no-ema
def test_openmm_export_of_a_model_file_refuses_no_ema(tmp_path, capsys, monkeypatch):
    """--no-ema was ignored for a model file: the module held the file's weights, without a word."""
    monkeypatch.chdir(tmp_path)
    lj_file(tmp_path)
    _exact(capsys, ["export", "--openmm", "lj.pt", "-o", "om.pt", "--no-ema"],
           "error: --no-ema applies to a training checkpoint, and lj.pt is a model file, which holds one set of weights "
           "(those it was exported with); give the run's checkpoint (e.g. RUN_DIR/checkpoints/last.ckpt) for the raw "
           "training weights, or drop --no-ema", tmp_path)


# ---------------------------------------------------------------------------------- sweep configs
def _sweep(tmp_path, monkeypatch, section: str):
    """round 23's water config with a ``sweep:`` section in ``tmp_path/w`` (the working folder); the dry-run's
    arguments, the data cache outside that folder (as round 24's)."""
    folder = tmp_path / "w"
    folder.mkdir()
    monkeypatch.chdir(folder)
    _train_config(folder)
    (folder / "s.yaml").write_text((folder / "t.yaml").read_text() + section)
    return folder, ["sweep", "s.yaml", "--out", "sw", "--dry-run", "--set", "data.test_size=4", "--set",
                    f"data.cache_dir={tmp_path / 'cache'}"]


def test_sweep_dry_run_runs_the_cutoff_check_of_every_point(tmp_path, capsys, monkeypatch):
    """A grid point whose cutoff reaches no neighbour passed --dry-run ("validate every point") and stopped the sweep
    when its turn came, after the points before it had trained."""
    folder, argv = _sweep(tmp_path, monkeypatch, "sweep:\n  grid: {data.train_size: [8, 12], model.cutoff_upper: "
                                                 "[5, 0.5]}\n")
    _exact(capsys, argv,
           "error: sweep point (data.train_size=8, model.cutoff_upper=0.5): config key 'model.cutoff_upper' is 0.5 Å, "
           "but the shortest interatomic distance in 8 training structures of e.npz is 0.892 Å: the model would see "
           "no neighbours (zero forces, energies from the composition alone); set model.cutoff_upper above it (5 Å "
           "is the default)", folder)
    assert not (folder / "sw").exists()


@pytest.mark.parametrize("section, line", [
    # trained every point of b again: the same model under two names
    ("sweep:\n  grid: {data.train_size: [8, 12]}\n  variants: {a: {model.num_layers: 1}, b: {model.num_layers: 1}}\n",
     "sweep.variants 'a' and 'b' set the same keys to the same values, so every point of 'b' would train the same "
     "model as 'a' again; drop one of them or make them differ"),
    # the next three were taken for no section, no grid, no variants (`sweep: 3` was refused)
    ("sweep: []\n", "s.yaml: the 'sweep' section must be a mapping with 'grid' and/or 'variants'"),
    ("sweep:\n  grid: []\n", "s.yaml: 'sweep.grid' must map section.key to a non-empty list of values"),
    ("sweep:\n  grid: {data.train_size: [8, 12]}\n  variants: []\n",
     "s.yaml: 'sweep.variants' must map a name to a mapping of section.key: value"),
], ids=["same-variants", "sweep-list", "grid-list", "variants-list"])
def test_sweep_sections_refused_in_one_line(tmp_path, capsys, monkeypatch, section, line):
    folder, argv = _sweep(tmp_path, monkeypatch, section)
    _exact(capsys, argv, f"error: {line}", folder)


def test_export_of_a_run_folder_names_its_checkpoints(tmp_path, capsys, monkeypatch):
    """``export runs/t -o m.pt`` said "runs/t: checkpoint not found" of a folder that holds them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "t" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "t" / "logs").mkdir()
    for name in ("last.ckpt", "best.ckpt"):
        (tmp_path / "runs" / "t" / "checkpoints" / name).write_bytes(b"")
    found = "give one of its checkpoints: runs/t/checkpoints/best.ckpt, runs/t/checkpoints/last.ckpt"
    _exact(capsys, ["export", "runs/t", "-o", "m.pt"], f"error: runs/t: is a folder, not a checkpoint; {found}",
           tmp_path)
    _exact(capsys, ["export", "--openmm", "runs/t/checkpoints", "-o", "om.pt"],
           f"error: runs/t/checkpoints: is a folder, not a checkpoint; {found}", tmp_path)
    _exact(capsys, ["export", "runs/t/logs", "-o", "m.pt"],
           "error: runs/t/logs: is a folder, not a checkpoint, and holds no .ckpt file; give a checkpoint of "
           "`torchmdx train` (e.g. RUN_DIR/checkpoints/best.ckpt)", tmp_path)


def test_a_run_folder_as_the_model_names_its_model_file(tmp_path, capsys, monkeypatch, model):
    """``md --model runs/t`` said "runs/t: is a folder, not a model file", and ``label --method model:runs/t`` "model
    file runs/t not found", of a run folder whose model.pt is right there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "t").mkdir(parents=True)
    model.save(tmp_path / "runs" / "t" / "model.pt")
    (tmp_path / "w.xyz").write_text("3\n\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\n")
    line = "runs/t: is a folder, not a model file; its model file is runs/t/model.pt"
    _exact(capsys, ["md", "w.xyz", "--model", "runs/t", "--steps", "2"], f"error: {line}", tmp_path)
    _exact(capsys, ["evaluate", "runs/t", "--data", "w.xyz"], f"error: {line}", tmp_path)
    _exact(capsys, ["label", "w.xyz", "--method", "model:runs/t", "-o", "l.extxyz"],
           f"error: --method model:runs/t: runs/t {line.removeprefix('runs/t: ')}", tmp_path)
    _refused(lambda: torchmdx.Calculator("runs/t"), line)
