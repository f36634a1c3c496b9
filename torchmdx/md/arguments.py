"""Checks of the Python API's keyword arguments (``Simulation``, its ``run`` and ``minimize``, ``ForceField``):
``torchmdx md`` checks its options in :mod:`torchmdx.md.config`, but a value given from Python reached the engine
as it was. ``skin="0.5"`` or ``check_interval="10"`` were TypeErrors from deep inside, ``check_interval=2.5`` and
``chain_length=2.5`` were cut to 2, ``wrap="no"`` was true, ``restart_every=-3`` never ended and ``minimize(fmax=-1)``
ran every step. Each is one ``ConfigError`` line naming the argument, what it got and what it takes.
"""

from __future__ import annotations

import math
import numbers

from torchmdx.errors import ConfigError


def real_argument(name: str, value, what: str, *, low: float = 0.0, inclusive: bool = True,
                  finite: bool = True) -> float:
    """``value`` as a float: a real number (not a bool or a string) >= ``low`` (> ``low`` unless ``inclusive``),
    finite when ``finite``; else "NAME must be WHAT, got VALUE"."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        number = float(value)
        ok = (number >= low if inclusive else number > low) and (math.isfinite(number) or not finite)
    if not ok:
        raise ConfigError(f"{name} must be {what}, got {value!r}")
    return number


def whole_argument(name: str, value, what: str, *, low: int = 1) -> int:
    """``value`` as an int: a whole number (an int or numpy integer, not a bool or 2.5) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ConfigError(f"{name} must be {what}, got {value!r}")
    return int(value)


def flag_argument(name: str, value) -> bool:
    """``value`` as a bool: True or False (numpy's too); a string such as "no" was true."""
    if isinstance(value, (bool,)) or type(value).__name__ == "bool_":
        return bool(value)
    raise ConfigError(f"{name} must be True or False, got {value!r}")
