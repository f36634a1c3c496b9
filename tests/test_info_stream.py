"""``torchmdx data info`` on a raw file without a cache reads it in one streamed pass
(``torchmdx.data.summary_stream``): the same output as the whole read gave (``summarize(read_structures(...))``,
the config's split and atomic references, the label check's line), in less memory, writing nothing."""

import json

import numpy as np
import pytest

from torchmdx.cli import data_cmd
from torchmdx.cli.main import main
from torchmdx.data.data_config import DataConfig, load_data_config
from torchmdx.data.formats import read_structures
from torchmdx.data.label_check import check_labels
from torchmdx.data.summary import format_summary, summarize
from torchmdx.data.summary_stream import NotKept, summary_structures
from torchmdx.errors import DataError
from test_ase_stream import _frames, _write, peak_traced_bytes

#: (file under ../shared/data, format, reader options): every reader, an ASE database, groups, extras
SAMPLES = [
    ("polymer/polymers_xtb.extxyz", None, {"group_key": "polymer"}),
    ("ani/ani1x_xtb.h5", None, {}),
    ("ani/ani1_xtb.h5", None, {}),
    ("md17/md17_ethanol_xtb.npz", None, {}),
    ("md17/ethanol_snip.xyz", None, {}),
    ("qm9/qm9_20.db", None, {}),
    ("qm9/qm9_20.db", "ase", {"energy_key": "energy_U0"}),
]


def _whole(path, fmt, options, config=None) -> tuple:
    """What ``data info`` printed before: the summary of the whole read (with a config: its split and references)
    and the label check's line (None when the labels pass)."""
    structures = read_structures(path, fmt, **options)
    summary = summarize(structures)
    if config is not None:
        summary.update(data_cmd._config_part(structures, config))
    try:
        check_labels(structures)
        problem = None
    except DataError as exc:
        problem = str(exc)
    return summary, problem


def _info(capsys, *argv) -> tuple:
    code = main(["data", "info", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.startswith("error:")]


def _assert_same_summary(got: dict, expected: dict):
    """Equal key for key; the force RMS to 1e-13 relative (summed as a cache's statistics: the whole read's own
    sum differs in its last digit with the array's layout), everything else exactly."""
    assert list(got) == list(expected)
    for key in expected:
        if key == "force_rms_eV_per_A" and expected[key] is not None:
            assert got[key] == pytest.approx(expected[key], rel=1e-13), key
        else:
            assert got[key] == expected[key], key


@pytest.mark.parametrize("name, fmt, options", SAMPLES, ids=[f"{s[0]}-{s[1]}" for s in SAMPLES])
def test_info_of_sample_files_as_the_whole_read(shared_data, tmp_path, capsys, name, fmt, options):
    """JSON and text output of ``data info`` on each sample file (no cache) equal the whole read's; nothing written."""
    path = shared_data / name
    expected, problem = _whole(path, fmt, options)
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
    flags += ["--format", fmt] if fmt else []
    code, out, errors = _info(capsys, path, "--json", "--cache-dir", tmp_path / "cache", *flags)
    assert code == (0 if problem is None else 1) and errors == ([] if problem is None else [f"error: {problem}"])
    _assert_same_summary(json.loads(out), json.loads(json.dumps(expected)))
    code, out, _ = _info(capsys, path, "--cache-dir", tmp_path / "cache", *flags)
    assert out.strip() == format_summary(expected)
    assert list(tmp_path.iterdir()) == []


def test_info_of_a_config_as_the_whole_read(shared_data, tmp_path, capsys):
    """A config's split (a held-out group) and fitted atomic references, computed from the streamed summary's
    per-structure arrays and atomic numbers, equal the whole read's."""
    config = tmp_path / "data.yaml"
    config.write_text(
        f"data:\n  path: {shared_data / 'polymer' / 'polymers_xtb.extxyz'}\n  group_key: polymer\n"
        f"  cache_dir: {tmp_path / 'cache'}\n  split_by_group: false\n  test_groups: [PMMA]\n  train_size: 0.9\n"
        "  val_size: 0.1\n  seed: 5\nmodel:\n  cutoff: 5.0\n")
    data = load_data_config(config)
    expected, _ = _whole(data.path, None, data.reader_options(), data)
    code, out, errors = _info(capsys, config, "--json")
    assert code == 0 and errors == []
    got = json.loads(out)
    assert got["split"]["test"] == 150 and set(got["atomic_references_eV"]) == {"1", "6", "7", "8", "17"}
    _assert_same_summary(got, json.loads(json.dumps(expected)))
    assert not (tmp_path / "cache").exists()


def test_label_problems_found_in_later_chunks(tmp_path, capsys):
    """A force beyond physical in a later chunk (named with its index in the whole file, before a bad energy
    earlier in the file: the check's order), and an energy beyond physical: the whole read's line."""
    rng = np.random.default_rng(11)
    frames = _frames(rng, [5, 4, 6, 3, 5, 4, 6, 5])
    frames[2]["energy"] = 1e9
    frames[6]["forces"] = np.array(frames[6]["forces"]) * 0 + 2e4
    forces = _write(tmp_path / "forces.extxyz", frames)
    frames[6]["forces"] = rng.normal(size=(6, 3))
    energy = _write(tmp_path / "energy.extxyz", frames)
    for path, start in ((forces, "structure 6 (atom 0): force [20000.0"), (energy, "structure 2: energy 1e+09")):
        _, expected = _whole(path, None, {})
        assert expected.startswith(f"{path}: {start}"), expected
        structures, problem = summary_structures(path, chunk_atoms=8)
        got = data_cmd._label_problem(structures, DataConfig(path=str(path)), problem, checked_forces=True)
        assert got == expected
        code, out, errors = _info(capsys, path, "--cache-dir", tmp_path / "cache")
        assert code == 1 and errors == [f"error: {expected}"] and "structures" in out


def test_summary_keeps_no_per_atom_values(shared_data, tmp_path):
    """Positions, forces and per-atom extras are placeholders that refuse to be read; atomic numbers are uint8.
    Chunks of 500 atoms give the summary of one chunk, group codes numbered over the chunks."""
    path = shared_data / "polymer" / "polymers_xtb.extxyz"
    whole = read_structures(path, group_key="polymer")
    structures, problem = summary_structures(path, chunk_atoms=500, group_key="polymer")
    assert problem is None and structures.z.dtype == np.uint8 and structures.n_atoms == whole.n_atoms
    for placeholder in (structures.pos, structures.forces):
        assert isinstance(placeholder, NotKept) and placeholder.shape == (whole.n_atoms, 3)
        with pytest.raises(TypeError, match="does not keep"):
            placeholder[0]
        with pytest.raises(TypeError, match="does not keep"):
            np.asarray(placeholder)
    np.testing.assert_array_equal(structures.z, whole.z)
    np.testing.assert_array_equal(structures.group, whole.group)
    assert structures.group_names == whole.group_names
    for key in ("energy", "offsets", "cell", "pbc"):
        np.testing.assert_array_equal(getattr(structures, key), getattr(whole, key), err_msg=key)
    _assert_same_summary(summarize(structures), summarize(whole))


def test_streamed_info_peak_memory_is_a_fraction_of_the_whole_read(tmp_path):
    """tracemalloc's peak over a 400-frame extxyz: the whole read held every frame; the summary (chunks of 100
    atoms) a chunk and the per-structure arrays; measured ~6x apart, asserted 3x."""
    rng = np.random.default_rng(12)
    path = _write(tmp_path / "many.extxyz", _frames(rng, [8] * 400))
    warm = _write(tmp_path / "warm.extxyz", _frames(rng, [2, 3, 2]))
    summary_structures(warm), read_structures(warm)

    whole, stream = (peak_traced_bytes(lambda: read_structures(path)),
                     peak_traced_bytes(lambda: summary_structures(path, chunk_atoms=100)))
    assert stream * 3 < whole, (stream, whole)


def test_data_info_counts_the_periodic_structures_of_a_mixed_file(tmp_path, capsys):
    """A file where only some frames are periodic: ``data info`` says how many ('1 of 2 structures'),
    not a plain 'yes' (round 25's leftover); the JSON keeps ``periodic`` (any) and adds ``n_periodic``."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    frames = []
    for k, cell in enumerate((None, [8.0, 8.0, 8.0])):
        atoms = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], cell=cell, pbc=cell is not None)
        atoms.calc = SinglePointCalculator(atoms, energy=-14.0 - k, forces=np.zeros((3, 3)))
        frames.append(atoms)
    path = tmp_path / "mixed.extxyz"
    write(path, frames)
    assert main(["data", "info", str(path)]) == 0
    assert any(line.split() == ["periodic", "1", "of", "2", "structures", "(the", "others", "open)"]
               for line in capsys.readouterr().out.splitlines())
    assert main(["data", "info", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["periodic"] is True and summary["n_periodic"] == 1
