"""Property-based tests of every public entry point that takes arrays or files.

The property, for any input hypothesis draws (random shapes, dtypes, NaN/inf, empty and
mismatched sizes): either a result that passes its invariants (a partial permutation, a finite
objective equal to a rescoring of the returned matching) or one of the library's documented
errors (``ValueError``/``TypeError`` and their subclasses, ``FileNotFoundError`` for paths),
never another exception, a hang, or a modified input.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qapfuse
from qapfuse import Problem
from qapfuse.affinity import build_aff_mat
from qapfuse.errors import ConvergenceWarning
from qapfuse.io import qaplib
from qapfuse.solvers.multi import gamgm, synchronize

DOCUMENTED = (ValueError, TypeError)
FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # the same cases on every run: CI stays reproducible
)

# Sizes stay tiny: the property is about input handling, not scale ("huge" sizes are
# checked separately against the dense-K memory guard).
small = st.integers(min_value=0, max_value=5)
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)
anyfloat = st.one_of(finite, finite, finite, st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1e300]))
dtypes = st.sampled_from([np.float64, np.float64, np.float32, np.int64, np.bool_, np.complex128])


def arrays(shape, *, special: bool = True):
    return st.builds(
        lambda a, dt: a.astype(dt),
        hnp.arrays(np.float64, shape, elements=anyfloat if special else finite),
        dtypes,
    )


def assert_partial_permutation(X, n1, n2):
    X = np.asarray(X)
    assert X.shape == (n1, n2)
    assert set(np.unique(X)).issubset({0, 1})
    assert (X.sum(axis=1) <= 1).all() and (X.sum(axis=0) <= 1).all()


def raised_in(err: BaseException) -> str:
    """The file of the innermost frame that raised `err` (our check, or numpy's internals)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename if tb is not None else "?"


def call_documented(f, *args, **kwargs):
    """``f(*args, **kwargs)``, or None when it raised one of the documented errors."""
    name = getattr(f, "__name__", "call")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            out = f(*args, **kwargs)
    except DOCUMENTED as err:
        event(f"{name}: {type(err).__name__}")
        where = raised_in(err)
        assert "qapfuse" in where, f"{type(err).__name__} from inside {where}, not ours: {err}"
        return None
    event(f"{name}: result")
    return out


# -- Problem constructors and solve --------------------------------------------------------


@st.composite
def dense_inputs(draw):
    if draw(st.booleans()):  # a well-formed problem: the invariants of the result are checked
        n1 = draw(st.integers(1, 4))
        n2 = draw(st.integers(n1, 5))
        K = draw(arrays((n1 * n2, n1 * n2), special=False))
        return K.astype(draw(st.sampled_from([np.float64, np.float32]))), n1, n2
    n1, n2 = draw(small), draw(small)
    rows = draw(st.one_of(st.just(n1 * n2), st.integers(0, 30)))
    cols = draw(st.one_of(st.just(rows), st.integers(0, 30)))
    ndim_extra = draw(st.sampled_from([(), (), (2,)]))
    K = draw(arrays((*ndim_extra, rows, cols)))
    return K, n1, n2


METHODS = ["ga", "rrwm", "ipfp", "sm", "two_opt", "tabu", "auto"]


@FUZZ
@given(dense_inputs(), st.sampled_from(METHODS))
def test_from_dense_and_solve(inputs, method):
    K, n1, n2 = inputs
    K_before = K.copy()
    problem = call_documented(Problem.from_dense, K, n1, n2)
    np.testing.assert_array_equal(K, K_before)
    if problem is None:
        return
    assert np.isfinite(np.asarray(K, dtype=np.complex128)).all()  # NaN/inf was refused
    res = call_documented(qapfuse.solve, problem, method, time_limit=0.5, rng=0)
    np.testing.assert_array_equal(K, K_before)
    if res is None:
        return
    X = np.asarray(res.X)
    if problem.batched:
        for k in range(X.shape[0]):
            assert_partial_permutation(X[k], problem.n1max, problem.n2max)
    else:
        assert_partial_permutation(X, n1, n2)
        assert np.isfinite(res.objective)
        rescored = float(X.reshape(-1, order="F") @ K.astype(np.float64) @ X.reshape(-1, order="F"))
        assert np.isclose(res.score, rescored, rtol=1e-6, atol=1e-6 * (1 + abs(rescored)))


@FUZZ
@given(small, small, st.data())
def test_koopmans_beckmann_and_solve(n, m, data):
    if data.draw(st.booleans()):  # well-formed
        m = n = max(n, 1)
        A = data.draw(arrays((n, n), special=False))
        B = data.draw(arrays((n, n), special=False))
    else:
        A = data.draw(arrays((n, n)))
        B = data.draw(arrays((m, data.draw(st.sampled_from([m, m + 1])))))
    A0, B0 = A.copy(), B.copy()
    problem = call_documented(Problem.koopmans_beckmann, A, B, sense="min")
    np.testing.assert_array_equal(A, A0)
    np.testing.assert_array_equal(B, B0)
    if problem is None:
        return
    method = data.draw(st.sampled_from(METHODS))
    res = call_documented(qapfuse.solve, problem, method, time_limit=0.5, rng=0)
    if res is None:
        return
    assert_partial_permutation(res.X, n, m)
    p = np.asarray(res.permutation)
    expected = (A.astype(np.float64) * B.astype(np.float64)[np.ix_(p, p)]).sum()
    assert np.isclose(res.objective, expected, rtol=1e-6, atol=1e-6 * (1 + abs(expected)))


def test_huge_dense_request_is_refused_not_allocated():
    n = 3000  # K would need n^4 * 8 bytes = 648 TB
    A = np.ones((n, n))
    problem = Problem.koopmans_beckmann(A, A)
    with pytest.raises((*DOCUMENTED, MemoryError)) as info:
        problem.to_dense()
    assert "bytes" in str(info.value) or "GiB" in str(info.value) or "TiB" in str(info.value)


# -- affinity builders ---------------------------------------------------------------------


@st.composite
def graph_inputs(draw):
    n1, n2 = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    dn = draw(st.integers(0, 3))
    de = draw(st.integers(0, 2))
    e1, e2 = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    nf1 = draw(arrays((n1, dn)))
    nf2 = draw(arrays((n2, draw(st.sampled_from([dn, dn + 1])))))
    ef1 = draw(arrays((e1, de)))
    ef2 = draw(arrays((e2, de)))
    conn1 = draw(hnp.arrays(np.int64, (e1, 2), elements=st.integers(-1, 4)))
    conn2 = draw(hnp.arrays(np.int64, (e2, 2), elements=st.integers(-1, 4)))
    fmt = draw(st.sampled_from(["dense", "csr"]))
    return (nf1, ef1, conn1, nf2, ef2, conn2), fmt


@FUZZ
@given(graph_inputs())
def test_build_aff_mat(inputs):
    args, fmt = inputs
    before = [a.copy() for a in args]
    K = call_documented(build_aff_mat, *args, format=fmt)
    for a, b in zip(args, before):
        np.testing.assert_array_equal(a, b)
    if K is None:
        return
    dense = K.toarray() if hasattr(K, "toarray") else np.asarray(K)
    n1, n2 = args[0].shape[0], args[3].shape[0]
    assert dense.shape == (n1 * n2, n1 * n2)
    assert np.isfinite(dense).all()


# -- multi-graph ---------------------------------------------------------------------------


@FUZZ
@given(st.integers(0, 4), st.integers(0, 4), st.data())
def test_gamgm(m, n, data):
    if data.draw(st.booleans()):  # well-formed: m >= 2 graphs of n >= 1 nodes, finite
        m, n = max(m, 2), max(n, 1)
        A = data.draw(arrays((m, n, n), special=False)).astype(np.float64)
    else:
        A = data.draw(arrays((m, n, data.draw(st.sampled_from([n, n + 1])))))
    A0 = A.copy()
    res = call_documented(gamgm, A, rng=0, pair_tabu=10, hungarian_sweeps=2)
    np.testing.assert_array_equal(A, A0)
    if res is None:
        return
    U = np.asarray(res.U)
    assert U.shape[0] == m
    for k in range(m):
        assert_partial_permutation(U[k, :n], n, U.shape[2])
    assert np.isfinite(res.score)


@FUZZ
@given(st.integers(0, 4), st.integers(0, 4), st.data())
def test_synchronize(m, n, data):
    if data.draw(st.booleans()):  # well-formed: 0/1 permutation matrices
        m, n = max(m, 2), max(n, 1)
        perms = [data.draw(st.permutations(range(n))) for _ in range(m * m)]
        X = np.stack([np.eye(n)[list(p)] for p in perms]).reshape(m, m, n, n)
    else:
        X = data.draw(arrays((m, m, n, data.draw(st.sampled_from([n, n + 1]))), special=True))
    X0 = X.copy()
    res = call_documented(synchronize, X)
    np.testing.assert_array_equal(X, X0)
    if res is None:
        return
    U = np.asarray(res.U)
    for k in range(m):
        assert_partial_permutation(U[k, :n], n, U.shape[2])


# -- QAPLIB files --------------------------------------------------------------------------

tokens = st.one_of(
    st.integers(-5, 20).map(str),
    st.sampled_from(["x", "1e3", "nan", "inf", "-", "3.5", "", "\n", "\t", "0x10"]),
)


@st.composite
def qaplib_texts(draw):
    if draw(st.booleans()):  # a well-formed file, perhaps with one token damaged
        n = draw(st.integers(1, 4))
        vals = draw(st.lists(st.integers(-9, 99), min_size=2 * n * n, max_size=2 * n * n))
        toks = [str(n), *map(str, vals)]
        kind = "dat"
        if draw(st.booleans()):
            p = draw(st.permutations(range(1, n + 1)))
            toks, kind = [str(n), str(draw(st.integers(0, 99))), *map(str, p)], "sln"
        if draw(st.booleans()):
            toks[draw(st.integers(0, len(toks) - 1))] = draw(tokens)
        return toks, kind
    return draw(st.lists(tokens, max_size=40)), draw(st.sampled_from(["dat", "sln"]))


@FUZZ
@given(qaplib_texts())
def test_qaplib_reader(tmp_path_factory, text):
    toks, kind = text
    path = tmp_path_factory.mktemp("q") / f"x.{kind}"
    path.write_text(" ".join(toks))
    read = qaplib.read_dat if kind == "dat" else qaplib.read_sln
    out = call_documented(read, path)
    if out is None:
        return
    if kind == "dat":
        A, B = out
        assert A.shape == B.shape and A.ndim == 2 and A.shape[0] == A.shape[1] >= 1
    else:
        n, _, p = out
        assert sorted(np.asarray(p).tolist()) == list(range(n))


@FUZZ
@given(st.binary(max_size=200))
def test_qaplib_reader_binary(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("q") / "x.dat"
    path.write_bytes(raw)
    call_documented(qaplib.read_dat, path)  # only the documented errors may escape


# -- networks ------------------------------------------------------------------------------

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_mlp():
    from qapfuse.fusion import trace
    from qapfuse.fusion.models import MLP

    torch.manual_seed(0)
    model = MLP(3, (4, 5), 2)
    return model, trace(model, torch.zeros(1, 3))


@st.composite
def perm_dicts(draw):
    if draw(st.booleans()):  # well-formed permutations of some of the free groups
        sizes = {"layers.0": 4, "layers.2": 5}
        keys = draw(st.sets(st.sampled_from(sorted(sizes))))
        return {k: np.array(draw(st.permutations(range(sizes[k])))) for k in keys}
    return draw(bad_perm_dicts)


bad_perm_dicts = st.dictionaries(
    st.sampled_from(["layers.0", "layers.2", "output", "input", "nope"]),
    st.one_of(
        st.lists(st.integers(-2, 6), max_size=6),
        hnp.arrays(np.int64, st.integers(0, 6), elements=st.integers(-1, 6)),
        st.just(np.array([0.5, 1.5])),
    ),
    max_size=3,
)


@FUZZ
@given(perm_dicts())
def test_permute_and_graph(tiny_mlp, perms):
    from qapfuse.fusion import from_graph, permute, to_graph

    model, spec = tiny_mlp
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = call_documented(permute, model, spec, perms)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    if sd is None:
        return
    x = torch.randn(7, 3)
    permuted = type(model)(3, (4, 5), 2)
    permuted.load_state_dict(sd)
    torch.testing.assert_close(permuted(x), model(x), rtol=1e-5, atol=1e-6)
    graph = to_graph(sd, spec)
    back = from_graph(graph)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
