"""Local search for QAPs: 2-opt and robust tabu search (Numba). PLACEHOLDER: being written."""

from __future__ import annotations

from typing import Any

from .._validation import Option
from ..problem import Problem
from .result import MatchResult

__all__ = ["OPTIONS_TABU", "OPTIONS_TWO_OPT", "tabu", "two_opt"]

OPTIONS_TWO_OPT: dict[str, Option] = {
    "strategy": Option("choice", choices=("first", "best")),
    "max_iter": Option("int", low=1, allow_none=True),
    "time_limit": Option("float", low=0, low_inclusive=False, allow_none=True),
    "x0": Option("array", allow_none=True),
    "rng": Option("any", allow_none=True),
}

OPTIONS_TABU: dict[str, Option] = {
    "max_iter": Option("int", low=1, allow_none=True),
    "time_limit": Option("float", low=0, low_inclusive=False, allow_none=True),
    "x0": Option("array", allow_none=True),
    "rng": Option("any", allow_none=True),
}


def two_opt(problem: Problem, **options: Any) -> MatchResult:
    raise NotImplementedError


def tabu(problem: Problem, **options: Any) -> MatchResult:
    raise NotImplementedError
