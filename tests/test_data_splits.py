"""Splits (random, grouped, files) and per-element reference energies."""

import numpy as np
import pytest
import torch

from torchmdx.data import read_structures
from torchmdx.data.atomref import (
    elements_without_reference,
    energy_statistics,
    fit_atomic_references,
    published_atomic_references,
)
from torchmdx.data.splits import group_split, load_split, random_split, resolve_sizes, save_split
from torchmdx.data.structures import Structures
from torchmdx.errors import DataError

HARTREE = 27.21138602  # eV, by hand


@pytest.fixture(scope="module")
def polymers(shared_data):
    return read_structures(shared_data / "polymer" / "polymers_xtb.extxyz", group_key="polymer")


def test_resolve_sizes_counts_fractions_rest():
    assert resolve_sizes(1000, 800, 100, None) == (800, 100, 100)
    assert resolve_sizes(1000, 0.8, 0.1, None) == (800, 100, 100)
    assert resolve_sizes(1000, None, 0.05, 50) == (900, 50, 50)
    assert resolve_sizes(1000, 10, 10, 10) == (10, 10, 10)  # the rest stays unused
    with pytest.raises(DataError, match=r"^data.npz: split train 800 \+ val 300 = 1100 structures is larger than "
                                        r"the 1000 structures available$"):
        resolve_sizes(1000, 800, 300, None, source="data.npz")
    with pytest.raises(DataError, match="only one of train/val/test size may be left open"):
        resolve_sizes(10, None, None, 1)
    with pytest.raises(DataError, match="fraction above 1"):
        resolve_sizes(10, 1.5, 0, 0)


def test_random_split_disjoint_and_reproducible():
    a = random_split(1000, 0.8, 0.1, None, seed=3)
    assert a.sizes() == {"train": 800, "val": 100, "test": 100}
    everything = np.concatenate([a.train, a.val, a.test])
    assert len(np.unique(everything)) == 1000
    b = random_split(1000, 0.8, 0.1, None, seed=3)
    c = random_split(1000, 0.8, 0.1, None, seed=4)
    assert np.array_equal(a.train, b.train) and not np.array_equal(a.train, c.train)


def _groups_of(labels, idx):
    return set(np.asarray(labels, dtype=object)[idx].tolist())


@pytest.mark.parametrize("seed", range(12))
def test_grouped_split_never_leaks_a_group(polymers, seed):
    labels = polymers.group_labels()
    rng = np.random.default_rng(seed)
    train, val = int(rng.integers(1, 4)), int(rng.integers(1, 2))
    split = group_split(labels, train=train, val=val, test=None, seed=seed)
    parts = [_groups_of(labels, split[p]) for p in ("train", "val", "test")]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert [len(p) for p in parts] == [train, val, 6 - train - val]  # sizes count groups
    # whole groups: every structure of a group lands in the part of its group
    for part, groups in zip(("train", "val", "test"), parts):
        assert len(split[part]) == 150 * len(groups)


def test_named_test_groups_held_out(polymers):
    labels = polymers.group_labels()
    split = group_split(labels, train=0.9, val=0.1, test=None, seed=0, split_by_group=False,
                        test_groups=["PMMA", "PAN"])
    assert _groups_of(labels, split.test) == {"PMMA", "PAN"} and len(split.test) == 300
    assert not (_groups_of(labels, split.train) & {"PMMA", "PAN"})
    assert not (_groups_of(labels, split.val) & {"PMMA", "PAN"})
    assert len(split.train) == 540 and len(split.val) == 60  # fractions of the 600 left
    by_group = group_split(labels, train=3, val=1, test=None, seed=1, test_groups=["PVC"])
    assert _groups_of(labels, by_group.test) == {"PVC"} and len(_groups_of(labels, by_group.train)) == 3
    with pytest.raises(DataError, match=r"test_groups: no group 'PS'; groups: PAN, PE, PEO, PMMA, PVA, PVC"):
        group_split(labels, test_groups=["PS"])
    with pytest.raises(DataError, match=r"split train 5 \+ val 2 = 7 groups is larger than the 6 groups available"):
        group_split(labels, train=5, val=2, test=None)


def test_split_file_roundtrip_and_checks(tmp_path):
    split = random_split(50, 30, 10, None, seed=1)
    path = save_split(split, tmp_path / "run" / "splits.npz", content_hash="abc")
    assert [p.name for p in path.parent.iterdir()] == ["splits.npz"]
    back = load_split(path, 50, "abc")
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(back[part], split[part])
    assert back.seed == 1
    with pytest.raises(DataError, match=r"splits.npz: split made for 50 structures, but the dataset has 40"):
        load_split(path, 40)
    with pytest.raises(DataError, match=r"nothing.npz: split file not found"):
        load_split(tmp_path / "nothing.npz", 50)
    with pytest.warns(UserWarning, match="different content"):
        load_split(path, 50, "other")


# ------------------------------------------------------------------------------------------------
# atomic references
def _synthetic(rng, n, refs, elements, noise=0.0):
    z, energy, counts = [], [], []
    for _ in range(n):
        natoms = int(rng.integers(2, 12))
        zs = rng.choice(elements, size=natoms)
        z.append(zs)
        counts.append(natoms)
        energy.append(sum(refs[v] for v in zs) + noise * rng.normal())
    z = np.concatenate(z)
    return Structures(z=z, pos=rng.normal(size=(len(z), 3)), energy=np.asarray(energy),
                      offsets=np.concatenate([[0], np.cumsum(counts)]))


def test_fit_recovers_known_references():
    rng = np.random.default_rng(0)
    refs = {1: -13.6, 6: -1029.8, 7: -1485.3, 8: -2042.6}
    st = _synthetic(rng, 200, refs, [1, 6, 7, 8], noise=0.01)
    fitted = fit_atomic_references(st, np.arange(150), max_z=10)
    assert fitted.shape == (10,) and fitted.dtype == torch.float64  # index = Z, Z = 0..max_z-1
    for z, value in refs.items():
        assert fitted[z].item() == pytest.approx(value, abs=0.01)
    assert fitted[0] == 0 and fitted[9] == 0
    # independent reference: the normal equations solved directly
    counts = np.zeros((150, 4))
    for s in range(150):
        for v in st.z[st.offsets[s]:st.offsets[s + 1]]:
            counts[s, [1, 6, 7, 8].index(v)] += 1
    normal = np.linalg.solve(counts.T @ counts, counts.T @ st.energy[:150])
    np.testing.assert_allclose(fitted[[1, 6, 7, 8]].numpy(), normal, rtol=1e-10)


def test_elements_absent_from_train_get_zero():
    rng = np.random.default_rng(1)
    refs = {1: -0.5, 6: -37.8, 9: -99.7}
    train = _synthetic(rng, 40, refs, [1, 6])
    fluorine = _synthetic(rng, 5, refs, [1, 9])
    st = Structures(z=np.concatenate([train.z, fluorine.z]), pos=np.zeros((len(train.z) + len(fluorine.z), 3)),
                    energy=np.concatenate([train.energy, fluorine.energy]),
                    offsets=np.concatenate([train.offsets, fluorine.offsets[1:] + train.offsets[-1]]))
    fitted = fit_atomic_references(st, np.arange(40), max_z=10)
    assert fitted.shape == (10,) and fitted[9] == 0.0 and fitted[6].item() == pytest.approx(-37.8)
    assert elements_without_reference(st, np.arange(40), max_z=10) == [9]
    # max_z = 9 embedding rows hold Z = 0..8: fluorine (Z = 9) is out of range
    with pytest.raises(DataError, match=r"element F \(Z=9\) in structure 40 is beyond the model's range "
                                        r"\(max_z=9: atomic numbers below 9\)"):
        fit_atomic_references(st, np.arange(45), max_z=9)
    assert fit_atomic_references(st, np.arange(45), max_z=10)[9].item() == pytest.approx(-99.7, abs=1e-6)


def test_single_composition_gives_minimum_norm_solution(shared_data):
    st = read_structures(shared_data / "md17" / "md17_ethanol_xtb.npz")
    fitted = fit_atomic_references(st, np.arange(100), max_z=10).numpy()
    counts = np.array([6, 2, 1])  # H6 C2 O: only the sum is determined
    assert counts @ fitted[[1, 6, 8]] == pytest.approx(st.energy[:100].mean(), rel=1e-10)
    np.testing.assert_allclose(fitted[[1, 6, 8]] / counts, fitted[1] / 6)  # r proportional to counts
    stats = energy_statistics(st, np.arange(100), fitted)
    assert stats["energy_per_atom_mean"] == pytest.approx(0.0, abs=1e-9)
    assert stats["energy_per_atom_std"] == pytest.approx(st.energy[:100].std() / 9, rel=1e-6)
    forces = st.forces[:900]
    assert stats["force_rms"] == pytest.approx(np.sqrt((forces ** 2).mean()))


def test_qm9_published_references(shared_data):
    st = read_structures(shared_data / "qm9" / "qm9_20.db")
    refs = published_atomic_references(st, max_z=10)
    assert refs[1].item() == pytest.approx(-0.500273 * HARTREE, rel=1e-9)
    assert refs[6].item() == pytest.approx(-37.846772 * HARTREE, rel=1e-9)
    # methane's atomization energy U0 - (U0(C) + 4 U0(H)), by hand: -0.631066 Ha
    atomization = st.energy[0] - (refs[6] + 4 * refs[1]).item()
    assert atomization == pytest.approx((-40.47893 + 37.846772 + 4 * 0.500273) * HARTREE, rel=1e-9)
    assert atomization == pytest.approx(-0.631066 * HARTREE, rel=1e-9)
    with pytest.raises(DataError, match="no published atomic references for 'energy'"):
        published_atomic_references(read_structures(shared_data / "md17" / "ethanol_snip.xyz"))
