"""The CUDA-graph training step under DDP (torchmdx.train.graphed, "Several processes (DDP)").

CPU (two gloo processes, torch.multiprocessing spawn as tests/test_ddp_loss.py):
- the step function that a graph captures, run eagerly in float64 on two ranks with batches of
  different sizes and compositions (one of them packed: a padding structure with weight 0),
  gives after N steps the parameters and AdamW moments of one process stepping on the union
  batch (Lightning's eager step, exact list) to ~1e-10; gradient clipping sees the reduced
  gradient (one step with clipping active); a step where only rank 1's neighbor list
  overflows is skipped by both ranks (weights, moments and step count untouched), as the one
  process skips it;
- the host decisions (warm-up, capture, replay, max_shapes) are taken on the shapes agreed
  over the ranks: both ranks keep the same graphs and capture / replay / switch off at the
  same steps although their batches differ;
- config: several devices with ``cuda_graph: true`` are accepted (several nodes and a stress
  term under DDP are refused: tests/test_train_graph.py).
GPU (``-m gpu``, two GPUs, NCCL): captured DDP steps equal eager DDP steps of the same runner
(``capture=False``) and the one-process union step.
"""

import datetime
import functools
import os
import socket

import pytest
import torch

from test_ddp_loss import ddp_and_one_process_states

TINY64 = {"embedding_dimension": 16, "num_layers": 2, "num_heads": 2, "num_rbf": 8, "cutoff_upper": 4.0,
          "backend": "torch", "seed": 0, "dtype": "float64"}
# per step: (rank 0's molecules, rank 1's molecules); the last entry of rank 0 in step 2 is packed
SCHEDULE = [([5, 7], [9]), ([4], [6, 6, 3]), ([8, 5], [7]), ([6], [5, 9]), ([7, 4], [8])]
PACKED_STEP = 2  # rank 0's batch gets a padding structure (weight 0) and atom weights
OVERFLOW_STEP = 3  # rank 1's list gets a capacity of 16 pairs (it finds 34): it overflows, every rank skips
CLIP_STEP = 4  # gradient clipping active (norm of the reduced gradient)
CLIP = 1e-3


def _config():
    from torchmdx.train.config import TrainConfig

    return TrainConfig(energy_weight=0.3, force_weight=0.7)


def _batches(k):
    """(rank 0's batch, rank 1's batch) of step k: (z, pos, batch, energy, forces) each."""
    from test_train_graph import molecules

    counts = SCHEDULE[k]
    return molecules(counts[0], seed=100 + k), molecules(counts[1], seed=200 + k)


def _pad(z, pos, batch, energy, forces):
    """A packed batch: one padding structure of 2 atoms (apart by more than the cutoff, so no
    pair) with random references; weights 1 real, 0 padding."""
    structures = int(energy.shape[0])
    gen = torch.Generator().manual_seed(5)
    z = torch.cat([z, torch.tensor([1, 1])])
    pos = torch.cat([pos, torch.tensor([[50.0, 50.0, 50.0], [60.0, 50.0, 50.0]], dtype=pos.dtype)])
    batch = torch.cat([batch, torch.full((2,), structures, dtype=batch.dtype)])
    energy = torch.cat([energy, torch.randn(1, generator=gen, dtype=energy.dtype)])
    forces = torch.cat([forces, torch.randn(2, 3, generator=gen, dtype=forces.dtype)])
    structure_weight = torch.cat([torch.ones(structures), torch.zeros(1)]).to(pos.dtype)
    atom_weight = torch.cat([torch.ones(pos.shape[0] - 2), torch.zeros(2)]).to(pos.dtype)
    return (z, pos, batch, energy, forces), structure_weight, atom_weight


def _worker_steps(rank, world, port, out_path):
    import torch.distributed as dist

    from torchmdx.nn import ETPotential
    from torchmdx.train.graphed import GraphedTrainStep
    from torchmdx.train.objective import global_batch_objective

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a rank that fails leaves its peer in a collective: a short timeout turns that into an error
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        model = ETPotential(TINY64)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        runner = GraphedTrainStep(model, optimizer, functools.partial(global_batch_objective, _config()))
        assert runner._dist is not None and not runner.enabled
        # gradients are views of one flat buffer, made before the first step
        assert all(p.grad is not None and p.grad.data_ptr() >= runner._dist.flats[0].data_ptr() for p in runner._params)
        record = {"losses": [], "overflow": [], "steps": []}
        for k in range(len(SCHEDULE)):
            z, pos, batch, energy, forces = _batches(k)[rank]
            runner.clip_value = CLIP if k == CLIP_STEP else None
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 * (k + 1)
            if k == PACKED_STEP and rank == 0:
                (z, pos, batch, energy, forces), sw, aw = _pad(z, pos, batch, energy, forces)
                n_atoms = torch.bincount(batch, minlength=int(energy.shape[0]))
                out = runner.step(z, pos, batch, energy, forces, n_atoms=n_atoms, structure_weight=sw, atom_weight=aw)
            elif k == OVERFLOW_STEP:
                # the step function itself, with the capacity a graph would have: 16 rows on rank 1
                # (too few), every pair's worth on rank 0
                given = {"z": z, "pos": pos, "batch": batch, "energy": energy, "forces": forces}
                out, _ = runner._compute(given, 16 if rank == 1 else 4096)
            else:
                out = runner.step(z, pos, batch, energy, forces)
            record["losses"].append(float(out.loss))
            record["overflow"].append(bool(out.overflow))
            record["steps"].append(float(next(iter(optimizer.state.values()))["step"]) if optimizer.state else 0.0)
        record["status"] = runner.status.tolist()
        record["params"] = [p.detach().clone() for p in model.parameters()]
        record["exp_avg"] = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
        record["exp_avg_sq"] = [optimizer.state[p]["exp_avg_sq"].clone() for p in model.parameters()]
        record["decisions"] = _decisions(rank)
        record["reducer"] = _reducer(rank)
        torch.save(record, f"{out_path}.{rank}")
        dist.barrier()  # both ranks leave together (tests/test_ddp_loss.py)
    finally:
        dist.destroy_process_group()


def _decisions(rank):
    """The host decisions of a runner that believes it is on a GPU (RecordingStep of
    tests/test_train_graph.py: eager steps, captures and replays recorded, not run) under DDP,
    with different batch shapes on the two ranks."""
    from test_train_graph import RecordingStep

    from torchmdx.nn import ETPotential
    from torchmdx.train.graphed import shape_from_counts
    from torchmdx.train.module import training_objective

    model = ETPotential({**TINY64, "dtype": "float32"})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    runner = RecordingStep(model, optimizer, functools.partial(training_objective, _config()), max_shapes=2)
    # rank 0 always molecules of 10 atoms; rank 1 one of 7 in its third step, then a new pair
    plan = {0: [[10, 10]] * 6, 1: [[9, 9], [9, 9], [7], [9, 9], [9, 9], [3, 3, 3]]}[rank]
    plan += [[2, 2, 2] if rank == 0 else [4]]  # a third combination: more than max_shapes=2
    out = []
    for counts in plan:
        shape = shape_from_counts(counts)
        n = shape.atoms
        batch = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        runner.calls.clear()
        runner.step(torch.ones(n, dtype=torch.long), torch.zeros(n, 3), batch, torch.zeros(len(counts)),
                    torch.zeros(n, 3), shape=shape)
        out.append(list(runner.calls))
    return {"calls": out, "disabled": runner.disabled_reason, "keys": list(runner._graphs)}


def _reducer(rank):
    """DDP's reducer and a step that runs its backward inside the wrapper's forward (as the step
    runner does inside training_step): with DDP's default the reducer, armed by the previous
    forward, averages the gradients during that backward (a second reduction); after
    ``PotentialModule._ddp_reducer(on=False)`` it does not. Returns each iteration's gradient."""
    from types import SimpleNamespace

    from torchmdx.train.module import PotentialModule

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(3, 2).double()

        def forward(self, x):
            self.lin.weight.grad = None
            (self.lin(x) ** 2).sum().backward()
            return torch.zeros((), dtype=torch.float64, requires_grad=True)  # the stand-in loss

    out = {}
    for name in ("default", "off"):
        ddp = torch.nn.parallel.DistributedDataParallel(Step())
        if name == "off":
            module = PotentialModule(model={k: v for k, v in TINY64.items()}, train={})
            module._trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(model=ddp))
            module._ddp_reducer(on=False)
            module._trainer = None
        grads = []
        for k in range(2):
            ddp(torch.full((4, 3), float(rank + 1 + k), dtype=torch.float64)).backward()
            grads.append(ddp.module.lin.weight.grad.clone())
        out[name] = grads
    return out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, out):
    import torch.multiprocessing as mp

    for attempt in range(2):
        try:
            mp.spawn(worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
            return
        except mp.ProcessExitedException as exc:
            # one retry on a gloo rank aborting at teardown after its results were written
            # (tests/test_ddp_loss.py: "terminate called without an active exception")
            if attempt or exc.signal_name != "SIGABRT":
                raise


def _union(k):
    """Step k's global batch in one process (rank 0's molecules, then rank 1's; no padding)."""
    a, b = _batches(k)
    z = torch.cat([a[0], b[0]])
    pos = torch.cat([a[1], b[1]])
    batch = torch.cat([a[2], b[2] + int(a[3].shape[0])])
    return z, pos, batch, torch.cat([a[3], b[3]]), torch.cat([a[4], b[4]])


def test_captured_step_function_on_two_ranks_equals_one_process_on_the_union_batch(tmp_path):
    from test_train_graph import eager_step

    from torchmdx.nn import ETPotential

    out = tmp_path / "ddp.pt"
    _spawn(_worker_steps, out)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]

    # one process, Lightning's eager step on the union batch; the overflowed step is not taken
    model = ETPotential(TINY64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    cfg = _config()
    start = [p.detach().clone() for p in model.parameters()]
    losses, norms = [], []
    for k in range(len(SCHEDULE)):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * (k + 1)
        if k == OVERFLOW_STEP:
            losses.append(None)
            continue
        loss, norm = eager_step(model, optimizer, cfg, *_union(k), CLIP if k == CLIP_STEP else None)
        losses.append(float(loss))
        norms.append(norm)
    assert norms[-1] > CLIP and max(norms[:-1]) > 10 * CLIP  # clipping bit at the last step only

    for r in range(2):
        assert ranks[r]["overflow"] == [k == OVERFLOW_STEP for k in range(len(SCHEDULE))], r
        # AdamW steps: the overflowed step did not count on either rank
        assert ranks[r]["steps"] == [1.0, 2.0, 3.0, 3.0, 4.0], r
        assert ranks[r]["status"][:2] == [1, 0], r  # one skipped step (reduced flag), the latest fine
    # both ranks hold the same weights and moments, bit for bit (the same reduced gradient)
    for key in ("params", "exp_avg", "exp_avg_sq"):
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][key], ranks[1][key])), key
    # ... which are the one process's (moments too: AdamW's update hides a gradient's scale, they do not)
    for key, reference in (("params", list(model.parameters())),
                           ("exp_avg", [optimizer.state[p]["exp_avg"] for p in model.parameters()]),
                           ("exp_avg_sq", [optimizer.state[p]["exp_avg_sq"] for p in model.parameters()])):
        for got, want in zip(ranks[0][key], reference):
            torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-15, msg=key)
    assert max(float((p - p0).abs().max()) for p, p0 in zip(model.parameters(), start)) > 1e-3
    # each rank's loss is W x its share of the global loss: their mean is the union's loss
    for k, loss in enumerate(losses):
        if loss is not None:
            assert (ranks[0]["losses"][k] + ranks[1]["losses"][k]) / 2 == pytest.approx(loss, rel=1e-12), k

    # a rank-local mean instead (what plain training_objective would give each rank) differs
    a, b = _batches(0)
    grads = []
    for part in (a, b):
        probe = ETPotential(TINY64)
        eager_step(probe, torch.optim.SGD(probe.parameters(), lr=0.0), cfg, *part, None)
        grads.append(torch.cat([p.grad.reshape(-1) for p in probe.parameters()]))
    probe = ETPotential(TINY64)
    eager_step(probe, torch.optim.SGD(probe.parameters(), lr=0.0), cfg, *_union(0), None)
    union = torch.cat([p.grad.reshape(-1) for p in probe.parameters()])
    assert ((grads[0] + grads[1]) / 2 - union).abs().max() > 1e-3 * union.abs().max()

    # DDP's reducer: armed by a forward, it reduces a backward run inside the next forward (the
    # rank-local gradients would be averaged twice); off, the gradients stay the rank's own
    reducer = [ranks[r]["reducer"] for r in range(2)]
    assert not torch.equal(reducer[0]["default"][0], reducer[1]["default"][0])
    assert torch.equal(reducer[0]["default"][1], reducer[1]["default"][1])
    for k in range(2):
        assert not torch.equal(reducer[0]["off"][k], reducer[1]["off"][k]), k

    # host decisions on agreed shapes: the same calls on both ranks, step by step
    d0, d1 = ranks[0]["decisions"], ranks[1]["decisions"]
    assert d0 == d1, (d0, d1)
    joint = ((20, 2, False), (18, 2, False))
    calls = d0["calls"]
    assert calls[0] == [("eager", joint, 192)] and calls[1] == [("eager", joint, 192)]  # bound max(180, 144)
    second = ((20, 2, False), (7, 1, False))
    assert calls[2] == [("eager", second, 192)]  # rank 1's smaller batch: a combination of its own
    assert calls[3] == [("capture", joint, 192), ("replay", joint)] and calls[4] == [("replay", joint)]
    # a third combination with max_shapes=2: graphs off on both ranks at the same step, every
    # step after it eager on both (with the capacity of the largest rank's bound)
    assert calls[5] == [("eager", ((20, 2, False), (9, 3, False)), 192)]
    assert calls[6] == [("eager", ((6, 3, False), (4, 1, False)), 64)]
    assert d0["disabled"] and "more than 2 distinct batch shapes" in d0["disabled"] and d0["keys"] == []


def test_several_devices_with_cuda_graph_are_accepted():
    from torchmdx.train.config import build_run_config

    values = {"data": {"path": "unused.npz"}, "model": {k: v for k, v in TINY64.items() if k != "dtype"},
              "train": {"cuda_graph": True}, "trainer": {"devices": 2, "accelerator": "gpu", "strategy": "ddp"}}
    assert build_run_config(values, check_data=False).train.cuda_graph is True
    values["trainer"]["devices"] = [0, 1]
    assert build_run_config(values, check_data=False).train.cuda_graph is True


def _lightning_config(shared_data, tmp_path, name, devices, batch_size):
    return {
        "data": {"path": str(shared_data / "polymer" / "polymers_xtb.extxyz"), "cache_dir": str(tmp_path / "cache"),
                 "train_size": 24, "val_size": 8, "test_size": 0, "batch_size": batch_size, "inference_batch_size": 8,
                 "dtype": "float64", "seed": 3, "mmap": False, "device_resident": True},
        "model": {"embedding_dimension": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8, "cutoff_upper": 4.0,
                  "backend": "torch", "dtype": "float64"},
        "train": {"lr": 2e-3, "lr_warmup_steps": 2, "energy_weight": 0.3, "force_weight": 0.7, "cuda_graph": True},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": devices, "enable_progress_bar": False,
                    "num_threads": 1, "log_every_n_steps": 1, "gradient_clip_val": 0.05,
                    **({"strategy": "ddp"} if devices > 1 else {})},
        "run_dir": str(tmp_path / name),
    }


@pytest.mark.slow
def test_lightning_ddp_through_the_step_runner_equals_one_process(tmp_path, shared_data):
    """The module's wiring under DDP (``torchmdx train``, two gloo processes, batches of 4) on
    polymer structures of different sizes, packed on the CPU (``data.device_resident: true``
    packs without a GPU, and the step runner then steps eagerly: the path a GPU captures, padding
    weights included): the runner reduces the gradients with the global batch's normalisation,
    clipping (active) sees the reduced gradient; against one process with batches of 8 the
    weights and AdamW moments agree to float64 rounding. (That DDP's own reducer stays out is
    checked in the spawned test: a second averaging would not change an average.)"""

    states = ddp_and_one_process_states(tmp_path, _lightning_config(shared_data, tmp_path, "ddp", devices=2, batch_size=4),
                                        _lightning_config(shared_data, tmp_path, "one", devices=1, batch_size=8))
    assert states["ddp"]["global_step"] == states["one"]["global_step"] == 3
    a, b = states["ddp"]["state_dict"], states["one"]["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-12, msg=key)
    for name in ("exp_avg", "exp_avg_sq"):
        x = [s[name] for s in states["ddp"]["optimizer_states"][0]["state"].values()]
        y = [s[name] for s in states["one"]["optimizer_states"][0]["state"].values()]
        assert len(x) == len(y) > 0
        for u, v in zip(x, y):
            torch.testing.assert_close(u, v, rtol=1e-8, atol=1e-14, msg=name)


# ------------------------------------------------------------------------- GPU (two GPUs, NCCL)
def _worker_gpu(rank, world, port, out_path):
    import torch.distributed as dist

    from test_train_graph import ET_SMALL, molecules

    from torchmdx.nn import ETPotential
    from torchmdx.train.graphed import GraphedTrainStep
    from torchmdx.train.objective import global_batch_objective

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0")
    torch.cuda.set_device(rank)
    # a hang (collectives that do not match) fails within two minutes instead of holding the GPUs
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank),
                            timeout=datetime.timedelta(seconds=120))
    try:
        cfg = _config()
        models = [ETPotential({**ET_SMALL, "backend": "torch"}).cuda() for _ in range(2)]
        models[1].load_state_dict(models[0].state_dict())
        runners = []
        for model, capture in zip(models, (True, False)):
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=True, capturable=True)
            runners.append(GraphedTrainStep(model, optimizer, functools.partial(global_batch_objective, cfg),
                                            clip_value=1.0, capture=capture, pair_headroom=1.2))
        # rank 0: 8 molecules of 12 atoms; rank 1: 6 of 12 and a second shape in the middle
        counts = [[12] * 8, [12] * 6]
        losses = []
        for k in range(9):
            mine = counts[rank] if k != 5 else [12] * (5 + rank)
            batch = molecules(mine, seed=10 * k + rank, box=8.0, dtype=torch.float32, device="cuda")
            out = [runner.step(*batch) for runner in runners]
            losses.append([float(o.loss) for o in out])
        torch.cuda.synchronize()
        stats = runners[0].check()
        torch.save({"losses": losses, "stats": stats,
                    "graphed": [p.detach().cpu() for p in models[0].parameters()],
                    "eager": [p.detach().cpu() for p in models[1].parameters()]}, f"{out_path}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_captured_ddp_steps_equal_eager_ddp_steps_on_two_gpus(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    out = tmp_path / "gpu.pt"
    _spawn(_worker_gpu, out)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    for r in range(2):
        stats = ranks[r]["stats"]
        assert stats["captures"] >= 1 and stats["replays"] >= 4 and stats["skipped"] == 0, stats
        for graphed, eager in ranks[r]["losses"]:
            assert graphed == pytest.approx(eager, rel=1e-4)
        for p, q in zip(ranks[r]["graphed"], ranks[r]["eager"]):
            assert float((p - q).abs().max()) < 5e-5
    # every rank ends with the same weights (the same reduced gradient)
    for p, q in zip(ranks[0]["graphed"], ranks[1]["graphed"]):
        assert torch.equal(p, q)
