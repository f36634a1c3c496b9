"""Host reads of ``Potential.forward`` (torchmdx/nn/base.py): none when the caller gives
``num_structures`` (and, on a GPU, ``cell`` and ``pbc`` as device tensors); otherwise the same
results as before (the cell of an input without a periodic direction is dropped when ``pbc`` is
a Python value or a CPU tensor, stress and pbc-without-cell errors unchanged).

A Lennard-Jones potential with one parameter set is used: it has no element check, so every
host read seen here is the base class's. The neighbor list is built beforehand (the torch
reference list reads from its inputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from torchmdx.errors import ModelError
from torchmdx.kernels.neighbors_ref import neighbor_list
from torchmdx.nn.analytic import LennardJones

HOST_READS = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist"}


class HostReads(TorchFunctionMode):
    """Records the tensor methods that copy a value to the host (a device synchronisation on a GPU)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def two_structures(device="cpu"):
    """A periodic argon-like box (structure 0, 8 atoms) and an open trimer (structure 1)."""
    rng = np.random.default_rng(3)
    grid = np.array([[i, j, k] for i in range(2) for j in range(2) for k in range(2)], dtype=float) * 2.9
    box = grid + rng.normal(scale=0.1, size=grid.shape)
    trimer = np.array([[0.0, 0.0, 0.0], [1.2, 0.1, 0.0], [0.3, 1.1, 0.2]])
    pos = torch.tensor(np.concatenate([box, trimer]), dtype=torch.float64, device=device)
    z = torch.full((11,), 18, dtype=torch.long, device=device)
    batch = torch.tensor([0] * 8 + [1] * 3, device=device)
    cell = torch.zeros(2, 3, 3, dtype=torch.float64, device=device)
    cell[0] = torch.eye(3, dtype=torch.float64) * 5.8
    pbc = torch.tensor([[True, True, True], [False, False, False]], device=device)
    return z, pos, batch, cell, pbc


def lj():
    return LennardJones(epsilon=0.0104, sigma=1.0, cutoff=2.5, shift="force")


@pytest.fixture(autouse=True)
def without_the_overlap_check(monkeypatch):
    """The analytic potentials refuse overlapping atoms since round 24 (one host read, as the networks'
    own checks): a check of the potential, not of the base class, which is what these tests watch."""
    import torchmdx.nn.analytic as analytic

    monkeypatch.setattr(analytic, "_checked", lambda potential, graph: None)


def test_num_structures_given_means_no_host_read():
    potential = lj()
    z, pos, batch, _, _ = two_structures()
    pos = pos[8:]  # the open trimer and, as structure 0, nothing periodic
    z, batch = z[8:], torch.zeros(3, dtype=torch.long)
    nl = neighbor_list(pos, potential.cutoff, batch)
    with HostReads() as reads:
        given = potential(z, pos, batch, neighbors=nl, num_structures=1)
    assert reads.seen == []
    with HostReads() as reads:
        derived = potential(z, pos, batch, neighbors=nl)
    assert reads.seen == ["item"]  # B = batch.max() + 1, read back (what the keyword avoids)
    assert torch.equal(given["energy"], derived["energy"]) and torch.equal(given["forces"], derived["forces"])
    # forces are still -dE/dpos: central differences of the energy
    h = 1e-6
    for atom, axis in [(0, 0), (2, 1)]:
        shifted = []
        for sign in (1, -1):
            p = pos.clone()
            p[atom, axis] += sign * h
            shifted.append(float(potential(z, p, batch, forces=False, num_structures=1)["energy"][0]))
        assert float(given["forces"][atom, axis]) == pytest.approx(-(shifted[0] - shifted[1]) / (2 * h), rel=1e-6)
    # no batch vector: one structure, also without a read
    with HostReads() as reads:
        single = potential(z, pos, neighbors=nl)
    assert reads.seen == [] and torch.equal(single["energy"], given["energy"])


def test_num_structures_counts_structures_without_atoms():
    potential = lj()
    z, pos, batch, cell, pbc = two_structures()
    reference = potential(z, pos, batch, cell, pbc)
    padded = potential(z, pos, batch, cell, pbc, num_structures=3)
    assert padded["energy"].shape == (3,) and float(padded["energy"][2].detach()) == 0.0
    assert torch.equal(padded["energy"][:2], reference["energy"]) and torch.equal(padded["forces"], reference["forces"])


@pytest.mark.parametrize("as_type", ["list", "numpy", "cpu_tensor"])
def test_host_pbc_all_false_still_drops_the_cell(as_type):
    """pbc as a Python value or a CPU tensor: checked without a device read; all False means a
    cluster, exactly as before (the cell is ignored, stress is refused)."""
    potential = lj()
    z, pos, batch, _, _ = two_structures()
    z, pos, batch = z[8:], pos[8:], torch.zeros(3, dtype=torch.long)
    flags = [False, False, False]
    pbc = {"list": flags, "numpy": np.array(flags), "cpu_tensor": torch.tensor(flags)}[as_type]
    cell = torch.eye(3, dtype=torch.float64) * 1.5  # far too small for a 2.5 Å cutoff if it were used
    cluster = potential(z, pos, batch)
    out = potential(z, pos, batch, cell, pbc)
    assert torch.equal(out["energy"], cluster["energy"]) and torch.equal(out["forces"], cluster["forces"])
    with pytest.raises(ModelError, match="stress needs a periodic cell"):
        potential(z, pos, batch, cell, pbc, stress=True)
    assert torch.equal(potential(z, pos, batch, None, pbc)["energy"], cluster["energy"])  # pbc without a cell
    with pytest.raises(ModelError, match="periodic boundary conditions were given without a cell"):
        potential(z, pos, batch, None, [True, False, False])


def test_periodic_batch_with_explicit_cell_matches_separate_structures():
    """A batch of a periodic and an open structure (cell and pbc given, num_structures given)
    equals the two structures computed alone (the open one without any cell)."""
    potential = lj()
    z, pos, batch, cell, pbc = two_structures()
    out = potential(z, pos, batch, cell, pbc, num_structures=2, stress=True)
    box = potential(z[:8], pos[:8], None, cell[0], pbc[0], stress=True)
    trimer = potential(z[8:], pos[8:])
    torch.testing.assert_close(out["energy"], torch.cat([box["energy"], trimer["energy"]]), rtol=1e-12, atol=0)
    torch.testing.assert_close(out["forces"], torch.cat([box["forces"], trimer["forces"]]), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out["stress"][0], box["stress"][0], rtol=1e-12, atol=1e-15)


@pytest.mark.gpu
def test_no_device_synchronisation_on_cuda():
    """Under torch.cuda.set_sync_debug_mode('error') any device->host read raises; with
    num_structures, cell and pbc given as device tensors, forward (energy and forces, a mixed
    periodic/open batch and an all-open batch with zero cells as a training batch has) runs
    without one and matches the CPU float64 result."""
    potential = lj()
    cpu = two_structures()
    reference = potential(*cpu)
    z, pos, batch, cell, pbc = two_structures("cuda")
    nl = neighbor_list(pos, potential.cutoff, batch, cell, pbc)
    open_cell = torch.zeros(2, 3, 3, dtype=torch.float64, device="cuda")
    open_pbc = torch.zeros(2, 3, dtype=torch.bool, device="cuda")
    open_nl = neighbor_list(pos, potential.cutoff, batch)
    open_reference = potential(cpu[0], cpu[1], cpu[2])
    model = potential.to("cuda")
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model(z, pos, batch, cell, pbc, neighbors=nl, num_structures=2)
        open_out = model(z, pos, batch, open_cell, open_pbc, neighbors=open_nl, num_structures=2)
        with pytest.raises(RuntimeError):  # the read the keyword avoids is caught by the debug mode
            model(z, pos, batch, cell, pbc, neighbors=nl)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.testing.assert_close(out["energy"].cpu(), reference["energy"], rtol=1e-12, atol=0)
    torch.testing.assert_close(out["forces"].cpu(), reference["forces"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(open_out["energy"].cpu(), open_reference["energy"], rtol=1e-12, atol=0)
    torch.testing.assert_close(open_out["forces"].cpu(), open_reference["forces"], rtol=1e-12, atol=1e-14)


@pytest.mark.gpu
def test_et_batch_with_device_zero_cells_matches_no_cell_on_cuda():
    """A training batch of molecules carries zero cells and all-False pbc on the GPU: passed on as
    given (no read), the ET model's energies and forces equal those without a cell."""
    from torchmdx.nn import ETPotential

    model = ETPotential({"embedding_dimension": 16, "num_layers": 2, "num_heads": 2, "num_rbf": 8,
                         "dtype": "float64", "seed": 0}).cuda()
    rng = np.random.default_rng(5)
    pos = torch.tensor(np.concatenate([rng.uniform(0, 3, (6, 3)), rng.uniform(0, 3, (4, 3))]), device="cuda")
    z = torch.tensor(rng.choice([1, 6, 8], 10), device="cuda")
    batch = torch.tensor([0] * 6 + [1] * 4, device="cuda")
    cell = torch.zeros(2, 3, 3, dtype=torch.float64, device="cuda")
    pbc = torch.zeros(2, 3, dtype=torch.bool, device="cuda")
    given = model(z, pos, batch, cell, pbc, num_structures=2)
    plain = model(z, pos, batch)
    torch.testing.assert_close(given["energy"], plain["energy"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(given["forces"], plain["forces"], rtol=1e-10, atol=1e-10)
