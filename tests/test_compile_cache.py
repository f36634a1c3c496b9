"""Compiled graphs kept across runs (torchmdx.nn.compile_cache).

- a second process compiling the same traced model finds it in the cache (inductor's FX-graph
  cache hit, no miss) and gives the eager model's energies and forces;
- other weights of the same config also hit (parameters are graph inputs, not constants) and
  give *their* eager values; a changed config (the cutoff) misses and is compiled afresh, with
  correct values: a stale graph is never reused;
- a cache made by another torch version, or with an unreadable manifest, is emptied and rebuilt
  with one line; the user's own TORCHINDUCTOR_CACHE_DIR is left alone.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from torchmdx.nn import compile_cache

PROBE = textwrap.dedent('''
    import json, sys, torch
    from torch._dynamo.utils import counters
    from torchmdx.nn import ETPotential
    from torchmdx.nn.traced import TracedForces
    cutoff, seed = float(sys.argv[1]), int(sys.argv[2])
    model = ETPotential({"embedding_dimension": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8,
                         "cutoff_upper": cutoff, "backend": "torch", "seed": seed, "dtype": "float64"})
    z = torch.tensor([6, 1, 1, 8, 1])
    pos = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1.2
    batch = torch.zeros(5, dtype=torch.long)
    pairs = model.neighbors(pos, batch, None, None, max_pairs=32)
    energy, forces, _ = TracedForces(model)(z, pos, batch, 1, pairs.edge_index, None, pairs.mask)
    eager = model(z, pos, batch)
    print("RESULT", json.dumps({"hit": counters["inductor"]["fxgraph_cache_hit"],
                                "miss": counters["inductor"]["fxgraph_cache_miss"],
                                "energy": float(energy[0]), "eager_energy": float(eager["energy"][0]),
                                "forces": float((forces - eager["forces"]).abs().max())}))
''')


def probe(tmp_path, cutoff, seed):
    env = {k: v for k, v in os.environ.items() if k != compile_cache.INDUCTOR_ENV}
    env[compile_cache.CACHE_ENV] = str(tmp_path / "cache")
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", PROBE, str(cutoff), str(seed)], capture_output=True, text=True,
                         env=env, timeout=600, cwd=Path(__file__).resolve().parents[1])
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line is not None, out.stderr[-2000:]
    result = json.loads(line[len("RESULT "):])
    # the traced graph's message interpolates the radial filters from tables (float64, 2 048
    # intervals: within 1e-9 of the exact filters the eager model evaluates)
    assert result["energy"] == pytest.approx(result["eager_energy"], abs=1e-10)
    assert result["forces"] < 1e-9
    return result


@pytest.mark.slow
def test_second_run_hits_the_cache_and_a_changed_config_does_not(tmp_path):
    first = probe(tmp_path, 4.0, 0)
    assert (first["hit"], first["miss"]) == (0, 1)
    assert (tmp_path / "cache" / compile_cache.MANIFEST).is_file() and (tmp_path / "cache" / "inductor").is_dir()
    again = probe(tmp_path, 4.0, 0)
    assert (again["hit"], again["miss"]) == (1, 0) and again["energy"] == pytest.approx(first["energy"], abs=1e-12)
    other_weights = probe(tmp_path, 4.0, 7)
    assert (other_weights["hit"], other_weights["miss"]) == (1, 0)
    assert abs(other_weights["energy"] - first["energy"]) > 1e-6  # its own weights, not the cached run's
    other_config = probe(tmp_path, 3.5, 0)
    assert (other_config["hit"], other_config["miss"]) == (0, 1)


def test_stale_or_unreadable_cache_is_rebuilt_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compile_cache, "_state", {"dir": None})
    monkeypatch.setenv(compile_cache.INDUCTOR_ENV, "")
    root = tmp_path / "cache"
    assert compile_cache.ensure(root) == root
    manifest = json.loads((root / compile_cache.MANIFEST).read_text())
    assert manifest["torch"] == __import__("torch").__version__
    assert os.environ[compile_cache.INDUCTOR_ENV] == str(root / "inductor")
    assert capsys.readouterr().out == ""  # a new cache says nothing
    (root / "inductor").mkdir(exist_ok=True)
    (root / "inductor" / "entry").write_text("compiled")
    (root / compile_cache.MANIFEST).write_text(json.dumps({**manifest, "torch": "0.0.1"}))
    compile_cache.ensure(root)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "torch 0.0.1 ->" in lines[0] and lines[0].endswith("rebuilt") and str(root) in lines[0]
    assert not (root / "inductor" / "entry").exists()
    (root / "inductor").mkdir(exist_ok=True)
    (root / "inductor" / "entry").write_text("compiled")
    (root / compile_cache.MANIFEST).write_text("{not json")
    compile_cache.ensure(root)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "unreadable manifest" in lines[0]
    assert not (root / "inductor" / "entry").exists()
    compile_cache.ensure(root)  # a good cache is left alone, silently
    assert capsys.readouterr().out == ""


def test_users_inductor_cache_dir_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_cache, "_state", {"dir": None})
    monkeypatch.setenv(compile_cache.INDUCTOR_ENV, str(tmp_path / "mine"))
    monkeypatch.setenv(compile_cache.CACHE_ENV, str(tmp_path / "torchmdx"))
    assert compile_cache.ensure() is None
    assert os.environ[compile_cache.INDUCTOR_ENV] == str(tmp_path / "mine")
    assert not (tmp_path / "torchmdx").exists()


def test_cache_errors_are_recognised():
    import pickle

    assert compile_cache.is_cache_error(EOFError("Ran out of input"))
    assert compile_cache.is_cache_error(pickle.UnpicklingError("invalid load key"))
    assert not compile_cache.is_cache_error(RuntimeError("CUDA out of memory"))
