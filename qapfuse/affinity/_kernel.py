"""Affinity kernels: how two node (or edge) feature vectors score against each other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._validation import check_scalar

__all__ = ["Kernel", "as_kernel", "custom_kernel", "gaussian_kernel", "inner_product_kernel"]


@dataclass(frozen=True)
class Kernel:
    """A pairwise affinity ``k(x, y)`` of two feature vectors of one length ``d``.

    Build one with :func:`inner_product_kernel`, :func:`gaussian_kernel` or
    :func:`custom_kernel`; builders also accept the strings ``"inner_product"`` and
    ``"gaussian"`` (``sigma = 1``).

    Attributes
    ----------
    name : {"inner_product", "gaussian", "custom"}
    sigma : float
        Gaussian width (``exp(-||x - y||^2 / sigma)``); 1.0 for the other kernels.
    numba_fn : Numba-compiled callable, optional
        ``numba_fn(x, y) -> float`` on 1-D float64 arrays (custom kernels, numpy inputs).
    torch_fn : callable, optional
        ``torch_fn(F1, F2) -> (m1, m2)`` on 2-D tensors (custom kernels, torch inputs).
    parallel : bool
        Whether the Numba builders of a custom kernel are compiled multi-core.
    """

    name: str
    sigma: float = 1.0
    numba_fn: Any = field(default=None, compare=False)
    torch_fn: Any = field(default=None, compare=False)
    parallel: bool = True

    @property
    def kind(self) -> int:
        """Code of a built-in kernel for the Numba kernels (0 inner product, 1 Gaussian)."""
        return {"inner_product": 0, "gaussian": 1}.get(self.name, -1)


def inner_product_kernel() -> Kernel:
    """``k(x, y) = <x, y>`` (pygmtools' ``inner_prod_aff_fn``)."""
    return Kernel("inner_product")


def gaussian_kernel(sigma: float = 1.0) -> Kernel:
    """``k(x, y) = exp(-||x - y||^2 / sigma)`` (pygmtools' ``gaussian_aff_fn``).

    Parameters
    ----------
    sigma : float > 0
        Width. Note the convention: ``sigma`` divides the squared distance directly (no
        factor 2, no square).
    """
    check_scalar(sigma, "sigma", "gaussian_kernel")
    return Kernel("gaussian", sigma=float(sigma))


def custom_kernel(
    numba_fn: Callable[..., float] | None = None,
    torch_fn: Callable[..., Any] | None = None,
    *,
    parallel: bool = True,
) -> Kernel:
    """A user kernel: a Numba function for numpy inputs and/or a torch function for torch.

    Parameters
    ----------
    numba_fn : Numba-compiled callable ``(x, y) -> float``, optional
        Called on two 1-D float64 feature vectors (``numba.njit``-decorated). It is compiled
        into the builders on first use (a few seconds, once per process).
    torch_fn : callable ``(F1, F2) -> tensor of shape (m1, m2)``, optional
        Vectorised version for torch inputs: ``F1`` is ``(m1, d)``, ``F2`` ``(m2, d)``.
    parallel : bool
        Compile the builders with ``parallel=True`` (multi-core; about 5 s to compile each
        of the dense and sparse builders) or serially (about 1.5 s each).

    Examples
    --------
    >>> import numba
    >>> from qapfuse.affinity import custom_kernel
    >>> @numba.njit
    ... def l1_sim(x, y):
    ...     return 1.0 / (1.0 + abs(x - y).sum())
    >>> k = custom_kernel(l1_sim)
    """
    if numba_fn is None and torch_fn is None:
        raise TypeError("custom_kernel needs `numba_fn` (numpy inputs) and/or `torch_fn` (torch).")
    if numba_fn is not None and not _is_numba(numba_fn):
        raise TypeError(
            "The 'numba_fn' parameter of custom_kernel must be a Numba-compiled function "
            f"(decorate it with @numba.njit). Got {type(numba_fn).__name__} instead."
        )
    if torch_fn is not None and not callable(torch_fn):
        raise TypeError(
            "The 'torch_fn' parameter of custom_kernel must be callable. "
            f"Got {type(torch_fn).__name__} instead."
        )
    return Kernel("custom", numba_fn=numba_fn, torch_fn=torch_fn, parallel=bool(parallel))


def _is_numba(fn: Any) -> bool:
    return type(fn).__module__.startswith("numba") and hasattr(fn, "py_func")


def as_kernel(value: Any, name: str, caller: str) -> Kernel:
    """Turn a builder's ``node_aff``/``edge_aff`` argument into a :class:`Kernel`."""
    if isinstance(value, Kernel):
        return value
    if isinstance(value, str):
        if value == "inner_product":
            return inner_product_kernel()
        if value == "gaussian":
            return gaussian_kernel(1.0)
        raise ValueError(
            f"The {name!r} parameter of {caller} must be 'inner_product', 'gaussian' or a "
            f"Kernel (gaussian_kernel(sigma), custom_kernel(fn)). Got {value!r} instead."
        )
    if _is_numba(value):
        return custom_kernel(value)
    raise TypeError(
        f"The {name!r} parameter of {caller} must be 'inner_product', 'gaussian', a Kernel or "
        f"a Numba-compiled function. Got {type(value).__name__} instead."
    )
