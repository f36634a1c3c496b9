"""bench/bench_model.py (split over bench/model_*.py and bench/gpu_timing.py) still runs end to end:
a reference row of a 3-atom molecule on the CPU, its JSON and table. Timings are not asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reference_row_on_the_cpu(tmp_path):
    from ase.build import molecule
    from ase.io import write

    write(tmp_path / "water.xyz", molecule("H2O"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_model.py"), "--data", str(tmp_path),
                           "--systems", "water", "--backends", "torch", "--no-train", "--device", "cpu",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| water | 3 |" in done.stdout
    payload = json.loads((tmp_path / "out" / "bench_model.json").read_text())
    rows = payload["systems"] if "systems" in payload else payload.get("rows", payload)
    text = json.dumps(rows)
    assert '"atoms": 3' in text and '"ref_ms"' in text


def test_table_lists_the_extra_traced_columns():
    """BENCH_TRACED_OPTIONS columns (graph_traced_<name>) get a table of their own: ms or the
    error, kernel launches, compile time; the plain traced column stays in the main table."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_model_for_table", ROOT / "bench" / "bench_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    row = {"atoms": 22, "graph_traced_ms": 0.64, "graph_traced_agg_ms": 0.5, "graph_traced_agg_setup_s": 51.0,
           "graph_traced_agg_kernels": {"launches": 120, "gpu_ms": 0.41}, "graph_traced_cdt_error": "compile failed"}
    text = module.table({"systems": {"alanine_dipeptide": row}})
    lines = text.splitlines()
    assert "| alanine_dipeptide | 22 |" in lines[2] and "| 0.64 |" in lines[2]
    assert "| alanine_dipeptide | agg | 0.5 | 120 | 0.41 | 51.0 |" in lines
    assert "| alanine_dipeptide | cdt | compile failed | - | - | - |" in lines
    assert not any("| alanine_dipeptide |  |" in line for line in lines)


def test_graph_call_runs_the_calculators_function_on_the_cpu():
    """bench/model_setup.graph_call (every graph column of bench_model.py) run eagerly: its
    outputs are GraphedForces' named outputs (a 2026-12-06 GPU run lost every graph column to a
    positional unpack of them) and the forces equal the model's own."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from model_setup import graph_call
    finally:
        sys.path.remove(str(ROOT / "bench"))
    import torchmdx
    from torchmdx.nn import ETPotential

    model = ETPotential(dict(embedding_dimension=16, num_layers=2, num_heads=2, num_rbf=8, cutoff_upper=4.0)).double()
    z = torch.tensor([8, 1, 1, 6, 1])
    pos = torch.tensor([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0], [2.5, 0.3, 0.1], [3.4, 0.5, 0.2]],
                       dtype=torch.float64)
    want = model(z, pos)["forces"]
    replay, (energy, forces, overflow) = graph_call(model, z, pos, None, None, use_graph=False)
    replay()
    assert not bool(overflow) and energy.shape == (1,)
    torch.testing.assert_close(forces, want, rtol=1e-9, atol=1e-10)
    assert torchmdx.md.cuda_graph.ForceOutputs._fields[:4] == ("energy", "forces", "atomic", "overflow")


_TABLE_LABEL_SCRIPT = r"""
import sys, json, torch
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[3])
__import__("interpreter_speedup").install()  # tests/interpreter_speedup.py
import gpu_timing
gpu_timing.DEVICE = "cpu"
from pathlib import Path
import model_kernels as mk
from torchmdx.kernels import message_triton

t, edge_index, n, e = mk.kernel_inputs("ethanol", Path(sys.argv[2]))
m, u = mk.message_call(t, edge_index, "fused_table")
wrt = mk.grad_inputs("fused_table")
g = torch.autograd.grad(m.sum() + u.square().sum(), [t[x] for x in wrt])
t64 = {k: v.detach().double().requires_grad_(True) for k, v in t.items()}
rbf64 = mk.gaussian_rbf(t64["r"], t64["wk"].shape[1])
m64, u64 = message_triton.reference_filtered(
    t64["q"], t64["k"], t64["v"], t64["vec"], rbf64, t64["wk"], t64["bk"], t64["wv"], t64["bv"], t64["phi"], t64["unit"],
    edge_index, 8, self_loop=(t64["dk0"], t64["dv0"], torch.ones((), dtype=torch.float64)), vector_cutoff=True)
g64 = torch.autograd.grad(m64.sum() + u64.square().sum(), [t64[x] for x in wrt])
errors = {name: float((a.double() - b).norm() / b.norm()) for name, a, b in zip(("m", "u") + wrt, (m, u) + g, (m64, u64) + g64)}
ran = message_triton.LAST_CONFIG.get("filters")
m_ref, u_ref = mk.message_call(t64, edge_index, "ref_table")
ref_table_diff = max(float((a - b).abs().max()) for a, b in ((m_ref, m64), (u_ref, u64)))
# the timed closures are not run: the check is what is tested (the timings are not, and a
# failed timing only fills the row's error cell); each fused_table call costs seconds here
mk.cuda_time = lambda fn, warmup, repeats: 0.0
row = mk.kernel_step("ethanol", Path(sys.argv[2]), check=True, labels=("fused_table",))
print(json.dumps({"ran": ran, "edges": e, "errors": errors, "ref_table_diff": ref_table_diff,
                  "check": row["max_rel_err_vs_f64"]}))
"""


def test_kernel_bench_table_label_matches_the_float64_reference(tmp_path):
    """bench/model_kernels.py's ``fused_table`` label (one layer's message step with the filters
    interpolated from tables, what the sweep can time for frozen models) runs the kernels in table mode
    (Triton interpreter) and gives the float64 reference's messages and gradients, dL/dr included
    (through the Gaussian RBF rows the GEMM labels are given); ``ref_table`` is that reference, and
    ``kernel_step(check=True)`` of a table row measures fused_table against it."""
    import pytest

    pytest.importorskip("triton")
    from ase.build import molecule
    from ase.io import write

    write(tmp_path / "ethanol.xyz", molecule("CH3CH2OH"))
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _TABLE_LABEL_SCRIPT, str(ROOT / "bench"), str(tmp_path),
                           str(ROOT / "tests")], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ran"] == "table" and result["edges"] == 72
    bad = {k: v for k, v in result["errors"].items() if not v < 2e-5}
    assert not bad, result
    # the sweep's check of a table row: fused_table against ref_table (the same reference, from r)
    assert result["ref_table_diff"] < 1e-12 and 1e-9 < result["check"] < 2e-5, result


def test_sweep_at_the_table_place_writes_a_table_place_entry(tmp_path, monkeypatch):
    """bench/model_sweep.py's selection at the 'table' place, with a stand-in for the timed step
    (times and errors given per launch variant): only the knob rows run (no tl.dot precision, no
    in-kernel filter place, every row on the ``fused_table`` step), a row whose message error is
    above 2 x the default's is not chosen, the fastest that passes becomes a 'table' place entry of
    the launch table, and the 'gemm' entry of the same GPU and size class stays."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_timing
        import model_sweep
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from torchmdx.kernels import launch_table, message_triton

    table = tmp_path / "launch_table.json"
    gpu = "NVIDIA H200"
    gemm_entry = {"gpu": gpu, "size_class": "medium", "config": {"sender_side": "merged"}}
    table.write_text(json.dumps({"version": 1, "entries": [gemm_entry]}))
    monkeypatch.setattr(model_sweep, "LAUNCH_TABLE", table)
    monkeypatch.setattr(gpu_timing, "DEVICE", "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: gpu)
    timed = []

    def step(name, data_dir, check=False, labels=("fused",)):
        cfg = message_triton.CONFIG
        timed.append((labels, cfg.sender_side, cfg.block_edges, cfg.num_warps, cfg.dot_precision, cfg.filters))
        ms, err = 1.0, 1e-6
        if (cfg.sender_side, cfg.block_edges) == ("reverse", 8):
            ms = 0.7
        if cfg.num_warps == 2:  # faster, but its error fails the gate
            ms, err = 0.5, 5e-6
        return {"atoms": 2489, "edges": 104436, f"{labels[0]}_fwd_bwd_gpu_ms": ms, "max_rel_err_vs_f64": err}

    monkeypatch.setattr(model_sweep, "kernel_step", step)
    results = {}
    try:
        (tmp_path / "out").mkdir()
        model_sweep.bench_sweep(["dhfr"], tmp_path, tmp_path / "out", results, places=["table"])
    finally:
        launch_table.reload()
    section = results["sweep"]["dhfr@table"]
    assert {labels for labels, *_ in timed} == {("fused_table",)}
    assert all(precision == "auto" and filters == "auto" for *_, precision, filters in timed)
    assert len(timed) == len([o for o in model_sweep.SWEEP if "filters" not in o])
    assert (section["best"]["sender_side"], section["best"]["block_edges"]) == ("reverse", 8)
    entries = json.loads(table.read_text())["entries"]
    assert [(launch_table.place_of(e), e["config"]) for e in entries] == [
        ("gemm", {"sender_side": "merged"}), ("table", {"sender_side": "reverse", "block_edges": 8})]
    assert entries[1]["measured"]["fwd_bwd_gpu_ms"] == 0.7 and entries[1]["measured"]["default_fwd_bwd_gpu_ms"] == 1.0
    assert (tmp_path / "out" / "launch_table.json").read_text() == table.read_text()
