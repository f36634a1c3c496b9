"""The PDB atom-name check (``torchmdx.data.ase_text.pdb_name_as_element``) reads a file a block at a time and
is remembered per file: it decoded the whole file, and listed its lines, at every open (the dataset's streamed
reads open a file several times). The answers are the ones of the whole read: the line and atom numbers are
known here by how each file is put together."""

from __future__ import annotations

import gzip
import os
import time

import pytest

from torchmdx.data import ase_text
from torchmdx.data.ase_text import open_ase_source, pdb_name_as_element

# a glycine's first atoms as packmol writes them: no element symbol in columns 77-78
GLYCINE = [
    "ATOM      1  N   GLY A   1      -0.966   0.493   1.500  1.00  0.00",
    "ATOM      2  CA  GLY A   1       0.257   0.418   0.692  1.00  0.00",
    "ATOM      3  C   GLY A   1      -0.094   0.017  -0.716  1.00  0.00",
]
REMARK = "REMARK   1 écrit à la main, naïvement"  # two-byte UTF-8 characters (split across small blocks)


def _calcium(line: int, atom: int) -> str:
    return (f"line {line} (atom {atom}, name 'CA' of GLY A 1) has no element symbol in columns 77-78, and ASE would "
            "take Ca (calcium) from the atom name; an atom name is not an element ('CA' is a protein's alpha carbon): "
            "put each atom's element symbol in columns 77-78 (e.g. with pdbfixer or Open Babel), or give the "
            "structure as extxyz")


def _models(shared_data) -> tuple[list, int]:
    """Lines of three models: caffeine (elements given) twice, then the glycine without elements; and the line
    number (1-based) of the glycine's CA."""
    caffeine = [line for line in (shared_data / "systems" / "caffeine.pdb").read_text().splitlines()
                if line.startswith("HETATM")]
    assert len(caffeine) == 24
    lines = [REMARK]
    for model in (1, 2):
        lines += [f"MODEL     {model:4d}", *caffeine, "ENDMDL"]
    lines += ["MODEL        3", *GLYCINE, "ENDMDL", "END"]
    return lines, 1 + 2 * 26 + 1 + 2  # the remark, two models of 24 atoms and MODEL/ENDMDL, MODEL 3, N, CA


@pytest.mark.parametrize("block", [5, 64, 1 << 20])
@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_the_block_read_names_the_line_the_whole_read_named(tmp_path, shared_data, monkeypatch, block, newline):
    monkeypatch.setattr(ase_text, "PDB_BLOCK_BYTES", block)
    lines, ca = _models(shared_data)
    text = newline.join(lines) + newline
    files = {"plain.pdb": text.encode("utf-8"), "bom8.pdb": b"\xef\xbb\xbf" + text.encode("utf-8"),
             "bom16.pdb": text.encode("utf-16"), "gz.pdb": gzip.compress(text.encode("utf-8"))}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        assert pdb_name_as_element(tmp_path / name) == _calcium(ca, 1), name  # the CA is atom 1 of model 3
    # every model with its elements: nothing to say
    good = newline.join(line for line in lines[:-len(GLYCINE) - 3]) + newline + "END" + newline
    (tmp_path / "good.pdb").write_text(good, newline="")
    assert pdb_name_as_element(tmp_path / "good.pdb") is None


def test_a_file_that_is_not_utf8_text_is_left_to_ase(tmp_path, shared_data, monkeypatch):
    """The whole decode failed on a byte that is not UTF-8 anywhere (None: ASE's read names the problem); the
    block read reads on after the line it found, to the same answer."""
    monkeypatch.setattr(ase_text, "PDB_BLOCK_BYTES", 64)
    lines, _ = _models(shared_data)
    (tmp_path / "latin.pdb").write_bytes(("\n".join(lines) + "\n").encode("utf-8") + "REMARK caf\xe9\n".encode("latin-1"))
    assert pdb_name_as_element(tmp_path / "latin.pdb") is None


def _age(path, seconds: float = 3600.0) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_settled_file_is_read_once_by_several_opens(tmp_path, shared_data, monkeypatch):
    from torchmdx.errors import DataError

    scans = []
    real_scan = ase_text._pdb_scan
    monkeypatch.setattr(ase_text, "_pdb_scan", lambda path: scans.append(path) or real_scan(path))
    lines, ca = _models(shared_data)
    bad, good = tmp_path / "bad.pdb", tmp_path / "good.pdb"
    bad.write_text("\n".join(lines) + "\n")
    good.write_text("\n".join(lines[:-len(GLYCINE) - 3] + ["END"]) + "\n")
    # just written: checked at every open (a rewrite within the file system's time resolution keeps size and mtime)
    assert pdb_name_as_element(bad) == pdb_name_as_element(bad) == _calcium(ca, 1)
    assert len(scans) == 2
    _age(bad), _age(good)
    scans.clear()
    for _ in range(3):  # the streamed reads' opens: the format's guess, pass 1, pass 2
        with pytest.raises(DataError) as error:
            with open_ase_source(bad):
                pass
        assert str(error.value) == f"{bad}: {_calcium(ca, 1)}"
        with open_ase_source(good) as (source, options):
            assert source == str(good) and options["format"] == "proteindatabank"
    assert sorted(map(str, scans)) == [str(bad), str(good)]
    # a changed file (another size) is read again: the CA given its element, nothing to say
    fixed = [line + "           C" if line.startswith("ATOM") else line for line in lines]
    bad.write_text("\n".join(fixed) + "\n")
    _age(bad)
    assert pdb_name_as_element(bad) is None and len(scans) == 3
    # the same size and mtime but another inode (a copy moved over it): read again
    other = tmp_path / "other.pdb"
    stat = bad.stat()
    other.write_text(("\n".join(fixed) + "\n").replace("           C", "            "))
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(other, bad)
    assert bad.stat().st_size == stat.st_size and bad.stat().st_mtime_ns == stat.st_mtime_ns
    assert pdb_name_as_element(bad) == _calcium(ca, 1) and len(scans) == 4
