"""Problem -> per-instance numpy data for the local searches, and permutations -> matchings.

A problem is turned into one :class:`Instance` per batch entry, in the minimisation form of
:mod:`qapfuse.solvers._local_kernels` (Koopmans--Beckmann ``F, D, C`` or a dense Lawler ``K``),
padded with dummy rows when ``n1 < n2``. The dense-``K`` limit is passed in by the local-search
runner (its ``DENSE_MAX_BYTES``, read at call time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import backend
from ..problem import (
    ConstantAffinity,
    KoopmansBeckmannAffinity,
    LinearAffinity,
    Problem,
    SumAffinity,
    dense_nbytes,
)
from ._common import hard_projection, initial_soft
from ._local_kernels import _DENSE, _EMPTY2, _KB, _KB_SYM, _cost

# ----------------------------------------------------------------------------------------------
# Problem -> per-instance data
# ----------------------------------------------------------------------------------------------


@dataclass
class Instance:
    """One instance in minimisation form over permutations of ``n`` (= n2) rows."""

    mode: int
    n1: int
    n: int
    F: np.ndarray
    FT: np.ndarray
    D: np.ndarray
    C: np.ndarray
    K: np.ndarray
    tol: float

    def state(self, p: np.ndarray) -> tuple[Any, ...]:
        """Kernel arguments for a search at permutation `p` (KB: fresh ``G = D[p][:, p]``)."""
        if self.mode != _DENSE:
            G = np.ascontiguousarray(self.D[np.ix_(p, p)])
            GT = np.ascontiguousarray(G.T)
        else:
            G = GT = _EMPTY2
        return (self.mode, self.F, self.FT, G, GT, self.C, self.K, self.n1)

    def cost(self, p: np.ndarray) -> float:
        args = self.state(p)
        return float(_cost(self.mode, self.F, args[3], self.C, self.K, self.n1, p))


def _split_kb(problem: Problem) -> tuple[KoopmansBeckmannAffinity, list[LinearAffinity]] | None:
    aff = problem.affinity
    terms = aff.terms if isinstance(aff, SumAffinity) else [aff]
    kb = [t for t in terms if isinstance(t, KoopmansBeckmannAffinity)]
    lin = [t for t in terms if isinstance(t, LinearAffinity)]
    const = [t for t in terms if isinstance(t, ConstantAffinity)]
    if len(kb) == 1 and len(kb) + len(lin) + len(const) == len(terms):
        return kb[0], lin
    return None


def local_search_form(problem: Problem, max_bytes: int) -> str | None:
    """``"kb"``, ``"dense"`` or ``None``: which local-search path `problem` can take."""
    if _split_kb(problem) is not None:
        return "kb"
    if dense_nbytes(problem.batch, problem.n1max, problem.n2max) <= max_bytes:
        return "dense"
    return None


def _tolerance(scale: float) -> float:
    return 1e-9 * max(scale, 1e-300)


def instances(problem: Problem, caller: str, max_bytes: int) -> list[Instance]:
    """Per-instance minimisation data (numpy float64), converted from the problem once."""
    split = _split_kb(problem)
    out: list[Instance] = []
    if split is not None:
        kb, lin = split
        A = backend.to_numpy(kb.A).astype(np.float64)
        B = backend.to_numpy(kb.B).astype(np.float64)
        L = None
        for t in lin:
            Lt = backend.to_numpy(t.L).astype(np.float64)
            L = Lt if L is None else L + Lt
        for k in range(problem.batch):
            n1, n = int(problem.n1[k]), int(problem.n2[k])
            F = np.zeros((n, n))
            F[:n1, :n1] = A[k, :n1, :n1]
            D = np.ascontiguousarray(-kb.weight * B[k, :n, :n])
            C = np.zeros((n, n))
            if L is not None:
                C[:n1, :n] = -L[k, :n1, :n]
            scale = np.abs(F).max(initial=0) * np.abs(D).max(initial=0) * max(n, 1)
            scale += np.abs(C).max(initial=0)
            FT = np.ascontiguousarray(F.T)
            mode = _KB_SYM if np.array_equal(F, FT) and np.array_equal(D, D.T) else _KB
            out.append(Instance(mode, n1, n, F, FT, D, C, _EMPTY2, _tolerance(scale)))
        return out
    need = dense_nbytes(problem.batch, problem.n1max, problem.n2max)
    if need > max_bytes:
        raise TypeError(
            f"{caller} supports Koopmans-Beckmann problems (Problem.koopmans_beckmann: one "
            "KoopmansBeckmannAffinity, optionally plus LinearAffinity/ConstantAffinity terms) "
            "and problems whose dense K fits in DENSE_MAX_BYTES "
            f"({max_bytes:,} bytes; set QAPFUSE_DENSE_MAX_BYTES). This problem's "
            f"{type(problem.affinity).__name__} would need {need:,} bytes as a dense K. Use a "
            "continuous solver (ga, ipfp, rrwm) instead."
        )
    Kall = backend.to_numpy(problem.to_dense(max_bytes=max_bytes)).astype(np.float64)
    n1max = problem.n1max
    for k in range(problem.batch):
        n1, n = int(problem.n1[k]), int(problem.n2[k])
        sel = (np.arange(n1)[:, None] + n1max * np.arange(n)[None, :]).T.ravel()
        Kk = np.ascontiguousarray(Kall[k][np.ix_(sel, sel)])
        scale = np.abs(Kk).max(initial=0) * max(n1, 1) * 4
        out.append(
            Instance(_DENSE, n1, n, _EMPTY2, _EMPTY2, _EMPTY2, _EMPTY2, Kk, _tolerance(scale))
        )
    return out


# ----------------------------------------------------------------------------------------------
# Starts and results
# ----------------------------------------------------------------------------------------------


def start_perms(
    problem: Problem, x0: Any, gen: np.random.Generator, caller: str
) -> list[np.ndarray]:
    """Permutations of n2[k] per instance: rounded `x0` (Hungarian) or random."""
    perms = []
    if x0 is None:
        for k in range(problem.batch):
            perms.append(gen.permutation(int(problem.n2[k])).astype(np.int64))
        return perms
    X0 = initial_soft(problem, x0, caller)
    return perms_from_hard(problem, backend.to_numpy(hard_projection(problem, X0)))


def perms_from_hard(problem: Problem, H: np.ndarray) -> list[np.ndarray]:
    """Permutations of n2[k] from hard matchings `H` (b, n1max, n2max): dummy rows take the
    unmatched columns in increasing order."""
    perms = []
    for k in range(problem.batch):
        n1, n = int(problem.n1[k]), int(problem.n2[k])
        p = np.empty(n, dtype=np.int64)
        p[:n1] = np.argmax(H[k, :n1, :n], axis=1) if n1 else []
        used = np.zeros(n, dtype=bool)
        used[p[:n1]] = True
        p[n1:] = np.nonzero(~used)[0]
        perms.append(p)
    return perms


def perms_to_X(problem: Problem, perms: list[np.ndarray]) -> Any:
    X = np.zeros((problem.batch, problem.n1max, problem.n2max), dtype=np.float64)
    for k, p in enumerate(perms):
        n1 = int(problem.n1[k])
        X[k, np.arange(n1), p[:n1]] = 1.0
    return backend.asarray_on(X, xp=problem.xp, device=problem.device)
