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
print(json.dumps({"ran": message_triton.LAST_CONFIG.get("filters"), "edges": e, "errors": errors}))
"""


def test_kernel_bench_table_label_matches_the_float64_reference(tmp_path):
    """bench/model_kernels.py's ``fused_table`` label (one layer's message step with the filters
    interpolated from tables, what the sweep can time for frozen models) runs the kernels in table mode
    (Triton interpreter) and gives the float64 reference's messages and gradients, dL/dr included
    (through the Gaussian RBF rows the GEMM labels are given)."""
    import pytest

    pytest.importorskip("triton")
    from ase.build import molecule
    from ase.io import write

    write(tmp_path / "ethanol.xyz", molecule("CH3CH2OH"))
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _TABLE_LABEL_SCRIPT, str(ROOT / "bench"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ran"] == "table" and result["edges"] == 72
    bad = {k: v for k, v in result["errors"].items() if not v < 2e-5}
    assert not bad, result
