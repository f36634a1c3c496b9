"""bench/bench_accuracy.py ``--data ani1x-large``: a file named ``ani1x_xtb_large.h5`` is that
recipe, its frames carry their formula, and its split (80 / 5 / 15 %, random frames stratified by
formula) is exact in total, proportional per formula, disjoint, reproducible and read back by
torchmdx. On a tiny synthetic file (the real one lives in .benchdata, which CI lacks)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
#: formula -> (atomic numbers, frames): unequal group sizes, one not a multiple of 20
GROUPS = {"H2O": ([8, 1, 1], 40), "CH4": ([6, 1, 1, 1, 1], 100), "C2H6O": ([8, 6, 6, 1, 1, 1, 1, 1, 1], 61)}


@pytest.fixture(scope="module")
def data():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_accuracy_data", ROOT / "bench" / "bench_accuracy_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    path = tmp_path_factory.mktemp("large") / "ani1x_xtb_large.h5"
    rng = np.random.default_rng(5)
    with h5py.File(path, "w") as h5:
        h5.attrs["theory"] = "synthetic"
        for formula, (numbers, n) in GROUPS.items():
            g = h5.create_group(formula)
            g.create_dataset("atomic_numbers", data=np.array(numbers, dtype=np.uint8))
            g.create_dataset("coordinates", data=rng.normal(0, 1.5, (n, len(numbers), 3)).astype(np.float32))
            g.create_dataset("gfn2xtb.energy", data=-10.0 * len(numbers) + rng.normal(0, 0.01, n))
            g.create_dataset("gfn2xtb.forces", data=rng.normal(0, 0.02, (n, len(numbers), 3)))
    return path


@pytest.fixture(scope="module")
def frames(data, sample, tmp_path_factory):
    return data.load_frames(sample, tmp_path_factory.mktemp("cache"))


def formula_of_each(frames) -> np.ndarray:
    """Each structure's formula, from its atomic numbers (not from the loader's group labels)."""
    names = {tuple(sorted(z)): f for f, (z, _) in GROUPS.items()}
    off = frames["offsets"]
    return np.array([names[tuple(sorted(frames["z"][off[s]:off[s + 1]].tolist()))] for s in range(len(off) - 1)])


def test_the_file_name_picks_the_large_recipe_and_frames_carry_formulas(data, sample, frames):
    assert data.data_kind(sample) == "ani1x-large" and data.data_name(sample) == "ani1x-large"
    assert data.data_kind(sample.with_name("other.h5")) == "ani1x"
    assert frames["kind"] == "ani1x-large" and len(frames["energy"]) == 201
    labels = np.asarray(frames["group_names"], dtype=object)[frames["group"]]
    np.testing.assert_array_equal(labels.astype(str), formula_of_each(frames))
    assert data.split_groups(frames) is frames["group"]
    assert data.split_groups({**frames, "kind": "ani1x"}) is None  # the small sample keeps its plain random split


def test_formula_split_exact_totals_proportional_per_formula(data, frames, tmp_path):
    from torchmdx.data.splits import load_split

    n = len(frames["energy"])
    split = data.make_split_file(n, data.DATASETS["ani1x-large"]["sizes"], 0, tmp_path / "s.npz", frames["hash"],
                                 groups=data.split_groups(frames))
    parts = {p: np.asarray(split[p]) for p in ("train", "val", "test")}
    # fractions of the whole file, rounded once: 0.8 * 201 = 160.8, 0.05 * 201 = 10.05, 0.15 * 201 = 30.15
    assert [len(parts[p]) for p in parts] == [161, 10, 30]
    every = np.concatenate(list(parts.values()))
    assert len(np.unique(every)) == len(every) and every.min() >= 0 and every.max() < n
    formula = formula_of_each(frames)
    for name, (_, size) in GROUPS.items():
        for p, fraction in zip(parts, (0.8, 0.05, 0.15)):
            got = int(np.count_nonzero(formula[parts[p]] == name))
            assert abs(got - fraction * size) <= 1.5, (name, p, got, fraction * size)
    back = load_split(tmp_path / "s.npz", n, frames["hash"])
    for p in parts:
        np.testing.assert_array_equal(back[p], parts[p])
    # reproducible; another seed draws other frames (same counts per formula, up to the spread)
    again = data.formula_split(frames["group"], (0.8, 0.05, 0.15), 0)
    other = data.formula_split(frames["group"], (0.8, 0.05, 0.15), 1)
    for p in parts:
        np.testing.assert_array_equal(again[p], parts[p])
    assert not np.array_equal(other["test"], parts["test"])


def test_formula_split_takes_counts_and_leaves_the_rest_unused(data, frames):
    split = data.formula_split(frames["group"], (60, 10, 30), 0)
    sizes = [len(split[p]) for p in ("train", "val", "test")]
    assert sizes == [60, 10, 30]
    formula = formula_of_each(frames)
    for name, (_, size) in GROUPS.items():  # every formula in every part, in proportion (± ~1)
        for p, count in zip(("train", "val", "test"), sizes):
            got = int(np.count_nonzero(formula[split[p]] == name))
            assert abs(got - count * size / 201) <= 1.5, (name, p, got)


def test_spread_labels_counts_and_windows(data):
    labels = data.spread_labels(1000, (800, 50, 150))
    assert np.bincount(labels).tolist() == [800, 50, 150]
    for start, m in ((0, 137), (400, 61), (863, 137)):  # any stretch holds each label in proportion
        window = np.bincount(labels[start:start + m], minlength=3)
        for p, c in enumerate((800, 50, 150)):
            assert abs(window[p] - m * c / 1000) <= 1.5
    from torchmdx.errors import DataError

    with pytest.raises(DataError):
        data.spread_labels(10, (8, 2, 1))
