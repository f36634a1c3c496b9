"""bench/bench_filter_table.py --write-entries: which call-level variant becomes a launch-table entry
(CPU: the choice and the write, on results shaped as the GPU run writes them)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_filter_table_for_test", ROOT / "bench" / "bench_filter_table.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(ROOT / "bench"))


def row(atoms, **variants):
    """A system's row: variant -> (ms, force error max, filters that ran, passes the gate)."""
    out = {"atoms": atoms}
    for name, (ms, error, filters, gate) in variants.items():
        out[f"{name}_ms"] = ms
        out[f"{name}_force_error"] = {"max": error, "rel": error}
        out[f"{name}_ran"] = {"filters": filters, "sender_side": "merged", "block_edges": 4 if name != "auto" else 8,
                              "chunk_channels": 32, "num_warps": {"auto": 4, "fast": 1, "faster": 1, "bad": 1}[name],
                              "table_storage": "float32"}
        if gate is not None:
            out[f"{name}_passes_gate"] = gate
    return out


def results(systems):
    return {"gpu": "NVIDIA H100 80GB HBM3", "date": "2026-12-07T09:00+00:00",
            "variants": {"auto": {}, "fast": {}, "faster": {}, "bad": {}}, "systems": systems}


def test_winner_per_size_class_by_geometric_mean_among_gated_table_variants(bench):
    r = results({
        # medium: 'faster' wins one system by far and loses the other: geometric mean (0.5 * 1.1) ** 0.5 = 0.74,
        # 'fast' 0.8 at both; 'bad' is fastest but failed the gate
        "dhfr": row(2489, auto=(6.0, 4e-5, "table", None), fast=(4.8, 4e-5, "table", True),
                    faster=(3.0, 4e-5, "table", True), bad=(1.0, 9e-5, "table", False)),
        "factorIX": row(5807, auto=(12.0, 1e-4, "table", None), fast=(9.6, 1e-4, "table", True),
                        faster=(13.2, 1e-4, "table", True), bad=(2.0, 9e-4, "table", False)),
        # small: the first variant is best: no entry
        "chignolin": row(166, auto=(1.2, 3e-6, "table", None), fast=(1.3, 3e-6, "table", True),
                         faster=(1.25, 3e-6, "table", True), bad=(1.0, 9e-6, "table", False)),
        # large: 'fast' ran without tables (a frozen call at the GEMM place): not a 'table' entry
        "stmv": row(30327, auto=(55.0, 3e-4, "table", None), fast=(30.0, 3e-4, "gemm", True),
                    faster=(50.0, 3e-4, "table", True), bad=(20.0, 9e-4, "table", False)),
    })
    entries = {e["size_class"]: e for e in bench.choose_entries(r, source="test")}
    assert set(entries) == {"medium", "large"}
    medium = entries["medium"]
    assert medium["place"] == "table" and medium["measured"]["variant"] == "faster"
    assert medium["measured"]["time_ratio"] == pytest.approx((0.5 * 1.1) ** 0.5, abs=1e-4)
    assert medium["config"] == {"sender_side": "merged", "block_edges": 4, "num_warps": 1}
    assert set(medium["measured"]["systems"]) == {"dhfr", "factorIX"}
    assert medium["measured"]["date"] == "2026-12-07T09:00+00:00"
    assert entries["large"]["measured"]["variant"] == "faster"


def test_write_entries_merges_into_a_launch_table(bench, tmp_path):
    from torchmdx.kernels import launch_table

    r = results({"dhfr": row(2489, auto=(6.0, 4e-5, "table", None), fast=(4.8, 4e-5, "table", True),
                             faster=(5.0, 4e-5, "table", True), bad=(1.0, 9e-5, "table", False))})
    table = tmp_path / "launch_table.json"
    table.write_text((ROOT / "torchmdx" / "kernels" / "launch_table.json").read_text())
    before = json.loads(table.read_text())["entries"]
    launch_table.write_entries(bench.choose_entries(r), table)
    after = json.loads(table.read_text())["entries"]
    keys = lambda entries: {(e["gpu"], e["size_class"], e.get("place", "gemm")) for e in entries}  # noqa: E731
    assert keys(after) == keys(before)  # the H100 medium 'table' entry replaced, nothing else
    medium = next(e for e in after if e["size_class"] == "medium" and e.get("place") == "table")
    assert medium["measured"]["variant"] == "fast"
    assert launch_table.lookup("NVIDIA H100 80GB HBM3", 2489, table, place="table")["block_edges"] == 4
    launch_table.reload()
