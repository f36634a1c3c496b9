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

from test_bad_inputs_md import one_error_line, snapshot

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


def npz_duplicated_atom(t, s):
    R = _ethanol(s)["R"].copy()
    R[3, 4] = R[3, 2]  # atom 4 of frame 3 on atom 2: read fine, then training named 'atoms 2 and 4' of a batch
    return ["data", "info", _npz(t, s, R=R), "--cache-dir", t / "cache"]


def md17_xyz_frame_of_no_atoms(t, s):
    text = (s / "md17" / "ethanol_snip.xyz").read_text().splitlines(keepends=True)
    (t / "frames.xyz").write_text("0\n" + "".join(text[1:]))  # was an IndexError traceback
    return ["data", "info", t / "frames.xyz", "--format", "md17-xyz", "--cache-dir", t / "cache"]


def cache_dir_is_a_file(t, s):
    (t / "cache").write_text("a file\n")
    return ["data", "prepare", _npz(t, s), "--cache-dir", t / "cache"]


def cache_dir_under_a_file(t, s):
    (t / "cache").write_text("a file\n")
    return ["data", "prepare", _npz(t, s), "--cache-dir", t / "cache" / "sub"]


def _overwritten(source, target, offset, size=256):
    data = bytearray(source.read_bytes())
    data[offset:offset + size] = b"\xa5" * size
    target.write_bytes(bytes(data))
    return target


def h5_with_damaged_link_table(t, s):
    # bytes 2000.. of the ANI-1x sample hold an object header: h5py's visit raised RuntimeError
    return ["data", "info", _overwritten(s / "ani" / "ani1x_xtb.h5", t / "damaged.h5", 2000), "--cache-dir", t / "c"]


def damaged_cache(t, s):
    assert main(["data", "prepare", str(_npz(t, s)), "--cache-dir", str(t / "cache")]) == 0
    (cache,) = (t / "cache").glob("*.h5")
    # bytes 1600.. hold a symbol table node: "group_names" in h5 raised RuntimeError
    _overwritten(cache, cache, 1600)
    return ["data", "info", _npz(t, s), "--cache-dir", t / "cache"]


def hdf5_file_read_as_md17(t, s):
    return ["data", "info", s / "ani" / "ani1_xtb.h5", "--format", "md17", "--cache-dir", t / "c"]


def _config(t, s):
    import yaml

    config = {"data": {"path": str(s.joinpath(*ETHANOL)), "cache_dir": str(t / "cache"), "train_size": 16,
                       "val_size": 8, "test_size": 8, "batch_size": 8},
              "model": {"embedding_dimension": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8,
                        "cutoff_upper": 4.0, "backend": "torch"},
              "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
              "run_dir": str(t / "run")}
    (t / "config.yaml").write_text(yaml.safe_dump(config))
    return t / "config.yaml"


def _train_setting(setting):
    """A setup: ``torchmdx train`` of a tiny config with one ``--set`` (refused before anything runs)."""
    def setup(t, s):
        return ["train", _config(t, s), "--set", setting]

    setup.__name__ = "train_" + setting.replace("=", "_").replace(".", "_")
    return setup


#: --set values that were tracebacks from Lightning/numpy, a misleading message, or silently used
TRAIN_SETTINGS = [
    ("trainer.devices=0", ["'trainer.devices' must be a count >= 1"]),          # Lightning traceback
    ("trainer.devices=-5", ["'trainer.devices' must be a count >= 1"]),         # Lightning traceback
    ("trainer.devices=[]", ["'trainer.devices' must list distinct device indices"]),
    ("trainer.strategy=magic", ["'trainer.strategy' must be 'auto' or one of", "ddp", "'magic'"]),  # traceback
    ("trainer.max_time=tomorrow", ["'trainer.max_time' must be 'DD:HH:MM:SS'"]),                    # traceback
    ("trainer.max_epochs=0", ["'trainer.max_epochs' must be >= 1"]),  # was "last.ckpt: checkpoint not found"
    ("trainer.max_steps=0", ["'trainer.max_steps' must be >= 1"]),
    ("trainer.limit_train_batches=0", ["'trainer.limit_train_batches' must be", "nothing to train on"]),
    ("data.seed=-1", ["'data.seed' must be between 0 and 4294967295"]),      # numpy traceback
    ("data.seed=99999999999999999999", ["'data.seed' must be between 0"]),  # OverflowError traceback
    ("train.seed=-3", ["'train.seed' must be between 0"]),
    ("model.seed=-3", ["'model.seed' must be between 0"]),
    ("train.energy_weight=.nan", ["'train.energy_weight' must be a finite number, got nan"]),  # trained on NaN weight
    ("train.scale=.inf", ["'train.scale' must be a finite number, got inf"]),                  # trained, exit 0
    ("train.shift=.nan", ["'train.shift' must be a finite number"]),   # was "training diverged ... smaller lr"
    ("train.lr=.inf", ["'train.lr' must be a finite number"]),         # was "training diverged"
    ("train.weight_decay=.nan", ["'train.weight_decay' must be a finite number"]),
    ("trainer.gradient_clip_val=.inf", ["'trainer.gradient_clip_val' must be a finite number"]),
]


def _damage_tensor_bytes(path):
    """Overwrite 64 bytes inside the largest tensor of a ``torch.save`` archive (its zip stays
    readable: only the member's CRC-32 tells)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    data[start:start + 64] = bytes(64)
    path.write_bytes(bytes(data))
    return path


def export_damaged_checkpoint(t, s):
    import torch

    torch.save({"state_dict": {"model.w": torch.arange(4096.0)}, "hyper_parameters": {"model": {}}}, t / "last.ckpt")
    _damage_tensor_bytes(t / "last.ckpt")
    return ["export", t / "last.ckpt", "-o", t / "model.pt"]


def _lj_and_argon(t):
    from torchmdx.nn.analytic import LennardJones

    LennardJones(0.0104, 3.4).save(t / "lj.pt")
    return [_write_argon(t), "--model", t / "lj.pt", "--steps", 4, "--no-progress"]


def md_restart_out_is_a_fifo(t, s):
    # the restart file is written to a temporary name and renamed: onto /dev/null (as root) that
    # replaced the device node with a regular file; a FIFO stands in for the device here
    os.mkfifo(t / "pipe")
    return ["md", *_lj_and_argon(t), "--restart-every", 2, "--out", t / "a.extxyz", "--restart-out", t / "pipe"]


def export_onto_a_fifo(t, s):
    import torch

    torch.save({"state_dict": {}}, t / "last.ckpt")
    os.mkfifo(t / "pipe")
    return ["export", t / "last.ckpt", "-o", t / "pipe", "--force"]


def _split_file(t, **parts):
    np.savez(t / "split.npz", **{"train": np.arange(16), "val": np.arange(16, 24), "test": np.arange(24, 32), **parts})
    return t / "split.npz"


def _train_with_split(**parts):
    def setup(t, s):
        config = _config(t, s)
        assert main(["data", "prepare", str(config)]) == 0  # the cache exists: the refusal writes nothing
        return ["train", config, "--set", f"data.split_file={_split_file(t, **parts)}"]

    return setup


split_twice_in_train = _train_with_split(train=np.array([1, 1, 2, 3, 4, 5]))
split_train_val_overlap = _train_with_split(val=np.arange(10, 18))
split_fractional_index = _train_with_split(train=np.arange(16) + 0.5)
split_2d_index = _train_with_split(train=np.arange(16).reshape(4, 4))
split_mixed_outside = _train_with_split(val=np.array([5, -1]))
for _name, _setup in list(globals().items()):
    if _name.startswith("split_") and callable(_setup) and _setup.__name__ == "setup":
        _setup.__name__ = _name


def split_file_not_npz(t, s):
    (t / "split.npz").write_text("not a split\n")
    config = _config(t, s)
    assert main(["data", "prepare", str(config)]) == 0
    return ["train", config, "--set", f"data.split_file={t / 'split.npz'}"]


def data_section_is_a_list(t, s):
    (t / "data.yaml").write_text("data:\n  - 1\n")
    return ["data", "info", t / "data.yaml"]  # from_dict's dict([1]) raised TypeError


def evaluate_data_section_is_a_list(t, s):
    from torchmdx.nn.analytic import LennardJones

    LennardJones(0.0104, 3.4).save(t / "lj.pt")
    (t / "data.yaml").write_text("data:\n  - 1\n")
    return ["evaluate", t / "lj.pt", "--data", t / "data.yaml", "--out", t / "report"]  # said "no 'data:' section"


def label_over_its_input_with_force(t, s):
    from torchmdx.nn.analytic import LennardJones

    LennardJones(0.0104, 3.4).save(t / "lj.pt")
    argon = _write_argon(t)
    return ["label", argon, "--method", f"model:{t / 'lj.pt'}", "-o", argon, "--force"]  # replaced its input


def label_frame_without_atoms(t, s):
    from torchmdx.nn.analytic import LennardJones

    LennardJones(0.0104, 3.4).save(t / "lj.pt")
    (t / "frames.xyz").write_text("0\n\n")  # was labelled 'energy=0.0' and written out
    return ["label", t / "frames.xyz", "--method", f"model:{t / 'lj.pt'}", "-o", t / "out.extxyz"]


def extxyz_frame_without_atoms(t, s):
    (t / "frames.extxyz").write_text('0\nProperties=species:S:1:pos:R:3 energy=0.0 pbc="F F F"\n')
    return ["data", "info", t / "frames.extxyz", "--cache-dir", t / "cache"]  # "atom offsets do not match"


CASES = [
    (npz_fractional_atomic_number, ["bad.npz", "atomic number 6.5 of atom 0 is not a whole number"]),
    (npz_duplicated_atom, ["bad.npz: atoms 2 and 4 of structure 3 are at the same position", "duplicated atom"]),
    (md17_xyz_frame_of_no_atoms, ["frames.xyz: line 1: a frame must have at least one atom, got 0"]),
    (cache_dir_is_a_file, ["cache folder", "cache is a file, not a folder", "--cache-dir"]),
    (cache_dir_under_a_file, ["cache is a file, not a folder"]),
    (h5_with_damaged_link_table, ["damaged.h5: the HDF5 file is damaged"]),
    (damaged_cache, [".h5: this cache is damaged and cannot be read", "data prepare --force"]),
    (export_damaged_checkpoint, ["last.ckpt: the checkpoint is damaged", "fails its CRC-32 checksum"]),
    (md_restart_out_is_a_fifo, ["--restart-out", "pipe: the restart file would replace a device, pipe or socket"]),
    (export_onto_a_fifo, ["pipe: is not a regular file (a device, pipe or socket)"]),
    (split_twice_in_train, ["split.npz: structure 1 is twice in train"]),       # was trained on twice, silently
    (split_train_val_overlap, ["split.npz: structure 10 is in both train and val"]),  # leaked, silently
    (split_fractional_index, ["split.npz: train holds float64 values such as 0.5"]),  # truncated, silently
    (split_2d_index, ["split.npz: train has shape (4, 4); expected a flat list"]),   # broadcast traceback
    (split_mixed_outside, ["split.npz: val index -1 outside the dataset"]),         # named the max, 5
    (split_file_not_npz, ["split.npz: not a split file", "not a zip archive"]),     # numpy's allow_pickle advice
    (data_section_is_a_list, ["config key 'data' must be a mapping of keys, got [1]"]),
    (evaluate_data_section_is_a_list, ["data.yaml: config key 'data' must be a mapping of keys"]),
    (label_over_its_input_with_force, ["ar.xyz would write the labelled frames over the input"]),
    (label_frame_without_atoms, ["frames.xyz: frame 0 has no atoms; nothing to label"]),
    (extxyz_frame_without_atoms, ["frames.extxyz: frame 0: has no atoms (an empty structure)"]),  # round 27: names the frame
    (hdf5_file_read_as_md17, ["ani1_xtb.h5: not an npz file", "is an HDF5 file", "--format"]),
] + [(_train_setting(setting), fragments) for setting, fragments in TRAIN_SETTINGS]


@pytest.mark.parametrize("setup, fragments", CASES, ids=[c[0].__name__ for c in CASES])
def test_refused_with_one_line_and_nothing_written(tmp_path, shared_data, capsys, monkeypatch, setup, fragments):
    refused_without_writes(tmp_path, shared_data, capsys, monkeypatch, setup, fragments)


def refused_without_writes(tmp_path, shared_data, capsys, monkeypatch, setup, fragments):
    """The CLI arguments ``setup`` makes give one error line holding ``fragments``, and nothing
    under ``tmp_path`` (the working folder) changes."""
    monkeypatch.chdir(tmp_path)
    args = [str(a) for a in setup(tmp_path, shared_data)]
    before = snapshot(tmp_path)
    capsys.readouterr()
    one_error_line(main(args), capsys.readouterr(), fragments)
    assert snapshot(tmp_path) == before


def test_non_utf8_file_name_builds_a_cache(tmp_path, shared_data):
    """A data file whose name is not UTF-8 (bytes Python decodes as surrogates): the cache is
    built and read back (writing the name into the HDF5 attributes raised UnicodeEncodeError).
    Run as a command: the terminal's stdout takes such names, pytest's capture does not."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    name = os.fsencode(str(tmp_path)) + b"/caf\xe9.npz"
    np.savez(os.fsdecode(name), **_ethanol(shared_data, frames=5))
    cli = [sys.executable, str(Path(__file__).resolve().parents[1] / "cli.py"), "data"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cli + [b"prepare", name, b"--cache-dir", str(tmp_path / "cache")], check=True, env=env,
                   capture_output=True)
    out = subprocess.run(cli + [b"info", name, b"--cache-dir", str(tmp_path / "cache"), b"--json"], check=True,
                         env=env, capture_output=True).stdout
    summary = json.loads(out)
    assert summary["n_structures"] == 5 and summary["source"].endswith("caf\\xe9.npz")
    assert len(list((tmp_path / "cache").glob("*.h5"))) == 1


def test_model_too_large_for_memory_is_one_line():
    """A typo'd size (embedding_dimension 10**8: a 40 GB embedding) was the allocator's traceback;
    run under a 4 GB address-space limit so that the allocation fails on any machine."""
    import subprocess
    import sys

    code = ("import resource, torchmdx\n"
            "resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
            "try:\n"
            "    torchmdx.build_model({'embedding_dimension': 10**8, 'num_heads': 1})\n"
            "except torchmdx.errors.ModelError as exc:\n"
            "    print('ModelError:', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.startswith("ModelError: building the model ran out of memory (one weight array needed "), out
    assert "check the sizes in the model: section" in out.stdout


def test_damaged_model_and_restart_files_are_refused(tmp_path):
    """Bytes overwritten inside a weight tensor: torch.load reads them without complaint (silently
    wrong weights, or positions of a restart file); the archive's CRC-32 tells. A model file cut
    short names the truncation."""
    import torchmdx
    from torchmdx.errors import DataError, ModelError
    from torchmdx.md.io import load_restart
    from torchmdx.nn.analytic import LennardJones

    model = torchmdx.build_model({"embedding_dimension": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8, "seed": 0})
    model.save(tmp_path / "model.pt")
    whole = (tmp_path / "model.pt").read_bytes()
    torchmdx.load_model(tmp_path / "model.pt")  # intact: loads
    _damage_tensor_bytes(tmp_path / "model.pt")
    with pytest.raises(ModelError, match=r"model.pt: the file is damaged: archive/data/\d+ fails its CRC-32"):
        torchmdx.load_model(tmp_path / "model.pt")
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ModelError, match="a torch archive that ends early or is damaged"):
        torchmdx.load_model(tmp_path / "cut.pt")
    LennardJones(0.0104, 3.4).save(tmp_path / "lj.pt")
    assert main(["md", str(_write_argon(tmp_path)), "--model", str(tmp_path / "lj.pt"), "--steps", "4",
                 "--restart-every", "2", "--out", str(tmp_path / "a.extxyz"), "--no-progress"]) == 0
    assert load_restart(tmp_path / "a.restart.pt")["step"] == 4
    _damage_tensor_bytes(tmp_path / "a.restart.pt")
    with pytest.raises(DataError, match="a.restart.pt: the restart file is damaged"):
        load_restart(tmp_path / "a.restart.pt")


def _write_argon(folder):
    from ase.cluster import Icosahedron
    from ase.io import write

    write(folder / "ar.xyz", Icosahedron("Ar", 2))
    return folder / "ar.xyz"


def test_calculator_refuses_unknown_and_bad_arguments(tmp_path):
    """Calculator(model, devise="cuda") ran on the CPU: ASE's base class kept the typo as an unused
    parameter. A negative skin or a compute_stress that is not a switch were taken as given."""
    import torchmdx
    from torchmdx.errors import ConfigError
    from torchmdx.nn.analytic import LennardJones

    lj = LennardJones(0.0104, 3.4)
    with pytest.raises(ConfigError, match=r"unknown argument devise='cuda' \(did you mean device=\?\)"):
        torchmdx.Calculator(lj, devise="cuda")
    with pytest.raises(ConfigError, match="skin must be a distance >= 0"):
        torchmdx.Calculator(lj, skin=-1.0)
    with pytest.raises(ConfigError, match="compute_stress must be 'auto', True or False, got 'yes'"):
        torchmdx.Calculator(lj, compute_stress="yes")
    assert torchmdx.Calculator(lj, label="x", skin=0).skin == 0.0  # ASE's own arguments still pass


def test_md_log_on_a_full_disk_is_one_line(tmp_path, capsys):
    """/dev/full as the thermo log (every write: ENOSPC): OSError's traceback from the log's
    first flush; now one line naming the file. (The log is opened in place, never renamed, so
    the device stays a device.)"""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    from torchmdx.cli.main import main

    args = [str(a) for a in _lj_and_argon(tmp_path)]
    capsys.readouterr()
    rc = main(["md", *args, "--out", str(tmp_path / "a.extxyz"), "--log", "/dev/full"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: /dev/full: cannot write the thermo log (No space left on device)"), err
    assert os.path.exists("/dev/full") and not os.path.isfile("/dev/full")


def test_save_onto_a_fifo_is_refused(tmp_path):
    import torchmdx
    from torchmdx.errors import ModelError
    from torchmdx.nn.analytic import LennardJones

    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ModelError, match="is not a regular file"):
        LennardJones(0.0104, 3.4).save(tmp_path / "pipe")
    assert not (tmp_path / "pipe").is_file()
    assert torchmdx  # the public API's save is Potential.save -> save_potential


def test_refused_write_is_one_line(monkeypatch, capsys):
    """A write the system refuses anywhere in a command (here: ENOSPC from the data summary)
    is one line naming the file, not a traceback."""
    import errno

    from torchmdx.cli import data_cmd
    from torchmdx.cli.main import main

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/cache/x.h5")

    monkeypatch.setattr(data_cmd, "run", full)
    assert main(["data", "info", "x"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: /data/cache/x.h5: No space left on device (the system refused the file operation: a full "
                   "disk, a quota, a read-only file system or missing permissions)"]


def test_out_of_memory_is_one_line(tmp_path):
    """md --replicas 100000000 (a typo): numpy's MemoryError traceback from copying the structure;
    now one line. Run under a 1.5 GB address-space limit so that it fails the same on any machine."""
    import subprocess
    import sys
    from pathlib import Path

    from torchmdx.nn.analytic import LennardJones

    LennardJones(0.0104, 3.4).save(tmp_path / "lj.pt")
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))\n"
            f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
            "from torchmdx.cli.main import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    out = subprocess.run([sys.executable, "-c", code, "md", str(_write_argon(tmp_path)), "--model",
                          str(tmp_path / "lj.pt"), "--steps", "1", "--replicas", "100000000", "--no-progress",
                          "--out", str(tmp_path / "r.extxyz")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1, out.stderr[-2000:]
    # round 8: refused before any copy is made, from the atoms x replicas against the free memory
    assert err[0].startswith("error: --replicas 100000000 makes 1,300,000,000 atoms (100000000 x 13)") \
        and "give fewer replicas" in err[0], err
    assert not list(tmp_path.glob("r*.extxyz"))


def test_atomic_writes_refuse_a_target_that_is_not_a_regular_file(tmp_path):
    """io_utils.atomic_write / atomic_path rename a temporary file onto the target: onto a pipe
    or a folder (or, as root, a device node) that would replace it. Refused in one line."""
    from torchmdx.errors import ConfigError
    from torchmdx.io_utils import atomic_path, atomic_write

    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "folder").mkdir()
    for target in (tmp_path / "pipe", tmp_path / "folder"):
        with pytest.raises(ConfigError, match="give the name of a file to write"):
            with atomic_write(target, "w") as handle:
                handle.write("x")
        with pytest.raises(ConfigError):
            with atomic_path(target) as tmp:
                tmp.write_text("x")
    assert not (tmp_path / "pipe").is_file() and (tmp_path / "folder").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "pipe"]  # no temporary left
    with atomic_write(tmp_path / "ok.txt", "w") as handle:  # a regular file (new or existing) is fine
        handle.write("x")
    assert (tmp_path / "ok.txt").read_text() == "x"


def test_python_dash_m_and_one_line_warnings(tmp_path):
    """``python -m torchmdx`` is the command line; a warning there is one ``warning:`` line."""
    import subprocess
    import sys
    import warnings as py_warnings

    done = subprocess.run([sys.executable, "-m", "torchmdx", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("torchmdx ")
    from torchmdx.errors import _one_line_warning

    out = tmp_path / "w.txt"
    with open(out, "w") as handle:
        _one_line_warning(py_warnings.WarningMessage("train.cuda_graph: the model is on cpu;\n  CUDA graphs need a GPU",
                                                     UserWarning, "x.py", 1).message, UserWarning, "x.py", 1, file=handle)
    assert out.read_text() == "warning: train.cuda_graph: the model is on cpu; CUDA graphs need a GPU\n"


def test_command_line_warnings_are_one_line(tmp_path):
    """A warning from a real command line (arguments from sys.argv) is one ``warning:`` line."""
    import subprocess
    import sys

    script = ("import sys, warnings; sys.argv = ['torchmdx', 'data', 'info', '--help']\n"
              "from torchmdx.cli import main as m\n"
              "def run(args):\n    warnings.warn('first part;\\n  second part', UserWarning)\n    return 0\n"
              "m.build_parser  # noqa\n"
              "import torchmdx.cli.data_cmd as d; d.run = run\n"
              "sys.argv = ['torchmdx', 'data', 'info', 'x']\n"
              "raise SystemExit(m.main())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines() == ["warning: first part; second part"], done.stderr
