"""Reference neighbor list vs an independent O(N^2 x images) enumeration (numpy) and ASE.

The reference below never wraps atoms: for every pair it centres an image window on the
nearest lattice translation (least squares in the periodic rows) and tries every image in a
window much wider than needed, so it finds all pairs regardless of how many images away atoms
sit. Lists are compared as sets of (structure, i, j, n) with distances, and for order.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from torchmdx.errors import NeighborListError
from torchmdx.kernels import neighbors_ref
from torchmdx.kernels.neighbors import neighbor_list




# ---------------------------------------------------------------------------------------------
# independent reference
# ---------------------------------------------------------------------------------------------
def brute_reference(pos, cutoff, cell=None, pbc=None, cutoff_lower=0.0, window=3):
    """Dict {(i, j, n0, n1, n2): distance} for one structure, full list, by enumeration."""
    pos = np.asarray(pos, dtype=np.float64)
    n = len(pos)
    periodic = np.zeros(3, bool) if pbc is None else np.asarray(pbc, bool)
    result = {}
    if n == 0:
        return result
    delta = pos[None, :, :] - pos[:, None, :]  # [i, j, 3] = pos_j - pos_i
    if periodic.any():
        cell = np.asarray(cell, dtype=np.float64)
        rows = cell[periodic]  # [p, 3]
        # centre: coefficients c with delta ~ -c @ rows (least squares)
        coef, *_ = np.linalg.lstsq(rows.T, delta.reshape(-1, 3).T, rcond=None)
        centre = -np.round(coef.T).reshape(n, n, -1)
        ranges = [np.arange(-window, window + 1)] * int(periodic.sum())
        window_grid = np.stack(np.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, int(periodic.sum()))
    else:
        rows = np.zeros((0, 3))
        centre = np.zeros((n, n, 0))
        window_grid = np.zeros((1, 0))
    for w in window_grid:
        img = centre + w  # [n, n, p]
        vec = delta + img @ rows
        dist = np.sqrt((vec**2).sum(-1))
        ii, jj = np.nonzero((dist < cutoff) & (dist >= cutoff_lower))
        for a, b in zip(ii, jj):
            full_n = np.zeros(3)
            full_n[periodic] = img[a, b]
            if a == b and not full_n.any():
                continue
            key = (int(a), int(b), *(int(round(x)) for x in full_n))
            result[key] = float(dist[a, b])
    return result


def as_dict(nb, offset=0, batch=None, structure=None):
    """Neighbors -> {(i, j, n...): distance} (valid rows only), optionally one structure."""
    ei = nb.edge_index
    valid = torch.ones(ei.shape[1], dtype=torch.bool) if nb.mask is None else nb.mask
    out = {}
    for col in valid.nonzero().flatten().tolist():
        i, j = int(ei[0, col]), int(ei[1, col])
        if structure is not None and int(batch[i]) != structure:
            continue
        key = (i - offset, j - offset, *(int(round(float(x))) for x in nb.shifts[col]))
        out[key] = float(nb.distances[col])
    return out


def assert_same(got, want, tol=1e-9):
    missing = set(want) - set(got)
    extra = set(got) - set(want)
    assert not missing and not extra, f"missing {sorted(missing)[:5]} extra {sorted(extra)[:5]}"
    for key, d in want.items():
        assert abs(got[key] - d) <= tol * max(1.0, d), key


def check_conventions(nb, pos, cell, batch=None):
    """Sorted by (i, j, shift); vectors = pos[j] - pos[i] + n @ cell; distances = |vectors|."""
    ei = nb.edge_index
    i, j = ei[0], ei[1]
    if i.numel() > 1:
        key = [tuple([int(a), int(b)] + [float(x) for x in s]) for a, b, s in zip(i, j, nb.shifts)]
        assert key == sorted(key)
    vec = pos[j] - pos[i]
    if cell is not None:
        c = cell if cell.dim() == 3 else cell.unsqueeze(0)
        bi = batch[i] if batch is not None else torch.zeros_like(i)
        vec = vec + torch.einsum("ek,ekl->el", nb.shifts, c[bi] if c.shape[0] > 1 else c.expand(len(i), 3, 3))
    torch.testing.assert_close(nb.vectors, vec, rtol=0, atol=1e-10)
    torch.testing.assert_close(nb.distances, nb.vectors.norm(dim=-1), rtol=0, atol=1e-12)
    if batch is not None and i.numel():
        assert bool((batch[i] == batch[j]).all())


def random_cell(rng, triclinic):
    lengths = rng.uniform(6.0, 14.0, 3)
    cell = np.diag(lengths)
    if triclinic:
        cell[1, 0] = rng.uniform(-0.45, 0.45) * lengths[0]
        cell[2, 0] = rng.uniform(-0.45, 0.45) * lengths[0]
        cell[2, 1] = rng.uniform(-0.45, 0.45) * lengths[1]
        # random rotation, so the cell is not lower-triangular
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        cell = cell @ q.T
    return cell


def widths_np(cell):
    a, b, c = cell
    v = abs(np.linalg.det(cell))
    return np.array([v / np.linalg.norm(np.cross(b, c)), v / np.linalg.norm(np.cross(c, a)), v / np.linalg.norm(np.cross(a, b))])


def random_structure(rng, kind):
    """(pos, cell, pbc, cutoff) for kind in open / ortho / triclinic / slab."""
    n = int(rng.integers(1, 36))
    if kind == "open":
        pos = rng.uniform(-4, 4, (n, 3)) * rng.uniform(0.3, 2.0)
        return pos, None, None, float(rng.uniform(1.0, 6.0))
    cell = random_cell(rng, triclinic=(kind != "ortho"))
    if kind == "slab":
        pbc = rng.random(3) < 0.5
        if not pbc.any():
            pbc[int(rng.integers(0, 3))] = True
    else:
        pbc = np.ones(3, bool)
    # fractional coordinates far outside the box: atoms sit in many images
    frac = rng.uniform(-3.0, 4.0, (n, 3)) if rng.random() < 0.5 else rng.uniform(0.0, 1.0, (n, 3))
    pos = frac @ cell
    # cutoff up to (and often very near) half the smallest periodic perpendicular width
    half = 0.5 * widths_np(cell)[pbc].min()
    cutoff = float(half * (rng.choice([0.999999, 0.99, 0.9]) if rng.random() < 0.4 else rng.uniform(0.2, 1.0)))
    return pos, cell, pbc, cutoff


KINDS = ["open", "ortho", "triclinic", "slab"]


@pytest.mark.parametrize("kind", KINDS)
def test_single_structures_match_brute_force(kind):
    rng = np.random.default_rng(1234 + KINDS.index(kind))
    for case in range(60):
        pos, cell, pbc, cutoff = random_structure(rng, kind)
        cutoff_lower = float(rng.uniform(0, 0.5 * cutoff)) if case % 4 == 0 else 0.0
        want = brute_reference(pos, cutoff, cell, pbc, cutoff_lower)
        pos_t = torch.tensor(pos)
        cell_t = None if cell is None else torch.tensor(cell)
        pbc_t = None if pbc is None else torch.tensor(pbc)
        for method in ("brute", "cell"):
            nb = neighbors_ref.neighbor_list(pos_t, cutoff, None, cell_t, pbc_t, cutoff_lower=cutoff_lower, method=method)
            assert_same(as_dict(nb), want)
            check_conventions(nb, pos_t, cell_t)
            assert int(nb.num_pairs) == len(want) and not bool(nb.overflow) and nb.mask is None


def test_batched_mixed_structures_unsorted_batch():
    rng = np.random.default_rng(7)
    for case in range(25):
        nstruct = int(rng.integers(2, 6))
        structs = [random_structure(rng, KINDS[int(rng.integers(0, 4))]) for _ in range(nstruct)]
        cutoff = min(s[3] for s in structs)
        positions, batch, cells, pbcs = [], [], [], []
        for b, (pos, cell, pbc, _) in enumerate(structs):
            positions.append(pos)
            batch += [b] * len(pos)
            cells.append(np.eye(3) * 10 if cell is None else cell)
            pbcs.append(np.zeros(3, bool) if pbc is None else pbc)
        pos = np.concatenate(positions)
        batch = np.array(batch)
        # shuffle atoms so that structures are interleaved
        perm = rng.permutation(len(pos))
        inv = np.argsort(perm)
        pos_t = torch.tensor(pos[perm])
        batch_t = torch.tensor(batch[perm])
        cell_t = torch.tensor(np.stack(cells))
        pbc_t = torch.tensor(np.stack(pbcs))
        for method in ("brute", "cell"):
            nb = neighbors_ref.neighbor_list(pos_t, cutoff, batch_t, cell_t, pbc_t, method=method)
            check_conventions(nb, pos_t, cell_t, batch_t)
            total = 0
            start = 0
            for b, (p, cell, pbc, _) in enumerate(structs):
                want = brute_reference(p, cutoff, None if cell is None else cell, pbc)
                # map reference (local) indices to shuffled global indices
                want_global = {
                    (int(inv[start + k[0]]), int(inv[start + k[1]]), *k[2:]): d for k, d in want.items()
                }
                got = as_dict(nb, batch=batch_t, structure=b)
                assert_same(got, want_global)
                total += len(want)
                start += len(p)
            assert nb.edge_index.shape[1] == total


def test_half_list_is_half_of_full_list():
    rng = np.random.default_rng(99)
    for case in range(40):
        pos, cell, pbc, cutoff = random_structure(rng, KINDS[case % 4])
        args = (torch.tensor(pos), cutoff, None, None if cell is None else torch.tensor(cell), None if pbc is None else torch.tensor(pbc))
        full = as_dict(neighbors_ref.neighbor_list(*args, full=True))
        half = as_dict(neighbors_ref.neighbor_list(*args, full=False))
        assert all(k[0] <= k[1] for k in half)
        mirrored = {(k[1], k[0], -k[2], -k[3], -k[4]): d for k, d in half.items()}
        assert len(half) * 2 == len(full)
        assert set(half) | set(mirrored) == set(full)
        assert not set(half) & set(mirrored)


def test_multiple_images_and_periodic_self_images():
    """With the minimum-image check lifted, every image within the cutoff is listed."""
    rng = np.random.default_rng(5)
    seen_self = False
    for case in range(30):
        cell = random_cell(rng, triclinic=case % 2 == 1) * 0.35  # widths ~2-5 Å
        n = int(rng.integers(1, 6))
        pos = rng.uniform(-2, 3, (n, 3)) @ cell
        pbc = np.ones(3, bool) if case % 3 else np.array([True, False, True])
        cutoff = float(widths_np(cell)[pbc].min() * rng.uniform(0.6, 1.6))
        window = int(math.ceil(2 * cutoff / widths_np(cell)[pbc].min())) + 2
        want = brute_reference(pos, cutoff, cell, pbc, window=window)
        for method in ("brute", "cell"):
            nb = neighbors_ref.neighbor_list(
                torch.tensor(pos), cutoff, None, torch.tensor(cell), torch.tensor(pbc), method=method, allow_multiple_images=True
            )
            assert_same(as_dict(nb), want)
        seen_self |= any(k[0] == k[1] for k in want)
    assert seen_self


def test_agrees_with_ase_neighbor_list():
    from ase.neighborlist import primitive_neighbor_list

    rng = np.random.default_rng(11)
    for case in range(30):
        pos, cell, pbc, cutoff = random_structure(rng, KINDS[1 + case % 3])
        i, j, d, S = primitive_neighbor_list("ijdS", pbc, cell, pos, cutoff, self_interaction=False)
        want = {(int(a), int(b), *map(int, s)): float(x) for a, b, x, s in zip(i, j, d, S)}
        got = as_dict(neighbors_ref.neighbor_list(torch.tensor(pos), cutoff, None, torch.tensor(cell), torch.tensor(pbc)))
        assert_same(got, want, tol=1e-8)


def test_large_periodic_system_cell_list(shared_data):
    """2269-atom solvated peptide in its orthorhombic box: cell list == ASE, and == brute force."""
    import ase.io
    from ase.neighborlist import primitive_neighbor_list

    atoms = ase.io.read(shared_data / "systems" / "alanine_dipeptide_solvated.xyz")
    cutoff = 5.0
    pos = atoms.get_positions()
    pos[::7] += atoms.cell.array[0] * 2 - atoms.cell.array[2]  # some atoms several images away
    i, j, d, S = primitive_neighbor_list("ijdS", atoms.pbc, atoms.cell.array, pos, cutoff, self_interaction=False)
    want = {(int(a), int(b), *map(int, s)): float(x) for a, b, x, s in zip(i, j, d, S)}
    args = (torch.tensor(pos), cutoff, None, torch.tensor(atoms.cell.array), torch.tensor(atoms.pbc))
    cell_nb = neighbors_ref.neighbor_list(*args, method="cell")
    assert_same(as_dict(cell_nb), want, tol=1e-8)
    check_conventions(cell_nb, args[0], args[3])
    # auto picks the cell list for this size
    auto_nb = neighbors_ref.neighbor_list(*args)
    assert torch.equal(auto_nb.edge_index, cell_nb.edge_index)
    # brute force on a 400-atom subset gives bitwise the same list as the cell list
    sub = (args[0][:400],) + args[1:]
    a = neighbors_ref.neighbor_list(*sub, method="brute")
    b = neighbors_ref.neighbor_list(*sub, method="cell")
    assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.shifts, b.shifts)
    assert torch.equal(a.vectors, b.vectors)


def test_open_protein_cell_list_matches_brute(shared_data):
    import ase.io

    atoms = ase.io.read(shared_data / "systems" / "chignolin.xyz")
    pos = torch.tensor(atoms.get_positions())
    a = neighbors_ref.neighbor_list(pos, 4.5, method="brute")
    b = neighbors_ref.neighbor_list(pos, 4.5, method="cell")
    assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.vectors, b.vectors)
    assert_same(as_dict(a), brute_reference(pos.numpy(), 4.5))


def test_fixed_capacity_padding_and_overflow():
    rng = np.random.default_rng(3)
    pos, cell, pbc, cutoff = random_structure(rng, "triclinic")
    while len(pos) < 10:
        pos, cell, pbc, cutoff = random_structure(rng, "triclinic")
    args = (torch.tensor(pos), cutoff, None, torch.tensor(cell), torch.tensor(pbc))
    ref = neighbors_ref.neighbor_list(*args)
    num = ref.edge_index.shape[1]
    assert num > 4
    n = len(pos)
    # enough room: valid rows first, then padding rows i = j = N-1
    nb = neighbors_ref.neighbor_list(*args, max_pairs=num + 7)
    assert nb.edge_index.shape == (2, num + 7) and not bool(nb.overflow) and int(nb.num_pairs) == num
    assert nb.mask.tolist() == [True] * num + [False] * 7
    assert torch.equal(nb.edge_index[:, :num], ref.edge_index)
    assert (nb.edge_index[:, num:] == n - 1).all()
    assert (nb.shifts[num:] == 0).all() and (nb.vectors[num:] == 0).all() and (nb.distances[num:] == 0).all()
    assert bool((nb.edge_index[0, 1:] >= nb.edge_index[0, :-1]).all())  # still sorted by i
    # too small: overflow flag, num_pairs says how many were needed, rows are the first ones
    nb = neighbors_ref.neighbor_list(*args, max_pairs=num - 3)
    assert bool(nb.overflow) and int(nb.num_pairs) == num and nb.mask.all()
    assert torch.equal(nb.edge_index, ref.edge_index[:, : num - 3])
    # via the dispatcher
    nb = neighbor_list(*args, max_pairs=num, backend="torch")
    assert not bool(nb.overflow) and nb.mask.all()


def test_cutoff_near_half_box():
    cell = torch.diag(torch.tensor([10.0, 12.0, 14.0], dtype=torch.float64))
    pos = torch.tensor([[0.0, 0.0, 0.0], [4.9999, 0.0, 0.0], [0.0, 0.0, 0.1]], dtype=torch.float64)
    nb = neighbors_ref.neighbor_list(pos, 5.0, None, cell, torch.tensor([True, True, True]))
    assert any(abs(float(d) - 4.9999) < 1e-9 for d in nb.distances)
    with pytest.raises(NeighborListError) as err:
        neighbors_ref.neighbor_list(pos, 5.0001, None, cell, torch.tensor([True, True, True]))
    msg = str(err.value)
    assert "structure 0" in msg and "10" in msg and "\n" not in msg
    # a non-periodic direction does not limit the cutoff
    neighbors_ref.neighbor_list(pos, 5.5, None, cell, torch.tensor([False, True, True]))
    # batched: the error names the offending structure
    cells = torch.stack([cell * 2, cell])
    with pytest.raises(NeighborListError, match="structure 1"):
        neighbors_ref.neighbor_list(
            torch.cat([pos, pos]), 5.5, torch.tensor([0, 0, 0, 1, 1, 1]), cells, torch.ones(2, 3, dtype=torch.bool)
        )


def test_triclinic_width_check_uses_perpendicular_width():
    # a strongly sheared cell: |a| = |b| = 10 but the perpendicular width along b is 10 * cos(60°)
    cell = torch.tensor([[10.0, 0, 0], [10 * 0.5, 10 * math.sqrt(3) / 2, 0], [0, 0, 20.0]], dtype=torch.float64)
    width_b = float(neighbors_ref.perpendicular_widths(cell)[1])
    assert width_b == pytest.approx(10 * math.sqrt(3) / 2)
    pos = torch.zeros(2, 3, dtype=torch.float64)
    pos[1, 0] = 1.0
    neighbors_ref.neighbor_list(pos, 0.49 * width_b, None, cell, torch.ones(3, dtype=torch.bool))
    with pytest.raises(NeighborListError, match="widths"):
        neighbors_ref.neighbor_list(pos, 0.51 * width_b, None, cell, torch.ones(3, dtype=torch.bool))


def test_input_errors_are_one_line():
    pos = torch.zeros(3, 3, dtype=torch.float64)
    pos[1, 0] = 1.0
    pos[2, 1] = float("nan")
    with pytest.raises(NeighborListError, match="atom 2"):
        neighbors_ref.neighbor_list(pos, 3.0)
    pos[2, 1] = 2.0
    with pytest.raises(NeighborListError, match="without a cell"):
        neighbors_ref.neighbor_list(pos, 3.0, pbc=torch.tensor([True, True, True]))
    with pytest.raises(NeighborListError, match="singular"):
        neighbors_ref.neighbor_list(pos, 1.0, cell=torch.zeros(3, 3, dtype=torch.float64), pbc=torch.tensor([True, True, True]))
    with pytest.raises(NeighborListError, match="cutoff"):
        neighbors_ref.neighbor_list(pos, -1.0)
    with pytest.raises(NeighborListError, match="method"):
        neighbors_ref.neighbor_list(pos, 1.0, method="fast")


def test_degenerate_rows_in_non_periodic_directions():
    """ASE molecules/slabs often carry a zero cell row where pbc is False."""
    rng = np.random.default_rng(21)
    pos = rng.uniform(0, 8, (20, 3))
    cell = np.diag([9.0, 0.0, 0.0])
    pbc = np.array([True, False, False])
    want = brute_reference(pos, 4.0, np.diag([9.0, 1.0, 1.0]), pbc)
    got = as_dict(neighbors_ref.neighbor_list(torch.tensor(pos), 4.0, None, torch.tensor(cell), torch.tensor(pbc)))
    assert_same(got, want)


def test_empty_and_single_atom():
    for n in (0, 1):
        nb = neighbors_ref.neighbor_list(torch.zeros(n, 3, dtype=torch.float64), 5.0)
        assert nb.edge_index.shape == (2, 0) and int(nb.num_pairs) == 0
    nb = neighbors_ref.neighbor_list(torch.zeros(1, 3), 5.0, max_pairs=4)
    assert nb.edge_index.shape == (2, 4) and not nb.mask.any() and (nb.edge_index == 0).all()


def test_range_is_half_open():
    """cutoff_lower <= r < cutoff, exactly (a pair at r == cutoff is out, r == cutoff_lower in)."""
    pos = torch.tensor([[0.0, 0, 0], [3.0, 0, 0], [0, 1.5, 0]], dtype=torch.float64)
    for method in ("brute", "cell"):
        nb = neighbors_ref.neighbor_list(pos, 3.0, cutoff_lower=1.5, method=method)
        pairs = {tuple(p) for p in nb.edge_index.t().tolist()}
        assert pairs == {(0, 2), (2, 0)}
