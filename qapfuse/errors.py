"""Warning classes of qapfuse."""

from __future__ import annotations

__all__ = ["ConvergenceWarning"]


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped at its iteration or time limit before meeting its tolerance."""
