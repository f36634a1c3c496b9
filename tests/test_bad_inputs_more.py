"""More bad inputs (the hunt of docs/bad_inputs.md): each row is one input that gave a traceback
or silent garbage before, now one ``error:`` line, a non-zero exit and nothing written.

Each row: a setup function ``(tmp_path, shared_data) -> CLI arguments`` and the fragments the
error line must hold. Every row checks: exit status 2, exactly one line on stderr starting with
``error: `` and holding every fragment, and every file under ``tmp_path`` unchanged (bytes and
modification time; nothing added or removed). Python-API cases follow the table.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from torchmdx.cli.main import main

ETHANOL = ("md17", "md17_ethanol_xtb.npz")


def _ethanol(shared_data, frames=20):
    with np.load(shared_data.joinpath(*ETHANOL)) as npz:
        return {"R": npz["R"][:frames], "z": npz["z"], "E": npz["E"][:frames], "F": npz["F"][:frames]}


def _npz(tmp_path, shared_data, name="bad.npz", **changes):
    arrays = {**_ethanol(shared_data), **changes}
    np.savez(tmp_path / name, **arrays)
    return tmp_path / name


# ---------------------------------------------------------------------------------- setups


def npz_fractional_atomic_number(t, s):
    z = _ethanol(s)["z"].astype(np.float64)
    z[0] = 6.5  # was read as carbon (astype truncates)
    return ["data", "info", _npz(t, s, z=z), "--cache-dir", t / "cache"]


def cache_dir_is_a_file(t, s):
    (t / "cache").write_text("a file\n")
    return ["data", "prepare", _npz(t, s), "--cache-dir", t / "cache"]


def cache_dir_under_a_file(t, s):
    (t / "cache").write_text("a file\n")
    return ["data", "prepare", _npz(t, s), "--cache-dir", t / "cache" / "sub"]


CASES = [
    (npz_fractional_atomic_number, ["bad.npz", "atomic number 6.5 of atom 0 is not a whole number"]),
    (cache_dir_is_a_file, ["cache folder", "cache is a file, not a folder", "--cache-dir"]),
    (cache_dir_under_a_file, ["cache is a file, not a folder"]),
]


def snapshot(folder):
    """Every file under ``folder``: bytes and modification time."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, folder)] = (handle.read(), os.stat(path).st_mtime_ns)
    return files


@pytest.mark.parametrize("setup, fragments", CASES, ids=[c[0].__name__ for c in CASES])
def test_refused_with_one_line_and_nothing_written(tmp_path, shared_data, capsys, monkeypatch, setup, fragments):
    monkeypatch.chdir(tmp_path)
    args = [str(a) for a in setup(tmp_path, shared_data)]
    before = snapshot(tmp_path)
    capsys.readouterr()
    rc = main(args)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert rc == 2, captured
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert snapshot(tmp_path) == before
