"""Atom locality (torchmdx/kernels/locality.py, the Potential.atom_order hook, md atom_order):
space-filling-curve codes, the order, invariance of energies and forces (float64, CPU), the MD
engine's outputs in the input order, and bench/bench_locality.py on a tiny input."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms

from torchmdx.errors import ConfigError, DataError, ModelError
from torchmdx.kernels import locality
from torchmdx.kernels.locality import (
    AtomOrder, blocks_touched, hilbert_code, inverse_permutation, morton_code, neighbor_bandwidth,
    same_block_fraction, spatial_order,
)
from torchmdx.kernels.neighbors_ref import neighbor_list
from torchmdx.nn import ETPotential

from test_model import random_molecule
from test_model import small_model as _small_model

ROOT = Path(__file__).resolve().parents[1]


def grid(bits):
    return torch.tensor(list(itertools.product(range(2 ** bits), repeat=3)), dtype=torch.long)


def small_model(seed=0) -> ETPotential:
    """test_model's small float64 ET (every parameter moved off its initial value), 4 Å cutoff."""
    return _small_model(seed, cutoff_upper=4.0)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("code", [hilbert_code, morton_code])
def test_codes_are_a_bijection_of_the_grid(code, bits):
    c = code(grid(bits), bits)
    assert torch.equal(torch.sort(c).values, torch.arange(2 ** (3 * bits)))


def test_morton_code_interleaves_the_bits():
    cells = torch.tensor([[5, 3, 6], [1023, 0, 1], [0, 0, 0], [7, 7, 7], [(1 << 21) - 1, 12345, 99]])
    for (x, y, z), c in zip(cells.tolist(), morton_code(cells, 21).tolist()):
        expected = 0
        for b in range(21):  # bit b of x, y, z -> bits 3b+2, 3b+1, 3b
            expected |= ((x >> b) & 1) << (3 * b + 2) | ((y >> b) & 1) << (3 * b + 1) | ((z >> b) & 1) << (3 * b)
        assert c == expected


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_consecutive_hilbert_cells_are_face_neighbours(bits):
    g = grid(bits)
    walk = g[torch.argsort(hilbert_code(g, bits))]
    steps = (walk[1:] - walk[:-1]).abs()
    assert torch.equal(steps.sum(1), torch.ones(len(walk) - 1, dtype=torch.long))  # one axis, one cell
    assert walk[0].tolist() == [0, 0, 0]
    # Morton, for contrast, jumps (so the test above can tell the curves apart)
    z = g[torch.argsort(morton_code(g, bits))]
    assert bits == 1 or int((z[1:] - z[:-1]).abs().sum(1).max()) > 1


def test_bits_out_of_range_are_refused():
    with pytest.raises(ValueError):
        hilbert_code(grid(1), 22)
    with pytest.raises(ValueError):
        spatial_order(torch.zeros(3, 3), bits=0)


# ------------------------------------------------------------------------------------ the order
def test_spatial_order_is_a_batch_grouped_permutation_along_the_curve():
    torch.manual_seed(0)
    n = 500
    pos = torch.rand(n, 3, dtype=torch.float64) * 20.0
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor([120, 300, 80]))
    for curve in ("hilbert", "morton"):
        perm = spatial_order(pos, batch, curve=curve)
        assert torch.equal(torch.sort(perm).values, torch.arange(n))
        assert torch.equal(batch[perm], batch)  # structures stay together, in their order
        inv = inverse_permutation(perm)
        assert torch.equal(perm[inv], torch.arange(n)) and torch.equal(inv[perm], torch.arange(n))
        # along the curve, consecutive atoms of a structure are close (random order: ~ 10 Å apart)
        sorted_pos = pos[perm]
        same = batch[1:] == batch[:-1]
        step = (sorted_pos[1:] - sorted_pos[:-1]).norm(dim=-1)[same].mean()
        shuffled = (pos[1:] - pos[:-1]).norm(dim=-1)[same].mean()
        assert step < 0.35 * shuffled, (curve, float(step), float(shuffled))
    # unknown structure count: the same order (bounds sized by N, nothing read from the device)
    assert torch.equal(spatial_order(pos, batch, num_structures=3), spatial_order(pos, batch))


def test_periodic_images_get_the_same_place():
    torch.manual_seed(1)
    cell = torch.tensor([[12.0, 0.0, 0.0], [3.0, 11.0, 0.0], [1.0, 2.0, 13.0]], dtype=torch.float64)
    frac = torch.rand(200, 3, dtype=torch.float64)
    pos = frac @ cell
    shifts = torch.randint(-2, 3, (200, 3)).double()
    moved = pos + shifts @ cell  # the same atoms, in other images
    pbc = torch.tensor([True, True, True])
    perm = spatial_order(pos, cell=cell, pbc=pbc)
    assert torch.equal(spatial_order(moved, cell=cell, pbc=pbc), perm)
    # without periodicity the images are far apart and the order differs
    assert not torch.equal(spatial_order(moved), perm)


def test_auto_rule(monkeypatch):
    monkeypatch.setattr(locality, "LOCALITY_MIN_ATOMS", 10)
    assert locality.resolve_curve("auto", 10, 1) == "hilbert"
    assert locality.resolve_curve("auto", 9, 1) is None
    assert locality.resolve_curve("auto", 100, 2) is None  # a batch: input order
    assert locality.resolve_curve("auto", 100, 1, neighbors_given=True) is None
    assert locality.resolve_curve("morton", 3, 5) == "morton"
    assert locality.resolve_curve("hilbert", 100, 1, neighbors_given=True) is None
    assert locality.resolve_curve("input", 10 ** 6, 1) is None


# ------------------------------------------------------------------------------------ the model hook
def _graph_z_spy(model):
    """Record the z of every Graph the model evaluates (to see the order the body ran in)."""
    seen = []
    inner = model.atomic_energies

    def spy(graph):
        seen.append(graph.z.clone())
        return inner(graph)

    model.atomic_energies = spy
    return seen


def _compare(model, z, pos, curve="hilbert", **kw):
    model.atom_order = "input"
    ref = model(z, pos, per_atom=True, **kw)
    seen = _graph_z_spy(model)
    model.atom_order = curve
    out = model(z, pos, per_atom=True, **kw)
    del model.atomic_energies
    # the body really ran in the curve's order
    perm = spatial_order(pos, kw.get("batch"), kw.get("cell"), kw.get("pbc"), curve=curve)
    assert not torch.equal(perm, torch.arange(len(z)))
    assert torch.equal(seen[-1], z[perm])
    for key in ref:
        assert out[key].shape == ref[key].shape
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=1e-10, msg=key)
    return ref, out


@pytest.mark.parametrize("curve", ["hilbert", "morton"])
def test_energy_invariant_and_forces_in_input_order_molecule(curve):
    model = small_model()
    z, pos = random_molecule(40, 0, box=8.0)
    ref, out = _compare(model, z, pos, curve)
    assert float(ref["forces"].abs().max()) > 1e-3  # forces that can tell atoms apart


def test_energy_invariant_and_forces_in_input_order_batch_of_two():
    model = small_model(1)
    z1, p1 = random_molecule(25, 1, box=7.0)
    z2, p2 = random_molecule(30, 2, box=7.0)
    z = torch.cat([z1, z2])
    pos = torch.cat([p1, p2 + 3.0])  # overlapping boxes: only the batch keeps them apart
    batch = torch.repeat_interleave(torch.arange(2), torch.tensor([25, 30]))
    ref, out = _compare(model, z, pos, batch=batch)
    assert out["energy"].shape == (2,)
    # each structure alone gives its own energy (the batch was not mixed by the order)
    model.atom_order = "input"
    alone = model(z2, p2 + 3.0)["energy"]
    torch.testing.assert_close(out["energy"][1:], alone, rtol=0, atol=1e-10)


def test_energy_forces_and_stress_invariant_periodic_box():
    model = small_model(2)
    z, frac = random_molecule(70, 3, box=1.0, min_dist=0.09)
    cell = torch.tensor([[9.5, 0.0, 0.0], [1.0, 9.0, 0.0], [0.5, -0.7, 10.0]], dtype=torch.float64)
    pos = frac @ cell + torch.tensor([4.0, -3.0, 11.0], dtype=torch.float64)  # some atoms outside the cell
    _compare(model, z, pos, cell=cell, pbc=torch.tensor([True, True, True]), stress=True)


def test_force_training_gradients_equal():
    """create_graph: d(force loss)/d(parameters) is the same in both orders."""
    model = small_model(3)
    z, pos = random_molecule(30, 4, box=7.0)
    target = torch.randn(30, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = {}
    for order in ("input", "hilbert"):
        model.atom_order = order
        model.zero_grad()
        out = model(z, pos, create_graph=True)
        ((out["forces"] - target) ** 2).sum().backward()
        grads[order] = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(grads["hilbert"], grads["input"], rtol=0, atol=1e-10)


def test_auto_sorts_one_large_structure_only(monkeypatch):
    monkeypatch.setattr(locality, "LOCALITY_MIN_ATOMS", 30)
    model = small_model()
    assert model.atom_order == "input"  # the default, until a GPU run shows the sort paying
    model.atom_order = "auto"
    z, pos = random_molecule(160, 5, box=13.0)
    seen = _graph_z_spy(model)
    model(z, pos)
    assert torch.equal(seen[-1], z[spatial_order(pos)])  # one structure of >= 30 atoms in random order: sorted
    model(z[:29], pos[:29])
    assert torch.equal(seen[-1], z[:29])  # below the threshold: input order
    hilbert = spatial_order(pos)
    model(z[hilbert], pos[hilbert])
    assert torch.equal(seen[-1], z[hilbert])  # already local: kept as given
    batch = torch.repeat_interleave(torch.arange(2), torch.tensor([80, 80]))
    model(z, pos, batch=batch)
    assert torch.equal(seen[-1], z)  # a batch: input order
    nl = neighbor_list(pos, model.cutoff)
    model(z, pos, neighbors=nl)
    assert torch.equal(seen[-1], z)  # the caller's list: its order


def test_overlap_error_names_the_input_atoms():
    model = small_model()
    z, pos = random_molecule(40, 6, box=8.0)
    pos[17] = pos[3]
    messages = {}
    for order in ("input", "hilbert"):
        model.atom_order = order
        with pytest.raises(ModelError) as info:
            model(z, pos)
        messages[order] = str(info.value)
    assert "atoms 3 and 17" in messages["input"]
    assert messages["hilbert"] == messages["input"]


def test_bad_atom_order_on_the_model_is_one_line():
    model = small_model()
    with pytest.raises(ModelError, match=r"^atom_order must be one of 'auto', 'input', 'hilbert', 'morton', got 'z'$"):
        model.atom_order = "z"
    assert model.atom_order == "input"
    assert "_atom_order" not in model.state_dict()


# ------------------------------------------------------------------------------------ bandwidth
def _solvated(shared_data):
    atoms = ase.io.read(shared_data / "systems" / "alanine_dipeptide_solvated.xyz")
    pos = torch.tensor(atoms.get_positions())
    cell = torch.tensor(atoms.cell.array).unsqueeze(0)
    pbc = torch.tensor(atoms.pbc).unsqueeze(0)
    return atoms, pos, cell, pbc


def test_sorted_solvated_system_has_a_narrow_neighbour_band(shared_data):
    atoms, pos, cell, pbc = _solvated(shared_data)
    n = len(atoms)

    def stats(order):
        nl = neighbor_list(pos[order], 5.0, cell=cell, pbc=pbc)
        return (neighbor_bandwidth(nl.edge_index), same_block_fraction(nl.edge_index),
                blocks_touched(nl.edge_index), nl.edge_index.shape[1])

    shuffled = stats(torch.randperm(n, generator=torch.Generator().manual_seed(0)))
    given = stats(torch.arange(n))
    hilbert = stats(spatial_order(pos, cell=cell, pbc=pbc))
    morton = stats(spatial_order(pos, cell=cell, pbc=pbc, curve="morton"))
    assert shuffled[3] == given[3] == hilbert[3] == morton[3]  # the same pairs
    assert hilbert[0] < 0.2 * shuffled[0], (hilbert, shuffled)
    assert hilbert[0] < given[0] and morton[0] < given[0]
    assert hilbert[1] > 2 * shuffled[1]
    assert hilbert[2] < 0.5 * shuffled[2]


def test_auto_keeps_an_input_order_that_is_already_local(shared_data):
    """dhfr in PDB order: residues are compact and consecutive, tighter than the Hilbert curve's
    blocks, and its neighbour list touches fewer sender blocks: auto keeps it. Shuffled, or the
    solvated system (water in the builder's order), auto takes the curve."""
    from torchmdx.kernels.locality import auto_order, block_spread

    atoms = ase.io.read(shared_data / "systems" / "dhfr.xyz")
    pos = torch.tensor(atoms.get_positions())
    n = len(atoms)
    hilbert = spatial_order(pos)
    assert block_spread(pos) < block_spread(pos, hilbert)

    def touched(perm):
        return blocks_touched(neighbor_list(pos[perm], 5.0).edge_index)

    assert touched(torch.arange(n)) < touched(hilbert)  # the measure and the list agree
    assert torch.equal(auto_order(pos), torch.arange(n))
    shuffle = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    assert torch.equal(auto_order(pos[shuffle]), spatial_order(pos[shuffle]))
    _, spos, cell, pbc = _solvated(shared_data)
    assert torch.equal(auto_order(spos, cell=cell, pbc=pbc), spatial_order(spos, cell=cell, pbc=pbc))


def test_block_spread_value():
    from torchmdx.kernels.locality import block_spread

    # two blocks of 2: points +-1 and +-3 around their centroids on x: RMS 1 and 3
    pos = torch.tensor([[-1.0, 0, 0], [1.0, 0, 0], [7.0, 5, 5], [13.0, 5, 5], [99.0, 9, 9]])
    assert float(block_spread(pos, block=2)) == pytest.approx(2.0)
    assert float(block_spread(pos, torch.tensor([0, 2, 1, 3, 4]), block=2)) == pytest.approx(
        (np.linalg.norm([8, 5, 5]) / 2 + np.linalg.norm([12, 5, 5]) / 2) / 2)
    assert float(block_spread(pos[:1], block=2)) == 0.0


def test_measures_on_a_known_list():
    edge_index = torch.tensor([[0, 0, 1, 40, 40], [1, 33, 0, 41, 2]])
    assert neighbor_bandwidth(edge_index) == pytest.approx((1 + 33 + 1 + 1 + 38) / 5)
    assert same_block_fraction(edge_index) == pytest.approx(3 / 5)
    assert blocks_touched(edge_index) == pytest.approx(4 / 2)  # block 0 reads blocks 0, 1; block 1 reads 1, 0
    mask = torch.tensor([True, False, True, True, False])
    assert neighbor_bandwidth(edge_index, mask) == pytest.approx(1.0)
    assert neighbor_bandwidth(torch.zeros(2, 0, dtype=torch.long)) == 0.0


def test_atom_order_object_maps_both_ways():
    perm = torch.tensor([2, 0, 3, 1])
    order = AtomOrder(perm)
    x = torch.tensor([10.0, 11.0, 12.0, 13.0])
    assert order.sorted(x).tolist() == [12.0, 10.0, 13.0, 11.0]
    assert torch.equal(order.back(order.sorted(x)), x)
    assert AtomOrder().sorted(x) is x and AtomOrder().back(x) is x


# ------------------------------------------------------------------------------------ MD engine
def _cut(shared_data, radius=6.5):
    """The solute and the water within ``radius`` Å of its centre (a ~100 atom cluster, PDB order)."""
    atoms, *_ = _solvated(shared_data)
    atoms.pbc = False
    atoms.cell = np.zeros((3, 3))
    centre = atoms.positions[:22].mean(0)
    keep = [i for i in range(len(atoms)) if i < 22 or np.linalg.norm(atoms.positions[i] - centre) < radius]
    return atoms[keep]


def _simulation(atoms, order, **kw):
    from torchmdx.md.engine import Simulation

    return Simulation(small_model(4), atoms, timestep_fs=0.2, dtype=torch.float64, temperature_K=300.0,
                      max_temperature_K=1e7, seed=3, atom_order=order, **kw)


class _Frames:
    def __init__(self):
        self.frames = []

    def report(self, sim, observation):
        self.frames.append(observation)

    def report_failure(self, sim, observation):
        pass

    def close(self):
        pass


def test_md_engine_writes_the_input_order(shared_data, tmp_path):
    from torchmdx.md.io import load_restart

    atoms = _cut(shared_data)
    runs = {}
    for order in ("input", "hilbert"):
        sim = _simulation(atoms, order)
        if order == "hilbert":
            assert sim.atom_perm is not None and not np.array_equal(sim.atom_perm, np.arange(len(atoms)))
            # the engine really runs sorted: its atoms are the curve's order of the input
            assert torch.equal(sim.system.z, torch.as_tensor(atoms.numbers)[torch.as_tensor(sim.atom_perm)])
        else:
            assert sim.atom_perm is None
        rep = _Frames()
        sim.run(6, reporters=[rep], every=2, restart_path=tmp_path / f"{order}.restart.pt", restart_every=6)
        runs[order] = (sim, rep.frames)
    (ref_sim, ref), (srt_sim, srt) = runs["input"], runs["hilbert"]
    assert [o.step for o in srt] == [o.step for o in ref] == [0, 2, 4, 6]
    for a, b in zip(ref, srt):
        for key in ("positions", "velocities", "forces"):
            np.testing.assert_allclose(getattr(b, key), getattr(a, key), rtol=0, atol=1e-8, err_msg=key)
        np.testing.assert_allclose(b.potential, a.potential, rtol=0, atol=1e-8)
    assert np.abs(ref[-1].positions - ref[0].positions).max() > 1e-4  # the atoms moved
    frames_ref, frames_srt = ref_sim.frames(ref[-1]), srt_sim.frames(srt[-1])
    assert (frames_srt[0].numbers == atoms.numbers).all()
    np.testing.assert_allclose(frames_srt[0].positions, frames_ref[0].positions, rtol=0, atol=1e-8)
    # restart files: input order, plus the engine's order
    p_ref, p_srt = load_restart(tmp_path / "input.restart.pt"), load_restart(tmp_path / "hilbert.restart.pt")
    assert torch.equal(p_srt["z"], torch.as_tensor(atoms.numbers))
    assert p_ref["atom_order"] is None and p_srt["atom_order"] == [int(a) for a in srt_sim.atom_perm]
    torch.testing.assert_close(p_srt["positions"], p_ref["positions"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(p_srt["structures"][0].positions, p_ref["structures"][0].positions, atol=1e-8)
    assert (p_srt["structures"][0].numbers == atoms.numbers).all()


def test_md_restart_of_a_sorted_run_continues_it(shared_data, tmp_path):
    atoms = _cut(shared_data, radius=5.0)
    full = _simulation(atoms, "hilbert")
    rep_full = _Frames()
    full.run(8, reporters=[rep_full], every=4)
    half = _simulation(atoms, "hilbert")
    half.run(4, restart_path=tmp_path / "half.pt", restart_every=4)
    from torchmdx.md.io import load_restart

    payload = load_restart(tmp_path / "half.pt")
    # continued with the file's order (what torchmdx md does), and with the input order
    for order in (payload["atom_order"], "input"):
        cont = _simulation(payload["structures"], order)
        cont.load_restart(payload)
        rep = _Frames()
        cont.run(4, reporters=[rep], every=4, report_start=False)
        exact = order != "input"
        np.testing.assert_allclose(rep.frames[-1].positions, rep_full.frames[-1].positions,
                                   rtol=0, atol=0 if exact else 1e-8)


def test_md_error_names_the_input_atom(shared_data):
    atoms = _cut(shared_data, radius=5.0)
    sim = _simulation(atoms, "hilbert")
    sim.initialize()
    a = int(np.nonzero(sim.atom_perm == 30)[0][0])  # the engine's place of input atom 30
    assert a != 30
    forces = sim.state.forces.clone()
    forces[a, 1] = float("nan")
    sim.state.forces = forces
    assert sim._bad_reason(sim.state) == "the forces are not finite (NaN/inf) on atom 30 of structure 0"


def test_md_velocities_given_in_the_input_order(shared_data):
    atoms = _cut(shared_data, radius=5.0)
    v = np.random.default_rng(0).normal(size=(len(atoms), 3)) * 0.01
    sim = _simulation(atoms, "morton")
    sim.initialize(velocities=v)
    np.testing.assert_array_equal(sim.observe(pressure=False).velocities, v)


def test_md_auto_sorts_a_large_structure_and_keeps_small_ones(monkeypatch):
    from torchmdx.md.engine import order_structures

    rng = np.random.default_rng(0)
    big = Atoms("H60", positions=rng.uniform(0, 20, (60, 3)))
    small = Atoms("H10", positions=rng.uniform(0, 5, (10, 3)))
    assert order_structures([big, small], "auto")[1] is None  # below 5000 atoms
    monkeypatch.setattr("torchmdx.md.engine.LOCALITY_MIN_ATOMS", 50)
    ordered, perm = order_structures([big, small], "auto")
    assert perm is not None and sorted(perm[:60]) == list(range(60)) and sorted(perm[60:]) == list(range(60, 70))
    np.testing.assert_array_equal(ordered[0].positions, big.positions[perm[:60]])
    np.testing.assert_array_equal(ordered[1].positions, small.positions[perm[60:] - 60])


def test_bad_md_atom_order_is_one_line(tmp_path):
    from torchmdx.md.config import md_config
    from torchmdx.md.engine import order_structures

    with pytest.raises(ConfigError) as info:
        md_config({"atom_order": "zorder"})
    assert "\n" not in str(info.value) and "atom_order" in str(info.value) and "'hilbert'" in str(info.value)
    path = tmp_path / "md.yaml"
    path.write_text("md:\n  atom_order: 3\n")
    with pytest.raises(ConfigError) as info:
        md_config(yaml_path=str(path))
    assert "\n" not in str(info.value) and "atom_order" in str(info.value)
    assert md_config({}).atom_order == "auto"
    atoms = [Atoms("H3", positions=np.eye(3)), Atoms("H2", positions=np.eye(3)[:2])]
    with pytest.raises(ConfigError, match="^atom_order must be one of"):
        order_structures(atoms, "peano")
    with pytest.raises(DataError, match="^atom_order is not a permutation"):
        order_structures(atoms, [0, 1, 3, 2, 4])  # atom 3 would change structure


def test_md_cli_bad_atom_order_exits_2(tmp_path, capsys):
    from torchmdx.cli.main import main

    structure = tmp_path / "h2.xyz"
    ase.io.write(structure, Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.8]]))
    with pytest.raises(SystemExit) as info:
        main(["md", str(structure), "--atom-order", "zorder", "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--atom-order" in err


# ------------------------------------------------------------------------------------ benchmark
def test_bench_locality_runs_on_a_tiny_cpu_input(tmp_path, shared_data):
    cut = _cut(shared_data, radius=5.0)
    path = tmp_path / "tiny.xyz"
    ase.io.write(path, cut, format="extxyz")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_locality.py"), "--device", "cpu", "--systems", str(path),
         "--tiny", "--repeats", "1", "--warmup", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "bench_locality.json").read_text())
    (row,) = data["systems"]
    assert row["atoms"] == len(cut)
    assert set(row["bandwidth"]) >= {"input", "shuffled", "hilbert", "morton"}
    assert row["bandwidth"]["hilbert"]["mean_abs_i_minus_j"] < row["bandwidth"]["shuffled"]["mean_abs_i_minus_j"]
    assert set(row["calls"]) >= {"input", "hilbert", "morton", "auto", "hilbert_presorted"}
    assert row["bandwidth"]["auto_picks"] in ("input", "hilbert")
    for name, call in row["calls"].items():
        assert call["force_max_abs_diff_vs_input"] < 1e-4, name  # float32, tiny model
    assert "hilbert" in result.stdout and "no timing claims" in result.stdout


def test_md_cli_sorted_run_matches_the_input_order_run(tmp_path, shared_data):
    """torchmdx md --atom-order hilbert: frames in the input order, equal to an unsorted run's;
    continued from its restart file in the file's order."""
    from torchmdx.cli.main import main

    structure = tmp_path / "cut.xyz"
    ase.io.write(structure, _cut(shared_data, radius=5.0), format="extxyz")
    model = tmp_path / "et.pt"
    small_model(5).save(model)
    common = ["md", str(structure), "--model", str(model), "--dtype", "float64", "--dt", "0.2",
              "--max-temperature", "1e7", "--every", "3", "--no-progress"]
    for order in ("input", "hilbert"):
        assert main([*common, "--steps", "6", "--atom-order", order, "--out", str(tmp_path / f"{order}.extxyz")]) == 0
    ref, srt = ase.io.read(tmp_path / "input.extxyz", ":"), ase.io.read(tmp_path / "hilbert.extxyz", ":")
    assert len(ref) == len(srt) == 3
    for a, b in zip(ref, srt):
        assert (a.numbers == b.numbers).all()
        np.testing.assert_allclose(b.positions, a.positions, rtol=0, atol=1e-8)
        np.testing.assert_allclose(b.get_forces(), a.get_forces(), rtol=0, atol=1e-8)
    # continue the sorted run to 9 steps; a fresh 9-step sorted run is the reference
    without_structure = [a for a in common if a != str(structure)]
    assert main([*without_structure, "--steps", "9", "--out", str(tmp_path / "hilbert.extxyz"),
                 "--restart", str(tmp_path / "hilbert.restart.pt")]) == 0
    assert main([*common, "--steps", "9", "--atom-order", "hilbert", "--out", str(tmp_path / "full.extxyz")]) == 0
    cont, full = ase.io.read(tmp_path / "hilbert.extxyz", ":"), ase.io.read(tmp_path / "full.extxyz", ":")
    assert len(cont) == len(full) == 4
    from torchmdx.md.io import load_restart

    # full precision (extxyz rounds to 1e-8): the continued run is the uninterrupted one, bit for bit
    cont_state, full_state = load_restart(tmp_path / "hilbert.restart.pt"), load_restart(tmp_path / "full.restart.pt")
    assert cont_state["step"] == full_state["step"] == 9 and cont_state["atom_order"] == full_state["atom_order"]
    for key in ("positions", "velocities", "forces"):
        assert torch.equal(cont_state[key], full_state[key]), key


@pytest.mark.gpu
def test_spatial_order_replays_in_a_cuda_graph():
    """No host read: the order and the maps are captured in a CUDA graph and replayed for new
    positions (same result as eager)."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    cell = torch.diag(torch.tensor([30.0, 31.0, 32.0], device=device)).unsqueeze(0)
    pbc = torch.ones(1, 3, dtype=torch.bool, device=device)
    pos = torch.rand(6000, 3, device=device) * 40.0 - 5.0
    batch = torch.zeros(6000, dtype=torch.long, device=device)
    static = pos.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            perm = spatial_order(static, batch, cell, pbc, num_structures=1)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        perm = spatial_order(static, batch, cell, pbc, num_structures=1)
        back = AtomOrder(perm).back(AtomOrder(perm).sorted(static))
    new = torch.rand(6000, 3, device=device) * 40.0 - 5.0
    static.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(perm, spatial_order(new, batch, cell, pbc, num_structures=1))
    assert torch.equal(back, new)


def test_wrapped_positions_equal_a_linear_solve_for_triclinic_cells():
    """The reciprocal-vector wrap (no host read, so it can be captured) equals solving
    cell^T f = r per atom, for two skewed cells, mixed periodic directions and a cell without volume."""
    from torchmdx.kernels.locality import _wrapped

    torch.manual_seed(1)
    cell = torch.randn(3, 3, 3, dtype=torch.float64) + 3 * torch.eye(3, dtype=torch.float64)
    cell[2] = 0.0
    pos = torch.randn(60, 3, dtype=torch.float64) * 10
    batch = torch.randint(0, 3, (60,))
    pbc = torch.tensor([[True, False, True], [True, True, True], [True, True, True]])
    wrapped = _wrapped(pos, batch, cell, pbc)
    periodic = batch < 2
    frac = torch.linalg.solve(cell[batch[periodic]].transpose(1, 2), pos[periodic].unsqueeze(-1)).squeeze(-1)
    frac = torch.where(pbc[batch[periodic]], frac - frac.floor(), frac)
    expected = torch.einsum("nk,nkl->nl", frac, cell[batch[periodic]])
    assert torch.allclose(wrapped[periodic], expected, atol=1e-12)
    assert torch.equal(wrapped[~periodic], pos[~periodic])
