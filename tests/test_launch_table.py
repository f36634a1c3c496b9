"""The measured launch table and ``auto`` (torchmdx.kernels.launch_table, message_triton.resolved_config).

CPU only: the selection logic on temporary tables (entry chosen by GPU name and size class,
explicit fields win, no entry / no GPU / table off -> defaults, a corrupt file -> one warning
and defaults, the accuracy gate on the precision), the sweep's writer (merge, atomic), and, in
ONE Triton-interpreter subprocess, that a table entry really drives the kernels (the merged
sender side chosen by the table is wrong on a list that is not symmetric, right on a symmetric
one) and that every ``dot_precision`` value runs and agrees with the float64 reference at
float32 level (the interpreter multiplies in numpy whatever the precision).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def table(tmp_path, monkeypatch):
    """A temporary launch table installed as the package's (restored afterwards)."""
    from torchmdx.kernels import launch_table

    path = tmp_path / "launch_table.json"
    monkeypatch.setattr(launch_table, "TABLE_PATH", path)
    launch_table.reload()
    yield path
    launch_table.reload()


def write(path, entries, **extra):
    path.write_text(json.dumps({"version": 1, "entries": entries, **extra}))
    from torchmdx.kernels import launch_table

    launch_table.reload()


H200_MEDIUM = {"gpu": "NVIDIA H200", "size_class": "medium",
               "config": {"sender_side": "merged", "block_edges": 8, "num_warps": 8, "dot_precision": "bf16x3"},
               "precision_errors": {"tf32x3": 3.0e-5, "bf16x3": 5.0e-5, "tf32": 1.7e-3}}


def test_size_classes():
    from torchmdx.kernels.launch_table import size_class

    assert [size_class(n) for n in (1, 22, 999, 1000, 2489, 9999, 10000, 30327)] == \
        ["small", "small", "small", "medium", "medium", "medium", "large", "large"]


def test_gate():
    from torchmdx.kernels.launch_table import gate

    errors = {"tf32x3": 3.0e-5, "ieee": 2.9e-5, "tf32": 1.7e-3, "bf16x3": 6.0e-5, "bf16x6": 6.1e-5}
    assert set(gate(errors)) == {"tf32x3", "ieee", "bf16x3"}  # 6.0e-5 <= 2 x 3.0e-5 < 6.1e-5
    assert set(gate(errors, factor=100)) == {"tf32x3", "ieee", "tf32", "bf16x3", "bf16x6"}
    assert gate({"tf32": 1e-3}) == ("tf32x3",)  # no baseline measured: nothing else may be judged
    assert gate({"tf32x3": float("nan"), "ieee": 1e-5}) == ("tf32x3",)
    assert "tf32" not in gate({"tf32x3": 3e-5, "tf32": float("nan")})


def test_auto_picks_the_table_entry_of_this_gpu_and_size(table):
    from torchmdx.kernels import message_triton as mt
    from torchmdx.kernels.launch_table import DEFAULTS

    write(table, [H200_MEDIUM, {"gpu": "NVIDIA H200", "size_class": "large", "config": {"chunk_channels": 64}},
                  {"gpu": "NVIDIA H100 80GB HBM3", "size_class": "medium", "config": {"num_warps": 2}}])
    cfg = mt.resolved_config(2489, "NVIDIA H200")
    assert (cfg.sender_side, cfg.block_edges, cfg.num_warps, cfg.dot_precision) == ("merged", 8, 8, "bf16x3")
    assert (cfg.chunk_channels, cfg.filters, cfg.programs_per_sm) == (32, "table", 0)  # not in the entry: defaults
    assert mt.resolved_config(30327, "NVIDIA H200").chunk_channels == 64
    assert mt.resolved_config(30327, "NVIDIA H200").sender_side == "sorted"
    assert mt.resolved_config(5807, "NVIDIA H100 80GB HBM3").num_warps == 2
    defaults = {k: getattr(mt.resolved_config(22, "NVIDIA H200"), k) for k in DEFAULTS}  # no small entry
    assert defaults == DEFAULTS
    assert {k: getattr(mt.resolved_config(2489, "Some Other GPU"), k) for k in DEFAULTS} == DEFAULTS
    assert {k: getattr(mt.resolved_config(2489, None), k) for k in DEFAULTS} == DEFAULTS  # CPU / interpreter


def test_a_gpu_without_entries_takes_its_familys(table):
    """An H200 without entries of its own takes the H100's (same architecture and SM count); its
    own entry wins where it has one; a GPU of another or no known family gets the defaults."""
    from torchmdx.kernels import message_triton as mt
    from torchmdx.kernels.launch_table import DEFAULTS, gpu_family

    assert gpu_family("NVIDIA H200") == gpu_family("NVIDIA H100 80GB HBM3") == "hopper"
    assert gpu_family("NVIDIA A100-SXM4-80GB") is None and gpu_family("NVIDIA H1000X") is None
    write(table, [{"gpu": "NVIDIA H100 80GB HBM3", "size_class": "medium", "config": {"sender_side": "reverse"}},
                  {"gpu": "NVIDIA H100 80GB HBM3", "size_class": "small", "config": {"block_edges": 8}},
                  {"gpu": "NVIDIA H200", "size_class": "small", "config": {"num_warps": 2}}])
    assert mt.resolved_config(2489, "NVIDIA H200").sender_side == "reverse"
    small = mt.resolved_config(166, "NVIDIA H200")
    assert (small.num_warps, small.block_edges) == (2, 16)  # its own entry, not merged with the H100's
    assert mt.resolved_config(30327, "NVIDIA H200").sender_side == "sorted"  # no large entry at all
    assert {k: getattr(mt.resolved_config(2489, "NVIDIA A100-SXM4-80GB"), k) for k in DEFAULTS} == DEFAULTS


def test_explicit_fields_win_and_table_can_be_switched_off(table, monkeypatch):
    from torchmdx.kernels import message_triton as mt

    write(table, [H200_MEDIUM])
    monkeypatch.setattr(mt, "CONFIG", mt.LaunchConfig(num_warps=2, sender_side="sorted"))
    cfg = mt.resolved_config(2489, "NVIDIA H200")
    assert (cfg.num_warps, cfg.sender_side, cfg.block_edges) == (2, "sorted", 8)
    monkeypatch.setattr(mt, "CONFIG", mt.LaunchConfig(table=False))
    cfg = mt.resolved_config(2489, "NVIDIA H200")
    assert (cfg.num_warps, cfg.sender_side, cfg.block_edges, cfg.dot_precision) == (4, "sorted", 16, "tf32x3")


def test_a_call_takes_the_entry_of_its_filter_place(table):
    """A call with tables (frozen models) takes a 'table' place entry, a call with RBF rows and
    weights a 'gemm' one (an entry without 'place', as written before 2026-12-07, is 'gemm'): own
    GPU, then its family, then the other place; the 'table' entry never decides the filter place."""
    from torchmdx.kernels import message_triton as mt

    h100, h200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    write(table, [{"gpu": h100, "size_class": "medium", "config": {"block_edges": 8, "sender_side": "merged"}},
                  {"gpu": h100, "size_class": "medium", "place": "table", "config": {"sender_side": "reverse"}},
                  {"gpu": h200, "size_class": "medium", "place": "gemm", "config": {"num_warps": 2}},
                  {"gpu": h100, "size_class": "small", "config": {"block_edges": 8, "filters": "kernel"}}])
    table_call = mt.resolved_config(2489, h100, "table")
    assert (table_call.sender_side, table_call.block_edges) == ("reverse", 16)
    gemm_call = mt.resolved_config(2489, h100, "gemm")
    assert (gemm_call.sender_side, gemm_call.block_edges) == ("merged", 8)
    assert mt.resolved_config(2489, h100) == gemm_call  # 'gemm' unless the call says otherwise
    h200_table = mt.resolved_config(2489, h200, "table")  # the family's table entry before its own gemm entry
    assert (h200_table.sender_side, h200_table.num_warps) == ("reverse", 4)
    assert (mt.resolved_config(2489, h200, "gemm").num_warps, mt.resolved_config(2489, h200, "gemm").sender_side) == \
        (2, "sorted")
    small = mt.resolved_config(166, h100, "table")  # no small table entry: the gemm one
    assert small.block_edges == 8
    with pytest.raises(ValueError, match="place must be one of"):
        mt.resolved_config(2489, h100, "kernel")


def test_table_place_entries_are_checked_and_merged_by_place(table):
    from torchmdx.kernels import launch_table

    base = {"gpu": "NVIDIA H200", "size_class": "medium"}
    for bad, match in ((dict(base, place="kernel"), "place 'kernel' is not one of"),
                       (dict(base, place="table", config={"filters": "gemm"}), "may not choose 'filters'")):
        with pytest.raises(launch_table.LaunchTableError, match=match):
            launch_table.validate({"entries": [bad]})
    with pytest.raises(launch_table.LaunchTableError, match="a second entry for GPU 'NVIDIA H200'.*place 'gemm'"):
        launch_table.validate({"entries": [base, dict(base, place="gemm")]})
    launch_table.validate({"entries": [base, dict(base, place="table")]})  # one of each place
    entry = launch_table.make_entry("NVIDIA H200", "medium", {"sender_side": "reverse", "filters": "kernel"}, {},
                                    {"system": "dhfr"}, place="table")
    assert entry["place"] == "table" and entry["config"] == {"sender_side": "reverse"}
    write(table, [H200_MEDIUM])
    launch_table.write_entries([entry], table)
    entries = json.loads(table.read_text())["entries"]
    assert [(launch_table.place_of(e), e["config"]) for e in entries] == [("gemm", H200_MEDIUM["config"]),
                                                                          ("table", {"sender_side": "reverse"})]


def test_a_misspelt_or_removed_field_is_refused_not_ignored():
    """LaunchConfig has slots: setting a field it does not have (a typo, or keep_filters, removed
    on 2026-12-06) raises instead of being stored and never read."""
    from torchmdx.kernels import message_triton as mt

    cfg = mt.LaunchConfig()
    for name in ("keep_filters", "block_edge"):
        with pytest.raises(AttributeError):
            setattr(cfg, name, 8)
    cfg.block_edges = 8  # a real field still sets
    assert cfg.block_edges == 8 and "keep_filters" not in dataclasses.asdict(cfg)


def test_gate_overrides_a_precision_that_failed_it(table):
    from torchmdx.kernels import message_triton as mt

    entry = json.loads(json.dumps(H200_MEDIUM))
    entry["config"]["dot_precision"] = "tf32"  # 1.7e-3 > 2 x 3e-5: not allowed, whatever the file says
    write(table, [entry])
    cfg = mt.resolved_config(2489, "NVIDIA H200")
    assert cfg.dot_precision == "tf32x3" and cfg.sender_side == "merged"
    del entry["precision_errors"]  # no errors measured: the baseline precision only
    entry["config"]["dot_precision"] = "bf16x3"
    write(table, [entry])
    assert mt.resolved_config(2489, "NVIDIA H200").dot_precision == "tf32x3"


@pytest.mark.parametrize("text", [
    "{not json",
    json.dumps([1, 2]),
    json.dumps({"version": 7, "entries": []}),
    json.dumps({"entries": [{"gpu": "NVIDIA H200", "size_class": "huge", "config": {}}]}),
    json.dumps({"entries": [{"gpu": "NVIDIA H200", "size_class": "medium", "config": {"block_edge": 8}}]}),
    json.dumps({"entries": [{"gpu": "NVIDIA H200", "size_class": "medium", "config": {"num_warps": 0}}]}),
    json.dumps({"entries": [{"gpu": "NVIDIA H200", "size_class": "medium", "config": {"dot_precision": "fp8"}}]}),
    json.dumps({"entries": [{"gpu": "NVIDIA H200", "size_class": "medium", "config": {"block_edges": None}}]}),
])
def test_corrupt_table_warns_once_and_uses_defaults(table, text):
    from torchmdx.kernels import message_triton as mt
    from torchmdx.kernels.launch_table import DEFAULTS

    table.write_text(text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # read once per process: one warning, not one per call
            cfg = mt.resolved_config(2489, "NVIDIA H200")
    assert {k: getattr(cfg, k) for k in DEFAULTS} == DEFAULTS
    lines = [str(w.message) for w in caught]
    assert len(lines) == 1 and "\n" not in lines[0] and str(table) in lines[0] and "ignored" in lines[0], lines


def test_missing_table_is_silent(table):
    from torchmdx.kernels import message_triton as mt

    assert not table.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mt.resolved_config(2489, "NVIDIA H200").sender_side == "sorted"


def test_the_shipped_table_is_valid():
    from torchmdx.kernels import launch_table

    launch_table.validate(json.loads(launch_table.TABLE_PATH.read_text()))


def test_write_entries_merges_by_gpu_and_size(table):
    from torchmdx.kernels import launch_table
    from torchmdx.kernels import message_triton as mt

    write(table, [H200_MEDIUM, {"gpu": "NVIDIA H200", "size_class": "large", "config": {"chunk_channels": 64}}])
    new = launch_table.make_entry("NVIDIA H200", "medium", {"num_warps": 2, "block_edges": 16, "dot_precision": "ieee"},
                                  {"tf32x3": 3e-5, "ieee": 2.9e-5, "tf32": float("nan")}, {"system": "dhfr"})
    assert new["config"] == {"num_warps": 2, "dot_precision": "ieee"}  # defaults dropped
    assert new["allowed_precisions"] == ["ieee", "tf32x3"] and "tf32" not in new["precision_errors"]
    launch_table.write_entries([new], table)
    entries = json.loads(table.read_text())["entries"]
    assert [(e["size_class"], e["config"]) for e in entries] == [("medium", new["config"]), ("large", {"chunk_channels": 64})]
    assert [p.name for p in table.parent.iterdir()] == [table.name]  # no temporary file left
    cfg = mt.resolved_config(2489, "NVIDIA H200")  # the writer reloads the table
    assert (cfg.num_warps, cfg.dot_precision, cfg.sender_side) == (2, "ieee", "sorted")
    with pytest.raises(launch_table.LaunchTableError):
        launch_table.make_entry("NVIDIA H200", "medium", {"sender_side": "both"}, {}, {})


# --------------------------------------------------------------------------- interpreter
def inputs(seed, n=7, f=16, heads=2, k=8, symmetric=True):
    """Float32 inputs of one layer's message on a cutoff list of random atoms (a full list is
    symmetric; ``symmetric=False`` drops a few edges), filters from Gaussian RBF rows."""
    import torch

    from torchmdx.kernels.neighbors import neighbor_list

    g = torch.Generator().manual_seed(seed)
    pos = 2.0 * torch.rand(n, 3, generator=g, dtype=torch.float64)
    nb = neighbor_list(pos, 2.5, backend="torch")
    edge_index, vectors = nb.edge_index, nb.vectors
    if not symmetric:
        keep = torch.ones(edge_index.shape[1], dtype=torch.bool)
        keep[::5] = False
        edge_index, vectors = edge_index[:, keep], vectors[keep]
    d = vectors.norm(dim=-1)

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_(True)

    t = dict(q=r(n, f), k=r(n, f), v=r(n, 3 * f), vec=r(n, 3, f),
             rbf=torch.exp(-2.0 * (d[:, None] - torch.linspace(0, 2.5, k, dtype=torch.float64)) ** 2).requires_grad_(True),
             wk=r(f, k, scale=k ** -0.5), bk=r(f, scale=0.1), wv=r(3 * f, k, scale=k ** -0.5), bv=r(3 * f, scale=0.1),
             phi=(0.5 * (torch.cos(d * math.pi / 2.5) + 1)).requires_grad_(True), r=d.clone(),
             unit=(vectors / d[:, None]).requires_grad_(True))
    return t, edge_index, heads


GRADS = ("q", "k", "v", "vec", "rbf", "phi", "unit")


def message(mt, t, edge_index, heads, reference=False):
    fn = mt.reference_filtered if reference else mt.et_message_filtered
    kw = {} if reference else {"symmetric": True}
    m, u = fn(t["q"], t["k"], t["v"], t["vec"], t["rbf"], t["wk"], t["bk"], t["wv"], t["bv"], t["phi"], t["unit"],
              edge_index, heads, vector_cutoff=True, **kw)
    grads = __import__("torch").autograd.grad(m.sum() + u.square().sum(), [t[x] for x in GRADS])
    return (m, u) + grads


def max_rel_err(outs, refs):
    return max(float((a.double() - b).norm() / b.norm()) for a, b in zip(outs, refs))


def run_interpreter_cases(out_path, table_path):
    """In the TRITON_INTERPRET=1 subprocess: the table drives the kernels; every precision runs."""
    import torch

    from torchmdx.kernels import launch_table
    from torchmdx.kernels import message_triton as mt

    assert mt.interpreted()
    results = {}
    launch_table.TABLE_PATH = Path(table_path)
    mt._gpu_name = lambda device: "FAKE GPU"  # CPU tensors consult the table as a GPU's would
    for symmetric in (True, False):
        t64, edge_index, heads = inputs(3, symmetric=symmetric)
        ref = message(mt, t64, edge_index, heads, reference=True)
        t32 = {k: v.detach().float().requires_grad_(True) for k, v in t64.items()}
        for side in ("sorted", "merged"):
            write(Path(table_path), [{"gpu": "FAKE GPU", "size_class": "small", "config": {"sender_side": side},
                                      "precision_errors": {}}])
            err = max_rel_err(message(mt, t32, edge_index, heads), ref)
            results[f"{'symmetric' if symmetric else 'asymmetric'}_{side}"] = [err, mt.LAST_CONFIG["sender_side"]]
    results["place"] = place_cases(mt, Path(table_path))
    # every precision x filter place (10 runs of the same numbers: the interpreter multiplies in
    # numpy whatever the precision) on 4 atoms, 12 edges: what is checked is that each value
    # reaches the kernels and runs; the interpreter's time grows with the atoms (7: twice as long)
    t64, edge_index, heads = inputs(4, n=4)
    ref = message(mt, t64, edge_index, heads, reference=True)
    t32 = {k: v.detach().float().requires_grad_(True) for k, v in t64.items()}
    mt._gpu_name = lambda device: None
    for precision in launch_table.PRECISIONS:
        for filters in ("gemm", "kernel"):
            mt.CONFIG = mt.LaunchConfig(dot_precision=precision, filters=filters)
            try:
                results[f"{precision}_{filters}"] = [max_rel_err(message(mt, t32, edge_index, heads), ref),
                                                     mt.LAST_CONFIG["dot_precision"]]
            except Exception as exc:  # noqa: BLE001 - reported to the parent test
                results[f"{precision}_{filters}"] = [f"{type(exc).__name__}: {exc}", None]
    Path(out_path).write_text(json.dumps(results))


def place_cases(mt, table_path):
    """A filtered call and a tabulated call on one table with a 'gemm' entry (sorted) and a 'table'
    entry (merged): (sender side, filter place, error vs the float64 reference) of each."""
    import torch

    from torchmdx.kernels.filter_table import build_filter_table

    write(table_path, [{"gpu": "FAKE GPU", "size_class": "small", "config": {"sender_side": "sorted"}},
                       {"gpu": "FAKE GPU", "size_class": "small", "place": "table", "config": {"sender_side": "merged"}}])
    t64, edge_index, heads = inputs(5)
    m64, u64 = message(mt, t64, edge_index, heads, reference=True)[:2]
    t32 = {k: v.detach().float() for k, v in t64.items()}
    centres = torch.linspace(0, 2.5, t64["wk"].shape[1], dtype=torch.float64)

    def tabulate(w, b):
        w64, b64 = w.detach().double(), b.detach().double()
        fn = lambda r: torch.nn.functional.silu(torch.exp(-2.0 * (r[:, None] - centres) ** 2) @ w64.t() + b64)  # noqa: E731
        return build_filter_table(fn, 0.0, 2.5)

    out = {}
    with torch.no_grad():
        m, u = mt.et_message_filtered(t32["q"], t32["k"], t32["v"], t32["vec"], t32["rbf"], t32["wk"], t32["bk"],
                                      t32["wv"], t32["bv"], t32["phi"], t32["unit"], edge_index, heads,
                                      vector_cutoff=True, symmetric=True)
        out["gemm"] = [mt.LAST_CONFIG["sender_side"], mt.LAST_CONFIG["filters"], max_rel_err((m, u), (m64, u64))]
        m, u = mt.FusedMessage(symmetric=True).tabulated(
            t32["q"], t32["k"], t32["v"], t32["vec"], t32["r"], tabulate(t64["wk"], t64["bk"]),
            tabulate(t64["wv"], t64["bv"]), t32["phi"], t32["unit"], edge_index, heads, vector_cutoff=True)
        out["table"] = [mt.LAST_CONFIG["sender_side"], mt.LAST_CONFIG["filters"], max_rel_err((m, u), (m64, u64))]
    return out


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    pytest.importorskip("triton")
    folder = tmp_path_factory.mktemp("launch_table")
    out = folder / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, __file__, str(out), str(folder / "table.json")], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"interpreter subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def test_table_entry_drives_the_kernels(interpreter_results):
    """The table's sender side is the one the kernels use: merged is exact on a symmetric list
    and wrong on one that is not (the reverse edges are missing), sorted is exact on both."""
    r = interpreter_results
    for key in ("symmetric_sorted", "symmetric_merged", "asymmetric_sorted"):
        assert r[key][0] < 3e-5, (key, r[key])
    assert r["asymmetric_merged"][0] > 1e-2, r["asymmetric_merged"]
    assert [r[k][1] for k in ("symmetric_sorted", "symmetric_merged")] == ["sorted", "merged"]


def test_a_tabulated_call_runs_the_table_place_entry(interpreter_results):
    """Through the kernels: the filtered call runs the 'gemm' entry's sender side, the tabulated
    call the 'table' entry's, both equal to the float64 reference at float32 level."""
    place = interpreter_results["place"]
    assert place["gemm"][:2] == ["sorted", "gemm"] and place["table"][:2] == ["merged", "table"], place
    assert place["gemm"][2] < 3e-5 and place["table"][2] < 3e-5, place


@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32", "bf16x3", "bf16x6"])
@pytest.mark.parametrize("filters", ["gemm", "kernel"])
def test_every_precision_runs_under_the_interpreter(interpreter_results, precision, filters):
    """The interpreter ignores the precision (numpy products): float32-level agreement only."""
    err, used = interpreter_results[f"{precision}_{filters}"]
    assert not isinstance(err, str), err
    assert err < 3e-5 and used == precision


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    __import__("interpreter_speedup").install()  # tests/interpreter_speedup.py
    run_interpreter_cases(sys.argv[1], sys.argv[2])
