"""Bad inputs, round 37 (branch bad37): round 36's leftovers, then new inputs; see docs/bad_inputs.md, round 37.
"""

from __future__ import annotations

import pytest
from bad_inputs_common import at_most, lj_file, refused_exactly, train_yaml


def test_xyz_atom_count_too_large_behind_a_utf16_mark_names_the_frame(tmp_path, capsys, monkeypatch):
    """A UTF-16 (or UTF-32) xyz file whose frame 1 has an atom count of 10**12 over one atom line: stopped by round
    36's guard, but the line named no frame ("an atom count is larger than the lines left in the file ..."): the
    frame was looked for in the file's bytes, where no line of UTF-16 text is a number."""
    monkeypatch.chdir(tmp_path)
    lj_file(tmp_path)
    text = "1\n\nAr 0 0 0\n1000000000000\n\nAr 0 0 0\n"
    (tmp_path / "a.xyz").write_bytes(text.encode("utf-16"))
    (tmp_path / "b.xyz").write_bytes(text.encode("utf-32"))
    tail = ("line 4: frame 1's atom count is 1000000000000, but only 1 line(s) follow its comment line: the count is "
            "too large (make it 1?), or the file is cut short")
    with at_most(30):
        refused_exactly(capsys, ["data", "info", "a.xyz"], "error: a.xyz: " + tail, tmp_path)
        refused_exactly(capsys, ["data", "info", "b.xyz"], "error: b.xyz: " + tail, tmp_path)
        refused_exactly(capsys, ["md", "a.xyz", "--model", "lj.pt", "--steps", "2"], "error: a.xyz: " + tail,
                        tmp_path)


def test_nan_or_inf_given_to_a_float_key_by_set_is_read_as_the_number(tmp_path, capsys, monkeypatch):
    """``--set trainer.gradient_clip_val=nan`` (or ``train.lr=-Inf``, ``train.scale=inf``): YAML reads the word as text,
    and the line named the parser's type ("must be float | null, got 'nan' (str)"); ``.nan`` in the file was
    "must be a finite number, got nan". The word is the number now, refused by the key's own check."""
    work = train_yaml(tmp_path, monkeypatch)
    for setting, line in [
        ("trainer.gradient_clip_val=nan", "config key 'trainer.gradient_clip_val' must be a finite number, got nan"),
        ("trainer.gradient_clip_val=INF", "config key 'trainer.gradient_clip_val' must be a finite number, got inf"),
        ("train.lr=-Inf", "config key 'train.lr' must be a finite number, got -inf"),
        ("train.scale=NaN", "config key 'train.scale' must be a finite number, got nan"),
    ]:
        refused_exactly(capsys, ["train", "t.yaml", "--set", setting], "error: " + line, work)
    # a text key given the word keeps the text (a plain str); a word in a config file stays text (round 11)
    import dataclasses

    from torchmdx.config import ConfigError, apply_overrides, from_dict

    @dataclasses.dataclass
    class Keys:
        name: str = "x"
        lr: float = 1.0

    cfg = from_dict(Keys, apply_overrides({}, ["s.name=NaN"])["s"], "s")
    assert type(cfg.name) is str and cfg.name == "NaN"
    with pytest.raises(ConfigError, match=r"^config key 's.lr' must be float, got 'nan' \(str\)$"):
        from_dict(Keys, {"lr": "nan"}, "s")


def test_fuse_integrator_choices_are_the_words_it_takes(tmp_path, capsys, monkeypatch):
    """``md --fuse-integrator True`` (or ``yes``): "invalid choice: 'True' (choose from 'auto', True, False)", a
    choice listed as refused (the option's choices were Python's True and False, its words 'true' and 'false')."""
    from test_bad_inputs_md import snapshot

    from torchmdx.cli.main import main

    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    for given, hint in (("True", "(did you mean 'true'?; "), ("yes", "(")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main(["md", "x.xyz", "--fuse-integrator", given])
        assert info.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"torchmdx md: error: argument --fuse-integrator: invalid choice: '{given}' {hint}choose from 'auto', "
            "'true', 'false')")
    assert snapshot(tmp_path) == before
