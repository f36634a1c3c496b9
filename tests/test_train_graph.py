"""The CUDA-graph training step (torchmdx.train.graphed, ``train.cuda_graph``).

CPU:
- config: the option, its headroom and the combinations it refuses (one-line errors);
- the step function itself (fixed-capacity list with masked padding rows, gradients zeroed in
  place, loss, clipping, optimiser step), run eagerly in float64, gives the same parameters as
  Lightning's eager step (exact list, gradients set to None, Lightning's clipping);
- the host decisions (warm-up, capture, replay, new shapes, capacity growth, recapture after an
  optimiser-state change, overflow check with redo, the fallbacks) on a recording subclass;
- a run with ``cuda_graph: true`` on the CPU trains eagerly, says so, and logs exactly what the
  run without the option logs;
- Lightning drives the graphed path (its steps standing in on the CPU): warm-up, capture and
  replay counts over two batch shapes and three epochs, no recapture, the eager run's metrics.
GPU (``@pytest.mark.gpu``):
- N graphed steps give the parameters of N eager steps (plain AdamW, exact list), for the torch
  and the fused message path, with a learning rate changing every step, active clipping and a
  second batch shape;
- an overflowing step is a no-op inside the graph (weights bit-identical) and check() redoes it:
  the run ends with the eager run's parameters;
- Lightning training with ``cuda_graph: true`` replays graphs and logs the eager run's losses.
"""

import copy
import csv
import functools
import math

import numpy as np
import pytest
import torch
import yaml

from torchmdx.errors import ConfigError
from torchmdx.nn import ETPotential
from torchmdx.train.config import TrainConfig, build_run_config
from torchmdx.train.graphed import GraphedTrainStep, batch_shape, round_capacity, shape_from_counts
from torchmdx.train.module import training_objective

TINY = {"embedding_dimension": 16, "num_layers": 2, "num_heads": 2, "num_rbf": 8, "cutoff_upper": 4.0,
        "backend": "torch", "seed": 0}
JOINT = TrainConfig(energy_weight=0.2, force_weight=0.8)


def molecules(counts, seed=0, box=7.0, min_distance=0.9, dtype=torch.float64, device="cpu"):
    """Random molecules: H/C/N/O atoms uniform in a box, no two closer than ``min_distance`` Å;
    random reference energies [B] and forces [N, 3]. Returns z, pos, batch, energy, forces."""
    rng = np.random.default_rng(seed)
    z, pos, batch = [], [], []
    for b, n in enumerate(counts):
        while True:
            p = rng.uniform(0.0, box, (n, 3))
            d = np.linalg.norm(p[:, None] - p[None], axis=-1) + np.eye(n) * 1e3
            if d.min() > min_distance:
                break
        z.append(rng.choice([1, 6, 7, 8], n))
        pos.append(p)
        batch.append(np.full(n, b))
    t = lambda a, dt: torch.tensor(np.concatenate(a), dtype=dt, device=device)  # noqa: E731
    n_total = sum(counts)
    return (t(z, torch.long), t(pos, dtype), t(batch, torch.long),
            torch.tensor(rng.normal(size=len(counts)), dtype=dtype, device=device),
            torch.tensor(rng.normal(size=(n_total, 3)), dtype=dtype, device=device))


def eager_step(model, optimizer, cfg, z, pos, batch, energy, forces, clip, forces_on=True):
    """What Lightning's automatic optimisation does for one batch: grads set to None, the model's
    own (exact) neighbor list, loss, backward, clip_grad_norm_, optimizer.step().
    Returns (loss, gradient norm before clipping)."""
    optimizer.zero_grad()
    structures = int(energy.shape[0])
    out = model(z, pos, batch, forces=forces_on, create_graph=forces_on, num_structures=structures)
    n_atoms = torch.bincount(batch, minlength=structures)
    loss, _, _ = training_objective(cfg, out["energy"], out.get("forces"), energy, forces if forces_on else None, n_atoms)
    loss.backward()
    grads = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(grads, clip if clip is not None else math.inf)
    optimizer.step()
    return loss.detach(), float(norm)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------------------------- config
def config_values(**train):
    return {"data": {"path": "unused.npz"}, "model": dict(TINY), "train": train,
            "trainer": {"devices": 1, "accelerator": "cpu"}}


def test_config_option_and_what_it_refuses():
    cfg = build_run_config(config_values(), check_data=False)
    assert cfg.train.cuda_graph == "auto" and cfg.train.cuda_graph_pair_headroom == 1.1
    cfg = build_run_config(config_values(cuda_graph=True, cuda_graph_pair_headroom=None), check_data=False)
    assert cfg.train.cuda_graph is True and cfg.train.cuda_graph_pair_headroom is None
    cases = [
        (dict(cuda_graph=True), {"accumulate_grad_batches": 2}, "accumulate_grad_batches 2"),
        # several devices are fine (DDP: tests/test_train_graph_ddp.py), but not several nodes
        (dict(cuda_graph=True), {"num_nodes": 2}, "needs one node"),
        (dict(cuda_graph=True, stress_weight=1.0), {"devices": 2}, "cannot train on stress"),
        (dict(cuda_graph=True, cuda_graph_pair_headroom=0.9), {}, "must be >= 1"),
        (dict(cuda_graph="yes"), {}, "cuda_graph"),
    ]
    for train, trainer, expected in cases:
        values = config_values(**train)
        values["trainer"].update(trainer)
        with pytest.raises(ConfigError) as info:
            build_run_config(values, check_data=False)
        message = str(info.value)
        assert expected in message and "\n" not in message, message
    # a compile setting without captured steps is said in one warning line (not an error: the
    # ET-MD17 recipe sets background, and --set train.cuda_graph=false must still run)
    for compile_setting in (True, "background"):
        with pytest.warns(UserWarning, match=r"^train.cuda_graph_compile: (true|background) has no effect with "
                                             r"train.cuda_graph: false[^\n]*$"):
            build_run_config(config_values(cuda_graph=False, cuda_graph_compile=compile_setting), check_data=False)
    # gradient accumulation and several devices are fine without the option
    values = config_values()
    values["trainer"].update(devices=2, accumulate_grad_batches=2)
    build_run_config(values, check_data=False)


def test_cuda_graph_auto_is_on_only_for_one_process_on_one_gpu(monkeypatch):
    """``train.cuda_graph: auto`` (the default): on with one CUDA GPU in one process, off on the
    CPU, with several devices or nodes, an explicit CPU accelerator or gradient accumulation;
    never refused. true / false stay as given."""
    from torchmdx.train.config import resolve_cuda_graph

    assert TrainConfig().cuda_graph == "auto"
    visible = {"available": False, "count": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible["available"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible["count"])

    def resolved(train=None, **trainer):
        values = config_values(**(train or {}))
        values["trainer"].update({"accelerator": "auto", **trainer})  # never refused (build_run_config checks)
        return resolve_cuda_graph(build_run_config(values, check_data=False))

    assert resolved() is False  # no GPU
    assert resolved(dict(cuda_graph=True)) is True and resolved(dict(cuda_graph=False)) is False
    visible.update(available=True, count=1)
    assert resolved(devices="auto") is True and resolved(devices=1) is True
    assert resolved(devices=[0]) is True and resolved(devices=-1) is True
    assert resolved(dict(cuda_graph=False)) is False
    assert resolved(accelerator="cpu") is False
    assert resolved(accumulate_grad_batches=2) is False
    assert resolved(num_nodes=2) is False
    visible.update(count=2)
    assert resolved(devices="auto") is False and resolved(devices=-1) is False
    assert resolved(devices=2, strategy="ddp") is False and resolved(devices=[0, 1]) is False
    assert resolved(devices=1) is True and resolved(devices=[1]) is True
    # architectures whose captured step has not been checked on a GPU stay eager under auto
    from torchmdx.nn.config import ARCHITECTURES, potential_class_of

    for architecture in ARCHITECTURES:
        wanted = potential_class_of({"architecture": architecture}).captured_training_auto
        assert wanted is (architecture in ("et", "equiformer", "gatr", "transformer")), architecture
        values = config_values()
        values["model"] = {"architecture": architecture}
        values["trainer"].update(accelerator="auto", devices=1)
        assert resolve_cuda_graph(build_run_config(values, check_data=False)) is wanted, architecture


def test_shapes_and_capacities():
    shape = shape_from_counts([21, 21, 5])
    assert (shape.atoms, shape.structures, shape.pair_bound, shape.periodic) == (47, 3, 2 * 21 * 20 + 5 * 4, False)
    assert round_capacity(0) == 64 and round_capacity(64) == 64 and round_capacity(65) == 128

    class Batch:  # the attributes batch_shape reads from a PyG batch
        pass

    batch = Batch()
    batch.ptr = torch.tensor([0, 3, 7])
    batch.pos = torch.zeros(7, 3)
    batch.cell = torch.zeros(2, 3, 3)
    batch.pbc = torch.zeros(2, 3, dtype=torch.bool)
    assert batch_shape(batch) == shape_from_counts([3, 4])
    batch.pbc = torch.tensor([[False] * 3, [True, False, False]])
    assert batch_shape(batch).periodic is False  # remembered on the batch object
    del batch._torchmdx_shape
    assert batch_shape(batch).periodic is True


# ------------------------------------------------------------------------- the step function on the CPU
@pytest.mark.parametrize("mode", ["forces", "energy_per_atom_huber", "forces_traced", "forces_only", "forces_only_traced"])
def test_step_function_equals_lightning_eager_step_cpu_float64(mode):
    """... also with the model, forces and parameter gradients as one traced, compiled graph
    (``traced=True``, what ``train.cuda_graph_compile`` captures), and force-only (the PolyGET
    objective: energy weight 0, the energy never in the loss)."""
    forces_on = mode.startswith("forces")
    if mode.startswith("forces_only"):
        cfg = TrainConfig(energy_weight=0.0, force_weight=1.0)
    else:
        cfg = JOINT if forces_on else TrainConfig(energy_weight=1.0, force_weight=0.0, loss="huber",
                                                 energy_loss="per_atom", huber_delta=0.05)
    reference = ETPotential({**TINY, "dtype": "float64"})
    graphed = ETPotential({**TINY, "dtype": "float64"})
    graphed.load_state_dict(reference.state_dict())
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.01)
    opt_graph = torch.optim.AdamW(graphed.parameters(), lr=1e-3, weight_decay=0.01)
    clip = 1e-3  # small: clipping is active at every step (checked below)
    runner = GraphedTrainStep(graphed, opt_graph, functools.partial(training_objective, cfg), forces=forces_on,
                              clip_value=clip, traced=mode.endswith("_traced"))
    assert not runner.enabled and runner.disabled_reason == "the model is on cpu"
    start = [p.detach().clone() for p in reference.parameters()]
    norms = []
    for k, counts in enumerate([[5, 7, 4], [5, 7, 4], [6, 6, 4], [3, 9]]):
        z, pos, batch, energy, forces = molecules(counts, seed=k)
        lr = 1e-3 * (k + 1) / 4
        set_lr(opt_ref, lr)
        set_lr(opt_graph, lr)
        loss_ref, norm = eager_step(reference, opt_ref, cfg, z, pos, batch, energy, forces, clip, forces_on)
        norms.append(norm)
        out = runner.step(z, pos, batch, energy, forces if forces_on else None)
        assert float(out.loss) == pytest.approx(float(loss_ref), rel=1e-12)
        assert bool(out.overflow) is False
        assert out.n_atoms.tolist() == counts
    assert min(norms) > clip  # every step was clipped ...
    assert runner.stats["eager_steps"] == 4
    if runner.traced is not None:
        assert runner.traced.traces == 2  # two batch shapes, each through its own traced graph
    moved = 0.0
    for p_ref, p_graph, p0 in zip(reference.parameters(), graphed.parameters(), start):
        torch.testing.assert_close(p_graph, p_ref, rtol=1e-11, atol=1e-13)
        moved = max(moved, float((p_ref - p0).detach().abs().max()))
    assert moved > 1e-4  # ... and the parameters did move


# ------------------------------------------------------------------------- host decisions
class RecordingStep(GraphedTrainStep):
    """GraphedTrainStep's host decisions without a GPU: eager steps, captures and replays are
    recorded instead of run; eager steps report ``pairs`` found."""

    def __init__(self, *args, pairs=100, **kwargs):
        super().__init__(*args, **kwargs)
        self.enabled, self.disabled_reason, self.guarded = True, None, True
        self.calls = []
        self.pairs = pairs

    def _eager(self, graph, capacity, count_warmup=True):
        self.calls.append(("eager", graph.key, capacity))
        graph.max_pairs = max(graph.max_pairs, self.pairs)
        graph.pair_ratio = max(graph.pair_ratio, self.pairs / max(graph.last_bound, 1))
        graph.eager_steps += int(count_warmup)
        self.stats["eager_steps"] += 1

    def _capture(self, graph):
        self.calls.append(("capture", graph.key, graph.capacity))
        graph.graph = "captured"
        self._binding_labels = []
        self._bindings = self._current_bindings(self._binding_labels)
        self.stats["captures"] += 1

    def _replay(self, graph):
        self.calls.append(("replay", graph.key))
        self.stats["replays"] += 1


def recording_step(**kwargs):
    model = ETPotential(TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return RecordingStep(model, optimizer, functools.partial(training_objective, JOINT), **kwargs), model


def run_shape(runner, counts):
    shape = shape_from_counts(counts)
    n = shape.atoms
    z = torch.ones(n, dtype=torch.long)
    batch = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    assert runner.accepts(shape)
    runner.calls.clear()
    runner.step(z, torch.zeros(n, 3), batch, torch.zeros(len(counts)), torch.zeros(n, 3), shape=shape)
    return list(runner.calls)


def test_warmup_capture_replay_shapes_and_growth():
    runner, model = recording_step(max_shapes=2)
    a = (20, 2, False)
    assert run_shape(runner, [10, 10]) == [("eager", a, 192)]  # bound 180 -> capacity 192
    assert run_shape(runner, [10, 10]) == [("eager", a, 192)]
    assert run_shape(runner, [10, 10]) == [("capture", a, 192), ("replay", a)]
    assert run_shape(runner, [12, 8]) == [("replay", a)]  # bound 188 fits
    assert run_shape(runner, [5]) == [("eager", (5, 1, False), 64)]  # a second shape (e.g. an epoch's last batch)
    assert run_shape(runner, [10, 10]) == [("replay", a)]
    # same shape, more possible pairs than the graph holds: one eager step, then a larger graph
    assert run_shape(runner, [15, 5]) == [("eager", a, 256)]  # bound 230
    assert run_shape(runner, [10, 10]) == [("capture", a, 256), ("replay", a)]  # max(230, 1.25 x 192) -> 256
    # a gradient tensor replaced outside the graph (e.g. zero_grad(set_to_none=True)): recapture
    next(model.parameters()).grad = torch.zeros_like(next(model.parameters()))
    with pytest.warns(RuntimeWarning, match="parameter 0's gradient changed since capture .*: recapturing"):
        assert run_shape(runner, [10, 10]) == [("eager", a, 192)]
    assert run_shape(runner, [10, 10]) == [("capture", a, 256), ("replay", a)]
    assert runner.accepts(shape_from_counts([10, 10]))
    # a third distinct shape with max_shapes=2: graphs off for the rest of the run
    with pytest.warns(RuntimeWarning, match="more than 2 distinct batch shapes"):
        assert not runner.accepts(shape_from_counts([7, 7]))
    assert not runner.accepts(shape_from_counts([10, 10]))
    assert runner.disabled_reason is not None and not runner._graphs
    assert runner.stats["captures"] == 3


def test_periodic_batches_are_shapes_of_their_own():
    """A periodic batch takes cell inputs: its graph is not the molecules' graph of the same sizes
    (the periodic step itself: tests/test_packing_periodic.py)."""
    runner, _ = recording_step(max_shapes=2)
    assert run_shape(runner, [10, 10]) == [("eager", (20, 2, False), 192)]
    periodic = shape_from_counts([10, 10], periodic=True)
    assert runner.accepts(periodic)
    z, batch = torch.ones(20, dtype=torch.long), torch.repeat_interleave(torch.arange(2), 10)
    with pytest.raises(ValueError, match="periodic batch shape needs cell and pbc"):
        runner.step(z, torch.zeros(20, 3), batch, torch.zeros(2), torch.zeros(20, 3), shape=periodic)
    runner.calls.clear()
    runner.step(z, torch.zeros(20, 3), batch, torch.zeros(2), torch.zeros(20, 3), shape=periodic,
                cell=torch.eye(3).expand(2, 3, 3) * 10.0, pbc=torch.ones(2, 3, dtype=torch.bool))
    assert runner.calls == [("eager", (20, 2, True), 192)]  # Σ n(n-1) bounds minimum-image pairs too
    assert set(runner._graphs) == {(20, 2, False), (20, 2, True)}
    assert set(runner._graphs[(20, 2, True)].inputs) >= {"cell", "pbc"}


def test_overflow_check_grows_capacity_and_redoes_the_latest_step():
    runner, _ = recording_step(pair_headroom=1.1, pairs=100)
    a = (20, 2, False)
    # warm-up: the exact list first (the bound would be mostly padding), then the chosen capacity
    assert run_shape(runner, [10, 10]) == [("eager", a, None)]
    assert run_shape(runner, [10, 10]) == [("eager", a, 128)]
    assert run_shape(runner, [10, 10]) == [("capture", a, 128), ("replay", a)]  # 1.1 x 100 -> 128 (bound 180)
    assert runner.check()["skipped"] == 0 and runner.calls[-1] == ("replay", a)  # nothing overflowed
    # the latest step overflowed (150 pairs): capacity grown, that step redone eagerly (exact list)
    runner.status.copy_(torch.tensor([1, 1, 150]))
    runner.calls.clear()
    stats = runner.check()
    assert runner.calls == [("eager", a, None)]
    assert (stats["skipped"], stats["redone"], stats["lost"]) == (1, 1, 0)
    assert runner._graphs[a].capacity == 192 and runner._graphs[a].graph is None
    assert int(runner.status[1]) == 0
    # two more overflowed steps between check points, the latest fine: not redone, said once
    runner.status.copy_(torch.tensor([3, 0, 150]))
    runner.calls.clear()
    with pytest.warns(RuntimeWarning, match=r"2 step\(s\) overflowed the neighbor capacity and were skipped"):
        stats = runner.check()
    assert runner.calls == [] and (stats["skipped"], stats["redone"], stats["lost"]) == (3, 1, 2)


def test_a_batch_predicted_to_overflow_grows_the_capacity_first():
    """pair_headroom: the pairs / bound ratio of the eager steps predicts a batch's pairs from its
    (host) bound; a batch predicted above the capacity recaptures with room instead of being
    skipped in the graph."""
    runner, _ = recording_step(pair_headroom=1.1, pairs=100)
    a = (20, 2, False)
    run_shape(runner, [10, 10])
    run_shape(runner, [10, 10])
    assert run_shape(runner, [10, 10]) == [("capture", a, 128), ("replay", a)]  # ratio 100 / 180
    assert run_shape(runner, [12, 8]) == [("replay", a)]  # bound 188: 105 expected pairs fit 128
    # bound 308: 0.556 x 308 = 172 expected > 128: one eager step at 1.1 x 172 -> 192, then a graph
    assert run_shape(runner, [18, 2]) == [("eager", a, 192)]
    assert runner.stats["grown_ahead"] == 1
    assert run_shape(runner, [10, 10]) == [("capture", a, 192), ("replay", a)]
    assert runner.check()["skipped"] == 0


# ------------------------------------------------------------------------- Lightning on the CPU
def write_config(path, shared_data, run_dir, train=None, model=None, trainer=None, data=None):
    config = {
        "data": {"path": str(shared_data / "md17" / "md17_ethanol_xtb.npz"), "cache_dir": str(path.parent / "cache"),
                 "train_size": 44, "val_size": 8, "test_size": 8, "batch_size": 8, **(data or {})},
        "model": {**TINY, **(model or {})},
        "train": {"energy_weight": 0.2, "force_weight": 0.8, "lr": 2e-3, "lr_warmup_steps": 3,
                  "lr_schedule": "cosine", "lr_min": 1e-4, "early_stopping_patience": None, **(train or {})},
        "trainer": {"max_epochs": 3, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                    "num_sanity_val_steps": 0, "log_every_n_steps": 2, **(trainer or {})},
        "run_dir": str(run_dir),
    }
    path.write_text(yaml.safe_dump(config))
    return path


def fit(config_path):
    """Train as ``torchmdx train`` does (without the final export) and return the module."""
    from torchmdx.train.config import load_run_config
    from torchmdx.train.run import build_trainer, prepare

    cfg = load_run_config(config_path)
    datamodule, module = prepare(cfg, run_dir=None)
    trainer = build_trainer(cfg, __import__("pathlib").Path(cfg.run_dir))
    trainer.fit(module, datamodule=datamodule)
    return module


def epoch_values(run_dir) -> dict:
    """metrics.csv -> {epoch: {metric: value}} (epoch-level values only)."""
    out: dict = {}
    for row in metric_rows(run_dir):
        for key, value in row.items():
            if key not in ("epoch", "step") and not key.endswith("_step"):
                out.setdefault(int(row["epoch"]), {})[key] = float(value)
    return out


def metric_rows(run_dir):
    with open(run_dir / "logs" / "csv" / "metrics.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory, shared_data):
    base = tmp_path_factory.mktemp("eager")
    return fit(write_config(base / "eager.yaml", shared_data, base / "run")), base / "run"


def test_cpu_run_with_cuda_graph_trains_eagerly_and_says_so(tmp_path, shared_data, eager_run):
    plain, plain_dir = eager_run
    with pytest.warns(UserWarning, match="CUDA graphs need a GPU, training eagerly"):
        graphed = fit(write_config(tmp_path / "graph.yaml", shared_data, tmp_path / "graph", train={"cuda_graph": True}))
    assert graphed.cuda_graph_stats is None and plain.cuda_graph_stats is None
    rows_plain, rows_graph = metric_rows(plain_dir), metric_rows(tmp_path / "graph")
    assert rows_graph == rows_plain and any("train_loss" in row for row in rows_plain)
    for p, q in zip(plain.model.parameters(), graphed.model.parameters()):
        assert torch.equal(p, q)


class StandIn(GraphedTrainStep):
    """GraphedTrainStep with the GPU parts standing in on the CPU: 'capture' records the bindings,
    'replay' runs the captured step function eagerly with the graph's capacity."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.enabled, self.disabled_reason = True, None

    def _eager(self, graph, capacity, count_warmup=True):
        out, pairs = self._compute(graph.inputs, capacity)
        graph.max_pairs = max(graph.max_pairs, int(pairs))
        graph.eager_steps += int(count_warmup)
        self.stats["eager_steps"] += 1
        return out

    def _capture(self, graph):
        graph.graph = "captured"
        self._binding_labels = []
        self._bindings = self._current_bindings(self._binding_labels)
        self.stats["captures"] += 1

    def _replay(self, graph):
        self.stats["replays"] += 1
        out, _ = self._compute(graph.inputs, graph.capacity)
        return out


def test_lightning_drives_the_graphed_step_cpu(tmp_path, shared_data, eager_run, monkeypatch):
    """The module's wiring (shapes from the CPU batch, optimizer_step replaying instead of
    stepping, no zero_grad / validation zero_grad on the graphs' gradients, checks at logging
    points, a second batch shape) with the step standing in on the CPU: the expected warm-up,
    capture and replay counts, no recapture, and the eager run's metrics."""
    import torchmdx.train.graphed as graphed_module
    from torchmdx.train.module import PotentialModule

    monkeypatch.setattr(graphed_module, "GraphedTrainStep", StandIn)
    monkeypatch.setattr(PotentialModule, "_cuda_graph_mode", lambda self: bool(self.train_config.cuda_graph))
    plain, plain_dir = eager_run
    graphed = fit(write_config(tmp_path / "graph.yaml", shared_data, tmp_path / "graph", train={"cuda_graph": True}))
    stats = graphed.cuda_graph_stats
    # 44 training structures in batches of 8 -> shapes (8 molecules) and (4 molecules); 3 epochs: the
    # first shape runs 2 eager steps, then 13 replays; the second 2 eager steps, then 1 replay
    assert (stats["captures"], stats["replays"], stats["eager_steps"]) == (2, 14, 4), stats
    assert stats["skipped"] == 0 and not stats["notes"], stats
    assert_same_epochs(epoch_values(plain_dir), epoch_values(tmp_path / "graph"), rel=1e-4)


def assert_same_epochs(eager, graphed, rel):
    assert sorted(eager) == sorted(graphed) == [0, 1, 2]
    for epoch in eager:
        keys = ("train_loss", "train_forces_mae", "train_energy_mae", "val_loss", "val_forces_mae", "val_energy_mae", "lr")
        for key in keys:
            a, b = eager[epoch][key], graphed[epoch][key]
            assert math.isclose(b, a, rel_tol=rel), (epoch, key, b, a)


# ------------------------------------------------------------------------- GPU
ET_SMALL = {"embedding_dimension": 128, "num_layers": 2, "num_heads": 8, "num_rbf": 32, "rbf_type": "expnorm",
            "activation": "silu", "attn_activation": "silu", "neighbor_embedding": True, "distance_influence": "both",
            "vector_cutoff": True, "cutoff_upper": 5.0, "max_z": 100, "dtype": "float32", "seed": 0}


def gpu_pair(backend):
    reference = ETPotential({**ET_SMALL, "backend": backend}).cuda()
    graphed = ETPotential({**ET_SMALL, "backend": backend}).cuda()
    graphed.load_state_dict(reference.state_dict())
    return reference, graphed


def assert_same_training(reference, graphed, start, lr, label, inert=None):
    """Parameters after the same steps: differences far below one AdamW update (lr), the
    update itself reproduced to 1e-3 of its norm. ``inert``: {name: bool mask} of entries the
    energy does not depend on (an attention key bias: softmax is shift-invariant), left out: their
    gradients are round-off, which AdamW scales up to lr-sized steps that differ run to run."""
    diffs, updates = [], []
    for (name, p_ref), p_graph, p0 in zip(reference.named_parameters(), graphed.parameters(), start):
        if inert and name in inert:
            keep = ~inert[name].to(p_ref.device)
            p_ref, p_graph, p0 = p_ref[keep], p_graph[keep], p0[keep]
        if p_ref.numel() == 0:
            continue  # every entry inert (e.g. GATr's mv_to_s: a point has no grade-0 part)
        diffs.append((p_graph - p_ref).flatten())
        updates.append((p_ref - p0).flatten())
        worst = float((p_graph - p_ref).abs().max())
        assert worst < 0.05 * lr, f"{label}: {name} differs by {worst:.3g} (lr {lr})"
    diff, update = torch.cat(diffs).norm(), torch.cat(updates).norm()
    assert float(update) > 0
    assert float(diff) < 1e-3 * float(update), (label, float(diff), float(update))


def captured_against_eager(reference, graphed, label, atoms=12, structures=8, short=5, box=8.0, cfg=JOINT):
    """Nine AdamW steps of ``reference`` eagerly and of its copy ``graphed`` through a
    GraphedTrainStep (float32, CUDA), clipping active (half the first step's gradient norm,
    measured on a throw-away copy), a second batch shape in the middle (``short`` molecules),
    the learning rate changed each step; every step's loss compared. Returns
    (runner, its checked stats, the parameters before, the last learning rate)."""
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.01)
    opt_graph = torch.optim.AdamW(graphed.parameters(), lr=1e-3, weight_decay=0.01, fused=True, capturable=True)
    probe = copy.deepcopy(reference)
    _, norm0 = eager_step(probe, torch.optim.AdamW(probe.parameters()), cfg,
                          *molecules([atoms] * structures, seed=0, box=box, dtype=torch.float32, device="cuda"), None)
    clip = 0.5 * norm0
    del probe
    runner = GraphedTrainStep(graphed, opt_graph, functools.partial(training_objective, cfg), clip_value=clip)
    start = [p.detach().clone() for p in reference.parameters()]
    full, short = [atoms] * structures, [atoms] * short
    schedule = [full] * 6 + [short] + [full] * 2  # a second shape in the middle
    norms, lr = [], 1e-3
    for k, counts in enumerate(schedule):
        z, pos, batch, energy, forces = molecules(counts, seed=k, box=box, dtype=torch.float32, device="cuda")
        lr = 1e-3 * (1.0 - 0.05 * k)
        set_lr(opt_ref, lr)
        set_lr(opt_graph, lr)
        loss_ref, norm = eager_step(reference, opt_ref, cfg, z, pos, batch, energy, forces, clip)
        norms.append(norm)
        out = runner.step(z, pos, batch, energy, forces)
        assert float(out.loss) == pytest.approx(float(loss_ref), rel=1e-4), (label, k)
    assert max(norms) > clip, norms  # clipping was active in some steps
    torch.cuda.synchronize()
    return runner, runner.check(), start, lr


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_graphed_steps_equal_eager_steps_gpu(backend):
    reference, graphed = gpu_pair(backend)
    _, stats, start, lr = captured_against_eager(reference, graphed, backend)
    # shape (96, 8): 2 eager steps, then 6 replays (the first right after capture); shape (60, 5): 1 eager
    assert (stats["captures"], stats["replays"], stats["eager_steps"]) == (1, 6, 3), stats
    assert stats["skipped"] == 0
    assert_same_training(reference, graphed, start, lr, backend)


@pytest.mark.gpu
def test_graphed_force_only_steps_equal_eager_steps_gpu():
    """The PolyGET objective (energy weight 0) through the captured step."""
    reference, graphed = gpu_pair("torch")
    _, stats, start, lr = captured_against_eager(reference, graphed, "force-only",
                                                 cfg=TrainConfig(energy_weight=0.0, force_weight=1.0))
    assert (stats["captures"], stats["replays"], stats["eager_steps"]) == (1, 6, 3), stats
    assert_same_training(reference, graphed, start, lr, "force-only")


@pytest.mark.gpu
def test_overflowed_step_is_skipped_in_the_graph_and_redone_gpu():
    reference, graphed = gpu_pair("torch")
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    opt_graph = torch.optim.AdamW(graphed.parameters(), lr=1e-3, fused=True, capturable=True)
    runner = GraphedTrainStep(graphed, opt_graph, functools.partial(training_objective, JOINT), pair_headroom=1.2)
    start = [p.detach().clone() for p in reference.parameters()]
    counts = [12] * 8
    batches = [molecules(counts, seed=k, box=9.0, dtype=torch.float32, device="cuda") for k in range(5)]
    dense = molecules(counts, seed=10, box=4.5, min_distance=0.5, dtype=torch.float32, device="cuda")
    batches.insert(3, dense)  # step 4: far more pairs within 5 Å than the graph's capacity
    for k, (z, pos, batch, energy, forces) in enumerate(batches):
        eager_step(reference, opt_ref, JOINT, z, pos, batch, energy, forces, None)
        before = [p.detach().clone() for p in graphed.parameters()]
        moments = [opt_graph.state[p]["exp_avg"].clone() for p in graphed.parameters() if p in opt_graph.state]
        out = runner.step(z, pos, batch, energy, forces)
        if k == 3:
            assert bool(out.overflow)
            # inside the graph the overflowed step changed nothing: weights and moments bit-identical
            assert all(torch.equal(p, q) for p, q in zip(graphed.parameters(), before))
            assert all(torch.equal(opt_graph.state[p]["exp_avg"], m)
                       for p, m in zip([p for p in graphed.parameters() if p in opt_graph.state], moments))
            stats = runner.check()  # a logging point right after it: grown and redone
            assert (stats["skipped"], stats["redone"], stats["lost"]) == (1, 1, 0), stats
            assert not all(torch.equal(p, q) for p, q in zip(graphed.parameters(), before))
        else:
            assert not bool(out.overflow), k
    stats = runner.check()
    assert stats["captures"] == 2 and stats["skipped"] == 1, stats
    capacity = runner._graphs[(96, 8, False)].capacity
    assert capacity <= round_capacity(8 * 12 * 11)
    assert_same_training(reference, graphed, start, 1e-3, "overflow")


@pytest.mark.gpu
def test_lightning_training_with_cuda_graph_matches_eager_gpu(tmp_path, shared_data):
    data = shared_data / "md17" / "md17_aspirin_xtb.npz"
    if not data.is_file():
        pytest.skip(f"{data} not found")
    common = dict(data={"path": str(data)}, trainer={"accelerator": "gpu"}, model={"cutoff_upper": 5.0})
    eager = fit(write_config(tmp_path / "eager.yaml", shared_data, tmp_path / "eager", **common))
    graphed = fit(write_config(tmp_path / "graph.yaml", shared_data, tmp_path / "graph",
                               train={"cuda_graph": True}, **common))
    stats = graphed.cuda_graph_stats
    # 44 training structures in batches of 8, packed: the last batch of each epoch (4 molecules)
    # pads into the one bucket of 8 x 21 atoms, so 3 epochs x 6 steps are 2 eager steps, one
    # capture and 16 replays; the validation batches replay graphs too
    assert (stats["captures"], stats["replays"], stats["eager_steps"]) == (1, 16, 2), stats
    assert stats["skipped"] == 0 and not stats["notes"], stats
    assert stats["validation"]["captures"] >= 1 and stats["validation"]["replays"] >= 1, stats
    assert_same_epochs(epoch_values(tmp_path / "eager"), epoch_values(tmp_path / "graph"), rel=1e-3)
