"""Readers: every real sample file in ../shared/data, counts, shapes and unit conversion.

Unit factors are written here as literals computed by hand (not taken from torchmdx.units):
    1 kcal/mol = 4184 J/mol / (6.022140857e23 /mol * 1.6021766208e-19 J/eV)
               = 4184 / 96485.33289 eV = 0.0433641039 eV
    1 Hartree  = 27.21138602 eV  (CODATA 2014, the values ASE uses)
Raw numbers are read with numpy / h5py / sqlite3 / plain text parsing, not with the readers.
"""

import json
import re
import sqlite3
import tarfile

import h5py
import numpy as np
import pytest

from torchmdx.data import guess_format, read_structures
from torchmdx.data.qm9 import QM9_ATOMREFS, QM9_PROPERTIES
from torchmdx.errors import DataError

KCAL = 0.0433641039  # eV per kcal/mol, by hand (see module docstring)
HARTREE = 27.21138602  # eV per Hartree
REL = 1e-9


# ------------------------------------------------------------------------------------------------
# MD17 family
def test_md17_ethanol_npz(shared_data):
    path = shared_data / "md17" / "md17_ethanol_xtb.npz"
    raw = np.load(path)
    st = read_structures(path)
    assert st.metadata["format"] == "md17" and guess_format(path) == "md17"
    assert len(st) == 2000 and st.n_atoms == 2000 * 9
    assert st.pos.shape == (18000, 3) and st.forces.shape == (18000, 3) and st.energy.shape == (2000,)
    assert list(st.z[:9]) == [6, 6, 8, 1, 1, 1, 1, 1, 1] and list(st.z[9:18]) == list(st.z[:9])
    assert np.all(np.diff(st.offsets) == 9)
    # one energy and one force component, converted by hand
    assert st.energy[0] == pytest.approx(raw["E"][0, 0] * KCAL, rel=REL)
    assert st.energy[1999] == pytest.approx(raw["E"][1999, 0] * KCAL, rel=REL)
    assert st.forces[5 * 9 + 3, 1] == pytest.approx(raw["F"][5, 3, 1] * KCAL, rel=REL)
    np.testing.assert_array_equal(st.pos[9 * 7: 9 * 8], raw["R"][7])  # Å stays Å
    assert st.metadata["theory"] == "GFN2-xTB (tblite 0.8)"
    assert not st.pbc.any() and not st.cell.any()


def test_md17_aspirin_npz(shared_data):
    path = shared_data / "md17" / "md17_aspirin_xtb.npz"
    raw = np.load(path)
    st = read_structures(path)
    assert len(st) == 1000 and st.n_atoms == 21000 and sorted(set(st.z.tolist())) == [1, 6, 8]
    assert st.energy[123] == pytest.approx(raw["E"][123, 0] * KCAL, rel=REL)
    assert st.forces[21 * 999 + 20, 2] == pytest.approx(raw["F"][999, 20, 2] * KCAL, rel=REL)


def test_rmd17_matches_md17_frames(shared_data):
    path = shared_data / "md17" / "rmd17_ethanol_xtb.npz"
    raw = np.load(path)
    st = read_structures(path)
    assert st.metadata["format"] == "rmd17" and len(st) == 2000 and st.n_atoms == 18000
    assert st.energy[42] == pytest.approx(raw["energies"][42] * KCAL, rel=REL)
    assert st.forces[42 * 9 + 2, 0] == pytest.approx(raw["forces"][42, 2, 0] * KCAL, rel=REL)
    old = read_structures(shared_data / "md17" / "md17_ethanol_xtb.npz")
    np.testing.assert_allclose(st.energy, old.energy, rtol=1e-12)  # same frames, same level of theory


def test_md17_molecule_name_resolves(shared_data):
    st = read_structures("ethanol", format="md17")
    assert st.source.endswith("md17_ethanol_xtb.npz") and len(st) == 2000
    st = read_structures("ethanol", format="rmd17")
    assert st.source.endswith("rmd17_ethanol_xtb.npz")
    with pytest.raises(DataError, match="no md17 file for a molecule of that name"):
        read_structures("unobtainium", format="md17")


def test_md17_plain_xyz(shared_data):
    path = shared_data / "md17" / "ethanol_snip.xyz"
    lines = path.read_text().splitlines()
    st = read_structures(path)
    assert st.metadata["format"] == "md17-xyz" and guess_format(path) == "md17-xyz"
    assert len(st) == 3 and st.n_atoms == 27
    assert st.energy[0] == pytest.approx(float(lines[1]) * KCAL, rel=REL)
    assert st.energy[0] == pytest.approx(-97208.40600498248 * KCAL, rel=REL)  # = -4215.3554 eV
    second_frame_energy = float(lines[11 + 1])
    assert st.energy[1] == pytest.approx(second_frame_energy * KCAL, rel=REL)
    cols = lines[2].split()  # first atom of the first frame: C x y z fx fy fz
    assert st.z[0] == 6
    np.testing.assert_allclose(st.pos[0], [float(c) for c in cols[1:4]])
    np.testing.assert_allclose(st.forces[0], [float(c) * KCAL for c in cols[4:7]], rtol=REL)
    # another unit for the same layout
    st_ev = read_structures(path, energy_unit="eV")
    assert st_ev.energy[0] == pytest.approx(float(lines[1]))


# ------------------------------------------------------------------------------------------------
# QM9
def _raw_qm9_rows(path):
    """(numbers, positions, {property: value}) per row, decoded straight from the sqlite blobs."""
    con = sqlite3.connect(path)
    rows = []
    for numbers, positions, data in con.execute("select numbers, positions, data from systems order by id"):
        offset = int(np.frombuffer(data[:8], np.int64)[0])
        meta = json.loads(data[offset:])
        props = {}
        for name, entry in meta.items():
            shape, dtype, where = entry["__ndarray__"]
            props[name] = float(np.frombuffer(data, dtype, 1, where)[0])
        rows.append((np.frombuffer(numbers, np.int32), np.frombuffer(positions, np.float64).reshape(-1, 3), props))
    info = dict(con.execute("select name, value from information").fetchall())
    con.close()
    return rows, json.loads(info["metadata"])


def test_qm9_db(shared_data):
    path = shared_data / "qm9" / "qm9_20.db"
    rows, meta = _raw_qm9_rows(path)
    st = read_structures(path)
    assert st.metadata["format"] == "qm9" and guess_format(path) == "qm9"
    assert len(st) == 20 == len(rows) and st.n_atoms == sum(len(r[0]) for r in rows) == 135
    assert st.forces is None
    # energy = U0; methane: U0 = -40.47893 Ha
    assert rows[0][2]["energy_U0"] == -40.47893
    assert st.energy[0] == pytest.approx(-40.47893 * HARTREE, rel=REL)
    for k in (0, 7, 19):
        assert st.energy[k] == pytest.approx(rows[k][2]["energy_U0"] * HARTREE, rel=REL)
        np.testing.assert_array_equal(st.z[st.offsets[k]:st.offsets[k + 1]], rows[k][0])
        np.testing.assert_allclose(st.pos[st.offsets[k]:st.offsets[k + 1]], rows[k][1])
    # all 15 properties kept; Hartree ones in eV, the others in their published unit
    assert set(st.extras) == {p[0] for p in QM9_PROPERTIES}
    assert st.extras["homo"][3] == pytest.approx(rows[3][2]["homo"] * HARTREE, rel=REL)
    assert st.extras["dipole_moment"][3] == rows[3][2]["dipole_moment"]
    assert st.extra_units["homo"] == "eV" and st.extra_units["dipole_moment"] == "D"
    assert st.extra_units["heat_capacity"] == "cal/mol/K"
    # atomrefs from the metadata, converted; equal to the published table
    refs = st.metadata["atomrefs"]["energy_U0"]
    assert meta["atomrefs"]["energy_U0"][6] == -37.846772
    assert refs[6] == pytest.approx(-37.846772 * HARTREE, rel=REL)
    for z, table in QM9_ATOMREFS.items():
        assert refs[z] == pytest.approx(table["energy_U0"] * HARTREE, rel=REL)
    # another energy target
    st_h = read_structures(path, energy_key="H")
    assert st_h.energy[5] == pytest.approx(rows[5][2]["enthalpy_H"] * HARTREE, rel=REL)


def _mathematica(value: float) -> str:
    """A number in Mathematica's notation as QM9 writes small values: 1.2*^-6."""
    mantissa, exponent = f"{value:.16e}".split("e")
    return f"{mantissa}*^{int(exponent)}"


def _qm9_xyz(gdb_id, numbers, positions, props, charges):
    from ase.data import chemical_symbols

    values = []
    for i, (name, _, _) in enumerate(QM9_PROPERTIES):
        v = props[name]
        values.append(_mathematica(v) if i % 3 == 0 else repr(float(v)))
    lines = [str(len(numbers)), "\t".join([f"gdb {gdb_id}"] + values)]
    for z, (x, y, zz), q in zip(numbers, positions, charges):
        lines.append("\t".join([chemical_symbols[z], _mathematica(x), repr(float(y)), repr(float(zz)), _mathematica(q)]))
    lines.append("\t".join(["1341.307", "1341.3284", "3151.7078"]))
    lines.append("C\tC")
    lines.append("InChI=1S/CH4/h1H4\tInChI=1S/CH4/h1H4")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def qm9_xyz_folder(shared_data, tmp_path_factory):
    rows, _ = _raw_qm9_rows(shared_data / "qm9" / "qm9_20.db")
    folder = tmp_path_factory.mktemp("qm9xyz")
    for k, (numbers, positions, props) in enumerate(rows):
        charges = np.linspace(-0.5, 0.5, len(numbers)) * 1e-3
        (folder / f"dsgdb9nsd_{k + 1:06d}.xyz").write_text(_qm9_xyz(k + 1, numbers, positions, props, charges))
    return folder, rows


def test_qm9_xyz_folder_matches_db(shared_data, qm9_xyz_folder):
    folder, rows = qm9_xyz_folder
    assert "*^" in (folder / "dsgdb9nsd_000001.xyz").read_text()
    st = read_structures(folder)
    assert guess_format(folder) == "qm9" and st.metadata["format"] == "qm9"
    db = read_structures(shared_data / "qm9" / "qm9_20.db")
    assert len(st) == 20 and st.n_atoms == 135
    assert st.energy[0] == pytest.approx(-40.47893 * HARTREE, rel=REL)
    np.testing.assert_allclose(st.energy, db.energy, rtol=1e-14)
    np.testing.assert_allclose(st.pos, db.pos, rtol=1e-14, atol=1e-15)
    np.testing.assert_array_equal(st.z, db.z)
    for name in db.extras:
        np.testing.assert_allclose(st.extras[name], db.extras[name], rtol=1e-14, err_msg=name)
    assert st.atom_extras["mulliken_charge"][1] == pytest.approx(np.linspace(-0.5, 0.5, 5)[1] * 1e-3)
    # published atomrefs are attached to the xyz layout too
    assert st.metadata["atomrefs"]["energy_U0"][8] == pytest.approx(-75.064579 * HARTREE, rel=REL)


@pytest.mark.parametrize("mode, suffix", [("w", ".tar"), ("w:gz", ".tar.gz"), ("w:bz2", ".tar.bz2")])
def test_qm9_tar_archive(qm9_xyz_folder, tmp_path, mode, suffix):
    folder, rows = qm9_xyz_folder
    archive = tmp_path / f"qm9{suffix}"
    with tarfile.open(archive, mode) as tar:
        for p in sorted(folder.iterdir(), reverse=True):  # stored out of order on purpose
            tar.add(p, arcname=p.name)
    assert guess_format(archive) == "qm9"
    st = read_structures(archive)
    assert len(st) == 20
    np.testing.assert_allclose(st.energy, [r[2]["energy_U0"] * HARTREE for r in rows], rtol=REL)


def test_qm9_single_file_and_bad_property_line(qm9_xyz_folder, tmp_path):
    folder, rows = qm9_xyz_folder
    single = folder / "dsgdb9nsd_000003.xyz"
    st = read_structures(single, format="qm9")
    assert len(st) == 1 and st.energy[0] == pytest.approx(rows[2][2]["energy_U0"] * HARTREE, rel=REL)
    bad = tmp_path / "bad.xyz"
    text = single.read_text().splitlines()
    text[1] = "gdb 3\t1.0\t2.0"
    bad.write_text("\n".join(text))
    with pytest.raises(DataError, match=r"line 2: expected 'gdb <id>' and 15 properties, got 4 fields"):
        read_structures(bad, format="qm9")


# ------------------------------------------------------------------------------------------------
# ANI
def test_ani1(shared_data):
    path = shared_data / "ani" / "ani1_xtb.h5"
    st = read_structures(path)
    assert st.metadata["format"] == "ani1" and guess_format(path) == "ani1"
    assert len(st) == 15 * 40 and st.forces is None
    assert len(st.group_names) == 15 and np.all(np.bincount(st.group) == 40)
    with h5py.File(path) as h5:
        g = h5["gdb_s01/gdb_s01-0"]
        raw_energy = g["energies"][3]
        species = [s.decode() for s in g["species"][()]]
        raw_pos = g["coordinates"][3]
    k = st.group_names.index("gdb_s01/gdb_s01-0")
    idx = np.flatnonzero(st.group == k)[3]
    assert st.energy[idx] == pytest.approx(raw_energy * HARTREE, rel=REL)
    from ase.data import atomic_numbers

    np.testing.assert_array_equal(st.z[st.offsets[idx]:st.offsets[idx + 1]], [atomic_numbers[s] for s in species])
    np.testing.assert_allclose(st.pos[st.offsets[idx]:st.offsets[idx + 1]], raw_pos)


def test_ani1x_levels_of_theory(shared_data, tmp_path):
    path = shared_data / "ani" / "ani1x_xtb.h5"
    st = read_structures(path, energy_key="gfn2xtb.energy", forces_key="gfn2xtb.forces")
    assert st.metadata["format"] == "ani1x" and guess_format(path) == "ani1x"
    assert len(st) == 600 and st.forces.shape == (st.n_atoms, 3) and len(st.group_names) == 15
    with h5py.File(path) as h5:
        raw_e = h5["C2H4O/gfn2xtb.energy"][7]
        raw_f = h5["C2H4O/gfn2xtb.forces"][7, 2, 1]
        z = h5["C2H4O/atomic_numbers"][()]
    idx = np.flatnonzero(st.group == st.group_names.index("C2H4O"))[7]
    assert st.energy[idx] == pytest.approx(raw_e * HARTREE, rel=REL)
    assert st.forces[st.offsets[idx] + 2, 1] == pytest.approx(raw_f * HARTREE, rel=REL)  # Ha/Å -> eV/Å
    np.testing.assert_array_equal(st.z[st.offsets[idx]:st.offsets[idx + 1]], z)
    # default: the only *.energy method and its forces
    default = read_structures(path)
    assert default.metadata["energy_key"] == "gfn2xtb.energy" and default.metadata["forces_key"] == "gfn2xtb.forces"
    # same conformations as the ANI-1 file
    ani1 = read_structures(shared_data / "ani" / "ani1_xtb.h5")
    np.testing.assert_allclose(np.sort(st.energy), np.sort(ani1.energy), rtol=1e-12)
    with pytest.raises(DataError, match=r"no 'wb97x_dz.energy' dataset; found: atomic_numbers, coordinates, "
                                        r"gfn2xtb.energy, gfn2xtb.forces"):
        read_structures(path, energy_key="wb97x_dz.energy")


def test_ani1x_missing_levels_are_dropped(tmp_path):
    """ANI-1x writes NaN where a level of theory was not computed: such conformations are dropped."""
    path = tmp_path / "ani1x_like.h5"
    with h5py.File(path, "w") as h5:
        g = h5.create_group("CH4")
        g["atomic_numbers"] = np.array([6, 1, 1, 1, 1], dtype=np.uint8)
        g["coordinates"] = np.random.default_rng(0).normal(size=(4, 5, 3)).astype(np.float32)
        g["wb97x_dz.energy"] = np.array([-40.1, -40.2, -40.3, -40.4])
        g["wb97x_dz.forces"] = np.zeros((4, 5, 3))
        g["ccsd(t)_cbs.energy"] = np.array([-40.5, np.nan, np.nan, -40.6])
    st = read_structures(path)  # several methods: wb97x_dz is ANI-1x's reference level
    assert st.metadata["energy_key"] == "wb97x_dz.energy" and len(st) == 4
    cc = read_structures(path, energy_key="ccsd(t)_cbs.energy", forces_key=None)
    assert len(cc) == 2 and cc.metadata["dropped"] == 2
    assert cc.energy[1] == pytest.approx(-40.6 * HARTREE, rel=REL)


# ------------------------------------------------------------------------------------------------
# ASE (polymer extxyz, db, traj)
def test_polymer_extxyz_with_groups(shared_data):
    path = shared_data / "polymer" / "polymers_xtb.extxyz"
    text = path.read_text()
    energies = [float(m) for m in re.findall(r"energy=(-?[\d.]+)", text)]
    families = re.findall(r"polymer=(\S+)", text)
    st = read_structures(path, group_key="polymer")
    assert st.metadata["format"] == "ase" and guess_format(path) == "ase"
    assert len(st) == 900 == len(energies)
    assert st.group_names == ["PE", "PEO", "PVC", "PVA", "PAN", "PMMA"]
    assert np.all(np.bincount(st.group) == 150)
    assert list(st.group_labels()) == families
    np.testing.assert_allclose(st.energy, energies, rtol=1e-15)  # eV stays eV
    first = text.splitlines()
    natoms = int(first[0])
    cols = first[2].split()
    np.testing.assert_allclose(st.forces[0], [float(c) for c in cols[4:7]])
    assert st.n_atoms == st.offsets[-1] and st.offsets[1] == natoms
    assert st.metadata["theory"] == "GFN2-xTB (tblite 0.8)"


def test_ase_db_and_traj_roundtrip(tmp_path):
    import ase.db
    import ase.io
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(1)
    frames = []
    for k in range(6):
        atoms = Atoms("H2O" if k % 2 else "CH4", positions=rng.normal(size=(3 if k % 2 else 5, 3)),
                      cell=np.eye(3) * 10, pbc=k % 2 == 1)
        atoms.calc = SinglePointCalculator(atoms, energy=-float(k), forces=rng.normal(size=(len(atoms), 3)))
        atoms.info["family"] = "odd" if k % 2 else "even"
        frames.append(atoms)
    traj = tmp_path / "frames.traj"
    ase.io.write(traj, frames)
    db_path = tmp_path / "frames.db"
    with ase.db.connect(db_path) as db:
        for atoms in frames:
            db.write(atoms, family=atoms.info["family"], charge_state=1)
    st_db = read_structures(db_path, group_key="family")
    assert guess_format(db_path) == "ase" and len(st_db) == 6
    np.testing.assert_allclose(st_db.energy, -np.arange(6.0))
    assert list(st_db.group_labels()) == ["even", "odd"] * 3
    assert "charge_state" in st_db.extras and st_db.pbc[1].all() and not st_db.pbc[0].any()
    st_traj = read_structures(traj)
    np.testing.assert_allclose(st_traj.forces, np.concatenate([a.get_forces() for a in frames]))
    np.testing.assert_allclose(st_traj.cell[3], np.eye(3) * 10)
    assert list(read_structures(traj, group_key="family").group_labels()) == ["even", "odd"] * 3
    with pytest.raises(DataError, match=r"frames.traj: frame 0: group key 'colour' not found; keys present: family"):
        read_structures(traj, group_key="colour")


def test_unguessable_and_unknown_formats(shared_data, tmp_path):
    with pytest.raises(DataError, match=r"unknown format 'xyz9'; known formats: md17, rmd17, md17-xyz, qm9"):
        read_structures(shared_data / "md17" / "md17_ethanol_xtb.npz", format="xyz9")
    odd = tmp_path / "notes.bin"
    odd.write_bytes(b"\x00\x01\x02 not a dataset")
    with pytest.raises(DataError, match=r"notes.bin: cannot guess the format; pass --format"):
        read_structures(odd)
    with pytest.raises(DataError, match="option group_key does not apply to format 'md17'"):
        read_structures(shared_data / "md17" / "md17_ethanol_xtb.npz", group_key="polymer")


def test_structures_select_roundtrip(shared_data):
    st = read_structures(shared_data / "polymer" / "polymers_xtb.extxyz", group_key="polymer")
    sub = st.select([899, 0, 450])
    assert len(sub) == 3 and sub.energy[0] == st.energy[899]
    np.testing.assert_array_equal(sub.pos[: sub.offsets[1]], st.pos[st.offsets[899]:st.offsets[900]])
    assert list(sub.group_labels()) == [st.group_labels()[899], "PE", st.group_labels()[450]]


def test_classify_read_failure_of_structure_files(tmp_path):
    """The reason md, label and export --structure give for a structure file ASE cannot read: a
    truncated xyz ends early (before anything else), a torch.save file is a torch file, the rest
    quotes the reader's error."""
    import torch

    from torchmdx.data.ase_format import ReadFailureKind, all_frames, classify_read_failure

    def failure_of(path):
        with pytest.raises(Exception) as err:
            all_frames(path)
        assert not isinstance(err.value, DataError)  # the callers pass DataError's own line on unchanged
        return classify_read_failure(err.value, path)

    cut = tmp_path / "cut.xyz"  # a second frame cut after its atom-count line
    cut.write_text("2\n\nH 0 0 0\nH 0 0 0.74\n2\n")
    failure = failure_of(cut)
    assert failure.kind is ReadFailureKind.ENDS_EARLY and failure.error_type == "RuntimeError"

    model = tmp_path / "model.xyz"  # a torch file under a structure's name: ASE's xyz reader fails on it
    torch.save({"weights": torch.zeros(3)}, model)
    assert failure_of(model).kind is ReadFailureKind.TORCH_FILE
    pt = tmp_path / "model.pt"  # ... and under its own (ASE: "UnknownFileTypeError: pt")
    torch.save({"weights": torch.zeros(3)}, pt)
    assert failure_of(pt).kind is ReadFailureKind.TORCH_FILE

    garbage = tmp_path / "garbage.xyz"
    garbage.write_text("not a count\nfoo\n")
    failure = failure_of(garbage)
    assert failure.kind is ReadFailureKind.OTHER
    assert failure.detail == failure.first_line == str(failure.message).splitlines()[0] != ""

    quiet = classify_read_failure(KeyError(), garbage)  # an error without a message: its class names it
    assert (quiet.kind, quiet.first_line, quiet.detail) == (ReadFailureKind.OTHER, "", "KeyError")
    two = classify_read_failure(ValueError("first\nsecond"), garbage)
    assert (two.first_line, two.detail, two.error_type) == ("first", "first", "ValueError")
