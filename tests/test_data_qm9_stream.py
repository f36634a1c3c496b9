"""QM9's ASE database streams into the cache: rows fetched a page at a time (``torchmdx.data.ase_format.db_rows``,
as for every ASE database), structures handed out in chunks (``torchmdx.data.qm9.iter_qm9_db``); the reader held
every row of the database (``list(db.select())``). Checked on the real sample ``qm9/qm9_20.db`` against the whole
read and against the raw SQLite rows."""

import numpy as np
import pytest

import torchmdx.data.ase_format as ase_format
from torchmdx import units
from torchmdx.data.formats import iter_structures, read_structures, streamed
from test_ase_stream import _assert_same, _streamed
from test_data_readers import _raw_qm9_rows


@pytest.fixture()
def small_pages(monkeypatch):
    """Pages of at most 7 rows and about 40 atoms (the first 4 rows): several pages of the 20-row sample."""
    monkeypatch.setattr(ase_format, "DB_FIRST_PAGE_ROWS", 4)
    monkeypatch.setattr(ase_format, "DB_PAGE_ROWS", 7)
    monkeypatch.setattr(ase_format, "DB_PAGE_ATOMS", 40)


@pytest.fixture()
def selects(monkeypatch):
    """The ``select`` calls made of ASE's SQLite databases: (query, keyword arguments)."""
    from ase.db.sqlite import SQLite3Database

    calls, real = [], SQLite3Database.select

    def recording(self, *args, **kwargs):
        calls.append((args, kwargs))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SQLite3Database, "select", recording)
    return calls


def test_qm9_database_streams_as_the_whole_read(shared_data, tmp_path, small_pages, selects):
    src = shared_data / "qm9" / "qm9_20.db"
    assert streamed("qm9", src)
    whole = read_structures(src)
    assert whole.metadata["format"] == "qm9" and len(whole) == 20 and whole.n_atoms == 135
    cached, chunks = _streamed(src, tmp_path, 30)
    assert len(chunks) > 3 and sum(n for n, _ in chunks) == 20
    assert all(atoms < 30 + 29 for _, atoms in chunks)  # a chunk ends after the row that reaches 30 atoms
    _assert_same(cached, whole)
    assert cached.metadata["atomrefs"] == whole.metadata["atomrefs"]
    # every database query of the reads was a page (a limit on the rows), never the whole table
    pages = [kwargs.get("limit") for _, kwargs in selects]
    assert len(pages) > 6 and all(limit is not None and limit <= 7 for limit in pages), pages


def test_streamed_values_are_the_raw_rows_in_ev(shared_data, small_pages):
    """The chunks against the SQLite rows read without ASE: Hartree-valued properties times the one Hartree of
    torchmdx.units, the others as stored; positions in Å (the sample's _distance_unit)."""
    src = shared_data / "qm9" / "qm9_20.db"
    rows, meta = _raw_qm9_rows(src)
    assert meta["_property_unit_dict"]["energy_U0"] == "Ha" and meta["_distance_unit"] == "Ang"
    chunks = list(iter_structures(src, chunk_atoms=20))
    assert len(chunks) > 4
    energy = np.concatenate([c.energy for c in chunks])
    homo = np.concatenate([c.extras["homo"] for c in chunks])
    dipole = np.concatenate([c.extras["dipole_moment"] for c in chunks])
    pos = np.concatenate([c.pos for c in chunks])
    np.testing.assert_array_equal(energy, [r[2]["energy_U0"] * units.HARTREE_TO_EV for r in rows])
    np.testing.assert_array_equal(homo, [r[2]["homo"] * units.HARTREE_TO_EV for r in rows])
    np.testing.assert_array_equal(dipole, [r[2]["dipole_moment"] for r in rows])  # Debye, kept
    np.testing.assert_array_equal(pos, np.concatenate([r[1] for r in rows]))
    # by hand: methane's U0, -40.47893 Ha, times 27.211386024367243 eV/Ha (ASE's CODATA 2014 Hartree)
    assert units.HARTREE_TO_EV == pytest.approx(27.211386, abs=1e-6)
    assert rows[0][2]["energy_U0"] == -40.47893
    assert chunks[0].energy[0] == pytest.approx(-1101.48779008334, abs=1e-9)
