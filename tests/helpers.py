"""Small helpers shared by test modules."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import numpy as np


def brute_force_lawler(K: np.ndarray, n1: int, n2: int) -> tuple[float, list[tuple[int, ...]]]:
    """Best score of vec(X)^T K vec(X) over partial permutations (column-major vec) and argmaxes."""
    best, arg = -np.inf, []
    for cols in itertools.permutations(range(n2), n1):
        idx = np.arange(n1) + np.asarray(cols) * n1
        s = K[np.ix_(idx, idx)].sum()
        if s > best + 1e-9:
            best, arg = s, [cols]
        elif abs(s - best) <= 1e-9:
            arg.append(cols)
    return float(best), arg


def block_walk(
    sizes: Sequence[tuple[int, int]],
    rng: np.random.Generator,
    soft: Callable[[np.ndarray], np.ndarray],
    steps: int = 12,
) -> Iterator[tuple[list[np.ndarray], int]]:
    """Points of a walk of one-block changes from random permutation blocks: ``(X, b)``.

    Each step replaces block ``b`` by a new permutation, or (every third step) by
    ``soft(uniform random matrix)``; every fourth step is then rejected, as a coordinate sweep
    rejects a trial, and the walk yields the point it was tried from once more. For checking
    an operator that keeps state across calls against a fresh one.
    """
    X = [np.eye(n)[rng.permutation(n)] for n, _ in sizes]
    for step in range(steps):
        b = int(rng.integers(len(X)))
        before, X = X, list(X)
        n = X[b].shape[0]
        X[b] = np.eye(n)[rng.permutation(n)] if step % 3 else soft(rng.random((n, n)))
        yield X, b
        if step % 4 == 3:  # a rejected trial: back to the point it was tried from
            X = before
            yield X, b
