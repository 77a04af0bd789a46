r"""Multi-graph matching with guaranteed cycle consistency.

Each of ``m`` graphs gets a matching ``U_i`` (shape ``(n_i, d)``) into a shared *universe* of
``d`` nodes, and every pairwise matching is read off as ``X_ij = U_i U_j^T``. Matchings built this
way agree around every cycle (``X_ij X_jk <= X_ik``), whatever the ``U_i`` are.

* :func:`gamgm` -- graduated assignment in the universe (Koopmans--Beckmann inputs, the same as
  pygmtools' ``gamgm``: adjacency ``A`` of shape ``(m, n, n)``, node similarities ``W`` of shape
  ``(m, m, n, n)``, sizes ``ns``);
* :func:`gamgm_affinity` -- the same solver for general pairwise affinity operators (dense,
  sparse or matrix-free ``K_ij``, anything a :class:`~qapfuse.Problem` holds);
* :func:`synchronize` -- spectral permutation synchronisation of given pairwise matchings (the
  fast consistent baseline, and the default initialiser of :func:`gamgm`);
* :func:`consistency` and :func:`accuracy` -- the fraction of cycle-consistent triples, and
  pairwise accuracy against a ground truth.

The objective of :func:`gamgm` is, over hard universe matchings,

.. math::

    F(U) = \sum_{i<j} \mathrm{vec}(X_{ij})^\top K_{ij} \, \mathrm{vec}(X_{ij}),
    \qquad X_{ij} = U_i U_j^\top,

with, in the Koopmans--Beckmann form, ``K_ij = w kron(A_j, A_i) + diag(vec(Wbar_ij))``
(``w = quad_weight``, ``Wbar_ij = (W_ij + W_ji^T) / 2``), i.e.
``F = sum_{i<j} w <X_ij, A_i X_ij A_j^T> + <X_ij, Wbar_ij>``. pygmtools sums the same terms over
ordered pairs, so its objective is twice this one (plus constants).
"""

from __future__ import annotations

from ._gamgm import OPTIONS, gamgm, gamgm_affinity
from ._metrics import accuracy, consistency
from ._result import MultiMatchResult
from ._sync import synchronize

__all__ = [
    "OPTIONS",
    "MultiMatchResult",
    "accuracy",
    "consistency",
    "gamgm",
    "gamgm_affinity",
    "synchronize",
]
