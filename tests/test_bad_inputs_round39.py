"""Bad inputs, round 39 (branch bad39): interrupted work, data in another length unit, ...; see docs/bad_inputs.md,
round 39."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch
from bad_inputs_common import train_yaml


def _checkpoint_io(tmp_path, monkeypatch):
    from torchmdx.train.config import load_run_config
    from torchmdx.train.run import build_trainer

    work = train_yaml(tmp_path, monkeypatch)
    cfg = load_run_config(work / "t.yaml")
    return work, build_trainer(cfg, work / "runs" / "t").strategy.checkpoint_io


def test_a_checkpoint_write_cut_short_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    """Lightning wrote a checkpoint to a file in the system temporary folder and moved it onto last.ckpt: across
    file systems (a run folder on a scratch or network disk) the move is a copy, and a Ctrl-C or SIGTERM during it
    left a last.ckpt cut short; a missing or full temporary folder failed the run (FileNotFoundError traceback)."""
    work, checkpoint_io = _checkpoint_io(tmp_path, monkeypatch)
    last = work / "runs" / "t" / "checkpoints" / "last.ckpt"
    checkpoint_io.save_checkpoint({"epoch": 1, "weights": torch.arange(1000.0)}, last)
    old = last.read_bytes()
    rename = os.rename

    def other_file_system(src, dst, *args, **kwargs):  # as the kernel does for a rename across file systems
        if os.path.dirname(os.path.abspath(src)) != os.path.dirname(os.path.abspath(dst)):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return rename(src, dst, *args, **kwargs)

    def copy_interrupted(src, dst, *args, **kwargs):  # Ctrl-C half way through the copy
        with open(src, "rb") as a, open(dst, "wb") as b:
            b.write(a.read()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", other_file_system)
    monkeypatch.setattr(shutil, "copyfile", copy_interrupted)
    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(system_tmp))
    try:
        checkpoint_io.save_checkpoint({"epoch": 2, "weights": torch.arange(2000.0)}, last)
    except KeyboardInterrupt:
        pass
    assert last.read_bytes() == old or torch.load(last, weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    assert list(system_tmp.iterdir()) == []
    # a temporary folder that is gone (or full): the checkpoint still goes into the run folder
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "gone"))
    checkpoint_io.save_checkpoint({"epoch": 3}, last)
    assert torch.load(last, weights_only=True)["epoch"] == 3
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
