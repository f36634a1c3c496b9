"""Bad inputs, round 8: nothing lost, nothing silent.

Thread counts beyond a C int (``threads: 1e12`` in md, slmc, ``trainer.num_threads``,
``evaluate --threads``: ``ValueError: Overflow when unpacking long``), sizes that hung instead of
being refused (``md --replicas 10**12``, a Nosé–Hoover chain of 10**9), messages that named the
wrong thing (md's unknown element as an atom number of the whole batch, evaluate's singular cell
without the file), a YAML config given as a checkpoint or restart file (torch's advice to load
it with ``weights_only=False``), a hand-edited restart step (``int()``'s traceback), NaN positions reaching ASE's neighbor list (its RuntimeWarning printed before
the error) or leaving an empty ``<out>.partial`` behind in ``torchmdx label``, and silent garbage
(``--forces-key positions`` read the positions as forces; an ET of no layers without the
neighbor embedding trained a model of zero forces), and a data file given as ``format: cache``
told to be deleted ("this cache is damaged ...; delete it").

Table rows: a setup ``(tmp_path, shared_data) -> CLI arguments`` and the fragments the one
``error:`` line must hold; every file under ``tmp_path`` must come out unchanged (caches go to a
folder beside it). Tests of behaviour follow.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from ase import Atoms
from ase.io import write

import torchmdx
from test_bad_inputs_more import _ethanol, refused_without_writes
from test_bad_inputs_round7 import _cache, _ethanol_extxyz, _train_config

TINY = {"embedding_dimension": 8, "num_layers": 1, "num_heads": 2, "num_rbf": 4, "cutoff_upper": 4.0,
        "backend": "torch", "seed": 0}
HUGE = 10**12  # beyond a C int


def _model(t, name="et.pt"):
    """A tiny untrained ET that knows H, C, O (the ethanol frames' elements)."""
    model = torchmdx.build_model(TINY)
    model.set_normalisation(elements=[1, 6, 8])
    model.save(t / name)
    return t / name


def _ethanol_frames(t, s, name="frames.extxyz", change=None, frames=2, **atoms_kw):
    """Ethanol frames without labels (md and label inputs); ``change(k, atoms)`` edits frame k."""
    arrays = _ethanol(s, frames)
    images = []
    for k in range(frames):
        atoms = Atoms(numbers=arrays["z"], positions=arrays["R"][k], **atoms_kw)
        if change is not None:
            atoms = change(k, atoms)
        images.append(atoms)
    write(t / name, images, format="extxyz")
    return t / name


def _md(t, s, *options, structure=None):
    structure = structure or _ethanol_frames(t, s, frames=1)
    return ["md", structure, "--model", _model(t), "--steps", "2", "--out", t / "md.extxyz", "--no-progress",
            *options]


# ---------------------------------------------------------------------------------- thread counts
def md_threads_beyond_a_c_int(t, s):
    return _md(t, s, "--threads", HUGE)


def evaluate_threads_beyond_a_c_int(t, s):
    return ["evaluate", _model(t), "--data", _ethanol_extxyz(t, s), "--threads", HUGE, "--out", t / "report"]


def train_num_threads_beyond_a_c_int(t, s):
    config = _train_config(t, s / "md17" / "md17_ethanol_xtb.npz")
    return ["train", config, "--set", f"trainer.num_threads={HUGE}"]


def slmc_threads_beyond_a_c_int(t, s):
    config = {"lattice": {"L": 4}, "data": {"chains": 2, "thermalize_sweeps": 2, "sweeps": 4, "every": 1},
              "effective": {"layers": [1], "epochs": 1}, "slmc": {"chains": 2, "steps": 2},
              "threads": HUGE, "run_dir": str(t / "run")}
    (t / "slmc.yaml").write_text(yaml.safe_dump(config))
    return ["slmc", t / "slmc.yaml", "--no-progress"]


# ---------------------------------------------------------------------------------- sizes that hung
def md_replicas_beyond_memory(t, s):
    return _md(t, s, "--replicas", HUGE)


def md_nose_hoover_chain_of_a_billion(t, s):
    return _md(t, s, "--ensemble", "nose-hoover", "--chain-length", 10**9)


# ---------------------------------------------------------------------------------- md structures
def md_unknown_element_in_the_second_frame(t, s):
    def change(k, atoms):
        if k == 1:
            atoms.numbers[8] = 26  # Fe: was "atom 17 is element Fe" (the batch's atom 17)
        return atoms
    return _md(t, s, "--index", ":", structure=_ethanol_frames(t, s, change=change))


def md_nan_position_in_the_second_frame(t, s):
    def change(k, atoms):
        if k == 1:
            atoms.positions[4] = np.nan  # ASE's RuntimeWarning came first, then "structure 1: atom 4 ..."
        return atoms
    return _md(t, s, "--index", ":", structure=_ethanol_frames(t, s, change=change))


# ---------------------------------------------------------------------------------- data and evaluate
def data_forces_key_is_the_positions(t, s):
    return ["data", "info", _ethanol_extxyz(t, s), "--forces-key", "positions", "--cache-dir", _cache(t)]


def evaluate_singular_cell(t, s):
    def change(k, atoms, energy, forces):
        atoms.set_cell([[10, 0, 0], [20, 0, 0], [0, 0, 10]])  # a and b parallel
        atoms.pbc = True
        return energy, forces
    return ["evaluate", _model(t), "--data", _ethanol_extxyz(t, s, change=change), "--cache-dir", _cache(t),
            "--out", t / "report"]


def prepare_npz_as_format_cache(t, s):
    # was "this cache is damaged and cannot be read (...); delete it or build it again": the source data
    np.savez(t / "ethanol.npz", **_ethanol(s))
    return ["data", "prepare", t / "ethanol.npz", "--format", "cache", "--cache-dir", _cache(t)]


def train_on_ani_file_as_format_cache(t, s):
    # was "this cache is damaged (it has no checksums); delete it ..."
    config = _train_config(t, s / "ani" / "ani1x_xtb.h5")
    return ["train", config, "--set", "data.format=cache"]


def train_et_without_layers_or_neighbor_embedding(t, s):
    config = _train_config(t, s / "md17" / "md17_ethanol_xtb.npz")
    return ["train", config, "--set", "model.num_layers=0", "--set", "model.neighbor_embedding=false"]


# ---------------------------------------------------------------------------------- files of another kind
def _config_yaml(t):
    (t / "config.yaml").write_text(yaml.safe_dump({"data": {"path": "x.npz"}, "model": TINY}))
    return t / "config.yaml"


def md_restart_is_a_yaml_config(t, s):
    # was torch's "Weights only load failed ... Re-running `torch.load` with `weights_only` set to `False`"
    return ["md", "--restart", _config_yaml(t), "--model", _model(t), "--steps", "8", "--no-progress"]


def export_a_yaml_config(t, s):
    return ["export", _config_yaml(t), "-o", t / "model.pt"]


def _argon_restart(t, change):
    import torch
    from ase.cluster import Icosahedron

    from torchmdx.cli.main import main
    from torchmdx.nn.analytic import LennardJones

    write(t / "ar.xyz", Icosahedron("Ar", 2))
    LennardJones(0.0104, 3.4).save(t / "lj.pt")
    assert main(["md", str(t / "ar.xyz"), "--model", str(t / "lj.pt"), "--steps", "2", "--every", "1", "--dt", "5",
                 "--out", str(t / "ar.extxyz"), "--no-progress", "--dtype", "float64"]) == 0
    payload = torch.load(t / "ar.restart.pt", weights_only=True)
    change(payload)
    torch.save(payload, t / "edited.restart.pt")
    return ["md", "--restart", t / "edited.restart.pt", "--model", t / "lj.pt", "--steps", "6", "--out",
            t / "more.extxyz", "--no-progress", "--dtype", "float64"]


def md_restart_step_not_a_number(t, s):
    return _argon_restart(t, lambda payload: payload.update(step="abc"))  # was int()'s ValueError traceback


def md_restart_negative_step(t, s):
    return _argon_restart(t, lambda payload: payload.update(step=-5))  # ran from step -5, silently


# ---------------------------------------------------------------------------------- label
def _label(t, s, structure, *options):
    return ["label", structure, "-o", t / "out.extxyz", "--method", f"model:{_model(t)}", "--no-progress", *options]


def label_unknown_element_with_a_model(t, s):
    def change(k, atoms):
        if k == 1:
            atoms.numbers[8] = 26
        return atoms
    return _label(t, s, _ethanol_frames(t, s, change=change))


def label_nan_position(t, s):
    def change(k, atoms):
        if k == 1:
            atoms.positions[2, 1] = np.nan
        return atoms
    return _label(t, s, _ethanol_frames(t, s, change=change))


def label_first_frame_fails(t, s):
    # a 3 Å periodic box: the model refuses the first frame; an empty out.extxyz.partial was left
    return _label(t, s, _ethanol_frames(t, s, cell=[3, 3, 3], pbc=True))


def label_model_method_without_a_file(t, s):
    return ["label", _ethanol_frames(t, s), "-o", t / "out.extxyz", "--method", "model:", "--no-progress"]


def train_num_sanity_val_steps_below_minus_one(t, s):
    config = _train_config(t, s / "md17" / "md17_ethanol_xtb.npz")
    return ["train", config, "--set", "trainer.num_sanity_val_steps=-2"]


def md_empty_log_name(t, s):
    # an empty name fell back to the default log silently
    return _md(t, s, "--log", "")


CASES = [
    (md_threads_beyond_a_c_int, ["--threads must be at most", f"got {HUGE}", "CPUs"]),
    (evaluate_threads_beyond_a_c_int, ["--threads must be at most", f"got {HUGE}"]),
    (train_num_threads_beyond_a_c_int, ["config key 'trainer.num_threads' must be at most", f"got {HUGE}"]),
    (slmc_threads_beyond_a_c_int, ["config key 'threads' must be at most", f"got {HUGE}"]),
    (md_replicas_beyond_memory, [f"--replicas {HUGE} makes 9,000,000,000,000 atoms ({HUGE} x 9)",
                                 "GB of memory is available; give fewer replicas"]),
    (md_nose_hoover_chain_of_a_billion, ["--chain-length must be at most 100 thermostats, got 1000000000"]),
    (md_unknown_element_in_the_second_frame, ["frames.extxyz frame 1: atom 8 is element Fe (Z=26)",
                                              "known elements: H, C, O"]),
    (md_nan_position_in_the_second_frame, ["frames.extxyz frame 1: atom 4 (H) has a non-finite position",
                                           "fix the structure file"]),
    (data_forces_key_is_the_positions, ["frames.extxyz: forces key 'positions' names ASE's own per-atom "
                                        "positions, not forces"]),
    (evaluate_singular_cell, ["frames.extxyz: structure 0: the cell of the periodic directions is singular"]),
    (prepare_npz_as_format_cache, ["ethanol.npz: read as format 'cache' but it is no torchmdx cache (not even an "
                                   "HDF5 file)", "give the data file with its own format"]),
    (train_on_ani_file_as_format_cache, ["ani1x_xtb.h5: read as format 'cache' but it is no torchmdx cache (an HDF5 "
                                         "file without torchmdx's cache attributes)"]),
    (train_et_without_layers_or_neighbor_embedding, ["config key 'model.num_layers' is 0 and "
                                                     "model.neighbor_embedding is false", "zero forces"]),
    (md_restart_is_a_yaml_config, ["config.yaml: a YAML config, not an MD restart file; pass the .restart.pt "
                                    "file that `torchmdx md` writes"]),
    (export_a_yaml_config, ["config.yaml: a YAML config, not a checkpoint; pass a checkpoint of `torchmdx train`"]),
    (md_restart_step_not_a_number, ["edited.restart.pt: its step 'abc' is not a step number (a whole number >= 0)"]),
    (md_restart_negative_step, ["edited.restart.pt: its step -5 is not a step number"]),
    (label_unknown_element_with_a_model, ["frame 1 (frames.extxyz:1): model:", "cannot label it (atom 8 is "
                                          "element Fe (Z=26)", "pass --skip-failed to leave them out"]),
    (label_nan_position, ["frames.extxyz: frame 1: atom 2 (O) has a non-finite position [", "nan"]),
    (label_first_frame_fails, ["frame 0 (frames.extxyz:0): model:", "failed (structure 0: cutoff 4 Å",
                               "no frame was labelled, nothing written"]),
    (label_model_method_without_a_file, ["--method model:: names no model file"]),
    (train_num_sanity_val_steps_below_minus_one, ["config key 'trainer.num_sanity_val_steps' must be >= 0, or -1",
                                                  "got -2"]),
    (md_empty_log_name, ["--log must name a file, or be left out for the default next to md.out, got ''"]),
]


@pytest.mark.parametrize("setup, fragments", CASES, ids=[c[0].__name__ for c in CASES])
def test_refused_with_one_line_and_nothing_written(tmp_path, shared_data, capsys, monkeypatch, setup, fragments):
    refused_without_writes(tmp_path, shared_data, capsys, monkeypatch, setup, fragments)


# ---------------------------------------------------------------------------------- behaviour
def test_thread_limit_accepts_the_machine_and_refuses_beyond():
    """1 and the limit (4 x the CPUs, at least 1024) pass; one more, and a C-int overflow, are one
    line; None is torch's choice."""
    import os

    from torchmdx.devices import check_threads, thread_limit
    from torchmdx.errors import ConfigError

    assert thread_limit() == max(1024, 4 * os.cpu_count())
    for fine in (None, 1, os.cpu_count(), thread_limit()):
        check_threads(fine, "--threads")
    for bad, fragment in ((0, "--threads must be >= 1, got 0"),
                          (thread_limit() + 1, f"--threads must be at most {thread_limit()}, got {thread_limit() + 1}"),
                          (2**63, f"got {2**63}")):
        with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
            check_threads(bad, "--threads")


def test_replica_memory_check_lets_real_sizes_through(tmp_path, shared_data, monkeypatch):
    """The check counts atoms x replicas against the available memory at 1 KB an atom: 9 atoms x
    1000 replicas (9.2 MB) pass with 10 MB available and are refused with 9 MB."""
    from torchmdx.errors import ConfigError
    from torchmdx.md import run as md_run
    from torchmdx.md import structure_files as md_structure_files
    from torchmdx.md.config import md_config

    structures = md_structure_files.read_structures([_ethanol_frames(tmp_path, shared_data, frames=1)])
    config = md_config({"replicas": 1000})
    monkeypatch.setattr("torchmdx.devices.memory_bytes", lambda: (10**11, 10_000_000))
    md_run.check_replica_memory(structures, config)
    monkeypatch.setattr("torchmdx.devices.memory_bytes", lambda: (10**11, 9_000_000))
    with pytest.raises(ConfigError, match=r"9,000 atoms \(1000 x 9\), at least 0.00922 GB"):
        md_run.check_replica_memory(structures, config)
    monkeypatch.setattr("torchmdx.devices.memory_bytes", lambda: (0, 0))  # unknown: no refusal
    md_run.check_replica_memory(structures, md_config({"replicas": HUGE}))


def test_md_frame_names_are_the_frame_numbers_of_the_file(tmp_path, shared_data):
    """``--index 1:`` of a 3-frame file: the selection's second structure is the file's frame 2;
    one frame selected: the file alone."""
    from torchmdx.md.structure_files import read_structures

    path = _ethanol_frames(tmp_path, shared_data, frames=3)
    sources: list = []
    read_structures([path], "1:", "--index", sources)
    assert sources == [f"{path} frame 1", f"{path} frame 2"]
    sources.clear()
    read_structures([path], "-1", "--index", sources)
    assert sources == [str(path)]


def test_md_with_known_elements_in_every_frame_runs(tmp_path, shared_data, capsys):
    """Two ethanol frames (H, C, O) under a model of H, C, O: the element check passes and the run
    writes its trajectory (two structures)."""
    from ase.io import read

    from torchmdx.cli.main import main

    args = _md(tmp_path, shared_data, "--index", ":", "--every", "1",
               structure=_ethanol_frames(tmp_path, shared_data, frames=2))
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    for k in (0, 1):  # one trajectory a structure: steps 0, 1, 2
        assert [len(a) for a in read(tmp_path / f"md.{k}.extxyz", ":")] == [9, 9, 9]
    assert "warning" not in capsys.readouterr().err


def test_python_api_none_and_numbers_are_one_line(tmp_path):
    from torchmdx.errors import ModelError

    model = torchmdx.build_model(TINY)
    for value, name in ((None, ", got NoneType"), (5, ", got int"),  # round 19: the list item is named
                        ([Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]), 3],
                         ": item 1 of the list of 2 has type int, not ase.Atoms")):
        with pytest.raises(ModelError, match=f"expected an ase.Atoms or a non-empty list of ase.Atoms{name}$"):
            model.predict(value)
    with pytest.raises(ModelError, match=r"save: expected the path of a model file such as model.pt, got 5 \(int\)"):
        model.save(5)
    assert not list(tmp_path.iterdir())


def test_et_without_layers_keeps_the_neighbor_embedding_geometry():
    """num_layers 0 with the neighbor embedding (the default) still sees distances: stretching
    H2 changes its energy and the forces are not zero; without it the config is refused."""
    from torchmdx.errors import ConfigError

    model = torchmdx.build_model({**TINY, "num_layers": 0})
    near = model.predict(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]))
    far = model.predict(Atoms("H2", positions=[[0, 0, 0], [0, 0, 1.5]]))
    assert near["energy"] != pytest.approx(far["energy"], abs=1e-9) and np.abs(near["forces"]).max() > 0
    with pytest.raises(ConfigError, match="sees no geometry"):
        torchmdx.build_model({**TINY, "num_layers": 0, "neighbor_embedding": False})


def test_label_after_one_labelled_frame_keeps_the_partial_file(tmp_path, shared_data, capsys):
    """The empty partial file is not left behind, but one of labelled frames is: frame 0 labelled,
    frame 1 (a 3 Å box) refused: out.extxyz.partial holds frame 0 and the line names it."""
    from ase.io import read

    from torchmdx.cli.main import main

    def change(k, atoms):
        if k == 1:
            atoms.set_cell([3, 3, 3])
            atoms.pbc = True
        return atoms
    path = _ethanol_frames(tmp_path, shared_data, change=change)
    model = _model(tmp_path)
    code = main(["label", str(path), "-o", str(tmp_path / "out.extxyz"), "--method", f"model:{model}", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "the 1 frames before it are kept in" in err, err
    kept = read(tmp_path / "out.extxyz.partial", ":", format="extxyz")
    assert len(kept) == 1 and np.allclose(kept[0].positions, read(path, 0).positions)


def test_validation_interval_beyond_the_run_warns(tmp_path):
    """check_val_every_n_epoch > max_epochs: no validation runs at all, which is said once (a
    warning, not an error: the run still trains and exports its last checkpoint)."""
    from torchmdx.train.config import TrainerConfig

    with pytest.warns(UserWarning, match="check_val_every_n_epoch' is 5 but 'trainer.max_epochs' is 3: no validation"):
        TrainerConfig(max_epochs=3, check_val_every_n_epoch=5).validate()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainerConfig(max_epochs=5, check_val_every_n_epoch=5).validate()


def test_frame_names_give_the_frame_numbers_of_the_file(tmp_path):
    """Messages name a frame by its number in the file, whatever slice picked it."""
    from torchmdx.md.structure_files import _frame_names

    path = tmp_path / "five.extxyz"
    write(path, [Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74 + 0.01 * k]]) for k in range(5)])
    assert _frame_names(path, "-1", 1) == [str(path)]
    assert _frame_names(path, ":", 5) == [f"{path} frame {n}" for n in range(5)]
    assert _frame_names(path, "1:", 4) == [f"{path} frame {n}" for n in (1, 2, 3, 4)]
    assert _frame_names(path, "::2", 3) == [f"{path} frame {n}" for n in (0, 2, 4)]
    assert _frame_names(path, "-2:", 2) == [f"{path} frame {n}" for n in (3, 4)]
