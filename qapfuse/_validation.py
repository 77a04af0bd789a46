"""Argument checks shared by every public function.

One message template everywhere: *The 'tau' parameter of ga must be a float > 0. Got -1
instead.* Wrong types raise ``TypeError``, wrong values ``ValueError``. Checks run before any
heavy work and never use ``assert``.
"""

from __future__ import annotations

import difflib
import math
import operator
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from .errors import ConvergenceWarning

__all__ = [
    "Option",
    "check_choice",
    "check_finite",
    "check_options",
    "check_scalar",
    "warn_not_converged",
]


def check_scalar(
    value: Any,
    name: str,
    caller: str,
    *,
    integer: bool = False,
    low: float | None = 0,
    high: float | None = None,
    low_inclusive: bool = False,
    high_inclusive: bool = True,
) -> Any:
    """Check that `value` is an int (``integer=True``) or a real number inside the given range."""
    kind, what = (Integral, "an int") if integer else (Real, "a float")
    parts = []
    if low is not None:
        parts.append(f"{'>=' if low_inclusive else '>'} {low:g}")
    if high is not None:
        parts.append(f"{'<=' if high_inclusive else '<'} {high:g}")
    bound = (" " + " and ".join(parts)) if parts else ""
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(
            f"The {name!r} parameter of {caller} must be {what}{bound}. "
            f"Got {value!r} of type {type(value).__name__} instead."
        )
    if integer:
        value = operator.index(value)
    ok = value == value  # NaN fails here
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        raise ValueError(
            f"The {name!r} parameter of {caller} must be {what}{bound}. Got {value!r} instead."
        )
    return value


def check_choice(value: Any, name: str, caller: str, choices: Iterable[str]) -> str:
    """Check that `value` is one of `choices`; suggest the closest name for a typo."""
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, choices, n=1)
            if close:
                hint = f" Did you mean {close[0]!r}?"
        raise ValueError(
            f"The {name!r} parameter of {caller} must be one of "
            f"{', '.join(repr(c) for c in choices)}. Got {value!r} instead.{hint}"
        )
    return value


@dataclass(frozen=True)
class Option:
    """Declared constraint of one solver option (see :func:`check_options`).

    `kind` is ``"int"``, ``"float"``, ``"bool"``, ``"choice"``, ``"array"`` or ``"any"``.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    choices: tuple[str, ...] = ()
    allow_none: bool = False

    def check(self, value: Any, name: str, caller: str) -> Any:
        if value is None and self.allow_none:
            return value
        if self.kind in ("int", "float"):
            return check_scalar(
                value,
                name,
                caller,
                integer=self.kind == "int",
                low=self.low,
                high=self.high,
                low_inclusive=self.low_inclusive,
            )
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise TypeError(
                    f"The {name!r} parameter of {caller} must be a bool. "
                    f"Got {value!r} of type {type(value).__name__} instead."
                )
            return value
        if self.kind == "choice":
            return check_choice(value, name, caller, self.choices)
        return value


def check_options(
    options: Mapping[str, Any], spec: Mapping[str, Option], caller: str
) -> dict[str, Any]:
    """Validate keyword options against a declared `spec`; unknown names raise ``TypeError``."""
    unknown = [k for k in options if k not in spec]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, list(spec), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(
            f"{caller} got unknown option(s) {', '.join(hints)}. "
            f"Valid options: {', '.join(sorted(spec))}."
        )
    return {k: spec[k].check(v, k, caller) for k, v in options.items()}


def check_finite(x: Any, name: str, *, xp: Any) -> None:
    """Raise ``ValueError`` if the array `x` holds NaN or Inf.

    One summing pass decides the common case (NaN and Inf make the sum non-finite); only a
    non-finite sum, which overflow can also cause, gets the element-wise check.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow: decided below
        total = float(xp.sum(x))
    if math.isfinite(total):
        return
    if not bool(xp.all(xp.isfinite(x))):
        raise ValueError(f"`{name}` contains NaN or Inf; clean or mask it first.")


def warn_not_converged(message: str, *, stacklevel: int = 3) -> None:
    """Emit a :class:`~qapfuse.ConvergenceWarning` pointing at the user's call."""
    warnings.warn(message, ConvergenceWarning, stacklevel=stacklevel)


def callable_or_none(value: Any, name: str, caller: str) -> Callable[..., Any] | None:
    if value is not None and not callable(value):
        raise TypeError(
            f"The {name!r} parameter of {caller} must be callable or None. "
            f"Got {type(value).__name__} instead."
        )
    return value
