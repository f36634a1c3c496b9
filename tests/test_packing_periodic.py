"""Periodic batches through the packed, captured training path (CPU, float64).

- a padded periodic step (triclinic boxes, a slab, a molecule in one batch; padding structures
  with a zero cell and no periodic direction) equals the unpadded step, whose first loss equals
  the model's own host-checked evaluation, and the EMA and error sums agree;
- a batch with a cell narrower than twice the cutoff changes nothing and stops the run at the
  next check with one line; validation leaves such a batch out and says so;
- periodic data are packed by both loaders (the same batches and cells, host and device order);
- a whole Lightning run on periodic data, packed and device-resident, ends with the plain run's
  weights and logged errors;
- the run refuses data with a cell narrower than twice the model's cutoff before training, in one
  line naming the file and the structure.
"""

import copy
import functools

import numpy as np
import pytest
import torch

from torchmdx.data.datamodule import TorchmdxDataModule
from torchmdx.data.loader import BatchLoader
from torchmdx.data.packing import DeviceBatchLoader, PackedBatch, bucket_for, pack
from torchmdx.errors import DataError, TrainingError
from torchmdx.nn import ETPotential
from torchmdx.train.graphed import packed_shape, shape_from_counts
from torchmdx.train.graphed_eval import GraphedEvalStep
from torchmdx.train.module import train_error_sums, training_objective

from test_packing import JOINT, TINY, runner

CUTOFF = TINY["cutoff_upper"]  # 4 Å: boxes at least 8 Å wide


def boxes(counts, seed=0, narrow=None):
    """Random periodic structures (one molecule and one slab among them) with random reference
    energies and forces; atoms may lie outside their box. ``narrow``: index of a structure whose
    cell is only 7 Å wide (too narrow for the 4 Å cutoff). Returns z, pos, batch, energy,
    forces, cell [B, 3, 3], pbc [B, 3]."""
    rng = np.random.default_rng(seed)
    z, pos, batch, cells, pbcs = [], [], [], [], []
    for b, n in enumerate(counts):
        cell = np.diag(rng.uniform(8.5, 10.0, 3)) + np.triu(rng.uniform(-1.5, 1.5, (3, 3)), 1)
        pattern = [True, True, True]
        if b % 4 == 1:
            pattern = [True, True, False]  # a slab: its third row is not used
            cell[2] = rng.normal(size=3)
        if b % 4 == 3:
            pattern = [False, False, False]  # a molecule in a periodic data set
            cell = np.zeros((3, 3))
        if b == narrow:
            cell = np.eye(3) * 7.0
            pattern = [True, True, True]
        frac = rng.uniform(-0.3, 1.3, (n, 3))
        p = frac @ (cell if any(pattern) else np.eye(3) * 6.0)
        z.append(rng.choice([1, 6, 7, 8], n))
        pos.append(p)
        batch.append(np.full(n, b))
        cells.append(cell)
        pbcs.append(pattern)
    t = lambda a, dt: torch.tensor(np.concatenate(a), dtype=dt)  # noqa: E731
    n_total = sum(counts)
    return (t(z, torch.long), t(pos, torch.float64), t(batch, torch.long),
            torch.tensor(rng.normal(size=len(counts))), torch.tensor(rng.normal(size=(n_total, 3))),
            torch.tensor(np.stack(cells)), torch.tensor(pbcs))


def test_padded_periodic_step_equals_unpadded_step_float64():
    plain_model = ETPotential(TINY)
    packed_model = copy.deepcopy(plain_model)
    check_model = copy.deepcopy(plain_model)
    plain, packed = runner(plain_model, JOINT, clip=0.5), runner(packed_model, JOINT, clip=0.5)
    schedule = [[6, 4, 9, 3], [5, 5, 8, 2], [7, 3]]
    buckets = [24, 32]
    for k, counts in enumerate(schedule):
        z, pos, batch, energy, forces, cell, pbc = boxes(counts, seed=10 + k)
        if k == 0:
            # the runner's step computes the loss of the model's own evaluation (host-checked
            # cells, exact list)
            out = check_model(z, pos, batch, cell, pbc, forces=True, create_graph=True, num_structures=len(counts))
            want, _, _ = training_objective(JOINT, out["energy"], out["forces"], energy, forces,
                                            torch.bincount(batch, minlength=len(counts)))
        out_plain = plain.step(z, pos, batch, energy, forces, shape=shape_from_counts(counts, periodic=True),
                               cell=cell, pbc=pbc)
        if k == 0:
            assert float(out_plain.loss) == pytest.approx(float(want.detach()), rel=1e-12)
        p = pack(z, pos, energy, forces, np.array(counts), bucket_for(sum(counts), buckets), 4, pad_z=1,
                 cell=cell, pbc=pbc)
        assert p.periodic and p.cell.shape == (p.num_structures, 3, 3) and not p.pbc[len(counts):].any()
        out_packed = packed.step(p.z, p.pos, p.batch, p.energy, p.forces, shape=packed_shape(p), n_atoms=p.n_atoms,
                                 structure_weight=p.structure_weight, atom_weight=p.atom_weight,
                                 cell=p.cell, pbc=p.pbc)
        assert not bool(out_packed.overflow)
        assert float(out_packed.loss) == pytest.approx(float(out_plain.loss), rel=1e-12, abs=1e-14), k
    moved = 0.0
    for a, b, c in zip(plain_model.parameters(), packed_model.parameters(), check_model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-11)
        moved = max(moved, float((a - c).detach().abs().max()))
    assert moved > 1e-4
    for a, b in zip(plain.ema["averaged"], packed.ema["averaged"]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-11)
    torch.testing.assert_close(packed.take_sums(), plain.take_sums(), rtol=1e-11, atol=1e-12)
    assert plain.check()["eager_steps"] == 3  # no bad cell: check() passes


def test_a_narrow_cell_changes_nothing_and_stops_at_the_check():
    model = ETPotential(TINY)
    step = runner(model, JOINT)
    start = [p.detach().clone() for p in model.parameters()]
    counts = [5, 6, 4]
    z, pos, batch, energy, forces, cell, pbc = boxes(counts, seed=3, narrow=2)
    p = pack(z, pos, energy, forces, np.array(counts), 16, 4, pad_z=1, cell=cell, pbc=pbc)
    out = step.step(p.z, p.pos, p.batch, p.energy, p.forces, shape=packed_shape(p), n_atoms=p.n_atoms,
                    structure_weight=p.structure_weight, atom_weight=p.atom_weight, cell=p.cell, pbc=p.pbc)
    assert bool(out.overflow)  # the step's "skipped" flag
    for a, b in zip(model.parameters(), start):
        assert torch.equal(a, b)
    assert int(step.ema["num_averaged"]) == 0 and not step.sums.any()
    with pytest.raises(TrainingError) as err:
        step.check()
    line = str(err.value)
    assert "\n" not in line and line.startswith("a periodic training structure: cutoff 4 Å is larger than half")
    assert "a 7, b 7, c 7" in line and "1 step(s)" in line
    # validation: the batch is left out of the sums, and the epoch's read says so
    evaluator = GraphedEvalStep(model, functools.partial(train_error_sums, JOINT), forces=True, capture=False)
    evaluator.step(p)
    with pytest.raises(TrainingError, match=r"1 validation batch\(es\) hold a periodic structure .*structure 2 of the first"):
        evaluator.take_sums()


def argon(tmp_path, frames=12, a=5.26):
    from ase.build import bulk
    from ase.calculators.lj import LennardJones
    from ase.io import write

    out = []
    rng = np.random.default_rng(0)
    for k in range(frames):
        atoms = bulk("Ar", "fcc", a=a, cubic=True).repeat((2, 2, 2 + k % 2))  # 32 or 48 atoms
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        atoms.calc = LennardJones(epsilon=0.0104, sigma=3.4, rc=8.0)
        atoms.get_potential_energy()
        out.append(atoms)
    path = tmp_path / "argon.extxyz"
    write(path, out)
    return path


def test_periodic_data_are_packed_by_both_loaders(tmp_path):
    path = argon(tmp_path)
    data = TorchmdxDataModule({"path": str(path), "train_size": 8, "val_size": 2, "test_size": 2, "batch_size": 4,
                               "cache_dir": str(tmp_path / "cache"), "device_resident": True, "seed": 0},
                              pack_training=True)
    data.setup("fit")
    loader = data.train_dataloader()
    assert isinstance(loader, DeviceBatchLoader) and data.training_batches == "device"
    host = BatchLoader(data.dataset, batch_size=4, shuffle=True, indices=data.split["train"],
                       pack={"buckets": data.training_buckets, "pad_z": 18, "periodic": True})
    torch.manual_seed(5)
    from_host = list(host)
    torch.manual_seed(5)
    from_device = list(loader)
    assert len(from_host) == len(from_device) == 2
    for h, d in zip(from_host, from_device):
        assert isinstance(h, PackedBatch) and h.periodic and d.periodic
        b = h.real_structures
        assert torch.equal(d.cell, h.cell) and torch.equal(d.pbc, h.pbc) and torch.equal(d.pos, h.pos)
        assert bool(h.pbc[:b].all()) and not h.pbc[b:].any() and not h.cell[b:].any()
        # the cells are the structures' own: 2 x 2 x (2 or 3) cubic fcc cells, a³/4 per atom
        volumes = torch.linalg.det(h.cell[:b].double()).abs() / (5.26 ** 3 / 4)
        atoms = torch.bincount(h.batch[:h.real_atoms], minlength=b)
        torch.testing.assert_close(volumes, atoms.double(), rtol=1e-5, atol=0)
        assert set(atoms.tolist()) <= {32, 48}


def test_packed_periodic_run_equals_plain_run_cpu(tmp_path):
    """Lightning, float64, CPU: periodic argon boxes of two sizes packed, device-resident, through
    the step runner against plain PyG batches through Lightning's loop: same weights and errors."""
    import csv

    from torchmdx.train.config import build_run_config
    from torchmdx.train.run import train

    path = argon(tmp_path)
    results, rows = {}, {}
    for name, extra in (("plain", {}), ("packed", {"cuda_graph": True})):
        values = {
            "data": {"path": str(path), "train_size": 8, "val_size": 2, "test_size": 2, "batch_size": 4, "seed": 0,
                     "dtype": "float64", "cache_dir": str(tmp_path / "cache"), "device_resident": name == "packed"},
            "model": dict(TINY),
            "train": {"energy_weight": 0.2, "force_weight": 0.8, "lr": 1e-3, "lr_warmup_steps": 1, "ema_decay": 0.9,
                      **extra},
            "trainer": {"max_epochs": 2, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                        "log_every_n_steps": 1},
            "run_dir": str(tmp_path / name),
        }
        if name == "packed":
            with pytest.warns(UserWarning, match="CUDA graphs need a GPU"):
                result = train(build_run_config(values))
        else:
            result = train(build_run_config(values))
        results[name] = torch.load(result["checkpoint_last"], map_location="cpu", weights_only=False)["state_dict"]
        with open(tmp_path / name / "logs" / "csv" / "metrics.csv") as handle:
            rows[name] = list(csv.DictReader(handle))
    for key in results["plain"]:
        torch.testing.assert_close(results["packed"][key], results["plain"][key], rtol=1e-9, atol=1e-11, msg=key)
    for key in ("val_forces_mae", "val_energy_mae", "train_forces_mae", "train_loss"):
        plain = [float(r[key]) for r in rows["plain"] if r.get(key)]
        packed = [float(r[key]) for r in rows["packed"] if r.get(key)]
        assert len(plain) == len(packed) == 2 and packed == pytest.approx(plain, rel=1e-9), key


def test_run_refuses_a_cell_narrower_than_twice_the_cutoff(tmp_path):
    from torchmdx.train.run import check_cells

    path = argon(tmp_path, frames=4, a=3.6)  # 2 x 2 x 2 cubic fcc cells: 7.2 Å wide
    data = TorchmdxDataModule({"path": str(path), "train_size": 2, "val_size": 1, "test_size": 1,
                               "cache_dir": str(tmp_path / "cache")})
    data.setup("fit")
    check_cells(data.dataset, 3.5, path)  # 7.2 >= 2 x 3.5
    with pytest.raises(DataError) as err:
        check_cells(data.dataset, 4.0, path)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{path}: structure 0: cutoff 4 Å is larger than half")


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_captured_periodic_steps_equal_eager_steps_and_catch_a_narrow_cell_gpu():
    """Captured replays of periodic packed batches (the cell geometry rebuilt inside the graph at
    each replay) give the eager steps' losses and weights; a narrow cell in a replayed batch
    skips the step and stops the run at the check."""
    from torchmdx.train.graphed import GraphedTrainStep

    config = {**TINY, "dtype": "float32", "embedding_dimension": 32, "num_heads": 4, "backend": "auto"}
    reference = ETPotential(config).cuda()
    graphed = copy.deepcopy(reference)
    objective = functools.partial(training_objective, JOINT)
    eager = GraphedTrainStep(reference, torch.optim.AdamW(reference.parameters(), lr=1e-3), objective, capture=False)
    captured = GraphedTrainStep(graphed, torch.optim.AdamW(graphed.parameters(), lr=1e-3, fused=True, capturable=True),
                                objective, capture=True, max_shapes=3)
    rng = np.random.default_rng(0)
    buckets = [40, 56]
    for k in range(10):
        counts = list(rng.integers(3, 12, size=int(rng.integers(3, 5))))
        z, pos, batch, energy, forces, cell, pbc = (t.cuda() for t in boxes(counts, seed=k))
        p = pack(z, pos.float(), energy.float(), forces.float(), np.array(counts),
                 bucket_for(sum(counts), buckets), 5, pad_z=1, cell=cell.float(), pbc=pbc)
        kwargs = dict(shape=packed_shape(p), n_atoms=p.n_atoms, structure_weight=p.structure_weight,
                      atom_weight=p.atom_weight, cell=p.cell, pbc=p.pbc)
        loss_ref = eager.step(p.z, p.pos, p.batch, p.energy, p.forces, **kwargs).loss
        loss = captured.step(p.z, p.pos, p.batch, p.energy, p.forces, **kwargs).loss
        assert float(loss) == pytest.approx(float(loss_ref), rel=1e-4), k
    stats = captured.check()
    assert stats["captures"] >= 1 and stats["replays"] >= 4 and stats["skipped"] == 0, stats
    for a, b in zip(reference.parameters(), graphed.parameters()):
        assert float((b - a).abs().max()) < 0.05 * 1e-3
    before = [q.detach().clone() for q in graphed.parameters()]
    counts = [5, 6, 4]
    z, pos, batch, energy, forces, cell, pbc = (t.cuda() for t in boxes(counts, seed=3, narrow=2))
    p = pack(z, pos.float(), energy.float(), forces.float(), np.array(counts), 40, 5, pad_z=1, cell=cell.float(), pbc=pbc)
    captured.step(p.z, p.pos, p.batch, p.energy, p.forces, shape=packed_shape(p), n_atoms=p.n_atoms,
                  structure_weight=p.structure_weight, atom_weight=p.atom_weight, cell=p.cell, pbc=p.pbc)
    for a, b in zip(graphed.parameters(), before):
        assert torch.equal(a, b)
    with pytest.raises(TrainingError, match="larger than half the perpendicular width"):
        captured.check()
