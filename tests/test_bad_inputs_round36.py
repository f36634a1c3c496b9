"""Bad inputs, round 36 (branch bad36): round 35's leftover (a huge atom count in a later frame of an xyz file),
then new inputs; see docs/bad_inputs.md, round 36.
"""

from __future__ import annotations

import gzip

from bad_inputs_common import at_most, lj_file, refused_exactly, train_yaml


def test_xyz_atom_count_too_large_in_a_later_frame(tmp_path, capsys, monkeypatch):
    """A second frame whose atom count is 10**12 over one atom line: ``data info`` and ``md`` ran on for hours
    (ASE's index scan reads a line per atom past the end of the file; round 35 compared only the first frame's
    count with the file); a gzip'd copy the same."""
    monkeypatch.chdir(tmp_path)
    lj_file(tmp_path)
    text = "1\n\nAr 0 0 0\n1000000000000\n\nAr 0 0 0\n"
    (tmp_path / "a.xyz").write_text(text)
    (tmp_path / "b.xyz.gz").write_bytes(gzip.compress(text.encode()))
    tail = ("line 4: frame 1's atom count is 1000000000000, but only 1 line(s) follow its comment line: the count is "
            "too large (make it 1?), or the file is cut short")
    with at_most(30):  # the base commit's ASE scan: hours
        refused_exactly(capsys, ["data", "info", "a.xyz"], "error: a.xyz: " + tail, tmp_path)
        refused_exactly(capsys, ["data", "info", "b.xyz.gz"], "error: b.xyz.gz: " + tail, tmp_path)
        refused_exactly(capsys, ["md", "a.xyz", "--model", "lj.pt", "--steps", "2"], "error: a.xyz: " + tail,
                        tmp_path)
        refused_exactly(capsys, ["export", "lj.pt", "--openmm", "--structure", "a.xyz", "-o", "x.pt"],
                        "error: --structure: a.xyz: " + tail, tmp_path)


def test_a_batch_fraction_of_less_than_one_batch(tmp_path, capsys, monkeypatch):
    """``trainer.limit_train_batches: 0.01`` of 3 training batches (or ``limit_val_batches: 0.5`` of 1): Lightning's
    MisconfigurationException traceback when training started ("... but 0.01 * 3 < 1. Please increase the
    `limit_train_batches` argument"), the run folder (splits, config, data summary) left behind."""
    work = train_yaml(tmp_path, monkeypatch)
    refused_exactly(capsys, ["train", "t.yaml", "--set", "trainer.limit_train_batches=0.01"],
                    "error: config key 'trainer.limit_train_batches' is 0.01 of the 3 training batch(es) per epoch "
                    "(12 structures, batches of 4), less than one batch (nothing to train on): give at least 0.334, "
                    "or a number of batches (a whole number, e.g. 1)", work)
    refused_exactly(capsys, ["train", "t.yaml", "--set", "trainer.limit_val_batches=0.5"],
                    "error: config key 'trainer.limit_val_batches' is 0.5 of the 1 validation batch(es) per epoch "
                    "(4 structures, batches of 4), less than one batch (nothing to validate on): give at least 1, or "
                    "a number of batches (a whole number, e.g. 1)", work)


def test_xyz_atom_count_too_large_in_a_middle_frame_is_not_called_too_small(tmp_path, capsys, monkeypatch):
    """Frame 1's count 3 over one atom line, another frame after it: ASE read the next frame's count and comment
    lines as atoms and failed on its atom line, and the line said the opposite of what is wrong ("frame 1's atom
    count is 3, but 4 atom lines follow ...: the count may be too small; make it 4")."""
    monkeypatch.chdir(tmp_path)
    lj_file(tmp_path)
    comment = "energy=-1.0 Properties=species:S:1:pos:R:3"
    (tmp_path / "a.extxyz").write_text(f"1\n{comment}\nAr 0 0 0\n3\n{comment}\nAr 4 0 0\n1\n{comment}\nAr 8 0 0\n")
    line = ("error: a.extxyz: line 4: frame 1's atom count is 3, but only 1 atom line(s) follow its comment line "
            "(line 7, '1', a number where an atom line belongs: the next frame's atom count?): the count is too "
            "large; make it 1")
    refused_exactly(capsys, ["data", "info", "a.extxyz"], line, tmp_path)
    refused_exactly(capsys, ["md", "a.extxyz", "--model", "lj.pt", "--steps", "2", "--index", ":"], line, tmp_path)


def test_xyz_atom_count_a_little_too_large_in_the_last_frame(tmp_path, capsys, monkeypatch):
    """Frame 1's count 5 over one atom line, at the end of the file: ASE's "Frame has 1 atoms, expected 5" named
    neither the frame nor the line (round 35 gave the first frame's count its line, before ASE reads)."""
    monkeypatch.chdir(tmp_path)
    lj_file(tmp_path)
    comment = "energy=-1.0 Properties=species:S:1:pos:R:3"
    (tmp_path / "a.extxyz").write_text(f"1\n{comment}\nAr 0 0 0\n5\n{comment}\nAr 4 0 0\n")
    line = ("error: a.extxyz: line 4: frame 1's atom count is 5, but only 1 line(s) follow its comment line: the count "
            "is too large (make it 1?), or the file is cut short")
    refused_exactly(capsys, ["data", "info", "a.extxyz"], line, tmp_path)
    refused_exactly(capsys, ["md", "a.extxyz", "--model", "lj.pt", "--steps", "2"], line, tmp_path)


def test_a_misspelt_choice_in_a_config_says_which_was_meant(tmp_path, capsys, monkeypatch):
    """``train.augment: rotation``, ``model.dtype: Float32``, ``train.lr_schedule: cosin``: the choices were listed
    without saying which was probably meant (round 35 did it for the command line's choices)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.yaml").write_text("data: {path: e.npz}\nrun_dir: runs/t\n")
    for key, value, choices, meant in (
            ("train.augment", "rotation", "'none', 'rotations', 'rotations_reflections'", "rotations"),
            ("model.dtype", "Float32", "'float32', 'float64'", "float32"),
            ("train.lr_schedule", "cosin", "'plateau', 'cosine', 'constant'", "cosine")):
        refused_exactly(capsys, ["train", "t.yaml", "--set", f"{key}={value}"],
                        f"error: config key '{key}' must be one of {choices}, got '{value}' (did you mean '{meant}'?)",
                        tmp_path)
    # nothing close: the choices alone, as before
    refused_exactly(capsys, ["train", "t.yaml", "--set", "train.loss=cauchy"],
                    "error: config key 'train.loss' must be one of 'mse', 'l1', 'huber', got 'cauchy'", tmp_path)


def test_xyz_atom_count_too_large_after_a_byte_order_mark(tmp_path, capsys, monkeypatch):
    """A UTF-8 byte-order mark before an xyz whose count (first or later frame) is 10**12: ``data info`` and ``md``
    ran on for hours (the marked text went to ASE without round 35's check or the guard)."""
    monkeypatch.chdir(tmp_path)
    lj_file(tmp_path)
    (tmp_path / "a.xyz").write_bytes(b"\xef\xbb\xbf1\n\nAr 0 0 0\n1000000000000\n\nAr 0 0 0\n")
    (tmp_path / "b.xyz").write_bytes(b"\xef\xbb\xbf1000000000000\n\nAr 0 0 0\n")
    tail = ("frame {}'s atom count is 1000000000000, but only 1 line(s) follow its comment line: the count is too large "
            "(make it 1?), or the file is cut short")
    with at_most(30):  # the base commit's ASE scan: hours
        for name, where in (("a.xyz", "line 4: " + tail.format(1)), ("b.xyz", "line 1: " + tail.format(0))):
            refused_exactly(capsys, ["data", "info", name], f"error: {name}: {where}", tmp_path)
            refused_exactly(capsys, ["md", name, "--model", "lj.pt", "--steps", "2"], f"error: {name}: {where}",
                            tmp_path)
