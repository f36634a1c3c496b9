"""Bad inputs, round 41 (branch bad41): round 40's leftovers (a touched data source hashed at every use; the sweep
workers' two-line Python warnings) and Python-API inputs (half-precision positions and weights, a PyG batch or numpy
arrays given to the model, a format that is not a name); see docs/bad_inputs.md, round 41."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from bad_inputs_common import tiny_model, water, water_npz

from torchmdx.errors import DataError, ModelError


def test_a_touched_source_is_hashed_once_then_quick_again(tmp_path, monkeypatch):
    """After a ``touch`` (or ``chmod``) of an unchanged source, every later use hashed the whole source again until
    the cache was rebuilt (seconds per run for a large dataset): the source's new quick fingerprint is now kept
    beside the cache (``.<cache>.seen``, temporary name then rename) and the next use is quick. A rewrite of the
    same size with the old modification time is still found (its ctime differs from the kept one)."""
    from torchmdx.data import cache as cache_mod
    from torchmdx.data.cache import build_cache, is_current, removable_cache_files

    source = water_npz(tmp_path)
    cache = build_cache(source, cache_dir=tmp_path / "cache", say=lambda line: None)
    hashed = []
    real_hash = cache_mod.content_hash
    monkeypatch.setattr(cache_mod, "content_hash", lambda path: hashed.append(path) or real_hash(path))
    assert is_current(cache, source) and hashed == []
    stat = os.stat(source)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touch
    assert is_current(cache, source) and len(hashed) == 1  # the first use after it hashes
    assert is_current(cache, source) and len(hashed) == 1  # the second does not
    assert build_cache(source, cache_dir=tmp_path / "cache", say=pytest.fail) == cache and len(hashed) == 1
    from torchmdx.data.cache import seen_path  # (imported here: the base commit fails on the count above)

    assert sorted(p.name for p in cache.parent.iterdir()) == sorted([cache.name, seen_path(cache).name])
    seen = seen_path(cache).read_text()
    seen_path(cache).write_text(seen[:20])  # cut short (it is written whole, then renamed): hashed and written again
    assert is_current(cache, source) and len(hashed) == 2 and seen_path(cache).read_text() == seen
    assert is_current(cache, source) and len(hashed) == 2
    # a content change of the same size, the modification time put back: hashed, not current, rebuilt
    stat = os.stat(source)
    data = dict(np.load(source))
    data["E"] = data["E"] + 1.0
    np.savez(source, **data)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(source).st_size == stat.st_size
    assert not is_current(cache, source) and len(hashed) == 3
    said = []
    assert build_cache(source, cache_dir=tmp_path / "cache", say=said.append) == cache
    assert said == [f"rebuilding {cache}: the source changed"] and not seen_path(cache).exists()
    assert is_current(cache, source)
    # `data clean` takes a cache's .seen file with it
    os.chmod(source, 0o600)
    assert is_current(cache, source) and seen_path(cache).is_file()
    cache.unlink()
    assert removable_cache_files(cache.parent) == [
        (seen_path(cache), f"the source fingerprint of {cache.name}, which is removed or gone")]


def test_a_sweep_worker_prints_a_changed_data_warning_as_one_line(tmp_path, monkeypatch, capsys):
    """A sweep's worker process (``python -m torchmdx.train.sweep``, its output in the point's sweep.log) showed
    "split was made from a dataset with different content" as a Python UserWarning with its source line, once per
    call: now one ``warning:`` line, once, as the ``torchmdx`` command prints warnings."""
    from torchmdx.data.splits import Split, load_split, save_split
    from torchmdx.train import sweep

    split = tmp_path / "s.npz"
    save_split(Split(train=np.arange(12), val=np.arange(12, 16), test=np.arange(16, 20), n_structures=20, seed=0),
               split, "a" * 40)

    def point(sweep_dir, point_id):  # the point's training reads its split twice (setup for fit and for test)
        load_split(split, 20, "b" * 40)
        load_split(split, 20, "b" * 40)

    monkeypatch.setattr(sweep, "run_point", point)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert sweep._worker([str(tmp_path / "sw"), "p0"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"warning: {split}: split was made from a dataset with different content (hash differs): right "
                     "when the same structures were labelled again, otherwise its indices pick other structures than "
                     "those it was made for"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_positions_or_weights_are_refused_by_the_model(dtype):
    """``model(z, pos)`` with float16 / bfloat16 positions computed the vectors in them: -0.15910 eV (float16) and
    -0.16376 eV (bfloat16) for the -0.15905 / -0.16000 eV of the same rounded positions in float32; a ``model.half()``
    called directly gave -0.162 eV for -0.159, where predict and the Calculator refuse it. Now one line each."""
    model = tiny_model()
    atoms = water()
    z, pos = torch.tensor(atoms.numbers), torch.tensor(atoms.positions)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ModelError, match=rf"^pos is {name}, which keeps 3 significant digits or fewer .* give "
                                         r"float32 or float64 positions \(pos.float\(\);"):
        model(z, pos.to(dtype))
    half = tiny_model().to(dtype)
    for call in (lambda: half(z, pos.float()), lambda: half(atoms)):  # model(atoms): not "pos is ..."
        with pytest.raises(ModelError, match=rf"^model\(\.\.\.\): the model's weights are {name}, .* model.float\(\) "
                                             r"or model.double\(\) first"):
            call()
    assert model(z, pos)["energy"].dtype == torch.float64  # float32 and float64 still run


def test_the_model_given_a_pyg_batch_or_arrays_says_how_to_call_it(tmp_path):
    """``model(batch)`` with the data module's own batch said "item 0 of the DataBatch of 6 has type tuple, not
    ase.Atoms", and ``model(numbers, positions)`` as numpy arrays "item 0 of the ndarray of 3 has type int64":
    both now name what was given and the call that works."""
    from torch_geometric.data import Batch

    from torchmdx.data.cache import build_cache
    from torchmdx.data.dataset import H5Dataset

    dataset = H5Dataset(build_cache(water_npz(tmp_path), cache_dir=tmp_path / "cache", say=lambda line: None))
    batch = Batch.from_data_list([dataset[0], dataset[1]])
    model = tiny_model()
    with pytest.raises(ModelError) as caught:
        model(batch)
    assert str(caught.value) == (
        "expected an ase.Atoms or a non-empty list of ase.Atoms, got a DataBatch (torch_geometric): call the model "
        "with its tensors, model(batch.z, batch.pos, batch.batch, batch.cell, batch.pbc) (a single Data: "
        "model(data.z, data.pos, cell=data.cell, pbc=data.pbc))")
    model(batch.z, batch.pos, batch.batch, batch.cell, batch.pbc)  # the call it names works
    atoms = water()
    with pytest.raises(ModelError, match=r"got a numpy array: model\(z, pos\) takes torch tensors \(torch.as_tensor"):
        model(atoms.numbers, atoms.positions)


def test_read_structures_with_a_format_that_is_not_a_name(tmp_path):
    """``read_structures(path, format=5)``: "AttributeError: 'int' object has no attribute 'strip'"."""
    from torchmdx.data import read_structures

    with pytest.raises(DataError, match=r"^format must be the name of a format \(md17, .*\) or None to guess it from "
                                        r"the file, got 5 \(int\)$"):
        read_structures(water_npz(tmp_path), format=5)
