"""Bad inputs, round 37 (branch bad37): round 36's leftovers, then new inputs; see docs/bad_inputs.md, round 37.
"""

from __future__ import annotations

from bad_inputs_common import at_most, lj_file, refused_exactly


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
