"""The plain transformer (model.architecture: transformer) and rotation augmentation
(train.augment), float64 on the CPU:

- the transformer is measurably not rotation-invariant (nor reflection-invariant), but it is
  translation- and permutation-invariant, and its forces are the energy's gradient;
- random_orthogonal draws orthogonal matrices with the Haar measure's moments (E[tr R] = 0,
  E[tr² R] = 1 on SO(3)), and both signs of the determinant with reflections;
- augmentation rotates positions, forces, cells and stresses consistently: a Lennard-Jones
  potential evaluated on the rotated structures gives exactly the rotated forces and stresses;
- a packed batch's structures each get their own rotation, its padding atoms stay at the origin;
- a Lightning run rotates every training batch, through the eager and the packed step.
"""

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from torch_geometric.data import Batch, Data

import torchmdx
from torchmdx.errors import ConfigError, ModelError
from torchmdx.nn.analytic import LennardJones
from torchmdx.train.augment import augment_batch, random_orthogonal, transform_structures

F64 = torch.float64
TINY = {"architecture": "transformer", "embedding_dimension": 16, "num_layers": 2, "num_heads": 2, "num_rbf": 8,
        "bias_hidden": 16, "cutoff_upper": 4.0, "dtype": "float64", "seed": 0}


def ethanol(seed=0):
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=seed)
    return torch.tensor(atoms.numbers), torch.tensor(atoms.positions, dtype=F64)


def test_transformer_is_not_rotation_invariant_but_translation_and_permutation_invariant():
    model = torchmdx.build_model(TINY).eval()
    z, pos = ethanol()
    out = model(z, pos)
    energy, forces = out["energy"].item(), out["forces"].detach()
    rot = random_orthogonal(1, generator=torch.Generator().manual_seed(1))[0]
    rotated = model(z, pos @ rot.T)
    assert abs(rotated["energy"].item() - energy) > 1e-3  # measurably not invariant
    assert (rotated["forces"] - forces @ rot.T).abs().max() > 1e-3  # nor are the forces equivariant
    assert abs(model(z, -pos)["energy"].item() - energy) > 1e-3  # nor inversion-invariant
    shifted = model(z, pos + torch.tensor([2.0, -3.0, 0.5], dtype=F64))
    assert shifted["energy"].item() == pytest.approx(energy, abs=1e-10)
    perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(3))
    permuted = model(z[perm], pos[perm])
    assert permuted["energy"].item() == pytest.approx(energy, abs=1e-10)
    torch.testing.assert_close(permuted["forces"], forces[perm], rtol=0, atol=1e-10)
    h = 1e-4
    for atom, axis in [(0, 0), (4, 2)]:
        plus, minus = pos.clone(), pos.clone()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        numeric = -(model(z, plus, forces=False)["energy"] - model(z, minus, forces=False)["energy"]).item() / (2 * h)
        assert forces[atom, axis].item() == pytest.approx(numeric, rel=1e-6, abs=1e-8)


def test_transformer_bad_inputs():
    with pytest.raises(ConfigError, match="num_heads"):
        torchmdx.build_model({**TINY, "num_heads": 3})
    with pytest.raises(ConfigError, match="belongs to architecture 'transformer'"):
        torchmdx.build_model({"architecture": "gatr", "bias_hidden": 8})
    model = torchmdx.build_model(TINY)
    z, pos = ethanol()
    with pytest.raises(ModelError, match="non-periodic"):
        model(z, pos, cell=torch.eye(3, dtype=F64) * 12, pbc=[True, True, True])


def test_random_orthogonal_has_the_haar_moments():
    g = torch.Generator().manual_seed(0)
    n = 20000
    rot = random_orthogonal(n, generator=g)
    eye = torch.eye(3, dtype=F64).expand(n, 3, 3)
    torch.testing.assert_close(rot @ rot.transpose(1, 2), eye, rtol=0, atol=1e-12)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(n, dtype=F64), atol=1e-12)
    trace = rot.diagonal(dim1=1, dim2=2).sum(-1)
    # Haar on SO(3): the angle θ has density (1 - cos θ)/π, tr = 1 + 2 cos θ: E[tr] = 0, E[tr²] = 1
    assert abs(trace.mean().item()) < 0.03 and abs((trace**2).mean().item() - 1.0) < 0.05
    assert rot.mean(0).abs().max() < 0.03  # E[R] = 0
    both = random_orthogonal(n, reflections=True, generator=g)
    det = torch.linalg.det(both)
    assert torch.allclose(det.abs(), torch.ones(n, dtype=F64), atol=1e-12)
    assert abs((det < 0).double().mean().item() - 0.5) < 0.02
    with pytest.raises(ConfigError, match="train.augment"):
        augment_batch(Batch.from_data_list([Data(pos=torch.zeros(1, 3))]), "shear")


def lj_batch():
    """Two argon boxes (periodic) with forces and stress from the Lennard-Jones potential."""
    lj = LennardJones(epsilon=0.0104, sigma=3.4, cutoff=5.0)
    data = []
    for seed, scale in ((0, 1.0), (1, 1.03)):
        atoms = bulk("Ar", "fcc", a=5.26 * scale, cubic=True).repeat((2, 2, 2))
        atoms.rattle(0.1, seed=seed)
        atoms.set_cell(atoms.cell.array @ np.array([[1.0, 0.05, 0.0], [0.0, 1.0, 0.02], [0.0, 0.0, 1.0]]),
                       scale_atoms=True)
        data.append(Data(z=torch.tensor(atoms.numbers), pos=torch.tensor(atoms.positions, dtype=F64),
                         cell=torch.tensor(atoms.cell.array, dtype=F64).unsqueeze(0),
                         pbc=torch.tensor([[True, True, True]])))
    batch = Batch.from_data_list(data)
    out = lj(batch.z, batch.pos, batch.batch, batch.cell, batch.pbc, stress=True)
    batch.energy = out["energy"].detach()
    batch.forces = out["forces"].detach()
    batch.stress = out["stress"].detach()
    return lj, batch


@pytest.mark.parametrize("mode", ["rotations", "rotations_reflections"])
def test_augmentation_rotates_positions_forces_cells_and_stress_consistently(mode):
    lj, batch = lj_batch()
    before = batch.clone()
    torch.manual_seed(5)
    augmented = augment_batch(batch, mode)
    assert augmented is batch  # a PyG batch is changed in place
    assert (augmented.pos - before.pos).abs().max() > 0.1
    # the independent reference: the potential on the transformed structures
    out = lj(augmented.z, augmented.pos, augmented.batch, augmented.cell, augmented.pbc, stress=True)
    torch.testing.assert_close(out["energy"], before.energy, rtol=0, atol=1e-10)
    torch.testing.assert_close(out["forces"], augmented.forces, rtol=0, atol=1e-10)
    torch.testing.assert_close(out["stress"], augmented.stress, rtol=0, atol=1e-12)
    assert (augmented.forces - before.forces).abs().max() > 1e-3
    # each structure its own matrix: recover Q_b from the cell (cell' = cell Q_b^T)
    q = [torch.linalg.solve(before.cell[b], augmented.cell[b]).T for b in range(2)]
    for b in range(2):
        torch.testing.assert_close(q[b] @ q[b].T, torch.eye(3, dtype=F64), rtol=0, atol=1e-10)
    assert (q[0] - q[1]).abs().max() > 1e-3
    dets = [torch.linalg.det(m).item() for m in q]
    assert all(d == pytest.approx(1.0) for d in dets) or mode == "rotations_reflections"


def test_augmentation_of_a_packed_batch():
    from torchmdx.data.packing import pack

    z1, p1 = ethanol(1)
    z2, p2 = ethanol(2)
    z = torch.cat([z1, z2])
    pos = torch.cat([p1, p2])
    forces = torch.randn(pos.shape, dtype=F64, generator=torch.Generator().manual_seed(0))
    packed = pack(z, pos, torch.tensor([1.0, 2.0], dtype=F64), forces, np.array([9, 9]), atom_capacity=24,
                  batch_size=3, pad_z=1)
    torch.manual_seed(0)
    out = augment_batch(packed, "rotations")
    assert type(out) is type(packed) and out is not packed
    assert (out.real_atoms, out.real_structures, out.num_structures) == (18, 2, packed.num_structures)
    assert not out.pos[18:].any()  # padding atoms: structures of their own at the origin
    torch.testing.assert_close(out.energy, packed.energy)
    # per structure: distances kept, and the same matrix on positions and forces
    matrices = []
    for s in (slice(0, 9), slice(9, 18)):
        torch.testing.assert_close(torch.cdist(out.pos[s], out.pos[s]), torch.cdist(pos[s], pos[s]), rtol=0, atol=1e-10)
        q = torch.linalg.lstsq(pos[s], out.pos[s]).solution.T  # out.pos = pos Q^T
        torch.testing.assert_close(q @ q.T, torch.eye(3, dtype=F64), rtol=0, atol=1e-9)
        torch.testing.assert_close(out.forces[s], forces[s] @ q.T, rtol=0, atol=1e-9)
        matrices.append(q)
    assert (matrices[0] - matrices[1]).abs().max() > 1e-3  # each structure its own rotation


@pytest.mark.parametrize("packed", [False, True])
def test_training_rotates_every_batch(shared_data, tmp_path, monkeypatch, packed):
    """A short Lightning run (transformer, train.augment: rotations) through the eager step or
    the packed step: every training batch goes through the augmentation, which keeps each
    structure's interatomic distances and changes its positions."""
    from torchmdx.train import augment as augment_module
    from torchmdx.train.config import build_run_config
    from torchmdx.train.run import train

    seen = []
    original = augment_module.augment_batch

    def recording(batch, mode, generator=None):
        before = batch.pos.clone()
        out = original(batch, mode, generator)
        seen.append((mode, type(out).__name__, before, out.pos.clone(), out.batch.clone()))
        return out

    monkeypatch.setattr(augment_module, "augment_batch", recording)
    values = {
        "data": {"path": str(shared_data / "md17" / "md17_ethanol_xtb.npz"), "train_size": 24, "val_size": 8,
                 "test_size": 8, "batch_size": 8, "seed": 0, "cache_dir": str(tmp_path / "cache"),
                 "device_resident": packed},
        "model": {**TINY, "dtype": "float32"},
        "train": {"energy_weight": 0.2, "force_weight": 0.8, "lr": 1e-3, "lr_warmup_steps": 2, "augment": "rotations",
                  "cuda_graph": packed},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                    "num_sanity_val_steps": 0},
        "run_dir": str(tmp_path / "run"),
    }
    if packed:
        with pytest.warns(UserWarning, match="CUDA graphs need a GPU"):
            train(build_run_config(values))
    else:
        train(build_run_config(values))
    assert len(seen) == 3  # 24 structures in batches of 8
    for mode, kind, before, after, index in seen:
        assert mode == "rotations" and kind == ("PackedBatch" if packed else "DataBatch")
        assert (after - before).abs().max() > 0.1
        for b in index.unique():
            atoms = index == b
            torch.testing.assert_close(torch.cdist(after[atoms], after[atoms]), torch.cdist(before[atoms], before[atoms]),
                                       rtol=0, atol=1e-4)
