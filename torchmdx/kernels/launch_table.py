"""Measured launch table of the fused message kernels: what ``auto`` picks.

:data:`torchmdx.kernels.message_triton.CONFIG` fields left at ``None`` / ``'auto'`` are taken,
for a call on a CUDA GPU, from the entry of ``launch_table.json`` (beside this module) whose GPU
name (``torch.cuda.get_device_name``) and size class (atoms in the call, :func:`size_class`)
match, else from an entry of another GPU of the same family (:data:`GPU_FAMILIES`: an H200 takes an
H100's entry where it has none of its own); without an entry, from the built-in :data:`DEFAULTS`.
A field set explicitly always wins.

Each entry was measured at one filter place (its ``place``, :data:`PLACES`; absent means
'gemm', as in the entries written before 2026-12-07): 'gemm' for calls with trainable filter
weights (training; the RBF rows and weights go in), 'table' for calls that interpolate the
filters from tables (frozen models: MD, the calculator, evaluation). The two run different
kernels (other register counts, other bytes per edge), so a call looks first for an entry of its
own place, of this GPU, then of its family, and only then for one of the other place. A 'table'
entry may not choose ``filters`` (whether a call uses tables at all is the 'gemm' entry's and the
defaults' decision, :meth:`~torchmdx.kernels.message_triton.FusedMessage.wants_tables`).
``bench/bench_model.py --sweep`` measures the launch variants on a GPU and writes the entries
(:func:`write_entries`); nothing else writes the file. Format::

    {"version": 1,
     "entries": [{"gpu": "NVIDIA H200", "size_class": "medium", "place": "gemm",
                  "config": {"sender_side": "merged", "block_edges": 8, "dot_precision": "tf32x3"},
                  "precision_errors": {"tf32x3": 3.1e-05, "tf32": 1.2e-03, "ieee": 3.0e-05},
                  "measured": {"date": "...", "system": "dhfr", "atoms": 2489, "fwd_bwd_gpu_ms": ...}}]}

Accuracy gate (issue 16): ``precision_errors`` are the relative force errors of the whole model
against a float64 evaluation of the same weights, one per ``tl.dot`` input precision of the
filter products. A precision may be picked only if its error is at most :data:`GATE_FACTOR`
times that of :data:`BASELINE_PRECISION` (today's float32 path, three tf32 passes); an entry
whose ``dot_precision`` fails the gate (or has no measured errors) keeps the baseline precision
and its other fields. A file that cannot be read or has the wrong shape gives one warning and
the defaults; so does an entry with an unknown field or value.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Optional

from torchmdx.io_utils import atomic_write

#: the table shipped with the package (written by the GPU sweep)
TABLE_PATH = Path(__file__).with_name("launch_table.json")
#: the built-in launch parameters (what 'auto' / None mean without a table entry). filters 'table':
#: frozen (inference) weights interpolate the radial filters from tables (calls with trainable
#: filter weights run the GEMM place); on an H100 on 2026-12-06 (docs/benchmarks/2026-12-06-h100-g,
#: graph + compiled parts, the same call) 0.706 / 1.331 / 6.71 / 13.63 / 55.8 ms against 0.827 / 1.604 /
#: 11.43 / 23.46 / 83.9 ms with the GEMM filters at 22 / 166 / 2 489 / 5 807 / 30 327 atoms, force errors
#: against float64 within 1.1x of the GEMM filters' (docs/kernels_message.md, "Filter tables")
DEFAULTS = dict(block_edges=16, chunk_channels=32, num_warps=4, dot_precision="tf32x3", programs_per_sm=0,
                num_stages=None, maxnreg=None, filters="table", sender_side="sorted", table_storage="float32")
#: tl.dot input precisions of the float32 filter products ('bf16x3' / 'bf16x6': split-bf16
#: products, Triton >= 3.5 on NVIDIA; a Triton that refuses one fails at compile time)
PRECISIONS = ("ieee", "tf32x3", "tf32", "bf16x3", "bf16x6")
#: allowed values of the string fields (None / int fields: positive integers, or None where allowed)
CHOICES = dict(dot_precision=PRECISIONS, filters=("gemm", "kernel", "table"), sender_side=("sorted", "merged", "reverse"),
               table_storage=("float32", "compact"))
#: fields that may be None (Triton's own default)
NULLABLE = ("num_stages", "maxnreg")
BASELINE_PRECISION = "tf32x3"
GATE_FACTOR = 2.0
#: (name, atoms below which it applies); the last class has no upper bound
SIZE_CLASSES = (("small", 1000), ("medium", 10000), ("large", None))
VERSION = 1
#: filter places an entry can be measured at ('gemm': trainable weights; 'table': frozen models)
PLACES = ("gemm", "table")
#: an entry without a 'place' (those written before 2026-12-07) was measured at this one
DEFAULT_PLACE = "gemm"
#: GPUs whose launch choices carry over to each other where one has no entry of its own (the same
#: architecture and multiprocessor count; Hopper: sm_90, 132 SMs on the SXM parts). The H200 differs
#: from the H100 in memory size and bandwidth, which moves the times; that it keeps the H100's winners
#: is an assumption, not a measurement (no sweep has run on an H200 since the table exists): its own
#: sweep writes its own entries, which win. Matched as words of ``torch.cuda.get_device_name``.
GPU_FAMILIES = {"hopper": ("H100", "H200", "H800", "GH200")}


class LaunchTableError(ValueError):
    """The launch table (or one of its entries) does not have the documented shape."""


def size_class(num_atoms: int) -> str:
    """'small' (< 1 000 atoms: latency, a few programs per SM), 'medium' (< 10 000: DHFR,
    factor IX) or 'large' (STMV)."""
    for name, below in SIZE_CLASSES:
        if below is None or num_atoms < below:
            return name
    raise AssertionError("unreachable")


def gate(errors: dict, baseline: str = BASELINE_PRECISION, factor: float = GATE_FACTOR) -> tuple:
    """Precisions whose measured force error is at most ``factor`` x the baseline's. Without a
    finite baseline error nothing can be judged: only the baseline is allowed."""
    base = errors.get(baseline) if errors else None
    if not _finite(base):
        return (baseline,)
    return tuple(p for p in PRECISIONS if p == baseline or (_finite(errors.get(p)) and errors[p] <= factor * base))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_value(name, value):
    if name not in DEFAULTS:
        raise LaunchTableError(f"unknown field {name!r} (known: {', '.join(DEFAULTS)})")
    if name in CHOICES:
        if value not in CHOICES[name]:
            raise LaunchTableError(f"{name} = {value!r} is not one of {CHOICES[name]}")
    elif value is None:
        if name not in NULLABLE:
            raise LaunchTableError(f"{name} may not be null")
    elif not (isinstance(value, int) and not isinstance(value, bool) and value >= (0 if name == "programs_per_sm" else 1)):
        raise LaunchTableError(f"{name} = {value!r} is not a positive integer")


def validate(table) -> list:
    """The entries of a parsed table, checked (raises :class:`LaunchTableError`)."""
    if not isinstance(table, dict) or not isinstance(table.get("entries"), list):
        raise LaunchTableError("expected an object with a list 'entries'")
    if table.get("version", VERSION) != VERSION:
        raise LaunchTableError(f"version {table.get('version')!r}, expected {VERSION}")
    classes = [name for name, _ in SIZE_CLASSES]
    for k, entry in enumerate(table["entries"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("gpu"), str) or entry.get("size_class") not in classes:
            raise LaunchTableError(f"entry {k}: needs a 'gpu' name and a 'size_class' in {classes}")
        config = entry.get("config", {})
        if not isinstance(config, dict):
            raise LaunchTableError(f"entry {k}: 'config' is not an object")
        for name, value in config.items():
            try:
                _check_value(name, value)
            except LaunchTableError as exc:
                raise LaunchTableError(f"entry {k}: {exc}") from None
        if not isinstance(entry.get("precision_errors", {}), dict):
            raise LaunchTableError(f"entry {k}: 'precision_errors' is not an object")
        if place_of(entry) not in PLACES:
            raise LaunchTableError(f"entry {k}: place {entry.get('place')!r} is not one of {PLACES}")
        if place_of(entry) == "table" and "filters" in config:
            raise LaunchTableError(f"entry {k}: a 'table' place entry may not choose 'filters' (the 'gemm' entry's "
                                   "and the defaults' decision)")
    keys = [(e["gpu"], e["size_class"], place_of(e)) for e in table["entries"]]
    for k, key in enumerate(keys):
        if key in keys[:k]:
            raise LaunchTableError(f"entry {k}: a second entry for GPU {key[0]!r}, size class {key[1]!r}, "
                                   f"place {key[2]!r}")
    return table["entries"]


def place_of(entry: dict) -> str:
    """The filter place an entry was measured at (:data:`DEFAULT_PLACE` where it does not say)."""
    return entry.get("place", DEFAULT_PLACE)


_CACHE: dict = {}
_RESOLVED: dict = {}


def load(path: Optional[os.PathLike] = None) -> list:
    """Entries of the table at ``path`` (default :data:`TABLE_PATH`), read once per process
    (:func:`reload` forgets it). Missing file: no entries. Unreadable or malformed: one warning,
    no entries."""
    path = Path(path) if path is not None else TABLE_PATH
    key = str(path)
    if key not in _CACHE:
        entries = []
        if path.exists():
            try:
                entries = validate(json.loads(path.read_text()))
            except (OSError, ValueError) as exc:  # JSONDecodeError and LaunchTableError are ValueErrors
                warnings.warn(f"launch table {path} ignored (built-in launch defaults used): "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", stacklevel=2)
                entries = []
        _CACHE[key] = entries
    return _CACHE[key]


def reload():
    """Forget the tables read so far (after the sweep wrote one, or in tests)."""
    _CACHE.clear()
    _RESOLVED.clear()


def gpu_family(gpu: Optional[str]) -> Optional[str]:
    """The :data:`GPU_FAMILIES` name of the GPU called ``gpu`` (None: no family known)."""
    words = set(re.split(r"[^A-Za-z0-9]+", gpu or ""))
    for family, members in GPU_FAMILIES.items():
        if words.intersection(members):
            return family
    return None


def lookup(gpu: Optional[str], num_atoms: int, path: Optional[os.PathLike] = None, place: str = DEFAULT_PLACE) -> dict:
    """The measured launch fields for a call of ``num_atoms`` atoms on the GPU named ``gpu`` at the
    filter place ``place`` ({} without a GPU or an entry), with the accuracy gate applied to
    ``dot_precision``. The entry, in order: of this place and GPU, of this place and the GPU's family
    (:func:`gpu_family`), of the other place and this GPU, of the other place and the family."""
    if not gpu:
        return {}
    if place not in PLACES:
        raise ValueError(f"place must be one of {PLACES}, not {place!r}")
    wanted = size_class(num_atoms)
    family = gpu_family(gpu)
    candidates = [e for e in load(path) if e["size_class"] == wanted]

    def rank(entry):  # 0 best; None: not usable
        if entry["gpu"] == gpu:
            same_gpu = True
        elif family is not None and gpu_family(entry["gpu"]) == family:
            same_gpu = False
        else:
            return None
        return 2 * (place_of(entry) != place) + (not same_gpu)

    ranked = [(rank(e), k, e) for k, e in enumerate(candidates) if rank(e) is not None]
    if not ranked:
        return {}
    chosen = min(ranked, key=lambda item: item[:2])[2]
    config = dict(chosen.get("config", {}))
    if "dot_precision" in config and config["dot_precision"] not in gate(chosen.get("precision_errors", {})):
        config["dot_precision"] = BASELINE_PRECISION
    return config


def resolve(explicit: dict, gpu: Optional[str], num_atoms: int, use_table: bool = True,
            path: Optional[os.PathLike] = None, place: str = DEFAULT_PLACE) -> dict:
    """Every launch field: ``explicit`` values that are not None / 'auto', else the table's
    (when ``use_table`` and there is an entry, :func:`lookup` at ``place``), else :data:`DEFAULTS`."""
    key = (tuple(sorted(explicit.items(), key=lambda kv: kv[0])), gpu, size_class(num_atoms), bool(use_table),
           str(path), place)
    if key in _RESOLVED:  # called once per layer and forward: keep it to a dictionary look-up
        return dict(_RESOLVED[key])
    table = lookup(gpu, num_atoms, path, place) if use_table else {}
    out = {}
    for name, default in DEFAULTS.items():
        value = explicit.get(name)
        if value is None or value == "auto":
            value = table.get(name, default)
        out[name] = value
    _RESOLVED[key] = out
    return dict(out)


# --------------------------------------------------------------------------- writing (the sweep)
def make_entry(gpu: str, size: str, config: dict, precision_errors: dict, measured: dict,
               place: str = DEFAULT_PLACE) -> dict:
    """One table entry measured at the filter place ``place``; ``config`` holds only the fields that
    differ from the defaults (checked; a 'table' entry drops ``filters``)."""
    if place not in PLACES:
        raise LaunchTableError(f"place {place!r} is not one of {PLACES}")
    config = {k: v for k, v in config.items() if k in DEFAULTS and v != DEFAULTS[k]
              and not (place == "table" and k == "filters")}
    for name, value in config.items():
        _check_value(name, value)
    errors = {k: float(v) for k, v in precision_errors.items() if _finite(v)}
    return {"gpu": gpu, "size_class": size, "place": place, "config": config, "precision_errors": errors,
            "allowed_precisions": list(gate(errors)),
            "measured": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"), **measured}}


def write_entries(new_entries: list, path: Optional[os.PathLike] = None) -> Path:
    """Merge ``new_entries`` into the table at ``path`` (an entry replaces the one with the same
    GPU, size class and place; an unreadable old table is replaced) and write it atomically."""
    path = Path(path) if path is not None else TABLE_PATH
    entries = []
    if path.exists():
        try:
            entries = validate(json.loads(path.read_text()))
        except (OSError, ValueError):
            entries = []
    keys = {(e["gpu"], e["size_class"], place_of(e)) for e in new_entries}
    entries = [e for e in entries if (e["gpu"], e["size_class"], place_of(e)) not in keys] + list(new_entries)
    entries.sort(key=lambda e: (e["gpu"], [name for name, _ in SIZE_CLASSES].index(e["size_class"]),
                                PLACES.index(place_of(e))))
    validate({"version": VERSION, "entries": entries})
    with atomic_write(path, "w") as handle:
        handle.write(json.dumps({"version": VERSION, "entries": entries}, indent=1) + "\n")
    reload()
    return path
