"""Bad inputs, round 12: round 11's leftovers (slmc energy scales, md far from the origin in
float32, a caller's model switched to eval mode or converted) and a hunt through the CLI and the
Python API as a user of MACE/NequIP/TorchMD-NET would try them: virial keys, stress labels without
a cell volume or in bar, MACE-style force keys, files read twice, ASE constraints in label,
checkpoints of another layout, slabs without vacuum (see docs/bad_inputs.md, round 12).

Table rows: a setup ``(tmp_path, shared_data) -> CLI arguments`` and the fragments the one
``error:`` line must hold; every file under ``tmp_path`` must come out unchanged. Tests of
behaviour follow.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.io import write

import torchmdx
from test_bad_inputs_more import refused_without_writes
from test_bad_inputs_round3 import _slmc_config
from test_bad_inputs_round9 import TINY


def _tiny_model():
    model = torchmdx.build_model(TINY)
    model.set_normalisation(elements=[1, 6, 8])
    return model


def _lj(t):
    from torchmdx.nn.analytic import LennardJones

    if not (t / "lj.pt").exists():
        LennardJones(0.0104, 3.4, cutoff=5.0).save(t / "lj.pt")
    return t / "lj.pt"


def _argon_crystal(offset=(0.0, 0.0, 0.0)):
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 2, 2)
    atoms.rattle(0.05, seed=1)
    atoms.positions += offset
    return atoms


# ---------------------------------------------------------------------------------- slmc
def slmc_J_beyond_float64(t, s):  # ran to exit 0 with ± inf and nan columns in its table
    return ["slmc", _slmc_config(t, lattice__J=1e300), "--no-progress"]


def slmc_mu_far_beyond_the_temperature(t, s):  # Ω constant, rounding noise: β·rmse 6.8e7, exit 0
    return ["slmc", _slmc_config(t, lattice__mu=1e20), "--no-progress"]


def slmc_temperature_of_1e_minus_300(t, s):  # Metropolis decided by float64 rounding of Ω
    return ["slmc", _slmc_config(t, lattice__temperature=1e-300), "--no-progress"]


# ---------------------------------------------------------------------------------- md
def md_float32_molecule_far_from_the_origin(t, s):  # positions in 0.06 Å steps, silently
    atoms = molecule("CH3CH2OH")
    atoms.positions += 1e6
    write(t / "far.xyz", atoms)
    model = _tiny_model()
    model.save(t / "m.pt")
    return ["md", t / "far.xyz", "--model", t / "m.pt", "--steps", "2", "--out", t / "md.extxyz", "--no-progress"]


def md_float32_no_wrap_far_crystal(t, s):  # --no-wrap keeps the far positions: refused as above
    write(t / "ar.extxyz", _argon_crystal((3e5, 0.0, 0.0)))
    return ["md", t / "ar.extxyz", "--model", _lj(t), "--steps", "2", "--out", t / "md.extxyz", "--no-progress",
            "--no-wrap"]


# ---------------------------------------------------------------------------------- stress labels
def _copper_with_a_dimer(path, dimer_cell=None):
    """Three EMT-labelled Cu crystals and a Cu dimer (pbc False) with a stress label, its cell
    ``dimer_cell`` (None: no cell, as a molecule is often written)."""
    from ase import Atoms
    from ase.calculators.emt import EMT

    frames = []
    for i in range(4):
        if i == 0:
            atoms = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.3]], cell=[12, 12, 12], pbc=True)
        else:
            atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
            atoms.rattle(0.05, seed=i)
        atoms.calc = EMT()
        energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        atoms.calc = None
        atoms.info.update(energy=energy, stress=stress)
        atoms.arrays["forces"] = forces
        if i == 0:
            atoms.pbc = False
            atoms.cell = dimer_cell
        frames.append(atoms)
    write(path, frames, format="extxyz")
    return path


def train_stress_on_a_molecule_without_a_cell(t, s):  # NaN loss: "training diverged: try a smaller lr"
    import yaml

    cache = t.parent / (t.name + "_cache")  # the cache is built before the labels are read: outside t
    config = {"data": {"path": str(_copper_with_a_dimer(t / "cu.extxyz")), "cache_dir": str(cache),
                       "train_size": 2, "val_size": 1, "test_size": 1, "batch_size": 2},
              "model": {"embedding_dimension": 8, "num_layers": 1, "num_heads": 2, "num_rbf": 4,
                        "cutoff_upper": 3.5, "backend": "torch"},
              "train": {"stress_weight": 1.0},
              "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
              "run_dir": str(t / "run")}
    (t / "config.yaml").write_text(yaml.safe_dump(config))
    return ["train", t / "config.yaml"]


def train_mace_style_file_without_its_forces_key(t, s):  # "has no forces": REF_forces went unnamed
    import yaml

    frames = []
    for i in range(4):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(0.05, seed=i)
        atoms.info["REF_energy"] = -100.0 - 0.01 * i
        atoms.arrays["REF_forces"] = np.random.default_rng(i).normal(size=(len(atoms), 3))
        frames.append(atoms)
    write(t / "mace.extxyz", frames, format="extxyz")
    config = {"data": {"path": str(t / "mace.extxyz"), "energy_key": "REF_energy",
                       "cache_dir": str(t.parent / (t.name + "_cache")), "train_size": 2, "val_size": 1,
                       "test_size": 1, "batch_size": 2},
              "model": TINY, "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1},
              "run_dir": str(t / "run")}
    (t / "config.yaml").write_text(yaml.safe_dump(config))
    return ["train", t / "config.yaml"]


def train_resume_checkpoint_of_another_layout(t, s):  # Lightning's 36-line state_dict traceback
    import yaml

    from torchmdx.train.module import PotentialModule

    config = {"data": {"path": str(s / "md17" / "md17_ethanol_xtb.npz"), "cache_dir": str(t.parent / (t.name + "_c")),
                       "train_size": 8, "val_size": 8, "test_size": 8, "batch_size": 8},
              "model": {**TINY}, "trainer": {"max_epochs": 2, "accelerator": "cpu", "devices": 1},
              "run_dir": str(t / "run")}
    config["model"].pop("seed")
    (t / "config.yaml").write_text(yaml.safe_dump(config))
    state = PotentialModule(model=config["model"]).state_dict()  # an "older layout": one weight renamed
    state["model.representation.embed.weight"] = state.pop("model.representation.embedding.weight")
    (t / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": state, "epoch": 0, "global_step": 1}, t / "run" / "checkpoints" / "last.ckpt")
    return ["train", t / "config.yaml", "--resume"]


ROWS = [
    (slmc_J_beyond_float64, ["lattice.J", "1e+300", "float64"]),
    (slmc_mu_far_beyond_the_temperature, ["lattice.temperature", "mu = 1e+20", "rounding"]),
    (slmc_temperature_of_1e_minus_300, ["lattice.temperature", "1e-300", "rounding"]),
    (md_float32_molecule_far_from_the_origin, ["far.xyz", "atom 6 (H)", "1e+06 Å from the origin", "0.062 Å",
                                                "--dtype float64"]),
    (md_float32_no_wrap_far_crystal, ["ar.extxyz", "3e+05 Å from the origin", "--dtype float64"]),
    (train_stress_on_a_molecule_without_a_cell, ["cu.extxyz: structure 0 has a stress label but its cell spans no "
                                                 "volume", "pbc [False, False, False]"]),
    (train_resume_checkpoint_of_another_layout, ["--resume:", "last.ckpt: its weights do not fit the model",
                                                 "missing ['model.representation.embedding.weight']"]),
    (train_mace_style_file_without_its_forces_key, ["mace.extxyz has no forces 'forces' (its per-atom arrays: "
                                                    "REF_forces; data.forces_key names"]),
]


@pytest.mark.parametrize("setup,fragments", ROWS, ids=[row[0].__name__ for row in ROWS])
def test_refused_with_one_line_and_nothing_written(tmp_path, shared_data, capsys, monkeypatch, setup, fragments):
    refused_without_writes(tmp_path, shared_data, capsys, monkeypatch, setup, fragments)


# ---------------------------------------------------------------------------------- behaviour
def test_slmc_scales_that_float64_carries_still_validate():
    """The bound refuses only what float64 cannot resolve: T = 1e-8 t, J = 1e8 t, T = 1e20 t
    (the infinite-temperature limit, a correct result), J = 0 and J < 0, μ = 1e6 t, and every
    shipped L = 4 / L = 6 config pass."""
    from torchmdx.lattice.config import build_slmc_config, load_slmc_config
    import yaml
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for key, value in [("temperature", 1e-8), ("J", 1e8), ("temperature", 1e20), ("J", 0.0), ("J", -8.0),
                       ("mu", 1e6), ("t", 1e-300)]:
        values = yaml.safe_load(open(root / "configs" / "slmc_l4.yaml"))
        values["lattice"][key] = value
        if key == "mu":
            values["lattice"]["filling"] = None
        build_slmc_config(values)
    for name in ("slmc_l4.yaml", "slmc_l6.yaml"):
        load_slmc_config(root / "configs" / name)


def test_md_float32_periodic_crystal_far_from_the_origin_is_wrapped_in_float64():
    """A periodic structure given 10^6 Å from the origin: the engine wrapped its positions into
    the cell after converting them to float32 (steps of 0.06 Å: -20.790 eV against -20.813 eV
    for the 256-atom box at the origin); wrapped in float64 first, the energy and forces are
    those of the same crystal at the origin (a lattice translation)."""
    from torchmdx.md.engine import Simulation
    from torchmdx.nn.analytic import LennardJones

    lj = LennardJones(0.0104, 3.4, cutoff=5.0)
    near = _argon_crystal()
    far = _argon_crystal(np.array([1e6, -3e5, 2e5]) + 0.37)
    states = [Simulation(lj, [a], dtype=torch.float32, temperature_K=0.0).initialize() for a in (near, far)]
    reference = Simulation(lj, [near], dtype=torch.float64, temperature_K=0.0).initialize()
    assert float(states[1].energy[0]) == pytest.approx(float(reference.energy[0]), rel=1e-5)
    assert float(states[0].energy[0]) == pytest.approx(float(reference.energy[0]), rel=1e-5)
    np.testing.assert_allclose(states[1].forces.double().numpy(), reference.forces.numpy(), atol=2e-5)


def test_md_simulation_api_refuses_a_float32_molecule_far_from_the_origin():
    """The Python API (``torchmdx.md.engine.Simulation``) kept float32 positions 10^6 Å out as the
    CLI did; one line naming the structure and atom, float64 runs."""
    from torchmdx.errors import ConfigError
    from torchmdx.md.engine import Simulation

    far = molecule("CH3CH2OH")
    far.positions += 1e6
    with pytest.raises(ConfigError, match=r"structure 0: atom 6 \(H\) lies 1e\+06 Å from the origin"):
        Simulation(_tiny_model(), [far], dtype=torch.float32)
    Simulation(_tiny_model(), [far], dtype=torch.float64, temperature_K=0.0).initialize()


def test_md_float32_near_the_origin_and_float64_far_still_run(tmp_path, monkeypatch):
    """The closest valid inputs: a molecule 5000 Å out in float32 (steps of 0.0005 Å), and one
    10^6 Å out in float64, run."""
    from torchmdx.cli.main import main

    monkeypatch.chdir(tmp_path)
    _tiny_model().save(tmp_path / "m.pt")
    for offset, dtype in ((5000.0, "float32"), (1e6, "float64")):
        atoms = molecule("CH3CH2OH")
        atoms.positions += offset
        write(tmp_path / "far.xyz", atoms)
        assert main(["md", "far.xyz", "--model", "m.pt", "--steps", "2", "--out", f"md_{dtype}.extxyz",
                     "--no-progress", "--dtype", dtype]) == 0


def test_calculator_leaves_the_callers_training_mode_alone():
    """``Calculator(model)`` called ``model.eval()`` on the caller's own module: a model being
    trained (and shared with the calculator) was left in eval mode. Now its mode is switched only
    during a call and restored; the energy is that of the model in eval mode."""
    model = _tiny_model()
    model.train()
    atoms = molecule("CH3CH2OH")
    atoms.calc = torchmdx.Calculator(model)
    energy = atoms.get_potential_energy()
    assert model.training and all(m.training for m in model.modules())
    reference = _tiny_model().eval()
    other = atoms.copy()
    other.calc = torchmdx.Calculator(reference)
    assert energy == pytest.approx(other.get_potential_energy(), rel=1e-6)
    assert not reference.training  # a model in eval mode stays so


def test_md_simulation_does_not_convert_the_callers_model():
    """``Simulation(model, ..., dtype=float64)`` ran ``model.to(float64)`` on the caller's object
    (round 11 fixed the same in the Calculator): a float32 model came back float64, and so did
    another Calculator's or Simulation's model sharing it. The run gets a converted copy."""
    from torchmdx.md.engine import Simulation

    model = _tiny_model()
    model.train()
    sim = Simulation(model, [molecule("CH3CH2OH")], dtype=torch.float64, temperature_K=0.0)
    sim.initialize()
    assert next(model.parameters()).dtype == torch.float32 and model.training
    assert next(sim.potential.parameters()).dtype == torch.float64 and not sim.potential.training
    Simulation(model, [molecule("CH3CH2OH")], dtype=torch.float32, temperature_K=0.0)
    assert model.atomref.dtype == torch.float64  # its float64 normalisation buffers stay float64 too


def test_resume_checkpoint_of_another_layout_is_one_line(tmp_path):
    """``train --resume`` of a checkpoint whose weights have other names (another torchmdx version's
    layout) or shapes (another model, with the saved config deleted) was Lightning's 36-line
    "Error(s) in loading state_dict" traceback; the export of the same file was already one line."""
    from torchmdx.errors import ConfigError
    from torchmdx.train.run import _check_checkpoint_fits

    module = torch.nn.Module()
    module.model = _tiny_model()
    state = module.state_dict()
    torch.save({"state_dict": state, "epoch": 0}, tmp_path / "good.ckpt")
    _check_checkpoint_fits(tmp_path / "good.ckpt", module)  # the same layout: accepted
    renamed = dict(state)
    renamed["model.representation.embed.weight"] = renamed.pop("model.representation.embedding.weight")
    torch.save({"state_dict": renamed}, tmp_path / "old.ckpt")
    with pytest.raises(ConfigError, match=r"missing \['model.representation.embedding.weight'\]; unexpected"):
        _check_checkpoint_fits(tmp_path / "old.ckpt", module)
    resized = dict(state)
    resized["model.head.mlp.0.bias"] = torch.zeros(99)
    torch.save({"state_dict": resized}, tmp_path / "other.ckpt")
    with pytest.raises(ConfigError, match=r"model.head.mlp.0.bias of shape \[99\]"):
        _check_checkpoint_fits(tmp_path / "other.ckpt", module)


def _copper_frames(path, count=3):
    """Rattled Cu crystals labelled by ASE's EMT: the stress under ``stress_true`` and
    ``REF_virial`` / ``virial`` (W = -σ V, MACE's and NequIP's names) in the info."""
    from ase.calculators.emt import EMT

    frames = []
    for i in range(count):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
        atoms.rattle(0.05, seed=i)
        atoms.calc = EMT()
        energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)
        atoms.calc = None
        atoms.info.update(energy=energy, stress_true=stress.reshape(-1),
                          REF_virial=(-stress * atoms.get_volume()).reshape(-1))
        atoms.arrays["forces"] = forces
        frames.append((atoms, stress))
    write(path, [a for a, _ in frames], format="extxyz")
    return np.stack([s for _, s in frames])


def test_a_stress_key_naming_a_virial_is_read_as_a_virial(tmp_path):
    """``data.stress_key: REF_virial`` (or ``virial``): the virial W (eV) was taken for a stress
    (eV/Å³), 100-1000 times too large and of the wrong sign, silently; the default key already
    turned a ``virial`` into σ = -W / V. A stress key of another name is read as before."""
    from torchmdx.data.ase_format import read_ase

    expected = _copper_frames(tmp_path / "cu.extxyz")
    for key in ("REF_virial", "stress_true"):
        st = read_ase(tmp_path / "cu.extxyz", stress_key=key)
        np.testing.assert_allclose(st.extras["stress"].reshape(-1, 3, 3), expected, rtol=1e-8, atol=1e-12)
    text = (tmp_path / "cu.extxyz").read_text().replace("REF_virial=", "virial=")
    (tmp_path / "nequip.extxyz").write_text(text)
    st = read_ase(tmp_path / "nequip.extxyz", stress_key="virial")
    np.testing.assert_allclose(st.extras["stress"].reshape(-1, 3, 3), expected, rtol=1e-8, atol=1e-12)


def test_stress_label_of_a_molecule_in_a_box_is_kept(tmp_path):
    """The closest valid input of the row above: the dimer (pbc False) written with its 12 Å box
    keeps its stress label (the model's strain derivative over that volume is finite)."""
    from torchmdx.data.ase_format import read_ase
    from torchmdx.train.data_checks import _check_stress_volumes

    st = read_ase(_copper_with_a_dimer(tmp_path / "boxed.extxyz", dimer_cell=[12, 12, 12]))
    assert np.isfinite(st.extras["stress"][0]).all() and not st.pbc[0].any()
    _check_stress_volumes(st, "boxed.extxyz")


def test_label_writes_raw_forces_of_atoms_an_ase_constraint_fixes(tmp_path, monkeypatch):
    """``torchmdx label`` of periodic frames with ASE constraints (a relaxation's .traj with FixAtoms, an
    extxyz ``move_mask``): the labeller's copy kept them and ``get_forces()`` applied them, so
    the fixed atoms were labelled with zero forces, silently wrong training data. A stand-in
    ``tblite.ase`` (tblite is not installed here) computes ASE's EMT."""
    import sys
    import types

    from ase.calculators.emt import EMT
    from ase.constraints import FixAtoms
    from ase.io import read

    from torchmdx.cli.main import main

    class TBLite(EMT):
        def __init__(self, **kwargs):
            super().__init__()

    package, module = types.ModuleType("tblite"), types.ModuleType("tblite.ase")
    module.TBLite, package.ase = TBLite, module
    monkeypatch.setitem(sys.modules, "tblite", package)
    monkeypatch.setitem(sys.modules, "tblite.ase", module)
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    atoms.rattle(0.1, seed=3)
    atoms.set_constraint(FixAtoms([0, 5]))
    write(tmp_path / "in.traj", atoms)
    assert main(["label", str(tmp_path / "in.traj"), "-o", str(tmp_path / "out.extxyz"), "--no-progress"]) == 0
    labelled = read(tmp_path / "out.extxyz")
    reference = atoms.copy()
    reference.set_constraint()
    reference.calc = EMT()
    np.testing.assert_allclose(labelled.get_forces(apply_constraint=False), reference.get_forces(), atol=1e-6)
    assert np.abs(labelled.get_forces(apply_constraint=False)[[0, 5]]).max() > 1e-2
    # a periodic frame's stress: ase.constraints.voigt_6_to_full_3x3_stress, which label imported,
    # is gone from ASE 3.29, so every periodic frame failed ("gfn2-xtb failed (cannot import name ...)")
    np.testing.assert_allclose(labelled.get_stress(apply_constraint=False), reference.get_stress(), atol=1e-9)


def _random_structures(rng, count, copies=()):
    """count structures of 1-6 atoms (random elements and positions); ``copies``: (i, j) pairs,
    structure i made an exact copy of structure j. A stand-in with offsets, pos and z."""
    from types import SimpleNamespace

    sizes = rng.integers(1, 7, size=count)
    for i, j in copies:
        sizes[i] = sizes[j]
    offsets = np.r_[0, np.cumsum(sizes)]
    pos = rng.normal(size=(offsets[-1], 3)) * 3
    z = rng.integers(1, 9, size=offsets[-1])
    for i, j in copies:
        pos[offsets[i]:offsets[i + 1]] = pos[offsets[j]:offsets[j + 1]]
        z[offsets[i]:offsets[i + 1]] = z[offsets[j]:offsets[j + 1]]
    return SimpleNamespace(offsets=offsets, pos=pos, z=z)


def test_copies_across_split_parts_against_all_pairs():
    """Duplicated frames (a file read twice) landed in the training and the test part of a random
    split without a word. ``copies_across_parts`` against an all-pairs comparison on random data
    with planted copies (and near-copies: one coordinate changed by one ulp, a swapped element),
    small chunks so that structures straddle chunk borders."""
    from torchmdx.data.splits import Split, copies_across_parts

    rng = np.random.default_rng(0)
    outcomes = set()
    for trial in range(30):
        count = int(rng.integers(4, 60))
        chosen = rng.choice(count, 2 * int(rng.integers(0, 4)), replace=False)  # copies and originals apart
        pairs = [(int(chosen[2 * k]), int(chosen[2 * k + 1])) for k in range(len(chosen) // 2)]
        st = _random_structures(rng, count, pairs)
        if trial % 3 == 0 and pairs:  # a near copy: not a copy
            i, j = pairs[0]
            st.pos[st.offsets[i]] = np.nextafter(st.pos[st.offsets[i]], np.inf)
        order = rng.permutation(count)
        n_val, n_test = int(rng.integers(1, count // 3 + 1)), int(rng.integers(1, count // 3 + 1))
        split = Split(order[n_val + n_test:], order[:n_val], order[n_val:n_val + n_test], count)
        key = [(st.z[st.offsets[s]:st.offsets[s + 1]].tobytes(), st.pos[st.offsets[s]:st.offsets[s + 1]].tobytes())
               for s in range(count)]
        train_keys = {key[s] for s in split.train}
        expected = {p: sum(key[s] in train_keys for s in split[p]) for p in ("val", "test")}
        line = copies_across_parts(st, split, chunk_atoms=int(rng.integers(1, 20)))
        outcomes.add(line is None)
        if not any(expected.values()):
            assert line is None
            continue
        for part, n in expected.items():
            assert (f"{n} of the {part} split" in line) == (n > 0), (expected, line)
    assert outcomes == {True, False}  # both kinds of trial ran


def test_train_warns_of_a_file_read_twice(tmp_path, shared_data, monkeypatch):
    """The data module warns (one line; the command line prints it as ``warning: ...``) when the
    split puts copies of training structures into validation or test; 60 distinct frames of the
    shared MD17 file get no warning."""
    import warnings

    from torchmdx.data.data_config import DataConfig
    from torchmdx.data.datamodule import TorchmdxDataModule

    data = dict(np.load(shared_data / "md17" / "md17_ethanol_xtb.npz"))
    once = {**data, **{key: data[key][:60] for key in ("R", "E", "F")}}
    np.savez(tmp_path / "once.npz", **once)
    for key in ("R", "E", "F"):
        data[key] = np.concatenate([data[key][:30], data[key][:30]])
    np.savez(tmp_path / "twice.npz", **data)
    for path, warned in ((tmp_path / "twice.npz", True), (tmp_path / "once.npz", False)):
        config = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), train_size=30, val_size=10,
                            test_size=10, batch_size=8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            TorchmdxDataModule(config).setup("fit")
        lines = [str(w.message) for w in caught if "exact copy in the training split" in str(w.message)]
        assert bool(lines) == warned, lines


def _slab_without_vacuum():
    from ase.build import fcc111

    slab = fcc111("Ar", (4, 4, 3), a=5.26, vacuum=8.0)
    slab.info.pop("adsorbate_info", None)
    flat = slab.copy()
    flat.cell[2] = [0.0, 0.0, 0.0]  # the open direction given no vector
    return slab, flat


def test_predict_stress_of_a_slab_whose_cell_spans_no_volume_is_one_line():
    """``Potential.predict(slab, stress=True)`` with a zero open row gave a 3 x 3 NaN stress,
    silently (round 11 made the Calculator say so); now the same one line, naming the structure
    of a list. The closest valid inputs: the slab with its vacuum vector, a list of a molecule and
    a crystal (the molecule's stress stays NaN: it has none)."""
    from torchmdx.errors import ModelError
    from torchmdx.nn.analytic import LennardJones

    lj = LennardJones(0.0104, 3.4, cutoff=5.0)
    slab, flat = _slab_without_vacuum()
    with pytest.raises(ModelError, match=r"^stress of a structure with pbc \[True, True, False\] divides by the volume"):
        lj.predict(flat, stress=True)
    with pytest.raises(ModelError, match=r"^structure 1: stress"):
        lj.predict([slab, flat], stress=True)
    assert np.isfinite(lj.predict(slab, stress=True)["stress"]).all()
    assert np.isfinite(lj.predict(flat)["forces"]).all()  # energies and forces need no volume
    dimer = molecule("H2")
    dimer.symbols = "Ar2"
    dimer.positions *= 5
    mixed = lj.predict([dimer, _argon_crystal()], stress=True)["stress"]
    assert np.isnan(mixed[0]).all() and np.isfinite(mixed[1]).all()


def test_label_with_a_model_gives_a_slab_without_vacuum_no_nan_stress(tmp_path, monkeypatch):
    """``label --method model:...`` of a slab whose open row is 0 wrote ``stress="nan ..."`` into
    the training file; now energy and forces, and no stress (it needs a cell volume); the slab
    with its vacuum vector keeps its stress."""
    from ase.io import read

    from torchmdx.cli.main import main
    from torchmdx.nn.analytic import LennardJones

    monkeypatch.chdir(tmp_path)
    LennardJones(0.0104, 3.4, cutoff=5.0).save(tmp_path / "lj.pt")
    slab, flat = _slab_without_vacuum()
    write(tmp_path / "slabs.extxyz", [flat, slab], format="extxyz")
    assert main(["label", "slabs.extxyz", "-o", "out.extxyz", "--method", "model:lj.pt", "--no-progress"]) == 0
    frames = read(tmp_path / "out.extxyz", ":")
    assert "stress" not in frames[0].calc.results and np.isfinite(frames[0].get_forces()).all()
    assert np.isfinite(frames[1].get_stress()).all()


def test_stress_in_bar_is_beyond_physical(tmp_path):
    """A stress written in bar (LAMMPS's pressure unit) or Pa under the stress key trained as
    eV/Å³ (1.6e6 times too large) without a word; the label check (round 7: forces, energies) now
    bounds the virial per atom |σ| V / N at 1000 eV/atom. The same crystals in eV/Å³ pass, and so
    do they in kbar (a few kbar near equilibrium are not distinguishable from eV/Å³)."""
    from torchmdx.data.ase_format import read_ase
    from torchmdx.data.label_check import check_labels
    from torchmdx.errors import DataError

    _copper_frames(tmp_path / "cu.extxyz")
    for factor, refused in ((1.0, False), (1602.18, False), (1.60218e6, True)):
        structures = read_ase(tmp_path / "cu.extxyz", stress_key="stress_true")
        structures.extras["stress"] = structures.extras["stress"] * factor
        if refused:
            with pytest.raises(DataError, match=r"structure 0: stress .* eV per atom, beyond the 1e\+03 eV/atom"):
                check_labels(structures)
        else:
            check_labels(structures)


def test_a_guessed_md17_xyz_says_its_units_once(tmp_path):
    """A plain xyz with one number per comment line and 7 columns is MD17's layout (kcal/mol), but
    also anyone's eV energies: building its cache says which units were assumed; naming the
    format or the unit says nothing; the energies follow the unit (1 kcal/mol = 0.0433641 eV)."""
    import h5py

    from torchmdx.data.cache import build_cache

    path = tmp_path / "frames.xyz"
    path.write_text("2\n-10.5\nH 0 0 0 0.1 0 0\nH 0 0 0.74 -0.1 0 0\n" * 2)
    said = []
    guessed = build_cache(path, cache_dir=tmp_path / "a", say=said.append)
    assert len(said) == 1 and "kcal/mol" in said[0] and "energy_unit: eV" in said[0] and str(path) in said[0]
    assert build_cache(path, cache_dir=tmp_path / "a", say=said.append) == guessed and len(said) == 1  # once
    for options in ({"format": "md17-xyz"}, {"energy_unit": "eV"}):
        quiet = []
        build_cache(path, cache_dir=tmp_path / "b", force=True, say=quiet.append, **options)
        assert quiet == [], options
    with h5py.File(guessed) as h5:
        assert h5["energy"][0] == pytest.approx(-10.5 * 0.0433641, rel=1e-5)  # eV
