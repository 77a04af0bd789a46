"""Argument checks shared by every public function.

One message template everywhere: *The 'tau' parameter of ga must be a float > 0. Got -1
instead.* Wrong types raise ``TypeError``, wrong values ``ValueError``. Checks run before any
heavy work and never use ``assert``.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import operator
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from .errors import ConvergenceWarning

__all__ = [
    "Option",
    "check_choice",
    "check_finite",
    "check_options",
    "check_scalar",
    "options_of",
    "unknown_options_error",
    "validate_options",
    "warn_not_converged",
]

F = TypeVar("F", bound=Callable[..., Any])


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
        raise unknown_options_error(unknown, spec, caller)
    return {k: spec[k].check(v, k, caller) for k, v in options.items()}


def unknown_options_error(unknown: Iterable[str], valid: Iterable[str], caller: str) -> TypeError:
    """The one message for misspelt options: each unknown name with its closest valid one.

    >>> print(unknown_options_error(["tua0"], ["tau0", "decay"], "ga"))
    ga got unknown option(s) 'tua0' (did you mean 'tau0'?). Valid options: decay, tau0.
    """
    valid = list(valid)
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, valid, n=1)
        hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return TypeError(
        f"{caller} got unknown option(s) {', '.join(hints)}. "
        f"Valid options: {', '.join(sorted(valid))}."
    )


def validate_options(table: Mapping[str, Option]) -> Callable[[F], F]:
    """Decorator: `table` declares the keyword-only parameters of the function it decorates.

    At import, the table must name exactly the function's keyword-only parameters (its
    *options*), and every option whose default is ``None`` must allow ``None``: a parameter
    added to a signature without a constraint, or a constraint left behind for a removed
    parameter, fails loudly. On each call, the options passed are checked against their
    constraints (the values given to the function are the checked ones, e.g. a numpy integer
    becomes an ``int``), and an unknown keyword gets :func:`unknown_options_error`'s message.

    Parameters
    ----------
    table : mapping of str to Option
        The constraints, one per keyword-only parameter.

    Returns
    -------
    callable
        The decorator. :func:`options_of` returns the table of a decorated function.

    Raises
    ------
    TypeError
        At decoration, if the table and the signature disagree.

    Examples
    --------
    >>> @validate_options({"tol": Option("float", low=0, low_inclusive=False)})
    ... def f(x, *, tol=1e-3):
    ...     return x
    >>> f(1, tol=-1)
    Traceback (most recent call last):
    ...
    ValueError: The 'tol' parameter of f must be a float > 0. Got -1 instead.
    >>> f(1, tl=1)
    Traceback (most recent call last):
    ...
    TypeError: f got unknown option(s) 'tl' (did you mean 'tol'?). Valid options: tol.
    """

    def decorate(func: F) -> F:
        # "Problem.from_dense" for a method; a function defined in a function keeps its name
        caller = func.__name__ if "<locals>" in func.__qualname__ else func.__qualname__
        params = inspect.signature(func).parameters
        options = [p for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        names = {p.name for p in options}
        missing = [p.name for p in options if p.name not in table]
        extra = [k for k in table if k not in names]
        if missing or extra:
            raise TypeError(
                f"The option table of {caller} must declare exactly its keyword-only "
                f"parameters; without a constraint: {missing or 'none'}, "
                f"not in the signature: {extra or 'none'}."
            )
        for p in options:
            if p.default is None and not table[p.name].allow_none:
                raise TypeError(
                    f"The option {p.name!r} of {caller} defaults to None; its constraint must "
                    "say allow_none=True."
                )
        frozen = MappingProxyType({p.name: table[p.name] for p in options})

        @functools.wraps(func)
        def checked(*args: Any, **kwargs: Any) -> Any:
            unknown = [k for k in kwargs if k not in params]
            if unknown:
                raise unknown_options_error(unknown, frozen, caller)
            for k, v in kwargs.items():
                if k in frozen:
                    kwargs[k] = frozen[k].check(v, k, caller)
            return func(*args, **kwargs)

        checked._qapfuse_options = frozen  # type: ignore[attr-defined]
        return checked  # type: ignore[return-value]

    return decorate


def options_of(func: Callable[..., Any]) -> Mapping[str, Option]:
    """The option table of a function decorated with :func:`validate_options` (read-only).

    Raises
    ------
    TypeError
        If `func` declares no option table.
    """
    table = getattr(func, "_qapfuse_options", None)
    if table is None:
        raise TypeError(f"{getattr(func, '__name__', func)!r} declares no option table.")
    return table


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


_PACKAGE_DIR = str(Path(__file__).resolve().parent) + os.sep


def warn_not_converged(message: str, *, stacklevel: int | None = None) -> None:
    """Emit a :class:`~qapfuse.ConvergenceWarning` pointing at the user's call.

    By default the warning points at the innermost frame outside the qapfuse package, however
    many qapfuse functions (and decorators) lie between; an explicit `stacklevel` overrides.
    """
    if stacklevel is None:
        stacklevel = _user_stacklevel()
    warnings.warn(message, ConvergenceWarning, stacklevel=stacklevel)


def _user_stacklevel() -> int:
    """``stacklevel`` (as seen by ``warn_not_converged``) of the first frame outside qapfuse."""
    frame, level = sys._getframe(2), 2  # 1: warn_not_converged, 2: its caller
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(
        _PACKAGE_DIR
    ):
        frame, level = frame.f_back, level + 1
    return level


def callable_or_none(value: Any, name: str, caller: str) -> Callable[..., Any] | None:
    if value is not None and not callable(value):
        raise TypeError(
            f"The {name!r} parameter of {caller} must be callable or None. "
            f"Got {type(value).__name__} instead."
        )
    return value
