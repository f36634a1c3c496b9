"""Bad inputs, round 39 (branch bad39): interrupted work, data in another length unit, ...; see docs/bad_inputs.md,
round 39."""

from __future__ import annotations

import errno
import os
import shutil

import numpy as np
import torch
from bad_inputs_common import train_yaml, water_npz


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


def test_positions_in_another_length_unit_are_said(tmp_path, capsys, monkeypatch):
    """MD17 waters in Å read with ``--length-unit Bohr`` (O-H bonds of 0.51 Å), or coordinates in Bohr read as Å
    (O-H 1.8 Å): the forces are converted with the positions, so they still fit the energies, and `data info` and
    `train` said nothing (a model of a squeezed or stretched molecule)."""
    from torchmdx.cli.main import main
    from torchmdx.data.formats import read_structures
    from torchmdx.train.data_checks import label_unit_warnings

    monkeypatch.chdir(tmp_path)
    water_npz(tmp_path)
    assert main(["data", "prepare", "e.npz", "--length-unit", "Bohr"]) == 0
    capsys.readouterr()
    assert main(["data", "info", "e.npz", "--length-unit", "Bohr"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note")]
    assert notes == ["note         e.npz: the atoms are 0.523 times as far from their nearest neighbours as bonds are "
                     "(median over 60 atoms of nearest distance / sum of covalent radii, read in data.length_unit "
                     "Bohr; 0.9 to 1.0 in molecules and solids) (positions in Å read as Bohr?): every distance is "
                     "scaled, and the forces with them; check data.length_unit"]
    assert main(["data", "prepare", "e.npz"]) == 0  # in Å: nothing said
    capsys.readouterr()
    assert main(["data", "info", "e.npz"]) == 0
    assert "note" not in capsys.readouterr().out
    data = dict(np.load(tmp_path / "e.npz"))
    data["R"] = data["R"] / 0.529177  # written in Bohr, read as Å
    np.savez(tmp_path / "b.npz", **data)
    assert label_unit_warnings(read_structures(tmp_path / "b.npz"), "b.npz") == [
        "b.npz: the atoms are 1.88 times as far from their nearest neighbours as bonds are (median over 40 hydrogen "
        "atoms of nearest distance / sum of covalent radii, read in the format's own length unit; 0.9 to 1.0 in "
        "molecules and solids) (positions in Bohr read as Å?): every distance is scaled, and the forces with them; "
        "check data.length_unit"]


def test_resume_over_a_metrics_log_with_a_damaged_tail(tmp_path, capsys):
    """A metrics.csv whose end is NUL bytes (a write cut short by a crash: the file's size was written, its data
    not) or a damaged row: ``train --resume`` stopped with "ValueError: could not convert string to float: '\\x00...'"
    (a traceback) while reading the log's earlier rows back."""
    from torchmdx.train.run import _previous_metric_rows

    checkpoint = tmp_path / "last.ckpt"
    torch.save({"epoch": 2}, checkpoint)
    rows = "epoch,lr,step\n0,,2\n0,0.001,2\n1,,5\n1,0.001,5\n"
    log = tmp_path / "metrics.csv"
    for tail, where, shown in ((b"\0" * 300, "line 6", repr("\0" * 20 + "...")), (b"1x,abc\n", "line 6", "'1x'")):
        log.write_bytes(rows.encode() + tail)
        kept = _previous_metric_rows(log, checkpoint)
        assert [(row["epoch"], row["step"]) for row in kept] == [("0", "2"), ("0", "2"), ("1", "5"), ("1", "5")]
        assert capsys.readouterr().err.splitlines() == [
            f"warning: {log}: {where} is not a row of the log ({shown}: a write cut short?); the rows before it are "
            "kept and the resumed epochs logged after them (epochs in the damaged part have no row)"]
    log.write_bytes(rows.encode() + b"\xff\xfe")  # bytes that are not UTF-8
    assert len(_previous_metric_rows(log, checkpoint)) == 4
    assert "is not a row of the log" in capsys.readouterr().err
