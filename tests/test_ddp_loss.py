"""DDP's loss equals the one-process loss of the same global batch (torchmdx.train.module,
``global_batch_objective``), on the CPU with two gloo processes (torch.multiprocessing spawn):
rank 0 holds two water-sized structures (3 atoms each), rank 1 one structure of 12 atoms. Each rank
runs ``PotentialModule._step(batch, "train")`` and backward; the gradients are then averaged over
the ranks (all_reduce / W: what DistributedDataParallel does). The averaged gradient must equal
the gradient of one process on the union batch (float64, tight tolerance), for mse and
Huber with per-atom energy losses. The old per-rank mean (each rank's own mean, averaged) gives a
different gradient here (checked, so the test can fail), and one process's path is unchanged
bit for bit (``training_objective`` itself). The two-rank cases share one spawn (module fixture
``two_ranks``): starting the two processes is most of their time."""

import datetime
import os
import socket
from pathlib import Path

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


def _gradient_job(rank, world, train, out_path):
    """One train config on two ranks: rank 0 the two 3-atom structures, rank 1 the 12-atom one;
    the gradients averaged over the ranks and each rank's loss, saved by rank 0."""
    import torch.distributed as dist

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


def _worker(rank, world, port, out_dir):
    """Every two-rank case of this file in one process group (each spawn costs two fresh
    processes importing torch and Lightning, most of these tests' time): the gradient of each
    train config (``{out_dir}/ddp-{i}.pt``), then the stop decision (``{out_dir}/stop.{rank}``)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        for i, train in enumerate(CASES):
            _gradient_job(rank, world, train, f"{out_dir}/ddp-{i}.pt")
        _divergence_job(rank, f"{out_dir}/stop")
        # both ranks leave together: a rank tearing gloo down while its peer still used the
        # connection aborted once in a full make test ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The folder of :func:`_worker`'s results (one spawn of two gloo ranks for the module)."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    for attempt in range(2):
        try:
            mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
            break
        except mp.ProcessExitedException as exc:
            # in a full make test (not alone) a gloo rank aborted at teardown twice in four runs,
            # after its results were written ("terminate called without an active exception");
            # one retry, then the failure stands. Cause not found (closing note 2026-12-05).
            if attempt or exc.signal_name != "SIGABRT":
                raise
    return out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", [0, 1], ids=["mse", "huber_per_atom"])
def test_two_ranks_of_different_sizes_give_the_one_process_gradient(two_ranks, case):
    train = CASES[case]
    ddp = torch.load(two_ranks / f"ddp-{case}.pt")

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


def _lightning_config(shared_data, tmp_path, name, devices, batch_size):
    return {
        "data": {"path": str(shared_data / "polymer" / "polymers_xtb.extxyz"), "cache_dir": str(tmp_path / "cache"),
                 "train_size": 44, "val_size": 8, "test_size": 0, "batch_size": batch_size, "inference_batch_size": 8,
                 "dtype": "float64", "seed": 3, "mmap": False},
        "model": {"embedding_dimension": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8, "cutoff_upper": 4.0,
                  "backend": "torch", "dtype": "float64"},
        "train": {"lr": 2e-3, "lr_warmup_steps": 2, "energy_weight": 0.3, "force_weight": 0.7},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": devices, "enable_progress_bar": False,
                    "num_threads": 1, "log_every_n_steps": 1, **({"strategy": "ddp"} if devices > 1 else {})},
        "run_dir": str(tmp_path / name),
    }


@pytest.mark.slow
def test_lightning_ddp_with_structures_of_different_sizes_equals_one_process(tmp_path, shared_data):
    """Through Lightning (``torchmdx train``, strategy ddp, two gloo processes, batches of 4)
    against one process with batches of 8 on polymer structures of different sizes (the same
    global batches: tests/test_train_ddp.py): the weights after an epoch agree to float64
    rounding (3e-14 relative here; 1.6e-2 while each rank averaged over its own atoms)."""

    states = ddp_and_one_process_states(tmp_path, _lightning_config(shared_data, tmp_path, "ddp", devices=2, batch_size=4),
                                        _lightning_config(shared_data, tmp_path, "one", devices=1, batch_size=8))
    assert states["ddp"]["global_step"] == states["one"]["global_step"] == 6
    a, b = states["ddp"]["state_dict"], states["one"]["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-12, msg=key)


def ddp_and_one_process_states(tmp_path, ddp: dict, one: dict) -> dict:
    """Train config ``ddp`` through ``torchmdx train`` in a subprocess (Lightning spawns its gloo
    ranks there) and ``one`` in this process; their ``last.ckpt`` states by name."""
    import subprocess
    import sys

    import yaml

    from torchmdx.data import build_cache
    from torchmdx.train.config import build_run_config
    from torchmdx.train.run import train

    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(ddp))
    build_cache(ddp["data"]["path"], cache_dir=ddp["data"]["cache_dir"])
    root = str(Path(__file__).resolve().parents[1])  # this checkout's torchmdx, not an installed one
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "torchmdx.cli", "train", str(tmp_path / "ddp.yaml")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(build_run_config(one))
    return {name: torch.load(Path(cfg["run_dir"]) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
            for name, cfg in (("ddp", ddp), ("one", one))}


def _divergence_job(rank, out_path):
    """Rank 0 saw 3 non-finite steps in a row, rank 1 none (rank 1 has no counts yet: None): both
    must stop (limit 3); before, rank 0 stopped alone and rank 1 waited in its next collective."""
    import types

    from torchmdx.errors import TrainingError
    from torchmdx.train.module import PotentialModule

    def diverged(what):
        raise TrainingError(what)

    stub = types.SimpleNamespace(train_config=types.SimpleNamespace(max_nonfinite_steps=3), _diverged=diverged,
                                 _nonfinite=torch.tensor([3, 3]) if rank == 0 else None)
    try:
        PotentialModule._check_finite(stub)
        stopped = ""
    except TrainingError as exc:
        stopped = str(exc)
    stub._nonfinite = torch.tensor([0, 2]) if rank == 0 else torch.tensor([1, 1])  # below the limit everywhere
    PotentialModule._check_finite(stub)
    torch.save(stopped, f"{out_path}.{rank}")


def test_every_rank_stops_when_one_rank_diverged(two_ranks):
    out = two_ranks / "stop"
    for rank in (0, 1):
        assert torch.load(f"{out}.{rank}") == "the loss was NaN or infinite for 3 consecutive steps", rank


def test_one_process_stop_decision_reads_its_own_counts():
    """Without torch.distributed: counts pass through (None: no training step yet, no stop)."""
    from torchmdx.train.module import rank_max

    counts = torch.tensor([1, 4])
    assert rank_max(counts) is counts and rank_max(None) is None
