"""Regressions on valid input found by the 2026-12-06 audit of the session's bad-input hardening
(rounds 9 and 10) and the attention key-bias removal: each test runs an input that worked before
those changes and checks it still gives the earlier result."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.io import read

import torchmdx
from test_bad_inputs_round10 import _argon, _md, _momenta


# ------------------------------------------------------------------ md: --velocities auto
def test_md_replicas_of_a_frame_with_velocities_draw_a_different_start_per_copy(tmp_path, capsys):
    """`md frame.extxyz --replicas 2` (e.g. the last frame of an earlier torchmdx trajectory, which
    carries momenta) ran before --velocities existed, drawing new velocities per copy; round 10's
    `auto` refused it. Now `auto` draws per copy (with a note); `file` starts every copy from the
    file's momenta."""
    from torchmdx.cli.main import main

    momenta = _momenta()
    path = _argon(tmp_path, momenta=momenta)
    capsys.readouterr()
    assert main([str(a) for a in _md(tmp_path, path, "--replicas", "2")]) == 0
    err = capsys.readouterr().err
    assert "note: the velocities in the structure files are not used: --replicas 2 copies get different ones" in err
    first = [read(tmp_path / f"md.{k}.extxyz", 0).get_momenta() for k in range(2)]
    assert np.abs(first[0] - first[1]).max() > 0.1  # different Maxwell–Boltzmann draws
    assert all(np.abs(p - momenta).max() > 0.1 and np.abs(p.sum(0)).max() < 1e-6 for p in first)

    assert main([str(a) for a in _md(tmp_path, path, "--replicas", "2", "--velocities", "file", "--force")]) == 0
    assert "note: initial velocities from the structure file (their momenta" in capsys.readouterr().err
    for k in range(2):
        np.testing.assert_allclose(read(tmp_path / f"md.{k}.extxyz", 0).get_momenta(), momenta, atol=1e-12)


def test_md_structures_some_with_velocities_draw_for_all_under_auto(tmp_path, capsys):
    """Two structure files, one a trajectory frame with momenta and one without: this ran before
    (velocities drawn for both); round 10's `auto` refused it although `draw` was the only way on."""
    from torchmdx.cli.main import main

    momenta = _momenta()
    with_v, without = _argon(tmp_path, momenta=momenta), _argon(tmp_path, "plain.extxyz")
    capsys.readouterr()
    assert main([str(a) for a in _md(tmp_path, [with_v, without])]) == 0
    err = capsys.readouterr().err
    assert "plain.extxyz carries none while" in err and "drawing Maxwell–Boltzmann ones at 300 K for all" in err
    drawn = read(tmp_path / "md.0.extxyz", 0).get_momenta()
    assert np.abs(drawn - momenta).max() > 0.1 and np.abs(drawn.sum(0)).max() < 1e-6


# ------------------------------------------------------------------ set_normalisation: numpy scalars
def test_set_normalisation_takes_numpy_0d_arrays():
    """`float()` took a 0-d numpy array (np.array(0.7), e.g. from array arithmetic) for scale, shift,
    energy_offset and atomref values; round 10's finiteness checks refused it ("must be a finite
    number > 0, got array(0.7)"). The model equals one given the plain floats."""
    from ase.build import molecule

    values = dict(scale=0.7, shift=-0.1, energy_offset=0.3, atomref={1: -13.6, 6: -1029.0, 8: -2040.0})
    plain = torchmdx.build_model({"embedding_dimension": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8,
                                  "dtype": "float64"})
    wrapped = torchmdx.build_model({"embedding_dimension": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8,
                                    "dtype": "float64"})
    wrapped.load_state_dict(plain.state_dict())
    plain.set_normalisation(**values, elements=[1, 6, 8])
    wrap = np.array
    wrapped.set_normalisation(scale=wrap(0.7), shift=wrap(-0.1), energy_offset=wrap(0.3),
                              atomref={z: wrap(e) for z, e in values["atomref"].items()}, elements=np.array([1, 6, 8]))
    atoms = molecule("CH3CH2OH")
    z, pos = torch.tensor(atoms.numbers), torch.tensor(atoms.positions)
    batch = torch.zeros(len(z), dtype=torch.long)
    e_plain, e_wrapped = plain(z, pos, batch)["energy"], wrapped(z, pos, batch)["energy"]
    assert float(e_plain.detach().sum()) < -4000  # the atomic references are in (2 C, 6 H, 1 O)
    torch.testing.assert_close(e_wrapped, e_plain, rtol=0, atol=0)


# ------------------------------------------------------------------ openmm-ml: atom indices
@pytest.mark.parametrize("atoms", [torch.tensor([2, 0, 1]), range(3), np.arange(3, dtype=np.uint32)],
                         ids=["torch tensor", "range", "numpy uint32"])
def test_openmm_ml_takes_integer_atom_indices_of_any_kind(tmp_path, atoms):
    """createMixedSystem's atoms as a torch tensor of indices: `int(a)` took its 0-d elements
    before round 10, whose whole-number check (numbers.Integral) refused them ("ML atom index
    tensor(2) is not a whole number"). The ML force is the one a plain list gives."""
    pytest.importorskip("openmmml")
    from openmm import Context, Platform, VerletIntegrator, unit

    from test_bad_inputs_round10 import TINY, _topology_and_system
    from torchmdx.openmm.mlpotential import TorchmdxPotentialImpl

    model = torchmdx.build_model(TINY)
    model.set_normalisation(elements=[1, 6, 8])
    model.save(tmp_path / "m.pt")
    positions = np.random.default_rng(0).normal(size=(9, 3)) * 0.15  # nm
    energies = []
    for given in (atoms, [int(a) for a in atoms]):
        topology, system = _topology_and_system()
        impl = TorchmdxPotentialImpl("torchmdx", tmp_path / "m.pt", implementation="python", device="cpu")
        impl.addForces(topology, system, given, 0)
        context = Context(system, VerletIntegrator(0.001), Platform.getPlatformByName("Reference"))
        context.setPositions(positions)
        energies.append(context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    assert energies[0] == energies[1] and energies[0] != 0


# ------------------------------------------------------------------ train: max_steps inside one epoch
def test_training_that_stops_inside_the_first_epoch_finishes(tmp_path, shared_data):
    """Not a regression of this session (the code before it failed alike), found by the audit:
    `trainer.max_steps` below one epoch's steps with early stopping on (the default patience) was
    Lightning's traceback "Early stopping conditioned on metric `val_loss` which is not available"
    (the check ran at the end of the cut-short epoch, before any validation). Early stopping now
    checks after validations only; the run ends with its model file."""
    import yaml

    from torchmdx.cli.main import main
    from torchmdx.train.export import read_checkpoint

    config = {"data": {"path": str(shared_data / "md17" / "md17_ethanol_xtb.npz"), "cache_dir": str(tmp_path / "c"),
                       "train_size": 48, "val_size": 16, "test_size": 0, "batch_size": 8},
              "model": {"embedding_dimension": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8, "cutoff_upper": 4.0},
              "train": {"early_stopping_patience": 5},
              "trainer": {"max_steps": 3, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
              "run_dir": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0  # 6 steps an epoch; stopped after 3
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert (tmp_path / "run" / "model.pt").is_file()


# ------------------------------------------------------------------ sweep: count and fraction sizes
def test_sweep_train_size_count_1_and_fraction_1_0_are_two_points():
    """Round 10 refused sweep points whose values the config reads as equal numbers (train.lr
    0.001 and '1e-3'); it equated every int with its float, but a split size of 1 is one
    structure and 1.0 all of them (data.splits.resolve_sizes). Both points plan again, as before;
    equal values are still refused."""
    from torchmdx.data.splits import resolve_sizes
    from torchmdx.errors import ConfigError
    from torchmdx.train.sweep_plan import plan_points

    assert resolve_sizes(100, 1, 0, 0)[0] == 1 and resolve_sizes(100, 1.0, 0, 0)[0] == 100
    points = plan_points({"data.train_size": [1, 1.0]}, {})
    assert sorted(repr(p.overrides["data.train_size"]) for p in points) == ["1", "1.0"]
    with pytest.raises(ConfigError, match="are the same training"):
        plan_points({"train.lr": [0.001, "1e-3"]}, {})
