"""Train / validation / test splits: random or by group, saved beside the run and reused.

Sizes are each an ``int`` (a count), a ``float`` in [0, 1] (a fraction, rounded to the nearest
count) or ``None`` (everything the other two leave over; at most one may be ``None``). Sizes
adding up to more than is available are an error; sizes adding up to less leave the rest unused.

**Random split** (:func:`random_split`): a permutation of all structures drawn from
``numpy.random.default_rng(seed)``; the first ``train`` go to training, the next ``val`` to
validation, then ``test``.

**Grouped split** (:func:`group_split`): whole groups (polymer families, molecules) go to one
part only, so no group is seen in training and tested on. Groups named in ``test_groups`` /
``val_groups`` go there entirely. The remaining groups are then split either

- by group (``split_by_group=True``): sizes count *groups*; a permutation of the remaining groups
  is cut like the random split; or
- by structure (``split_by_group=False``): the remaining structures are split at random, so only
  the named groups are held out (e.g. ``test_groups: [PMMA]``, train/val from the other families).

**File**: :func:`save_split` writes an npz with ``train``, ``val``, ``test`` (int64 indices),
``n_structures``, ``seed`` and the source's content ``hash``; :func:`load_split` checks the
indices against the dataset size (a file made for another dataset is an error).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from torchmdx.errors import DataError
from torchmdx.io_utils import atomic_write, output_file_name

#: the split file a run folder holds (``torchmdx train`` writes it; --resume and evaluate read it)
SPLIT_FILE_NAME = "splits.npz"

Size = Union[int, float, None]
PARTS = ("train", "val", "test")


@dataclass
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    n_structures: int
    seed: Optional[int] = None
    info: dict = field(default_factory=dict)

    def __getitem__(self, part: str) -> np.ndarray:
        if part not in PARTS:
            # split[0] was KeyError: 0 (and `train, val, test = split`, which went through it)
            raise KeyError(f"a Split's parts are {', '.join(PARTS)} (split['train'] or split.train), got {part!r}")
        return getattr(self, part)

    def __iter__(self):
        """The train, val and test indices, in that order: ``train, val, test = random_split(n)`` as TorchMD-NET's
        ``make_splits`` returns them (it was ``KeyError: 0``)."""
        return iter((self.train, self.val, self.test))

    def sizes(self) -> dict:
        return {p: int(len(self[p])) for p in PARTS}


def resolve_sizes(total: int, train: Size, val: Size, test: Size, what: str = "structures",
                  source: str = "dataset") -> tuple[int, int, int]:
    """Turn counts / fractions / None into three counts that fit into ``total``."""
    sizes = {"train": train, "val": val, "test": test}
    nones = [k for k, v in sizes.items() if v is None]
    if len(nones) > 1:
        raise DataError(f"split: only one of train/val/test size may be left open (null); got {', '.join(nones)}")
    counts = {}
    for key, value in sizes.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise DataError(f"split: {key} size must be a count or a fraction, got {value!r}")
        if not value >= 0:  # a NaN passed `< 0` and reached int(): "cannot convert float NaN to integer"
            raise DataError(f"split: {key} size must not be negative or NaN, got {value}")
        if isinstance(value, (float, np.floating)):
            if value > 1:
                raise DataError(f"split: {key} size {value} is a fraction above 1 (use an integer for a count)")
            counts[key] = int(round(value * total))
        else:
            counts[key] = int(value)
    used = sum(counts.values())
    if used > total:
        listed = " + ".join(f"{k} {v}" for k, v in counts.items())
        raise DataError(f"{source}: split {listed} = {used} {what} is larger than the {total} {what} available")
    for key in nones:
        counts[key] = total - used
    return counts["train"], counts["val"], counts["test"]


def _check_seed(seed) -> int:
    """A split seed: one whole number in 0 .. 2**32 - 1 (numpy refused -1 with a traceback)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= 2**32 - 1:
        raise DataError(f"split: seed must be a whole number in 0..{2**32 - 1}, got {seed!r}")
    return int(seed)


def random_split(n_structures: int, train: Size = 0.8, val: Size = 0.1, test: Size = None, seed: int = 0,
                 source: str = "dataset") -> Split:
    """Random split of ``range(n_structures)`` (see the module docstring)."""
    if isinstance(n_structures, bool) or not isinstance(n_structures, (int, np.integer)) or n_structures < 0:
        # 100.0 was numpy's "axis 0 is out of bounds", "100" "can't multiply sequence by non-int"
        raise DataError(f"split: the number of structures must be a whole number >= 0 (e.g. len(dataset)), got "
                        f"{n_structures!r}")
    n_structures = int(n_structures)
    n_train, n_val, n_test = resolve_sizes(n_structures, train, val, test, source=source)
    seed = _check_seed(seed)
    perm = np.random.default_rng(seed).permutation(n_structures)
    return Split(
        train=np.sort(perm[:n_train]),
        val=np.sort(perm[n_train:n_train + n_val]),
        test=np.sort(perm[n_train + n_val:n_train + n_val + n_test]),
        n_structures=n_structures,
        seed=seed,
        info={"kind": "random"},
    )


def group_split(groups: Sequence, train: Size = 0.8, val: Size = 0.1, test: Size = None, seed: int = 0,
                split_by_group: bool = True, val_groups: Sequence[str] = (), test_groups: Sequence[str] = (),
                source: str = "dataset") -> Split:
    """Split keeping whole groups together; ``groups`` holds one label (name) per structure.

    A part filled by named groups (``val_groups`` / ``test_groups``) takes nothing more: its size
    is ignored and the other sizes apply to the remaining groups (``split_by_group``) or
    structures (otherwise).
    """
    names, codes = np.unique(np.asarray([str(g) for g in groups], dtype=str), return_inverse=True)
    return group_split_codes(codes.reshape(-1), names.tolist(), train, val, test, seed, split_by_group,
                             val_groups, test_groups, source)


def group_split_codes(codes, names: Sequence[str], train: Size = 0.8, val: Size = 0.1, test: Size = None,
                      seed: int = 0, split_by_group: bool = True, val_groups: Sequence[str] = (),
                      test_groups: Sequence[str] = (), source: str = "dataset") -> Split:
    """:func:`group_split` of structures labelled by integer ``codes`` into ``names`` (a cache's
    ``group`` and ``group_names``): integer arithmetic only, so millions of structures split in
    about a second; the same split as :func:`group_split` of the names for the same seed (groups
    are ordered by name before they are shuffled)."""
    codes = np.asarray(codes, dtype=np.int64)
    seed = _check_seed(seed)
    n = len(codes)
    used = np.unique(codes)
    used_names = [str(names[c]) for c in used]
    order = sorted(range(len(used)), key=used_names.__getitem__)
    sorted_names = [used_names[i] for i in order]
    rank_of_code = np.full(int(used.max()) + 1 if used.size else 1, -1, dtype=np.int64)
    rank_of_code[used[order]] = np.arange(len(order))
    ranks = rank_of_code[codes]  # group of each structure as its position among the sorted names
    rank_of_name = {name: r for r, name in enumerate(sorted_names)}
    val_groups, test_groups = [str(g) for g in val_groups], [str(g) for g in test_groups]
    for part, chosen in (("val_groups", val_groups), ("test_groups", test_groups)):
        unknown = [g for g in chosen if g not in rank_of_name]
        if unknown:
            shown = ", ".join(sorted_names[:50]) + (f", ... ({len(sorted_names)} groups)" if len(sorted_names) > 50 else "")
            raise DataError(f"{source}: {part}: no group {', '.join(map(repr, unknown))}; groups: {shown}")
    both = sorted(set(val_groups) & set(test_groups))
    if both:
        raise DataError(f"split: group(s) {', '.join(both)} named in both val_groups and test_groups")
    named = {"train": [], "val": [rank_of_name[g] for g in val_groups], "test": [rank_of_name[g] for g in test_groups]}
    sizes = [0 if named[p] else size for p, size in zip(PARTS, (train, val, test))]
    taken = set(named["val"]) | set(named["test"])
    rest = np.array([r for r in range(len(sorted_names)) if r not in taken], dtype=np.int64)
    rng = np.random.default_rng(seed)
    parts = {p: [np.flatnonzero(np.isin(ranks, named[p]))] if named[p] else [] for p in PARTS}
    if split_by_group:
        counts = resolve_sizes(len(rest), *sizes, what="groups", source=source)
        perm = rest[rng.permutation(len(rest))]
        start = 0
        for part, count in zip(PARTS, counts):
            chosen = perm[start:start + count]
            start += count
            if len(chosen):
                parts[part].append(np.flatnonzero(np.isin(ranks, chosen)))
    else:
        remaining = np.flatnonzero(np.isin(ranks, rest))
        counts = resolve_sizes(len(remaining), *sizes, source=source)
        perm = remaining[rng.permutation(len(remaining))]
        start = 0
        for part, count in zip(PARTS, counts):
            parts[part].append(perm[start:start + count])
            start += count
    index = {p: np.sort(np.concatenate(parts[p])).astype(np.int64) if parts[p] else np.zeros(0, np.int64)
             for p in PARTS}
    split = Split(train=index["train"], val=index["val"], test=index["test"], n_structures=n, seed=seed,
                  info={"kind": "group", "split_by_group": split_by_group,
                        "groups": {p: [sorted_names[r] for r in np.unique(ranks[index[p]])] for p in PARTS}})
    if split_by_group:
        check_no_group_leak(split, ranks, sorted_names)
    return split


def make_split(structures, config) -> Split:
    """A new split of ``structures`` (a :class:`~torchmdx.data.Structures`) as a
    :class:`~torchmdx.data.DataConfig` asks: grouped when ``split_by_group``, ``val_groups`` or
    ``test_groups`` are set, random otherwise."""
    sizes = dict(train=config.train_size, val=config.val_size, test=config.test_size, seed=config.seed,
                 source=structures.source)
    if config.split_by_group or config.val_groups or config.test_groups:
        if structures.group is None:
            raise DataError(
                f"{structures.source}: a grouped split (split_by_group / val_groups / test_groups) needs group "
                "labels; set data.group_key to the info key that names each structure's group"
            )
        return group_split_codes(np.asarray(structures.group), structures.group_names,
                                 split_by_group=config.split_by_group, val_groups=config.val_groups,
                                 test_groups=config.test_groups, **sizes)
    return random_split(len(structures), **sizes)


def check_no_group_leak(split: Split, labels, names: Optional[Sequence[str]] = None) -> None:
    """DataError when a group has structures in two parts. ``labels``: one name per structure,
    or integer codes into ``names``."""
    if names is not None:
        codes = np.asarray(labels)
        seen = {p: np.unique(codes[split[p]]) for p in PARTS}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            shared = np.intersect1d(seen[a], seen[b])
            if shared.size:
                raise DataError(f"split: group(s) {', '.join(sorted(str(names[c]) for c in shared))} "
                                f"appear in both {a} and {b}")
        return
    labels = np.asarray(labels, dtype=object)
    seen = {p: set(labels[split[p]].tolist()) for p in PARTS}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = seen[a] & seen[b]
        if shared:
            raise DataError(f"split: group(s) {', '.join(sorted(shared))} appear in both {a} and {b}")


def copies_across_parts(structures, split: Split, chunk_atoms: int = 1 << 21) -> Optional[str]:
    """One line when validation or test structures have an exact copy (same atomic numbers and
    positions, bit for bit) in the training part, else None. Duplicated frames (a file read twice
    into one dataset, the repeated first frame of a restarted trajectory) land in two parts of a
    random split silently, and that part's errors become optimistic. Per-structure fingerprints
    (two random projections of the atoms summed in file order: equal for copies) are compared,
    and each candidate pair is confirmed exactly. One pass over the atoms in chunks."""
    offsets = np.asarray(structures.offsets, dtype=np.int64)
    n_structures = len(offsets) - 1
    if n_structures < 2 or len(split.train) == 0:
        return None
    weights = np.random.default_rng(20261206).standard_normal((4, 2))
    keys = np.full((n_structures, 2), np.nan)
    first = 0
    while first < n_structures:
        last = max(first + 1, int(np.searchsorted(offsets, offsets[first] + chunk_atoms, side="right")) - 1)
        last = min(last, n_structures)
        a0, a1 = int(offsets[first]), int(offsets[last])
        if a1 > a0:
            atoms = np.empty((a1 - a0, 4))
            atoms[:, :3] = np.asarray(structures.pos[a0:a1], dtype=np.float64)
            atoms[:, 3] = np.asarray(structures.z[a0:a1], dtype=np.float64)
            counts = np.diff(offsets[first:last + 1])
            starts = offsets[first:last] - a0
            filled = counts > 0
            keys[first:last][filled] = np.add.reduceat(atoms @ weights, starts[filled], axis=0)
        first = last
    # the cell and pbc belong to the structure: one-atom crystal cells of an equation of state (Cu at 3.4..3.8 Å)
    # were "exact copies" of each other (round 34)
    if getattr(structures, "cell", None) is not None:
        cells = np.concatenate([np.asarray(structures.cell, dtype=np.float64).reshape(n_structures, 9),
                                np.asarray(structures.pbc, dtype=np.float64).reshape(n_structures, 3)], axis=1)
        cell_weights = np.random.default_rng(20261207).standard_normal((12, 2))
        for k in range(12):  # column by column: equal cells give equal sums bit for bit, wherever their row lies
            keys += cells[:, k:k + 1] * cell_weights[k]
    counts = np.diff(offsets)
    train = np.asarray(split.train, dtype=np.int64)
    found, example = {}, None
    for part in ("val", "test"):
        other = np.asarray(split[part], dtype=np.int64)
        if other.size == 0:
            continue
        index = np.concatenate([train, other])
        in_other = np.r_[np.zeros(len(train), bool), np.ones(len(other), bool)]
        order = np.lexsort((keys[index, 1], keys[index, 0], counts[index]))
        index, in_other = index[order], in_other[order]
        k, c = keys[index], counts[index]
        same = (c[1:] == c[:-1]) & (k[1:] == k[:-1]).all(-1)
        run_start = np.r_[0, np.flatnonzero(~same) + 1]
        pairs = []
        for start, stop in zip(run_start, np.r_[run_start[1:], len(index)]):
            if stop - start > 1 and in_other[start:stop].any() and not in_other[start:stop].all():
                original = int(index[start:stop][~in_other[start:stop]][0])
                pairs += [(int(i), original) for i in index[start:stop][in_other[start:stop]]]
        confirmed = [(i, j) for i, j in pairs[:1000] if _same_structure(structures, offsets, i, j)]
        if confirmed:
            found[part] = f"{len(confirmed)}{'+' if len(pairs) > 1000 else ''} of the {part} split"
            example = example or confirmed[0]
    if not found:
        return None
    i, j = example
    energy = getattr(structures, "energy", None)
    energies = None if energy is None else np.asarray(energy[[min(i, j), max(i, j)]], dtype=np.float64).reshape(-1)
    if energies is not None and energies[0] != energies[1]:  # read as repeated frames, though the labels differ (round 33's leftover)
        e_i, e_j = (energies[0], energies[1]) if i < j else (energies[1], energies[0])
        return (f"{' and '.join(found.values())} have an exact copy of their atoms, positions and cell in the "
                f"training split (e.g. structure {i} = structure {j}), with other energies ({e_i:.6g} and {e_j:.6g} "
                "eV): the model cannot tell such structures apart, so their errors measure the labels' spread, not "
                "the fit; check the labels, or remove the copies from the data")
    return (f"{' and '.join(found.values())} have an exact copy in the training split (e.g. structure {i} = structure "
            f"{j}): duplicated frames (a file read twice, a restarted trajectory's repeated frame) make those errors "
            "optimistic; remove the copies from the data")


def _same_structure(structures, offsets, i: int, j: int) -> bool:
    a, b = slice(int(offsets[i]), int(offsets[i + 1])), slice(int(offsets[j]), int(offsets[j + 1]))
    return (np.array_equal(np.asarray(structures.z[a]), np.asarray(structures.z[b]))
            and np.array_equal(np.asarray(structures.pos[a]), np.asarray(structures.pos[b]))
            and (getattr(structures, "cell", None) is None
                 or (np.array_equal(np.asarray(structures.cell[i]), np.asarray(structures.cell[j]))
                     and np.array_equal(np.asarray(structures.pbc[i]), np.asarray(structures.pbc[j])))))


def save_split(split: Split, path, content_hash: str = "") -> Path:
    """Write ``split`` as an npz (temporary name, then rename)."""
    path = output_file_name(path)  # 'x/' was written as a file named x (Path drops the '/'; round 33)
    with atomic_write(path) as handle:
        np.savez(handle, train=split.train, val=split.val, test=split.test,
                 n_structures=np.int64(split.n_structures), seed=np.int64(-1 if split.seed is None else split.seed),
                 hash=np.str_(content_hash))
    return path


def _split_indices(path, part: str, values: np.ndarray, n_structures: Optional[int]) -> np.ndarray:
    """One part of a split file as [k] int64, or a DataError naming the part and the bad index:
    indices must be whole numbers in a flat list, inside the dataset."""
    values = np.asarray(values)
    if values.ndim != 1:
        raise DataError(f"{path}: {part} has shape {values.shape}; expected a flat list of structure indices")
    if values.dtype.kind not in "iu":
        if values.dtype.kind != "f" or not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            bad = values[0] if values.dtype.kind not in "f" else values[~(np.isfinite(values) & (values == np.round(values)))][0]
            bad = bad.item() if hasattr(bad, "item") else bad
            raise DataError(f"{path}: {part} holds {values.dtype} values such as {bad!r}; expected whole structure indices")
    idx = values.astype(np.int64)
    if idx.size and n_structures is not None:
        outside = idx[(idx < 0) | (idx >= n_structures)]
        if outside.size:
            raise DataError(f"{path}: {part} index {int(outside[0])} outside the dataset of {n_structures} structures")
    return idx


def load_split(path, n_structures: Optional[int] = None, content_hash: str = "") -> Split:
    """Read a split file; check it fits a dataset of ``n_structures``."""
    path = Path(path)
    if not path.is_file():
        from torchmdx.io_utils import missing_file_reason

        raise DataError(f"{path}: {missing_file_reason(path, 'split file')}")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not head.startswith(b"PK"):  # numpy would try to unpickle it and advise allow_pickle
        raise DataError(f"{path}: not a split file (split files are npz archives written by torchmdx train; this one "
                        "is not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable split file ({str(exc).splitlines()[0] if str(exc) else exc!r})") from None
    except Exception as exc:  # noqa: BLE001 - zipfile/zlib errors of a damaged archive
        raise DataError(f"{path}: not a readable split file: truncated or damaged ({type(exc).__name__})") from None
    missing = [k for k in PARTS if k not in arrays]
    if missing:
        raise DataError(f"{path}: split file lacks {', '.join(missing)}; found: {', '.join(sorted(arrays))}")
    for key in ("n_structures", "seed"):  # scalars written by save_split; another tool's file may differ
        value = arrays.get(key)
        whole = value is not None and value.ndim == 0 and (value.dtype.kind in "iu" or value.dtype.kind == "f"
                                                            and np.isfinite(value) and value == np.round(value))
        if value is not None and not whole:
            shown = repr(value.item()) if value.ndim == 0 else f"an array of shape {value.shape}"
            raise DataError(f"{path}: '{key}' is {shown} ({value.dtype}); expected one whole number (or leave it out)")
    stored_n = int(arrays["n_structures"]) if "n_structures" in arrays else None
    if n_structures is not None and stored_n is not None and stored_n != n_structures:
        raise DataError(
            f"{path}: split made for {stored_n} structures, but the dataset has {n_structures}; "
            "delete it or set another split_file"
        )
    n_check = n_structures if n_structures is not None else stored_n
    for part in PARTS:
        arrays[part] = _split_indices(path, part, arrays[part], n_check)
    # a structure in two parts leaks test data into training; one listed twice is counted twice
    every = np.concatenate([arrays[part] for part in PARTS])
    values, counts = np.unique(every, return_counts=True)
    if np.any(counts > 1):
        i = int(values[np.argmax(counts > 1)])
        parts = [part for part in PARTS for _ in range(int(np.count_nonzero(arrays[part] == i)))]
        where = f"twice in {parts[0]}" if parts[0] == parts[1] else f"in both {parts[0]} and {parts[1]}"
        raise DataError(f"{path}: structure {i} is {where}; each structure may be in one part of a split, once")
    stored_hash = str(arrays["hash"]) if "hash" in arrays else ""
    if content_hash and stored_hash and stored_hash != content_hash:
        warnings.warn(f"{path}: split was made from a dataset with different content (hash differs): right when the "
                      "same structures were labelled again, otherwise its indices pick other structures than those it "
                      "was made for", stacklevel=2)
    seed = int(arrays["seed"]) if "seed" in arrays else -1
    return Split(train=arrays["train"], val=arrays["val"], test=arrays["test"], n_structures=int(n_check or 0),
                 seed=None if seed < 0 else seed, info={"kind": "file", "path": os.fspath(path), "hash": stored_hash})


def split_digest(split: Split, content_hash: str = "") -> str:
    """A short hash (12 hex digits) of a split: its train, val and test indices (in order), the number of
    structures and the data's content hash. Two runs have the same digest exactly when their parts pick the
    same structures of the same data; a model file records its run's (``torchmdx.train.provenance``)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=6)
    for part in PARTS:
        values = np.ascontiguousarray(np.asarray(split[part], dtype=np.int64))
        digest.update(f"{part}:{values.size};".encode())
        digest.update(values.tobytes())
    digest.update(f"n:{int(split.n_structures)};hash:{content_hash}".encode())
    return digest.hexdigest()
