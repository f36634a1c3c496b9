"""Bad inputs, round 16 (branch badin16): round 15's leftovers. md ``--index`` slices that ASE's extxyz
reader got wrong (``5:2:-1`` selected nothing, ``-3:5`` other frames), files that start with a UTF-8
byte-order mark, QM9 folders whose bad file was named only by the folder, training energies that are all the
same number, and float16 arrays in npz (and HDF5) files (see docs/bad_inputs.md, round 16).
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from ase.cluster import Icosahedron
from ase.io import write

from torchmdx.cli.main import main
from torchmdx.errors import DataError
from test_bad_inputs_md import one_error_line, snapshot
from test_bad_inputs_more import _ethanol
from test_bad_inputs_round9 import TINY, _qm9_folder

BOM = b"\xef\xbb\xbf"


def _lj(folder):
    from torchmdx.nn.analytic import LennardJones

    LennardJones(0.0104, 3.4).save(folder / "lj.pt")
    return folder / "lj.pt"


def _argon_frames(path, count=7):
    """``count`` argon clusters, frame n scaled by 1 + n/1000 and tagged ``info['n'] = n``."""
    frames = []
    for n in range(count):
        atoms = Icosahedron("Ar", 2)
        atoms.positions *= 1 + n / 1000
        atoms.info["n"] = n
        frames.append(atoms)
    write(path, frames, format="extxyz")
    return frames


# ---------------------------------------------------------------------------------- md --index slices
SLICES = ["5:2:-1", "::-1", "-1:-4:-1", ":2:-2", "6:0:-2", "-3:5", "-3:", "1:-1:2", "-100:2", "2:100",
          "5:2", "10:", "-9:-8", "::3", ":", "0:1"]


def test_md_index_slices_select_what_python_slicing_selects(tmp_path):
    """ASE's extxyz reader returned no frames for ``5:2:-1`` ("selects none of them") and frames 3, 4 for
    ``-3:5`` of 7 (Python's slicing: frame 4 alone), silently. A slice now selects what Python's slicing of
    the file's list of frames selects, and each frame is named by its number in the file."""
    from torchmdx.md.run import read_structures

    frames = _argon_frames(tmp_path / "ar.extxyz")
    for index in SLICES:
        expected = [a.info["n"] for a in frames[slice(*[int(p) if p else None for p in index.split(":")])]]
        sources = []
        if not expected:
            with pytest.raises(DataError, match=rf"ar\.extxyz holds 7 frame\(s\) \(0 to 6\): --index {index} "
                                                r"selects none of them"):
                read_structures([tmp_path / "ar.extxyz"], index)
            continue
        got = read_structures([tmp_path / "ar.extxyz"], index, sources=sources)
        assert [a.info["n"] for a in got] == expected, index
        names = [f"{tmp_path / 'ar.extxyz'} frame {n}" for n in expected] if len(expected) > 1 else \
            [str(tmp_path / "ar.extxyz")]
        assert sources == names, index


def test_md_cli_runs_a_reversed_slice_with_a_start(tmp_path, capsys):
    _argon_frames(tmp_path / "ar.extxyz")
    model = _lj(tmp_path)
    capsys.readouterr()
    rc = main(["md", str(tmp_path / "ar.extxyz"), "--model", str(model), "--steps", "2", "--index=5:2:-1",
               "--out", str(tmp_path / "out" / "t.extxyz"), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Traceback" not in captured.err and "error:" not in captured.err
    assert sorted(p.name for p in (tmp_path / "out").glob("t.*.extxyz")) == ["t.0.extxyz", "t.1.extxyz",
                                                                              "t.2.extxyz"]


# ---------------------------------------------------------------------------------- UTF-8 byte-order mark
def test_md_reads_a_structure_file_that_starts_with_a_byte_order_mark(tmp_path, shared_data, capsys):
    """A file saved by an editor that writes a UTF-8 byte-order mark was "cannot read a structure with ASE
    (Expected xyz header but got: invalid literal for int() ... '\\ufeff24')": it is read as without the mark."""
    from torchmdx.md.run import read_structures

    plain = (shared_data / "systems" / "caffeine.xyz").read_bytes()
    (tmp_path / "bom.xyz").write_bytes(BOM + plain)
    _argon_frames(tmp_path / "frames.extxyz")
    (tmp_path / "bomframes.extxyz").write_bytes(BOM + (tmp_path / "frames.extxyz").read_bytes())
    marked = read_structures([tmp_path / "bom.xyz"])
    unmarked = read_structures([shared_data / "systems" / "caffeine.xyz"])
    assert marked[0].get_chemical_symbols() == unmarked[0].get_chemical_symbols()
    assert np.array_equal(marked[0].positions, unmarked[0].positions)
    got = read_structures([tmp_path / "bomframes.extxyz"], "5:2:-1")  # the slice path reads the text too
    assert [a.info["n"] for a in got] == [5, 4, 3]
    model = _lj(tmp_path)
    capsys.readouterr()
    rc = main(["md", str(tmp_path / "bomframes.extxyz"), "--model", str(model), "--steps", "2",
               "--out", str(tmp_path / "out.extxyz"), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0 and "Traceback" not in captured.err and "error:" not in captured.err, captured.err


def test_data_readers_read_files_that_start_with_a_byte_order_mark(tmp_path, shared_data):
    """extxyz training data ("ASE cannot read it (XYZError: ... '\\ufeff26')") and MD17 xyz ("line 1: expected
    the number of atoms, got '\\ufeff9'") read as without the mark; so does a QM9 xyz file."""
    from torchmdx.data.formats import read_structures

    with open(shared_data / "polymer" / "polymers_xtb.extxyz", "rb") as handle:
        lines = handle.read(200_000).split(b"\n")
    head = b"\n".join(lines[:3 * 28]) + b"\n"  # three 26-atom frames
    (tmp_path / "plain.extxyz").write_bytes(head)
    (tmp_path / "bom.extxyz").write_bytes(BOM + head)
    md17 = (shared_data / "md17" / "ethanol_snip.xyz").read_bytes()
    (tmp_path / "bom17.xyz").write_bytes(BOM + md17)
    for marked, plain in ((tmp_path / "bom.extxyz", tmp_path / "plain.extxyz"),
                          (tmp_path / "bom17.xyz", shared_data / "md17" / "ethanol_snip.xyz")):
        a, b = read_structures(marked), read_structures(plain)
        assert np.array_equal(a.energy, b.energy) and np.array_equal(a.pos, b.pos), marked
        assert np.array_equal(a.forces, b.forces)
    folder = _qm9_folder(tmp_path, shared_data, molecules=2)
    first = sorted(folder.iterdir())[0]
    before = read_structures(folder, "qm9")
    first.write_bytes(BOM + first.read_bytes())
    after = read_structures(folder, "qm9")
    assert np.array_equal(before.energy, after.energy) and np.array_equal(before.pos, after.pos)


def test_a_byte_order_mark_before_content_ase_cannot_read_is_named(tmp_path, capsys):
    """A marked file whose content has no format ASE can read from text: the mark is named (was ASE's
    "Could not guess file type")."""
    (tmp_path / "x.structure").write_bytes(BOM + b"hello\nworld\n")
    model = _lj(tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    line = one_error_line(main(["md", str(tmp_path / "x.structure"), "--model", str(model), "--steps", "2",
                                "--out", str(tmp_path / "o.extxyz"), "--no-progress"]), capsys.readouterr(),
                          [f"{tmp_path / 'x.structure'}: starts with a UTF-8 byte-order mark (bytes EF BB BF)",
                           "save the file without the mark"])
    assert "Traceback" not in line
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------- QM9 folders
def test_qm9_folder_names_the_file_that_is_not_utf8(tmp_path, shared_data, capsys):
    """Was "qm9: cannot be read as qm9: it holds binary data where text was expected" (the folder)."""
    folder = _qm9_folder(tmp_path, shared_data, molecules=3)
    bad = sorted(folder.iterdir())[1]
    bad.write_bytes(bad.read_bytes().replace(b"C C\n", b"C C \xe9\n"))
    capsys.readouterr()
    line = one_error_line(main(["data", "info", str(folder), "--format", "qm9"]), capsys.readouterr(),
                          [f"{bad}: holds binary data where text was expected (line 8: byte b'\\xe9' is not "
                           "UTF-8); a QM9 xyz file is plain text"])
    assert "Traceback" not in line


@pytest.mark.parametrize("what, line_no, fragment", [
    ("coordinate", 4, "line 4: atom 1 (H) has a non-finite coordinate nan"),
    ("energy", 2, "line 2: property U0 (energy_U0) is nan; expected a finite number"),
])
def test_qm9_folder_names_the_file_with_a_nan(tmp_path, shared_data, capsys, what, line_no, fragment):
    """Was "qm9: non-finite coordinates (nan) in structure 1 (atom 1)" / "non-finite energy (nan) in
    structure 1": the folder and the structure's number in the sorted folder, not the file."""
    folder = _qm9_folder(tmp_path, shared_data, molecules=3)
    bad = sorted(folder.iterdir())[1]
    lines = bad.read_text().splitlines()
    parts = lines[line_no - 1].split()
    parts[1 if what == "coordinate" else 12] = "nan"
    lines[line_no - 1] = " ".join(parts)
    bad.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    one_error_line(main(["data", "info", str(folder), "--format", "qm9"]), capsys.readouterr(),
                   [f"{bad}: {fragment}"])


# ---------------------------------------------------------------------------------- all energies equal
def _config(tmp_path, path, **train):
    config = {"data": {"path": path, "cache_dir": "cache", "train_size": 12, "val_size": 4, "batch_size": 4},
              "model": dict(TINY), "train": train, "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1},
              "run_dir": "run"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    return "c.yaml"


@pytest.mark.parametrize("forces", [False, True])
def test_training_energies_all_equal_are_refused(tmp_path, shared_data, capsys, monkeypatch, forces):
    """Energies that are all one number (a converter that wrote a placeholder) trained to a zero loss without a
    word (energy-only), or pulled every structure towards one energy beside the forces. Refused before the run
    folder is made, as round 15's all-zero forces; ``data.check_labels: false`` trains on."""
    from torchmdx.train.config import load_run_config
    from torchmdx.train.run import prepare

    monkeypatch.chdir(tmp_path)
    arrays = _ethanol(shared_data, frames=20)
    arrays["E"] = np.full_like(arrays["E"], -97000.0)
    if not forces:
        del arrays["F"]
    np.savez("flat.npz", **arrays)
    name = _config(tmp_path, "flat.npz", **({} if forces else {"force_weight": 0.0}))
    capsys.readouterr()
    advice = "set train.energy_weight: 0 to train on the forces alone" if forces else \
        "energy-only training on them learns nothing"
    line = one_error_line(main(["train", name]), capsys.readouterr(),
                          ["flat.npz: every energy of the 12 training structures is -4206", "eV", advice,
                           "data.check_labels: false"])
    assert "Traceback" not in line
    assert not (tmp_path / "run").exists()
    overrides = ["data.check_labels=false"] + (["train.energy_weight=0"] if forces else [])
    for override in overrides:
        datamodule, _ = prepare(load_run_config(name, [override]))
        assert datamodule.dataset.n_structures == 20


def test_training_energies_that_differ_are_taken(tmp_path, shared_data, monkeypatch):
    """Only exactly equal energies are refused: one structure different passes."""
    from torchmdx.train.config import load_run_config
    from torchmdx.train.run import prepare

    monkeypatch.chdir(tmp_path)
    arrays = _ethanol(shared_data, frames=20)
    del arrays["F"]
    arrays["E"] = np.full_like(arrays["E"], -97000.0)
    arrays["E"][:: 2] += 1e-6
    np.savez("e.npz", **arrays)
    prepare(load_run_config(_config(tmp_path, "e.npz", force_weight=0.0)))


# ---------------------------------------------------------------------------------- float16
@pytest.mark.parametrize("layout, key", [("md17", "R"), ("md17", "E"), ("md17", "F"), ("rmd17", "coords")])
def test_npz_float16_arrays_are_refused(tmp_path, shared_data, capsys, layout, key):
    """float16 keeps about 3 significant digits (positions of 10-50 Å off by up to 0.03 Å, energies of 1e4
    kcal/mol by several kcal/mol): was read without a word."""
    arrays = _ethanol(shared_data, frames=20)
    if layout == "rmd17":
        arrays = {"nuclear_charges": arrays["z"], "coords": arrays["R"], "energies": arrays["E"],
                  "forces": arrays["F"]}
    arrays[key] = arrays[key].astype(np.float16)
    np.savez(tmp_path / "half.npz", **arrays)
    before = snapshot(tmp_path)
    capsys.readouterr()
    line = one_error_line(main(["data", "info", str(tmp_path / "half.npz")]), capsys.readouterr(),
                          [f"{tmp_path / 'half.npz'}: {key} holds float16 values, which keep about 3 significant "
                           "digits", "expected float32 or float64"])
    assert "Traceback" not in line
    assert snapshot(tmp_path) == before


def test_ani1x_float16_coordinates_are_refused(tmp_path, shared_data):
    import shutil

    import h5py

    from torchmdx.data.formats import read_structures

    shutil.copy(shared_data / "ani" / "ani1x_xtb.h5", tmp_path / "ani.h5")
    with h5py.File(tmp_path / "ani.h5", "r+") as f:
        group = f[sorted(f)[0]]
        values = group["coordinates"][()]
        del group["coordinates"]
        group["coordinates"] = values.astype(np.float16)
    with pytest.raises(DataError, match=r"'coordinates' holds float16 values, which keep about 3 significant "
                                        r"digits .*expected float32 or float64"):
        read_structures(tmp_path / "ani.h5", "ani1x", energy_key="gfn2xtb.energy")
