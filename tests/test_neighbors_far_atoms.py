"""Neighbor lists and close-contact checks of structures whose atoms are far apart: the torch cell list
renumbers occupied bins per axis (``neighbors_ref._close_bin_gaps``), so one atom 1e14 Å away no longer
overflows the bin key (a ValueError from ``predict``), and ``close_contacts`` uses the project's list instead of
ASE's (7 s for DHFR). References: brute force over all pairs in float64, and ASE's own neighbor list."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms

from torchmdx.kernels.neighbors import neighbor_list


def _brute_pairs(pos: np.ndarray, cutoff: float) -> set:
    d = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
    i, j = np.nonzero((d < cutoff) & ~np.eye(len(pos), dtype=bool))
    return set(zip(i.tolist(), j.tolist()))


@pytest.mark.parametrize("far", [1e6, 1e14])
def test_cell_list_of_clusters_far_apart_equals_brute_force(far):
    rng = np.random.default_rng(0)
    # three clusters: two 10^6 / 10^14 Å apart on every axis, one 2.5 bins beside the first (gaps of 1 and 2 bins)
    a = rng.uniform(0, 6, size=(40, 3))
    b = a[:25] + far
    c = rng.uniform(0, 4, size=(15, 3)) + np.array([6 + 2.5 * 2.0, 0.0, 0.0])
    pos = np.concatenate([a, b, c])
    nl = neighbor_list(torch.tensor(pos), 2.0, backend="torch", method="cell")
    got = set(zip(*nl.edge_index.tolist()))
    assert got == _brute_pairs(pos, 2.0)
    assert torch.allclose(nl.distances, torch.tensor(np.linalg.norm(pos[nl.edge_index[1]] - pos[nl.edge_index[0]], axis=1)))


def test_predict_with_one_atom_far_away_equals_that_atom_alone_plus_the_rest():
    import torchmdx

    model = torchmdx.build_model({"embedding_dimension": 16, "num_layers": 1, "cutoff_upper": 5.0, "seed": 0})
    rng = np.random.default_rng(1)
    pos = np.concatenate([rng.uniform(0, 8, size=(300, 3)), [[1e14, 1e14, 1e14]]])
    z = np.concatenate([rng.choice([1, 6, 8], size=300), [6]])
    both = model.predict(Atoms(numbers=z, positions=pos))["energy"]
    rest = model.predict(Atoms(numbers=z[:300], positions=pos[:300]))["energy"]
    alone = model.predict(Atoms(numbers=z[300:], positions=[[0.0, 0.0, 0.0]]))["energy"]
    assert np.isclose(both, rest + alone, rtol=1e-6, atol=1e-6)


def _ase_reference(atoms, factor=0.5):
    """The closest pair by d / limit and the count of close pairs, from ASE's neighbor list (every image)."""
    from ase.data import covalent_radii
    from ase.neighborlist import neighbor_list as ase_neighbor_list

    radii = covalent_radii[atoms.numbers]
    i, j, d = ase_neighbor_list("ijd", atoms, float(2 * factor * radii.max()), self_interaction=False)
    keep = i < j
    i, j, d = i[keep], j[keep], d[keep]
    limit = factor * (radii[i] + radii[j])
    close = d < limit
    k = np.argmin(np.where(close, d / limit, np.inf))
    return (int(i[k]), int(j[k])), float(d[k]), int(close.sum())


@pytest.mark.parametrize("periodic", [False, True])
def test_close_contacts_agree_with_ase_neighbor_list(periodic):
    from torchmdx.md.start_checks import close_contacts

    rng = np.random.default_rng(2)
    n = 400
    pos = rng.uniform(0, 18, size=(n, 3))
    atoms = Atoms(numbers=rng.choice([1, 6, 8], size=n), positions=pos, cell=[18, 18, 18] if periodic else None,
                  pbc=periodic)
    (a, c), d, count = _ase_reference(atoms)
    assert count > 1  # random positions this dense hold several close pairs
    [line] = close_contacts([atoms])
    assert line.startswith(f"atoms {a} and {c} of structure 0 ") and f" are {d:.3g} Å apart" in line
    assert f", and {count - 1} more pair(s)" in line


def test_close_contacts_small_periodic_cell_falls_back_to_every_image():
    """A cell narrower than twice the check's cutoff: the project's list refuses it (minimum image would miss
    pairs), so ASE's list (every image) gives the pairs."""
    from torchmdx.md.start_checks import close_contacts

    atoms = Atoms("HH", positions=[[0, 0, 0], [0.2, 0, 0]], cell=[0.5, 3.0, 3.0], pbc=True)
    (a, c), d, count = _ase_reference(atoms)
    [line] = close_contacts([atoms])
    assert line.startswith(f"atoms {a} and {c} of structure 0 ") and f" are {d:.3g} Å apart" in line


def test_close_contacts_equal_ratios_name_the_first_pair():
    from torchmdx.md.start_checks import close_contacts

    atoms = Atoms("CCCC", positions=[[0, 0, 0], [0.3, 0, 0], [10, 0, 0], [10.3, 0, 0]])
    [line] = close_contacts([atoms])
    assert line.startswith("atoms 0 and 1 of structure 0 (C-C) are 0.3 Å apart") and "and 1 more pair(s)" in line
