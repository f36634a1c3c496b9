"""Bad inputs, round 30 (branch bad30): round 29's leftovers (BatchLoader's keyword arguments, element names, dangling
links, energy units), training configs, and the evaluate / export / sweep / label options; see docs/bad_inputs.md,
round 30.
"""

from __future__ import annotations

import numpy as np
import pytest

from torchmdx.errors import DataError, ModelError


@pytest.fixture
def ethanol_dataset(tmp_path, shared_data):
    """Ten ethanol frames of the MD17 file, as an H5Dataset."""
    from torchmdx.data import H5Dataset, build_cache

    d = np.load(shared_data / "md17" / "md17_ethanol_xtb.npz")
    np.savez(tmp_path / "ethanol.npz", R=d["R"][:10], z=d["z"], E=d["E"][:10], F=d["F"][:10])
    return H5Dataset(build_cache(tmp_path / "ethanol.npz", cache_dir=tmp_path / "cache"))


# ------------------------------------------------------------------------------ BatchLoader's keyword arguments
@pytest.mark.parametrize("kwargs, line", [
    ({"batchsize": 2}, "BatchLoader: unknown keyword argument 'batchsize' (did you mean 'batch_size'?); it takes "
                       "batch_size, shuffle, drop_last, indices, generator, num_workers, pin_memory, pad_ranks, pack"),
    ({"collate_fn": list}, "BatchLoader: unknown keyword argument 'collate_fn'; it takes batch_size, shuffle, "
                           "drop_last, indices, generator, num_workers, pin_memory, pad_ranks, pack"),
    ({"shuffle": "no"}, "BatchLoader: shuffle must be True or False, got 'no'"),
    ({"drop_last": 1}, "BatchLoader: drop_last must be True or False, got 1"),
    ({"num_workers": -1}, "BatchLoader: num_workers must be a whole number >= 0, got -1"),
    ({"sampler": [0, 1]}, "BatchLoader: sampler= is not taken (it draws its own batches of indices; use shuffle=, "
                          "generator= and indices=), got list"),
])
def test_batch_loader_refuses_keywords_it_would_ignore(ethanol_dataset, kwargs, line):
    """``BatchLoader(ds, batchsize=2)`` gave batches of 32 (swallowed by a catch-all), ``shuffle="no"`` shuffled."""
    from torchmdx.data import BatchLoader

    with pytest.raises(DataError) as info:
        BatchLoader(ethanol_dataset, **kwargs)
    assert str(info.value) == line


def test_batch_loader_is_still_recreated_by_lightning(ethanol_dataset):
    """The catch-all is there for Lightning, which re-creates a loader made in a data module's hook with its own
    arguments plus ``sampler=None, batch_sampler=None`` (``trainer.predict``, overfit batches): that still works."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DataLoader

    from torchmdx.data import BatchLoader

    with _replace_dunder_methods(DataLoader, "dataset"):
        loader = BatchLoader(ethanol_dataset, batch_size=3, indices=np.arange(7))
    again = _update_dataloader(loader, None, mode=RunningStage.PREDICTING)
    assert isinstance(again, BatchLoader) and again is not loader
    assert [b.num_graphs for b in again] == [3, 3, 1]


# ------------------------------------------------------------------------------ element names
def test_an_element_without_a_symbol_is_named_once():
    """``predict`` of an atom with Z=200 said "element Z=200 (Z=200)"."""
    from bad_inputs_common import tiny_model, water

    atoms = water()
    atoms.numbers[1] = 200
    with pytest.raises(ModelError) as info:
        tiny_model().predict(atoms)
    assert str(info.value) == "atom 1 is element Z=200, which this model does not know; known elements: H, C, O"
    atoms.numbers[1] = 9
    with pytest.raises(ModelError) as info:
        tiny_model().predict(atoms)
    assert str(info.value) == "atom 1 is element F (Z=9), which this model does not know; known elements: H, C, O"


# ------------------------------------------------------------------------------ dangling links
@pytest.mark.parametrize("command", [
    ["data", "info", "{link}"],
    ["md", "{link}", "--model", "lj.pt", "--steps", "1"],
    ["evaluate", "lj.pt", "--data", "{link}"],
])
def test_a_link_to_a_missing_file_is_named_as_one(tmp_path, capsys, command):
    """``data info`` and ``md`` (and ``evaluate --data``) said "file not found" for a symbolic link to a missing file,
    where the model and config loaders said what it is."""
    from bad_inputs_common import lj_file, refused_exactly

    work = tmp_path / "work"  # the folder checked for changes (the snapshot cannot stat a dangling link)
    work.mkdir()
    lj_file(work)
    link = tmp_path / "ar.xyz"
    link.symlink_to(tmp_path / "gone.xyz")
    argv = [a.format(link=link) if a != "lj.pt" else work / "lj.pt" for a in command]
    refused_exactly(capsys, argv, f"error: {link}: is a symbolic link to the missing {tmp_path / 'gone.xyz'}", work)


# ------------------------------------------------------------------------------ energy units
def _water_frames(path, energies):
    from ase.build import molecule
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    frames = []
    for i, energy in enumerate(energies):
        atoms = molecule("H2O")
        atoms.positions += np.random.RandomState(i).normal(0, 0.05, (3, 3))
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=np.zeros((3, 3)))
        frames.append(atoms)
    write(path, frames)
    return path


@pytest.mark.parametrize("option, line", [
    ("--energy-unit", "--energy-unit is empty (''); give an energy unit such as kcal/mol, Hartree or eV, or leave it "
                      "out for the format's own unit"),
    ("--length-unit", "--length-unit is empty (''); give a length unit such as Bohr or Å, or leave it out for the "
                      "format's own unit"),
    ("--energy-key", "--energy-key is empty (''); give the file's key of the energies, or leave it out for the format's "
                     "default key"),
])
def test_an_empty_unit_or_key_option_is_not_taken_as_not_given(tmp_path, capsys, option, line):
    """``data info w.xyz --energy-unit ''`` read the energies in eV (the format's own unit) without a word, as
    ``evaluate --energy-unit ''`` and a config's ``energy_unit: ''`` did; ``--energy-key ''`` read the key 'energy'."""
    from bad_inputs_common import refused_exactly

    data = _water_frames(tmp_path / "w.xyz", [-1.0, -1.1])
    refused_exactly(capsys, ["data", "info", data, option, "", "--cache-dir", tmp_path / "c"], f"error: {line}",
                    tmp_path)
    refused_exactly(capsys, ["evaluate", tmp_path / "m.pt", "--data", data, option, ""], f"error: {line}", tmp_path)


def test_an_empty_unit_in_a_config_is_one_line():
    from torchmdx.config import from_dict
    from torchmdx.data.data_config import DataConfig
    from torchmdx.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        from_dict(DataConfig, {"path": "w.xyz", "energy_unit": ""}, "data")
    assert str(info.value) == ("config key 'data.energy_unit' is empty (''); give an energy unit such as kcal/mol, "
                               "Hartree or eV, or leave it out for the format's own unit")


def test_rydberg_is_an_energy_unit(tmp_path):
    """Quantum ESPRESSO's Rydberg was "unknown energy unit 'Ry'". 1 Ry = Eh / 2 = 27.211386024367243 / 2 eV =
    13.605693012183622 eV with ASE's (CODATA 2014) Hartree that the table holds; CODATA 2018 gives 13.605693122990 eV
    (1e-8 apart)."""
    from torchmdx import units
    from torchmdx.data import read_structures

    assert units.energy_factor("Ry") == units.energy_factor("rydberg") == 13.605693012183622
    assert units.energy_factor("Ry") == pytest.approx(13.605693122990, rel=1e-8)
    st = read_structures(_water_frames(tmp_path / "w.xyz", [-2.0, -3.0]), energy_unit="Ry")
    assert st.energy.tolist() == pytest.approx([-27.211386024367243, -40.817079036550865], rel=1e-12)


# ------------------------------------------------------------------------------ training configs
def _config(tmp_path, extra: str = "", data: bool = True) -> object:
    """A small training config ``tmp_path/t.yaml`` (never trained here: the lines come while it is read)."""
    text = ("data: {path: ethanol.npz, train_size: 6, val_size: 2, test_size: 2}\n" if data else "") + \
        "model: {embedding_dimension: 8, num_layers: 1, num_heads: 2}\ntrainer: {max_epochs: 1}\n" + extra
    (tmp_path / "t.yaml").write_text(text)
    return tmp_path / "t.yaml"


@pytest.mark.parametrize("setting, line", [
    ("trainer.accelerator=tpu", "config key 'trainer.accelerator' must be cpu, gpu (cuda) or auto, got 'tpu'"),
    ("trainer.accelerator=mps", "config key 'trainer.accelerator' must be cpu, gpu (cuda) or auto, got 'mps'"),
    ("train..lr=1", "--set 'train..lr=1': the key 'train..lr' has an empty part; expected section.key=value (e.g. "
                    "train.lr=1e-4)"),
    ("=1", "--set '=1': the key '' has an empty part; expected section.key=value (e.g. train.lr=1e-4)"),
    ("model.r_max=5.0", "config key 'model.r_max' does not exist (MACE's and NequIP's cutoff radius is "
                        "model.cutoff_upper here (Å)); allowed: "),
    ("model.num_channels=64", "config key 'model.num_channels' does not exist (MACE's feature channels are "
                              "model.embedding_dimension here (model.channels for the equiformer and gatr "
                              "architectures)); allowed: "),
    ("train.num_epochs=10", "config key 'train.num_epochs' does not exist (TorchMD-NET's num_epochs is "
                            "trainer.max_epochs here); allowed: "),
    ("lr_patience=5", "config key 'lr_patience' does not exist at the top level; it is a key of the train: section "
                      "(train.lr_patience)"),
    ("seed=3", "config key 'seed' does not exist at the top level; it is a key of the sections data:, model: and "
               "train: (data.seed, model.seed, train.seed)"),
])
def test_training_config_lines(tmp_path, capsys, setting, line):
    """``trainer.accelerator: tpu`` was refused only after the data were read and cached; ``--set train..lr=1`` said
    "config key 'train.' does not exist"; MACE's ``r_max`` got "did you mean 'max_z'?" (the largest atomic number),
    ``num_channels`` "'num_heads'?", TorchMD-NET's ``num_epochs`` nothing; a section's key at the top level
    (``lr_patience: 5``) "does not exist; allowed: data, model, run_dir, train, trainer"."""
    from bad_inputs_common import refused

    config = _config(tmp_path)
    got = refused(capsys, ["train", config, "--set", setting], [line], tmp_path)
    assert got == f"error: {line}" or (line.endswith("allowed: ") and got.startswith(f"error: {line}"))


def test_a_flat_config_says_where_its_keys_go(tmp_path, capsys):
    """A TorchMD-NET config (flat keys, no sections) said only "no 'data:' section; sections present: activation, ..."."""
    from bad_inputs_common import refused_exactly

    config = tmp_path / "tmdnet.yaml"
    config.write_text("activation: silu\nbatch_size: 32\ncutoff_upper: 5.0\ndataset: MD17\nlr: 0.0004\n")
    refused_exactly(capsys, ["train", config],
                    f"error: {config}: no 'data:' section; sections present: activation, batch_size, cutoff_upper, "
                    "dataset, lr; its keys are at the top level, where torchmdx's go into the sections data:, model:, "
                    "train: and trainer: (activation is model.activation, batch_size is data.batch_size, cutoff_upper "
                    "is model.cutoff_upper; configs/demo.yaml shows the layout)", tmp_path)


def test_the_accelerator_is_taken_without_case(tmp_path):
    """``trainer.accelerator: CPU`` passed torchmdx's check (which compared without case) and was then Lightning's
    "invalid accelerator name" traceback after the data were cached."""
    import lightning

    from torchmdx.train.config import load_run_config

    cfg = load_run_config(_config(tmp_path), ["trainer.accelerator=CPU"], None, check_data=False)
    assert cfg.trainer.accelerator == "cpu"
    lightning.Trainer(accelerator=cfg.trainer.accelerator, devices=1, logger=False, enable_checkpointing=False)


# ------------------------------------------------------------------------------ units stated inside a data file
@pytest.mark.parametrize("layout, dataset, attribute, options, line", [
    ("ani1x", "C2H4/gfn2xtb.energy", "units=eV", [],
     "{path}:/C2H4: gfn2xtb.energy.attrs['units'] = 'eV' states a unit, and the energies are read in Hartree (the ANI "
     "layouts' unit); set data.energy_unit (--energy-unit) to the file's energy unit if eV is what they are (the "
     "attribute is then checked against it), or convert them"),
    ("ani1x", "C2H4/gfn2xtb.forces", "unit=Hartree/Bohr", [],
     "{path}:/C2H4: gfn2xtb.forces.attrs['unit'] = 'Hartree/Bohr' states a unit, and the ANI layouts' forces are read "
     "in Hartree/Å (they take no length unit): convert them"),
    ("ani1x", "C2H4/coordinates", "units=nm", ["--energy-unit", "eV"],
     "{path}:/C2H4: coordinates.attrs['units'] = 'nm' states a unit, and the ANI layouts' coordinates are read in Å "
     "(they take no length unit): convert them"),
    ("ani1x", "", "energy_unit=kcal/mol", ["--energy-unit", "eV"],
     "{path}: energy_unit = 'kcal/mol' states a unit, and the energies are read in eV (as data.energy_unit "
     "(--energy-unit) says); set data.energy_unit (--energy-unit) to the file's energy unit if kcal/mol is what they "
     "are (the attribute is then checked against it), or convert them"),
    ("ani1", "gdb_s01/gdb_s01-0/energies", "units=kcal/mol", [],
     "{path}:/gdb_s01/gdb_s01-0: energies.attrs['units'] = 'kcal/mol' states a unit, and the energies are read in "
     "Hartree (the ANI layouts' unit); set data.energy_unit (--energy-unit) to the file's energy unit if kcal/mol is "
     "what they are (the attribute is then checked against it), or convert them"),
])
def test_a_unit_stated_in_an_hdf5_file_is_checked(tmp_path, capsys, shared_data, layout, dataset, attribute, options,
                                                  line):
    """An HDF5 file's ``energies.attrs['units'] = 'eV'`` (or the file's ``energy_unit``) was ignored: the energies
    were read as Hartree, 27 times too large, without a word."""
    import shutil

    import h5py
    from bad_inputs_common import refused_exactly

    path = tmp_path / "u.h5"
    shutil.copy(shared_data / "ani" / f"{layout}_xtb.h5", path)
    path.chmod(0o644)
    name, value = attribute.split("=")
    with h5py.File(path, "r+") as h5:
        (h5[dataset] if dataset else h5).attrs[name] = value
    refused_exactly(capsys, ["data", "info", path, "--format", layout, "--cache-dir", tmp_path / "c", *options],
                    "error: " + line.format(path=path), tmp_path)


def test_a_unit_attribute_that_agrees_is_taken(tmp_path, shared_data):
    import shutil

    import h5py

    from torchmdx.data import read_structures

    path = tmp_path / "u.h5"
    shutil.copy(shared_data / "ani" / "ani1x_xtb.h5", path)
    path.chmod(0o644)
    plain = read_structures(path, "ani1x")
    with h5py.File(path, "r+") as h5:
        h5["C2H4/gfn2xtb.energy"].attrs["units"] = b"hartree"
        h5["C2H4/gfn2xtb.forces"].attrs["units"] = "Hartree/Angstrom"
        h5["C2H4/coordinates"].attrs["units"] = "Å"
        h5["C2H4/gfn2xtb.energy"].attrs["charge_units"] = "e"  # not a quantity torchmdx converts: left alone
    assert np.array_equal(read_structures(path, "ani1x").energy, plain.energy)
