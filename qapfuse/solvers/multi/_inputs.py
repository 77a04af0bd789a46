"""Input checks of the multi-graph functions, and parsing of pairwise matchings into blocks."""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral
from typing import Any

import numpy as np

from ... import backend
from ..._validation import check_scalar
from ...backend import Array
from ._pairwise import _pad2, _pair_indices, _scatter_pairs
from ._result import MultiMatchResult


def _row_mask(ns: np.ndarray, r: int) -> np.ndarray:
    return np.arange(r)[None, :] < ns[:, None]


def _check_schedule(opts: dict[str, Any], caller: str) -> None:
    if opts["tau_min"] > opts["tau0"]:
        raise ValueError(
            f"The 'tau_min' parameter of {caller} must be <= tau0; got tau_min="
            f"{opts['tau_min']}, tau0={opts['tau0']}."
        )


def _check_sizes(ns: Any, m: int, n: int, caller: str) -> np.ndarray:
    if ns is None:
        return np.full(m, n, dtype=np.int64)
    if backend.is_torch_array(ns) or hasattr(ns, "__array_namespace__"):
        ns = backend.to_numpy(ns)
    arr = np.asarray(ns)
    if arr.dtype.kind not in "iu" and not (
        arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))
    ):
        raise TypeError(f"`ns` in {caller} must hold ints; got dtype {arr.dtype}.")
    arr = arr.astype(np.int64)
    if arr.shape != (m,):
        raise ValueError(f"`ns` in {caller} must have shape (m,) = ({m},); got {arr.shape}.")
    if np.any(arr < 1) or np.any(arr > n):
        raise ValueError(
            f"`ns` in {caller} must lie in [1, n] = [1, {n}] (the padded size); got {arr.tolist()}."
        )
    return arr


def _check_universe(ns: np.ndarray, d: Any, caller: str) -> int:
    nmax = int(ns.max())
    if d is None:
        return nmax
    if backend.is_torch_array(d) or isinstance(d, np.ndarray):
        d = int(backend.to_numpy(d).item())
    check_scalar(d, "n_univ", caller, integer=True, low=1, low_inclusive=True)
    if d < nmax:
        raise ValueError(
            f"The 'n_univ' parameter of {caller} must be >= the largest graph (max(ns) = "
            f"{nmax}); got {d}."
        )
    if d > nmax and np.all(ns == nmax):
        raise ValueError(
            f"All graphs of {caller} are full ({nmax} nodes each), so the universe must be "
            f"square: n_univ = {nmax}; got {d}. A larger universe needs partial graphs (pass "
            "`ns` with some n_i < n_univ)."
        )
    return int(d)


def _float(x: Array, name: str, caller: str, *, xp: Any) -> Array:
    if not xp.isdtype(x.dtype, "real floating"):
        if xp.isdtype(x.dtype, ("integral", "bool")):
            return xp.astype(x, xp.float64)
        raise TypeError(f"`{name}` in {caller} must be real; got dtype {x.dtype}.")
    return x


def _check_kb(
    A: Any, W: Any, ns: Any, n_univ: Any, caller: str, *, xp: Any
) -> tuple[Array, Array | None, np.ndarray, int]:
    A = _float(xp.asarray(A), "A", caller, xp=xp)
    if A.ndim != 3 or A.shape[1] != A.shape[2]:
        raise ValueError(f"`A` in {caller} must have shape (m, n, n); got {tuple(A.shape)}.")
    m, n = A.shape[0], A.shape[1]
    if m < 2:
        raise ValueError(f"{caller} needs at least 2 graphs; `A` has shape {tuple(A.shape)}.")
    if not bool(xp.all(xp.isfinite(A))):
        raise ValueError(f"`A` in {caller} contains NaN or Inf; clean or mask it first.")
    if W is not None:
        W = xp.astype(_float(xp.asarray(W), "W", caller, xp=xp), A.dtype)
        if tuple(W.shape) != (m, m, n, n):
            raise ValueError(
                f"`W` in {caller} must have shape (m, m, n, n) = {(m, m, n, n)} for `A` of shape "
                f"{tuple(A.shape)}; got {tuple(W.shape)}."
            )
        if not bool(xp.all(xp.isfinite(W))):
            raise ValueError(f"`W` in {caller} contains NaN or Inf; clean or mask it first.")
    ns_np = _check_sizes(ns, m, n, caller)
    d = _check_universe(ns_np, n_univ, caller)
    return A, W, ns_np, d


def _parse_pairs(
    X: Any, ns: Any, caller: str, *, soft_ok: bool, name: str = "result_or_pairs"
) -> tuple[Array, np.ndarray, Any]:
    """Any form of pairwise matchings -> blocks (m, m, r, r) (zero padding), sizes, namespace."""
    if isinstance(X, MultiMatchResult):
        xp = backend.namespace_of(X.U)
        Xb = X.to_dense()
        ns_np = X.ns
    elif isinstance(X, Mapping):
        Xb, ns_np, xp = _blocks_from_mapping(X, caller, name)
    else:
        if not hasattr(X, "shape") or backend.is_sparse(X):
            raise TypeError(
                f"`{name}` in {caller} must be a MultiMatchResult, an array of shape "
                f"(m, m, n, n) or a mapping {{(i, j): X_ij}}; got {type(X).__name__}."
            )
        xp = backend.namespace_of(X, name=name)
        Xb = _float(xp.asarray(X), name, caller, xp=xp)
        if Xb.ndim != 4 or Xb.shape[0] != Xb.shape[1] or Xb.shape[2] != Xb.shape[3]:
            raise ValueError(
                f"`{name}` in {caller} must have shape (m, m, n, n); got {tuple(Xb.shape)}."
            )
        m, n = Xb.shape[0], Xb.shape[2]
        if m < 2 or n < 1:
            raise ValueError(
                f"`{name}` in {caller} must hold matchings between at least 2 graphs of at "
                f"least 1 node; got shape {tuple(Xb.shape)}."
            )
        ns_np = _check_sizes(ns, m, n, caller)
        rows = _row_mask(ns_np, n)
        keep = rows[:, None, :, None] & rows[None, :, None, :]
        keep = keep & ~np.eye(m, dtype=bool)[:, :, None, None]
        Xb = xp.where(
            backend.asarray_on(keep, xp=xp, device=backend.device(Xb)), Xb, xp.zeros_like(Xb)
        )
        Xb = 0.5 * (Xb + xp.permute_dims(Xb, (1, 0, 3, 2)))
    if not bool(xp.all(xp.isfinite(Xb))):
        raise ValueError(f"`{name}` in {caller} contains NaN or Inf.")
    if not soft_ok and not bool(xp.all((Xb == 0) | (Xb == 1))):
        raise ValueError(
            f"`{name}` in {caller} must hold 0/1 matchings (for an array input, X[i, j] and "
            "X[j, i].T must agree); round soft matchings with hungarian first."
        )
    return Xb, ns_np, xp


def _pair_keys(mapping: Mapping[Any, Any], name: str, caller: str, what: str) -> tuple[list, int]:
    """Check that `mapping` is keyed by pairs ``(i, j)`` of distinct graph indices.

    Returns the keys and the number of graphs ``m`` (largest index + 1, at least 2); `what`
    names the values in the error ("matchings", "affinities").
    """
    keys = list(mapping.keys())
    for key in keys:
        if (
            not isinstance(key, tuple)
            or len(key) != 2
            or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in key)
            or key[0] == key[1]
            or min(key) < 0
        ):
            raise ValueError(
                f"The keys of `{name}` in {caller} must be pairs (i, j) of distinct graph "
                f"indices >= 0; got {key!r}."
            )
    m = max(max(k) for k in keys) + 1 if keys else 0
    if m < 2:
        raise ValueError(f"`{name}` in {caller} must hold the {what} of at least one pair.")
    return keys, m


def _blocks_from_mapping(
    X: Mapping[Any, Any], caller: str, name: str
) -> tuple[Array, np.ndarray, Any]:
    keys, m = _pair_keys(X, name, caller, "matchings")
    xp = backend.namespace_of(*[X[k] for k in keys], name=name)
    ns_np = np.full(m, -1, dtype=np.int64)
    mats: dict[tuple[int, int], Array] = {}
    for key in keys:
        M = _float(xp.asarray(X[key]), f"{name}[{key}]", caller, xp=xp)
        if M.ndim != 2:
            raise ValueError(
                f"The matching of pair {key} in `{name}` of {caller} must be 2-D (n_i, n_j); "
                f"got shape {tuple(M.shape)}."
            )
        i, j = key
        if i > j:
            M, i, j = xp.permute_dims(M, (1, 0)), j, i
        for g, s in ((i, M.shape[0]), (j, M.shape[1])):
            if ns_np[g] >= 0 and ns_np[g] != s:
                raise ValueError(
                    f"Graph {g} has {ns_np[g]} nodes in one matching of `{name}` in {caller} but "
                    f"{s} in pair {key}; the matchings' shapes must agree."
                )
            ns_np[g] = s
        if (i, j) in mats:
            mats[(i, j)] = 0.5 * (mats[(i, j)] + M)
        else:
            mats[(i, j)] = M
    missing = [(i, j) for i in range(m) for j in range(i + 1, m) if (i, j) not in mats]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(
            f"`{name}` in {caller} must hold a matching for every pair of the {m} graphs; "
            f"missing {', '.join(map(str, missing[:5]))}{more}."
        )
    r = int(ns_np.max())
    pi, pj = _pair_indices(m)
    stack = xp.stack(
        [_pad2(mats[(int(i), int(j))][None, ...], r, xp=xp)[0, ...] for i, j in zip(pi, pj)]
    )
    return _scatter_pairs(stack, pi, pj, m, xp=xp), ns_np, xp
