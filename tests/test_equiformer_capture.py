"""Equiformer in the graph-capturing paths, on the CPU in float64:

- the whole training step's model part (forward with a fixed-capacity neighbor list, forces with
  create_graph, the training objective, the parameter gradients by the double backward) traces
  with static shapes under ``make_fx`` with fake tensors, where any host read (``.item()``,
  ``bool(tensor)``), data-dependent shape (``nonzero``, boolean-mask indexing) or Python branch
  on a tensor value raises; the traced graph run on real tensors gives the eager loss and
  gradients. That is what a CUDA-graph capture of the step needs (``torchmdx.train.graphed``);
  the element and overlap checks are the host reads a capture skips by itself (on CUDA).
- the whole-model traced graph (``nn.traced.TracedForces``) holds no tensor constants: a
  constant made on the host (``x[:, 2] = 1.0`` lifts a CPU scalar tensor) would be a host
  tensor inside a CUDA graph;
- the traced graph compiled by inductor (the ``compile: whole`` path) gives the eager energies
  and forces (slow: ~1 min of C++ compilation).
"""

import pytest
import torch
from ase.build import molecule

import torchmdx
from torchmdx.kernels.neighbors import Neighbors, neighbor_list
from torchmdx.nn.traced import TracedForces

from test_equiformer import TINY, float64_default

F64 = torch.float64


def tiny(**overrides):
    model = torchmdx.build_model({**TINY, **overrides})
    return model.set_normalisation(atomref={1: -13.6, 6: -1029.0, 8: -2040.0}, scale=0.7, shift=0.05)


def two_ethanols(seed=12):
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=seed)
    z1, p1 = torch.tensor(atoms.numbers), torch.tensor(atoms.positions, dtype=F64)
    z = torch.cat([z1, z1])
    pos = torch.cat([p1, p1.flip(0) + torch.tensor([0.2, -0.1, 0.3], dtype=F64)])
    return z, pos, torch.tensor([0] * 9 + [1] * 9)


def test_training_step_traces_with_static_shapes_and_gives_the_eager_gradients():
    from torch.fx.experimental.proxy_tensor import make_fx

    from torchmdx.train.config import TrainConfig
    from torchmdx.train.objective import training_objective

    model = tiny(seed=3).train()
    # what a CUDA-graph capture skips by itself (normalised.py: `is_current_stream_capturing`)
    model.check_elements = lambda z: None
    model._check_overlaps = lambda graph: None
    z, pos, batch = two_ethanols()
    nl = neighbor_list(pos, model.cutoff, batch, max_pairs=220)  # capacity-padded: masked rows
    assert nl.mask is not None and not bool(nl.mask.all())
    cfg = TrainConfig()
    assert cfg.energy_weight > 0 and cfg.force_weight > 0
    energy_ref = torch.tensor([-1.0, 2.0], dtype=F64)
    forces_ref = torch.linspace(-1, 1, 3 * len(z), dtype=F64).reshape(-1, 3)
    n_atoms = torch.tensor([9, 9])
    names = [name for name, _ in model.named_parameters()]
    buffer_names = [name for name, _ in model.named_buffers()]

    def step(params, buffers, z, pos, batch, edge_index, shifts, mask, num_pairs, overflow, energy_ref, forces_ref,
             n_atoms):
        neighbors = Neighbors(edge_index, shifts, None, None, num_pairs, overflow, mask)
        state = {**dict(zip(names, params)), **dict(zip(buffer_names, buffers))}
        out = torch.func.functional_call(model, state, (z, pos, batch),
                                         dict(neighbors=neighbors, forces=True, create_graph=True, num_structures=2))
        loss, _, _ = training_objective(cfg, out["energy"], out["forces"], energy_ref, forces_ref, n_atoms)
        return (loss, *torch.autograd.grad(loss, params, allow_unused=True))

    params = [p for _, p in model.named_parameters()]
    args = (params, [b for _, b in model.named_buffers()], z, pos, batch, nl.edge_index, nl.shifts, nl.mask,
            nl.num_pairs, nl.overflow, energy_ref, forces_ref, n_atoms)
    graph = make_fx(step, tracing_mode="fake")(*args)  # raises on any host read or data-dependent shape
    assert not [n for n in graph.graph.nodes if n.op == "get_attr"]  # no host tensor constants either
    traced, eager = graph(*args), step(*args)
    torch.testing.assert_close(traced[0], eager[0], rtol=1e-12, atol=0)
    checked = 0
    for name, a, b in zip(names, traced[1:], eager[1:]):
        assert (a is None) == (b is None), name
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14, msg=name)
            checked += int(b.abs().max() > 0)
    assert checked > 10


def test_traced_graph_has_no_tensor_constants():
    model = tiny().eval()
    z, pos, batch = two_ethanols()
    nl = neighbor_list(pos, model.cutoff, batch, max_pairs=220)
    traced = TracedForces(model, compile=False)
    traced(z, pos, batch, 2, nl.edge_index, None, nl.mask)
    (graph,) = traced._graphs.values()
    constants = [(n.target, getattr(graph, n.target)) for n in graph.graph.nodes if n.op == "get_attr"]
    assert constants == []


@pytest.mark.slow
def test_compiled_traced_forces_equal_the_eager_model():
    """``compile: whole`` on the CPU (inductor's C++): one graph per list shape, energies,
    per-atom energies and forces of the eager float64 model, a second call with moved atoms
    reusing the graph."""
    with float64_default():
        model = tiny(seed=5).eval()
    z, pos, batch = two_ethanols(seed=3)
    nl = neighbor_list(pos, model.cutoff, batch, max_pairs=220)
    traced = TracedForces(model)
    for shift in (0.0, 0.02):
        moved = pos + shift * torch.arange(pos.numel(), dtype=F64).reshape(pos.shape).sin()
        ref = model(z, moved, batch, neighbors=nl, num_structures=2, per_atom=True)
        energy, forces, atomic = traced(z, moved, batch, 2, nl.edge_index, None, nl.mask)
        torch.testing.assert_close(energy, ref["energy"].detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(atomic, ref["energies"].detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(forces, ref["forces"], rtol=1e-9, atol=1e-10)
    assert traced.traces == 1


def test_structure_energies_are_summed_outside_the_graph_from_its_per_atom_energies():
    """The Equiformer's graph ("inductor" frontend) returned a structure energy 0.814 eV off on an H100 while its
    per-atom energies and forces were right (nn.traced.ENERGY_OUTSIDE_FRONTENDS): its energies are now the sum of
    the graph's per-atom energies, taken after the graph. Checked with a graph whose own sum is made wrong: the
    result keeps the per-atom sum (two structures, a padded list); the ET ("dynamo") keeps the graph's sum."""
    from torchmdx.nn.traced import ENERGY_OUTSIDE_FRONTENDS

    assert "inductor" in ENERGY_OUTSIDE_FRONTENDS and "dynamo" not in ENERGY_OUTSIDE_FRONTENDS
    model = tiny(seed=2).eval()
    z, pos, batch = two_ethanols()
    nl = neighbor_list(pos, model.cutoff, batch, max_pairs=220)
    expected = {}
    for outside in (True, False):
        traced = TracedForces(model, compile=False, energy_outside=outside)
        assert traced.energy_outside is outside
        traced(z, pos, batch, 2, nl.edge_index, None, nl.mask)
        (key, graph), = traced._graphs.items()

        def wrong_sum(*args, graph=graph):
            energy, forces, atomic = graph(*args)
            return energy + 0.814, forces, atomic

        traced._graphs[key] = wrong_sum
        energy, _, atomic = traced(z, pos, batch, 2, nl.edge_index, None, nl.mask)
        expected[outside] = energy
        sums = torch.stack([atomic[batch == b].sum() for b in range(2)])
        torch.testing.assert_close(energy, sums + (0.0 if outside else 0.814), rtol=0, atol=1e-9)
    assert TracedForces(model, compile=False).energy_outside  # "auto": the Equiformer's frontend
    et = torchmdx.build_model({"architecture": "et", "embedding_dimension": 8, "num_layers": 1, "num_rbf": 4,
                               "num_heads": 2, "cutoff_upper": 4.0})
    assert not TracedForces(et, compile=False).energy_outside


def test_compiled_training_graph_is_refused_and_the_uncompiled_one_traces():
    """EquiformerPotential.traced_training is ("cuda",): not on the CPU (inductor computed the forces
    of its compiled training graph wrongly there): TracedForces says so at the first compiled training call,
    a one-line ModelError that the captured training step turns into a note and the model's
    autograd; the uncompiled traced graph is still built."""
    from torchmdx.errors import ModelError

    model = tiny().train()
    assert model.traced_training == ("cuda",)
    z, pos, batch = two_ethanols()
    nl = neighbor_list(pos, model.cutoff, batch, max_pairs=220)
    with pytest.raises(ModelError, match="compiled training graph is not used.*traced_training") as raised:
        TracedForces(model, training=True)(z, pos, batch, 2, nl.edge_index, None, nl.mask)
    assert "\n" not in str(raised.value)
    energy, _, _ = TracedForces(model, training=True, compile=False)(z, pos, batch, 2, nl.edge_index, None, nl.mask)
    assert energy.requires_grad


# ------------------------------------------------------------------------- GPU
EQ_SMALL = {"architecture": "equiformer", "lmax": 2, "channels": 32, "num_layers": 2, "num_heads": 2,
            "feature_channels": 64, "num_rbf": 16, "radial_hidden": [32], "cutoff_upper": 5.0, "dtype": "float32",
            "seed": 0}


# the captured training step against eager steps on a GPU: tests/test_train_graph_architectures.py


@pytest.mark.gpu
def test_traced_graph_inside_the_calculators_cuda_graph_gpu():
    """``compile: whole`` on CUDA exactly as the calculator and bench/bench_model.py's
    ``graph_traced`` column run it (md.cuda_graph.GraphedForces: fixed-capacity list rebuilt in
    the graph, the compiled traced model, warm-ups on a side stream, capture, replay): float32
    forces against the float64 eager model, before and after the atoms move."""
    from torchmdx.md.cuda_graph import GraphedForces

    reference = tiny(seed=5).eval()
    fast = torchmdx.build_model({**TINY, "dtype": "float32"}).eval()
    fast.load_state_dict(reference.state_dict())
    fast = fast.cuda()
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=4)
    graphed = GraphedForces(fast, atoms, torch.device("cuda"), torch.float32, traced=True)
    assert graphed.forcefield.traced.frontend == "inductor"  # EquiformerPotential.traced_frontend
    z = torch.tensor(atoms.numbers)
    for shift in (0.0, 0.05):
        pos = torch.tensor(atoms.positions, dtype=F64) + shift * torch.arange(27, dtype=F64).reshape(9, 3).cos()
        energy, forces, _ = graphed(pos.float().cuda())
        ref = reference(z, pos)
        torch.testing.assert_close(energy.double().cpu(), ref["energy"].detach(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(forces.double().cpu(), ref["forces"], rtol=1e-4, atol=1e-4)
    assert graphed.captures == 1 and graphed.forcefield.traced.traces == 1


@pytest.mark.gpu
def test_compiled_training_graph_forces_and_gradients_on_cuda_gpu():
    """Why ``traced_training`` allows CUDA (it is off on the CPU, where inductor's C++ code computed
    these forces wrongly): the compiled training graph's forces and the
    parameter gradients of a force loss against the float32 eager model."""
    model = torchmdx.build_model({**TINY, "dtype": "float32", "seed": 4}).cuda().train()
    assert model.traced_training == ("cuda",)
    z, pos, batch = (t.cuda() for t in two_ethanols())
    pos = pos.float()
    nl = neighbor_list(pos, model.cutoff, batch, max_pairs=220)
    forces_ref = torch.linspace(-1, 1, 3 * len(z), device="cuda").reshape(-1, 3)
    out = model(z, pos, batch, neighbors=nl, num_structures=2, create_graph=True)
    ((out["forces"] - forces_ref) ** 2).mean().backward()
    eager = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    _, forces, _ = TracedForces(model, training=True)(z, pos, batch, 2, nl.edge_index, None, nl.mask)
    torch.testing.assert_close(forces, out["forces"].detach(), rtol=1e-3, atol=1e-5)
    ((forces - forces_ref) ** 2).mean().backward()
    for name, p in model.named_parameters():
        if name in eager:
            torch.testing.assert_close(p.grad, eager[name], rtol=1e-3, atol=1e-6, msg=name)
