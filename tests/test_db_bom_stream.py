"""ASE databases and text files with a byte-order mark stream into the cache: rows fetched a page at a time
(``torchmdx.data.ase_format.db_rows``), marked text decoded as ASE reads it (``torchmdx.data.ase_text.
open_ase_source``); the same structures, extras, units and error lines as the whole read (``read_ase``)."""

import gzip

import numpy as np
import pytest

import torchmdx.data.ase_format as ase_format
import torchmdx.data.ase_stream as ase_stream
import torchmdx.data.ase_text as ase_text
from torchmdx import units
from torchmdx.data.ase_format import read_ase
from torchmdx.data.formats import iter_structures
from torchmdx.errors import DataError
from test_ase_stream import _assert_same, _streamed, assert_same_refusal, peak_traced_bytes

BOM = b"\xef\xbb\xbf"


@pytest.fixture(scope="module")
def polymer_frames(shared_data):
    """60 real frames of the polymer sample (10 of each family; energy, forces, polymer, smiles, theory)."""
    import ase.io

    frames = ase.io.read(shared_data / "polymer" / "polymers_xtb.extxyz", index=":")
    return [frames[k] for k in range(0, 900, 15)]


def _polymer_db(path, frames, skip=()):
    """An ASE database of ``frames`` written as ASE writes a calculator's results (energy and forces columns),
    the polymer family and the theory as key-value pairs, and a numeric key (a per-structure extra); the rows
    in ``skip`` deleted afterwards (gaps in the ids)."""
    import ase.db

    with ase.db.connect(str(path)) as db:
        for atoms in frames:
            db.write(atoms, polymer=atoms.info["polymer"], theory=atoms.info["theory"],
                     n_carbon=int((atoms.numbers == 6).sum()))
    if skip:
        ase.db.connect(str(path)).delete(list(skip))
    return path


def _schnetpack_db(path, frames):
    """SchNetPack's layout: energy and forces in each row's data, in kcal/mol and kcal/mol/Å (metadata)."""
    import ase.db
    from ase import Atoms

    kcal = units.KCAL_PER_MOL_TO_EV
    with ase.db.connect(str(path)) as db:
        db.metadata = {"_property_unit_dict": {"energy": "kcal/mol", "forces": "kcal/mol/Ang"},
                       "_distance_unit": "Ang"}
        for atoms in frames:
            plain = Atoms(atoms.numbers, atoms.positions)
            db.write(plain, data={"energy": np.array([atoms.get_potential_energy() / kcal]),
                                  "forces": atoms.get_forces() / kcal})
    return path


@pytest.fixture()
def small_pages(monkeypatch):
    """Pages of at most 7 rows and about 100 atoms (the first 4 rows): several pages in every test database."""
    monkeypatch.setattr(ase_format, "DB_FIRST_PAGE_ROWS", 4)
    monkeypatch.setattr(ase_format, "DB_PAGE_ROWS", 7)
    monkeypatch.setattr(ase_format, "DB_PAGE_ATOMS", 100)


# ---------------------------------------------------------------------------------- ASE databases
def test_qm9_sample_database_streams_identically(shared_data, tmp_path, small_pages):
    """The real QM9 sample db read as an ASE file (energy_U0 in Hartree by its metadata), paged and chunked: the
    cache equals the whole read, whose rows are those of ASE's own db.select() (ids, numbers, energies)."""
    import ase.db

    src = shared_data / "qm9" / "qm9_20.db"
    whole = read_ase(src, energy_key="energy_U0")
    cached, chunks = _streamed(src, tmp_path, 30, format="ase", energy_key="energy_U0")
    assert len(chunks) > 3 and len(whole) == 20
    _assert_same(cached, whole)
    rows = list(ase.db.connect(str(src)).select())
    np.testing.assert_array_equal(whole.z, np.concatenate([r.numbers for r in rows]))
    np.testing.assert_array_equal(whole.energy, [float(r.data["energy_U0"][0]) * units.HARTREE_TO_EV for r in rows])
    assert whole.metadata["units_in"] == {"energy": "Ha", "length": "Ang"}


def test_real_structures_database_streams_identically(polymer_frames, tmp_path, small_pages):
    """60 real polymer frames as an ASE database with gaps in its ids: forces, group labels, a numeric key, the
    theory; and SchNetPack's layout in kcal/mol (energy and forces from the rows' data, converted)."""
    db = _polymer_db(tmp_path / "polymers.db", polymer_frames, skip=(3, 4, 17, 40))
    whole = read_ase(db, group_key="polymer")
    assert len(whole) == 56 and whole.forces is not None and list(whole.extras) == ["n_carbon"]
    assert whole.metadata["theory"] == "GFN2-xTB (tblite 0.8)" and len(whole.group_names) == 6
    cached, chunks = _streamed(db, tmp_path, 200, group_key="polymer")
    assert len(chunks) > 5
    _assert_same(cached, whole)
    kept = [f for k, f in enumerate(polymer_frames) if k + 1 not in (3, 4, 17, 40)]
    np.testing.assert_array_equal(whole.energy, [f.get_potential_energy() for f in kept])
    np.testing.assert_array_equal(whole.pos, np.concatenate([f.positions for f in kept]))

    spk = _schnetpack_db(tmp_path / "spk.db", polymer_frames[:20])
    whole = read_ase(spk)
    cached, _ = _streamed(spk, tmp_path, 100)
    _assert_same(cached, whole)
    np.testing.assert_allclose(whole.energy, [f.get_potential_energy() for f in polymer_frames[:20]], rtol=1e-14)
    np.testing.assert_allclose(whole.forces, np.concatenate([f.get_forces() for f in polymer_frames[:20]]),
                               rtol=1e-12, atol=1e-14)
    assert whole.metadata["units_in"] == {"energy": "kcal/mol", "length": "Ang"}


def test_rows_are_fetched_a_bounded_page_at_a_time(polymer_frames, tmp_path, small_pages, monkeypatch):
    """db_rows: every row once, in db.select()'s order, each query limited (first page 4 rows, then at most 7
    rows and 100 // the largest row's atoms); no query fetches the rows before its page (id > the last one)."""
    import ase.db

    path = _polymer_db(tmp_path / "pages.db", polymer_frames[:30], skip=(2, 9, 10))
    db = ase.db.connect(str(path))
    expected = [row.id for row in db.select()]
    largest = max(row.natoms for row in db.select())
    queries = []
    select = type(db).select

    def recording(self, selection=None, **kwargs):
        queries.append((selection, kwargs.get("limit")))
        return select(self, selection, **kwargs)

    monkeypatch.setattr(type(db), "select", recording)
    got = [row.id for row in ase_format.db_rows(db)]
    assert got == expected and len(got) == 27
    assert queries[0] == ([("id", ">", 0)], 4)
    assert all(limit == max(1, min(7, 100 // largest)) for _, limit in queries[1:-1])
    assert [sel[0][2] for sel, _ in queries[1:]] == [got[k - 1] for k in np.cumsum([q[1] for q in queries])[:-1]]


def test_bad_databases_same_lines_as_the_whole_read(polymer_frames, tmp_path, small_pages):
    """A row without an energy, with a NaN energy (stored as none), without forces while others have them, without
    the group key: the whole read's line, streamed in chunks of 50 atoms, and no cache left."""
    import ase.db
    from ase.calculators.singlepoint import SinglePointCalculator

    def database(name, change):
        path = tmp_path / f"{name}.db"
        with ase.db.connect(str(path)) as db:
            for k, atoms in enumerate(polymer_frames[:12]):
                atoms = atoms.copy()
                calc = {"energy": polymer_frames[k].get_potential_energy(), "forces": polymer_frames[k].get_forces()}
                pairs = {"polymer": atoms.info["polymer"]}
                change(k, calc, pairs)
                atoms.calc = SinglePointCalculator(atoms, **calc)
                db.write(atoms, **pairs)
        return path

    def no_energy(k, calc, pairs):
        if k == 9:
            del calc["energy"]

    def nan_energy(k, calc, pairs):
        if k == 9:
            calc["energy"] = float("nan")

    def no_forces(k, calc, pairs):
        if k == 10:
            del calc["forces"]

    def no_group(k, calc, pairs):
        if k == 11:
            del pairs["polymer"]

    cases = [(database("no_energy", no_energy), {}, "row 10: no energy 'energy'"),
             (database("nan_energy", nan_energy), {}, "row 10: no energy 'energy', though the row was written with"),
             (database("no_forces", no_forces), {}, "row 11: no forces key 'forces', although other frames have one"),
             (database("no_group", no_group), {"group_key": "polymer"}, "row 12: group key 'polymer' not found")]
    for path, options, expected in cases:
        assert_same_refusal(path, options, expected, tmp_path / "cache", 50)
    assert not any((tmp_path / "cache").glob("*.h5"))


def test_a_database_changed_between_the_passes_is_refused(polymer_frames, tmp_path, monkeypatch):
    """Read once (pass 2 reads pass 1's rows back from the spill): a row added after pass 1 is not read, and the
    cache build refuses the changed database with its line."""
    from torchmdx.data import build_cache

    path = _polymer_db(tmp_path / "grows.db", polymer_frames[:5])
    finish = ase_stream.FrameSummary.finish

    def finish_then_append(self):
        out = finish(self)
        _polymer_db(path, polymer_frames[5:6])
        return out

    monkeypatch.setattr(ase_stream.FrameSummary, "finish", finish_then_append)
    assert sum(len(c) for c in iter_structures(path)) == 5
    with pytest.raises(DataError, match=r"grows.db: changed while it was being read; try again$"):
        build_cache(path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # the folder the failed build made is gone too (round 38)


def test_database_progress_bars_say_which_pass(polymer_frames, tmp_path, monkeypatch):
    import tqdm.auto

    bars = []
    real = tqdm.auto.tqdm

    def recording(iterable=None, **kwargs):
        bars.append((kwargs.get("desc"), kwargs.get("total"), kwargs.get("unit")))
        return real(iterable, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", recording)
    path = _polymer_db(tmp_path / "bars.db", polymer_frames[:3])
    list(iter_structures(path))
    assert bars == [("reading bars.db (pass 1 of 2: keys and shapes)", 3, " rows"),
                    ("reading bars.db (pass 2 of 2: values)", 3, " rows")]


def test_streamed_database_peak_memory_is_a_fraction_of_the_whole_read(polymer_frames, tmp_path, monkeypatch):
    """tracemalloc's peak over a 300-row database (pages of 32 rows, chunks of 300 atoms): the whole read holds
    every row's frame, the streamed read a page and a chunk; measured ~10x apart, asserted 4x."""
    monkeypatch.setattr(ase_format, "DB_PAGE_ROWS", 32)
    monkeypatch.setattr(ase_format, "DB_FIRST_PAGE_ROWS", 32)
    path = _polymer_db(tmp_path / "many.db", polymer_frames * 5)
    warm = _polymer_db(tmp_path / "warm.db", polymer_frames[:2])
    read_ase(warm), list(iter_structures(warm))

    def streamed():
        for _ in iter_structures(path, chunk_atoms=300):
            pass

    whole, stream = peak_traced_bytes(lambda: read_ase(path)), peak_traced_bytes(streamed)
    assert stream * 4 < whole, (stream, whole)


# ---------------------------------------------------------------------------------- byte-order marks
@pytest.fixture(scope="module")
def marked_files(shared_data, tmp_path_factory):
    """The polymer sample (2.5 MB, 900 frames) with a UTF-8 mark, as UTF-16 with Windows line ends, gzip'd with a
    UTF-8 mark, and gzip'd without a mark (Windows line ends)."""
    folder = tmp_path_factory.mktemp("marked")
    raw = (shared_data / "polymer" / "polymers_xtb.extxyz").read_bytes()
    (folder / "bom.extxyz").write_bytes(BOM + raw)
    (folder / "u16.extxyz").write_bytes(raw.decode().replace("\n", "\r\n").encode("utf-16"))
    with gzip.open(folder / "bom.extxyz.gz", "wb") as handle:
        handle.write(BOM + raw)
    with gzip.open(folder / "crlf.extxyz.gz", "wb") as handle:
        handle.write(raw.replace(b"\n", b"\r\n"))
    return folder


def test_marked_files_stream_identically(shared_data, marked_files, tmp_path, monkeypatch):
    """Each file's cache (chunks of ~3000 atoms) equals the plain sample's whole read, array for array; a gzip'd
    one is decompressed from its start at most twice per pass (a seek window; ASE's own stream started over at every
    frame: 16 s instead of 0.7 s for this file, time growing with the square of its size)."""
    plain = read_ase(shared_data / "polymer" / "polymers_xtb.extxyz", group_key="polymer")
    seeks = []
    real_seek = gzip.GzipFile.seek

    def counting(self, offset, whence=0):
        seeks.append(offset)
        return real_seek(self, offset, whence)

    monkeypatch.setattr(gzip.GzipFile, "seek", counting)
    for name in ("bom.extxyz", "u16.extxyz", "bom.extxyz.gz", "crlf.extxyz.gz"):
        seeks.clear()
        cached, chunks = _streamed(marked_files / name, tmp_path / name, 3000, group_key="polymer")
        assert len(chunks) > 5
        _assert_same(cached, plain)
        assert len(seeks) <= 4, seeks  # two passes: ASE's return to the first frame after indexing the file
    assert read_ase(marked_files / "crlf.extxyz.gz", group_key="polymer").energy.tolist() == plain.energy.tolist()


def _first_frames(text: bytes, n: int) -> bytes:
    """The first ``n`` frames of an xyz/extxyz file's bytes."""
    lines, i = text.split(b"\n"), 0
    for _ in range(n):
        i += int(lines[i]) + 2
    return b"\n".join(lines[:i]) + b"\n"


def test_a_marked_file_is_not_held_whole(shared_data, tmp_path, monkeypatch):
    """The streamed read of 400 marked sample frames (1.1 MB, checked in blocks of 16 KiB) peaks (tracemalloc) less
    than 0.45 MB above the unmarked file's, whatever the file's size (the whole decode held its text and its bytes:
    twice the file's size more); measured 0.26-0.36 MB above, most of it the 50 kB head ASE guesses the format
    from (copied a few times)."""
    monkeypatch.setattr(ase_text, "DECODE_BLOCK_BYTES", 1 << 14)
    raw = (shared_data / "polymer" / "polymers_xtb.extxyz").read_bytes()
    plain, marked, warm = tmp_path / "plain.extxyz", tmp_path / "marked.extxyz", tmp_path / "warm.extxyz"
    plain.write_bytes(_first_frames(raw, 400))
    marked.write_bytes(BOM + plain.read_bytes())
    warm.write_bytes(BOM + _first_frames(raw, 2))
    list(iter_structures(warm))  # imports, caches

    def streamed(path):
        for _ in iter_structures(path, chunk_atoms=2000):
            pass

    peak, plain_peak = peak_traced_bytes(lambda: streamed(marked)), peak_traced_bytes(lambda: streamed(plain))
    assert peak - plain_peak < 450_000 < marked.stat().st_size / 2, (peak, plain_peak)


def test_bytes_that_are_not_text_far_after_the_mark_are_named(marked_files, tmp_path, monkeypatch):
    """Bytes that are not UTF-8 in a later block than the first: the mark's line, before ASE reads a frame."""
    monkeypatch.setattr(ase_text, "DECODE_BLOCK_BYTES", 4096)
    path = tmp_path / "tail.extxyz"
    path.write_bytes((marked_files / "bom.extxyz").read_bytes()[:200_000] + b"\n\xff\xfe\xff junk\n")
    expected = (f"{path}: starts with a UTF-8 byte-order mark (bytes EF BB BF), and what follows is not a text "
                "structure format ASE can read; save the file without the mark (plain UTF-8)")
    for read in (lambda: read_ase(path), lambda: list(iter_structures(path))):
        with pytest.raises(DataError) as error:
            read()
        assert str(error.value) == expected


def test_synthetic_database_of_the_benchmark(tmp_path, small_pages):
    """bench_data's synthetic (bench/data_synthetic.py) MPtrj-like database (periodic rows, a calculator's 6-component stress, a numeric and a
    text key): the streamed cache equals the whole read; stress kept as 3 x 3 in eV/Å³, the numeric key an extra."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("data_synthetic", Path(__file__).resolve().parents[1] / "bench" /
                                                  "data_synthetic.py")
    bench_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_data)
    path = tmp_path / "mptrj.db"
    sizes = bench_data.synthetic_db_scale(path, 30)
    whole = read_ase(path)
    assert len(whole) == 30 and whole.n_atoms == sizes["atoms"] and whole.pbc.all()
    assert sorted(whole.extras) == ["corrected_total_energy", "stress"] and whole.forces is not None
    stress = whole.extras["stress"].reshape(-1, 3, 3)
    np.testing.assert_array_equal(stress, np.transpose(stress, (0, 2, 1)))
    cached, chunks = _streamed(path, tmp_path, 200)
    assert len(chunks) > 3
    _assert_same(cached, whole)
