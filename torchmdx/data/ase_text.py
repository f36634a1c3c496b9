"""Text-level checks of the structure files ASE reads (used by :mod:`torchmdx.data.ase_format`): an extxyz
comment line that gives a key twice (ASE keeps the last value, silently) and a species column of atomic
numbers (ASE's KeyError '8')."""

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
