"""Bad inputs to ``torchmdx md``: one ``error:`` line, exit status 2, nothing written.

Each row of :data:`CASES` builds files in ``tmp_path`` (earlier runs, broken files, models),
then calls ``torchmdx md`` in process. Every row checks the CLI's contract for a refused run:
exit status 2, exactly one line on stderr (``error: ...``, no traceback) containing the row's
fragment (and none of its forbidden fragments), and every file in ``tmp_path`` unchanged (same
bytes, same modification time, no file added or removed). New md options get a row here.

The tests after the table check what the refusals point to: ``--truncate`` and ``--out``
after a refusal, the formats ASE writes, and the warnings that do not stop a run.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from ase.cluster import Icosahedron
from ase.io import read, write

import torchmdx
from torchmdx.cli.main import main
from torchmdx.md.io import load_restart, read_thermo
from torchmdx.nn.analytic import LennardJones
from torchmdx.nn.base import Potential
from torchmdx.nn.model_file import register_potential

EPS, SIG = 0.0104, 3.4
# a run of 13 argon atoms: 5 fs steps, a frame every 10 steps, a restart file every 30
RUN = ["--dt", "5", "--every", "10", "--restart-every", "30", "--temperature", "100", "--dtype", "float64"]


@register_potential
class AlwaysNaNLJ(Potential):
    """Finite weights, NaN energies and forces: a model that is broken, not its weights."""

    kind = "test_always_nan_lj"

    def __init__(self):
        super().__init__()
        self.inner = LennardJones(EPS, SIG)
        self.cutoff = self.inner.cutoff

    def hparams(self):
        return {}

    def atomic_energies(self, graph):
        return self.inner.atomic_energies(graph) * float("nan")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Model files: Lennard-Jones argon (fast runs), a tiny untrained ET, the same ET with NaN
    weights (written into the file, as a diverged training run leaves them), a NaN-output LJ."""
    folder = tmp_path_factory.mktemp("models")
    LennardJones(EPS, SIG).save(folder / "lj.pt")
    et = torchmdx.build_model({"embedding_dimension": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8,
                               "cutoff_upper": 4.0, "seed": 1})
    et.save(folder / "et.pt")
    payload = torch.load(folder / "et.pt", weights_only=True)
    for name, tensor in payload["state_dict"].items():
        if tensor.is_floating_point() and tensor.numel() > 1:
            tensor.fill_(float("nan"))
    torch.save(payload, folder / "et_nan.pt")
    AlwaysNaNLJ().save(folder / "nan_out.pt")
    return folder


def md(*args) -> int:
    return main(["md", *map(str, args), "--no-progress"])


def argon(tmp_path, name="ar.xyz"):
    write(tmp_path / name, Icosahedron("Ar", 2))
    return tmp_path / name


def earlier_run(tmp_path, models, steps=60, out="A.extxyz", keep_at=30):
    """A run of ``steps`` steps into ``out``, and ``A_<keep_at>.restart.pt``: its restart file
    as it was at step ``keep_at`` (an older restart file)."""
    structure = argon(tmp_path)
    stem = out.rsplit(".", 1)[0]
    assert md(structure, "--model", models / "lj.pt", *RUN, "--steps", keep_at, "--out", tmp_path / out) == 0
    shutil.copy(tmp_path / f"{stem}.restart.pt", tmp_path / f"A_{keep_at}.restart.pt")
    if steps > keep_at:
        assert md("--model", models / "lj.pt", *RUN, "--steps", steps, "--out", tmp_path / out,
                  "--restart", tmp_path / f"{stem}.restart.pt") == 0
    return structure


# ---------------------------------------------------------------------------------- setups
# each takes (tmp_path, models) and returns the md arguments


def restart_from_older_file(t, m):
    earlier_run(t, m)
    return ["--model", m / "lj.pt", *RUN, "--steps", 40, "--out", t / "A.extxyz", "--restart", t / "A_30.restart.pt"]


def restart_over_later_restart_file(t, m):
    earlier_run(t, m)  # A.restart.pt is at step 60; the new trajectory C.extxyz does not exist
    return ["--model", m / "lj.pt", *RUN, "--steps", 40, "--out", t / "C.extxyz", "--restart-out", t / "A.restart.pt",
            "--restart", t / "A_30.restart.pt"]


def half_written_frame(t, m):
    earlier_run(t, m, steps=30)
    data = (t / "A.extxyz").read_bytes()
    (t / "A.extxyz").write_bytes(data + data[:len(data) // 8])  # a killed run's next frame, cut short
    return ["--model", m / "lj.pt", *RUN, "--steps", 60, "--out", t / "A.extxyz", "--restart", t / "A.restart.pt"]


def half_written_log_row(t, m):
    earlier_run(t, m, steps=30)
    with open(t / "A.csv", "ab") as f:
        f.write(b"40,0.2,-0.45")
    return ["--model", m / "lj.pt", *RUN, "--steps", 60, "--out", t / "A.extxyz", "--restart", t / "A.restart.pt"]


def out_onto_existing_trajectory(t, m):
    earlier_run(t, m, steps=30)
    return [argon(t), "--model", m / "lj.pt", *RUN, "--steps", 10, "--out", t / "A.extxyz"]


def restart_out_onto_existing_restart_file(t, m):
    earlier_run(t, m, steps=30)
    return [argon(t), "--model", m / "lj.pt", *RUN, "--steps", 10, "--out", t / "new.extxyz",
            "--restart-out", t / "A.restart.pt"]


def out_onto_input_structure(t, m):
    return [argon(t), "--model", m / "lj.pt", "--steps", 10, "--out", t / "ar.xyz", "--force"]


def restart_out_onto_model(t, m):
    shutil.copy(m / "lj.pt", t / "lj.pt")
    return [argon(t), "--model", t / "lj.pt", "--steps", 10, "--out", t / "x.extxyz", "--restart-out", t / "lj.pt"]


def out_is_a_folder(t, m):
    (t / "traj.extxyz").mkdir()
    return [argon(t), "--model", m / "lj.pt", "--steps", 10, "--out", t / "traj.extxyz"]


def out_under_a_file(t, m):
    (t / "notes.txt").write_text("a file, not a folder\n")
    return [argon(t), "--model", m / "lj.pt", "--steps", 10, "--out", t / "notes.txt" / "x.extxyz"]


def replica_trajectory_exists(t, m):
    (t / "R.1.extxyz").write_text("1\nstep=0\nAr 0 0 0\n")  # structure 1's file of an earlier run
    return [argon(t), "--model", m / "lj.pt", "--steps", 10, "--replicas", 2, "--out", t / "R.extxyz"]


def log_is_the_trajectory(t, m):
    return [argon(t), "--model", m / "lj.pt", "--steps", 10, "--out", t / "x.extxyz", "--log", t / "x.extxyz"]


def steps_below_restart_step(t, m):
    earlier_run(t, m, steps=30)
    return ["--model", m / "lj.pt", *RUN, "--steps", 20, "--out", t / "A.extxyz", "--restart", t / "A.restart.pt"]


def steps_at_restart_step(t, m):
    earlier_run(t, m, steps=30)
    return ["--model", m / "lj.pt", *RUN, "--steps", 30, "--out", t / "A.extxyz", "--restart", t / "A.restart.pt"]


def truncate_without_restart(t, m):
    return [argon(t), "--model", m / "lj.pt", "--steps", 10, "--out", t / "x.extxyz", "--truncate"]


def force_with_restart(t, m):
    earlier_run(t, m)
    return ["--model", m / "lj.pt", *RUN, "--steps", 40, "--out", t / "A.extxyz", "--restart", t / "A_30.restart.pt",
            "--force"]


def restart_into_pdb(t, m):
    earlier_run(t, m, steps=30, out="A.pdb")
    return ["--model", m / "lj.pt", *RUN, "--steps", 60, "--out", t / "A.pdb", "--restart", t / "A.restart.pt"]


def restart_into_foreign_trajectory(t, m):
    earlier_run(t, m, steps=30)
    write(t / "other.extxyz", [Icosahedron("Ar", 2)] * 2)  # frames without step numbers
    return ["--model", m / "lj.pt", *RUN, "--steps", 60, "--out", t / "other.extxyz", "--restart", t / "A.restart.pt"]


def unknown_extension(t, m):
    return [argon(t), "--model", m / "lj.pt", "--steps", 10, "--out", t / "x.foo"]


def single_frame_format(t, m):
    return [argon(t), "--model", m / "lj.pt", "--steps", 10, "--out", t / "POSCAR.vasp"]


def index_past_the_last_frame(t, m):
    return [argon(t), "--model", m / "lj.pt", "--steps", 10, "--index", 5, "--out", t / "x.extxyz"]


def index_not_a_selection(t, m):
    return [argon(t), "--model", m / "lj.pt", "--steps", 10, "--index", "last", "--out", t / "x.extxyz"]


def yaml_without_md_section(t, m):
    (t / "md.yaml").write_text(f"mdx:\n  model: {m / 'lj.pt'}\n  steps: 10\n")
    return [argon(t), "--config", t / "md.yaml", "--out", t / "x.extxyz"]


def dt_flag(t, m):
    return [argon(t), "--model", m / "lj.pt", "--dt", -1, "--out", t / "x.extxyz"]


def dt_in_yaml(t, m):
    (t / "md.yaml").write_text("md:\n  dt: -1\n")
    return [argon(t), "--config", t / "md.yaml", "--model", m / "lj.pt", "--out", t / "x.extxyz"]


def nan_weights(t, m):
    return [argon(t), "--model", m / "et_nan.pt", "--steps", 10, "--out", t / "x.extxyz"]


def nan_output(t, m):
    return [argon(t), "--model", m / "nan_out.pt", "--steps", 10, "--out", t / "x.extxyz"]


def nan_output_ase_engine(t, m):
    return [argon(t), "--model", m / "nan_out.pt", "--steps", 10, "--engine", "ase", "--out", t / "x.extxyz"]


CASES = [
    # (setup, fragments the error line must hold, fragments it must not hold)
    (restart_from_older_file, ["A.extxyz holds frames up to step 60", "past step 30", "--truncate", "another --out"], []),
    (restart_over_later_restart_file, ["A.restart.pt is at step 60", "past step 30", "--truncate"], []),
    (half_written_frame, ["A.extxyz ends in a half-written frame after step 30 (a killed run?): pass --truncate"],
     ["Traceback"]),
    (half_written_log_row, ["A.csv ends in a half-written row after step 30 (a killed run?): pass --truncate"], []),
    (out_onto_existing_trajectory, ["A.extxyz exists (the trajectory of an earlier run)", "--force",
                                    "--restart"], []),
    (restart_out_onto_existing_restart_file, ["A.restart.pt exists (the restart file of an earlier run)",
                                              "another --restart-out"], []),
    (out_onto_input_structure, ["--out", "over the input structure file"], []),
    (restart_out_onto_model, ["--restart-out", "over the input model file"], []),
    (out_is_a_folder, ["--out", "traj.extxyz is a folder"], []),
    (out_under_a_file, ["notes.txt is a file, not a folder"], []),
    (replica_trajectory_exists, ["R.1.extxyz exists (the trajectory of an earlier run)", "--force"], []),
    (log_is_the_trajectory, ["the trajectory (--out) and the thermo log (--log) would both be"], []),
    (steps_below_restart_step, ["--steps 20 is the total number of steps", "at step 30 already",
                                "nothing to run"], []),
    (steps_at_restart_step, ["--steps 30 is the total", "at step 30 already"], []),
    (truncate_without_restart, ["--truncate", "needs --restart"], []),
    (force_with_restart, ["--force", "--truncate"], []),
    (restart_into_pdb, ["A.pdb", "keeps no step numbers", "another --out"], []),
    (restart_into_foreign_trajectory, ["other.extxyz: frame 0 has no step number"], []),
    (unknown_extension, ["--out", "x.foo: unknown trajectory format '.foo'", ".extxyz", ".pdb"], []),
    (single_frame_format, ["POSCAR.vasp", "holds one frame, not a trajectory"], []),
    (index_past_the_last_frame, ["ar.xyz holds 1 frame(s)", "--index 5 selects none"], ["StopIteration"]),
    (index_not_a_selection, ["--index 'last' is not a frame selection"], []),
    (yaml_without_md_section, ["md.yaml: no 'md:' section", "'mdx'", "did you mean 'md'"], ["md.mdx"]),
    (dt_flag, ["error: --dt must be > 0 fs, got -1.0"], ["md.dt"]),
    (dt_in_yaml, ["config key 'md.dt' in", "md.yaml must be > 0 fs"], []),
    (nan_weights, ["model", "NaN or infinite"], ["initial structure"]),
    (nan_output, ["the model gives non-finite forces (NaN/inf) on atom 0 of structure 0 at the initial positions",
                  "check the model"], ["initial structure"]),
    (nan_output_ase_engine, ["the model gives non-finite", "check the model"], ["initial structure"]),
]


def snapshot(folder):
    """Every file under ``folder``: bytes and modification time (for a FIFO or other non-file
    entry its mode: reading it would wait forever)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if not os.path.isfile(path):
                files[os.path.relpath(path, folder)] = ("not a file", os.stat(path).st_mode)
                continue
            with open(path, "rb") as handle:
                files[os.path.relpath(path, folder)] = (handle.read(), os.stat(path).st_mtime_ns)
    return files


def one_error_line(rc, captured, fragments) -> str:
    """Assert a refusal: exit status 2 and exactly one ``error:`` line on stderr holding every
    fragment; returns the line."""
    lines = captured.err.splitlines()
    assert rc == 2, captured
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.mark.parametrize("setup, fragments, forbidden", CASES, ids=[c[0].__name__ for c in CASES])
def test_refused_with_one_line_and_nothing_touched(tmp_path, models, capsys, setup, fragments, forbidden):
    args = setup(tmp_path, models)
    before = snapshot(tmp_path)
    capsys.readouterr()
    line = one_error_line(md(*args), capsys.readouterr(), fragments)
    for fragment in forbidden:
        assert fragment not in line, (fragment, line)
    after = snapshot(tmp_path)
    assert sorted(after) == sorted(before)  # nothing added, nothing removed
    for name in before:
        assert after[name] == before[name], f"{name} changed"


# -------------------------------------------------------------- what the refusals point to


def test_truncate_drops_later_frames_and_continues_as_the_original_run(tmp_path, models, capsys):
    """The refused case with --truncate: frames and rows after step 30 go (said on stdout), the
    run continues from step 30, and (the native engine is bit-for-bit) the files end exactly as
    an uninterrupted run to 60 writes them."""
    earlier_run(tmp_path, models)
    original = {name: (tmp_path / name).read_bytes() for name in ("A.extxyz", "A.csv")}
    assert [f.info["step"] for f in read(tmp_path / "A.extxyz", ":")] == [0, 10, 20, 30, 40, 50, 60]
    capsys.readouterr()
    assert md("--model", models / "lj.pt", *RUN, "--steps", 40, "--out", tmp_path / "A.extxyz",
              "--restart", tmp_path / "A_30.restart.pt", "--truncate") == 0
    printed = capsys.readouterr().out
    assert f"--truncate: dropped 3 frames after step 30 from {tmp_path / 'A.extxyz'}" in printed
    assert f"3 log rows after step 30 from {tmp_path / 'A.csv'}" in printed
    assert [f.info["step"] for f in read(tmp_path / "A.extxyz", ":")] == [0, 10, 20, 30, 40]
    assert [r["step"] for r in read_thermo(tmp_path / "A.csv")] == [0, 10, 20, 30, 40]
    assert load_restart(tmp_path / "A.restart.pt")["step"] == 40
    assert md("--model", models / "lj.pt", *RUN, "--steps", 60, "--out", tmp_path / "A.extxyz",
              "--restart", tmp_path / "A.restart.pt") == 0
    for name, data in original.items():
        assert (tmp_path / name).read_bytes() == data, name


def test_truncate_drops_a_half_written_frame(tmp_path, models, capsys):
    earlier_run(tmp_path, models, steps=30)
    complete = (tmp_path / "A.extxyz").read_bytes()
    (tmp_path / "A.extxyz").write_bytes(complete + complete[:100])
    capsys.readouterr()
    assert md("--model", models / "lj.pt", *RUN, "--steps", 40, "--out", tmp_path / "A.extxyz",
              "--restart", tmp_path / "A.restart.pt", "--truncate") == 0
    assert f"dropped a half-written frame from {tmp_path / 'A.extxyz'}" in capsys.readouterr().out
    frames = read(tmp_path / "A.extxyz", ":")
    assert [f.info["step"] for f in frames] == [0, 10, 20, 30, 40]
    assert (tmp_path / "A.extxyz").read_bytes().startswith(complete)


def test_restart_into_new_files_keeps_the_old_ones(tmp_path, models):
    """--out NEW after the refusal: the old files stay as they were; the new trajectory starts
    with the restart file's step."""
    earlier_run(tmp_path, models)
    before = snapshot(tmp_path)
    assert md("--model", models / "lj.pt", *RUN, "--steps", 50, "--out", tmp_path / "B.extxyz",
              "--restart", tmp_path / "A_30.restart.pt") == 0
    after = snapshot(tmp_path)
    assert all(after[name] == before[name] for name in before)
    assert [f.info["step"] for f in read(tmp_path / "B.extxyz", ":")] == [30, 40, 50]
    np.testing.assert_array_equal(read(tmp_path / "B.extxyz", 2).positions, read(tmp_path / "A.extxyz", 5).positions)


def test_force_writes_over_an_earlier_run(tmp_path, models):
    earlier_run(tmp_path, models, steps=30)
    assert md(tmp_path / "ar.xyz", "--model", models / "lj.pt", *RUN, "--steps", 10, "--out", tmp_path / "A.extxyz",
              "--force") == 0
    assert [f.info["step"] for f in read(tmp_path / "A.extxyz", ":")] == [0, 10]
    assert [r["step"] for r in read_thermo(tmp_path / "A.csv")] == [0, 10]


@pytest.mark.parametrize("suffix", [".pdb", ".cif"])
def test_trajectory_in_the_format_the_extension_names(tmp_path, models, suffix):
    """--out x.pdb / x.cif: written by ASE's writer for that format (not extended XYZ under
    that name), read back by ASE as that format with the positions of the extxyz run."""
    structure = argon(tmp_path)
    common = [structure, "--model", models / "lj.pt", *RUN, "--steps", 20]
    assert md(*common, "--out", tmp_path / "ref.extxyz") == 0
    assert md(*common, "--out", tmp_path / f"x{suffix}") == 0
    text = (tmp_path / f"x{suffix}").read_text()
    assert ("MODEL" in text and "ATOM" in text) if suffix == ".pdb" else "_atom_site_type_symbol" in text
    assert "Properties=" not in text
    frames = read(tmp_path / f"x{suffix}", ":", format="proteindatabank" if suffix == ".pdb" else "cif")
    reference = read(tmp_path / "ref.extxyz", ":")
    assert len(frames) == len(reference) == 3
    for frame, ref in zip(frames, reference):
        np.testing.assert_allclose(frame.positions, ref.positions, atol=2e-3)


def test_no_restart_file_listed_when_none_was_written(tmp_path, models, capsys):
    """--steps 0 writes the first frame and the log, and no restart file: the outputs line and
    the summary say so."""
    assert md(argon(tmp_path), "--model", models / "lj.pt", "--steps", 0, "--out", tmp_path / "z.extxyz") == 0
    outputs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("outputs")][0]
    assert not (tmp_path / "z.restart.pt").exists() and "z.restart.pt" not in outputs
    assert "z.extxyz" in outputs and "z.csv" in outputs
    assert json.loads((tmp_path / "z.summary.json").read_text())["restart"] is None


def test_close_atoms_and_extreme_temperature_warn_but_run(tmp_path, models, capsys):
    """Atoms 0.05 Å apart: a warning naming the pair and the element-pair limit (half the sum of
    ASE's covalent radii: H 0.31 Å, so 0.31 Å for H-H); a temperature of 1e9 K: a warning
    naming the limit the run stops at. Neither is an error."""
    from ase import Atoms

    h2 = Atoms("HHAr", positions=[[0, 0, 0], [0.05, 0, 0], [3.0, 0, 0]])
    write(tmp_path / "close.xyz", h2)
    capsys.readouterr()
    assert md(tmp_path / "close.xyz", "--model", models / "et.pt", "--steps", 0, "--out", tmp_path / "c.extxyz") == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: {tmp_path / 'close.xyz'}: atoms 0 and 1 (H-H) are 0.05 Å apart, closer than 0.31 Å (half the sum "
                   "of their covalent radii): no model was trained on that; check the structure"]
    assert md(argon(tmp_path), "--model", models / "lj.pt", "--steps", 0, "--temperature", 1e9,
              "--out", tmp_path / "hot.extxyz") == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: --temperature 1e+09 K is far above")
    assert "the run stops above 5e+09 K (--max-temperature)" in err[0]
    # a normal structure: no warning
    assert md(argon(tmp_path), "--model", models / "lj.pt", "--steps", 0, "--out", tmp_path / "ok.extxyz") == 0
    assert capsys.readouterr().err == ""


def test_help_states_the_default_temperature_limit(capsys):
    with pytest.raises(SystemExit):
        main(["md", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-temperature" in text and "default: max(2000, 5 x --temperature)" in text


def test_nan_weights_are_named_as_a_model_problem():
    """The Python API says which weight is not finite (the CLI may refuse the file earlier)."""
    from torchmdx.errors import SimulationError
    from torchmdx.md.engine import Simulation

    model = LennardJones(EPS, SIG)
    model.register_buffer("scale", torch.tensor([float("nan")]))
    model.atomic_energies = lambda graph: LennardJones.atomic_energies(model, graph) * model.scale
    sim = Simulation(model, Icosahedron("Ar", 2), dtype=torch.float64)
    with pytest.raises(SimulationError, match=r"^the model's weights are not finite \(NaN/inf in 'scale'\)"):
        sim.initialize()
