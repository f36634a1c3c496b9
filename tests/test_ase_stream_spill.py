"""The streamed build of an ASE file parses it once (pass 2 reads pass 1's frames back from a temporary spill
file: :class:`torchmdx.data.ase_stream.FrameSpill`); its cache equals, dataset for dataset and attribute for
attribute, the cache of the read before, whose second pass parsed the file again (:func:`_two_parses`, kept here
as the reference), on the real sample files and the benchmark's MPtrj-like layouts."""

import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pytest

import torchmdx.data.ase_stream as ase_stream
from torchmdx.data import build_cache
from torchmdx.data.ase_format import ase_reading
from torchmdx.data.ase_stream import FrameSummary, add_frame
from torchmdx.data.cache import fingerprint
from torchmdx.data.cache_file import CacheWriter
from torchmdx.data.formats import iter_structures
from torchmdx.errors import DataError


def _two_parses(path, chunk_atoms, **options):
    """``iter_ase`` as it was: pass 1 summarises the parsed frames, pass 2 parses the file again and adds them."""
    reading = ase_reading(path, **options)
    summary = FrameSummary(reading)
    for frame in reading.frames():
        summary.add(frame)
    summary.finish()
    builder = summary.builder()
    for frame in reading.frames():
        add_frame(builder, frame, summary)
        if builder.pending_atoms >= chunk_atoms:
            yield builder.take_chunk()
    chunk = builder.take_chunk()
    if chunk is not None:
        yield chunk


def _contents(path) -> dict:
    """Every attribute and every dataset (dtype, shape, values) of an HDF5 file."""
    out = {}
    with h5py.File(path, "r") as h5:
        out["/attrs"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in h5.attrs.items()}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]

        h5.visititems(visit)
    return out


def _assert_same_cache(new, old):
    a, b = _contents(new), _contents(old)
    assert sorted(a) == sorted(b)
    assert a.pop("/attrs") == b.pop("/attrs")  # fingerprint, metadata, statistics, checksums of every dataset
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)  # NaN (stress of molecules) equals NaN


def _compare(src, tmp_path, chunk_atoms, **options):
    """The new build's cache and the two-parse reference's, written by the same writer, compared."""
    new = build_cache(src, "ase", cache_dir=tmp_path / "new", chunk_atoms=chunk_atoms, **options)
    old = tmp_path / "old" / new.name
    opts = {k: v for k, v in options.items() if v is not None}
    with CacheWriter(old, fmt="ase", source=src, options=opts, fingerprint=fingerprint(src)) as writer:
        for chunk in _two_parses(src, chunk_atoms, **opts):
            writer.add(chunk)
    _assert_same_cache(new, old)
    assert not [p for p in (tmp_path / "new").iterdir() if p != new]  # no spill or temporary file left
    return new


def _bench_data():
    spec = importlib.util.spec_from_file_location("data_synthetic", Path(__file__).resolve().parents[1] / "bench" /
                                                  "data_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("chunk_atoms,options", [(3000, {"group_key": "polymer"}), (1 << 20, {}), (1, {})])
def test_polymer_sample_cache_equals_the_two_parse_build(shared_data, tmp_path, chunk_atoms, options):
    """The real polymer sample (900 frames, forces, group labels, theory): chunks of ~3000 atoms, one chunk, a
    frame a chunk."""
    cache = _compare(shared_data / "polymer" / "polymers_xtb.extxyz", tmp_path, chunk_atoms, **options)
    with h5py.File(cache, "r") as h5:
        assert h5["energy"].shape == (900,)


def test_qm9_sample_database_cache_equals_the_two_parse_build(shared_data, tmp_path):
    """The real QM9 sample database read as a plain ASE database (energy_U0, its declared units)."""
    _compare(shared_data / "qm9" / "qm9_20.db", tmp_path, 50, energy_key="energy_U0")


def test_structure_files_without_energies_are_refused_alike(shared_data, tmp_path):
    """The real structure files (no energies): the same line as the two-parse read, no cache, nothing left."""
    for src in sorted((shared_data / "systems").glob("*.xyz"))[:4]:
        with pytest.raises(DataError) as before:
            list(_two_parses(src, 1 << 20))
        with pytest.raises(DataError) as now:
            build_cache(src, "ase", cache_dir=tmp_path / "cache")
        assert str(now.value) == str(before.value)
        assert not (tmp_path / "cache").exists()  # the folder the failed build made is gone too (round 38)


def test_mptrj_like_extxyz_and_database_equal_the_two_parse_build(tmp_path):
    """The benchmark's MPtrj-like layouts: stress, per-atom magnetic moments, a numeric and a text key."""
    bench = _bench_data()
    xyz = tmp_path / "mptrj.extxyz"
    bench.synthetic_extxyz_scale(xyz, 60)
    _compare(xyz, tmp_path / "x", 500, **bench.EXTXYZ_OPTIONS)
    db = tmp_path / "mptrj.db"
    bench.synthetic_db_scale(db, 40)
    _compare(db, tmp_path / "d", 300)


def test_the_spill_is_unnamed_and_closed(shared_data, tmp_path, monkeypatch):
    """The spill is a temporary file without a name in the cache folder (nothing to clean up after a kill), closed
    when the read ends, also when a consumer stops early."""
    spills = []
    real = ase_stream.FrameSpill.__init__

    def recording(self, folder=None):
        real(self, folder)
        spills.append((self, folder))

    monkeypatch.setattr(ase_stream.FrameSpill, "__init__", recording)
    src = shared_data / "polymer" / "polymers_xtb.extxyz"
    build_cache(src, "ase", cache_dir=tmp_path / "cache", chunk_atoms=5000)
    (spill, folder), = spills
    assert Path(folder) == tmp_path / "cache" and spill._handle.closed and spill.frames == 900
    reader = iter_structures(src, chunk_atoms=100)
    next(reader)
    reader.close()
    assert spills[-1][0]._handle.closed and spills[-1][1] is None


def test_a_full_disk_for_the_spill_is_one_line_naming_its_folder(shared_data, tmp_path, monkeypatch):
    """A spill that cannot be written (a full disk) names its folder and what to do, not the file being read."""
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ase_stream.pickle, "dump", full)
    with pytest.raises(DataError) as error:
        build_cache(shared_data / "polymer" / "polymers_xtb.extxyz", "ase", cache_dir=tmp_path / "cache")
    assert str(error.value).startswith(f"{tmp_path / 'cache'}: cannot write the temporary file that keeps the frames")
    assert "No space left on device" in str(error.value)
    assert not (tmp_path / "cache").exists()  # the folder the failed build made is gone too (round 38)


def test_packed_arrays_come_back_with_their_layout():
    """Values, dtype, shape and the axes' memory order (C, Fortran, a strided view) survive the spill."""
    from torchmdx.data.ase_stream import _pack, _unpack

    base = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)
    for array in (base, np.asfortranarray(base), base.transpose(2, 0, 1), base[:, ::2], np.zeros((0, 3)),
                  np.array(True), np.arange(5, dtype=np.int32), np.asfortranarray(base[0]), base[0].T[::2]):
        back = _unpack(_pack(array))
        assert back.dtype == array.dtype and back.shape == array.shape
        np.testing.assert_array_equal(back, array)
        assert np.argsort(back.strides, kind="stable").tolist() == np.argsort(
            np.asarray(array).copy(order="K").strides, kind="stable").tolist()
        assert back.flags.writeable
    assert _unpack(_pack({"a": base, "b": "text", "c": None}))["b"] == "text"
