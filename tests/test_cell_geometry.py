"""Cell geometry on the device (torchmdx.kernels.cell_geometry) against the reference neighbor
list's own completion and widths (torchmdx.kernels.neighbors_ref), float64, CPU."""

import math

import numpy as np
import pytest
import torch

from torchmdx.kernels import cell_geometry as cg
from torchmdx.kernels.neighbors_ref import _complete_cell, perpendicular_widths


def random_cell(rng, pattern, nan_open=False):
    cell = rng.normal(size=(3, 3)) * 2.0 + np.eye(3) * 9.0
    for k, periodic in enumerate(pattern):
        if not periodic:
            cell[k] = np.nan if nan_open else (0.0 if rng.random() < 0.5 else rng.normal(size=3))
    return cell


PATTERNS = [(True, True, True), (True, True, False), (False, True, True), (True, False, True),
            (True, False, False), (False, True, False), (False, False, True), (False, False, False)]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_completed_cell_and_widths_match_the_reference(pattern):
    rng = np.random.default_rng(sum(2 ** k for k, p in enumerate(pattern) if p))
    cells = torch.tensor(np.stack([random_cell(rng, pattern, nan_open=(t == 2)) for t in range(4)]))
    pbc = torch.tensor([pattern] * 4)
    geometry = cg.cell_geometry(cells, pbc)
    completed = cg.completed_cells(torch.nan_to_num(cells), pbc)
    for b in range(4):
        per = pbc[b]
        if not per.any():
            assert torch.equal(completed[b], torch.eye(3, dtype=torch.float64))
            assert not geometry.periodic[b] and torch.isinf(geometry.widths[b]).all()
            assert torch.all(geometry.geo[b, 18:21] == 0)
            continue
        c = completed[b]
        # periodic rows kept; open rows orthonormal and orthogonal to the periodic ones
        assert torch.equal(c[per], cells[b][per])
        open_rows = c[~per]
        torch.testing.assert_close(open_rows @ open_rows.T, torch.eye(int((~per).sum()), dtype=torch.float64),
                                   rtol=0, atol=1e-12)
        assert float((open_rows @ c[per].T).abs().sum()) < 1e-9
        # C @ C^-1 = 1, and the widths of the periodic directions are the reference's
        inverse = geometry.geo[b, 9:18].reshape(3, 3)
        torch.testing.assert_close(c @ inverse, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
        ref = perpendicular_widths(_complete_cell(torch.nan_to_num(cells[b]), per))
        torch.testing.assert_close(geometry.widths[b][per], ref[per], rtol=1e-12, atol=0)
        assert torch.isinf(geometry.widths[b][~per]).all()
        # the kernels' rows: h with open rows zeroed, the image inverse with open columns zeroed
        h = geometry.geo[b, 0:9].reshape(3, 3)
        assert torch.equal(h[per], cells[b][per]) and torch.all(h[~per] == 0)
        q = geometry.geo[b, 24:33].reshape(3, 3)
        assert torch.all(q[:, ~per] == 0) and torch.equal(q[:, per], inverse[:, per])
        assert geometry.problem[b] == cg.OK and geometry.periodic[b]


def test_problems_are_data_and_first_bad_structure():
    cells = torch.tensor(np.array([np.eye(3) * 10.0,                                        # fine for cutoff 4
                          [[5.0, 0, 0], [10.0, 0, 0], [0, 0, 5.0]],                # singular plane
                          [[np.inf, 0, 0], [0, 9, 0], [0, 0, 9]],                  # non-finite
                          np.eye(3) * 7.0,                                         # narrow: 7 < 2 x 4
                          np.full((3, 3), np.nan)]))                               # open: cell ignored
    pbc = torch.tensor([[True] * 3, [True, True, False], [True] * 3, [True] * 3, [False] * 3])
    geometry = cg.cell_geometry(cells, pbc)
    assert geometry.problem.tolist() == [cg.OK, cg.SINGULAR, cg.NON_FINITE, cg.OK, cg.OK]
    assert torch.isfinite(geometry.geo).all()  # no kernel sees a NaN or an infinite width
    assert cg.narrow(geometry, 4.0).tolist() == [False, False, False, True, False]
    assert int(cg.first_bad_structure(geometry, 4.0)) == 1 * 4 + cg.SINGULAR
    only = [0, 3, 4]
    assert int(cg.first_bad_structure(cg.cell_geometry(cells[only], pbc[only]), 4.0)) == 1 * 4 + cg.NARROW
    assert int(cg.first_bad_structure(cg.cell_geometry(cells[only], pbc[only]), 3.4)) == -1
    # the exact width at the limit is accepted (as the host check does)
    assert int(cg.first_bad_structure(cg.cell_geometry(cells[[3]], pbc[[3]]), 3.5)) == -1
    assert "singular" in cg.describe_problem(1 * 4 + cg.SINGULAR, cells, pbc, 4.0)
    assert "non-finite" in cg.describe_problem(2 * 4 + cg.NON_FINITE, cells, pbc, 4.0)
    line = cg.describe_problem(1 * 4 + cg.NARROW, cells[only], pbc[only], 4.0)
    assert line.startswith("structure 1: cutoff 4 Å is larger than half") and "a 7" in line and "\n" not in line


def test_float32_rows_and_broadcasting():
    cell = torch.tensor([[8.0, 0.0, 0.0], [2.0, 9.0, 0.0], [1.0, 1.5, 10.0]])
    pbc = torch.tensor([[True, True, True], [True, True, False]])
    geometry = cg.cell_geometry(cell, pbc, torch.float32)
    assert geometry.geo.shape == (2, cg.GEO_WIDTH) and geometry.geo.dtype == torch.float32
    # a triclinic cell's inverse by the adjugate equals LU's
    torch.testing.assert_close(geometry.geo[0, 9:18].double().reshape(3, 3), torch.linalg.inv(cell.double()),
                               rtol=1e-6, atol=1e-7)
    assert math.isclose(float(geometry.widths[0, 2]), 10.0, rel_tol=1e-12)
