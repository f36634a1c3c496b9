"""Bad inputs, round 24 (branch bad24): round 23's leftovers that users hit: a cutoff shorter than every
interatomic distance, a learning rate that makes training diverge, analytic potentials on atoms at one position,
the ANI-1x duplicated-atom line, sub-commands' argparse errors and ``evaluate --energy-key``; see
docs/bad_inputs.md, round 24.
"""

from __future__ import annotations

import pytest

from torchmdx.cli.main import main
from bad_inputs_common import refused_exactly as _exact  # the helpers rounds 17-24 share
from test_bad_inputs_round23 import _train_config


def _train_folder(tmp_path, monkeypatch, trainer="{max_epochs: 1}"):
    """round 23's water training config in ``tmp_path/t`` (the working folder), its cache outside that folder."""
    folder = tmp_path / "t"
    folder.mkdir()
    monkeypatch.chdir(folder)
    _train_config(folder, trainer)
    return folder, ["--set", f"data.cache_dir={tmp_path / 'cache'}"]


# ---------------------------------------------------------------------------------- a cutoff below every distance
def test_a_cutoff_shorter_than_every_distance_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """``model.cutoff_upper: 0.5`` for water trained a model that sees no neighbours (zero forces, energies from
    the composition alone) without a word."""
    folder, cache = _train_folder(tmp_path, monkeypatch)
    _exact(capsys, ["train", "t.yaml", *cache, "--set", "model.cutoff_upper=0.5"],
           "error: config key 'model.cutoff_upper' is 0.5 Å, but the shortest interatomic distance in 12 training "
           "structures of e.npz is 0.892 Å: the model would see no neighbours (zero forces, energies from the "
           "composition alone); set model.cutoff_upper above it (5 Å is the default)", folder)
    _exact(capsys, ["train", "t.yaml", *cache, "--set", "model.cutoff_lower=1.7", "--set", "model.cutoff_upper=1.9"],
           "error: config key 'model.cutoff_lower' is 1.7 Å and config key 'model.cutoff_upper' 1.9 Å, but the "
           "shortest interatomic distance in 12 training structures of e.npz is 0.892 Å and no distance lies between "
           "them: the model would see no neighbours (zero forces, energies from the composition alone); lower "
           "model.cutoff_lower", folder)


def test_the_cutoff_check_samples_a_bounded_number_of_structures(tmp_path):
    """Millions of structures are not read: a sample spread over the training split; periodic images count."""
    import numpy as np

    from torchmdx.data.structures import Structures
    from torchmdx.errors import ConfigError
    from torchmdx.train import data_checks

    n = 1000  # dimers 2 Å apart, one of them (structure 500) 0.5 Å apart
    pos = np.zeros((2 * n, 3))
    pos[1::2, 0] = 2.0
    pos[1001, 0] = 0.5
    st = Structures(z=np.ones(2 * n, dtype=np.int64), pos=pos, energy=np.zeros(n),
                    offsets=np.arange(0, 2 * n + 1, 2), cell=np.zeros((n, 3, 3)), pbc=np.zeros((n, 3), dtype=bool))
    with pytest.raises(ConfigError) as info:
        data_checks.check_cutoff_reaches_neighbours(st, np.arange(n), 1.0, 0.0, "d.npz")
    assert str(info.value).startswith("config key 'model.cutoff_upper' is 1 Å, but the shortest interatomic distance "
                                      "in 64 of the 1000 training structures (a sample) of d.npz is 2 Å:")
    data_checks.check_cutoff_reaches_neighbours(st, np.arange(n), 2.5, 0.0, "d.npz")  # reached: taken
    data_checks.check_cutoff_reaches_neighbours(st, [500], 1.0, 0.0, "d.npz")  # the close pair is sampled: taken
    box = Structures(z=np.ones(1, dtype=np.int64), pos=np.zeros((1, 3)), energy=np.zeros(1),
                     offsets=np.array([0, 1]), cell=np.eye(3)[None] * 3.0, pbc=np.ones((1, 3), dtype=bool))
    data_checks.check_cutoff_reaches_neighbours(box, [0], 3.5, 0.0, "box.extxyz")  # its own image at 3 Å
    with pytest.raises(ConfigError, match="is 3 Å:"):
        data_checks.check_cutoff_reaches_neighbours(box, [0], 1.0, 0.0, "box.extxyz")


# ---------------------------------------------------------------------------------- a learning rate that diverges
def test_a_diverging_learning_rate_stops_with_one_line_naming_train_lr(tmp_path, capsys, monkeypatch):
    """``train.lr: 1000`` grew the validation loss 20 000-fold and never to NaN: the run ended with a finite, huge
    best_val_loss and exported its model without a word. Lightning's EarlyStopping ``divergence_threshold`` at
    1000 x the sanity check's value (train.divergence_factor) stops it at epoch 2."""
    import re

    folder, cache = _train_folder(tmp_path, monkeypatch)
    capsys.readouterr()
    assert main(["train", "t.yaml", *cache, "--set", "train.lr=1000", "--set", "trainer.max_epochs=5"]) == 2
    err = capsys.readouterr().err
    number = r"[0-9.e+-]+"
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert re.fullmatch(
        f"error: training diverged: val_loss grew from {number} \\(before training\\) to {number}, more than "
        r"train.divergence_factor \(1000\) times its first value \(by step 2, epoch 2\); try a smaller train.lr "
        r"\(now 1000\), a smaller trainer.gradient_clip_val \(now 10\), or check the data \(torchmdx data info\); no "
        r"model was exported", err.strip()), err
    assert not (folder / "runs" / "t" / "model.pt").exists()
    assert main(["train", "t.yaml", *cache, "--set", "train.lr=1000", "--set", "trainer.max_epochs=2", "--set",
                 "train.divergence_factor=null", "--set", "run_dir=runs/off"]) == 0  # off: trained as before


# ---------------------------------------------------------------------------------- analytic potentials, atoms at one position
@pytest.mark.parametrize("kind", ["lennard_jones", "morse", "sum", "harmonic_bonds"])
def test_analytic_potentials_refuse_atoms_at_one_position(kind):
    """``Potential.predict`` and the Calculator with an analytic potential gave 0 eV and zero forces for two atoms
    at one position (their r = 0 pairs get no energy, by design, for padding rows); the networks refused."""
    import torch
    from ase import Atoms

    from torchmdx import Calculator
    from torchmdx.errors import ModelError
    from torchmdx.kernels.neighbors import neighbor_list
    from torchmdx.nn.analytic import HarmonicBonds, LennardJones, Morse, SumPotential

    good = Atoms("Ar3", positions=[[0, 0, 0], [3.8, 0, 0], [0, 3.7, 0]])
    potential = {"lennard_jones": lambda: LennardJones(0.0104, 3.4), "morse": lambda: Morse(0.01, 3.8, 1.5, 8.0),
                 "sum": lambda: SumPotential([LennardJones(0.0104, 3.4), Morse(0.01, 3.8, 1.5, 8.0)]),
                 "harmonic_bonds": lambda: HarmonicBonds([[0, 1], [0, 2]], [3.6, 3.6], 1.0)}[kind]().double()
    same = good.copy()
    same.positions[2] = same.positions[1]
    with pytest.raises(ModelError) as info:
        potential.predict(same)
    assert str(info.value) == "atoms 1 and 2 are on top of each other (distance 0 Å)"  # the networks' line
    same.calc = Calculator(potential)
    with pytest.raises(ModelError) as info:
        same.get_potential_energy()
    assert str(info.value) == "atoms 1 and 2 are on top of each other (distance 0 Å)"
    # padding rows (i = j = N - 1, distance 0, mask False) of a fixed-capacity list are no atoms at one position
    z, pos = torch.tensor(good.numbers), torch.tensor(good.positions)
    padded = neighbor_list(pos, potential.cutoff, max_pairs=16)
    assert int(padded.num_pairs) < 16
    assert float(potential(z, pos, neighbors=padded)["energy"].detach()) == pytest.approx(potential.predict(good)["energy"])
    assert potential.predict(good)["energy"] != 0.0


# ---------------------------------------------------------------------------------- ANI-1x duplicated atom
def test_an_ani1x_duplicated_atom_names_its_group_and_conformation(tmp_path, shared_data, capsys, monkeypatch):
    """A duplicated atom in an ANI-1x file was "atoms 0 and 1 of structure 41": the file's running conformation
    number (C2H3N's 40, then C2H4's conformation 1), which no tool that opens the file shows."""
    import shutil

    import h5py
    import numpy as np

    monkeypatch.chdir(tmp_path)
    for name, group in (("ani1x_xtb.h5", "C2H4"), ("ani1_xtb.h5", None)):
        shutil.copy(shared_data / "ani" / name, tmp_path / name)
        with h5py.File(tmp_path / name, "r+") as h5:
            group = group or "gdb_s01/" + sorted(h5["gdb_s01"])[1]  # ANI-1: gdb_s01/<molecule>
            xyz = h5[group]["coordinates"][()]
            xyz[1, 1] = xyz[1, 0]
            h5[group]["coordinates"][...] = xyz
            if name == "ani1x_xtb.h5":  # conformation 0 without energy (dropped): the numbers are still the file's
                energy = h5[group]["gfn2xtb.energy"][()]
                energy[0] = np.nan
                h5[group]["gfn2xtb.energy"][...] = energy
        position = [round(float(v), 6) for v in xyz[1, 0]]
        _exact(capsys, ["data", "info", name, "--cache-dir", tmp_path / "cache"],
               f"error: {name}:/{group}: atoms 0 and 1 of conformation 1 are at the same position {position} Å (a "
               "duplicated atom?)", tmp_path)


# ---------------------------------------------------------------------------------- sub-commands' argparse errors
@pytest.mark.parametrize("argv, command, extra", [
    (["data", "info", "x.yaml", "--set", "a=b"], "data info", "--set a=b"),
    (["data", "clean", "--force"], "data clean", "--force"),  # round 25: clean takes --cache-dir d as well
    (["train", "t.yaml", "extra"], "train", "extra"),
    (["evaluate", "m.pt", "--data", "d.xyz", "--bogus"], "evaluate", "--bogus"),
])
def test_unrecognized_arguments_come_under_the_sub_commands_usage(tmp_path, capsys, monkeypatch, argv, command,
                                                                   extra):
    """Were argparse's "unrecognized arguments" under the top-level usage line (``usage: torchmdx [-h]
    [--version] command ...``), which lists no option of the command that was given."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: torchmdx {command} [-h]") and "Traceback" not in err, err
    assert err.splitlines()[-1] == f"torchmdx {command}: error: unrecognized arguments: {extra}"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- evaluate --energy-key
def test_evaluate_has_the_data_options_its_lines_name(tmp_path, capsys, monkeypatch):
    """A file whose energies are under another key: evaluate's line said "set config key 'data.energy_key'
    (--energy-key)", an option evaluate did not have (only a config could set it); likewise --energy-unit."""
    from bad_inputs_common import lj_file
    from test_bad_inputs_round23 import _water_frames

    monkeypatch.chdir(tmp_path)
    lj_file(tmp_path)
    _water_frames(tmp_path, "")
    (tmp_path / "w.extxyz").write_text((tmp_path / "w.extxyz").read_text().replace(" energy=", " E="))
    cache = tmp_path.parent / f"{tmp_path.name}_cache"  # the cache is built before the frames are read: outside
    argv = ["evaluate", "lj.pt", "--data", "w.extxyz", "--cache-dir", cache, "--out", "report", "--no-progress"]
    _exact(capsys, argv, "error: w.extxyz: frame 0: no energy 'energy' (info keys: E; calculator results: forces); "
           "set config key 'data.energy_key' (--energy-key) to the key that holds the energies", tmp_path)
    assert main([str(a) for a in argv] + ["--energy-key", "E"]) == 0
    assert (tmp_path / "report" / "errors.json").is_file()
    _exact(capsys, argv + ["--energy-key", "E", "--energy-unit", "parsec"],
           "error: --energy-unit: unknown energy unit 'parsec'; known: eh, ev, ha, hartree, kcal/mol, kj/mol, mev, ry, "
           "rydberg", tmp_path)
    (tmp_path / "c.yaml").write_text("data: {path: w.extxyz, energy_key: E}\n")
    _exact(capsys, ["evaluate", "lj.pt", "--data", "c.yaml", "--energy-key", "E"],
           "error: --energy-key E applies to a data file given as --data, and c.yaml is a config, whose data: "
           "section chooses it: set data.energy_key there, or give the data file as --data", tmp_path)
