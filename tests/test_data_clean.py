"""`torchmdx data clean` and the build-time line about older caches left in the cache folder.

What is removed: caches of another cache version, damaged ones, those whose source is gone, and
the temporary files of interrupted builds; never a current cache or a file without the marker.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from torchmdx.cli.main import main
from torchmdx.data.cache import CACHE_VERSION, build_cache, is_current

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv):
    code = main(["data", "clean", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def source(shared_data, tmp_path):
    path = tmp_path / "raw" / "ethanol.npz"
    path.parent.mkdir()
    shutil.copy(shared_data / "md17" / "md17_ethanol_xtb.npz", path)
    return path


def make_old(cache: Path, name: str, version=CACHE_VERSION - 1) -> Path:
    """A copy of ``cache`` under another cache name, marked as made by ``version``."""
    old = cache.with_name(name)
    shutil.copy(cache, old)
    with h5py.File(old, "r+") as h5:
        h5.attrs["torchmdx_cache_version"] = version
    return old


def not_a_cache(folder: Path) -> Path:
    """An HDF5 file of the user's (no cache marker), named like a cache and of a removed source."""
    path = folder / "ethanol.npz.md17.0123456789abcdef.h5"
    with h5py.File(path, "w") as h5:
        h5["energy"] = np.arange(3.0)
        h5.attrs["source"] = "/no/such/file.npz"
    return path


def test_current_cache_stays_old_version_is_removed(source, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    current = build_cache(source, cache_dir=cache_dir, say=lambda line: None)
    old = make_old(current, "ethanol.npz.md17.00000000000000aa.h5")
    user = tmp_path / "cache" / "mine.h5"
    with h5py.File(user, "w") as h5:
        h5["x"] = np.zeros(4)
    before_user = user.read_bytes()

    code, out, err = run_cli(capsys, cache_dir)
    assert code == 0, err
    lines = out.strip().splitlines()
    size = os.path.getsize(current)  # the old file is a byte copy of the current one, but for one attribute
    assert lines[0].startswith(f"removed {old} (")
    assert lines[0].endswith(f"made by cache version {CACHE_VERSION - 1} (this is version {CACHE_VERSION})")
    assert lines[-1] == f"removed 1 file(s), freed {size / 1e6:.1f} MB"
    assert len(lines) == 2
    assert not old.exists()
    assert current.is_file() and is_current(current, source)
    assert user.read_bytes() == before_user

    code, out, err = run_cli(capsys, cache_dir)
    assert code == 0 and out.strip() == f"nothing to remove in {cache_dir}"


def test_build_names_older_caches_and_deletes_nothing(source, tmp_path):
    cache_dir = tmp_path / "cache"
    said = []
    current = build_cache(source, cache_dir=cache_dir, say=said.append)
    assert said == []  # nothing older yet
    old = make_old(current, "ethanol.npz.md17.00000000000000aa.h5", version=3)
    other_source = make_old(current, "ethanol.npz.md17.00000000000000bb.h5", version=3)
    with h5py.File(other_source, "r+") as h5:  # same file name, another folder: not this source's
        h5.attrs["source"] = "/elsewhere/ethanol.npz"
    current.unlink()  # the next build writes
    rebuilt = build_cache(source, cache_dir=cache_dir, say=said.append)
    assert rebuilt == current and current.is_file()
    gb = os.path.getsize(old) / 1e9
    assert said == [f"1 older cache file(s) of {source.resolve()} remain in {cache_dir} ({gb:.1f} GB); "
                    f"`torchmdx data clean {cache_dir}` removes them"]
    assert old.is_file() and other_source.is_file()  # never deleted by a build
    # a build that reuses the current cache says nothing
    said.clear()
    build_cache(source, cache_dir=cache_dir, say=said.append)
    assert said == []


def test_orphaned_damaged_and_interrupted_are_removed(source, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    current = build_cache(source, cache_dir=cache_dir, say=lambda line: None)
    other = tmp_path / "raw" / "gone.npz"
    shutil.copy(source, other)
    orphan = build_cache(other, cache_dir=cache_dir, say=lambda line: None)
    other.unlink()
    damaged = make_old(current, "ethanol.npz.md17.00000000000000cc.h5", version=CACHE_VERSION)
    with h5py.File(damaged, "r+") as h5:
        h5["energy"][0] = h5["energy"][0] + 1.0  # a value changed behind its checksum
    truncated = cache_dir / "ethanol.npz.md17.00000000000000dd.h5"
    truncated.write_bytes(current.read_bytes()[:5000])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    from torchmdx.data.cache_file import _host

    leftover = cache_dir / f".{current.name}.tmp-{_host()}-{pid}"
    leftover.write_bytes(b"\0" * 100)
    parts = cache_dir / f".{current.name}.tmp-{_host()}-{pid}.parts"
    parts.mkdir()
    (parts / "pos").write_bytes(b"\0" * 300)
    live = cache_dir / f".{current.name}.tmp-{_host()}-{os.getpid()}"  # this process: alive
    live.write_bytes(b"\0" * 10)
    foreign = cache_dir / f".{current.name}.tmp-otherhost-{pid}"  # another host's build: not ours to judge
    foreign.write_bytes(b"\0" * 10)
    user = not_a_cache(cache_dir)
    text = cache_dir / "notes.txt"
    text.write_text("keep me")

    code, out, err = run_cli(capsys, "--dry-run", cache_dir)
    assert code == 0, err
    listed = {line.split(" (")[0].removeprefix("would remove ") for line in out.strip().splitlines()[:-1]}
    expected = {str(p) for p in (orphan, damaged, truncated, leftover, parts)}
    assert listed == expected
    assert out.strip().splitlines()[-1].startswith("5 file(s) would be removed, freeing ")
    assert all(Path(p).exists() for p in expected)  # a dry run removes nothing
    assert f"its source {other.resolve()} no longer exists" in out
    assert "damaged (the values of dataset 'energy'" in out
    assert "damaged: not a readable HDF5 file" in out
    assert out.count("left by an interrupted build") == 2

    freed = sum(os.path.getsize(p) for p in (orphan, damaged, truncated, leftover)) + 300  # parts: one file
    code, out, err = run_cli(capsys, cache_dir)
    assert code == 0, err
    assert not any(Path(p).exists() for p in expected)
    for kept in (current, live, foreign, user, text):
        assert kept.exists(), kept
    assert is_current(current, source)
    last = out.strip().splitlines()[-1]
    assert last == f"removed 5 file(s), freed {freed / 1e6:.1f} MB"


def test_freed_space_is_the_sum_of_the_removed_files(source, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    current = build_cache(source, cache_dir=cache_dir, say=lambda line: None)
    olds = [make_old(current, f"ethanol.npz.md17.{k:016x}.h5", version=2) for k in range(3)]
    total = sum(os.path.getsize(p) for p in olds)
    code, out, err = run_cli(capsys, cache_dir, "--dry-run")
    assert out.strip().splitlines()[-1] == (f"3 file(s) would be removed, freeing {total / 1e6:.1f} MB "
                                            "(dry run: nothing removed)")
    assert all(p.exists() for p in olds)
    code, out, err = run_cli(capsys, cache_dir)
    assert out.strip().splitlines()[-1] == f"removed 3 file(s), freed {total / 1e6:.1f} MB"
    assert sorted(cache_dir.iterdir()) == [current]


def test_bad_folder_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code, out, err = run_cli(capsys, missing)
    assert code == 2 and out == "" and err == f"error: {missing}: no such cache folder\n"
    afile = tmp_path / "file.h5"
    afile.write_bytes(b"x")
    code, out, err = run_cli(capsys, afile)
    assert code == 2 and out == ""
    assert err == f"error: {afile}: not a folder (give the cache folder: torchmdx data clean CACHE_DIR)\n"
    assert afile.read_bytes() == b"x"


def test_default_folder_is_the_data_commands_default(tmp_path):
    """Without CACHE_DIR it cleans data/cache under the current folder, the default of
    `data prepare` (DataConfig.cache_dir)."""
    from torchmdx.data.data_config import DataConfig

    assert DataConfig(path="x").cache_dir == "data/cache"
    folder = tmp_path / "data" / "cache"
    folder.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torchmdx", "data", "clean"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "nothing to remove in data/cache"
    done = subprocess.run([sys.executable, "-m", "torchmdx", "data", "clean"], cwd=tmp_path / "data", env=env,
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr == "error: data/cache: no such cache folder\n"
