r"""Read QAPLIB ``.dat`` / ``.sln`` files and score permutations the QAPLIB way.

File formats (see QAPLIB, Burkard, Karisch, Rendl 1997):

* ``.dat`` -- a stream of whitespace-separated numbers: ``n``, then ``A`` (``n*n`` numbers,
  row-major), then ``B`` (``n*n`` numbers, row-major). Line breaks, blank lines, tabs and
  CRLF line endings carry no meaning.
* ``.sln`` -- a header ``n value``, then the permutation ``p(1) .. p(n)``, 1-indexed, which may
  run over several lines.

Objective (QAPLIB minimises)

.. math::  \mathrm{value}(p) = \sum_{i,j} A_{ij} \, B_{p(i)\,p(j)}

In this module every permutation is **0-indexed** (``perm[i] = p(i+1) - 1``); only the files
(and the command line) use QAPLIB's 1-indexed form.

Every parse error is a ``ValueError`` that names the file and the line.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from bisect import bisect_right
from dataclasses import dataclass
from importlib import resources
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "QaplibInstance",
    "example_path",
    "examples_dir",
    "list_examples",
    "load_instance",
    "objective",
    "read_dat",
    "read_sln",
    "relative_gap",
]

PathLike = str | os.PathLike[str]

_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?")


# ----------------------------------------------------------------------------------------------
# Tokenising
# ----------------------------------------------------------------------------------------------


class _Tokens:
    """Whitespace-separated tokens of a text file, with the line each one sits on."""

    def __init__(self, path: PathLike):
        self.path = os.fspath(path)
        with open(path, "rb") as fh:
            raw = fh.read()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{self.path}: not a text file (byte {exc.start} is not UTF-8); "
                "expected whitespace-separated numbers."
            ) from None
        lines = text.splitlines()  # handles \n, \r\n and \r
        self.n_lines = len(lines)
        self.tokens: list[str] = []
        self._ends: list[int] = []  # number of tokens up to and including each line
        for line in lines:
            self.tokens.extend(line.split())  # any whitespace: spaces, tabs, ...
            self._ends.append(len(self.tokens))

    def __len__(self) -> int:
        return len(self.tokens)

    def line_of(self, k: int) -> int:
        """1-based line number of token `k`."""
        return bisect_right(self._ends, k) + 1

    def where(self, k: int) -> str:
        return f"{self.path}: line {self.line_of(k)}"

    def positive_int(self, k: int, what: str) -> int:
        tok = self.tokens[k]
        if not _INT_RE.fullmatch(tok) or int(tok) <= 0:
            raise ValueError(f"{self.where(k)}: {what} must be a positive integer; found {tok!r}.")
        return int(tok)

    def numbers(self, start: int, stop: int, what: str) -> np.ndarray:
        """Tokens ``start:stop`` as int64 (float64 if any has a decimal point or exponent)."""
        toks = self.tokens[start:stop]
        is_float = False
        for k, tok in enumerate(toks, start):
            if _INT_RE.fullmatch(tok):
                continue
            if _FLOAT_RE.fullmatch(tok):
                is_float = True
                continue
            raise ValueError(f"{self.where(k)}: expected a number in {what}; found {tok!r}.")
        if is_float:
            return np.array([float(t) for t in toks], dtype=np.float64)
        try:
            return np.array([int(t) for t in toks], dtype=np.int64)
        except OverflowError:
            k = next(k for k, t in enumerate(toks, start) if abs(int(t)) >= 2**63)
            raise ValueError(
                f"{self.where(k)}: the number {self.tokens[k]!r} in {what} does not fit in "
                "a 64-bit integer."
            ) from None

    def truncated(self, expected: int, found: int, what: str) -> ValueError:
        return ValueError(
            f"{self.path}: file is truncated: expected {what} numbers after n, "
            f"found {found}; file ends at line {self.n_lines}."
        )

    def extra(self, k: int, what: str) -> ValueError:
        count = len(self.tokens) - k
        return ValueError(
            f"{self.where(k)}: unexpected extra token {self.tokens[k]!r} after {what} "
            f"({count} extra token{'s' if count != 1 else ''} in all)."
        )


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------


def read_dat(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a QAPLIB ``.dat`` file.

    Parameters
    ----------
    path : str or os.PathLike
        File holding ``n``, then ``A`` and ``B`` (``n*n`` numbers each, row-major), separated
        by any whitespace (line layout, blank lines, tabs and CRLF do not matter).

    Returns
    -------
    A, B : numpy arrays of shape (n, n)
        ``int64``, or ``float64`` if any number in the file has a decimal point or exponent.

    Raises
    ------
    ValueError
        Naming the file and line: empty file, ``n`` not a positive integer, a token that is
        not a number, too few numbers (truncated file) or extra tokens after ``B``.
    FileNotFoundError
        If `path` does not exist.

    Examples
    --------
    >>> from qapfuse.io import qaplib
    >>> A, B = qaplib.read_dat(qaplib.example_path("nug12"))
    >>> A.shape, B.shape, A.dtype.name
    ((12, 12), (12, 12), 'int64')
    """
    t = _Tokens(path)
    if len(t) == 0:
        raise ValueError(f"{t.path}: file is empty; expected n, then the matrices A and B.")
    n = t.positive_int(0, "n (the first number)")
    need = 2 * n * n
    found = len(t) - 1
    what = f"2*n*n = {need}"
    # Report a bad token before a short file: it is usually the real cause.
    values = t.numbers(1, 1 + min(found, need), f"the matrices A and B (n = {n})")
    if found < need:
        raise t.truncated(need, found, what)
    if found > need:
        err = t.extra(1 + need, f"the {what} numbers of A and B (n = {n} on line {t.line_of(0)})")
        if found == need + 1 and t.line_of(1) == t.line_of(0):
            err = ValueError(
                f"{err} If the first line is 'n best_known' (a variant of the format), "
                "delete its second number."
            )
        raise err
    A = values[: n * n].reshape(n, n)
    B = values[n * n :].reshape(n, n)
    return A, B


def read_sln(path: PathLike) -> tuple[int, int | float, np.ndarray]:
    """Read a QAPLIB ``.sln`` file.

    Parameters
    ----------
    path : str or os.PathLike
        File holding the header ``n value``, then the 1-indexed permutation ``p(1) .. p(n)``
        (on any number of lines).

    Returns
    -------
    n : int
        Problem size.
    value : int or float
        Objective value stated in the header.
    perm : numpy int64 array of shape (n,)
        The permutation, **0-indexed**: ``perm[i] = p(i+1) - 1``.

    Raises
    ------
    ValueError
        Naming the file and line: a header that is not ``n value``, a non-integer entry, too
        few or too many entries for `n`, an entry outside ``1..n``, or a repeated entry.
    """
    t = _Tokens(path)
    if len(t) == 0:
        raise ValueError(f"{t.path}: file is empty; expected a header 'n value' and then p.")
    if len(t) == 1:
        raise ValueError(f"{t.where(0)}: the header must be 'n value'; found only {t.tokens[0]!r}.")
    header_line = t.line_of(0)
    n = t.positive_int(0, "n (first number of the header 'n value')")
    value_arr = t.numbers(1, 2, "the header 'n value'")
    value: int | float = value_arr.item()
    found = len(t) - 2
    if found < n:
        raise ValueError(
            f"{t.path}: file is truncated: expected n = {n} permutation entries after the "
            f"header 'n value', found {found}; file ends at line {t.n_lines}. (The header "
            "must hold both n and the value.)"
        )
    if found > n:
        raise t.extra(2 + n, f"the n = {n} permutation entries (header on line {header_line})")
    for k in range(2, 2 + n):
        tok = t.tokens[k]
        if not _INT_RE.fullmatch(tok):
            raise ValueError(
                f"{t.where(k)}: permutation entries must be integers in 1..{n}; found {tok!r}."
            )
    p1 = np.array([int(tok) for tok in t.tokens[2 : 2 + n]], dtype=np.int64)
    bad = np.flatnonzero((p1 < 1) | (p1 > n))
    if bad.size:
        k = int(bad[0])
        hint = ""
        if np.array_equal(np.sort(p1), np.arange(n)):
            hint = " It looks 0-indexed; QAPLIB permutations are 1-indexed (1..n)."
        raise ValueError(
            f"{t.where(2 + k)}: permutation entry {k + 1} is {p1[k]}, outside 1..{n}; "
            f"not a permutation of 1..{n}.{hint}"
        )
    first_seen: dict[int, int] = {}
    for k, v in enumerate(p1.tolist()):
        if v in first_seen:
            j = first_seen[v]
            missing = sorted(set(range(1, n + 1)) - set(p1.tolist()))
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise ValueError(
                f"{t.where(2 + k)}: not a permutation of 1..{n}: {v} appears twice (entries "
                f"{j + 1} on line {t.line_of(2 + j)} and {k + 1} on line {t.line_of(2 + k)}); "
                f"missing: {shown}."
            )
        first_seen[v] = k
    return n, value, p1 - 1


# ----------------------------------------------------------------------------------------------
# Instances
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class QaplibInstance:
    """One QAPLIB instance, as read by :func:`load_instance`.

    Attributes
    ----------
    name : str
        File stem, e.g. ``"nug12"``.
    n : int
        Problem size.
    A, B : numpy arrays of shape (n, n)
        The two matrices of ``value(p) = sum_ij A[i,j] B[p(i), p(j)]`` (int64, or float64 if
        the file has decimals).
    best_known : int, float or None
        Value from the ``.sln`` header (checked against the permutation), if a ``.sln`` was read;
        an ``int`` when the header states an integer, as in every QAPLIB instance.
    best_perm : numpy int64 array of shape (n,) or None
        The ``.sln`` permutation, **0-indexed**.
    path : pathlib.Path
        The ``.dat`` file.
    sln_path : pathlib.Path or None
        The ``.sln`` file read, if any.
    """

    name: str
    n: int
    A: np.ndarray
    B: np.ndarray
    best_known: int | float | None
    best_perm: np.ndarray | None
    path: Path
    sln_path: Path | None = None

    def objective(self, perm: Any) -> int | float:
        """QAPLIB value of the 0-indexed permutation `perm` (see :func:`objective`)."""
        return objective(self.A, self.B, perm)

    def __repr__(self) -> str:
        return (
            f"QaplibInstance(name={self.name!r}, n={self.n}, best_known={self.best_known!r}, "
            f"path={os.fspath(self.path)!r})"
        )


def load_instance(path: PathLike, sln: PathLike | bool | None = None) -> QaplibInstance:
    """Read a ``.dat`` file and, if there is one, its ``.sln``; check they agree.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.dat`` file.
    sln : str, os.PathLike, bool or None
        The ``.sln`` file. ``None`` (default) or ``True``: use ``<stem>.sln`` beside `path`
        if it exists (``True``: it must exist). ``False``: read no solution.

    Returns
    -------
    QaplibInstance
        ``best_known`` and ``best_perm`` are ``None`` when no ``.sln`` was read.

    Raises
    ------
    ValueError
        On a malformed file (see :func:`read_dat`, :func:`read_sln`), when the ``.sln`` size
        differs from the ``.dat`` size, or when the stated value is not the objective of the
        stated permutation (with a hint when the inverse permutation matches: some QAPLIB
        mirrors store it that way).
    FileNotFoundError
        If `path` (or an explicitly given `sln`) does not exist.
    """
    dat = Path(path)
    A, B = read_dat(dat)
    n = A.shape[0]
    if sln is None or sln is True:
        beside = dat.with_suffix(".sln")
        if beside.is_file():
            sln_path: Path | None = beside
        elif sln is True:
            raise FileNotFoundError(f"No solution file {os.fspath(beside)!r} beside {dat}.")
        else:
            sln_path = None
    elif sln is False:
        sln_path = None
    elif isinstance(sln, str | os.PathLike):
        sln_path = Path(sln)
        if not sln_path.is_file():
            raise FileNotFoundError(f"Solution file {os.fspath(sln_path)!r} does not exist.")
    else:
        raise TypeError(
            "The 'sln' parameter of load_instance must be a path, a bool or None. "
            f"Got {sln!r} of type {type(sln).__name__} instead."
        )
    best_known: int | float | None = None
    best_perm: np.ndarray | None = None
    if sln_path is not None:
        n_sln, value, perm = read_sln(sln_path)
        if n_sln != n:
            raise ValueError(
                f"{sln_path}: line 1: n = {n_sln} in the solution header disagrees with "
                f"n = {n} in {dat}."
            )
        got = objective(A, B, perm)
        if not _same_value(got, value):
            hint = ""
            if _same_value(objective(A, B, np.argsort(perm)), value):
                hint = (
                    " Its inverse permutation gives the stated value: the file stores the "
                    "inverse (or A and B are swapped)."
                )
            raise ValueError(
                f"{sln_path}: line 1: stated value {value} disagrees with the objective "
                f"{got} of the permutation it lists, on {dat}.{hint}"
            )
        best_known, best_perm = value, perm
    return QaplibInstance(
        name=dat.stem,
        n=int(n),
        A=A,
        B=B,
        best_known=best_known,
        best_perm=best_perm,
        path=dat,
        sln_path=sln_path,
    )


def _same_value(a: float, b: float) -> bool:
    return a == b or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def objective(A: Any, B: Any, perm: Any) -> int | float:
    """QAPLIB objective ``sum_ij A[i,j] * B[perm[i], perm[j]]`` of a 0-indexed permutation.

    Parameters
    ----------
    A, B : array_like of shape (n, n)
        The instance's matrices (numpy, or anything ``numpy.asarray`` accepts).
    perm : array_like of int, shape (n,)
        0-indexed permutation of ``0..n-1`` (for a ``.sln`` file: its entries minus one).

    Returns
    -------
    int or float
        ``int`` when `A` and `B` are integer arrays, else ``float``.

    Raises
    ------
    ValueError
        If `A` or `B` is not square, their sizes differ, or `perm` is not a permutation of
        ``0..n-1``.

    Examples
    --------
    >>> import numpy as np
    >>> A = np.array([[0, 1], [2, 0]]); B = np.array([[0, 3], [5, 0]])
    >>> objective(A, B, [0, 1]), objective(A, B, [1, 0])
    (13, 11)
    """
    A = np.asarray(A)
    B = np.asarray(B)
    for M, nm in ((A, "A"), (B, "B")):
        if M.ndim != 2 or M.shape[0] != M.shape[1]:
            raise ValueError(f"`{nm}` must be a square matrix of shape (n, n); got {M.shape}.")
        if not (np.issubdtype(M.dtype, np.integer) or np.issubdtype(M.dtype, np.floating)):
            raise TypeError(f"`{nm}` must hold real numbers; got dtype {M.dtype}.")
    n = A.shape[0]
    if B.shape[0] != n:
        raise ValueError(f"`A` and `B` must have one size; got shapes {A.shape} and {B.shape}.")
    p = np.asarray(perm)
    if p.ndim != 1 or p.shape[0] != n:
        raise ValueError(
            f"`perm` must be a 0-indexed permutation of length n = {n}; got shape {p.shape}."
        )
    if p.size and not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"`perm` must hold integers 0..{n - 1}; got dtype {p.dtype}.")
    if not np.array_equal(np.sort(p), np.arange(n)):
        hint = ""
        if n and np.array_equal(np.sort(p), np.arange(1, n + 1)):
            hint = " It looks 1-indexed; subtract 1 (QAPLIB files are 1-indexed, perm is not)."
        raise ValueError(f"`perm` must be a permutation of 0..{n - 1}; got {p.tolist()}.{hint}")
    p = p.astype(np.intp)
    if np.issubdtype(A.dtype, np.integer) and np.issubdtype(B.dtype, np.integer):
        return int((A.astype(np.int64) * B[np.ix_(p, p)].astype(np.int64)).sum())
    return float((A * B[np.ix_(p, p)]).sum(dtype=np.float64))


def relative_gap(value: float, best_known: float) -> float:
    """Relative gap ``(value - best_known) / |best_known|`` of a minimisation result.

    Parameters
    ----------
    value : float
        Objective reached.
    best_known : float
        Best known (or optimal) objective.

    Returns
    -------
    float
        ``0.0`` at the best known value, positive when worse, negative when better. When
        ``best_known == 0`` the ratio is undefined: the gap is ``0.0`` if ``value == 0`` and
        ``inf`` (``-inf``) if value is above (below) zero.

    Examples
    --------
    >>> round(relative_gap(2596, 2570), 6)
    0.010117
    >>> relative_gap(0, 0), relative_gap(3, 0)
    (0.0, inf)
    """
    for v, nm in ((value, "value"), (best_known, "best_known")):
        if isinstance(v, bool) or not isinstance(v, Real | np.integer | np.floating):
            raise TypeError(
                f"The {nm!r} parameter of relative_gap must be a real number. "
                f"Got {v!r} of type {type(v).__name__} instead."
            )
        if not math.isfinite(float(v)):
            raise ValueError(
                f"The {nm!r} parameter of relative_gap must be finite. Got {v!r} instead."
            )
    diff = float(value) - float(best_known)
    if best_known == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / abs(float(best_known))


# ----------------------------------------------------------------------------------------------
# Shipped examples
# ----------------------------------------------------------------------------------------------


def examples_dir() -> Path:
    """Folder of the QAPLIB instances shipped with qapfuse (``.dat`` with their ``.sln``).

    >>> (examples_dir() / "nug12.dat").is_file()
    True
    """
    # The package data are plain files in a regular (or editable) install.
    return Path(os.fspath(resources.files("qapfuse.data").joinpath("qaplib")))


def list_examples() -> list[str]:
    """Names of the QAPLIB instances shipped with qapfuse (``qapfuse/data/qaplib``), sorted."""
    return sorted(p.stem for p in examples_dir().glob("*.dat"))


def example_path(name: str) -> Path:
    """Path of the shipped ``<name>.dat`` (its ``.sln`` lies beside it).

    Parameters
    ----------
    name : str
        Instance name, e.g. ``"nug20"`` (a trailing ``.dat`` is accepted); see
        :func:`list_examples`.

    Raises
    ------
    ValueError
        For an unknown name, listing the shipped ones and the closest match.
    """
    if not isinstance(name, str):
        raise TypeError(
            "The 'name' parameter of example_path must be a str. "
            f"Got {name!r} of type {type(name).__name__} instead."
        )
    stem = name[:-4] if name.lower().endswith(".dat") else name
    path = examples_dir() / f"{stem}.dat"
    if not path.is_file() or stem != path.stem:
        names = list_examples()
        close = difflib.get_close_matches(stem, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Unknown example {name!r}; the shipped QAPLIB instances are {', '.join(names)}.{hint}"
        )
    return path
