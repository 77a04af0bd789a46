"""The default pipeline ("auto"): a continuous start refined by tabu search. PLACEHOLDER."""

from __future__ import annotations

from typing import Any

from .._validation import Option
from ..problem import Problem
from .result import MatchResult

__all__ = ["OPTIONS", "auto"]

OPTIONS: dict[str, Option] = {
    "time_limit": Option("float", low=0, low_inclusive=False, allow_none=True),
    "x0": Option("array", allow_none=True),
    "rng": Option("any", allow_none=True),
}


def auto(problem: Problem, **options: Any) -> MatchResult:
    raise NotImplementedError
