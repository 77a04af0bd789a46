r"""GAMF's neuron similarity (``kernel="node"``), recomputed only where the matchings changed.

For a free group ``g`` and models ``p, q``, neuron ``i`` of ``p`` and neuron ``a`` of ``q`` are
compared over their incoming weights (``q``'s inputs mapped into ``p``'s order by the current
matching of the input group), their outgoing weights (``q``'s outputs mapped likewise) and
their node features:

.. math::

    d_{ia} = \|u_i\|^2 + \|v_a\|^2 - 2 \sum_e \langle u^e_i, v^e_a \rangle, \qquad
    S_{ia} = e^{-d_{ia}/2} \big/ \operatorname{mean}(e^{-d/2}),

one "piece" ``e`` per edge set touching ``g``. A piece depends on the matching of one
neighbouring group only, so each piece's cross products and norms are kept under the version
of that matching: after one block changes, only the pieces next to it are recomputed (a
coordinate sweep's trial costs one or two pieces, not the whole network).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import numpy as np
import torch

__all__ = ["BlockVersions", "NodeSimilarity"]

#: Values kept per cache entry: a coordinate sweep's trial and the point it was tried from.
_KEEP = 2


class BlockVersions:
    """A version number per block that changes exactly when the block's values change.

    Each block's last few distinct values are kept (copies); a block equal to one of them gets
    that version back (reverting a rejected trial costs nothing), otherwise a new one.
    Comparing with a stored copy reads the block once and stops at the first difference.
    """

    def __init__(self, n_blocks: int, keep: int = 3):
        self.seen: list[list[tuple[np.ndarray, int]]] = [[] for _ in range(n_blocks)]
        self.keep, self.next = keep, 0

    def __call__(self, X: Sequence[np.ndarray]) -> list[int]:
        out = []
        for b, x in enumerate(X):
            x = np.asarray(x)
            seen = self.seen[b]
            hit = next((k for k, (old, _) in enumerate(seen) if np.array_equal(old, x)), None)
            if hit is None:
                seen.insert(0, (x.copy(), self.next))
                self.next += 1
                del seen[self.keep :]
            else:
                seen.insert(0, seen.pop(hit))
            out.append(seen[0][1])
        return out


class NodeSimilarity:
    """GAMF's neuron similarity of every free group and model pair (see the module notes).

    Parameters
    ----------
    edges : list of (out_group, in_group, key, list of Tensor (n_o, n_in, f))
        The edge sets (:class:`~qapfuse.fusion._network_qap.NetData`'s ``edges``).
    nodes : dict of str to list of Tensor (n_g, f)
        Node features per group and model.
    """

    def __init__(self, edges: Sequence[tuple], nodes: dict[str, list[torch.Tensor]]):
        self.edges, self.nodes = edges, nodes
        # pieces of g: (edge index, incoming?, the group whose matching maps q's side)
        self.pieces: dict[str, list[tuple[int, bool, str]]] = {}
        for n, (o, i, _, _) in enumerate(edges):
            self.pieces.setdefault(o, []).append((n, True, i))
            self.pieces.setdefault(i, []).append((n, False, o))
        self._rows: dict[tuple[int, int, bool], torch.Tensor] = {}
        self._u2: dict[tuple[int, str], torch.Tensor] = {}
        self._piece_cache: dict[tuple, dict[Hashable, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._S_cache: dict[tuple, dict[Hashable, torch.Tensor]] = {}

    def neighbours(self, g: str) -> set[str]:
        """Groups whose matchings enter the similarity of `g`."""
        return {h for _, _, h in self.pieces.get(g, [])}

    def __call__(
        self,
        p: int,
        q: int,
        g: str,
        matching: Callable[[str], torch.Tensor | None],
        version: Callable[[str], Hashable] | None = None,
    ) -> torch.Tensor:
        """``S`` of shape ``(n_g, n_g)`` between models `p` and `q`.

        Parameters
        ----------
        matching : callable
            ``matching(h)``: the matching ``X_pq^h`` of group ``h`` (None for the identity).
        version : callable, optional
            ``version(h)``: a value that changes whenever ``matching(h)`` does; with it, pieces
            and ``S`` are reused while their matchings are unchanged. Without it, everything
            is recomputed.
        """
        pieces = self.pieces.get(g, [])
        sigs = [None if version is None else version(h) for _, _, h in pieces]
        if version is not None:
            hit = _lookup(self._S_cache, (p, q, g), tuple(sigs))
            if hit is not None:
                return hit
        u2 = self._norms(p, g)
        v2 = torch.zeros_like(u2)
        cross = torch.zeros((u2.shape[0], u2.shape[0]), dtype=u2.dtype)
        for (n, incoming, h), sig in zip(pieces, sigs):
            key = (p, q, n, incoming)
            part = None if version is None else _lookup(self._piece_cache, key, sig)
            if part is None:
                part = self._piece(p, q, n, incoming, matching(h))
                if version is not None:
                    _store(self._piece_cache, key, sig, part)
            cross += part[0]
            v2 += part[1]
        if g in self.nodes:
            Fp, Fq = self.nodes[g][p], self.nodes[g][q]
            cross += Fp @ Fq.T
            v2 += (Fq**2).sum(1)
        logS = -0.5 * (u2[:, None] + v2[None, :] - 2.0 * cross).clamp_min(0.0)
        S = torch.exp(logS - (torch.logsumexp(logS.reshape(-1), 0) - np.log(logS.numel())))
        if version is not None:
            _store(self._S_cache, (p, q, g), tuple(sigs), S)
        return S

    def _piece(
        self, p: int, q: int, n: int, incoming: bool, Y: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U V^T, ||v||^2)`` of one edge set: ``q``'s side mapped by `Y` into ``p``'s order."""
        F = self.edges[n][3][q]
        perm = _permutation(Y)
        if incoming:  # rows: neurons of the output group; q's inputs mapped
            if perm is not None:  # a hard matching maps by indexing, O(size) not O(n^3)
                mapped = F[:, perm]
            else:
                mapped = F if Y is None else torch.einsum("jb,abf->ajf", Y, F)
            V = mapped.reshape(mapped.shape[0], -1)
        else:  # rows: neurons of the input group; q's outputs mapped
            if perm is not None:
                mapped = F[perm]
            else:
                mapped = F if Y is None else torch.einsum("ia,abf->ibf", Y, F)
            V = mapped.transpose(0, 1).reshape(mapped.shape[1], -1)
        U = self._neuron_rows(p, n, incoming)
        return U @ V.T, (V**2).sum(1)

    def _neuron_rows(self, p: int, n: int, incoming: bool) -> torch.Tensor:
        """Model `p`'s neurons as rows of one edge set's weights (built once)."""
        key = (p, n, incoming)
        if key not in self._rows:
            F = self.edges[n][3][p]
            U = F.reshape(F.shape[0], -1) if incoming else F.transpose(0, 1).reshape(F.shape[1], -1)
            self._rows[key] = U.contiguous()
        return self._rows[key]

    def _norms(self, p: int, g: str) -> torch.Tensor:
        """``||u_i||^2`` of model `p`'s neurons of `g` over all pieces and node features."""
        if (p, g) not in self._u2:
            self._u2[(p, g)] = self._norms_of(p, g)
        return self._u2[(p, g)]

    def _norms_of(self, p: int, g: str) -> torch.Tensor:
        u2 = None
        for n, incoming, _ in self.pieces.get(g, []):
            s = (self._neuron_rows(p, n, incoming) ** 2).sum(1)
            u2 = s if u2 is None else u2 + s
        if g in self.nodes:
            s = (self.nodes[g][p] ** 2).sum(1)
            u2 = s if u2 is None else u2 + s
        return u2


def _lookup(cache: dict, key: Hashable, sig: Hashable):
    entries = cache.get(key)
    if entries is None or sig not in entries:
        return None
    entries[sig] = entries.pop(sig)  # most recently used last
    return entries[sig]


def _store(cache: dict, key: Hashable, sig: Hashable, value) -> None:
    entries = cache.setdefault(key, {})
    entries[sig] = value
    while len(entries) > _KEEP:
        entries.pop(next(iter(entries)))


def _permutation(Y: torch.Tensor | None) -> torch.Tensor | None:
    """``perm`` with ``Y[j, perm[j]] = 1`` when `Y` is a permutation matrix, else None."""
    if Y is None or Y.shape[0] != Y.shape[1]:
        return None
    perm = Y.argmax(1)
    if int(torch.count_nonzero(Y)) != Y.shape[0]:
        return None
    if not bool((Y[torch.arange(Y.shape[0]), perm] == 1).all()):
        return None
    if not bool((torch.bincount(perm, minlength=Y.shape[0]) == 1).all()):
        return None
    return perm
