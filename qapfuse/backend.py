"""Array-namespace helpers: one code path for numpy, torch (any device) and other array libraries.

Solvers call :func:`namespace_of` once on their inputs and then use only the returned
namespace ``xp``. The only trips to the host are :func:`to_numpy` (Hungarian, Numba kernels,
I/O) and :func:`from_numpy`, which returns data in the library, dtype and device of a
reference array.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np
from array_api_compat import device, is_numpy_array, is_torch_array

__all__ = [
    "Array",
    "asarray_on",
    "device",
    "from_numpy",
    "is_numpy_array",
    "is_sparse",
    "is_torch_array",
    "logsumexp",
    "namespace_of",
    "rng_from",
    "to_numpy",
]

Array = Any  # an array of any array-API library (numpy.ndarray, torch.Tensor, ...)


def namespace_of(*arrays: Any, name: str = "input") -> Any:
    """Return the array-API namespace shared by `arrays` (``None`` and scalars are ignored).

    `name` names the arguments in the error message: one name, or one per array separated by
    commas (``"A, W"``), in which case the arguments left at ``None`` are left out.

    Raises
    ------
    TypeError
        If the arrays come from different libraries, or an argument is not an array.
    """
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError as exc:
        names = [n.strip() for n in name.split(",")]
        if len(names) == len(arrays) > 1:
            name = ", ".join(n for n, a in zip(names, arrays) if a is not None)
        kinds = sorted(
            {
                type(a).__module__.split(".")[0] + "." + type(a).__name__
                for a in arrays
                if a is not None
            }
        )
        raise TypeError(
            f"`{name}` must be arrays of one library (numpy, torch, ...); got {', '.join(kinds)}."
        ) from exc


def to_numpy(x: Array) -> np.ndarray:
    """Copy `x` to a numpy array on the host (no copy for numpy input)."""
    if is_numpy_array(x):
        return x
    if is_torch_array(x):
        return x.detach().cpu().numpy()
    try:
        return np.from_dlpack(x)
    except (TypeError, AttributeError, RuntimeError, BufferError):
        return np.asarray(x)


def from_numpy(a: np.ndarray, like: Array, *, dtype: Any = None) -> Array:
    """Return `a` in the library and on the device of `like`, with `like`'s dtype by default."""
    xp = array_api_compat.array_namespace(like)
    if is_numpy_array(like):
        return np.asarray(a, dtype=like.dtype if dtype is None else dtype)
    return xp.asarray(
        np.ascontiguousarray(a), dtype=like.dtype if dtype is None else dtype, device=device(like)
    )


def asarray_on(a: np.ndarray, *, xp: Any, device: Any = None) -> Array:
    """`a` (numpy) as an array of namespace `xp` on `device`, keeping its dtype."""
    if array_api_compat.is_numpy_namespace(xp):
        return a
    if device is None:
        return xp.asarray(a)
    return xp.asarray(a, device=device)


def is_sparse(x: Any) -> bool:
    """True for scipy.sparse matrices/arrays and torch sparse tensors."""
    if is_torch_array(x):
        return x.layout != _torch().strided
    mod = type(x).__module__
    return mod.startswith("scipy.sparse")


def _torch() -> Any:
    import torch

    return torch


def logsumexp(L: Array, *, axis: int, xp: Any) -> Array:
    """``log(sum(exp(L), axis, keepdims=True))``, stable, and 0 (not NaN) on all-``-inf`` slices."""
    m = xp.max(L, axis=axis, keepdims=True)
    finite = xp.isfinite(m)
    m_safe = xp.where(finite, m, xp.zeros_like(m))
    s = xp.sum(xp.exp(L - m_safe), axis=axis, keepdims=True)
    s = xp.where(finite, s, xp.ones_like(s))  # all -inf: avoid log(0) (the result is 0 anyway)
    return xp.where(finite, xp.log(s) + m_safe, xp.zeros_like(m))


def rng_from(rng: Any, *, name: str = "rng", caller: str = "qapfuse") -> np.random.Generator:
    """Turn ``None``, an int seed, a numpy Generator or a torch Generator into a numpy Generator.

    A torch Generator is consumed once (one draw) to seed the numpy Generator, so the same torch
    Generator state gives the same answer.
    """
    if rng is None or isinstance(rng, np.random.Generator):
        return np.random.default_rng(rng)
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        if rng < 0:
            raise ValueError(
                f"The {name!r} parameter of {caller} must be a non-negative int seed. "
                f"Got {rng!r} instead."
            )
        return np.random.default_rng(int(rng))
    if type(rng).__module__.startswith("torch") and type(rng).__name__ == "Generator":
        torch = _torch()
        seed = int(torch.randint(0, 2**62, (1,), generator=rng).item())
        return np.random.default_rng(seed)
    raise TypeError(
        f"The {name!r} parameter of {caller} must be None, an int, a numpy.random.Generator or "
        f"a torch.Generator. Got {type(rng).__name__} instead."
    )
