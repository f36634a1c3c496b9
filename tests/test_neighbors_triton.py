"""Triton neighbor lists vs the torch reference and an independent numpy enumeration.

CPU: the same Triton kernels run under the Triton interpreter (TRITON_INTERPRET=1) in ONE
subprocess (tests/neighbors_triton_worker.py), so the variable never reaches this pytest
process; the comparisons happen here. GPU (@pytest.mark.gpu): hundreds of random cases,
CUDA-graph capture, no host synchronisation in the fixed-capacity path.

References:
- ``enumerate_pairs``: numpy, every image n in a box of images wide enough to hold all pairs
  (no wrapping, no minimum-image logic), kept if cutoff_lower <= |pos_j - pos_i + n @ cell| < cutoff.
- ``torchmdx.kernels.neighbors_ref`` (torch reference): rows must be identical (brute force in
  the same order; the cell list sorted by receiver, in a deterministic order within a receiver).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from torchmdx.kernels import neighbors_ref

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# independent reference (numpy, all images)
# ---------------------------------------------------------------------------------------------
def enumerate_pairs(pos, cutoff, cell=None, pbc=None, cutoff_lower=0.0, full=True):
    """{(i, j, n0, n1, n2): distance} for one structure, by enumerating every image."""
    pos = np.asarray(pos, dtype=np.float64)
    n = len(pos)
    out = {}
    if n == 0:
        return out
    periodic = np.zeros(3, bool) if pbc is None else np.asarray(pbc, bool).reshape(3)
    cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64).reshape(3, 3)
    ranges = []
    for k in range(3):
        if not periodic[k]:
            ranges.append(np.zeros(1, dtype=np.int64))
            continue
        # bound: |n_k| <= (|delta| + cutoff) / width_k + 1 (width within the periodic sublattice)
        width = periodic_widths(cell, periodic)[int(periodic[:k].sum())]
        span = np.linalg.norm(np.ptp(pos, axis=0)) + cutoff  # |n_k| w_k <= |pos_j - pos_i| + cutoff
        r = int(math.ceil(span / width)) + 1
        ranges.append(np.arange(-r, r + 1))
    images = np.stack(np.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, 3)
    delta = pos[None, :, :] - pos[:, None, :]  # [i, j] = pos_j - pos_i
    for img in images:
        vec = delta + img @ cell
        dist2 = (vec**2).sum(-1)
        keep = (dist2 < cutoff * cutoff) & (dist2 >= cutoff_lower * cutoff_lower)
        if not img.any():
            np.fill_diagonal(keep, False)
        for a, b in zip(*np.nonzero(keep)):
            if not full and not a < b:
                continue
            out[(int(a), int(b), int(img[0]), int(img[1]), int(img[2]))] = float(math.sqrt(dist2[a, b]))
    return out


def enumerate_batch(pos, cutoff, batch, cells, pbcs, cutoff_lower=0.0, full=True):
    """Per-structure enumeration mapped back to global atom indices."""
    out = {}
    batch = np.asarray(batch)
    for b in np.unique(batch):
        atoms = np.nonzero(batch == b)[0]
        local = enumerate_pairs(pos[atoms], cutoff, cells[b] if cells is not None else None,
                                pbcs[b] if pbcs is not None else None, cutoff_lower, full)
        for (i, j, *n), d in local.items():
            out[(int(atoms[i]), int(atoms[j]), *n)] = d
    return out


def as_dict(res):
    """Worker/Neighbors result -> {(i, j, n...): distance} of valid rows."""
    ei, shifts, dist = res["edge_index"], res["shifts"], res["distances"]
    valid = torch.ones(ei.shape[1], dtype=torch.bool) if res["mask"] is None else res["mask"]
    rows = valid.nonzero().flatten()
    keys = zip(ei[0, rows].tolist(), ei[1, rows].tolist(), shifts[rows].round().long().tolist())
    return {(i, j, *n): d for (i, j, n), d in zip(keys, dist[rows].tolist())}


def nb_dict(nb):
    return as_dict({"edge_index": nb.edge_index.cpu(), "shifts": nb.shifts.cpu(),
                    "distances": nb.distances.cpu(), "mask": None if nb.mask is None else nb.mask.cpu()})


def assert_pairs_equal(got, want, cutoff, cutoff_lower=0.0, dist_tol=1e-6, boundary_tol=0.0):
    """Same (i, j, n) sets; pairs only in one set must lie within boundary_tol of a cutoff."""
    only_got = set(got) - set(want)
    only_want = set(want) - set(got)
    for key in only_got | only_want:
        d = got.get(key, want.get(key))
        near = min(abs(d - cutoff), abs(d - cutoff_lower) if cutoff_lower > 0 else math.inf)
        assert near <= boundary_tol, f"pair {key} at {d} Å only in {'triton' if key in got else 'reference'}"
    for key in set(got) & set(want):
        assert abs(got[key] - want[key]) <= dist_tol * max(1.0, want[key]), (key, got[key], want[key])


def by_receiver_then_neighbor(edge_index):
    """Permutation sorting rows by (i, j) (pairs are unique under minimum image)."""
    if edge_index.shape[1] == 0:
        return torch.zeros(0, dtype=torch.long)
    key = edge_index[0].long() * (int(edge_index.max()) + 1) + edge_index[1].long()
    return torch.sort(key, stable=True).indices


def check_rows(res, pos, cell, batch, pbc=None):
    """Every valid row: vectors == pos[j] - pos[i] + n @ cell and distances == |vectors|;
    sorted by i, each (i, j) once."""
    ei = res["edge_index"].numpy()
    valid = np.ones(ei.shape[1], bool) if res["mask"] is None else res["mask"].numpy()
    ei = ei[:, valid]
    shifts = res["shifts"].numpy()[valid].astype(np.float64)
    vec = res["vectors"].numpy()[valid].astype(np.float64)
    dist = res["distances"].numpy()[valid].astype(np.float64)
    pos = np.asarray(pos, np.float64)
    if ei.shape[1] == 0:
        return
    if cell is None:
        cells = np.zeros((ei.shape[1], 3, 3))
    else:
        c = np.asarray(cell, np.float64)
        cells = np.broadcast_to(c, (ei.shape[1], 3, 3)) if c.ndim == 2 else c[np.asarray(batch)[ei[0]]]
    if pbc is not None:
        p = np.asarray(pbc, bool)
        p = np.broadcast_to(p, (ei.shape[1], 3)) if p.ndim == 1 else p[np.asarray(batch)[ei[0]]]
        assert not np.any(shifts[~p]), "non-zero shift along a non-periodic direction"
    expect = pos[ei[1]] - pos[ei[0]] + np.einsum("ek,ekd->ed", shifts, cells)
    tol = 1e-9 if res["vectors"].dtype == torch.float64 else 1e-4
    np.testing.assert_allclose(vec, expect, atol=tol * max(1.0, np.abs(pos).max()))
    np.testing.assert_allclose(dist, np.linalg.norm(vec, axis=-1), rtol=1e-6, atol=1e-6)
    assert np.all(np.diff(ei[0]) >= 0), "rows are not sorted by i"
    key = ei[0].astype(np.int64) * (ei.max() + 1) + ei[1]
    assert len(np.unique(key)) == len(key), "a pair appears twice"


# ---------------------------------------------------------------------------------------------
# random structures
# ---------------------------------------------------------------------------------------------
def random_cell(rng, kind, width):
    if kind == "cubic":
        return np.eye(3) * width
    if kind == "ortho":
        return np.diag(width * rng.uniform(1.0, 1.4, 3))
    # triclinic: lower-triangular with sizeable tilts (ASE/LAMMPS-like restricted form)
    cell = np.diag(width * rng.uniform(1.0, 1.3, 3))
    cell[1, 0] = rng.uniform(-0.45, 0.45) * cell[0, 0]
    cell[2, 0] = rng.uniform(-0.45, 0.45) * cell[0, 0]
    cell[2, 1] = rng.uniform(-0.45, 0.45) * cell[1, 1]
    if kind == "triclinic_rotated":
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        cell = cell @ q
    return cell


def periodic_widths(cell, pbc):
    """Perpendicular width of each periodic direction within the periodic sublattice (Å)."""
    cell = np.asarray(cell, np.float64)
    out = []
    for k in range(3):
        if not pbc[k]:
            continue
        others = [cell[m] for m in range(3) if m != k and pbc[m]]
        basis = []
        for o in others:  # orthonormal basis of the other periodic rows
            for b in basis:
                o = o - (o @ b) * b
            basis.append(o / np.linalg.norm(o))
        v = cell[k].copy()
        for b in basis:
            v = v - (v @ b) * b
        out.append(np.linalg.norm(v))
    return out


def min_width(cell, pbc):
    return min(periodic_widths(cell, pbc))


def periodic_structure(rng, n, kind, cutoff_fraction, pbc=(True, True, True), spread=1.6):
    """n atoms in a cell of some shape; positions up to ``spread`` cells outside the box."""
    cell = random_cell(rng, kind, 1.0)
    frac = rng.uniform(-spread + 1, spread, (n, 3))
    pos = frac @ cell
    pbc = np.asarray(pbc, bool)
    if not pbc.all():  # slab / wire: replace a non-periodic row by zeros (allowed by the contract)
        cell = cell.copy()
        cell[np.nonzero(~pbc)[0][0]] = 0.0
    cutoff = cutoff_fraction * min_width(cell, pbc) if pbc.any() else cutoff_fraction
    return pos, cell, pbc, cutoff


def scale(pos, cell, factor):
    return pos * factor, cell * factor


# ---------------------------------------------------------------------------------------------
# CPU cases under the interpreter
# ---------------------------------------------------------------------------------------------
def build_cases():
    rng = np.random.default_rng(20261124)
    cases = []

    def add(name, pos, cutoff, batch=None, cell=None, pbc=None, dtype=torch.float64, **kw):
        args = dict(pos=torch.tensor(np.asarray(pos), dtype=dtype), cutoff=float(cutoff))
        if batch is not None:
            args["batch"] = torch.tensor(np.asarray(batch), dtype=torch.long)
        if cell is not None:
            args["cell"] = torch.tensor(np.asarray(cell), dtype=dtype)
        if pbc is not None:
            args["pbc"] = torch.tensor(np.asarray(pbc), dtype=torch.bool)
        args.update(kw)
        cases.append({"name": name, "call": "nl", "args": args})

    # open clusters
    for n in (0, 1, 2, 17, 33):
        pos = rng.uniform(0, 9.0, (n, 3))
        for method in ("brute", "cell"):
            add(f"open-n{n}-{method}", pos, 3.3, method=method)
    add("open-half-cell", rng.uniform(0, 9.0, (40, 3)), 3.3, method="cell", full=False)
    add("open-planar-cell", np.c_[rng.uniform(0, 12, (30, 2)), np.zeros(30)], 3.0, method="cell")
    add("open-line-cell", np.c_[rng.uniform(0, 30, 25), np.zeros((25, 2))], 2.0, method="cell")
    # crowded cells with tiles of 8: a cell spans several receiver tiles, ordering blocks
    # (the count pass puts each cell back in atom order) and candidate tiles; each cell's
    # neighbour rows split over 9 or 3 work items. Sizes: the interpreter's time grows with
    # (tiles of a cell)^2, so just enough atoms for that: 40 in the one open cell (5 tiles), 64 in
    # the 2 x 2 x 2 triclinic cells (3-13 per cell: one or two tiles). The draws are those of 70
    # and 100 atoms (the later cases' random structures stay the same), the first rows kept.
    small_tiles = {"cell_block_i": 8, "cell_block_j": 8, "cell_block_i_write": 8, "cell_block_j_write": 8,
                   "cell_block_o": 8, "fill_block": 64, "cell_parts": 9}
    add("crowded-open-cell", rng.uniform(0, 4.0, (70, 3))[:40], 3.0, method="cell")
    cases[-1]["config"] = small_tiles
    pos, cell, pbc, cutoff = periodic_structure(rng, 100, "triclinic", 0.49)
    pos, cell = scale(pos[:64], cell, 7.0)
    add("crowded-triclinic-cell-half", pos, cutoff * 7.0, cell=cell, pbc=pbc, method="cell", full=False)
    cases[-1]["config"] = small_tiles
    add("capacity-crowded-triclinic", pos, cutoff * 7.0, cell=cell, pbc=pbc, method="cell", max_pairs=20000)
    cases[-1]["config"] = dict(small_tiles, cell_parts=3)
    # periodic boxes, atoms up to 1.6 cells outside, cutoff up to (just under) half the width
    kinds = ["cubic", "ortho", "triclinic", "triclinic_rotated"]
    for t, kind in enumerate(kinds):
        for frac in (0.3, 0.4999):
            pos, cell, pbc, cutoff = periodic_structure(rng, 26, kind, frac)
            pos, cell = scale(pos, cell, 8.0)
            cutoff *= 8.0
            for method in ("brute", "cell"):
                full = (t + int(frac > 0.4)) % 2 == 0
                add(f"{kind}-{frac}-{method}-{'full' if full else 'half'}", pos, cutoff, cell=cell, pbc=pbc,
                    method=method, full=full)
    # cutoff exactly half the (cubic) width: allowed, pairs at exactly the cutoff excluded
    pos, cell, pbc, _ = periodic_structure(rng, 30, "cubic", 0.5)
    pos, cell = scale(pos, cell, 7.0)
    for method in ("brute", "cell"):
        add(f"half-width-exact-{method}", pos, 3.5, cell=cell, pbc=pbc, method=method)
    # slab (zero third row) and wire, triclinic in-plane
    for pattern in ((True, True, False), (True, False, False), (False, True, True)):
        pos, cell, pbc, cutoff = periodic_structure(rng, 32, "triclinic", 0.45, pbc=pattern)
        pos, cell = scale(pos, cell, 8.0)
        tag = "".join("p" if p else "o" for p in pattern)
        for method in ("brute", "cell"):
            add(f"mixed-{tag}-{method}", pos, cutoff * 8.0, cell=cell, pbc=pbc, method=method)
    # lower cutoff
    pos, cell, pbc, cutoff = periodic_structure(rng, 36, "triclinic", 0.45)
    pos, cell = scale(pos, cell, 8.0)
    for method in ("brute", "cell"):
        add(f"lower-{method}", pos, cutoff * 8.0, cell=cell, pbc=pbc, cutoff_lower=1.9, method=method)
    # atoms exactly at the cutoff: simple cubic lattice, spacing 1.5, box 6 (exact in binary)
    index = np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)
    images = rng.integers(-2, 3, index.shape)  # same lattice, atoms in other images
    grid = index * 1.5 + images * 6.0
    # cutoff 1.5 (the spacing) on the 3 x 3 x 3 part of that lattice in a box of 4.5: the same
    # exact distances, 2 x 2 x 2 cells instead of 3 x 3 x 3 (a sixth of the interpreter time; cells of
    # three or more along an axis, with their wrapped neighbour, are run by the random boxes)
    small = (index < 3).all(1)
    grid27 = index[small] * 1.5 + images[small] * 4.5
    for dtype in (torch.float64, torch.float32):
        dn = "f64" if dtype == torch.float64 else "f32"
        for method in ("brute", "cell"):
            add(f"lattice-cut3.0-{dn}-{method}", grid, 3.0, cell=np.eye(3) * 6.0, pbc=[True] * 3, dtype=dtype, method=method)
            add(f"lattice-cut1.5-{dn}-{method}", grid27, 1.5, cell=np.eye(3) * 4.5, pbc=[True] * 3, dtype=dtype,
                method=method)
            add(f"lattice-lower1.5-{dn}-{method}", grid, 2.2, cell=np.eye(3) * 6.0, pbc=[True] * 3, dtype=dtype,
                cutoff_lower=1.5, method=method)
    # batched: per-structure cells and pbc, an empty structure (index 2), a single atom (index 3)
    parts, cells, pbcs, batch = [], [], [], []
    specs = [("triclinic", (True, True, True), 14), ("ortho", (True, True, False), 11), (None, None, 0),
             ("cubic", (True, True, True), 1), (None, (False, False, False), 16), ("triclinic", (True, True, True), 12)]
    for b, (kind, pattern, n) in enumerate(specs):
        if kind is None:
            pos = rng.uniform(0, 6.0, (n, 3))
            cell = np.eye(3) * 3.0
            pattern = (False, False, False)
        else:
            pos, cell, _, _ = periodic_structure(rng, n, kind, 0.4, pbc=pattern)
            pos, cell = scale(pos, cell, 7.0 + b)
        parts.append(pos)
        cells.append(cell)
        pbcs.append(pattern)
        batch += [b] * n
    bpos = np.concatenate(parts)
    bcut = 0.45 * min(min_width(c, p) for c, p in zip(cells, pbcs) if any(p))
    for method in ("brute", "cell"):
        for full in (True, False):
            add(f"batched-{method}-{'full' if full else 'half'}", bpos, bcut, batch=batch, cell=np.stack(cells),
                pbc=np.array(pbcs), method=method, full=full)
    # batch of small open molecules with a shared (unused) cell, and an unsorted batch vector
    mols = np.concatenate([rng.normal(size=(7, 3)) * 1.2 + 40.0 * m for m in range(6)])
    mbatch = np.repeat(np.arange(6), 7)
    add("molecules-brute", mols, 2.5, batch=mbatch, method="brute")
    add("molecules-cell", mols, 2.5, batch=mbatch, method="cell")
    shuffled = rng.permutation(len(mols))
    add("molecules-unsorted", mols[shuffled], 2.5, batch=mbatch[shuffled], method="brute")
    # fixed capacity: padding and overflow (exact count known from the exact path)
    pos, cell, pbc, cutoff = periodic_structure(rng, 30, "triclinic", 0.45)
    pos, cell = scale(pos, cell, 8.0)
    for method in ("brute", "cell"):
        add(f"capacity-exact-{method}", pos, cutoff * 8.0, cell=cell, pbc=pbc, method=method)
        add(f"capacity-pad-{method}", pos, cutoff * 8.0, cell=cell, pbc=pbc, method=method, max_pairs=2000)
        add(f"capacity-overflow-{method}", pos, cutoff * 8.0, cell=cell, pbc=pbc, method=method, max_pairs=25)
        add(f"capacity-zero-{method}", pos, cutoff * 8.0, cell=cell, pbc=pbc, method=method, max_pairs=0)
    add("capacity-batched-brute", bpos, bcut, batch=batch, cell=np.stack(cells), pbc=np.array(pbcs),
        method="brute", max_pairs=600)
    # refusals and errors (same class as the reference)
    pos, cell, pbc, cutoff = periodic_structure(rng, 10, "triclinic", 0.5001)
    add("refuse-half-width", pos * 8.0, cutoff * 8.0, cell=cell * 8.0, pbc=pbc)
    add("refuse-singular", pos, 1.0, cell=np.array([[5.0, 0, 0], [10.0, 0, 0], [0, 0, 5.0]]), pbc=[True, True, False])
    add("error-nan", np.array([[0.0, 0, 0], [np.nan, 1, 1]]), 2.0)
    add("error-pbc-without-cell", rng.uniform(0, 5, (4, 3)), 2.0, pbc=[True, False, False])
    # dispatcher routes backend="triton" here
    pos, cell, pbc, cutoff = periodic_structure(rng, 20, "triclinic", 0.4)
    cases.append({"name": "dispatch", "call": "dispatch",
                  "args": dict(pos=torch.tensor(pos * 8.0), cutoff=cutoff * 8.0, cell=torch.tensor(cell * 8.0),
                               pbc=torch.tensor(pbc), full=False)})
    # Verlet skin check: displacement just under / over skin/2, and a wrapped (unmoved) atom
    for kind in ("cubic", "triclinic"):
        pos, cell, pbc, _ = periodic_structure(rng, 20, kind, 0.4)
        pos, cell = pos * 8.0, cell * 8.0
        for tag, step in (("below", 0.999), ("above", 1.001)):
            moved = pos.copy()
            moved[3] += step * np.array([0.6, 0.0, 0.8])  # moves by `step` Å; skin 2 Å -> limit 1 Å
            moved[5] += cell[0] - 2 * cell[2]  # wrapped by lattice vectors: not a move
            moved[7] += 0.9 * np.array([0.0, 1.0, 0.0]) + cell[1]  # 0.9 Å plus a wrap: below the limit
            cases.append({"name": f"skin-{kind}-{tag}", "call": "needs_rebuild",
                          "args": dict(pos=torch.tensor(moved), reference_pos=torch.tensor(pos), skin=2.0,
                                       cell=torch.tensor(cell), pbc=torch.tensor(pbc))})
    # the geometry built on the device at every call (cell_check="device", for captured steps):
    # the same lists as the host-checked path, and bad cells reported instead of raised
    # (the slab, wire and batch twins by brute force only: their host-checked cell-list cases
    # already run the cell kernels with the device path's flags, periodic, triclinic and open,
    # on the same geometry rows; the fully periodic twins' cell-list runs switch those flags on)
    twins = ("mixed-", "batched-", "triclinic-0.4999", "triclinic_rotated-0.3", "lattice-cut3.0-f64",
             "half-width-exact")
    for case in list(cases):
        if case["name"].startswith(("mixed-", "batched-")) and case["args"].get("method") == "cell":
            continue
        if case["call"] == "nl" and case["name"].startswith(twins):
            cases.append({"name": "device-" + case["name"], "call": "nl", "config": case.get("config", {}),
                          "args": dict(case["args"], cell_check="device")})
    for name in ("refuse-half-width", "refuse-singular"):
        twin = next(c for c in cases if c["name"] == name)
        cases.append({"name": "device-" + name, "call": "nl",
                      "args": dict(twin["args"], cell_check="device", max_pairs=64)})
    return cases


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """(cases by name, worker results by name): one interpreter subprocess for all cases."""
    cases = build_cases()
    folder = tmp_path_factory.mktemp("triton_interp")
    torch.save(cases, folder / "cases.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "neighbors_triton_worker.py"), str(folder / "cases.pt"), str(folder / "results.pt")],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(folder / "results.pt", weights_only=False)
    return {c["name"]: c for c in build_cases()}, results


CASE_NAMES = [c["name"] for c in build_cases()]
NL_CASES = [n for n in CASE_NAMES if not n.startswith(("refuse", "error", "skin", "capacity", "dispatch",
                                                       "device-refuse"))]


def reference(args, **override):
    kw = {k: v for k, v in args.items() if k not in ("method", "max_pairs")}
    kw.update(override)
    return neighbors_ref.neighbor_list(**kw, method="brute")


_ENUMERATED: dict = {}


def enumerated(args):
    """The numpy enumeration of a case's pairs, computed once per distinct input (the brute and
    cell cases, their device twins and a lattice's float32 copy share one: it is the costly part
    of those tests, up to 19^3 images of a lattice spread over several boxes)."""
    key = tuple((k, v.double().numpy().tobytes() if torch.is_tensor(v) and v.is_floating_point()
                 else v.numpy().tobytes() if torch.is_tensor(v) else v)
                for k, v in sorted(args.items()) if k in ("pos", "cutoff", "cutoff_lower", "full", "cell", "pbc", "batch"))
    if key not in _ENUMERATED:
        _ENUMERATED[key] = _enumerate(args)
    return dict(_ENUMERATED[key])


def _enumerate(args):
    pos = args["pos"].double().numpy()
    cutoff, lower = args["cutoff"], args.get("cutoff_lower", 0.0)
    full = args.get("full", True)
    cell = None if "cell" not in args else args["cell"].double().numpy()
    pbc = None if "pbc" not in args else args["pbc"].numpy()
    if "batch" in args:
        batch = args["batch"].numpy()
        nstruct = int(batch.max()) + 1
        cells = None if cell is None else (np.broadcast_to(cell, (nstruct, 3, 3)) if cell.ndim == 2 else cell)
        pbcs = None if pbc is None else (np.broadcast_to(pbc, (nstruct, 3)) if pbc.ndim == 1 else pbc)
        return enumerate_batch(pos, cutoff, batch, cells, pbcs, lower, full)
    if pbc is not None and cell is None:
        pbc = None
    return enumerate_pairs(pos, cutoff, cell, pbc, lower, full)


@pytest.mark.parametrize("name", NL_CASES)
def test_interpreter_matches_enumeration_and_reference(interpreted, name):
    cases, results = interpreted
    args, res = cases[name]["args"], results[name]
    assert "error" not in res, res
    f32 = args["pos"].dtype == torch.float32
    # 1) independent enumeration of all images (float64): same pairs, distances to 1e-6 Å
    want = enumerated(args)
    got = as_dict(res)
    assert_pairs_equal(got, want, args["cutoff"], args.get("cutoff_lower", 0.0), dist_tol=1e-5 if f32 else 1e-9)
    if want:
        assert res["num_pairs"] == len(want) and not res["overflow"]
    # 2) the torch reference: identical rows; brute force in identical order, the cell list
    #    sorted by i (its order within one i is the deterministic cell-scan order)
    ref = reference(args)
    order = by_receiver_then_neighbor(res["edge_index"])
    if args.get("method") == "brute":
        assert torch.equal(order, torch.arange(order.numel()))
    else:
        assert torch.all(res["edge_index"][0, 1:] >= res["edge_index"][0, :-1]), "rows not sorted by receiver"
    assert torch.equal(res["edge_index"][:, order], ref.edge_index)
    assert torch.equal(res["shifts"][order], ref.shifts)
    torch.testing.assert_close(res["vectors"][order], ref.vectors, rtol=0, atol=1e-5 if f32 else 1e-12)
    torch.testing.assert_close(res["distances"][order], ref.distances, rtol=0, atol=1e-5 if f32 else 1e-12)
    check_rows(res, args["pos"].numpy(), None if "cell" not in args else args["cell"].numpy(),
               None if "batch" not in args else args["batch"].numpy(), None if "pbc" not in args else args["pbc"].numpy())


def test_interpreter_lattice_exact_cutoff(interpreted):
    """Pairs at exactly the cutoff are excluded, at exactly cutoff_lower included (hand counts)."""
    cases, results = interpreted
    n = 64
    for dn in ("f64", "f32"):
        for method in ("brute", "cell"):
            # simple cubic, spacing 1.5, cutoff 3.0 (= half the box): 6 + 12 + 8 neighbours below 3.0
            assert results[f"lattice-cut3.0-{dn}-{method}"]["num_pairs"] == n * 26
            # cutoff 1.5 == nearest-neighbour distance: nothing
            assert results[f"lattice-cut1.5-{dn}-{method}"]["num_pairs"] == 0
            # 1.5 <= r < 2.2: 6 nearest + 12 second (2.12) neighbours
            assert results[f"lattice-lower1.5-{dn}-{method}"]["num_pairs"] == n * 18


@pytest.mark.parametrize("method", ["brute", "cell"])
def test_interpreter_fixed_capacity(interpreted, method):
    cases, results = interpreted
    exact = results[f"capacity-exact-{method}"]
    total = exact["num_pairs"]
    assert 25 < total < 2000
    n_atoms = cases[f"capacity-exact-{method}"]["args"]["pos"].shape[0]
    # padding rows: i = j = N - 1, zeros, mask False; valid rows identical to the exact list
    pad = results[f"capacity-pad-{method}"]
    assert pad["edge_index"].shape == (2, 2000) and not pad["overflow"] and pad["num_pairs"] == total
    assert pad["mask"][:total].all() and not pad["mask"][total:].any()
    assert torch.equal(pad["edge_index"][:, :total], exact["edge_index"])
    assert torch.equal(pad["shifts"][:total], exact["shifts"])
    assert (pad["edge_index"][:, total:] == n_atoms - 1).all()
    for key in ("shifts", "vectors", "distances"):
        assert (pad[key][total:] == 0).all()
    # overflow: flagged, true count reported, every row still a real pair
    over = results[f"capacity-overflow-{method}"]
    assert over["overflow"] and over["num_pairs"] == total and over["mask"].all()
    assert set(as_dict(over)) <= set(as_dict(exact))
    assert len(set(as_dict(over))) == 25
    zero = results[f"capacity-zero-{method}"]
    assert zero["overflow"] and zero["num_pairs"] == total and zero["edge_index"].shape == (2, 0)


def test_interpreter_capacity_crowded(interpreted):
    """Fixed capacity with small tiles in crowded cells: valid rows are the reference's pairs,
    sorted by receiver; the rest is padding."""
    cases, results = interpreted
    args, res = cases["capacity-crowded-triclinic"]["args"], results["capacity-crowded-triclinic"]
    ref = reference(args)
    total = ref.edge_index.shape[1]
    assert 1000 < total < 20000 and res["num_pairs"] == total and not res["overflow"]
    assert res["mask"][:total].all() and not res["mask"][total:].any()
    valid = {k: res[k][:total] if k != "edge_index" else res[k][:, :total] for k in ("edge_index", "shifts", "vectors", "distances")}
    order = by_receiver_then_neighbor(valid["edge_index"])
    assert torch.all(valid["edge_index"][0, 1:] >= valid["edge_index"][0, :-1])
    assert torch.equal(valid["edge_index"][:, order], ref.edge_index)
    assert torch.equal(valid["shifts"][order], ref.shifts)
    torch.testing.assert_close(valid["vectors"][order], ref.vectors, rtol=0, atol=1e-12)
    assert (res["edge_index"][:, total:] == args["pos"].shape[0] - 1).all()


def test_interpreter_capacity_batched(interpreted):
    cases, results = interpreted
    res = results["capacity-batched-brute"]
    exact = results["batched-brute-full"]
    total = exact["num_pairs"]
    assert total < 600 and not res["overflow"] and res["num_pairs"] == total
    assert torch.equal(res["edge_index"][:, :total], exact["edge_index"])


def test_interpreter_unsorted_batch(interpreted):
    cases, results = interpreted
    args = cases["molecules-unsorted"]["args"]
    res = results["molecules-unsorted"]
    ref = reference(args)
    assert torch.equal(res["edge_index"], ref.edge_index)  # brute force: sorted by (i, j)
    torch.testing.assert_close(res["distances"], ref.distances, rtol=0, atol=1e-12)


def test_interpreter_errors(interpreted):
    cases, results = interpreted
    res = results["refuse-half-width"]
    assert res.get("error") == "NeighborListError"
    assert "structure 0" in res["message"] and "perpendicular width" in res["message"]
    with pytest.raises(Exception) as ref_err:
        reference(cases["refuse-half-width"]["args"])
    assert type(ref_err.value).__name__ == "NeighborListError"
    assert results["refuse-singular"].get("error") == "NeighborListError"
    assert "singular" in results["refuse-singular"]["message"]
    assert results["error-nan"].get("error") == "NeighborListError"
    assert "atom 1" in results["error-nan"]["message"]
    assert results["error-pbc-without-cell"].get("error") == "NeighborListError"


def test_interpreter_device_cell_check(interpreted):
    """cell_check="device": lists equal to the host-checked ones (above: every device-* case
    against enumeration and the reference); a bad cell is reported in cell_error, not raised,
    as 4 * structure + code (cell_geometry.NARROW = 3, SINGULAR = 2)."""
    cases, results = interpreted
    for name in CASE_NAMES:
        if name.startswith("device-") and not name.startswith("device-refuse"):
            assert results[name]["cell_error"] == -1, name
            host = results[name[len("device-"):]]
            assert results[name]["num_pairs"] == host["num_pairs"] and host["cell_error"] is None
    narrow = results["device-refuse-half-width"]
    assert "error" not in narrow and narrow["cell_error"] == 0 * 4 + 3
    singular = results["device-refuse-singular"]
    assert "error" not in singular and singular["cell_error"] == 0 * 4 + 2
    ref = neighbors_ref.neighbor_list(**cases["device-refuse-half-width"]["args"])
    assert int(ref.cell_error) == 3


def test_interpreter_dispatch(interpreted):
    cases, results = interpreted
    args = cases["dispatch"]["args"]
    res = results["dispatch"]
    ref = reference(args)
    order = by_receiver_then_neighbor(res["edge_index"])
    assert res["num_pairs"] > 0 and torch.equal(res["edge_index"][:, order], ref.edge_index)


@pytest.mark.parametrize("kind", ["cubic", "triclinic"])
def test_interpreter_needs_rebuild(interpreted, kind):
    cases, results = interpreted
    assert results[f"skin-{kind}-below"] == {"flag": False}
    assert results[f"skin-{kind}-above"] == {"flag": True}


@pytest.mark.parametrize("kind", ["cubic", "triclinic"])
def test_needs_rebuild_torch_path(kind):
    """The plain-torch path (CPU without the interpreter) agrees with the hand-made moves."""
    from torchmdx.kernels import neighbors_triton

    for tag, expect in (("below", False), ("above", True)):
        case = next(c for c in build_cases() if c["name"] == f"skin-{kind}-{tag}")
        assert bool(neighbors_triton.needs_rebuild(**case["args"])) is expect


def test_no_interpreter_leak():
    """This pytest process never sees TRITON_INTERPRET (the worker sets it in its own process)."""
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


# ---------------------------------------------------------------------------------------------
# GPU: hundreds of random cases, graph capture, no host synchronisation
# ---------------------------------------------------------------------------------------------
def random_gpu_case(rng, index):
    kinds = ["cubic", "ortho", "triclinic", "triclinic_rotated"]
    kind = kinds[index % 4]
    n = int(rng.integers(1, 300))
    pattern = [(True, True, True), (True, True, False), (False, False, False), (True, False, True)][index % 7 % 4]
    frac = float(rng.choice([0.2, 0.35, 0.49, 0.4999]))
    pos, cell, pbc, cutoff = periodic_structure(rng, n, kind, frac if any(pattern) else 0.0, pbc=pattern)
    size = float(rng.uniform(6.0, 20.0))
    pos, cell = pos * size, cell * size
    cutoff = cutoff * size if any(pattern) else float(rng.uniform(1.0, 6.0))
    lower = float(rng.choice([0.0, 0.0, 0.7]))
    return pos, cell, np.asarray(pattern), cutoff, lower


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gpu_random_cases(dtype):
    from torchmdx.kernels import neighbors_triton

    rng = np.random.default_rng(7 if dtype == torch.float64 else 8)
    for index in range(150):  # x 2 methods x 2 dtypes: 600 comparisons
        pos, cell, pbc, cutoff, lower = random_gpu_case(rng, index)
        full = bool(index % 3)
        args = dict(pos=torch.tensor(pos, dtype=dtype, device="cuda"), cutoff=cutoff,
                    cell=torch.tensor(cell, dtype=dtype, device="cuda"), pbc=torch.tensor(pbc, device="cuda"),
                    cutoff_lower=lower, full=full)
        ref = neighbors_ref.neighbor_list(args["pos"].double().cpu(), cutoff, None, args["cell"].double().cpu(),
                                          args["pbc"].cpu(), cutoff_lower=lower, full=full, method="cell")
        for method in ("brute", "cell"):
            nb = neighbors_triton.neighbor_list(**args, method=method)
            tol = 1e-9 if dtype == torch.float64 else 2e-5 * max(1.0, float(np.abs(pos).max()))
            assert_pairs_equal(nb_dict(nb), nb_dict(ref), cutoff, lower, dist_tol=1e-9 if dtype == torch.float64 else 1e-4,
                               boundary_tol=tol)
            if dtype == torch.float64:
                order = by_receiver_then_neighbor(nb.edge_index.cpu())
                assert torch.equal(nb.edge_index.cpu()[:, order], ref.edge_index), (index, method)


@pytest.mark.gpu
def test_gpu_batched_random():
    from torchmdx.kernels import neighbors_triton

    rng = np.random.default_rng(11)
    for trial in range(40):
        parts, cells, pbcs, batch = [], [], [], []
        for b in range(int(rng.integers(1, 12))):
            pos, cell, pbc, cutoff, _ = random_gpu_case(rng, int(rng.integers(0, 1000)))
            n = int(rng.integers(0, 60))
            parts.append(pos[:n])
            cells.append(cell)
            pbcs.append(pbc)
            batch += [b] * len(pos[:n])
        if not batch:
            continue
        cut = 0.45 * min([min_width(c, p) for c, p in zip(cells, pbcs) if p.any()] or [10.0])
        args = dict(pos=torch.tensor(np.concatenate(parts), device="cuda"), cutoff=cut,
                    batch=torch.tensor(batch, device="cuda"), cell=torch.tensor(np.stack(cells), device="cuda"),
                    pbc=torch.tensor(np.stack(pbcs), device="cuda"))
        ref = neighbors_ref.neighbor_list(**{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in args.items()})
        for method in ("brute", "cell"):
            nb = neighbors_triton.neighbor_list(**args, method=method)
            order = by_receiver_then_neighbor(nb.edge_index.cpu())
            assert torch.equal(nb.edge_index.cpu()[:, order], ref.edge_index), (trial, method)
            torch.testing.assert_close(nb.vectors.cpu()[order], ref.vectors, rtol=0, atol=1e-10)


@pytest.mark.gpu
def test_gpu_large_cell_list_equals_brute():
    from torchmdx.kernels import neighbors_triton

    torch.manual_seed(0)
    for n, tri in ((20000, False), (12000, True)):
        box = (n / 0.1) ** (1 / 3)
        cell = torch.eye(3, device="cuda", dtype=torch.float64) * box
        if tri:
            cell[1, 0], cell[2, 1] = 0.3 * box, -0.2 * box
        pos = torch.rand(n, 3, device="cuda", dtype=torch.float64) @ cell
        pbc = torch.ones(3, dtype=torch.bool, device="cuda")
        a = neighbors_triton.neighbor_list(pos, 5.0, None, cell, pbc, method="cell")
        b = neighbors_triton.neighbor_list(pos, 5.0, None, cell, pbc, method="brute")
        assert int(a.num_pairs) > 40 * n
        order = by_receiver_then_neighbor(a.edge_index)
        assert torch.equal(a.edge_index[:, order], b.edge_index) and torch.equal(a.shifts[order], b.shifts)
        again = neighbors_triton.neighbor_list(pos, 5.0, None, cell, pbc, method="cell")
        assert torch.equal(again.edge_index, a.edge_index)  # deterministic order


@pytest.mark.gpu
def test_gpu_open_protein_matches_reference(shared_data):
    from ase.io import read

    from torchmdx.kernels import neighbors_triton

    atoms = read(shared_data / "systems" / "chignolin.xyz")
    pos = torch.tensor(atoms.positions, device="cuda")
    ref = neighbors_ref.neighbor_list(pos.cpu(), 5.0)
    for method in ("brute", "cell"):
        nb = neighbors_triton.neighbor_list(pos, 5.0, method=method)
        order = by_receiver_then_neighbor(nb.edge_index.cpu())
        assert torch.equal(nb.edge_index.cpu()[:, order], ref.edge_index)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["brute", "cell"])
def test_gpu_capacity_mode_has_no_host_sync_and_captures(method):
    from torchmdx.kernels import neighbors_triton

    torch.manual_seed(1)
    n = 3000
    box = (n / 0.1) ** (1 / 3)
    cell = torch.eye(3, device="cuda") * box
    pbc = torch.ones(3, dtype=torch.bool, device="cuda")
    pos = torch.rand(n, 3, device="cuda") * box
    exact = neighbors_triton.neighbor_list(pos, 5.0, None, cell, pbc, method=method)
    cap = int(exact.num_pairs) + 5000
    neighbors_triton.neighbor_list(pos, 5.0, None, cell, pbc, method=method, max_pairs=cap)  # warm-up, caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        nb = neighbors_triton.neighbor_list(pos, 5.0, None, cell, pbc, method=method, max_pairs=cap)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not bool(nb.overflow) and int(nb.num_pairs) == int(exact.num_pairs)
    # capture in a CUDA graph, then replay on new positions
    static_pos = pos.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            neighbors_triton.neighbor_list(static_pos, 5.0, None, cell, pbc, method=method, max_pairs=cap)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = neighbors_triton.neighbor_list(static_pos, 5.0, None, cell, pbc, method=method, max_pairs=cap)
    new_pos = torch.rand(n, 3, device="cuda") * box
    static_pos.copy_(new_pos)
    graph.replay()
    torch.cuda.synchronize()
    want = neighbors_triton.neighbor_list(new_pos, 5.0, None, cell, pbc, method=method)
    k = int(want.num_pairs)
    assert int(out.num_pairs) == k and not bool(out.overflow)
    assert torch.equal(out.edge_index[:, :k], want.edge_index)  # same deterministic order
    assert out.mask[:k].all() and not out.mask[k:].any()
    # overflow inside the graph is reported, then grow_to_fit finds a capacity that fits
    small = neighbors_triton.neighbor_list(new_pos, 5.0, None, cell, pbc, method=method, max_pairs=k // 2)
    assert bool(small.overflow) and int(small.num_pairs) == k
    grown, size = neighbors_triton.grow_to_fit(
        lambda m: neighbors_triton.neighbor_list(new_pos, 5.0, None, cell, pbc, method=method, max_pairs=m), k // 2)
    assert size >= k and not bool(grown.overflow)


@pytest.mark.gpu
def test_gpu_needs_rebuild():
    from torchmdx.kernels import neighbors_triton

    for case in build_cases():
        if case["call"] != "needs_rebuild":
            continue
        args = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in case["args"].items()}
        assert bool(neighbors_triton.needs_rebuild(**args)) is case["name"].endswith("above")
