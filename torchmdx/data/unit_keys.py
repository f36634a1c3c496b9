"""Unit-like info keys of the files ASE reads: an extxyz comment line's ``energy_unit=Hartree``, ``units=``,
``energy_units=``, ``force_unit=Hartree/Bohr``, ``length_units=``, ``stress_unit=GPa`` ...

Neither ASE nor torchmdx takes units from a file's keys: they are ordinary info entries, and the values are read
in eV and Å (or ``data.energy_unit`` / ``data.length_unit``). A key that says otherwise was kept without a word,
the values taken in the wrong unit. **Refused, not honoured** (round 22 for ``energy_unit``/``length_unit``, round
23 for the others), unless the options name the same units (any spelling :mod:`torchmdx.units` takes as equal),
which are then read as usual: a per-frame key could differ between frames, and no other reader takes units from a
key; the options state the units once for the file, and the key is then checked against them. Without the options
the values are read in eV and Å, and a key naming those is taken (round 25: ``energy_unit=eV`` was refused).

A key is unit-like when its name, in any case and with ``-`` or spaces as ``_``, is ``unit``/``units`` after
nothing or one of the words of :data:`QUANTITY_WORDS` (``energy_units``, ``Force-Unit``, ``e_unit``,
``positions_unit``, ``units``). Its value must name, for

- energy and length: that unit;
- forces: the energy unit per length unit (``Hartree/Bohr``, ``kcal/mol/A``);
- stress: the energy unit per cubed length unit (``eV/Å^3``, ``eV/A3``, ``eV/Å³``);
- a bare ``units``: one or more of these (``eV``, ``eV Å``, ``Hartree,Bohr``).

Keys of other quantities (``charge_unit``, ``dipole_units``) describe values torchmdx does not convert and are left
alone.

An ASE database that names its units in SchNetPack's metadata layout (:func:`db_declared_units`) is read in them
(:func:`db_units`): there the units are the file's, once, not a per-frame key. Moved here from
:mod:`torchmdx.data.ase_format` (round 23).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

from torchmdx.errors import DataError, with_article

#: quantity -> the words a unit key's name starts with for it ("" : a bare ``unit``/``units``)
QUANTITY_WORDS = {
    "energy": ("energy", "energies", "e", "virial"),
    "length": ("length", "distance", "position", "positions", "pos", "coordinate", "coordinates", "r"),
    "forces": ("force", "forces", "f"),
    "stress": ("stress",),
    "any": ("",),
}
_QUANTITY = {word: quantity for quantity, words in QUANTITY_WORDS.items() for word in words}
_NAME = re.compile(r"(?:([a-z]*?)_?)units?")
#: what a stress unit's length part ends in: its cube
_CUBED = re.compile(r"(\^3|\*\*3|3|³)$")


def unit_key_quantity(name) -> Optional[str]:
    """The quantity whose unit the info key ``name`` names ('energy', 'length', 'forces', 'stress', 'any'), else
    None."""
    text = re.sub(r"[\s\-]+", "_", str(name).strip().lower())
    match = _NAME.fullmatch(text)
    return _QUANTITY.get(match.group(1)) if match else None


def _same(factor, text: str, given: Optional[str]) -> bool:
    try:
        return given is not None and math.isclose(factor(text.strip()), factor(given), rel_tol=1e-9)
    except DataError:
        return False


def _agrees(quantity: str, text: str, energy_unit: Optional[str], length_unit: Optional[str]) -> bool:
    """Whether ``text`` names the unit of ``quantity`` the options give (False where an option is not given)."""
    from torchmdx import units

    if quantity == "energy":
        return _same(units.energy_factor, text, energy_unit)
    if quantity == "length":
        return _same(units.length_factor, text, length_unit)
    if quantity in ("forces", "stress"):
        energy, _, length = text.strip().rpartition("/")
        if quantity == "stress":
            cubed = _CUBED.search(length.strip())
            if cubed is None:
                return False
            length = length.strip()[:cubed.start()]
        return bool(energy) and _same(units.energy_factor, energy, energy_unit) \
            and _same(units.length_factor, length, length_unit)
    words = [word for word in re.split(r"[\s,;]+", text.strip()) if word]
    return bool(words) and all(any(_agrees(q, word, energy_unit, length_unit) for q in ("energy", "length", "forces",
                                                                                         "stress")) for word in words)


def check_unit_keys(info, where: str, energy_unit: Optional[str], length_unit: Optional[str]) -> None:
    """One line (DataError) for a unit-like key of ``info`` (an ASE frame's info) whose value is not the unit
    ``energy_unit``/``length_unit`` (``data.energy_unit``/``data.length_unit``, None when not given) say the
    values are read in (module docstring). A key that names the units the values are read in without the options
    (eV, Å: ``energy_unit=eV``, ``force_unit=eV/Ang``) is taken, as one agreeing with the options is (round 25;
    it was refused unless --energy-unit eV confirmed it)."""
    for key, value in info.items():
        quantity = unit_key_quantity(key)
        if quantity is None or _agrees(quantity, str(value), energy_unit or "eV", length_unit or "Å"):
            continue
        from torchmdx.config import key_name  # the refusal's words only (this runs for every frame)

        names = {"energy": f"{key_name('data.energy_unit')} (--energy-unit)",
                 "length": f"{key_name('data.length_unit')} (--length-unit)"}
        start = f"{where}: {key}={value} is an ordinary key to ASE and torchmdx (no reader takes units from it), and "
        tail = "convert the values and drop the key"
        if quantity in ("energy", "length"):  # round 22's line
            given = energy_unit if quantity == "energy" else length_unit
            name = names[quantity]
            read_in = (f"{given}, as {name} says; set it" if given is not None
                       else f"{'eV' if quantity == 'energy' else 'Å'}; set {name}")
            raise DataError(f"{start}the values are read in {read_in} to {value} if that is their unit (the key is "
                            f"then checked against it), or {tail}")
        energy, length = energy_unit or "eV", length_unit or "Å"
        read_in = {"forces": f"the forces are read in {energy}/{length}",
                   "stress": f"a stress is read in {energy}/{length}³",
                   "any": f"the values are read in {energy} and {length}"}[quantity]
        raise DataError(f"{start}{read_in}; set {names['energy']} and {names['length']} to the file's units if "
                        f"{value} is what they are (the key is then checked against them), or {tail}")


def db_declared_units(path) -> dict:
    """The units an ASE database names in its metadata, in SchNetPack's layout (``spk.data.ASEAtomsData``):
    ``_property_unit_dict`` (property -> unit name, e.g. ``{'energy': 'kcal/mol', 'forces':
    'kcal/mol/Ang'}``) and ``_distance_unit`` (key ``_distance_unit``); {} when it names none."""
    from torchmdx.data.ase_format import connect_db

    meta = connect_db(Path(path)).metadata or {}
    props = meta.get("_property_unit_dict") or {}
    if not isinstance(props, dict):
        raise DataError(f"{path}: metadata '_property_unit_dict' must map property names to unit names, got "
                        f"{type(props).__name__}")
    found = {f"_property_unit_dict.{name}": unit for name, unit in props.items()}
    if meta.get("_distance_unit") is not None:
        found["_distance_unit"] = meta["_distance_unit"]
    for key, unit in found.items():
        if not isinstance(unit, str):
            raise DataError(f"{path}: metadata '{key}' must be a unit name (text), got {unit!r}")
    return found


def _declared_unit(path, key: str, name: str, option: str, given, quantity: str, factor):
    """The unit to read with: the metadata's ``name`` when no option is ``given``; the option when
    it is the same unit (or the metadata's name is one torchmdx does not know); else one line."""
    import math

    try:
        declared = factor(name)
    except DataError:
        if given is not None:
            return given  # the option says what the metadata's label means
        raise DataError(f"{path}: metadata '{key}' is {name!r}, not {with_article(quantity)} "
                        f"unit torchmdx knows; set data.{option} (--{option.replace('_', '-')}) to the unit of the "
                        "values") from None
    if given is None:
        return name.strip()
    if not math.isclose(factor(given), declared, rel_tol=1e-9):
        raise DataError(f"{path}: the database's metadata says its {quantity} unit is {name!r} ({key}), but {option} "
                        f"{given!r} was given; drop data.{option} (or fix the metadata)")
    return given


def db_units(path: Path, energy_key: str, forces_key: str, energy_unit, length_unit):
    """(energy unit, length unit) of a database that names its own (SchNetPack's metadata): they were
    ignored, so energies and forces in kcal/mol (and kcal/mol/Å) were read as eV, 23 x too large, and
    ``data info`` said "file units energy eV". A forces unit that is not the energy unit per length
    unit is refused (torchmdx reads forces in energy_unit / length_unit)."""
    from torchmdx import units
    from torchmdx.data.md17 import unit_factors

    declared = db_declared_units(path)
    key = f"_property_unit_dict.{energy_key}"
    if key in declared:
        energy_unit = _declared_unit(path, key, declared[key], "energy_unit", energy_unit, "energy", units.energy_factor)
    if "_distance_unit" in declared:
        length_unit = _declared_unit(path, "_distance_unit", declared["_distance_unit"], "length_unit", length_unit,
                                     "length", units.length_factor)
    key = f"_property_unit_dict.{forces_key}"
    if key in declared and "/" in declared[key]:
        import math

        energy_part, length_part = declared[key].rsplit("/", 1)
        try:
            declared_factor = units.energy_factor(energy_part) / units.length_factor(length_part)
        except DataError:
            return energy_unit, length_unit  # a unit name torchmdx cannot split: energy/length as for every file
        e, length, f = unit_factors(path, energy_unit, length_unit, "eV")
        if not math.isclose(declared_factor, f, rel_tol=1e-9):
            raise DataError(f"{path}: metadata '{key}' is {declared[key]!r}, but the energies are read in "
                            f"{energy_unit or 'eV'} and lengths in {length_unit or 'Å'}; torchmdx reads forces in "
                            "energy unit per length unit: convert the forces (or the energies) to match")
    return energy_unit, length_unit
