"""The argument validators: one rule for each kind of argument, one message style.

The rules, everywhere in keras-curv:

* an *int* argument takes a Python or NumPy integer, never a ``bool`` and never a float
  (``2.0`` is refused, so that a misplaced argument is caught instead of truncated);
* a *number* argument takes an int or a float (Python or NumPy), never a ``bool``, and
  must be finite;
* every message names the argument, the rule and the value received.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np


def _fail(name: str, rule: str, value: Any) -> None:
    raise ValueError(f"`{name}` must be {rule}; received {name}={value!r}.")


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer in the sense above (no bools, no floats)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(
    value: Any, name: str, *, minimum: int | None = None, allow_none: bool = False
) -> int | None:
    """``value`` as an ``int`` (``None`` passes when ``allow_none``).

    Raises:
        ValueError: not an int, or below ``minimum``.
    """
    if value is None and allow_none:
        return None
    rule = "an int" if minimum is None else f"an int >= {minimum}"
    if allow_none:
        rule += " or None"
    if not is_int(value) or (minimum is not None and int(value) < minimum):
        _fail(name, rule, value)
    return int(value)


def number(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> float | None:
    """``value`` as a finite ``float`` within optional bounds.

    Args:
        value: The argument.
        name: Its name, for the message.
        low: Lower bound, or ``None``.
        high: Upper bound, or ``None``.
        low_open: Exclude ``low`` itself.
        high_open: Exclude ``high`` itself.
        allow_none: Let ``None`` through.

    Raises:
        ValueError: not a finite number, or out of bounds.
    """
    if value is None and allow_none:
        return None
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    if low is not None and high is not None:
        rule = f"a number in {left}{low:g}, {high:g}{right}"
    elif low is not None:
        rule = f"a number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        rule = f"a number {'<' if high_open else '<='} {high:g}"
    else:
        rule = "a finite number"
    if allow_none:
        rule += " or None"
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        _fail(name, rule, value)
    result = float(value)
    if not math.isfinite(result):
        _fail(name, rule, value)
    if low is not None and (result < low or (low_open and result == low)):
        _fail(name, rule, value)
    if high is not None and (result > high or (high_open and result == high)):
        _fail(name, rule, value)
    return result


def positive(value: Any, name: str, *, allow_none: bool = False) -> float | None:
    """A finite number ``> 0``."""
    return number(value, name, low=0.0, low_open=True, allow_none=allow_none)


def non_negative(value: Any, name: str, *, allow_none: bool = False) -> float | None:
    """A finite number ``>= 0``."""
    return number(value, name, low=0.0, allow_none=allow_none)


def decay(value: Any, name: str, *, allow_zero: bool = True) -> float:
    """A decay rate (``beta``, ``gamma``, momentum): in ``[0, 1)``, or ``(0, 1)``."""
    return number(value, name, low=0.0, high=1.0, low_open=not allow_zero, high_open=True)


def choice(value: Any, name: str, options: Iterable[str]) -> str:
    """One of ``options`` (strings)."""
    options = tuple(options)
    if not isinstance(value, str) or value not in options:
        _fail(name, f"one of {options}", value)
    return value


def seed(value: Any, name: str = "seed") -> int | None:
    """An integer seed or ``None``."""
    return integer(value, name, allow_none=True)


def boolean(value: Any, name: str) -> bool:
    """A ``bool`` (Python or NumPy); ``0``/``1`` and strings are refused."""
    if not isinstance(value, (bool, np.bool_)):
        _fail(name, "True or False", value)
    return bool(value)
