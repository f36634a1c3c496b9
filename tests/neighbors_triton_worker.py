"""Runs the Triton neighbor-list kernels under the Triton CPU interpreter (helper of
tests/test_neighbors_triton.py, started in a subprocess so TRITON_INTERPRET never leaks).

usage: python tests/neighbors_triton_worker.py CASES.pt RESULTS.pt

CASES.pt holds a list of dicts (name, call, args); each call's outputs (or its error class and
message) are written to RESULTS.pt, keyed by name. tests/interpreter_speedup.py skips the
interpreter's redundant re-patching (same results, about half the time).
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import torch  # noqa: E402

import interpreter_speedup  # noqa: E402 - tests/ (this script's folder)
from torchmdx.errors import TorchmdxError  # noqa: E402
from torchmdx.kernels import neighbors  # noqa: E402
from torchmdx.kernels import neighbors_triton  # noqa: E402


#: larger tiles than the GPU defaults: the interpreter's cost is per operation, not per element
INTERPRETER_CONFIG = {"cell_block_i": 32, "cell_block_j": 64, "cell_block_i_write": 32, "cell_block_j_write": 64,
                      "cell_block_o": 32, "fill_block": 1024, "cell_parts": 1, "brute_block_j_write": 64,
                      "brute_block_i": 64, "brute_block_j": 64}
DEFAULT_CONFIG = dict(neighbors_triton.CONFIG)


def run(case):
    kind = case["call"]
    args = dict(case["args"])
    neighbors_triton.CONFIG.clear()
    neighbors_triton.CONFIG.update(DEFAULT_CONFIG)
    neighbors_triton.CONFIG.update(INTERPRETER_CONFIG)
    neighbors_triton.CONFIG.update(case.get("config", {}))
    if kind == "needs_rebuild":
        flag = neighbors_triton.needs_rebuild(**args)
        return {"flag": bool(flag)}
    if kind == "dispatch":
        nb = neighbors.neighbor_list(backend="triton", **args)
    else:
        nb = neighbors_triton.neighbor_list(**args)
    out = {
        "edge_index": nb.edge_index,
        "shifts": nb.shifts,
        "vectors": nb.vectors,
        "distances": nb.distances,
        "num_pairs": int(nb.num_pairs),
        "overflow": bool(nb.overflow),
        "mask": nb.mask,
        "cell_error": None if nb.cell_error is None else int(nb.cell_error),
    }
    return out


def main(cases_path, results_path):
    assert neighbors_triton.interpreting()
    interpreter_speedup.install()
    cases = torch.load(cases_path, weights_only=False)
    results = {}
    for case in cases:
        try:
            results[case["name"]] = run(case)
        except TorchmdxError as err:
            results[case["name"]] = {"error": type(err).__name__, "message": str(err)}
    torch.save(results, results_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
