#!/usr/bin/env python3
"""Data, split and energy references of bench/bench_accuracy.py (the same for both sides).

**Data sets** (:data:`DATASETS`, chosen by ``--data``):

- ``md17``: an MD17-layout npz (``aspirin`` / ``ethanol``: the shipped GFN2-xTB samples, or a
  path), one molecule: :func:`load_frames` gives z [N], pos [n, N, 3] (Å), energy [n] (eV),
  forces [n, N, 3] (eV/Å). TorchMD-NET gets it as its ``Custom`` dataset (:func:`write_custom_dataset`).
- ``ani1x``: an ANI-1x-layout HDF5 file (``ani1x``: the shipped sample ``ani1x_xtb.h5``, 15
  formulas x 40 conformations of 3-11 atoms, GFN2-xTB, Hartree and Hartree/Å in the file; or a
  path ending in .h5/.hdf5), molecules of different sizes: :func:`load_frames` gives the flat
  layout z [A], pos [A, 3] (Å), energy [n] (eV), forces [A, 3] (eV/Å), offsets [n + 1] (structure
  s holds atoms offsets[s]:offsets[s + 1]), group [n] (each structure's formula, an index into
  group_names). TorchMD-NET gets it as :func:`torchmdnet_dataset`: an
  in-memory ``torch_geometric`` dataset of ``Data(z, pos, y [1, 1], neg_dy [N, 3])`` in eV and
  eV/Å, with ``get_atomref()`` for its ``Atomref`` prior.
- ``ani1x-large``: the same layout and treatment, the file ``ani1x_xtb_large.h5`` made by
  bench/make_ani1x_large.py (61 G2 molecules, 46 formulas of 3-22 atoms, GFN2-xTB Langevin MD
  frames; docs/benchmarks/accuracy.md), kept in ``.benchdata/`` (not shipped). A file of that
  name is this kind wherever it lies; split 80 / 5 / 15 % stratified by formula (below).
- ``polymer``: the force-only (PolyGET) race. An extended-xyz file read by torchmdx's ``ase``
  reader (``polymer``: the shipped ``polymers_xtb.extxyz``, 900 GFN2-xTB Langevin-MD frames at
  600 K, 150 of each of six polymer families PE, PEO, PVC, PVA, PAN, PMMA, 19-35 atoms; ``energy``
  eV in the info line, ``forces`` eV/Å per atom, the family in ``info['polymer']``; or a path
  ending in .extxyz with those keys): the flat layout of ``ani1x`` with ``group`` = the family.
  Both sides train on forces only: torchmdx with ``configs/polymer_forces_only.yaml``
  (``energy_weight: 0``, ``refit_atomref``), TorchMD-NET with ``y_weight: 0``, ``neg_dy_weight:
  1`` (its 3.0.0 argument names) and the same ET and optimiser settings (:data:`DATASETS`).

All are read once through torchmdx's data layer (``build_cache`` + ``H5Dataset``: the units
converted by torchmdx's readers, kcal/mol or Hartree -> eV), so both sides train on and are scored
against the same numbers.

**Polymer split: whole families held out** (:func:`family_split`), as
``configs/polymer_forces_only.yaml`` does: validation = every PVA frame (150), test = every PMMA
frame (150), training = the other four families (PE, PEO, PVC, PAN: 600 frames; ``--train N``:
N of them at random, ``default_rng(seed)``). Decision: the held-out family, not a per-family
stratified random split, because transfer to an unseen polymer is what PolyGET's force-only
objective is for and what the config measures, and 150 test frames (5 250 atoms, 15 750 force
components) are plenty for a force MAE; a stratified split would mostly score interpolation
between MD frames of families seen in training. PMMA's elements (H, C, O) all occur in training
(PE, PEO), so both models have seen every element they are tested on. No family is in two parts
(checked when the split is drawn).

**Polymer scoring: force MAE is the headline.** With the energy out of the loss, a model's energy
is fixed only up to constants that no force sees: per element, and (for a family held out)
beyond that. Here the per-element references fitted on the training energies do not even fix
PMMA's absolute energy: each family has one composition, the four training compositions (C8H18,
C6H14O3, C7H13Cl3, C7H10N2) span only two directions of the (H, C, O) space, and C11H20O4 is not
in their span (least-squares residual 1.39 atoms), so a PMMA energy after the refit carries an
offset that neither side learnt, one that only the minimum-norm convention of the fit sets. The
scores' ``energy_mae`` / ``energy_mae_per_atom`` of this kind are therefore the **relative
(conformational) energies within each test family**: each side's energies with the family's mean
error removed (:func:`family_centred_energies`; one constant per family, the same operation on
both sides' predictions, equal to a per-element refit on the test family itself since its frames
share one composition). This is what force-only training determines and what an MD user of a
PolyGET model sees. Each point also keeps ``energy_mae_refit`` (and ``_per_atom``): torchmdx's
refit applied to either side's predictions, the least-squares per-element correction of the
predicted energies to the training energies (:func:`refit_energies`, what ``refit_atomref`` does
before each validation and what ``val_energy_mae`` reports), and ``energy_mae_raw`` (the
predictions as they are; the torchmdx checkpoint's references are those of the last validation).
Both are recorded, not headlined, for the reason above.

**Split** (by structure, both formats): ``numpy.random.default_rng(seed).permutation`` of the
structures cut train / val / test (``torchmdx.data.splits.random_split``), written once as
torchmdx's split file (:func:`make_split_file`: indices, size, seed, the source's content hash),
handed to torchmdx as ``data.split_file`` and to TorchMD-NET as its ``splits`` npz
(:func:`write_torchmdnet_splits`). For ANI-1x conformations of one formula may sit in
train and test (as frames of one molecule do in MD17). ``ani1x-large`` is split by
:func:`formula_split` instead: random frames, stratified by formula (each formula's frames in the
train / val / test proportions, to within one frame), the sizes fractions of the file
(80 / 5 / 15 %) or counts (``--train/--val/--test``), the same split file and hand-over.

**Energy references** (variable-size data, polymers included): per-element reference energies fitted by least
squares on the training structures (:func:`reference_energies`: torchmdx's
``fit_atomic_references``, what torchmdx's ``data.atomref: fit`` computes), subtracted on both
sides: torchmdx's model holds them as its ``atomref`` buffer, TorchMD-NET's as its frozen
``Atomref`` prior (``get_atomref`` of the dataset). Each side then normalises the residual its own
way (torchmdx: ``scale``/``shift: auto``; TorchMD-NET: ``standardize``, mean and std of the
residual energies).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch_geometric.data import Data, Dataset

from torchmdx.errors import DataError
from torchmdx.io_utils import atomic_write

ROOT = Path(__file__).resolve().parents[1]

#: sample names of --data -> (file name, data set kind)
SHARED_NAMES = {"aspirin": "md17_aspirin_xtb.npz", "ethanol": "md17_ethanol_xtb.npz", "ani1x": "ani1x_xtb.h5",
                "ani1x-large": "ani1x_xtb_large.h5", "polymer": "polymers_xtb.extxyz"}
#: files whose name picks a recipe other than their format's (:func:`data_kind`)
FILE_KINDS = {"ani1x_xtb_large.h5": "ani1x-large"}
#: torchmdx config of a kind whose recipe is not the ET-MD17 one (``--config`` not given)
POLYMER_CONFIG = ROOT / "configs" / "polymer_forces_only.yaml"

#: per kind: torchmdx's data format, default split sizes, the torchmdx ``data:`` overrides and the
#: TorchMD-NET hyper-parameters that differ from the ET-MD17 recipe
DATASETS = {
    # references: each recipe's own (TorchMD-NET standardize, no prior; torchmdx atomref: fit)
    "md17": {"format": "md17", "sizes": (700, 50, 250), "torchmdx_data": {}, "torchmdnet": {},
             "references": "own"},
    # batch 32 (bench/bench_train_run.py's ani1x workload): 3-11 atoms a structure; per-element
    # reference energies on both sides, the same table
    "ani1x": {"format": "ani1x", "sizes": (450, 50, 100), "torchmdx_data": {"batch_size": 32, "atomref": "fit"},
              "torchmdnet": {"batch_size": 32, "prior_model": "Atomref"}, "references": "fit"},
    # bench/make_ani1x_large.py's ~9 000 structures of 3-22 atoms: the ani1x recipe, sizes as
    # fractions of the file, the split stratified by formula (formula_split)
    "ani1x-large": {"format": "ani1x", "sizes": (0.80, 0.05, 0.15), "split": "formula",
                    "torchmdx_data": {"batch_size": 32, "atomref": "fit"},
                    "torchmdnet": {"batch_size": 32, "prior_model": "Atomref"}, "references": "fit"},
    # the force-only (PolyGET) race: configs/polymer_forces_only.yaml for torchmdx (with the gated
    # equivariant head TorchMD-NET always builds for an ET: equal models), TorchMD-NET with the
    # same ET (4 layers), batch, optimiser, schedule and clipping, energy weight 0 / force weight 1.
    # Split: whole families held out (val PVA, test PMMA; family_split), training sizes as counts
    # (None: every frame of the other families). References fitted on the training energies, the
    # same table on both sides (TorchMD-NET's standardize then sees residual energies, not totals
    # of molecules of 19-35 atoms). max_num_neighbors 64: up to 34 neighbours within 5 Å here
    # (TorchMD-NET stops at more than its cap; torchmdx has none). Scoring: "force_only" (above).
    "polymer": {"format": "ase", "reader": {"energy_key": "energy", "forces_key": "forces", "group_key": "polymer"},
                "sizes": (None, 0, 0), "split": "family", "val_groups": ("PVA",), "test_groups": ("PMMA",),
                "config": POLYMER_CONFIG, "torchmdx_model": {"output_model": "gated_equivariant"},
                "torchmdx_data": {"val_groups": [], "test_groups": [], "split_by_group": False},
                "torchmdnet": {"num_layers": 4, "batch_size": 16, "inference_batch_size": 64, "lr": 5.0e-4,
                               "lr_warmup_steps": 500, "lr_factor": 0.8, "lr_patience": 20, "lr_min": 1.0e-6,
                               "gradient_clipping": 10.0, "early_stopping_patience": 100, "y_weight": 0.0,
                               "neg_dy_weight": 1.0, "max_num_neighbors": 64, "prior_model": "Atomref"},
                "references": "fit", "scoring": "force_only", "parameters": 943_106},
}

#: embedding rows of both models (the recipe's max_z): the length of a reference table
MAX_Z = 100


def data_kind(path: Path) -> str:
    """``md17`` for an npz, ``ani1x`` for an HDF5 file (``ani1x-large`` for ``ani1x_xtb_large.h5``),
    ``polymer`` for an extended-xyz file (.extxyz)."""
    if path.name in FILE_KINDS:
        return FILE_KINDS[path.name]
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return "md17"
    if suffix in (".h5", ".hdf5"):
        return "ani1x"
    if suffix == ".extxyz":
        return "polymer"
    raise DataError(f"--data {path}: give an MD17-layout .npz, an ANI-1x-layout .h5/.hdf5 file or a polymer .extxyz "
                    "(energy, forces, info['polymer'])")


def resolve_data(name_or_path: str) -> Path:
    """The file of ``--data``: an existing path, or a sample name looked up in the known places."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.resolve()
    file_name = SHARED_NAMES.get(name_or_path.lower(), name_or_path)
    places = []
    if os.environ.get("TORCHMDX_SHARED_DATA"):
        shared = Path(os.environ["TORCHMDX_SHARED_DATA"])
        places += [shared / "md17", shared / "ani", shared / "polymer", shared, shared / "systems"]
    places += [ROOT / ".benchdata"] + [ROOT.parent / "shared" / "data" / sub for sub in ("md17", "ani", "polymer")]
    for place in places:
        if (place / file_name).is_file():
            return (place / file_name).resolve()
    raise DataError(f"--data {name_or_path}: no such file, and {file_name} is in none of "
                    f"{', '.join(str(p) for p in places)} (give a path or set TORCHMDX_SHARED_DATA)")


def data_name(path: Path) -> str:
    for name, file_name in SHARED_NAMES.items():
        if path.name == file_name:
            return name
    return path.stem


def load_frames(path: Path, cache_dir: Path) -> dict:
    """Every structure of ``path``, read through torchmdx's data layer (HDF5 cache), plus the
    source's content hash: the MD17 layout for an npz (one molecule: z [N], pos [n, N, 3]), the
    flat layout with ``offsets`` for an ANI-1x file (module docstring). Å, eV, eV/Å."""
    from torchmdx.data.cache import build_cache
    from torchmdx.data.dataset import H5Dataset

    kind = data_kind(path)
    cache = build_cache(path, DATASETS[kind]["format"], cache_dir, **DATASETS[kind].get("reader", {}))
    dataset = H5Dataset(cache, dtype="float64")
    st = dataset.structures
    offsets = np.asarray(st.offsets, dtype=np.int64)
    counts = np.diff(offsets)
    if st.forces is None:
        raise DataError(f"{path}: no forces; the benchmark trains on energies and forces")
    common = {"hash": dataset.info["fingerprint"].get("hash", ""), "source": str(path), "cache": str(cache),
              "kind": kind}
    if DATASETS[kind]["format"] != "md17":  # molecules of different sizes: the flat layout
        group = None if st.group is None else np.asarray(st.group, dtype=np.int64)
        return {"z": np.asarray(st.z, dtype=np.int64), "pos": np.asarray(st.pos, dtype=np.float64),
                "energy": np.asarray(st.energy, dtype=np.float64).reshape(-1),
                "forces": np.asarray(st.forces, dtype=np.float64), "offsets": offsets, "group": group,
                "group_names": list(st.group_names), **common}
    if counts.min() != counts.max():
        raise DataError(f"{path}: frames with {counts.min()} to {counts.max()} atoms; the benchmark needs one molecule")
    n, atoms = len(counts), int(counts[0])
    z = np.asarray(st.z, dtype=np.int64).reshape(n, atoms)
    if not (z == z[0]).all():
        raise DataError(f"{path}: the atomic numbers differ between frames; the benchmark needs one molecule")
    return {"z": z[0], "pos": np.asarray(st.pos, dtype=np.float64).reshape(n, atoms, 3),
            "energy": np.asarray(st.energy, dtype=np.float64).reshape(n),
            "forces": np.asarray(st.forces, dtype=np.float64).reshape(n, atoms, 3), **common}


def flat_structures(frames: dict) -> dict:
    """z [A], pos [A, 3], forces [A, 3], offsets [n + 1] of either layout (one molecule: tiled)."""
    if "offsets" in frames:
        return {k: frames[k] for k in ("z", "pos", "forces", "offsets")}
    n, atoms = frames["pos"].shape[:2]
    return {"z": np.tile(frames["z"], n), "pos": frames["pos"].reshape(-1, 3), "forces": frames["forces"].reshape(-1, 3),
            "offsets": np.arange(n + 1, dtype=np.int64) * atoms}


def atom_index(offsets: np.ndarray, indices) -> np.ndarray:
    """The atoms of structures ``indices``, structure by structure, in that order."""
    idx = np.asarray(indices, dtype=np.int64)
    starts, counts = offsets[idx], offsets[idx + 1] - offsets[idx]
    if not len(idx):
        return np.zeros(0, dtype=np.int64)
    return np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(counts.sum())


def make_split_file(n_frames: int, sizes: Sequence, seed: int, path: Path, content_hash: str, groups=None,
                    held_out=None):
    """Draw the split and write it as torchmdx's split file: ``default_rng(seed).permutation``
    (``random_split``), or :func:`formula_split` of ``groups`` (one code per structure) when given,
    or :func:`family_split` of ``groups`` when ``held_out`` ({"names", "val", "test"}: the group
    names and the families held out) is given too. Sizes: counts, or fractions of ``n_frames``
    (floats <= 1), or None (the rest)."""
    from torchmdx.data.splits import random_split, save_split

    sizes = [s if isinstance(s, float) or s is None else int(s) for s in sizes]
    if held_out is not None:
        if groups is None or len(groups) != n_frames:
            raise DataError(f"{path}: {0 if groups is None else len(groups)} family labels for {n_frames} structures")
        split = family_split(groups, held_out["names"], sizes[0], held_out["val"], held_out["test"], seed,
                             source=str(path))
    elif groups is None:
        split = random_split(n_frames, *sizes, seed=seed, source=str(path))
    else:
        if len(groups) != n_frames:
            raise DataError(f"{path}: {len(groups)} group labels for {n_frames} structures")
        split = formula_split(groups, sizes, seed, source=str(path))
    save_split(split, path, content_hash)
    return split


def split_groups(frames: dict):
    """The labels :func:`make_split_file` splits by (each structure's formula or family) when the
    data set's recipe asks for it (``DATASETS[kind]["split"]``: "formula" or "family"), else None."""
    if DATASETS[frames["kind"]].get("split") not in ("formula", "family"):
        return None
    if frames.get("group") is None:
        raise DataError(f"{frames['source']}: no group labels to split by")
    return frames["group"]


def held_out_groups(frames: dict):
    """{"names", "val", "test"} of a family-split recipe (``DATASETS[kind]["split"] == "family"``):
    the group names of the data and the families held out for validation and test; else None."""
    recipe = DATASETS[frames["kind"]]
    if recipe.get("split") != "family":
        return None
    return {"names": list(frames["group_names"]), "val": list(recipe["val_groups"]), "test": list(recipe["test_groups"])}


def family_split(groups, names: Sequence[str], train, val_groups: Sequence[str], test_groups: Sequence[str], seed: int,
                 source: str = "dataset"):
    """Whole families held out: every structure of ``val_groups`` to validation, of
    ``test_groups`` to test; training = ``train`` structures (a count, a fraction of the rest, or
    None: all) drawn at random (``default_rng(seed)``) from the other families
    (``torchmdx.data.splits.group_split_codes`` by structure). Raises DataError if a family
    landed in two parts or a named family is missing."""
    from torchmdx.data.splits import check_no_group_leak, group_split_codes

    codes = np.asarray(groups, dtype=np.int64).reshape(-1)
    if not (val_groups and test_groups):
        raise DataError(f"{source}: a family split needs a validation and a test family")
    split = group_split_codes(codes, list(names), train=train, val=0, test=0, seed=seed, split_by_group=False,
                              val_groups=val_groups, test_groups=test_groups, source=source)
    check_no_group_leak(split, codes, list(names))
    split.info["kind"] = "family"
    return split


def spread_labels(n: int, counts: Sequence[int]) -> np.ndarray:
    """[n] labels 0..len(counts) (the last: unused) in which label p occurs counts[p] times
    (the unused label ``n - sum(counts)`` times), evenly spread: label p's j-th occurrence sits
    where its ideal position (j + 1/2) n / counts[p] falls in the merged order of all labels', so
    every stretch of m consecutive labels holds each label m counts[p] / n times, to within about
    one."""
    counts = [int(c) for c in counts] + [n - int(sum(counts))]
    if counts[-1] < 0:
        raise DataError(f"split: {sum(counts[:-1])} structures asked for, {n} available")
    ideal = np.concatenate([(np.arange(c) + 0.5) * n / c for c in counts if c])
    label = np.concatenate([np.full(c, p, dtype=np.int64) for p, c in enumerate(counts) if c])
    return label[np.argsort(ideal, kind="stable")]


def formula_split(groups, sizes: Sequence, seed: int, source: str = "dataset"):
    """Random frames, stratified by group (formula): the groups in ascending label order, each
    group's structures in a ``default_rng(seed)`` permutation, laid end to end and cut by
    :func:`spread_labels`, so each part gets its share of every formula (to within about one
    frame) and exactly the sizes asked in all (``resolve_sizes``: counts, fractions or None)."""
    from torchmdx.data.splits import Split, resolve_sizes

    groups = np.asarray(groups, dtype=np.int64).reshape(-1)
    n = len(groups)
    counts = resolve_sizes(n, *sizes, source=source)
    rng = np.random.default_rng(seed)
    order = np.concatenate([members[rng.permutation(len(members))]
                            for members in (np.flatnonzero(groups == g) for g in np.unique(groups))]) \
        if n else np.zeros(0, dtype=np.int64)
    labels = spread_labels(n, counts)
    parts = [np.sort(order[labels == p]).astype(np.int64) for p in range(3)]
    return Split(train=parts[0], val=parts[1], test=parts[2], n_structures=n, seed=seed,
                 info={"kind": "formula-stratified"})


def write_torchmdnet_splits(split_file: Path, n_frames: int, content_hash: str, path: Path) -> dict:
    """TorchMD-NET's splits npz (idx_train, idx_val, idx_test) from torchmdx's split file, as
    ``load_split`` reads it back; returns the indices written."""
    from torchmdx.data.splits import load_split

    split = load_split(split_file, n_frames, content_hash)
    parts = {"idx_train": split.train, "idx_val": split.val, "idx_test": split.test}
    with atomic_write(path) as handle:
        np.savez(handle, **parts)
    return parts


def split_digest(train, val, test) -> str:
    """Short hash of the three index lists (the report checks both sides used the same split)."""
    digest = hashlib.blake2b(digest_size=8)
    for part in (train, val, test):
        digest.update(np.asarray(part, dtype=np.int64).tobytes() + b"|")
    return digest.hexdigest()


def reference_energies(frames: dict, train, max_z: int = MAX_Z) -> np.ndarray:
    """Per-element reference energies [max_z] (eV per atom) fitted on the training structures:
    torchmdx's ``fit_atomic_references``, as its ``data.atomref: fit`` does."""
    from torchmdx.data.atomref import fit_atomic_references

    flat = flat_structures(frames)
    table = fit_atomic_references({"z": flat["z"], "offsets": flat["offsets"], "energy": frames["energy"]},
                                  np.asarray(train, dtype=np.int64), max_z)
    return table.numpy().astype(np.float64)


def element_counts(frames: dict, indices, max_z: int = MAX_Z) -> np.ndarray:
    """[len(indices), max_z] atoms of each element in structures ``indices`` (flat layout)."""
    flat = flat_structures(frames)
    idx = np.asarray(indices, dtype=np.int64)
    counts = np.zeros((len(idx), max_z), dtype=np.float64)
    atoms = atom_index(flat["offsets"], idx)
    rows = np.repeat(np.arange(len(idx)), flat["offsets"][idx + 1] - flat["offsets"][idx])
    np.add.at(counts, (rows, flat["z"][atoms]), 1.0)
    return counts


def refit_energies(frames: dict, train, energy_train, indices, energy, max_z: int = MAX_Z):
    """torchmdx's force-only refit applied to any model's predictions: the per-element correction
    δ [max_z] (eV) minimising Σ_s (E_ref,s − E_pred,s − Σ_e n_s,e δ_e)² over the training
    structures ``train`` (predicted energies ``energy_train``), by torchmdx's least-squares fit
    (``fit_atomic_references`` of the residuals: minimum norm where the compositions leave δ
    open); returns (the predictions ``energy`` of structures ``indices`` corrected by it, δ)."""
    from torchmdx.data.atomref import fit_atomic_references

    train = np.asarray(train, dtype=np.int64)
    residual = np.zeros(len(frames["energy"]), dtype=np.float64)
    residual[train] = frames["energy"][train] - np.asarray(energy_train, dtype=np.float64).reshape(-1)
    flat = flat_structures(frames)
    delta = fit_atomic_references({"z": flat["z"], "offsets": flat["offsets"], "energy": residual}, train,
                                  max_z).numpy().astype(np.float64)
    corrected = np.asarray(energy, dtype=np.float64).reshape(-1) + element_counts(frames, indices, max_z) @ delta
    return corrected, delta


def family_centred_energies(energy_pred, energy_ref, groups) -> np.ndarray:
    """The predictions with each group's (family's) mean error removed: E_pred,s − mean over the
    structures t of s's group of (E_pred,t − E_ref,t). Their errors are those of the energies
    relative within a family (one constant per family, which force-only training leaves open)."""
    pred = np.asarray(energy_pred, dtype=np.float64).reshape(-1)
    error = pred - np.asarray(energy_ref, dtype=np.float64).reshape(-1)
    groups = np.asarray(groups).reshape(-1)
    if not (len(groups) == len(pred) == len(error)):
        raise ValueError(f"{len(pred)} predictions, {len(error)} references, {len(groups)} group labels")
    labels, inverse = np.unique(groups, return_inverse=True)
    mean = np.bincount(inverse, weights=error, minlength=len(labels)) / np.bincount(inverse, minlength=len(labels))
    return pred - mean[inverse]


def nonzero_table(table) -> dict:
    """{Z: eV} of a reference table (what the scores files record)."""
    table = np.asarray(table, dtype=np.float64).reshape(-1)
    return {int(z): float(table[z]) for z in np.flatnonzero(table)}


# =============================================================================================
# TorchMD-NET's inputs
def write_custom_dataset(frames: dict, folder: Path) -> dict:
    """TorchMD-NET's Custom dataset files (one molecule): coordinates [n, N, 3] Å, embedding
    (atomic numbers) [N], energies [n, 1] eV, forces [n, N, 3] eV/Å."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"coord": frames["pos"].astype(np.float32), "embed": frames["z"].astype(np.int64),
              "energy": frames["energy"].reshape(-1, 1).astype(np.float64), "force": frames["forces"].astype(np.float32)}
    files = {}
    for name, array in arrays.items():
        files[name] = str(folder / f"{name}.npy")
        np.save(files[name], array)
    return files


class RaceDataset(Dataset):
    """TorchMD-NET's view of the race's structures: a ``torch_geometric`` dataset whose items are
    made on access from the flat arrays (z, pos, forces, energy, offsets), with ``get_atomref()``
    for its ``Atomref`` prior (module level, so that data-loader workers started by spawn can
    unpickle it)."""

    def __init__(self, arrays: dict, table=None):
        super().__init__(None)
        self.arrays, self.table = arrays, table

    def len(self):
        return len(self.arrays["energy"])

    def get(self, idx):
        a = self.arrays
        lo, hi = int(a["offsets"][idx]), int(a["offsets"][idx + 1])
        return Data(z=torch.from_numpy(a["z"][lo:hi]), pos=torch.from_numpy(a["pos"][lo:hi]),
                    y=torch.tensor([[float(a["energy"][idx])]], dtype=torch.float64),
                    neg_dy=torch.from_numpy(a["forces"][lo:hi]))

    def get_atomref(self, max_z=MAX_Z):
        return None if self.table is None else self.table[:max_z].float()


def torchmdnet_dataset(frames: dict, references=None) -> RaceDataset:
    """Every structure as a ``torch_geometric.data.Data`` with TorchMD-NET's keys and units (z
    long [N], pos float32 [N, 3] Å, y float64 [1, 1] eV, neg_dy float32 [N, 3] eV/Å; TorchMD-NET's
    LNNP casts floats to its precision), in a :class:`RaceDataset` whose ``get_atomref()`` returns
    ``references`` [max_z, 1] (eV) for TorchMD-NET's ``Atomref`` prior (None: no table)."""
    flat = flat_structures(frames)
    arrays = {"z": np.ascontiguousarray(flat["z"], dtype=np.int64),
              "pos": np.ascontiguousarray(flat["pos"], dtype=np.float32),
              "forces": np.ascontiguousarray(flat["forces"], dtype=np.float32),
              "energy": np.asarray(frames["energy"], dtype=np.float64), "offsets": np.asarray(flat["offsets"], dtype=np.int64)}
    table = None if references is None else torch.as_tensor(np.asarray(references, dtype=np.float64)).view(-1, 1)
    return RaceDataset(arrays, table)
