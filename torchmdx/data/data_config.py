"""The ``data:`` section of a torchmdx YAML config.

Example (all keys but ``path`` are optional)::

    data:
      path: ../shared/data/polymer/polymers_xtb.extxyz   # file, folder, or md17 molecule name
      format: ase              # md17 | rmd17 | md17-xyz | qm9 | ani1 | ani1x | ase | cache; guessed if absent
      energy_key: energy       # ASE info key / QM9 property / ANI-1x level (wb97x_dz.energy)
      forces_key: forces
      stress_key: stress       # ASE info key / calculator result (Voigt or 3x3; a 'virial' is used when absent)
      group_key: polymer       # per-structure group label (ASE info key)
      cache_dir: data/cache
      train_size: 0.8          # int = count, float = fraction, null = the rest
      val_size: 0.1
      test_size: null
      split_by_group: true     # whole groups per part; sizes then count groups
      test_groups: [PMMA]      # groups held out entirely
      split_file: null         # reuse this split (npz) instead of drawing one
      seed: 1
      batch_size: 32
      inference_batch_size: 64
      num_workers: 0
      dtype: float32
      max_z: 100               # embedding rows, as the model's max_z: atomic numbers 0..max_z-1
      atomref: fit             # fit (least squares on train) | dataset (published, QM9) | none
                               # | a table {H: -13.6, C: -1029.5, ...} (eV per atom; symbols or Z),
                               #   e.g. isolated-atom energies (MACE's E0s); every element needs one
      mmap: auto               # memory-map per-atom arrays and cells (auto: above 1 GiB of per-atom arrays)
      loader: fast             # fast (BatchLoader: gathers whole batches) | pyg (torch_geometric DataLoader)
      device_resident: auto    # captured training: keep the training split on the GPU (auto: when it fits)
      check_labels: null       # refuse energies/forces far beyond physical (torchmdx.data.label_check);
                               # null (the default) or true: checked, false: not

``device_resident`` matters for captured training (``train.cuda_graph: true``), whose training
batches are packed to a few fixed sizes (:mod:`torchmdx.data.packing`): ``auto`` keeps the
training split on the GPU and assembles batches there when one process trains on one GPU, the
data are not periodic and the split takes at most :data:`DEVICE_RESIDENT_FRACTION` of the free
GPU memory (else the host loader, with one line saying why); ``true`` asks for it (on the CPU
too: the same code path, for tests); ``false`` keeps the host loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from torchmdx.config import given_text, key_name
from torchmdx.errors import ConfigError, DataError
from torchmdx.io_utils import expand_home

SizeT = Union[int, float, None]

#: ``device_resident: auto`` keeps a training split on the GPU up to this fraction of free memory
DEVICE_RESIDENT_FRACTION = 0.25

#: largest useful ``max_z``: atomic numbers 0 .. 118 (oganesson)
MAX_Z_LIMIT = 119


#: keys naming a key of the data file or its units, and what to give instead of an empty one
TEXT_OPTIONS = {"energy_key": "the file's key of the energies", "forces_key": "the file's key of the forces",
                "stress_key": "the file's key of the stress", "group_key": "the file's key of the group labels",
                "energy_unit": "an energy unit such as kcal/mol, Hartree or eV",
                "length_unit": "a length unit such as Bohr or Å"}


def empty_text_line(shown: str, key: str, value) -> Optional[str]:
    """The one line for an empty (or blank) ``value`` of the DataConfig key ``key`` (``shown``: how the line names it,
    ``--energy-unit`` or ``config key 'data.energy_unit'``), else None. ``--energy-unit ''`` was taken as not given
    (the format's own unit, silently), as were ``''`` keys (the format's default key)."""
    if value is None or not isinstance(value, str) or value.strip():
        return None
    default = "the format's own unit" if key.endswith("_unit") else "the format's default key"
    return f"{shown} is empty ({value!r}); give {TEXT_OPTIONS[key]}, or leave it out for {default}"


def check_unit_names(values: dict, shown) -> None:
    """``values['energy_unit']`` / ``values['length_unit']`` (None: not given) checked against the one unit table
    (``torchmdx.units``) before anything is read or made: ``train --set data.energy_unit=foo`` and ``data prepare
    --energy-unit foo`` were refused only when the data file was read, after the cache folder had been made (round
    33). ``shown(name)`` names the key in the line (``config key 'data.energy_unit'``, ``--energy-unit``)."""
    from torchmdx import units
    from torchmdx.errors import TorchmdxError

    for name, factor in (("energy_unit", units.energy_factor), ("length_unit", units.length_factor)):
        if values.get(name) is None:
            continue
        try:
            factor(values[name])
        except TorchmdxError as exc:
            raise ConfigError(f"{shown(name)}: {exc}") from None


@dataclass
class DataConfig:
    path: str
    format: Optional[str] = None
    energy_key: Optional[str] = None
    forces_key: Optional[str] = None
    stress_key: Optional[str] = None
    group_key: Optional[str] = None
    energy_unit: Optional[str] = None
    length_unit: Optional[str] = None
    cache_dir: str = "data/cache"
    train_size: SizeT = 0.8
    val_size: SizeT = 0.1
    test_size: SizeT = None
    split_by_group: bool = False
    #: group names; a number (``test_groups: [3]``, ``[1.5]``) is taken as its text, as the labels are stored
    #: (an extxyz ``fam=3`` is the group '3'; it was "must be a string, got 3")
    val_groups: list[Union[str, int, float]] = field(default_factory=list)
    test_groups: list[Union[str, int, float]] = field(default_factory=list)
    split_file: Optional[str] = None
    seed: int = 1
    batch_size: int = 32
    inference_batch_size: Optional[int] = None
    num_workers: int = 0
    dtype: Literal["float32", "float64"] = "float32"
    max_z: int = 100
    atomref: Union[Literal["fit", "dataset", "none"], dict] = "fit"
    mmap: Union[bool, Literal["auto"]] = "auto"
    loader: Literal["fast", "pyg"] = "fast"
    device_resident: Union[bool, Literal["auto"]] = "auto"
    #: None (the default: runs saved before the key existed resume unchanged) means True
    check_labels: Optional[bool] = None

    def validate(self, section: str = "data") -> None:
        from torchmdx.data.formats import FORMATS, unknown_format_hint

        p = f"{section}." if section else ""
        for name in ("path", "cache_dir", "split_file"):  # '' was the working folder: ". cannot guess the format"
            value = getattr(self, name)
            if value is not None and not str(value).strip():
                what = {"path": "a file or folder", "cache_dir": "a folder (or leave it out for data/cache)",
                        "split_file": "a split file (.npz), or leave it out"}[name]
                raise ConfigError(f"{key_name(p + name)} is empty ({value!r}); give {what}")
        for name in TEXT_OPTIONS:
            line = empty_text_line(key_name(p + name), name, getattr(self, name))
            if line:
                raise ConfigError(line)
        check_unit_names({n: getattr(self, n) for n in ('energy_unit', 'length_unit')}, lambda n: key_name(p + n))
        # '~' as the shell would expand it (data.path always was): 'cache_dir: ~/cache' wrote the cache into a
        # folder named '~' in the current folder, 'split_file: ~/s.npz' was "split file not found"
        self.cache_dir = expand_home(self.cache_dir)
        self.split_file = expand_home(self.split_file)
        if self.format is not None and self.format.lower() not in FORMATS:
            raise ConfigError(f"{key_name(p + 'format')} must be one of {', '.join(FORMATS)}, got {self.format!r}"
                              f"{unknown_format_hint(self.format)}")
        if self.format is not None:  # the readers take any case: 'MD17' and 'md17' are one format (a sweep over
            self.format = self.format.lower()  # data.format=MD17,md17 planned the same training twice)
        open_sizes = []
        for name in ("train_size", "val_size", "test_size"):
            value = getattr(self, name)
            if value is None:
                open_sizes.append(name)
            elif value < 0:
                raise ConfigError(f"{key_name(p + name)} must not be negative, got {value}")
            elif isinstance(value, float) and value > 1:
                text = given_text(p + name)  # "800" (quoted) is the float 800.0: show what the config says
                shown = f"{value}" if text is None else f"{text!r}, text read as the number {value}"
                advice = "use an integer for a count"
                if text is not None and value.is_integer():  # "800" quoted, or 1e3 (text to YAML 1.1)
                    advice = f"write a count as a plain integer ({int(value)}, without quotes)"
                raise ConfigError(f"{key_name(p + name)} is a fraction above 1 ({shown}); {advice}")
        if len(open_sizes) > 1:
            names = ", ".join(p + n for n in open_sizes)
            raise ConfigError(f"config keys {names}: only one size may be null (the rest)")
        fractions = [getattr(self, n) for n in ("train_size", "val_size", "test_size")]
        if all(isinstance(v, float) for v in fractions) and sum(fractions) > 1 + 1e-9:
            raise ConfigError(f"config keys {p}train_size + val_size + test_size add up to {sum(fractions):g} > 1")
        for name in ("batch_size", "inference_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{key_name(p + name)} must be at least 1, got {value}")
        if isinstance(self.atomref, dict):
            self.atomref = reference_table(self.atomref, self.max_z, f"{p}atomref")
        if self.num_workers < 0:
            raise ConfigError(f"{key_name(p + 'num_workers')} must not be negative, got {self.num_workers}")
        from torchmdx.devices import WORKER_FLOOR, usable_cpus, worker_limit

        if self.num_workers > worker_limit():  # 100000 forked processes until the machine ran out (round 20)
            raise ConfigError(f"{key_name(p + 'num_workers')} is {self.num_workers}, more data-loader worker processes "
                              f"than this machine runs usefully (at most {worker_limit()}: 4 x its {usable_cpus()} CPUs, "
                              f"at least {WORKER_FLOOR}); each worker is a process: use at most the CPU count (0: load in the "
                              "training process)")
        if not 2 <= self.max_z <= MAX_Z_LIMIT:
            raise ConfigError(f"{key_name(p + 'max_z')} must be between 2 and {MAX_Z_LIMIT} (it counts embedding rows: "
                              f"atomic numbers 0..max_z-1 are accepted), got {self.max_z}")
        self.val_groups = [str(g) for g in self.val_groups]
        self.test_groups = [str(g) for g in self.test_groups]
        both = sorted(set(self.val_groups) & set(self.test_groups))
        if both:
            raise ConfigError(f"config keys '{p}val_groups' and '{p}test_groups' both name {', '.join(both)}")

    def reader_options(self) -> dict:
        """Options for :func:`torchmdx.data.read_structures` / :func:`build_cache` (None = default)."""
        return {"energy_key": self.energy_key, "forces_key": self.forces_key, "stress_key": self.stress_key,
                "group_key": self.group_key, "energy_unit": self.energy_unit, "length_unit": self.length_unit}

    @property
    def grouped(self) -> bool:
        return bool(self.split_by_group or self.val_groups or self.test_groups)


def load_data_config(path, overrides: Optional[list[str]] = None) -> DataConfig:
    """The ``data:`` section of the YAML file ``path`` as a :class:`DataConfig`."""
    from torchmdx.config import apply_overrides, from_dict, load_yaml

    config = load_yaml(path)
    missing = resolve_data_paths(config, Path(path).parent, str(path), overrides)
    config = apply_overrides(config, list(overrides or []))
    if "data" not in config:
        raise ConfigError(f"{Path(path)}: no 'data:' section; sections present: {', '.join(config) or 'none'}")
    data = from_dict(DataConfig, config["data"], "data")
    if missing:
        raise DataError(missing)
    return data


#: keys of the data: section that name files to read
DATA_PATH_KEYS = ("path", "split_file")


def resolve_data_paths(values: dict, config_dir: Path, source: str, overrides: Optional[list] = None) -> Optional[str]:
    """Relative ``data.path`` / ``data.split_file`` of a YAML file: from the config file's folder,
    else (older configs, written for the current folder) from the current folder. Absolute paths,
    MD17 molecule names and keys that ``--set`` ``overrides`` replace (those are relative to the
    current folder) are left alone. Returns the one-line message for a file found in neither
    place (raise it after the keys are validated: a wrong key is the first thing to say), or None."""
    from torchmdx.config import next_to_config

    data = values.get("data")
    if not isinstance(data, dict):
        return None
    replaced = {item.split("=", 1)[0].strip() for item in (overrides or [])}
    for key in DATA_PATH_KEYS:
        if f"data.{key}" in replaced:
            continue
        given = data.get(key)
        if not isinstance(given, str) or not given or Path(given).expanduser().is_absolute():
            continue
        near_config = next_to_config(given, config_dir)
        if near_config is not None:
            data[key] = near_config
        elif Path(given).exists():
            continue
        elif key == "path" and Path(given).suffix == "" and len(Path(given).parts) == 1:
            continue  # an MD17 molecule name (data.format md17/rmd17)
        else:
            return (f"{source}: data.{key} {given!r} not found (looked in {config_dir.resolve() or '.'} "
                    f"and in the current folder {Path.cwd()})")
    return None


def reference_table(values: dict, max_z: int, key: str = "data.atomref") -> dict:
    """``data.atomref`` given as a table: element symbol or atomic number -> reference energy
    (eV per atom), checked and returned as {atomic number: float} in ascending order. One-line
    ConfigError naming the entry for an unknown element, one outside 1..max_z-1, a repeated
    element or a value that is not a finite number."""
    import math

    from ase.data import atomic_numbers

    if not values:
        raise ConfigError(f"config key '{key}' is an empty table; give each element's reference energy (eV), "
                          f"or fit / dataset / none")
    table: dict = {}
    for name, value in values.items():
        text = str(name).strip()
        z = int(text) if text.isdigit() else atomic_numbers.get(text)
        if z is None or not 1 <= z < max_z:
            raise ConfigError(f"config key '{key}.{name}': not an element symbol or atomic number in 1..{max_z - 1} "
                              f"(data.max_z is {max_z})")
        if z in table:
            raise ConfigError(f"config key '{key}.{name}': element {z} is given twice")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"config key '{key}.{name}' must be a finite energy in eV, got {value!r}")
        table[z] = float(value)
    return dict(sorted(table.items()))
