"""DDP's loss equals the one-process loss of the same global batch (torchmdx.train.module,
``global_batch_objective``), on the CPU with two gloo processes (torch.multiprocessing spawn):
rank 0 holds two water-sized structures (3 atoms each), rank 1 one structure of 12 atoms. Each rank
runs ``PotentialModule._step(batch, "train")`` and backward; the gradients are then averaged over
the ranks (all_reduce / W: what DistributedDataParallel does). The averaged gradient must equal
the gradient of one process on the union batch (float64, tight tolerance), for mse, l1-free
Huber and per-atom energy losses. The old per-rank mean (each rank's own mean, averaged) gives a
different gradient here (checked, so the test can fail), and one process's path is unchanged
bit for bit (``training_objective`` itself)."""

import os
import socket

import pytest
import torch

MODEL = {"embedding_dimension": 8, "num_layers": 1, "num_heads": 2, "num_rbf": 4, "cutoff_upper": 4.0,
         "backend": "torch", "seed": 0, "dtype": "float64"}
CASES = [{"energy_weight": 0.3, "force_weight": 0.7},
         {"energy_weight": 0.5, "force_weight": 1.0, "loss": "huber", "huber_delta": 0.05, "energy_loss": "per_atom"}]


def _structures():
    """[(z, pos, energy, forces)]: two 3-atom structures and one of 12 atoms (float64)."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for n in (3, 3, 12):
        z = torch.tensor([8, 1, 1] * (n // 3))
        pos = torch.randn(n, 3, generator=gen, dtype=torch.float64) * 1.2
        pos = pos + torch.arange(n, dtype=torch.float64)[:, None] * torch.tensor([0.9, 0.0, 0.0], dtype=torch.float64)
        energy = torch.randn(1, generator=gen, dtype=torch.float64)
        forces = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        out.append((z, pos, energy, forces))
    return out


def _batch(structures):
    from torch_geometric.data import Batch, Data

    return Batch.from_data_list([Data(z=z, pos=pos, energy=e, forces=f) for z, pos, e, f in structures])


def _module(train):
    from torchmdx.train.module import PotentialModule

    torch.manual_seed(0)
    return PotentialModule(model=MODEL, train=dict(train))


def _gradient(module, batch):
    module.zero_grad()
    loss = module._step(batch, "train")
    loss.backward()
    return loss.detach(), torch.cat([p.grad.reshape(-1) for p in module.parameters() if p.grad is not None])


def _worker(rank, world, port, train, out_path):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        parts = _structures()
        mine = parts[:2] if rank == 0 else parts[2:]
        module = _module(train)
        loss, grad = _gradient(module, _batch(mine))
        dist.all_reduce(grad)
        grad /= world  # DistributedDataParallel averages the gradients over the ranks
        losses = [torch.zeros((), dtype=torch.float64) for _ in range(world)]
        dist.all_gather(losses, loss.to(torch.float64).reshape(()))
        if rank == 0:
            torch.save({"grad": grad, "losses": torch.stack(losses)}, out_path)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("train", CASES, ids=["mse", "huber_per_atom"])
def test_two_ranks_of_different_sizes_give_the_one_process_gradient(tmp_path, train):
    import torch.multiprocessing as mp

    from torchmdx.train.module import training_objective  # noqa: F401 - the one-process objective

    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, _free_port(), train, str(out)), nprocs=2, join=True)
    ddp = torch.load(out)

    parts = _structures()
    single_loss, single = _gradient(_module(train), _batch(parts))
    assert torch.allclose(ddp["grad"], single, rtol=1e-10, atol=1e-13), (ddp["grad"] - single).abs().max()
    # each rank's value is W x its share: their mean is the global loss
    assert float(ddp["losses"].mean()) == pytest.approx(float(single_loss), rel=1e-12)

    # the per-rank means averaged (DDP before): another gradient for ranks of 6 and 12 atoms
    _, g0 = _gradient(_module(train), _batch(parts[:2]))
    _, g1 = _gradient(_module(train), _batch(parts[2:]))
    old = (g0 + g1) / 2
    assert (old - single).abs().max() > 1e-4 * single.abs().max()


def test_one_process_keeps_the_plain_mean():
    """Without torch.distributed the step's loss is training_objective's, bit for bit."""
    from torchmdx.train.module import batch_counts, training_objective

    module = _module(CASES[0])
    batch = _batch(_structures())
    loss = module._step(batch, "train")
    out = module(batch, forces=True, create_graph=True)
    expected, _, _ = training_objective(module.train_config, out["energy"], out["forces"], batch.energy,
                                        batch.forces, batch_counts(batch))
    assert torch.equal(loss.detach(), expected.detach())
