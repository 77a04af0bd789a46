"""Input checks of the affinity builders: one pass over the graphs, then the options.

:func:`check_graphs` turns the ten pygmtools-style graph arguments of
:func:`~qapfuse.affinity.build_aff_mat` into :class:`CheckedGraphs`: one array library, a batch
axis on everything, float64 features, int64 connectivity with each instance's edges sorted by
``(start, end)`` and de-duplicated, and the node counts of every instance. The option checks
below it take those graphs and the caller's name, so that every message names the function the
user called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import backend
from .. import problem as _problem
from .._validation import check_scalar
from ..backend import Array

__all__ = [
    "FORMATS",
    "CheckedGraphs",
    "GraphSide",
    "check_candidates",
    "check_dense_budget",
    "check_graphs",
    "check_operator_options",
    "check_threshold",
    "dedupe_edges",
    "storage_dtype",
    "symmetric_graphs",
]

FORMATS = ("dense", "sparse", "operator")


@dataclass
class GraphSide:
    """One graph of every instance, validated: per-instance edges sorted and de-duplicated."""

    node: Array | None  # (b, nmax, dn) float64 (numpy or torch) or None
    conn: list[Any]  # per instance (ne_k, 2) int64, sorted by (start, end), unique
    feat: list[Any]  # per instance (ne_k, de) float64, same order
    n: np.ndarray  # (b,) int64 node counts
    nmax: int


@dataclass
class CheckedGraphs:
    """Both graphs of every instance, as :func:`check_graphs` returns them."""

    xp: Any
    torch: bool
    batched: bool
    batch: int
    g1: GraphSide
    g2: GraphSide
    has_node: bool
    has_edge: bool


def _as_array(x: Any, name: str, caller: str, xp: Any) -> Array:
    if backend.is_sparse(x):
        raise TypeError(f"`{name}` in {caller} must be a dense array; got a sparse matrix.")
    return xp.asarray(x)


def _float_feat(x: Array, name: str, caller: str, xp: Any) -> Array:
    if not (xp.isdtype(x.dtype, "real floating") or xp.isdtype(x.dtype, ("integral", "bool"))):
        raise TypeError(f"`{name}` in {caller} must hold real numbers; got dtype {x.dtype}.")
    x = xp.astype(x, xp.float64)
    if not bool(xp.all(xp.isfinite(x))):
        raise ValueError(f"`{name}` in {caller} contains NaN or Inf; clean or mask it first.")
    return x


def check_graphs(
    node_feat1: Any,
    edge_feat1: Any,
    connectivity1: Any,
    node_feat2: Any,
    edge_feat2: Any,
    connectivity2: Any,
    n1: Any,
    ne1: Any,
    n2: Any,
    ne2: Any,
    *,
    caller: str,
) -> CheckedGraphs:
    """Validate the graph arguments of a builder (see :func:`~qapfuse.affinity.build_aff_mat`).

    Raises
    ------
    TypeError
        Mixed array libraries, a sparse matrix, non-real features or non-integer connectivity.
    ValueError
        Missing halves of a node or edge term, wrong shapes, a batch axis on some inputs only,
        NaN/Inf features, feature lengths that differ between the graphs, or node indices
        outside a graph.
    """
    arrays = [node_feat1, edge_feat1, connectivity1, node_feat2, edge_feat2, connectivity2]
    xp = backend.namespace_of(
        *[a for a in arrays if a is not None],
        name="node_feat1, edge_feat1, connectivity1, node_feat2, edge_feat2, connectivity2",
    )
    is_torch = any(backend.is_torch_array(a) for a in arrays if a is not None)
    has_node = node_feat1 is not None or node_feat2 is not None
    if has_node and (node_feat1 is None or node_feat2 is None):
        missing = "node_feat2" if node_feat2 is None else "node_feat1"
        raise ValueError(
            f"{caller}: node features need both node_feat1 and node_feat2; `{missing}` is None."
        )
    edge_args = {
        "edge_feat1": edge_feat1,
        "connectivity1": connectivity1,
        "edge_feat2": edge_feat2,
        "connectivity2": connectivity2,
    }
    has_edge = any(v is not None for v in edge_args.values())
    if has_edge:
        missing = [k for k, v in edge_args.items() if v is None]
        if missing:
            raise ValueError(
                f"{caller}: edge affinities need edge_feat1, connectivity1, edge_feat2 and "
                f"connectivity2; {', '.join(f'`{m}`' for m in missing)} "
                f"{'is' if len(missing) == 1 else 'are'} None."
            )
    if not has_node and not has_edge:
        raise ValueError(f"{caller} needs node features, edge features, or both; all are None.")

    batched: bool | None = None
    batch: int | None = None

    def batch_of(x: Array, nd: int, name: str) -> Array:
        nonlocal batched, batch
        if x.ndim == nd:
            this, x = False, x[None, ...]
        elif x.ndim == nd + 1:
            this = True
        else:
            shape = {"c": "(ne, 2)", "e": "(ne, d)"}.get(name[0], "(n, d)")
            raise ValueError(
                f"`{name}` in {caller} must have shape {shape} or with a batch axis "
                f"(b, {shape[1:]}; got shape {tuple(x.shape)}."
            )
        if batched is None:
            batched, batch = this, int(x.shape[0])
        elif batched != this:
            raise ValueError(
                f"{caller}: `{name}` has {'a' if this else 'no'} batch axis but the arguments "
                f"before it have {'none' if this else 'one'}; give all inputs a batch axis or "
                "none."
            )
        elif int(x.shape[0]) != batch:
            raise ValueError(
                f"{caller}: `{name}` has batch size {int(x.shape[0])}, the arguments before it "
                f"{batch}."
            )
        return x

    nodes: list[Array | None] = [None, None]
    if has_node:
        for s, (x, nm) in enumerate(((node_feat1, "node_feat1"), (node_feat2, "node_feat2"))):
            x = _as_array(x, nm, caller, xp)
            x = batch_of(x, 2, nm)
            nodes[s] = _float_feat(x, nm, caller, xp)
        d1, d2 = nodes[0].shape[-1], nodes[1].shape[-1]
        if d1 != d2:
            raise ValueError(
                f"{caller}: `node_feat1` has {d1} features per node and `node_feat2` has {d2}; "
                "they must match."
            )
    edges: list[tuple[Array, Array] | None] = [None, None]
    if has_edge:
        for s, (f, c, fn, cn) in enumerate(
            (
                (edge_feat1, connectivity1, "edge_feat1", "connectivity1"),
                (edge_feat2, connectivity2, "edge_feat2", "connectivity2"),
            )
        ):
            c = _as_array(c, cn, caller, xp)
            f = _as_array(f, fn, caller, xp)
            if not xp.isdtype(c.dtype, "integral"):
                raise TypeError(
                    f"`{cn}` in {caller} must hold integer node indices; got dtype {c.dtype}."
                )
            if c.ndim in (2, 3) and c.shape[-1] != 2:
                hint = (
                    " It looks transposed (a (2, ne) edge index): pass its transpose."
                    if c.shape[-2] == 2
                    else ""
                )
                raise ValueError(
                    f"`{cn}` in {caller} must have shape (ne, 2) or (b, ne, 2) (start and end "
                    f"node of each edge); got shape {tuple(c.shape)}.{hint}"
                )
            if f.ndim == c.ndim - 1:  # one scalar feature per edge
                f = f[..., None]
            c = batch_of(c, 2, cn)
            f = batch_of(f, 2, fn)
            if f.shape[1] != c.shape[1]:
                raise ValueError(
                    f"{caller}: `{fn}` has {f.shape[1]} edges but `{cn}` has {c.shape[1]}; "
                    "there must be one feature row per edge."
                )
            edges[s] = (_float_feat(f, fn, caller, xp), xp.astype(c, xp.int64))
        d1, d2 = edges[0][0].shape[-1], edges[1][0].shape[-1]
        if d1 != d2:
            raise ValueError(
                f"{caller}: `edge_feat1` has {d1} features per edge and `edge_feat2` has {d2}; "
                "they must match."
            )
    assert batch is not None and batched is not None  # set by the first array above
    sides = []
    for s, (n, ne, nm, nem) in enumerate(((n1, ne1, "n1", "ne1"), (n2, ne2, "n2", "ne2"))):
        node, edge = nodes[s], edges[s]
        ecount = int(edge[1].shape[1]) if edge is not None else 0
        ne_arr = _problem._sizes(ne, nem, batch, ecount, caller)
        ne_arr = np.full(batch, ecount, np.int64) if ne_arr is None else ne_arr
        if node is not None:
            nmax = int(node.shape[1])
            n_arr = _problem._sizes(n, nm, batch, nmax, caller)
        else:
            n_arr = _problem._sizes(n, nm, batch, None, caller)
            if n_arr is not None:
                nmax = int(n_arr.max()) if batch else 0
            else:
                tops = [
                    int(xp.max(edge[1][k, : ne_arr[k], :])) + 1 if ne_arr[k] else 0
                    for k in range(batch)
                ]
                n_arr = np.asarray(tops, dtype=np.int64)
                nmax = int(n_arr.max()) if batch else 0
        n_arr = np.full(batch, nmax, np.int64) if n_arr is None else n_arr
        conns, feats = [], []
        if edge is not None:
            f_all, c_all = edge
            cname = f"connectivity{s + 1}"
            for k in range(batch):
                c = c_all[k, : ne_arr[k], :]
                if ne_arr[k]:
                    lo, hi = int(xp.min(c)), int(xp.max(c))
                    if lo < 0 or hi >= n_arr[k]:
                        bad = lo if lo < 0 else hi
                        where = f" of instance {k}" if batched else ""
                        raise ValueError(
                            f"`{cname}`{where} in {caller} holds node index {bad}, outside "
                            f"[0, {int(n_arr[k])}) for a graph of {int(n_arr[k])} nodes "
                            f"(`{nm}`)."
                        )
                cs, fs = dedupe_edges(c, f_all[k, : ne_arr[k], :], int(nmax), xp=xp)
                conns.append(cs)
                feats.append(fs)
        sides.append(GraphSide(node=node, conn=conns, feat=feats, n=n_arr, nmax=int(nmax)))
    return CheckedGraphs(
        xp=xp,
        torch=is_torch,
        batched=batched,
        batch=batch,
        g1=sides[0],
        g2=sides[1],
        has_node=has_node,
        has_edge=has_edge,
    )


def dedupe_edges(c: Array, f: Array, nmax: int, *, xp: Any) -> tuple[Array, Array]:
    """Sort edges by (start, end) and keep the last of duplicates (pygmtools' write order)."""
    if c.shape[0] == 0:
        return c, f
    key = c[:, 0] * max(nmax, 1) + c[:, 1]
    if backend.is_torch_array(c):
        order = xp.argsort(key, stable=True)
    else:
        order = np.argsort(key, kind="stable")
    sk = xp.take(key, order)
    last = xp.concat([sk[1:] != sk[:-1], xp.ones(1, dtype=xp.bool, device=backend.device(c))])
    keep = order[last]
    return xp.take(c, keep, axis=0), xp.take(f, keep, axis=0)


def symmetric_graphs(g: CheckedGraphs) -> bool:
    """True if every edge has its reverse with the same features in both graphs (K = K^T)."""
    if not g.has_edge:
        return True
    xp = g.xp
    for s in (g.g1, g.g2):
        for c, f in zip(s.conn, s.feat):
            if c.shape[0] == 0:
                continue
            rev = xp.stack([c[:, 1], c[:, 0]], axis=1)
            rc, rf = dedupe_edges(rev, f, s.nmax, xp=xp)
            if c.shape != rc.shape or not bool(xp.all(rc == c)) or not bool(xp.all(rf == f)):
                return False
    return True


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------


def storage_dtype(dtype: Any, g: CheckedGraphs, caller: str) -> Any:
    """Storage dtype of ``K`` in the input's library: float32 unless float64 is asked for."""
    name = "float32" if dtype is None else str(dtype).replace("torch.", "")
    if name not in ("float32", "float64"):
        raise ValueError(
            f"The 'dtype' parameter of {caller} must be 'float32' or 'float64' (or the numpy / "
            f"torch dtype). Got {dtype!r} instead."
        )
    if g.torch:
        return getattr(backend._torch(), name)
    return np.dtype(name)


def check_threshold(threshold: float, format: str, caller: str) -> None:
    """`threshold` is a float >= 0, and positive only with ``format="sparse"``."""
    check_scalar(threshold, "threshold", caller, low=0, low_inclusive=True)
    if threshold > 0 and format != "sparse":
        raise ValueError(
            f"The 'threshold' parameter of {caller} applies to format='sparse' only; got "
            f"threshold={threshold} with format={format!r}."
        )


def check_candidates(k: int | None, format: str, g: CheckedGraphs, caller: str) -> None:
    """`candidates` is None, or an int >= 1 with sparse format, numpy input and node features."""
    if k is None:
        return
    check_scalar(k, "candidates", caller, integer=True, low=1, low_inclusive=True)
    if format != "sparse":
        raise ValueError(
            f"The 'candidates' parameter of {caller} applies to format='sparse' only; got "
            f"candidates={k} with format={format!r}."
        )
    if g.torch:
        raise TypeError(
            f"The 'candidates' parameter of {caller} needs numpy inputs; got torch tensors "
            "(build the full K, or convert the features with .cpu().numpy())."
        )
    if not g.has_node:
        raise ValueError(
            f"The 'candidates' parameter of {caller} ranks pairs by node affinity and needs "
            "node_feat1 and node_feat2; both are None."
        )


def check_operator_options(tol: float, max_terms: int, caller: str) -> None:
    """`tol` > 0 and `max_terms` >= 1 (the Gaussian expansion of ``format="operator"``)."""
    check_scalar(tol, "tol", caller)
    check_scalar(max_terms, "max_terms", caller, integer=True, low=1, low_inclusive=True)


def check_dense_budget(g: CheckedGraphs, itemsize: int, max_bytes: int | None, caller: str) -> None:
    """Refuse a dense ``K`` over `max_bytes` (default ``problem.DENSE_MAX_BYTES``).

    Raises
    ------
    MemoryError
        With the byte count and the formats that need less.
    """
    limit = _problem.DENSE_MAX_BYTES if max_bytes is None else max_bytes
    need = _problem.dense_nbytes(g.batch, g.g1.nmax, g.g2.nmax, itemsize)
    if need > limit:
        raise MemoryError(
            f"{caller}: a dense K for batch={g.batch}, n1max={g.g1.nmax}, n2max={g.g2.nmax} "
            f"needs {need:,} bytes, more than the limit of {limit:,} bytes (max_bytes / "
            "QAPFUSE_DENSE_MAX_BYTES). Use format='sparse' (stores only the edge pairs) or "
            "format='operator' (never builds K)."
        )
