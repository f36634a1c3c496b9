"""``torchmdx label`` (torchmdx.md.label):

- GFN2-xTB labels equal tblite's ASE calculator run directly (skipped without tblite);
- without tblite, ``--method gfn2-xtb`` is one line with the install command, before anything
  is read or written;
- atomic and resumable (with a ``model:`` method, which needs no tblite): an interrupted run
  leaves no output and a partial file of complete frames; the same command continues it
  (labelling only the rest) and gives the frames of an uninterrupted run; a half-written last
  frame is dropped; a partial file of other structures, an existing output, an unknown method
  are one-line errors that change nothing;
- frames sampled by ``torchmdx md`` with a model (replicas, Langevin) are labelled with
  ``--skip`` / ``--every`` and read back by the training data reader.
"""

import sys

import numpy as np
import pytest
from ase.build import molecule
from ase.io import read, write

from torchmdx.cli.main import main
from torchmdx.md import label as label_module
from torchmdx.md.label import LabelOptions, complete_frames_text, label


def ethanol_frames(n=6, seed=0):
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = molecule("CH3CH2OH")
        atoms.positions += rng.normal(0, 0.04, size=atoms.positions.shape)
        frames.append(atoms)
    return frames


@pytest.fixture
def bonds_model(tmp_path):
    """A harmonic-bond model of ethanol (a torchmdx model file): the labelling method of the
    resume tests, and the MD model of the sampling test."""
    from ase.neighborlist import natural_cutoffs, neighbor_list

    from torchmdx.nn.analytic import HarmonicBonds

    atoms = molecule("CH3CH2OH")
    i, j, d = neighbor_list("ijd", atoms, natural_cutoffs(atoms))
    keep = i < j
    model = HarmonicBonds(np.stack([i[keep], j[keep]], 1).tolist(), d[keep].tolist(), k=20.0, num_atoms=len(atoms))
    path = tmp_path / "bonds.pt"
    model.save(path)
    return path


def snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()}


def test_gfn2_xtb_labels_equal_tblite_run_directly(tmp_path):
    tblite_ase = pytest.importorskip("tblite.ase", reason="tblite is not installed (pip install 'torchmdx[label]')")
    frames = ethanol_frames(3)
    write(tmp_path / "in.extxyz", frames)
    assert main(["label", str(tmp_path / "in.extxyz"), "--method", "gfn2-xtb", "-o", str(tmp_path / "out.extxyz"),
                 "--no-progress"]) == 0
    labelled = read(tmp_path / "out.extxyz", ":")
    assert len(labelled) == 3
    for source, frame in zip(read(tmp_path / "in.extxyz", ":"), labelled):  # the positions as written (8 decimals)
        atoms = source.copy()
        atoms.calc = tblite_ase.TBLite(method="GFN2-xTB", verbosity=0)
        assert frame.get_potential_energy() == pytest.approx(atoms.get_potential_energy(), abs=1e-8)
        np.testing.assert_allclose(frame.get_forces(), atoms.get_forces(), atol=1e-7)  # extxyz: 8 decimals
        assert frame.info["label_method"] == "gfn2-xtb"
    assert abs(labelled[0].get_potential_energy() - labelled[1].get_potential_energy()) > 1e-4


def test_missing_tblite_is_one_line_with_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tblite", None)  # import tblite -> ImportError
    monkeypatch.setitem(sys.modules, "tblite.ase", None)
    write(tmp_path / "in.extxyz", ethanol_frames(2))
    before = snapshot(tmp_path)
    assert main(["label", str(tmp_path / "in.extxyz"), "--method", "gfn2-xtb", "-o", str(tmp_path / "out.extxyz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tblite" in err[0] and "pip install 'torchmdx[label]'" in err[0], err
    assert snapshot(tmp_path) == before


def test_interrupted_labelling_resumes_to_the_same_frames(tmp_path, bonds_model):
    frames = ethanol_frames(6)
    write(tmp_path / "in.extxyz", frames)
    method = f"model:{bonds_model}"
    # an uninterrupted run, for reference
    reference = label([tmp_path / "in.extxyz"], tmp_path / "ref.extxyz", LabelOptions(method=method), progress=False)
    assert reference["frames"] == 6 and not (tmp_path / "ref.extxyz.partial").exists()
    calls = []
    real = label_module.make_labeler(LabelOptions(method=method))

    def interrupted(atoms):
        calls.append(atoms.info["label_index"])
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(atoms)

    out = tmp_path / "out.extxyz"
    with pytest.raises(KeyboardInterrupt):
        label([tmp_path / "in.extxyz"], out, LabelOptions(method=method), progress=False, labeler=interrupted)
    assert not out.exists()
    partial = tmp_path / "out.extxyz.partial"
    assert len(read(partial, ":", format="extxyz")) == 3
    # a half-written frame at the end (a crash in the middle of a write) is dropped
    with open(partial, "a") as handle:
        handle.write("9\nProperties=species:S:1:pos:R:3 energy=1.0\nC 0.0 0.0\n")
    calls.clear()

    def counting(atoms):
        calls.append(atoms.info["label_index"])
        return real(atoms)

    summary = label([tmp_path / "in.extxyz"], out, LabelOptions(method=method), progress=False, labeler=counting)
    assert calls == [3, 4, 5] and summary["resumed_from"] == 3 and summary["frames"] == 6
    assert not partial.exists()
    got, want = read(out, ":"), read(tmp_path / "ref.extxyz", ":")
    for a, b in zip(got, want):
        assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=1e-10)
        np.testing.assert_allclose(a.get_forces(), b.get_forces(), atol=1e-10)
    # the energies are the model's on the input positions, and they differ between frames
    import torchmdx

    model = torchmdx.load_model(bonds_model)
    for source, frame in zip(read(tmp_path / "in.extxyz", ":"), got):
        assert frame.get_potential_energy() == pytest.approx(model.predict(source)["energy"], abs=1e-9)
    assert len({round(f.get_potential_energy(), 8) for f in got}) == 6


def test_bad_label_inputs_are_one_line_and_change_nothing(tmp_path, bonds_model, capsys):
    write(tmp_path / "in.extxyz", ethanol_frames(3))
    write(tmp_path / "other.extxyz", ethanol_frames(3, seed=9))
    method = f"model:{bonds_model}"
    label([tmp_path / "other.extxyz"], tmp_path / "half.extxyz", LabelOptions(method=method), progress=False)
    (tmp_path / "half.extxyz").rename(tmp_path / "out.extxyz.partial")  # a partial file of other structures
    write(tmp_path / "done.extxyz", ethanol_frames(1))
    rows = [
        (["--method", "dft"], "is not known"),
        (["--method", "model:missing.pt"], "not found"),
        (["-o", str(tmp_path / "done.extxyz")], "exists; pass --force"),
        (["-o", str(tmp_path / "out.csv")], "extended XYZ"),
        ([], "differs from the input"),
        (["--every", "0"], "--every"),
    ]
    for extra, message in rows:
        before = snapshot(tmp_path)
        args = ["label", str(tmp_path / "in.extxyz"), "--method", method, "-o", str(tmp_path / "out.extxyz"),
                "--no-progress"] + extra
        assert main(args) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (extra, err)
        assert snapshot(tmp_path) == before, extra


def test_complete_frames_of_a_truncated_file():
    text = "2\nc\nH 0 0 0\nH 0 0 1\n1\nc\nH 0 0 0\n3\nc\nH 0 0 0\n"
    kept, count = complete_frames_text(text)
    assert count == 2 and kept == "2\nc\nH 0 0 0\nH 0 0 1\n1\nc\nH 0 0 0\n"
    assert complete_frames_text("2\nc\nH 0 0 0\nH 0 0 1")[1] == 0  # no newline at the end: unfinished


def test_md_frames_with_a_model_are_labelled_and_readable_as_training_data(tmp_path, bonds_model):
    """Sampling new frames: torchmdx md (Langevin, 2 replicas) with a model, then label them."""
    write(tmp_path / "start.xyz", molecule("CH3CH2OH"))
    assert main(["md", str(tmp_path / "start.xyz"), "--model", str(bonds_model), "--steps", "60", "--every", "10",
                 "--replicas", "2", "--ensemble", "langevin", "--temperature", "300", "--dtype", "float64",
                 "--out", str(tmp_path / "frames.extxyz"), "--no-progress"]) == 0
    files = sorted(tmp_path.glob("frames.*.extxyz"))
    assert len(files) == 2 and all(len(read(f, ":")) == 7 for f in files)  # steps 0, 10, ..., 60
    out = tmp_path / "labelled.extxyz"
    assert main(["label", *map(str, files), "--method", f"model:{bonds_model}", "--skip", "1", "--every", "2",
                 "-o", str(out), "--no-progress"]) == 0
    labelled = read(out, ":")
    assert len(labelled) == 6  # per file frames 1, 3, 5
    assert [f.info["label_source"] for f in labelled[:3]] == [f"{files[0].name}:{k}" for k in (1, 3, 5)]
    from torchmdx.data.formats import read_structures

    structures = read_structures(out)  # what data.path of a training config reads
    assert len(structures) == 6
    np.testing.assert_allclose(structures.energy, [f.get_potential_energy() for f in labelled], atol=1e-9)
    np.testing.assert_allclose(structures.forces, np.concatenate([f.get_forces() for f in labelled]), atol=1e-9)
