"""ASE files stream into the cache (torchmdx.data.ase_stream): two passes over one parse, bounded memory, and the
same structures, extras, units and error lines as the whole read (``read_ase``)."""

import tracemalloc

import numpy as np
import pytest

import torchmdx.data.ase_stream as ase_stream
from torchmdx import units
from torchmdx.data import build_cache, read_cache
from torchmdx.data.ase_format import read_ase
from torchmdx.data.formats import iter_structures
from torchmdx.errors import DataError

ARRAYS = ("z", "pos", "energy", "offsets", "forces", "cell", "pbc", "group")


def _write(path, frames):
    """An extxyz file written by hand: each frame a dict of ``symbols``, ``pos`` [N, 3], ``energy`` (eV unless
    the test says), optional ``forces`` [N, 3], ``arrays`` (name -> [N] or [N, k] real columns), ``info`` (more
    comment-line text), ``cell`` (3 x 3 rows; periodic when given)."""
    lines = []
    for f in frames:
        n = len(f["symbols"])
        columns = [("pos", f["pos"])] + ([("forces", f["forces"])] if f.get("forces") is not None else [])
        columns = [(name, np.asarray(v, dtype=float).reshape(n, -1)) for name, v in columns + list(f.get("arrays", {}).items())]
        props = "species:S:1:" + ":".join(f"{name}:R:{v.shape[1]}" for name, v in columns)
        head = f"Properties={props} energy={f['energy']!r} {f.get('info', '')}"
        if f.get("cell") is not None:
            head += ' Lattice="' + " ".join(repr(float(x)) for x in np.asarray(f["cell"]).reshape(-1)) + '" pbc="T T T"'
        else:
            head += ' pbc="F F F"'
        lines += [str(n), head]
        for i, s in enumerate(f["symbols"]):
            lines.append(" ".join([s] + [repr(float(x)) for _, v in columns for x in v[i]]))
    path.write_text("\n".join(lines) + "\n")
    return path


def _frames(rng, sizes, periodic=(), forces=True):
    """Random frames of the given atom counts (H, C, O); those whose index is in ``periodic`` in a 9 Å box."""
    out = []
    for k, n in enumerate(sizes):
        box = k in periodic
        pos = rng.uniform(0.0, 9.0, size=(n, 3)) if box else rng.normal(scale=2.0, size=(n, 3))
        out.append({"symbols": list(rng.choice(["H", "C", "O"], size=n)), "pos": pos,
                    "energy": float(-10.0 * n + rng.normal()), "forces": rng.normal(size=(n, 3)) if forces else None,
                    "cell": np.eye(3) * 9.0 if box else None})
    return out


def _streamed(path, tmp_path, chunk_atoms, **options):
    """The cache built from ``path`` in chunks of about ``chunk_atoms`` atoms, read back, and the chunks'
    (structures, atoms) as they went into the cache."""
    import torchmdx.data.cache as cache_mod

    sizes = []

    def recording(*args, **kwargs):
        for chunk in iter_structures(*args, **kwargs):
            sizes.append((len(chunk), chunk.n_atoms))
            yield chunk

    real, cache_mod.iter_structures = cache_mod.iter_structures, recording
    try:
        cache = build_cache(path, cache_dir=tmp_path / "cache", chunk_atoms=chunk_atoms, **options)
    finally:
        cache_mod.iter_structures = real
    return read_cache(cache), sizes


def _assert_same(cached, whole):
    """Array for array: numbers, positions, energies, forces, cells, pbc, groups, extras, atom extras."""
    for key in ARRAYS:
        a, b = getattr(cached, key), getattr(whole, key)
        assert (a is None) == (b is None), key
        if a is not None:
            np.testing.assert_array_equal(a, b, err_msg=key)
    assert cached.group_names == whole.group_names
    for name in ("extras", "atom_extras"):
        a, b = getattr(cached, name), getattr(whole, name)
        assert sorted(a) == sorted(b), name
        for key in a:
            assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # NaN stress rows compare equal
    assert cached.extra_units == whole.extra_units
    for key in ("format", "energy_key", "forces_key", "group_key", "units_in", "theory"):
        assert cached.metadata.get(key) == whole.metadata.get(key), key


def test_polymer_sample_streams_identically(shared_data, tmp_path):
    """The real sample (900 polymer frames, forces, a group key and a theory line) in chunks of ~2000 atoms."""
    src = shared_data / "polymer" / "polymers_xtb.extxyz"
    whole = read_ase(src, group_key="polymer")
    cached, chunks = _streamed(src, tmp_path, 2000, group_key="polymer")
    assert len(chunks) > 10 and sum(n for n, _ in chunks) == len(whole) == 900
    _assert_same(cached, whole)
    assert whole.metadata["theory"] == "GFN2-xTB (tblite 0.8)" and len(whole.group_names) > 1


def test_extras_in_some_frames_or_of_differing_shapes_are_dropped(tmp_path):
    """Extras kept only when every frame has them with one shape (info keys, calculator results, per-atom
    columns); chunks of 4 atoms, frames of up to 9 atoms (larger than a chunk)."""
    rng = np.random.default_rng(1)
    frames = _frames(rng, [3, 9, 5, 2, 7, 4])
    for k, f in enumerate(frames):
        n = len(f["symbols"])
        f["info"] = (f"total_charge={k} dipole=\"0.1 0.2 {k}\" vec=\"{' '.join(['1'] * (3 if k % 2 else 2))}\""
                     + (" only_some=1.5" if k in (0, 2) else ""))
        f["arrays"] = {"q": rng.normal(size=n), "m": rng.normal(size=(n, 3 if k < 3 else 1)),
                       **({"w": rng.normal(size=n)} if k != 4 else {})}
    path = _write(tmp_path / "extras.extxyz", frames)
    whole = read_ase(path)
    assert sorted(whole.extras) == ["dipole", "total_charge"] and sorted(whole.atom_extras) == ["q"]
    assert whole.extras["dipole"].shape == (6, 3) and whole.atom_extras["q"].shape == (30,)
    cached, chunks = _streamed(path, tmp_path, 4)
    assert [atoms for _, atoms in chunks] == [3 + 9, 5, 2 + 7, 4]  # the frame reaching 4 atoms ends a chunk
    _assert_same(cached, whole)


def test_chunk_boundaries(tmp_path):
    """A chunk ends after the frame that reaches chunk_atoms: chunks of chunk_atoms up to chunk_atoms plus one
    frame less one atom, a frame larger than a chunk in a chunk of its own (or with the frames before it)."""
    rng = np.random.default_rng(2)
    sizes = [int(n) for n in rng.integers(1, 13, size=40)] + [30, 1, 1]
    path = _write(tmp_path / "sizes.extxyz", _frames(rng, sizes))
    whole = read_ase(path)
    for chunk_atoms in (1, 7, 25):
        chunks = list(iter_structures(path, chunk_atoms=chunk_atoms))
        assert sum(len(c) for c in chunks) == len(sizes)
        for c in chunks[:-1]:
            assert chunk_atoms <= c.n_atoms < chunk_atoms + c.atoms_per_structure[-1]
        if chunk_atoms == 1:
            assert len(chunks) == len(sizes)
    cached, _ = _streamed(path, tmp_path, 7)
    _assert_same(cached, whole)


def test_stress_in_periodic_frames_only(tmp_path):
    """Periodic frames with a stress (9 values), molecules without one: NaN rows, as in the whole read."""
    rng = np.random.default_rng(3)
    frames = _frames(rng, [4, 3, 6, 2, 5], periodic=(0, 2, 4))
    for k in (0, 2, 4):
        s = rng.normal(size=(3, 3)) * 0.01
        frames[k]["info"] = 'stress="' + " ".join(repr(float(x)) for x in (s + s.T).reshape(-1)) + '"'
    path = _write(tmp_path / "stress.extxyz", frames)
    whole = read_ase(path)
    stress = whole.extras["stress"]
    assert np.isnan(stress[[1, 3]]).all() and np.isfinite(stress[[0, 2, 4]]).all()
    cached, chunks = _streamed(path, tmp_path, 5)
    assert len(chunks) == 3
    _assert_same(cached, whole)


def test_unit_conversion_by_hand(tmp_path):
    """kcal/mol and nm: energy x 0.0433641 (units.KCAL_PER_MOL_TO_EV), positions and cell x 10, forces
    x 0.0433641 / 10, stress x 0.0433641 / 1000."""
    kcal = units.KCAL_PER_MOL_TO_EV
    pos = np.array([[0.1, 0.2, 0.3], [0.25, 0.1, 0.05]])
    forces = np.array([[1.0, -2.0, 0.5], [-1.0, 2.0, -0.5]])
    frames = [{"symbols": ["C", "O"], "pos": pos, "energy": -100.0, "forces": forces, "cell": np.eye(3) * 2.0,
               "info": 'stress="1 0 0 0 2 0 0 0 3"'}]
    path = _write(tmp_path / "kcal.extxyz", frames * 3)
    whole = read_ase(path, energy_unit="kcal/mol", length_unit="nm")
    cached, _ = _streamed(path, tmp_path, 2, energy_unit="kcal/mol", length_unit="nm")
    _assert_same(cached, whole)
    for st in (whole, cached):
        np.testing.assert_allclose(st.energy, -100.0 * kcal, rtol=1e-15)
        np.testing.assert_allclose(st.pos[:2], pos * 10.0, rtol=1e-15)
        np.testing.assert_allclose(st.forces[:2], forces * kcal / 10.0, rtol=1e-15)
        np.testing.assert_allclose(st.cell[0], np.eye(3) * 20.0, rtol=1e-15)
        np.testing.assert_allclose(st.extras["stress"][0], np.diag([1.0, 2.0, 3.0]).reshape(-1) * kcal / 1000.0,
                                   rtol=1e-12)
        assert st.metadata["units_in"] == {"energy": "kcal/mol", "length": "nm"}


def test_mace_mptrj_layout_of_the_benchmark(tmp_path):
    """bench_data's synthetic (bench/data_synthetic.py) MPtrj-like file (REF_ keys, a 9-value REF_stress, a per-atom REF_magmom, a numeric and
    a text info key): the streamed cache equals the whole read, REF_magmom and corrected_total_energy kept."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("data_synthetic", Path(__file__).resolve().parents[1] / "bench" /
                                                  "data_synthetic.py")
    bench_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_data)
    path = tmp_path / "mptrj.extxyz"
    bench_data.synthetic_extxyz_scale(path, 40)
    whole = read_ase(path, **bench_data.EXTXYZ_OPTIONS)
    assert sorted(whole.extras) == ["corrected_total_energy", "stress"] and list(whole.atom_extras) == ["REF_magmom"]
    assert whole.pbc.all() and whole.forces is not None and np.isfinite(whole.extras["stress"]).all()
    cached, chunks = _streamed(path, tmp_path, 200, **bench_data.EXTXYZ_OPTIONS)
    assert len(chunks) > 3
    _assert_same(cached, whole)


def _bad_files(tmp_path):
    """(name, file text edit, options) of files the whole read refuses in the first pass and in the second."""
    rng = np.random.default_rng(4)

    def write(name, frames):
        return _write(tmp_path / f"{name}.extxyz", frames)

    frames = _frames(rng, [3, 4, 2, 5, 3])
    later_no_forces = [dict(f) for f in frames]
    later_no_forces[3]["forces"] = None
    not_a_number = [dict(f) for f in frames]
    not_a_number[4]["energy"] = "abc"
    bad_forces = [dict(f) for f in frames]
    bad_forces[2]["forces"] = np.full((2, 3), np.nan)
    periodic = _frames(rng, [3, 4, 2], periodic=(0, 1, 2))
    periodic[0]["info"] = 'stress="1 0 0 0 1 0 0 0 1"'
    no_energy = write("no_energy", frames)
    no_energy.write_text(no_energy.read_text().replace(f"energy={frames[2]['energy']!r}", "e=1.0"))
    return [
        (write("later_no_forces", later_no_forces), {}, "frame 3: no forces key 'forces', although other frames have one"),
        (write("no_forces", _frames(rng, [3, 2], forces=False)), {"forces_key": "forces"},
         "forces key 'forces' not found in any frame"),
        (write("not_a_number", not_a_number), {}, "frame 4: energy 'abc' is not a number"),
        (write("nan_forces", bad_forces), {}, "frame 2: non-finite forces 'forces' (nan) on atom 0"),
        (write("periodic", periodic), {}, "frame 1: no stress key 'stress' (or a virial), although other frames have one"),
        (no_energy, {}, "frame 2: no energy 'energy'"),
        (write("group", frames), {"group_key": "polymer"}, "frame 0: group key 'polymer' not found"),
    ]


def assert_same_refusal(path, options: dict, expected: str, cache_dir, chunk_atoms: int) -> None:
    """``path`` is refused with the same line whole, streamed in chunks of ``chunk_atoms`` atoms and by the cache
    build; the line starts with ``path: expected``."""
    with pytest.raises(DataError) as whole:
        read_ase(path, **options)
    with pytest.raises(DataError) as streamed:
        list(iter_structures(path, chunk_atoms=chunk_atoms, **options))
    assert str(streamed.value) == str(whole.value), path.name
    assert str(whole.value).startswith(f"{path}: {expected}"), str(whole.value)
    with pytest.raises(DataError) as built:
        build_cache(path, cache_dir=cache_dir, chunk_atoms=chunk_atoms, **options)
    assert str(built.value) == str(whole.value)


def peak_traced_bytes(read) -> int:
    """The peak of the memory Python allocates (``tracemalloc``) while ``read()`` runs."""
    tracemalloc.start()
    try:
        read()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_bad_inputs_same_lines_as_the_whole_read(tmp_path):
    """Each refused file gives the whole read's line, streamed in chunks of 2 atoms, and leaves no cache."""
    for path, options, expected in _bad_files(tmp_path):
        assert_same_refusal(path, options, expected, tmp_path / "cache", 2)
    assert not any((tmp_path / "cache").glob("*.h5"))


def test_a_file_changed_between_the_passes_is_refused(tmp_path, monkeypatch):
    """The file is parsed once (pass 2 reads pass 1's frames back from the spill): a frame appended after pass 1
    is not read, and the cache build refuses the changed file with its line (size and time differ)."""
    rng = np.random.default_rng(5)
    path = _write(tmp_path / "grows.extxyz", _frames(rng, [3, 4, 2]))
    before = read_ase(path)
    finish = ase_stream.FrameSummary.finish

    def finish_then_append(self):
        out = finish(self)
        _write(path, _frames(rng, [3, 4, 2, 6]))
        return out

    monkeypatch.setattr(ase_stream.FrameSummary, "finish", finish_then_append)
    chunks = list(iter_structures(path, chunk_atoms=2))
    assert sum(len(c) for c in chunks) == 3
    assert np.concatenate([c.energy for c in chunks]).tolist() == before.energy.tolist()
    _write(path, _frames(np.random.default_rng(5), [3, 4, 2]))
    with pytest.raises(DataError, match=r"grows.extxyz: changed while it was being read; try again$"):
        build_cache(path, cache_dir=tmp_path / "cache", chunk_atoms=2)
    assert not (tmp_path / "cache").exists()  # nothing left, not even the folder the build made (round 38)


def test_progress_bars_say_which_pass(tmp_path, monkeypatch):
    import tqdm.auto

    bars = []
    real = tqdm.auto.tqdm

    def recording(iterable=None, **kwargs):
        bars.append((kwargs.get("desc"), kwargs.get("total")))
        return real(iterable, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", recording)
    path = _write(tmp_path / "bars.extxyz", _frames(np.random.default_rng(6), [3, 4, 2]))
    list(iter_structures(path))
    assert bars == [("reading bars.extxyz (pass 1 of 2: keys and shapes)", None),
                    ("reading bars.extxyz (pass 2 of 2: values)", 3)]
    bars.clear()
    read_ase(path)
    assert bars == [("reading bars.extxyz", None)]


def test_second_pass_holds_one_chunk(tmp_path, monkeypatch):
    """The file is parsed once; when a chunk is handed out, the second pass has read back from the spill exactly
    the frames handed out so far (no read-ahead, nothing kept): memory is one chunk of at most chunk_atoms plus
    one frame."""
    rng = np.random.default_rng(7)
    sizes = [int(n) for n in rng.integers(1, 10, size=60)]
    path = _write(tmp_path / "lazy.extxyz", _frames(rng, sizes))
    parsed, read = [], []
    frames, spilled = ase_stream.AseReading.frames, ase_stream.FrameSpill.read

    def counting(self, desc=None, total=None):
        parsed.append(0)
        for frame in frames(self, desc=desc, total=total):
            parsed[-1] += 1
            yield frame

    def reading(self):
        read.append(0)
        for frame in spilled(self):
            read[-1] += 1
            yield frame

    monkeypatch.setattr(ase_stream.AseReading, "frames", counting)
    monkeypatch.setattr(ase_stream.FrameSpill, "read", reading)
    handed = 0
    for chunk in iter_structures(path, chunk_atoms=10):
        handed += len(chunk)
        assert parsed == [len(sizes)] and read == [handed]  # parsed once; pass 2 read just the frames handed out
        assert chunk.n_atoms < 10 + max(sizes)
    assert handed == len(sizes)


def test_streamed_peak_memory_is_a_fraction_of_the_whole_read(tmp_path):
    """tracemalloc's peak (numpy buffers included) over a 400-frame file: the whole read holds every frame, the
    streamed read (chunks of 100 atoms, each dropped once taken) one chunk; measured 6-7x apart, asserted 4x."""
    rng = np.random.default_rng(8)
    path = _write(tmp_path / "many.extxyz", _frames(rng, [8] * 400))
    read_ase(_write(tmp_path / "warm.extxyz", _frames(rng, [2]))), list(iter_structures(tmp_path / "warm.extxyz"))

    def streamed():
        for _ in iter_structures(path, chunk_atoms=100):
            pass

    whole, stream = peak_traced_bytes(lambda: read_ase(path)), peak_traced_bytes(streamed)
    assert stream * 4 < whole, (stream, whole)
