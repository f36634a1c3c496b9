"""Text-level checks of the structure files ASE reads (used by :mod:`torchmdx.data.ase_format`): an extxyz
comment line that gives a key twice (ASE keeps the last value, silently), a species column of atomic
numbers (ASE's KeyError '8') or of atom labels ('C1'), and PDB atoms without an element symbol (ASE takes one
from the atom name: an alpha carbon 'CA' as calcium)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torchmdx.errors import DataError


def number_as_symbol(text: str) -> str:
    """The line for an xyz/extxyz species column holding ``text``, an atomic number ('8'), where ASE reads
    element symbols (its KeyError '8' said nothing)."""
    from ase.data import chemical_symbols

    z = int(text)
    example = f" ({z} is {chemical_symbols[z]})" if 0 < z < len(chemical_symbols) else ""
    return (f"the species column holds {text!r}, a number where ASE reads an element symbol{example}; write "
            "element symbols in that column")


def number_key(exc: BaseException) -> Optional[str]:
    """The digits ASE failed to look up as a chemical symbol (KeyError('8')), else None."""
    key = exc.args[0] if isinstance(exc, KeyError) and exc.args else None
    return key if isinstance(key, str) and key.isdigit() else None


def extxyz_options(path: Path, fmt: Optional[str]) -> dict:
    """``{"format": fmt}``, with, for an extxyz file, a comment-line parser that refuses a key given twice
    (``energy=-1.0 ... energy=-2.0``: ASE kept the last value, silently)."""
    if fmt is None:
        from ase.io.formats import filetype

        try:
            fmt = filetype(str(path), read=True, guess=True)
        except Exception:  # noqa: BLE001 - ASE's own read says what is wrong
            return {}
    if fmt != "extxyz":
        return {"format": fmt}
    from ase.io.extxyz import key_val_str_to_dict

    def parse(line, sep=None):
        twice = repeated_key(line)
        if twice:
            key, values = twice
            raise DataError(f"{path}: a comment line gives {key} twice ({key}={values[0]} and {key}={values[1]}); "
                            "ASE would keep the last one, silently: give each key once")
        return key_val_str_to_dict(line, sep)

    return {"format": fmt, "properties_parser": parse}


def repeated_key(line: str) -> Optional[tuple]:
    """The first key an extxyz comment line gives twice and its two values as written, else None; the
    line is split as ASE's ``key_val_str_to_dict`` splits it (quotes, brackets, backslash escapes)."""
    closing = {"'": "'", '"': '"', "{": "}", "[": "]"}
    pairs, delimiter, escaped = [[[]]], None, False
    for char in line.strip():
        if escaped:
            pairs[-1][-1].append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif delimiter:
            if char == delimiter:
                delimiter = None
            else:
                pairs[-1][-1].append(char)
        elif char in closing:
            delimiter = closing[char]
        elif char.isspace():
            if pairs[-1][-1]:
                pairs.append([[]])
        elif char == "=":
            if pairs[-1] == [[]]:
                del pairs[-1]
            if pairs:
                pairs[-1].append([])
            else:
                pairs.append([[], []])
        else:
            pairs[-1][-1].append(char)
    seen = {}
    for pair in pairs:
        if not pair or not pair[0]:
            continue
        key, value = "".join(pair[0]), "=".join("".join(x) for x in pair[1:]) if len(pair) > 1 else "T"
        if key in seen:
            return key, (seen[key], value)
        seen[key] = value
    return None


def _atom_line(line: str) -> bool:
    """An xyz atom line: a species and three numbers (``H -0.24 0.93 0``)."""
    parts = line.split()
    if len(parts) < 4 or not parts[0][:1].isalpha():
        return False
    try:
        [float(x) for x in parts[1:4]]
    except ValueError:
        return False
    return True


def short_atom_count(path) -> Optional[str]:
    """Where an xyz/extxyz file's atom-count line is too small (``2`` over three atom lines: ASE read the third
    as the next frame's count, "Expected xyz header but got: invalid literal for int() ... 'H -0.24 0.93 0'"), in
    words; None when the file's counts are not the cause (or it cannot be read as text)."""
    from torchmdx.io_utils import decode_text, open_compressed

    try:
        with open_compressed(path, "rb") as handle:
            lines = decode_text(handle.read()).splitlines()
    except Exception:  # noqa: BLE001 - not text: ASE's own line stands
        return None
    i, frame = 0, 0
    while i < len(lines):
        try:
            count = int(lines[i].strip())
        except ValueError:
            return None  # not a count where a frame starts: not a short count of the previous frame
        end = i + 2 + count
        if end < len(lines) and _atom_line(lines[end]):
            atoms = count
            while i + 2 + atoms < len(lines) and _atom_line(lines[i + 2 + atoms]):
                atoms += 1
            return (f"line {i + 1}: frame {frame}'s atom count is {count}, but {atoms} atom lines follow its comment "
                    f"line (line {end + 1}, {lines[end].strip()!r}, was read where the next frame's atom count "
                    f"belongs): the count may be too small; make it {atoms}")
        i, frame = end, frame + 1
        if all(not x.strip() for x in lines[i:]):  # blank lines at the end of the file
            break
    return None


def label_as_symbol(path, key: str) -> Optional[str]:
    """The line for an xyz/extxyz species column holding ``key``, an atom label such as 'C1' or 'H12' (as
    crystallography and modelling programs write them) where ASE reads element symbols (its KeyError 'C1' said
    nothing else); None when no atom line of ``path`` starts with ``key`` (the KeyError is not about a species)."""
    import re

    from ase.data import chemical_symbols

    from torchmdx.io_utils import decode_text, open_compressed

    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_+*'-]{0,15}", key) or key.capitalize() in chemical_symbols:
        return None
    try:
        with open_compressed(path, "rb") as handle:
            lines = decode_text(handle.read()).splitlines()
    except Exception:  # noqa: BLE001 - not text: ASE's own line stands
        return None
    for number, line in enumerate(lines, 1):
        parts = line.split()
        if parts and parts[0].lower() == key.lower() and _atom_line(line):  # ASE capitalises: 'CA1' is 'Ca1'
            key = parts[0]
            letters = re.match(r"[A-Za-z]+", key).group(0)  # 'Cl' of 'Cl2'; no guess for 'CA1' (C or Ca?)
            example = f" ({letters}?)" if letters in chemical_symbols[1:] else ""
            return (f"line {number}: the species column holds {key!r}, an atom label, not an element "
                    f"symbol{example}; write element symbols (H, C, O, ...) in that column")
    return None


def pdb_name_as_element(path) -> Optional[str]:
    """The first ATOM/HETATM record of PDB file ``path`` without an element symbol (columns 77-78) whose atom
    name ASE reads as a two-letter element, in words; None when there is none. ASE falls back to the atom name
    (columns 13-16) when the element column is empty, trying its first two letters first: a protein's alpha
    carbon 'CA' became calcium, 'HG1' mercury, 'NE2' neon, 'CD1' cadmium, and md, label and export ran on
    them without a word (files written by packmol, older tools, or trimmed to 66 columns). An ion whose residue
    has its atom's name (``HETATM ... ZN ZN``) is taken as that element."""
    from ase.data import chemical_symbols, atomic_names

    from torchmdx.io_utils import decode_text, open_compressed

    try:
        with open_compressed(path, "rb") as handle:
            lines = decode_text(handle.read()).splitlines()
    except Exception:  # noqa: BLE001 - not text: ASE's own read says what is wrong
        return None
    atom = 0
    for number, line in enumerate(lines, 1):
        if line.startswith("MODEL"):
            atom = 0
        if not line.startswith(("ATOM", "HETATM")):
            continue
        atom += 1
        element = line[76:78].strip()
        if element and element.capitalize() in chemical_symbols[1:]:
            continue
        name = line[12:16].strip()
        two = name[:2].capitalize()
        if name == line[17:20].strip():  # an ion, whose residue is named as its atom (ZN ZN, CL CL): the element
            continue
        if len(name) >= 2 and two in chemical_symbols[1:]:
            residue = " ".join(line[17:26].split())
            where = f"atom {atom - 1}, name {name!r}" + (f" of {residue}" if residue else "")
            return (f"line {number} ({where}) has no element symbol in columns 77-78, and ASE would take "
                    f"{two} ({atomic_names[chemical_symbols.index(two)].lower()}) from the atom name; an atom name is "
                    f"not an element ('CA' is a protein's alpha carbon): put each atom's element symbol in columns "
                    f"77-78 (e.g. with pdbfixer or Open Babel), or give the structure as extxyz")
    return None
