"""The plan of a sweep (:mod:`torchmdx.train.sweep`): the grid, its points, their configs and splits.

Parsing ``--grid key=v1,v2`` and a config's ``sweep:`` section, crossing variants with the grid
into points (:class:`SweepPoint`), the config of each point (checked before anything trains), the
nested training splits, writing the plan (``sweep.json``) and reading back the JSON files the
sweep writes (its plan, a point's ``sweep_result.json``). Nothing here trains.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from torchmdx.config import set_dotted
from torchmdx.errors import ConfigError, TorchmdxError
from torchmdx.io_utils import atomic_write, jsonable

PLAN = "sweep.json"
RESULT = "sweep_result.json"
#: written into a point's run folder when its training or scoring fails (removed when a retry succeeds)
FAILURE = "sweep_failure.json"
RUNS = "runs"
SPLITS = "splits"
#: keys the sweep sets itself
RESERVED_KEYS = ("run_dir", "data.split_file")


@dataclass
class SweepPoint:
    """One training run of the sweep: ``overrides`` {dotted key: value}, ``labels`` the grid
    values and variant that define it (for the table), ``id`` a folder name."""

    overrides: dict
    variant: Optional[str] = None
    labels: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        parts = ([self.variant] if self.variant else []) + [f"{k.split('.')[-1]}={v}" for k, v in self.labels.items()]
        readable = re.sub(r"[^A-Za-z0-9_.=+-]", "-", "__".join(parts))[:80] or "point"
        digest = hashlib.sha1(json.dumps(jsonable(self.overrides), sort_keys=True).encode()).hexdigest()[:6]
        return f"{readable}-{digest}"

    def describe(self) -> str:
        parts = ([f"variant {self.variant}"] if self.variant else []) + [f"{k}={v}" for k, v in self.labels.items()]
        return ", ".join(parts) or "the base config"


# ---------------------------------------------------------------------------- the plan
def parse_grid(items: list[str]) -> dict:
    """``["key=v1,v2", ...]`` -> {key: [v1, v2]} (values parsed as YAML); one-line ConfigErrors."""
    import yaml

    grid: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r}: expected section.key=value1,value2,...")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+", key):
            raise ConfigError(f"--grid {item!r}: the key must be section.key (e.g. model.embedding_dimension), got {key!r}")
        if key in grid:  # the later one silently replaced the earlier
            raise ConfigError(f"--grid {item!r}: key {key!r} is given twice; list all its values in one --grid "
                              f"({key}=v1,v2,...)")
        texts = [t.strip() for t in _top_level_split(raw, item)]
        if not raw.strip():
            raise ConfigError(f"--grid {item!r}: give one or more comma-separated values")
        if any(t == "" for t in texts):  # '1,,2' and '1,2,' were "give one or more ... values" too
            empty = texts.index("")
            raise ConfigError(f"--grid {item!r}: value {empty + 1} of {len(texts)} is empty (two commas in a row, or "
                              "one at the start or end); give each value once: v1,v2,...")
        values = []
        for text in texts:
            try:
                values.append(yaml.safe_load(text))
            except yaml.YAMLError as exc:
                if text[:1] in "[{'\"":  # meant as YAML flow syntax: never kept as text
                    raise ConfigError(f"--grid {item!r}: value {text!r} is not valid YAML "
                                      f"({getattr(exc, 'problem', None) or exc})") from None
                values.append(text)
        grid[key] = values
    return grid


def _top_level_split(raw: str, item: str) -> list[str]:
    """``raw`` split at the commas outside brackets, braces and quotes: ``[64,64],[128,128]`` is
    two values (YAML flow lists); an unclosed bracket or quote is a one-line ConfigError."""
    parts, depth, quote, start, previous = [], [], None, 0, ","
    pairs = {"[": "]", "{": "}"}
    for k, ch in enumerate(raw):
        if quote:
            if ch == quote:
                quote = None
            continue
        if ch in "'\"" and previous in ",[{:":  # a quote opens quoted text only where a YAML value starts
            quote = ch
        elif ch in pairs:
            depth.append(pairs[ch])
        elif ch in "]}":
            if not depth or depth.pop() != ch:
                raise ConfigError(f"--grid {item!r}: unmatched {ch!r} at character {k + 1} of the values")
        elif ch == "," and not depth:
            parts.append(raw[start:k])
            start = k + 1
        if not ch.isspace():
            previous = ch
    if quote or depth:
        missing = quote or depth[-1]
        raise ConfigError(f"--grid {item!r}: a value is missing its closing {missing!r} (a value with commas "
                          "is written in brackets or quotes: key=[64,64],[128,128])")
    parts.append(raw[start:])
    return parts


SECTIONS = ("data", "model", "train", "trainer")


def _check_key(key: str, where: str, value=None, allow_section: bool = False) -> None:
    if allow_section and key in SECTIONS and isinstance(value, dict):
        return  # a variant may replace a whole section (an architecture with its own keys)
    if not isinstance(key, str) or "." not in key:
        raise ConfigError(f"{where}: key {key!r} must be section.key (e.g. data.train_size)"
                          + (" or a whole section (model: {...})" if allow_section else ""))
    if key in RESERVED_KEYS or any(key.startswith(k + ".") for k in RESERVED_KEYS):
        raise ConfigError(f"{where}: key {key!r} is set by the sweep itself (each point gets its own run folder and split)")


#: keys of the ``sweep:`` section
SECTION_KEYS = ("grid", "variants", "workers_per_device")


def check_workers_per_device(value, what: str = "--workers-per-device") -> int:
    """``value`` as a whole number >= 1 (an int, or a text of digits from the command line), or a
    one-line ConfigError naming ``what``."""
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().lstrip("+").isdigit():
        number = int(value.strip())
    if number is None or number < 1:
        raise ConfigError(f"{what} {value!r}: give a whole number >= 1 (points trained at once on each device; "
                          "on the CPU, processes that split its threads)")
    return number


def sweep_section(values: dict, source: str, settings: Optional[dict] = None) -> tuple[dict, dict]:
    """(grid, variants) of a config's optional ``sweep:`` section (removed from ``values``); its
    ``workers_per_device`` (checked) goes into ``settings`` when given."""
    section = values.pop("sweep", None)
    section = {} if section is None else section  # `sweep: []` was taken for no sweep section (`sweep: 3` refused)
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: the 'sweep' section must be a mapping with 'grid' and/or 'variants'")
    unknown = sorted(set(section) - set(SECTION_KEYS))
    if unknown:
        raise ConfigError(f"config key 'sweep.{unknown[0]}' does not exist; allowed: {', '.join(SECTION_KEYS)}")
    if section.get("workers_per_device") is not None:
        workers = check_workers_per_device(section["workers_per_device"], "config key 'sweep.workers_per_device'")
        if settings is not None:
            settings["workers_per_device"] = workers
    grid = {} if section.get("grid") is None else section["grid"]  # `grid: []` was a sweep without a grid
    variants = {} if section.get("variants") is None else section["variants"]
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{source}: 'sweep.grid' must map section.key to a non-empty list of values")
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise ConfigError(f"{source}: 'sweep.variants' must map a name to a mapping of section.key: value")
    for name in variants:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{source}: variant name {name!r} of 'sweep.variants' must be a non-empty text "
                              "(e.g. et_s); quote it in YAML")
    return dict(grid), dict(variants)


def plan_points(grid: dict, variants: dict) -> list[SweepPoint]:
    """Every variant (or none) crossed with every combination of the grid values."""
    for key in grid:
        _check_key(key, "--grid / sweep.grid")
    for name, keys in variants.items():
        for key, value in keys.items():
            _check_key(key, f"sweep.variants.{name}", value, allow_section=True)
    for name, keys in variants.items():
        both = [k for k in keys if k in grid]
        if both:  # the grid's values silently replaced the variant's: every point ran without it
            raise ConfigError(f"sweep.variants.{name} sets {both[0]!r}, which the grid sweeps too (the grid's values "
                              f"would replace the variant's in every point); drop it from the variant or the grid")
    same: dict = {}
    for name, keys in variants.items():  # two names for one variant: each point of the second trained again
        shown = json.dumps(_as_config_sees_it(keys), sort_keys=True)
        if shown in same:
            raise ConfigError(f"sweep.variants {same[shown]!r} and {name!r} set the same keys to the same values, so "
                              f"every point of {name!r} would train the same model as {same[shown]!r} again; drop one "
                              "of them or make them differ")
        same[shown] = name
    keys = list(grid)
    combos = list(itertools.product(*(grid[k] for k in keys))) if keys else [()]
    named = list(variants.items()) or [(None, {})]
    points = []
    for name, fixed in named:
        for combo in combos:
            labels = dict(zip(keys, combo))
            overrides = {**fixed, **labels}
            points.append(SweepPoint(overrides=overrides, variant=name, labels=labels))
    ids = [p.id for p in points]
    if len(set(ids)) != len(ids):
        raise ConfigError("the sweep has two identical points; check --grid and sweep.variants for repeated values")
    seen: dict = {}
    for point in points:  # 0.001 and 1e-3 (text in YAML 1.1), 1 and 1.0: one value to the config, two runs
        key = json.dumps(_as_config_sees_it(point.overrides), sort_keys=True) + f"|{point.variant}"
        if key in seen:
            raise ConfigError(f"the sweep points ({seen[key].describe()}) and ({point.describe()}) are the same "
                              "training (the config reads their values as equal numbers); list each value once")
        seen[key] = point
    return points


#: keys whose integer and float values mean different things: a count of structures (1) and a
#: fraction of the data (1.0 = all of it) (data.splits.resolve_sizes)
_COUNT_OR_FRACTION = ("train_size", "val_size", "test_size")


def _as_config_sees_it(value, key: str = ""):
    """``value`` with numbers and numeric text (YAML 1.1 reads ``1e-3`` as text; the config takes it
    as the float 0.001) as floats, so that values the config reads alike compare equal; except the
    split sizes, whose integers (counts) stay apart from floats (fractions): ``data.train_size``
    1 and 1.0 are two trainings (one structure, all of them)."""
    from torchmdx.config import _float_from_string

    if isinstance(value, dict):
        return {str(k): _as_config_sees_it(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_config_sees_it(v, key) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int) and key.rsplit(".", 1)[-1] in _COUNT_OR_FRACTION:
        return ["count", value]
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        number = _float_from_string(value.strip())
        return value if number is None else number
    return repr(value)


def _set(values: dict, dotted: str, value) -> None:
    set_dotted(values, dotted, copy.deepcopy(value), f"sweep key {dotted!r}")


def point_values(base: dict, point: SweepPoint, sweep_dir: Path) -> dict:
    values = copy.deepcopy(base)
    for key, value in point.overrides.items():
        _set(values, key, value)
    values["run_dir"] = str(sweep_dir / RUNS / point.id)
    return values


def point_config(base: dict, point: SweepPoint, sweep_dir: Path, check_data: bool = True):
    """The RunConfig of ``point``; a ConfigError names the point."""
    from torchmdx.train.config import build_run_config

    try:
        return build_run_config(point_values(base, point, sweep_dir), "the config", check_data=check_data)
    except TorchmdxError as exc:
        hint = ""
        if "belongs to architecture" in str(exc) and "model.architecture" in point.overrides and not point.variant:
            # "set model.architecture: et" is no way out for a grid over the architecture
            hint = ("; a --grid over model.architecture keeps the base config's model keys: give each architecture "
                    "a variant with its own model section instead (sweep.variants, docs/sweep.md)")
        raise type(exc)(f"sweep point ({point.describe()}): {exc}{hint}") from None


def _base_hash(base: dict) -> str:
    return hashlib.sha1(json.dumps(jsonable(base), sort_keys=True).encode()).hexdigest()[:12]


def load_base(config_path, overrides: Optional[list[str]] = None,
              settings: Optional[dict] = None) -> tuple[dict, dict, dict]:
    """(base values, grid, variants) of a sweep config (data paths resolved next to it; --set
    applied); the sweep section's settings (workers_per_device) go into ``settings`` when given."""
    from torchmdx.config import apply_overrides, load_yaml
    from torchmdx.data.data_config import resolve_data_paths
    from torchmdx.errors import DataError

    values = load_yaml(config_path)
    grid, variants = sweep_section(values, str(config_path), settings)
    missing = resolve_data_paths(values, Path(config_path).parent, str(config_path), overrides)
    values = apply_overrides(values, list(overrides or []))
    if missing:
        raise DataError(missing)
    values.pop("run_dir", None)
    return values, grid, variants


def _check_overrides_not_swept(overrides, grid: dict, given: dict, variants: dict) -> None:
    """A ``--set`` of a key the grid (or a variant) sets too: the point's value replaced it at every
    point, silently (``--grid model.num_layers=1,2 --set model.num_layers=3`` trained 1 and 2)."""
    for item in overrides or []:
        key = str(item).split("=", 1)[0].strip()
        if key in grid:
            where = "--grid" if key in given else "the config's sweep.grid"
            raise ConfigError(f"--set {item!r}: {where} sweeps {key!r} too, and its values replace this one at every "
                              f"point; drop the --set, or give the values in the grid")
        for name, keys in variants.items():
            if key in keys or key.split(".", 1)[0] in keys:
                raise ConfigError(f"--set {item!r}: sweep.variants.{name} sets {key!r} too, and the variant's value "
                                  "replaces this one in its points; drop the --set, or change the variant")


def sweep_folder(config_path, out: Optional[str] = None) -> Path:
    """The sweep folder: ``out``, else sweeps/<config name>."""
    if out is not None and not str(out).strip():  # --out '' silently meant sweeps/<config name>
        raise ConfigError("--out is empty; give the sweep folder (or leave --out out for sweeps/<config name>)")
    return Path(out) if out else Path("sweeps") / Path(config_path).stem


def prepare_sweep(config_path, grid_items: list[str], out: Optional[str] = None,
                  overrides: Optional[list[str]] = None) -> dict:
    """Validate every point and write the plan (and the nested splits); nothing is trained.
    Returns {'sweep_dir', 'points', 'base', 'plan', 'settings'} (settings: the config's
    ``sweep.workers_per_device``, when set)."""
    settings: dict = {}
    base, grid, variants = load_base(config_path, overrides, settings)
    given = parse_grid(grid_items)
    for key, values in given.items():
        if key in grid and grid[key] != values:  # the command line wins, as for --set, but said (round 19)
            print(f"warning: --grid gives {key!r} the values {values}, replacing the values {grid[key]} that "
                  f"sweep.grid in {config_path} gives it; the sweep trains the command line's", file=sys.stderr)
    grid.update(given)
    _check_overrides_not_swept(overrides, grid, given, variants)
    points = plan_points(grid, variants)
    sweep_dir = sweep_folder(config_path, out)
    from torchmdx.io_utils import unwritable_folder

    problem = unwritable_folder(sweep_dir)
    if problem:
        raise ConfigError(f"sweep folder {sweep_dir}: {problem}")
    # every point's data path is checked (a grid over data.path named a missing file only when it trained)
    configs = [point_config(base, p, sweep_dir) for p in points]
    _check_points_differ(configs, points)
    plan_path = sweep_dir / PLAN
    base_hash = _base_hash(base)
    if plan_path.is_file():
        old = read_plan(sweep_dir)
        if old.get("base_hash") != base_hash:
            raise ConfigError(f"sweep folder {sweep_dir} holds a sweep of another base config (its {PLAN}); "
                              "use --out for a new folder (or the same config and --set options)")
    split_files = nested_splits(configs, points, sweep_dir)  # sizes checked before it writes anything
    sweep_dir.mkdir(parents=True, exist_ok=True)
    plan = {"config": str(config_path), "base": base, "base_hash": base_hash,
            "points": [{"id": p.id, "variant": p.variant, "labels": p.labels, "overrides": p.overrides,
                        "split_file": split_files.get(p.id)} for p in points]}
    with atomic_write(plan_path, "w") as handle:
        json.dump(jsonable(plan), handle, indent=2)
    return {"sweep_dir": sweep_dir, "points": points, "base": base, "plan": plan, "settings": settings}


def _check_points_differ(configs, points) -> None:
    """Two points whose configs, as read (case and spelling normalised: ``trainer.accelerator`` CPU and cpu; unit
    names as the unit table reads them: ``data.energy_unit`` eV and ev), are the same apart from the run folder: the
    sweep trained the same model twice. :func:`plan_points` compares the values as written; this compares what the
    config made of them."""
    seen: dict = {}
    for config, point in zip(configs, points):
        resolved = config.to_dict()
        resolved.pop("run_dir", None)
        _read_units(resolved.get("data"), point)
        key = json.dumps(jsonable(resolved), sort_keys=True, default=str)
        if key in seen:
            first = seen[key]
            differ = [k for k in point.overrides if first.overrides.get(k) != point.overrides[k]]
            read = ", ".join(f"{k} {first.overrides.get(k)!r} and {point.overrides[k]!r}" for k in differ)
            raise ConfigError(f"the sweep points ({first.describe()}) and ({point.describe()}) are the same training "
                              f"(the config reads {read or 'their values'} alike); list each value once")
        seen[key] = point


def _read_units(data, point) -> None:
    """Replace the unit names of a resolved ``data`` section by their factors as ``torchmdx.units`` reads them
    (``eV`` and ``ev``, ``Hartree`` and ``Ha`` are one unit), so that :func:`_check_points_differ` compares units,
    not spellings. A name the table refuses is refused here, naming the point: ``--dry-run`` passed
    ``--grid data.energy_unit=eV,foo``, and the sweep stopped at 'foo' after the points before it had trained."""
    from torchmdx import units

    if not isinstance(data, dict):
        return
    for key, factor in (("energy_unit", units.energy_factor), ("length_unit", units.length_factor)):
        if isinstance(data.get(key), str):
            try:
                data[key] = factor(data[key])
            except TorchmdxError as exc:
                raise ConfigError(f"sweep point ({point.describe()}): {exc}") from None


def _check_point_cutoffs(configs, points, train_sizes, pool, structures, source: str) -> None:
    """The training's cutoff check (``train.data_checks.check_cutoff_reaches_neighbours``) for every point, on its
    nested training set: a grid over ``model.cutoff_upper`` with a value below every interatomic distance passed
    ``--dry-run`` ("validate every point") and stopped the sweep when its turn came, after the points before it had
    trained. Once per distinct cutoff window and training-set size."""
    import numpy as np

    from torchmdx.train.data_checks import check_cutoff_reaches_neighbours

    seen = set()
    for config, point, n_train in zip(configs, points, train_sizes):
        upper = getattr(config.model_config, "cutoff_upper", None)
        if upper is None:  # attention over whole structures: not checked by training either
            continue
        lower = getattr(config.model_config, "cutoff_lower", 0.0)
        if (upper, lower, n_train) in seen:
            continue
        seen.add((upper, lower, n_train))
        try:
            check_cutoff_reaches_neighbours(structures, np.sort(pool[:n_train]), upper, lower, source)
        except TorchmdxError as exc:  # name the point, like point_config
            raise type(exc)(f"sweep point ({point.describe()}): {exc}") from None


def nested_splits(configs, points, sweep_dir: Path) -> dict:
    """{point id: split file}: one validation and test set for the sweep and nested training
    sets, when every point reads the same data without its own split file or grouped split."""
    import numpy as np

    from torchmdx.data.datamodule import TorchmdxDataModule
    from torchmdx.data.splits import Split, resolve_sizes, save_split

    data = [c.data_config for c in configs]
    first = data[0]
    same = all((d.path, d.format, d.seed, d.val_size, d.test_size) == (first.path, first.format, first.seed,
                                                                         first.val_size, first.test_size) for d in data)
    if not same or any(d.split_file is not None or getattr(d, "split_by_group", False) or getattr(d, "test_groups", None)
                       or getattr(d, "val_groups", None) for d in data):
        return {}
    module = TorchmdxDataModule(first)
    module.setup("fit")
    n = module.dataset.n_structures
    content_hash = module.dataset.info["fingerprint"].get("hash", "")
    sizes = []
    for d, point in zip(data, points):
        try:
            sizes.append(resolve_sizes(n, d.train_size, first.val_size, first.test_size, source=str(first.path)))
        except TorchmdxError as exc:  # name the point, like point_config
            raise type(exc)(f"sweep point ({point.describe()}): {exc}") from None
    n_val, n_test = sizes[0][1], sizes[0][2]
    if max(s[0] for s in sizes) + n_val + n_test > n:
        raise ConfigError(f"sweep: the largest data.train_size ({max(s[0] for s in sizes)}) + val ({n_val}) + test "
                          f"({n_test}) exceed the {n} structures of {first.path}")
    perm = np.random.default_rng(first.seed).permutation(n)
    test = np.sort(perm[:n_test])
    val = np.sort(perm[n_test:n_test + n_val])
    pool = perm[n_test + n_val:]
    _check_point_cutoffs(configs, points, [s[0] for s in sizes], pool, module.dataset.structures, str(first.path))
    _check_splits_data(sweep_dir, sorted({s[0] for s in sizes}), content_hash, str(first.path))
    files = {}
    for (n_train, _, _), point in zip(sizes, points):
        path = sweep_dir / SPLITS / f"train_{n_train}.npz"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            save_split(Split(train=np.sort(pool[:n_train]), val=val, test=test, n_structures=n, seed=first.seed,
                             info={"kind": "sweep-nested"}), path, content_hash)
        files[point.id] = str(path)
    return files


def _check_splits_data(sweep_dir: Path, train_sizes: list, content_hash: str, source: str) -> None:
    """The sweep's nested split files record the data's content hash: a sweep run again after its data file
    changed (labelled again, edited) tabled the points trained on the old data beside points trained on the new
    (a UserWarning per point, "split was made from a dataset with different content"): one line instead."""
    import numpy as np

    for n_train in train_sizes:
        path = sweep_dir / SPLITS / f"train_{n_train}.npz"
        if not content_hash or not path.is_file():
            continue
        try:
            with np.load(path) as handle:
                stored = str(handle["hash"]) if "hash" in handle.files else ""
        except (OSError, ValueError, KeyError):
            continue  # a damaged split file: the point's own load names it
        if stored and stored != content_hash:
            raise ConfigError(f"sweep folder {sweep_dir} was planned on {source} with other content ({path} records "
                              f"data hash {stored[:12]}, the file now has {content_hash[:12]}): the points trained "
                              "then would be tabled beside points of the changed data; use --out for a new sweep "
                              "folder, or restore the data file")


# ---------------------------------------------------------------------------- the sweep's files
def read_json(path: Path, what: str, remedy: str) -> dict:
    """A JSON object the sweep wrote (its plan, a point's result), or one line naming the file
    (a file emptied by a crash or cut short by a copy was a JSONDecodeError traceback)."""
    try:
        value = json.loads(Path(path).read_text())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: {what} cannot be read ({reason[:120]}): damaged or cut short; {remedy}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {what} holds a {type(value).__name__}, not a JSON object; {remedy}")
    return value


def read_plan(sweep_dir: Path) -> dict:
    return read_json(Path(sweep_dir) / PLAN, "the sweep's plan",
                     "delete it and run the same sweep command again (finished points are kept)")


def read_result(path: Path) -> dict:
    return read_json(path, "the point's result", "delete it and run the sweep again (the point is measured again)")


__all__ = ["PLAN", "RESULT", "RUNS", "SPLITS", "RESERVED_KEYS", "SECTION_KEYS", "SweepPoint", "parse_grid",
           "sweep_section", "check_workers_per_device",
           "plan_points", "point_values", "point_config", "load_base", "sweep_folder", "prepare_sweep",
           "nested_splits", "read_json", "read_plan", "read_result"]
