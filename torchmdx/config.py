"""Typed configuration sections with validation that names the offending key.

Each section of a YAML config (``data:``, ``model:``, ``train:``, ``trainer:``, ``md:``) is a
dataclass. :func:`from_dict` builds one from a plain dict and raises :class:`ConfigError` with
one line such as::

    config key 'model.num_layer' does not exist; allowed: activation, cutoff_upper, ..., num_layers

or ``config key 'train.lr' must be float, got 'fast' (str)``. Nested dataclasses are supported.
A caller whose values came from somewhere else (command-line options) passes ``names`` to say how
each key is named instead (``{'md.dt': '--dt'}`` gives ``--dt must be float, got 'x' (str)``);
validators name keys with :func:`key_name`, so their lines follow the same names.

Numbers written as strings: PyYAML follows YAML 1.1, where a float needs a dot and a signed
exponent, so ``1e-4``, ``5e-4`` and ``1.0e7`` come back as *strings* (``1.0e-4`` and ``1.0e+7``
are floats). A field typed ``float`` therefore also takes a string that Python's ``float()``
reads and that contains a digit (``'1e-4'`` → 0.0001, ``'1.0e7'`` → 1e7; not ``'nan'``, ``'inf'``
or ``'fast'``, which stay errors). Ints stay strict.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Hashable, Literal, Mapping, NoReturn, Optional, TypeVar, Union, get_args, get_origin

import yaml

from torchmdx.errors import ConfigError

T = TypeVar("T")

#: how messages name each dotted key while :func:`from_dict` builds a config (its ``names``)
_NAMES: contextvars.ContextVar[Optional[Mapping[str, str]]] = contextvars.ContextVar("config_key_names",
                                                                                     default=None)


#: {dotted key: text} of the values a config wrote as text and :func:`from_dict` read as numbers ("800" -> 800.0),
#: while that call's ``validate`` runs (:func:`given_text`)
_GIVEN: contextvars.ContextVar[Optional[Mapping[str, str]]] = contextvars.ContextVar("config_given_text", default=None)


def given_text(key: str) -> Optional[str]:
    """The text the config gave for the dotted key ``key`` when :func:`from_dict` read it as a number (``'800'``
    for ``train_size: "800"``, which is the float 800.0), else None; for a ``validate`` whose line should show
    the value as written. Only during the :func:`from_dict` call that read it."""
    given = _GIVEN.get()
    return None if given is None else given.get(key)


def key_name(key: str) -> str:
    """How a message names the dotted config key ``key`` (``'md.dt'``): ``config key 'md.dt'``, or
    the name the enclosing :func:`from_dict` call was given for it in ``names`` (``--dt``)."""
    names = _NAMES.get()
    if names is not None and key in names:
        return names[key]
    return f"config key '{key}'"


def bad_key(section: str, key: str, message: str) -> NoReturn:
    """Raise the one-line error of a config value that has the right type but a wrong value:
    ``config key '<section>.<key>' <message>`` (validators bind it: ``partial(bad_key, section)``)."""
    raise ConfigError(f"{key_name(f'{section}.{key}')} {message}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _float_from_string(text: str) -> float | None:
    """``float(text)`` for a numeric string such as ``'1e-4'`` or ``'1.0e7'`` (YAML 1.1 reads
    those as strings); None when ``text`` is not a number (no digit, or ``float()`` refuses it)."""
    if not any(c.isdigit() for c in text):
        return None  # 'nan', 'inf', 'infinity' are words, not numbers written in a config
    try:
        return float(text)
    except ValueError:
        return None


#: the words float() reads as NaN or infinity (any case): ``--set trainer.gradient_clip_val=nan`` (YAML reads the
#: word as text, ``.nan`` being YAML's NaN) said "must be float | null, got 'nan' (str)", the parser's type (round 37)
_FLOAT_WORDS = frozenset(sign + word for sign in ("", "+", "-") for word in ("nan", "inf", "infinity"))


class _SetWord(str):
    """A NaN or infinity word given by ``--set`` (:func:`apply_overrides`, round 37): a float key reads it as the
    number, so that the key's own check takes it ("must be a finite number, got nan"); any other key, as the text
    (a word in a config file stays text: round 11's "must be float, got 'nan' (str)")."""


yaml.SafeDumper.add_representer(_SetWord, yaml.representer.SafeRepresenter.represent_str)


def _choice_hint(value: Any, allowed: tuple) -> str:
    """' (did you mean 'rotations'?)' for a misspelt choice of a text key (``train.augment: rotation``,
    ``model.dtype: Float32``): a match ignoring case, else difflib's closest; '' when none is close (round 36;
    ``selu`` is no misspelt ``silu``: a cutoff of 0.8)."""
    close = closest_choice(value, allowed, cutoff=0.8)
    return f" (did you mean {close!r}?)" if close is not None else ""


def closest_choice(value: Any, allowed, cutoff: float) -> Optional[str]:
    """The text choice of ``allowed`` that ``value`` probably meant: one equal to it ignoring case and surrounding
    blanks, else difflib's closest at ``cutoff``; None when none is close or ``value`` is no text. For the
    "did you mean" of config choices (:func:`_choice_hint`) and of the command line's choices (``cli.main``)."""
    choices = [a for a in allowed if isinstance(a, str)]
    if not isinstance(value, str) or not choices:
        return None
    same = [a for a in choices if a.lower() == value.strip().lower()]
    close = same or difflib.get_close_matches(value, choices, n=1, cutoff=cutoff)
    return close[0] if close else None


def key_hint(key: Any, present) -> str:
    """' (did you mean 'energy'?)' for a key of a data file that is not there (``--energy-key ' energy'``, a stray
    space; ``Energy``), among the keys ``present``: :func:`_choice_hint`'s match (ignoring case and the key's
    surrounding blanks, else difflib's closest); '' when none is close (round 38)."""
    return _choice_hint(key, tuple(str(k) for k in present))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widened to float)."""
    origin = get_origin(tp)
    if tp is Any:
        return str(value) if isinstance(value, _SetWord) else value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key_name(key)} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}"
                              + _choice_hint(value, allowed))
        return str(value) if isinstance(value, _SetWord) else value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{key_name(key)} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key_name(key)} must be null, got {value!r}")
        return None
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key_name(key)} must be a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key_name(key)} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key_name(key)} must be a mapping, got {value!r} ({type(value).__name__})")
        return dict(value)
    if tp is float:
        if isinstance(value, str) and (number := _float_from_string(value)) is not None:
            return number
        if isinstance(value, _SetWord):
            return float(value.strip())
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key_name(key)} must be float, got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key_name(key)} must be int, got {value!r} ({type(value).__name__})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key_name(key)} must be true or false, got {value!r} ({type(value).__name__})")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key_name(key)} must be a string, got {value!r} ({type(value).__name__})")
        return str(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key_name(key)} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


#: seeds must fit numpy's and Lightning's seed range (numpy refuses negative seeds with a traceback)
SEED_MAX = 2**32 - 1


def _check_number(value: Any, name: str, key: str) -> None:
    """Values no config key can mean: a NaN or infinite float (YAML ``.nan`` / ``.inf``: every
    comparison with NaN is false, so range checks let it through and it surfaces later as a
    diverged run or a silent NaN), and a seed outside 0..2**32-1."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key_name(key)} must be a finite number, got {value}")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_number(item, name, f"{key}[{i}]")
    if name == "seed" and isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= SEED_MAX:
        raise ConfigError(f"{key_name(key)} must be between 0 and {SEED_MAX} (2**32 - 1), got {value}")


def from_dict(cls: type[T], values: Mapping[str, Any] | None, section: str = "",
              names: Optional[Mapping[str, str]] = None) -> T:
    """Build dataclass ``cls`` from ``values``, rejecting unknown keys and wrong types.

    ``section`` is the dotted prefix used in messages (``'model'`` gives ``'model.cutoff'``).
    Missing keys take the dataclass defaults; a field without a default is required.

    ``names``: how messages name a dotted key (``{'data.format': '--format'}``), in place of
    ``config key 'data.format'``, in this function's lines and in those of ``cls.validate`` (and
    of nested sections) that name keys with :func:`key_name`; keys not in it keep that wording.
    """
    if names is None:
        return _from_dict(cls, values, section)
    token = _NAMES.set(names)
    try:
        return _from_dict(cls, values, section)
    finally:
        _NAMES.reset(token)


#: keys of other codes' configs (TorchMD-NET, MACE, NequIP, SchNetPack) that torchmdx names otherwise: what a
#: message says instead of difflib's guess, which misled ('model.r_max': "did you mean 'max_z'?", the largest atomic
#: number, for MACE's cutoff radius; 'num_channels': "'num_heads'?"). Keys whose name torchmdx shares are not here.
_FEATURES = "(model.channels for the equiformer and gatr architectures)"
FOREIGN_KEYS = {
    "r_max": "MACE's and NequIP's cutoff radius is model.cutoff_upper here (Å)",
    "r_cut": "the cutoff radius is model.cutoff_upper here (Å)",
    "num_channels": "MACE's feature channels are model.embedding_dimension here " + _FEATURES,
    "num_features": "the feature size is model.embedding_dimension here " + _FEATURES,
    "hidden_channels": "the feature size is model.embedding_dimension here " + _FEATURES,
    "n_atom_basis": "SchNetPack's n_atom_basis is model.embedding_dimension here " + _FEATURES,
    "num_interactions": "the number of interaction layers is model.num_layers here",
    "n_interactions": "SchNetPack's n_interactions is model.num_layers here",
    "max_ell": "MACE's max_ell has no counterpart in the ET (its vectors are l = 1); the Equiformer's degree is "
               "model.lmax",
    "num_epochs": "TorchMD-NET's num_epochs is trainer.max_epochs here",
    "max_num_epochs": "MACE's max_num_epochs is trainer.max_epochs here",
    "learning_rate": "the learning rate is train.lr here",
    "precision": "the precision is model.dtype here (float32 or float64)",
    "ema_alpha_y": "TorchMD-NET's ema_alpha_y (a moving average of the energy loss) has no counterpart; "
                   "train.ema_decay averages the weights",
    "ema_alpha_neg_dy": "TorchMD-NET's ema_alpha_neg_dy (a moving average of the force loss) has no counterpart; "
                        "train.ema_decay averages the weights",
    "derivative": "forces are always the energy's derivative here; train.force_weight: 0 trains on energies only",
    "max_num_neighbors": "torchmdx's neighbor lists have no per-atom limit (nothing to set)",
}


def _from_dict(cls: type[T], values: Mapping[str, Any] | None, section: str) -> T:
    if values is not None and not isinstance(values, Mapping):
        where = key_name(section) if section else f"the {cls.__name__} config"
        raise ConfigError(f"{where} must be a mapping of keys, got {values!r} ({type(values).__name__})")
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{section}." if section else ""
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            if str(key) in FOREIGN_KEYS:
                hint = f" ({FOREIGN_KEYS[str(key)]})"
            raise ConfigError(
                f"{key_name(f'{prefix}{key}')} does not exist{hint}; allowed: {', '.join(sorted(fields))}"
            )
    kwargs = {}
    for name, field in fields.items():
        if name in values:
            kwargs[name] = _coerce(values[name], hints[name], prefix + name)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key_name(prefix + name)} is required ({_type_name(hints[name])})")
    for name, value in kwargs.items():
        _check_number(value, name, prefix + name)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        texts = {prefix + name: values[name] for name, value in kwargs.items()
                 if isinstance(values[name], str) and isinstance(value, (int, float))}
        token = _GIVEN.set({**(_GIVEN.get() or {}), **texts})
        try:
            validate(section or cls.__name__)
        finally:
            _GIVEN.reset(token)
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass (possibly nested) -> plain dict/list structure, ready for YAML/JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                # `<<: *base` (merge keys): the base's keys may be overridden here; constructing
                # the `<<` key itself failed ("could not determine a constructor for the tag
                # 'tag:yaml.org,2002:merge'", reported as "not valid YAML")
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if not isinstance(key, Hashable):  # `[1]: x`: a TypeError traceback from the check below
                continue  # SafeLoader's construct_mapping says "found unhashable key" (a YAMLError)
            if key in seen:
                raise _DuplicateKey(f"key {key!r} is given twice (lines {seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)

    def resolve(self, kind, value, implicit):
        """YAML 1.1's base-60 numbers are text here, as in YAML 1.2: ``max_time: 12:00:00:00``
        (Lightning's DD:HH:MM:SS) was the int 3888000, refused as "must be str"; ``1:30`` was 90."""
        tag = super().resolve(kind, value, implicit)
        if tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float") and implicit[0] and ":" in value:
            return "tag:yaml.org,2002:str"
        return tag


def _construct_int(loader, node):
    """Ints as YAML 1.2 reads them: ``010`` is ten (YAML 1.1, PyYAML: octal 8, so that
    ``max_epochs: 010`` ran 8 epochs, silently); ``0x10`` stays hex, ``0b11`` binary."""
    text = loader.construct_scalar(node).replace("_", "")
    digits = text.lstrip("+-")
    if len(digits) > 1 and digits[0] == "0" and digits.isdigit():
        return int(text, 10)
    return yaml.SafeLoader.construct_yaml_int(loader, node)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; one-line errors for a missing file or bad YAML."""
    path = Path(path)
    if not path.is_file():
        from torchmdx.io_utils import missing_file_reason

        raise ConfigError(f"{path}: {missing_file_reason(path, 'config file')}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a YAML config was expected)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def next_to_config(given: str, config_dir: str | Path) -> str | None:
    """The rule for a relative input file named in a YAML config (``torchmdx train``'s data files,
    ``torchmdx md``'s model and structure): next to the config file first, then (the caller's
    fallback) the current folder. Returns ``config_dir / given`` when that exists, else None
    (also for an empty or absolute path, ``~`` included)."""
    if not given or Path(given).expanduser().is_absolute():
        return None
    near = Path(config_dir) / given
    return str(near) if near.exists() else None


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """Apply ``--set section.key=value`` overrides (value parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        if any(not part.strip() for part in dotted.split(".")):  # '=1', '.lr=1', 'train..lr=1': "config key ''"
            raise ConfigError(f"--set {item!r}: the key {dotted.strip()!r} has an empty part; expected section.key=value "
                              "(e.g. train.lr=1e-4)")
        try:  # the config file's loader: a key given twice in a {...} value kept the last, silently
            value = yaml.load(raw, Loader=_UniqueKeyLoader)
        except _DuplicateKey as exc:
            raise ConfigError(f"--set {item!r}: {str(exc).split(' (lines')[0]}; keep one") from None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and value.strip().lower() in _FLOAT_WORDS:
            value = _SetWord(value)  # a float key reads it as the number (round 37)
        set_dotted(config, dotted.strip(), value, f"--set {item!r}")
    return config


def set_dotted(config: dict, dotted: str, value, what: str) -> None:
    """``config[a][b][c] = value`` for ``dotted`` "a.b.c", making missing sections; a part that is
    not a section is a one-line ConfigError starting with ``what`` (how the caller names the key)."""
    node = config
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value
