"""DataConfig (the data: YAML section) and TorchmdxDataModule."""

import numpy as np
import pytest
import torch

import torchmdx.data.datamodule as dm_mod
from torchmdx.config import from_dict
from torchmdx.data import DataConfig, TorchmdxDataModule, read_structures
from torchmdx.data.splits import load_split
from torchmdx.errors import ConfigError, DataError


def test_data_config_validation():
    cfg = from_dict(DataConfig, {"path": "x.npz", "train_size": 100, "val_size": 0.1}, "data")
    assert cfg.train_size == 100 and isinstance(cfg.train_size, int) and cfg.val_size == 0.1
    with pytest.raises(ConfigError, match=r"config key 'data.batchsize' does not exist \(did you mean 'batch_size'\?\)"):
        from_dict(DataConfig, {"path": "x", "batchsize": 3}, "data")
    with pytest.raises(ConfigError, match=r"config key 'data.format' must be one of md17, rmd17"):
        from_dict(DataConfig, {"path": "x", "format": "pdb"}, "data")
    with pytest.raises(ConfigError, match=r"'data.val_size' is a fraction above 1"):
        from_dict(DataConfig, {"path": "x", "val_size": 2.5}, "data")
    with pytest.raises(ConfigError, match=r"only one size may be null"):
        from_dict(DataConfig, {"path": "x", "train_size": None, "test_size": None}, "data")
    with pytest.raises(ConfigError, match=r"config key 'data.path' is required"):
        from_dict(DataConfig, {}, "data")


@pytest.fixture
def polymer_config(shared_data, tmp_path):
    return {"path": str(shared_data / "polymer" / "polymers_xtb.extxyz"), "group_key": "polymer",
            "cache_dir": str(tmp_path / "cache"), "split_by_group": True, "train_size": 3, "val_size": 1,
            "test_size": None, "test_groups": [], "batch_size": 16, "inference_batch_size": 64, "seed": 2}


def test_datamodule_grouped_split_references_and_loaders(polymer_config, tmp_path):
    run = tmp_path / "run"
    dm = TorchmdxDataModule(polymer_config, run_dir=run)
    dm.prepare_data()
    dm.setup("fit")
    labels = dm.dataset.structures.group_labels()
    parts = {p: set(labels[dm.split[p]].tolist()) for p in ("train", "val", "test")}
    assert len(parts["train"]) == 3 and len(parts["val"]) == 1 and len(parts["test"]) == 2
    assert not (parts["train"] & parts["val"]) and not (parts["train"] & parts["test"])
    assert (run / "splits.npz").is_file() and dm.split_path == run / "splits.npz"
    saved = load_split(run / "splits.npz", 900)
    assert np.array_equal(saved.train, dm.split.train)
    # references: least squares on the training structures only
    refs = dm.atomic_references
    assert refs.shape == (100,) and refs.dtype == torch.float64  # one entry per embedding row (max_z)
    st = dm.dataset.structures
    counts = np.zeros((len(dm.split.train), 100))
    for row, s in enumerate(dm.split.train):
        np.add.at(counts[row], st.z[st.offsets[s]:st.offsets[s + 1]], 1)
    residual = st.energy[dm.split.train] - counts @ refs.numpy()
    gradient = counts.T @ residual  # zero at the least-squares optimum
    assert np.abs(gradient).max() < 1e-6 * np.abs(st.energy[dm.split.train]).sum()
    assert dm.elements == [1, 6, 7, 8, 17]
    assert dm.energy_std_per_atom > 0 and dm.force_rms > 0
    # loaders
    batch = next(iter(dm.train_dataloader()))
    assert batch.num_graphs == 16 and batch.energy.dtype == torch.float64 and batch.pos.dtype == torch.float32
    val_batches = list(dm.val_dataloader())
    assert sum(b.num_graphs for b in val_batches) == 150 and val_batches[0].num_graphs == 64
    assert set(torch.cat([b.group for b in val_batches]).tolist()) == {dm.dataset.group_names.index(g)
                                                                      for g in parts["val"]}
    assert len(dm.test_dataset) == 300


def test_datamodule_reuses_saved_split(polymer_config, tmp_path, monkeypatch):
    run = tmp_path / "run"
    first = TorchmdxDataModule(polymer_config, run_dir=run)
    first.setup()

    def no_new_split(*args, **kwargs):
        raise AssertionError("a new split was drawn although one was saved")

    monkeypatch.setattr(dm_mod, "make_split", no_new_split)
    again = TorchmdxDataModule({**polymer_config, "seed": 99}, run_dir=run)
    again.setup()
    assert np.array_equal(again.split.train, first.split.train)
    other_run = tmp_path / "other"
    given = TorchmdxDataModule({**polymer_config, "split_file": str(run / "splits.npz")}, run_dir=other_run)
    given.setup()
    assert np.array_equal(given.split.test, first.split.test) and (other_run / "splits.npz").is_file()


def test_datamodule_random_split_md17_and_qm9_references(shared_data, tmp_path):
    dm = TorchmdxDataModule({"path": "ethanol", "format": "md17", "cache_dir": str(tmp_path), "train_size": 1000,
                             "val_size": 50, "test_size": 100, "dtype": "float64"})
    dm.setup()
    assert dm.split.sizes() == {"train": 1000, "val": 50, "test": 100}
    assert next(iter(dm.train_dataloader())).pos.dtype == torch.float64
    qm9 = TorchmdxDataModule({"path": str(shared_data / "qm9" / "qm9_20.db"), "cache_dir": str(tmp_path),
                              "atomref": "dataset", "train_size": 10, "val_size": 5, "test_size": 5})
    qm9.setup()
    assert qm9.atomic_references[8].item() == pytest.approx(-75.064579 * 27.21138602, rel=1e-9)


def test_datamodule_bad_inputs(polymer_config, shared_data, tmp_path):
    # max_z counts embedding rows (TorchMD-NET's meaning): 17 rows hold Z = 0..16, not chlorine
    with pytest.raises(DataError, match=r"polymers_xtb.extxyz: element Cl \(Z=17\) in structure 300 is beyond "
                                        r"the model's range \(max_z=17: atomic numbers below 17\)"):
        TorchmdxDataModule({**polymer_config, "max_z": 17}).setup()
    with pytest.raises(ConfigError, match=r"config key 'data.max_z' must be between 2 and 119 \(it counts embedding "
                                          r"rows: atomic numbers 0..max_z-1 are accepted\), got 120"):
        TorchmdxDataModule({**polymer_config, "max_z": 120})
    cfg = {**polymer_config, "split_by_group": False, "train_size": 800, "val_size": 200}
    with pytest.raises(DataError, match=r"split train 800 \+ val 200 = 1000 structures is larger than the 900 "
                                        r"structures available"):
        TorchmdxDataModule(cfg).setup()
    no_groups = {"path": str(shared_data / "md17" / "md17_ethanol_xtb.npz"), "cache_dir": str(tmp_path),
                 "split_by_group": True}
    with pytest.raises(DataError, match="a grouped split .* needs group labels; set data.group_key"):
        TorchmdxDataModule(no_groups).setup()
    st = read_structures(shared_data / "polymer" / "polymers_xtb.extxyz")
    assert int(np.flatnonzero(st.z == 17)[0]) >= st.offsets[300]  # structure 300 is the first PVC


def test_datamodule_loader_choice(polymer_config):
    from torch_geometric.loader import DataLoader

    from torchmdx.data import BatchLoader

    fast = TorchmdxDataModule(polymer_config)
    fast.setup()
    pyg = TorchmdxDataModule({**polymer_config, "loader": "pyg"})
    pyg.setup()
    assert isinstance(fast.train_dataloader(), BatchLoader) and isinstance(pyg.train_dataloader(), DataLoader)
    a, b = next(iter(fast.test_dataloader())), next(iter(pyg.test_dataloader()))
    for key in b.keys():
        assert torch.equal(a[key], b[key]), key


def test_atomref_table_is_used_as_given_and_checked(shared_data, tmp_path):
    """``data.atomref`` as a table (symbols or atomic numbers -> eV per atom, MACE's E0s): the
    references are exactly those numbers, the energy statistics are taken after subtracting them
    (mean of E - sum of references over the training split, computed here by hand), and bad
    tables are one line each: unknown element, Z >= max_z, a repeated element, a non-number, an
    element of the data without a value."""
    table = {"H": -13.6, 6: -1029.5, "8": -2040.25}
    dm = TorchmdxDataModule({"path": "ethanol", "format": "md17", "cache_dir": str(tmp_path), "train_size": 200,
                             "val_size": 20, "test_size": 20, "dtype": "float64", "atomref": table})
    dm.setup()
    refs = dm.atomic_references
    assert (refs[1].item(), refs[6].item(), refs[8].item()) == (-13.6, -1029.5, -2040.25)
    assert float(refs.abs().sum()) == pytest.approx(13.6 + 1029.5 + 2040.25)
    st = dm.dataset.structures
    train = dm.split.train
    energy = np.asarray(st.energy, dtype=np.float64)[train]
    z = np.asarray(st.z[st.offsets[0]:st.offsets[1]])  # one ethanol: C2H6O
    per_molecule = sum({1: -13.6, 6: -1029.5, 8: -2040.25}[int(a)] for a in z)
    assert per_molecule == pytest.approx(2 * -1029.5 + 6 * -13.6 - 2040.25)
    # energy_per_atom_mean: the mean residual per atom after the references
    assert dm.statistics["energy_per_atom_mean"] == pytest.approx(float(np.mean(energy - per_molecule)) / len(z),
                                                                  rel=1e-9), dm.statistics
    cases = [({"Xx": 1.0}, "data.atomref.Xx': not an element symbol"),
             ({"U": 1.0}, "data.atomref.U': not an element symbol or atomic number in 1..91"),
             ({"H": 1.0, 1: 2.0}, "element 1 is given twice"),
             ({"H": "low"}, "data.atomref.H' must be a finite energy in eV"),
             ({}, "is an empty table")]
    for values, fragment in cases:
        with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
            from_dict(DataConfig, {"path": "x.npz", "atomref": values, "max_z": 92}, "data").validate("data")
    partial = TorchmdxDataModule({"path": "ethanol", "format": "md17", "cache_dir": str(tmp_path), "train_size": 200,
                                  "val_size": 20, "test_size": 20, "atomref": {"H": -13.6, "C": -1029.5}})
    with pytest.raises(DataError, match=r"no reference energy for O \(Z=8\), which the data contain"):
        partial.setup()
