"""Packed training batches (torchmdx.data.packing) and the step runner's in-step EMA and error sums.

CPU:
- size buckets: one exact bucket for molecules of one size; ascending quantile buckets ending at
  the bound for molecules of different sizes, half of random batches in the smallest;
- the packed layout: real atoms first, each padding atom a structure of its own, weights; the
  neighbor list of a packed batch is the unpacked batch's (brute force on both) and never
  touches a padding atom;
- a padded step equals the unpadded eager step in float64 (loss, parameters after AdamW,
  weight EMA, epoch error sums), for a joint MSE loss and a per-atom Huber loss;
- the in-step EMA equals Lightning's ``AveragedModel`` with torchmdx's decay;
- the device-resident loader gives the host loader's epoch order and batches (and leaves
  torch's generator where the host loader leaves it);
- a whole Lightning run with packed, device-resident batches (CPU) ends with the plain run's EMA
  weights and epoch errors (periodic data: tests/test_packing_periodic.py).
GPU (``@pytest.mark.gpu``): captured replays of packed batches of two buckets give the eager
packed steps' losses and parameters.
"""

import copy
import functools

import numpy as np
import pytest
import torch

from torchmdx.data.datamodule import TorchmdxDataModule
from torchmdx.data.loader import BatchLoader
from torchmdx.data.packing import (
    DeviceBatchLoader,
    atom_buckets,
    bound_capacity,
    bucket_for,
    pack,
)
from torchmdx.kernels.neighbors import neighbor_list
from torchmdx.nn import ETPotential
from torchmdx.train.config import TrainConfig
from torchmdx.train.ema import _EMAStep, ema_update
from torchmdx.train.graphed import GraphedTrainStep, packed_shape
from torchmdx.train.metrics import SUM_STATES, error_sums
from torchmdx.train.module import train_error_sums, training_objective

from test_train_graph import molecules  # random H/C/N/O molecules with reference energies and forces

TINY = {"embedding_dimension": 16, "num_layers": 2, "num_heads": 2, "num_rbf": 8, "cutoff_upper": 4.0,
        "backend": "torch", "seed": 0, "dtype": "float64"}
JOINT = TrainConfig(energy_weight=0.2, force_weight=0.8)
PER_ATOM_HUBER = TrainConfig(energy_weight=1.0, force_weight=0.5, loss="huber", huber_delta=0.05, energy_loss="per_atom")


# ------------------------------------------------------------------------------------- buckets
def test_buckets_of_one_size_and_of_many_sizes():
    assert atom_buckets(np.full(700, 21), 8) == [168]
    rng = np.random.default_rng(0)
    counts = rng.integers(3, 24, size=2000)
    buckets = atom_buckets(counts, 32, seed=1)
    assert buckets == sorted(buckets) and 2 <= len(buckets) <= 4
    assert buckets[-1] == bound_capacity(counts, 32) == int(np.sort(counts)[-32:].sum())
    # half of fresh random batches fit the smallest bucket, nearly all the second-largest
    totals = np.array([counts[rng.permutation(counts.size)[:32]].sum() for _ in range(400)])
    assert (totals <= buckets[0]).mean() >= 0.4
    assert (totals <= buckets[-2]).mean() >= 0.95
    assert bucket_for(buckets[0], buckets) == buckets[0]
    assert bucket_for(buckets[0] + 1, buckets) == buckets[1]
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        bucket_for(buckets[-1] + 1, buckets)


# -------------------------------------------------------------------------------------- layout
def test_packed_layout_and_neighbor_list_without_padding_pairs():
    counts = [5, 3, 7]
    z, pos, batch, energy, forces = molecules(counts, seed=2)
    packed = pack(z, pos, energy, forces, np.array(counts), atom_capacity=24, batch_size=4, pad_z=1)
    A, S = 24, 4 + 24
    assert packed.z.shape == (A,) and packed.energy.shape == (S,) and packed.num_structures == S
    assert (packed.real_atoms, packed.real_structures, packed.pair_bound) == (15, 3, 5 * 4 + 3 * 2 + 7 * 6)
    assert torch.equal(packed.batch[:15], batch) and torch.equal(packed.batch[15:], 4 + torch.arange(15, 24))
    assert bool((packed.batch[1:] >= packed.batch[:-1]).all())  # sorted, as PyG batches
    assert torch.equal(packed.z[15:], torch.ones(9, dtype=torch.long)) and not packed.pos[15:].any()
    assert packed.n_atoms.tolist() == [5, 3, 7, 0] + [0] * 15 + [1] * 9
    assert packed.atom_weight.tolist() == [1.0] * 15 + [0.0] * 9
    assert packed.structure_weight.tolist() == [1.0] * 3 + [0.0] * 25
    assert torch.equal(packed.energy[:3], energy) and not packed.energy[3:].any()
    # all padding atoms sit at the origin, on top of each other: still no pair (own structures)
    ref = neighbor_list(pos, 4.0, batch, backend="torch", method="brute")
    got = neighbor_list(packed.pos, 4.0, packed.batch, backend="torch", method="brute")
    pairs = lambda nl: sorted(map(tuple, nl.edge_index.T.tolist()))  # noqa: E731
    assert pairs(got) == pairs(ref) and len(pairs(ref)) > 0
    assert int(got.edge_index.max()) < 15


# ------------------------------------------------------------------ padded step == unpadded step
def averaged_state(model):
    return {"averaged": [p.detach().clone() for p in model.parameters()], "current": list(model.parameters()),
            "averaged_buffers": [b.detach().clone() for b in model.buffers()], "buffers": list(model.buffers()),
            "num_averaged": torch.zeros((), dtype=torch.long), "decay": 0.99}


def runner(model, cfg, clip=None):
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sums = functools.partial(train_error_sums, cfg)
    return GraphedTrainStep(model, optimizer, functools.partial(training_objective, cfg), clip_value=clip,
                            capture=False, error_sums=lambda e, n, f, sw, aw: sums(e, n, f, sw, aw),
                            ema=averaged_state(model))


@pytest.mark.parametrize("cfg", [JOINT, PER_ATOM_HUBER], ids=["mse-joint", "huber-per-atom"])
def test_padded_step_equals_unpadded_step_float64(cfg):
    plain_model = ETPotential(TINY)
    packed_model = copy.deepcopy(plain_model)
    plain, packed = runner(plain_model, cfg, clip=0.5), runner(packed_model, cfg, clip=0.5)
    schedule = [[6, 4, 9, 3], [5, 5, 8, 2], [7, 3]]  # the last batch has fewer structures
    buckets = [24, 32]
    for k, counts in enumerate(schedule):
        z, pos, batch, energy, forces = molecules(counts, seed=10 + k)
        out_plain = plain.step(z, pos, batch, energy, forces)
        p = pack(z, pos, energy, forces, np.array(counts), bucket_for(sum(counts), buckets), 4, pad_z=1)
        out_packed = packed.step(p.z, p.pos, p.batch, p.energy, p.forces, shape=packed_shape(p), n_atoms=p.n_atoms,
                                 structure_weight=p.structure_weight, atom_weight=p.atom_weight)
        assert float(out_packed.loss) == pytest.approx(float(out_plain.loss), rel=1e-12, abs=1e-14), k
    for a, b in zip(plain_model.parameters(), packed_model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-11)
    for a, b in zip(plain.ema["averaged"], packed.ema["averaged"]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-11)
    assert int(plain.ema["num_averaged"]) == int(packed.ema["num_averaged"]) == 3
    sums_plain, sums_packed = plain.take_sums(), packed.take_sums()
    torch.testing.assert_close(sums_packed, sums_plain, rtol=1e-11, atol=1e-12)
    n_structures = sum(len(c) for c in schedule)
    assert float(sums_plain[SUM_STATES.index("n_structures")]) == n_structures
    assert float(sums_plain[SUM_STATES.index("n_components")]) == 3 * sum(map(sum, schedule))
    assert not packed.sums.any()  # take_sums restarted the accumulator


def test_error_sums_by_hand():
    error = torch.tensor([0.5, -1.0, 7.0], dtype=torch.float64)  # the third structure is padding
    n_atoms = torch.tensor([2, 4, 0])
    force = torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 3.0], [9.0, 9.0, 9.0]], dtype=torch.float64)
    sums = error_sums(error, n_atoms, force, "mse", structure_weight=torch.tensor([1.0, 1.0, 0.0]),
                      atom_weight=torch.tensor([1.0, 1.0, 0.0]))
    expected = [2, 1.5, 1.25, 1.25, 0.25 + 0.25, 0.0625 + 0.0625, 6, 6, 14, 14]
    assert sums.tolist() == pytest.approx(expected)
    # sums added to the epoch metric count as an update: compute() neither warns nor returns a
    # cached value from before them
    import warnings

    from torchmdx.train.metrics import EpochErrors

    metric = EpochErrors("mse")
    metric.add_sums(sums)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = metric.compute()
    metric.add_sums(sums)
    second = metric.compute()
    assert first["forces_mae"] == pytest.approx(1000 * 6 / 6) and second["energy_mae"] == pytest.approx(1000 * 1.5 / 2)
    assert metric.n_structures == 4


def test_in_step_ema_equals_lightning_averaged_model():
    from torch.optim.swa_utils import AveragedModel

    model = ETPotential(TINY)
    averaged = AveragedModel(model, use_buffers=False, avg_fn=_EMAStep(0.9))
    state = averaged_state(model)
    state["decay"] = 0.9
    rng = torch.Generator().manual_seed(0)
    for step in range(14):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=rng, dtype=p.dtype))
        averaged.update_parameters(model)
        skip = torch.tensor(step == 5)  # a skipped (overflowed) step changes nothing ...
        ema_update(state["averaged"], state["current"], state["num_averaged"], state["decay"], skip=skip,
                   averaged_buffers=state["averaged_buffers"], buffers=state["buffers"])
        if step == 5:  # ... so the reference redoes it
            ema_update(state["averaged"], state["current"], state["num_averaged"], state["decay"])
    for a, b in zip(averaged.parameters(), state["averaged"]):
        torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-13)
    assert int(state["num_averaged"]) == int(averaged.n_averaged) == 14


# --------------------------------------------------------------------------- loaders and order
def ani_module(shared_data, tmp_path, **overrides):
    config = {"path": str(shared_data / "ani" / "ani1x_xtb.h5"), "format": "ani1x", "energy_key": "gfn2xtb.energy",
              "forces_key": "gfn2xtb.forces", "train_size": 120, "val_size": 20, "test_size": 20, "batch_size": 16,
              "seed": 0, "cache_dir": str(tmp_path / "cache"), **overrides}
    module = TorchmdxDataModule(config, pack_training=True)
    module.setup("fit")
    return module


def test_device_loader_gives_the_host_loaders_batches_in_the_same_order(shared_data, tmp_path):
    data = ani_module(shared_data, tmp_path)
    train = data.split["train"]
    buckets = atom_buckets(data.dataset._counts[train], 16, seed=0)
    assert len(buckets) >= 2  # molecules of 3-11 atoms
    host = BatchLoader(data.dataset, batch_size=16, shuffle=True, indices=train, pack={"buckets": buckets, "pad_z": 1})
    device = DeviceBatchLoader(data.dataset, train, 16, buckets, 1, "cpu")
    plain = BatchLoader(data.dataset, batch_size=16, shuffle=True, indices=train)
    assert len(device) == len(host) == len(plain) == 8
    for epoch in range(2):
        torch.manual_seed(100 + epoch)
        from_host = list(host)
        after_host = torch.get_rng_state()
        torch.manual_seed(100 + epoch)
        from_device = list(device)
        assert torch.equal(torch.get_rng_state(), after_host)
        torch.manual_seed(100 + epoch)
        from_plain = list(plain)
        for h, d, p in zip(from_host, from_device, from_plain):
            for name in ("z", "pos", "batch", "energy", "forces", "n_atoms", "atom_weight", "structure_weight"):
                assert torch.equal(getattr(h, name), getattr(d, name)), name
            assert (h.real_atoms, h.real_structures, h.pair_bound) == (d.real_atoms, d.real_structures, d.pair_bound)
            n = p.z.shape[0]
            assert torch.equal(d.z[:n], p.z) and torch.equal(d.pos[:n], p.pos) and torch.equal(d.forces[:n], p.forces)
            assert torch.equal(d.energy[:p.num_graphs], p.energy.reshape(-1)) and d.atom_capacity in buckets
    # a new epoch, a new order
    assert not torch.equal(from_device[0].pos, list(device)[0].pos)


def test_packed_device_resident_run_equals_plain_run_cpu(shared_data, tmp_path):
    """Lightning run, float64 on the CPU: packed batches from the device-resident loader through
    the step runner (EMA and error sums inside it) against plain PyG batches through Lightning's
    loop and EMA callback. Same order, same EMA weights, same logged epoch errors."""
    from torchmdx.train.config import build_run_config
    from torchmdx.train.run import train

    import lightning as L

    class Where(L.Callback):
        def on_fit_end(self, trainer, module):
            self.batches = trainer.datamodule.training_batches
            self.stats = module.cuda_graph_stats

    results, where = {}, {}
    for name, extra in (("plain", {}), ("packed", {"cuda_graph": True})):
        values = {
            "data": {"path": str(shared_data / "ani" / "ani1x_xtb.h5"), "format": "ani1x",
                     "energy_key": "gfn2xtb.energy", "forces_key": "gfn2xtb.forces", "train_size": 48,
                     "val_size": 16, "test_size": 16, "batch_size": 8, "seed": 0, "dtype": "float64",
                     "cache_dir": str(tmp_path / "cache"), "device_resident": name == "packed"},
            "model": dict(TINY),
            "train": {"energy_weight": 0.2, "force_weight": 0.8, "lr": 1e-3, "lr_warmup_steps": 4, "ema_decay": 0.9,
                      **extra},
            "trainer": {"max_epochs": 2, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                        "gradient_clip_val": 5.0, "log_every_n_steps": 2},
            "run_dir": str(tmp_path / name),
        }
        where[name] = Where()
        if name == "packed":
            with pytest.warns(UserWarning, match="CUDA graphs need a GPU"):
                result = train(build_run_config(values), callbacks=[where[name]])
        else:
            result = train(build_run_config(values), callbacks=[where[name]])
        state = torch.load(result["checkpoint_last"], map_location="cpu", weights_only=False)
        results[name] = (state["state_dict"], result)
    assert where["plain"].batches is None and where["packed"].batches == "device"
    assert where["packed"].stats["eager_steps"] == 12 and where["packed"].stats["captures"] == 0
    # validation, packed, through the eval runner: 16 structures in batches of 8, in Lightning's
    # sanity check and after each of the 2 epochs
    assert where["packed"].stats["validation"]["eager_steps"] == 6
    plain, packed = results["plain"][0], results["packed"][0]
    assert plain.keys() == packed.keys()
    for key in plain:
        torch.testing.assert_close(packed[key], plain[key], rtol=1e-9, atol=1e-11, msg=key)
    rows, rows_all = {}, {}
    for name in results:
        import csv

        with open(tmp_path / name / "logs" / "csv" / "metrics.csv") as handle:
            rows_all[name] = list(csv.DictReader(handle))
        rows[name] = [r for r in rows_all[name] if r.get("train_forces_mae")]
    assert len(rows["plain"]) == len(rows["packed"]) == 2
    for a, b in zip(rows["plain"], rows["packed"]):
        for key in ("train_forces_mae", "train_energy_mae", "train_loss"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-9), key
    val = {name: [r for r in rows_all[name] if r.get("val_forces_mae")] for name in results}
    assert len(val["plain"]) == len(val["packed"]) == 2
    for a, b in zip(val["plain"], val["packed"]):
        for key in ("val_forces_mae", "val_energy_mae", "val_loss", "val_energy_per_atom_rmse"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-9), key


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_captured_packed_steps_equal_eager_packed_steps_gpu():
    config = {**TINY, "dtype": "float32", "embedding_dimension": 32, "num_heads": 4}
    reference = ETPotential(config).cuda()
    graphed = copy.deepcopy(reference)
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    opt_graph = torch.optim.AdamW(graphed.parameters(), lr=1e-3, fused=True, capturable=True)
    objective = functools.partial(training_objective, JOINT)
    sums = functools.partial(train_error_sums, JOINT)
    eager = GraphedTrainStep(reference, opt_ref, objective, capture=False, error_sums=lambda *a: sums(*a),
                             ema={**averaged_state(reference), "num_averaged": torch.zeros((), dtype=torch.long, device="cuda")})
    captured = GraphedTrainStep(graphed, opt_graph, objective, capture=True, error_sums=lambda *a: sums(*a),
                                ema={**averaged_state(graphed), "num_averaged": torch.zeros((), dtype=torch.long, device="cuda")},
                                max_shapes=3)
    buckets = [40, 56]
    rng = np.random.default_rng(0)
    start = [p.detach().clone() for p in reference.parameters()]
    for k in range(12):
        counts = rng.integers(3, 12, size=int(rng.integers(3, 6)))
        z, pos, batch, energy, forces = molecules(list(counts), seed=k, dtype=torch.float32, device="cuda")
        p = pack(z, pos, energy, forces, counts, bucket_for(int(counts.sum()), buckets), 5, pad_z=1)
        kwargs = dict(shape=packed_shape(p), n_atoms=p.n_atoms, structure_weight=p.structure_weight,
                      atom_weight=p.atom_weight)
        loss_ref = eager.step(p.z, p.pos, p.batch, p.energy, p.forces, **kwargs).loss
        loss = captured.step(p.z, p.pos, p.batch, p.energy, p.forces, **kwargs).loss
        assert float(loss) == pytest.approx(float(loss_ref), rel=1e-4), k
    torch.cuda.synchronize()
    stats = captured.check()
    assert stats["captures"] == 2 and stats["replays"] >= 6 and stats["skipped"] == 0, stats
    for a, b, a0 in zip(reference.parameters(), graphed.parameters(), start):
        assert float((b - a).abs().max()) < 0.05 * 1e-3
        assert float((a - a0).abs().max()) > 0
    for a, b in zip(eager.ema["averaged"], captured.ema["averaged"]):
        assert float((b - a).abs().max()) < 0.05 * 1e-3
    torch.testing.assert_close(captured.take_sums(), eager.take_sums(), rtol=1e-3, atol=1e-6)


def test_ema_average_lives_on_the_training_device():
    """Lightning calls the callback's setup before the strategy moves the module: the average
    must be made on the strategy's device, not the module's device at that moment."""
    from types import SimpleNamespace

    from torchmdx.train.ema import EMA

    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 2)

    module = Module()  # on the CPU, as at Lightning's setup hook
    callback = EMA(0.99)
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")))
    callback.setup(trainer, module, "fit")
    assert callback.average_model.n_averaged.device.type == "meta"
    assert all(p.device.type == "meta" for p in callback.average_model.parameters())
    assert callback._device is None  # the constructor's choice (none) is kept for later runs


@pytest.mark.gpu
def test_captured_validation_equals_eager_validation_gpu():
    from torchmdx.train.graphed_eval import GraphedEvalStep

    model = ETPotential({**TINY, "dtype": "float32", "embedding_dimension": 32, "num_heads": 4}).cuda()
    sums = functools.partial(train_error_sums, JOINT)
    eager = GraphedEvalStep(model, sums, capture=False)
    captured = GraphedEvalStep(model, sums, capture=True)
    rng = np.random.default_rng(1)
    batches = []
    for k in range(4):  # the same validation batches in two epochs
        counts = rng.integers(3, 12, size=5)
        z, pos, batch, energy, forces = molecules(list(counts), seed=50 + k, dtype=torch.float32, device="cuda")
        batches.append(pack(z, pos, energy, forces, counts, bucket_for(int(counts.sum()), [40, 56]), 5, pad_z=1))
    for epoch in range(2):
        for packed in batches:
            eager.step(packed)
            captured.step(packed)
        torch.testing.assert_close(captured.take_sums(), eager.take_sums(), rtol=1e-4, atol=1e-6)
    assert captured.stats["captures"] >= 1 and captured.stats["replays"] >= 4, captured.stats


def test_too_large_for_the_gpu_falls_back_to_the_host_loader_with_one_line(shared_data, tmp_path, monkeypatch, capsys):
    """data.device_resident: auto keeps the splits on the GPU only when they take at most a
    quarter of its free memory; otherwise the host loader packs the batches, and one line says why."""
    data = ani_module(shared_data, tmp_path, device_resident="auto")
    monkeypatch.setattr(type(data), "_training_device", lambda self: (torch.device("cuda"), 1))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 80 * 2**30))  # 1000 bytes free
    assert data.packing_plan() is not None and data.training_batches == "host" and data.training_buckets
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "more than 25% of the 0 MiB free on cuda" in lines[0], lines
    wanted = ani_module(shared_data, tmp_path, device_resident=True)
    monkeypatch.setattr(type(wanted), "_training_device", lambda self: (torch.device("cuda"), 1))
    assert wanted.packing_plan() is not None and wanted.training_batches == "host"
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("data.device_resident:") and "MiB" in lines[0]
    assert "training batches come from the host loader" in lines[0]
    roomy = ani_module(shared_data, tmp_path, device_resident="auto")
    monkeypatch.setattr(type(roomy), "_training_device", lambda self: (torch.device("cuda"), 1))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 2**30, 80 * 2**30))
    assert roomy.packing_plan() is not None and roomy.training_batches == "device"


class EvalStandIn:
    """GraphedEvalStep's GPU parts on the CPU: 'capture' records which batch shape it froze,
    'replay' runs the step eagerly with the capacity fixed at capture."""

    @staticmethod
    def make(model, sums):
        from torchmdx.train.graphed_eval import GraphedEvalStep

        class StandIn(GraphedEvalStep):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.enabled = True  # as on a GPU
                self.captured = []

            def _eager(self, graph):
                self._compute(graph)

            def _capture(self, graph):
                self.captured.append((graph.inputs["z"].shape[0], graph.capacity))
                return ("frozen", graph.capacity)

            def _replay(self, graph):
                assert graph.graph == ("frozen", graph.capacity)
                self._compute(graph)

        return StandIn(model, sums, capture=True, max_shapes=2)


def test_validation_runner_warms_up_captures_replays_and_recaptures_cpu():
    """Per shape: one eager step, then capture and replays; a batch with more possible pairs
    than the graph holds recaptures with room for them; the sums equal an eager runner's."""
    from torchmdx.train.graphed_eval import GraphedEvalStep

    model = ETPotential(TINY)
    sums = functools.partial(train_error_sums, JOINT)
    runner = EvalStandIn.make(model, sums)
    eager = GraphedEvalStep(model, sums, capture=False)
    schedule = [[6, 5], [4, 6], [3, 5], [7, 7], [4, 4], [9, 9, 9]]
    for k, counts in enumerate(schedule):
        z, pos, batch, energy, forces = molecules(counts, seed=70 + k)
        p = pack(z, pos, energy, forces, np.array(counts), bucket_for(sum(counts), [16, 40]), 3, pad_z=1)
        runner.step(p)
        eager.step(p)
    # bucket 16: eager, capture + replay, replay; the 4th batch's 84 possible pairs exceed the
    # graph's 64 rows: a new graph (eager once more, then capture + replay); bucket 40: eager
    assert runner.stats == {"captures": 2, "replays": 3, "eager_steps": 3}, runner.stats
    from torchmdx.train.graphed import round_capacity

    assert runner.captured == [(16, round_capacity(6 * 5 + 5 * 4)), (16, round_capacity(7 * 6 * 2))]
    torch.testing.assert_close(runner.take_sums(), eager.take_sums(), rtol=1e-12, atol=1e-12)
