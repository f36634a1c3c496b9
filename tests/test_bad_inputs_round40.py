"""Bad inputs, round 40 (branch bad40): stale state, caches and remembered state that gave a silently wrong answer
once what they were built from changed; see docs/bad_inputs.md, round 40."""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from bad_inputs_common import tiny_model, water

import torchmdx


def _fresh(model, atoms, **kwargs):
    """Energy and forces of ``atoms`` from a new Calculator of ``model`` (a copy of the atoms)."""
    copy = atoms.copy()
    copy.calc = torchmdx.Calculator(model, **kwargs)
    return copy.get_potential_energy(), copy.get_forces()


def _other_weights(seed):
    model = tiny_model().double()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_the_calculator_follows_the_weights_of_its_model():
    """A Calculator of a Potential object returned ASE's stored results of unchanged atoms after the model's weights
    changed (``load_state_dict``, an optimiser step): -0.159 eV after loading weights whose energy is -1.09 eV; a
    Calculator that had converted a copy (``dtype='float64'`` of a float32 model) never saw the new weights."""
    warnings.simplefilter("ignore")
    model = tiny_model().double()
    atoms = water()
    atoms.calc = torchmdx.Calculator(model)
    atoms.get_potential_energy()
    model.load_state_dict(_other_weights(1).state_dict())
    energy, forces = _fresh(model, atoms)
    assert atoms.get_potential_energy() == energy
    np.testing.assert_array_equal(atoms.get_forces(), forces)
    # an optimiser step on the model (training it while a calculator looks at it)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    model(torch.tensor(atoms.numbers), torch.tensor(atoms.positions), forces=False)["energy"].sum().backward()
    optimiser.step()
    assert atoms.get_potential_energy() == _fresh(model, atoms)[0]
    model.load_state_dict(_other_weights(3).state_dict(), assign=True)  # new Parameter objects
    assert atoms.get_potential_energy() == _fresh(model, atoms)[0]
    # a converted copy (float32 model, float64 calculator) follows the caller's module too
    model32 = tiny_model()
    atoms.calc = torchmdx.Calculator(model32, dtype="float64")
    atoms.get_potential_energy()
    model32.load_state_dict(_other_weights(2).float().state_dict())
    assert atoms.get_potential_energy() == _fresh(model32, atoms, dtype="float64")[0]
    # the caller's module converted in place: computed in its new dtype
    atoms.calc = torchmdx.Calculator(model32)
    atoms.get_potential_energy()
    model32.double()
    assert atoms.get_potential_energy() == _fresh(model32, atoms)[0]


def test_a_float32_calculator_sets_its_origin_again_for_the_same_atoms_far_away():
    """The Calculator kept the origin of the first structure while the atomic numbers stayed the same: the same water
    3e5 Å away in a float32 model gave -0.188 eV for the -0.159 eV of a fresh calculator (0.03 Å float32 steps)."""
    warnings.simplefilter("ignore")
    model = tiny_model()
    calc = torchmdx.Calculator(model)
    near = water()
    calc.get_potential_energy(near)
    far = water()
    far.positions += 3e5
    assert calc.get_potential_energy(far) == _fresh(model, far)[0] == _fresh(model, near)[0]
    np.testing.assert_array_equal(calc.get_forces(far), _fresh(model, far)[1])


def test_a_source_rewritten_in_its_middle_with_its_old_modification_time_is_read_again(tmp_path, monkeypatch):
    """An extxyz whose middle frame's energy was rewritten (same size), its modification time set back (os.utime,
    as cp -p / rsync -t do): size, mtime and the hashed first and last MiB matched, and the stale cache was used
    without a word (the frame's old energy trained on). The file's ctime, which no copy tool sets back, is now in
    the fingerprint; a source past 2 MiB is simulated by hashing 200 bytes at each end."""
    from torchmdx.data import cache as cache_mod
    from torchmdx.data.cache import build_cache, is_current
    from torchmdx.data.dataset import H5Dataset

    monkeypatch.setattr(cache_mod, "EDGE_BYTES", 200)
    frames = []
    for i in range(9):
        atoms = water()
        atoms.positions[0, 0] = 0.01 * i
        atoms.calc = SinglePointCalculator(atoms, energy=-1.5, forces=np.zeros((3, 3)))
        frames.append(atoms)
    source = tmp_path / "w.extxyz"
    write(source, frames)
    said = []
    cache = build_cache(source, cache_dir=tmp_path / "cache", say=said.append)
    stat = os.stat(source)
    text = source.read_text()
    middle = text.index("energy=-1.5", len(text) // 2)
    source.write_text(text[:middle] + "energy=-2.5" + text[middle + len("energy=-1.5"):])
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(source).st_size == stat.st_size
    assert not is_current(cache, source)
    assert build_cache(source, cache_dir=tmp_path / "cache", say=said.append) == cache
    assert said == [f"rebuilding {cache}: the source changed"]
    assert sorted({float(d.energy) for d in H5Dataset(cache)}) == [-2.5, -1.5]
    # a chmod (ctime changes, content not): the content hash matches, nothing is rebuilt
    os.chmod(source, 0o600)
    assert is_current(cache, source)


def test_energy_and_forces_sees_a_new_cell_without_being_told():
    """``Calculator.energy_and_forces(atoms)`` took the cell from its last call unless ``cell_changed=True`` was
    passed: two waters in a box shrunk from 9 to 8.1 Å gave the old box's -0.310 eV for the new box's -0.194 eV."""
    from ase import Atoms

    model = tiny_model().double()
    w = water().positions
    atoms = Atoms("OH2OH2", positions=np.vstack([w + [1, 1, 1], w + [5.5, 1, 1]]), cell=[9, 9, 9], pbc=True)
    calc = torchmdx.Calculator(model)
    calc.energy_and_forces(atoms)
    atoms.set_cell([8.1, 8.1, 8.1])
    energy, forces = calc.energy_and_forces(atoms)
    fresh = torchmdx.Calculator(model).energy_and_forces(atoms)
    assert energy == fresh[0] and abs(energy - calc.energy_and_forces(atoms, cell_changed=True)[0]) == 0
    np.testing.assert_array_equal(forces, fresh[1])


def test_a_sweep_run_again_after_its_data_changed_is_refused(tmp_path, capsys, monkeypatch):
    """A sweep run again (or extended by a grid value) after its data file was labelled again reused the finished
    points, trained and tested on the old labels, and tabled them beside the new points (E MAE 58 and 572 meV in
    one results.csv), saying only "split was made from a dataset with different content" as a UserWarning per
    point. The nested split files record the data's hash: now one line. Planned with --dry-run (no training)."""
    from bad_inputs_common import sweep_config
    from test_bad_inputs_md import snapshot

    from torchmdx.cli.main import main

    monkeypatch.chdir(tmp_path)
    sweep_config(tmp_path)
    assert main(["sweep", "s.yaml", "--grid", "train.lr=1e-3", "--out", "sw", "--dry-run"]) == 0
    assert main(["sweep", "s.yaml", "--grid", "train.lr=1e-3,2e-3", "--out", "sw", "--dry-run"]) == 0  # same data
    data = dict(np.load(tmp_path / "e.npz"))
    data["E"] = data["E"] * 10 + 3  # the same structures labelled again
    np.savez(tmp_path / "e.npz", **data)
    before = snapshot(tmp_path / "sw")
    capsys.readouterr()
    rc = main(["sweep", "s.yaml", "--grid", "train.lr=1e-3,2e-3", "--out", "sw"])
    captured = capsys.readouterr()
    # the cache's own note ("rebuilding ...: the source changed") comes first: the hash is the rebuilt cache's
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in captured.err
    assert snapshot(tmp_path / "sw") == before
    line = errors[0]
    assert line.startswith("error: sweep folder sw was planned on e.npz with other content (sw/splits/train_12.npz "
                           "records data hash ")
    assert line.endswith("the points trained then would be tabled beside points of the changed data; use --out for "
                         "a new sweep folder, or restore the data file")
